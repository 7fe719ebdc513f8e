"""FSDP2 (``fully_shard``) on 2 CPU ranks with gloo: skip, snapshots and telemetry see the whole sharded model."""

from __future__ import annotations

import pytest
import torch

from tests.testing_utils import run_two_ranks


@pytest.mark.distributed
def test_fsdp2_two_ranks_skip_snapshot_and_telemetry_are_global(tmp_path):
    run_two_ranks("tests.distributed.fsdp2_two_ranks", tmp_path, timeout=300)
    for rank in (0, 1):
        outcome = torch.load(tmp_path / f"rank{rank}.pt")
        # Norms of the whole gradient, not of this rank's shard (fp32 sums in another order: a few ulps).
        torch.testing.assert_close(outcome["norm"], outcome["expected_norm"], rtol=1e-5, atol=0)
        torch.testing.assert_close(outcome["layer_norms"], outcome["expected_layer_norms"], rtol=1e-5, atol=0)
        for key, expected in outcome["expected_fp16_metrics"].items():
            assert outcome["fp16_metrics"][key] == pytest.approx(expected, rel=1e-5), key
        # One NaN in rank 1's shard: both ranks skip, their shards and Adam state stay bit-identical.
        assert outcome["skipped"] and outcome["skipped_steps"] == 1
        assert outcome["unchanged_across_poisoned_step"] and outcome["changed_after"]
        assert outcome["cpu_restore_exact"] and outcome["disk_restore_exact"]
