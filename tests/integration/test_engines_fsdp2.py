"""FSDP2 on 2 CPU ranks with gloo (raw ``fully_shard`` and Trainer + accelerate): skip, snapshots and telemetry see
the whole sharded model; FSDP version 1 is refused."""

from __future__ import annotations

import math

import pytest
import torch

from hf_stability.events import read_events
from tests.testing_utils import run_two_ranks


@pytest.mark.distributed
def test_fsdp2_two_ranks_skip_snapshot_and_telemetry_are_global(tmp_path):
    run_two_ranks("tests.scripts.fsdp2_two_ranks", tmp_path, timeout=300)
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


@pytest.mark.distributed
def test_trainer_fsdp2_two_ranks_end_to_end_and_fsdp1_refused(tmp_path):
    run_two_ranks("tests.scripts.trainer_fsdp_two_ranks", tmp_path, timeout=300)
    from tests.scripts.trainer_fsdp_two_ranks import POISONED, SNAPSHOT, THROWN

    outcomes = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for outcome in outcomes:
        # FSDP version 1: one line pointing to version 2, from StabilityTrainer and from a plain Trainer's callback.
        for refused in (outcome["fsdp1_stability_trainer"], outcome["fsdp1_callback"]):
            assert refused is not None and "\n" not in refused and "`fsdp_version: 2`" in refused, refused
        assert "SkipNonFiniteCallback" in outcome["fsdp1_callback"]
        # FSDP2 through accelerate: the NaN batch of rank 1 alone is skipped on both ranks, bit for bit.
        assert outcome["is_fsdp2"] and outcome["skipped_steps"] == 1
        assert outcome["unchanged_across_poisoned_step"] and outcome["changed_after"]
        # Rank 1's thrown shards spike the global loss: one rollback, each rank's shards and Adam state exact.
        assert outcome["rollbacks"] == 1 and outcome["restored_exact"]
        # Telemetry's per-tensor norms are of the whole gradient: they add up to Trainer's global norm.
        for row in outcome["log_history"]:
            layers = [value for key, value in row.items() if key.startswith("stability/grad_norm/")]
            if layers and math.isfinite(row["grad_norm"]):
                assert math.sqrt(sum(v * v for v in layers)) == pytest.approx(row["grad_norm"], rel=1e-4), row["step"]
    # ... and both ranks log the same global values.
    rows = [[row for row in outcome["log_history"] if "grad_norm" in row] for outcome in outcomes]
    for first, second in zip(*rows, strict=True):
        assert first.keys() == second.keys() and first["step"] == second["step"]
        assert all(first[key] == second[key] for key in first if "norm" in key and math.isfinite(first[key]))
    events = read_events(tmp_path)
    assert [(e["event"], e["step"]) for e in events] == [("skip", POISONED + 1), ("rollback", THROWN + 1)]
    assert events[0]["loss_ranks"] == [1] and events[1]["restored_step"] == SNAPSHOT
