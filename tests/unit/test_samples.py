"""`hf_stability.samples`: the record's bound and the bad-samples file (the Trainer runs are in tests/integration)."""

from __future__ import annotations

import pytest
import torch

from hf_stability.doctor import read_bad_samples
from hf_stability.samples import BAD_SAMPLES_FILENAME, DATASET_INDEX, SampleRecord, record_bad_samples


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


def test_the_bad_samples_file_merges_and_an_unreadable_one_is_moved_aside(tmp_path):
    fields = {"index_kind": DATASET_INDEX, "_blamed": [
        {"index": 7, "rank": 0, "micro_batch": 1, "step": 4, "loss": float("nan")}]}
    (tmp_path / BAD_SAMPLES_FILENAME).write_text('{"7": [{"step": 2, "event": "skip"}]}')
    record_bad_samples(tmp_path, "skip", fields)
    assert read_bad_samples(tmp_path) == {7: [{"step": 2, "event": "skip"}, {
        "step": 4, "event": "skip", "rank": 0, "micro_batch": 1, "index_kind": DATASET_INDEX, "loss": "nan"}]}
    (tmp_path / BAD_SAMPLES_FILENAME).write_text('{"7": [{"st')  # torn by a crash mid-write of another tool
    with pytest.warns(UserWarning, match="moved to stability_bad_samples.unreadable-"):
        record_bad_samples(tmp_path, "rollback", fields)
    assert [e["event"] for e in read_bad_samples(tmp_path)[7]] == ["rollback"]
    (aside,) = tmp_path.glob("stability_bad_samples.unreadable-*.json")
    assert aside.read_text() == '{"7": [{"st'


def test_a_sample_without_labels_has_no_loss_of_its_own_and_is_not_blamed():
    """Row 1 holds no label (no masked token): its recomputed loss is 0/0 = NaN, as a poisoned row's is, but only
    row 0's NaN names a bad sample; row 1 is left out of the per-sample losses."""
    nan = float("nan")
    record = SampleRecord(DATASET_INDEX, lambda inputs, count: torch.tensor([nan, nan, 1.5]))
    labels = torch.tensor([[4, -100], [-100, -100], [5, 6]])
    record.add(1, torch.tensor([10, 11, 12]), torch.tensor(nan), {"input_ids": torch.ones(3, 2), "labels": labels})
    losses = record.sample_losses(1)
    assert losses is not None and [entry["index"] for entry in losses] == [10, 12]
    assert str(losses[0]["loss"]) == "nan" and losses[1]["loss"] == 1.5
