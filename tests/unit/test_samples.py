"""`hf_stability.samples.SampleRecord`: the bound of what it keeps (the Trainer runs are in tests/integration)."""

from __future__ import annotations

import torch

from hf_stability.samples import DATASET_INDEX, SampleRecord


def test_the_record_keeps_only_what_a_holder_may_still_report():
    """Indices from the oldest step any holder may name, inputs from the oldest step any may recompute."""
    record = SampleRecord(DATASET_INDEX, lambda inputs, count: torch.zeros(count))
    record.hold("skip", 1)
    record.hold("rollback", 3, inputs_from=5)
    for step in range(1, 8):
        record.add(step, torch.tensor([step]), torch.tensor(0.0), {"input_ids": torch.ones(1, 2)})
    assert record.steps() == list(range(1, 8))  # the skip callback still holds step 1
    record.hold("skip", 8)
    record.add(8, torch.tensor([8]), torch.tensor(0.0), {"input_ids": torch.ones(1, 2)})
    assert record.steps() == list(range(3, 9))
    assert [record.sample_losses(step) is not None for step in record.steps()] == [False] * 2 + [True] * 4
    assert record.host_indices([3, 8]) == {3: [[3]], 8: [[8]]}
    without_losses = SampleRecord(DATASET_INDEX, None)
    without_losses.add(1, torch.tensor([0]), None, {"input_ids": torch.ones(1, 2)})
    assert without_losses.steps() == [1] and without_losses.sample_losses(1) is None
