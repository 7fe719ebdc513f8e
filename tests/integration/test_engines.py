"""Engine support: under DeepSpeed and tensor parallelism every stability protection refuses to start instead of
staying silently inactive (FSDP version 1: tests/integration/test_engines_fsdp2.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import ParallelismConfig
from transformers import TrainingArguments

from hf_stability import SkipNonFiniteCallback
from hf_stability.engines import (
    UnsupportedEngineError,
    deepspeed_enabled,
    engine_refusal,
    refuse_for_callback,
    refuse_protections,
    refuse_unsupported_engine,
)
from hf_stability.events import read_events
from tests.testing_utils import bert_tokenizer, run_module, run_two_ranks, subprocess_env, tiny_bert, training_args


def test_refusal_is_one_line_naming_the_protections_and_the_alternative(tmp_path):
    with pytest.raises(UnsupportedEngineError, match="deepspeed") as raised:
        refusal = engine_refusal(SimpleNamespace(deepspeed="ds.json"))
        refuse_unsupported_engine(["SkipNonFiniteCallback", "SpikeRollbackCallback"], refusal)
    message = str(raised.value)
    assert "\n" not in message
    assert "SkipNonFiniteCallback, SpikeRollbackCallback" in message and "FSDP2" in message
    assert isinstance(raised.value, ValueError)
    refuse_unsupported_engine(["SkipNonFiniteCallback"], engine_refusal(training_args(tmp_path)))  # other engines


def test_plain_arguments_are_not_deepspeed(tmp_path):
    assert not deepspeed_enabled(training_args(tmp_path))


def _deepspeed_launch_config(tmp_path: Path, stage: int) -> Path:
    """An accelerate config for two DeepSpeed processes on CPU (DeepSpeed's CPU accelerator, gloo); bf16 follows
    Trainer's ``bf16`` (``"auto"``), with DeepSpeed's default ``bf16.check_grad_overflow`` (on)."""
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": stage},
                "bf16": {"enabled": "auto"},
            }
        )
    )
    launch = tmp_path / "accelerate.yaml"
    launch.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ds_config}\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nrdzv_backend: static\nsame_network: true\nuse_cpu: true\n"
    )
    return launch


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("stage", "precision"), [(1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_deepspeed_two_ranks_through_trainer(tmp_path, stage, precision):
    """Trainer + accelerate + DeepSpeed on 2 CPU ranks: what refuses, DeepSpeed's own skip reported, and
    `StabilityTrainer`'s defaults (spike rollback included) protecting the run (distributed/deepspeed_two_ranks.py)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[dev]' installs it)")
    launch = _deepspeed_launch_config(tmp_path, stage)
    module = "tests.scripts.deepspeed_two_ranks"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch), "-m", module, str(tmp_path),
         precision],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    described = "bf16 with `check_grad_overflow`" if precision == "bf16" else "fp32"
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["deepspeed_enabled"]
        # Adaptive clipping is refused alone; spike rollback runs under DeepSpeed.
        assert outcome["stability_trainer"].startswith("`deepspeed`: hf-stability's AdaptiveClipCallback cannot")
        assert "SpikeRollbackCallback" not in outcome["stability_trainer"] and "FSDP2" in outcome["callback"]
        # The refusal reads accelerate's DeepSpeed plugin config, precision included.
        assert f"DeepSpeed's own overflow skip (ZeRO-{stage}, {described}) is measured" in outcome["callback"]
        assert outcome["callback_global_step"] == 0  # refused before any update
        # DeepSpeed itself trains here:
        assert outcome["plain_global_step"] == 2 and math.isfinite(outcome["plain_loss"])
        # DeepSpeed's own skip of rank 1's NaN step 2, made visible: counted on both ranks, logged, one event.
        assert outcome["reported_skipped_steps"] == 1
        assert [(step, skipped) for step, skipped, _ in outcome["reported_log"]] == [(1, 0), (2, 1), (3, 1)]
        assert outcome["reported_log"][1][2] == math.inf  # the engine's global grad norm of the skipped step
        # StabilityTrainer's defaults: the skip reported the same way and not judged a spike; the spike of step 5
        # rolled both ranks back to their snapshot of step 2, bit for bit, with the LR cut; training went on.
        assert [row[:2] for row in outcome["stability_log"]] == [[step, int(step >= 2)] for step in range(1, 9)]
        assert outcome["rollbacks"] == 1 and all(outcome["restored"].values()), outcome["restored"]
        assert outcome["visible"]  # the weights the module holds whole are those its restored partitions make
        assert outcome["lr_cut"] and outcome["scheduler_position"]
        # The engine's counters went back to step 2's (2 steps, 1 skipped) and on for steps 6-8.
        assert outcome["counters_at_end"] == [5, 1]
        assert outcome["final_finite"] and outcome["final_loss_finite"]
    assert [(e["event"], e["step"], e["reason"]) for e in read_events(tmp_path)] == [("skip", 2, "deepspeed_overflow")]
    events = read_events(tmp_path / "stability")
    assert [(e["event"], e["step"]) for e in events] == [("skip", 2), ("rollback", 5)]
    assert events[1]["restored_step"] == 2 and events[1]["spike_step"] == 5


def test_tensor_parallel_arguments_refuse_in_one_line(tmp_path):
    args = training_args(tmp_path, parallelism_config=ParallelismConfig(tp_size=2))
    with pytest.raises(UnsupportedEngineError, match=r"`tp_size=2`: hf-stability's SkipNonFiniteCallback") as raised:
        refuse_for_callback(SkipNonFiniteCallback(), args)
    assert "\n" not in str(raised.value)
    # Data parallel only (tp_size 1) and a model loaded without tp_plan (its tp_size is None) are not refused.
    assert engine_refusal(training_args(tmp_path, parallelism_config=ParallelismConfig(dp_shard_size=2))) is None
    assert engine_refusal(training_args(tmp_path), tiny_bert(bert_tokenizer())) is None


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_own_overflow_skip_leaves_every_rank_untouched_bit_for_bit(tmp_path):
    """DeepSpeed's engine (not hf-stability, which still refuses DeepSpeed) skips a step with a NaN loss on one rank
    in ZeRO-1/2/3, fp32 and bf16 (its default ``check_grad_overflow``), and does not with that check off. fp16
    cannot run on DeepSpeed's CPU
    accelerator here (``is_fp16_supported()`` is False without mkldnn fp16)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[dev]' installs it)")
    run_two_ranks("tests.scripts.deepspeed_skip_two_ranks", tmp_path, timeout=580)
    for rank in (0, 1):
        outcomes = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        unchecked = outcomes.pop("zero2-bf16-nocheck")
        # bf16 with `check_grad_overflow: false`: the NaN step is applied, the fp32 masters stay non-finite from then
        # on, and DeepSpeed counts no skipped step (the silent corruption of DeepSpeed PR 8035 / issue 8415).
        assert unchecked["step_applied"] and not unchecked["finite"] and unchecked["skipped_steps"] == 0
        assert set(outcomes) == {f"zero{stage}-{precision}" for stage in (1, 2, 3) for precision in ("fp32", "bf16")}
        for name, outcome in outcomes.items():
            untouched = ("parameters", "fp32_masters", "optimizer_state", "lr_scheduler_held")
            assert all(outcome[key] for key in untouched), (rank, name, outcome)
            assert not outcome["step_applied"] and outcome["skipped_steps"] == 1 and outcome["grad_norm"] == math.inf
            assert outcome["applied_after"] and all(outcome["changed_after"].values()), (rank, name, outcome)


@pytest.mark.parametrize(
    ("deepspeed", "bf16", "says"),
    [
        ({"zero_optimization": {"stage": 2}}, False, "DeepSpeed's own overflow skip (ZeRO-2, fp32) is measured"),
        ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}, True, "(ZeRO-3, bf16 with"),
        (
            {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto", "check_grad_overflow": False}},
            True,
            "DeepSpeed will NOT skip a non-finite step here (`bf16.check_grad_overflow: false`)",
        ),
        (
            {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
            False,
            "with the BF16_Optimizer path (bf16 + ZeRO-1 + `data_types.grad_accum_dtype: fp32`) is not measured",
        ),
        ({"zero_optimization": {"stage": 0}}, False, "with `zero_optimization.stage: 0` is not measured"),
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, False, "with `fp16` is not measured"),
    ],
    ids=["zero2-fp32", "zero3-bf16-auto", "bf16-unchecked", "bf16-optimizer", "stage0", "fp16"],
)
def test_deepspeed_refusal_names_what_deepspeed_itself_does_with_a_nonfinite_step(tmp_path, deepspeed, bf16, says):
    config = {"train_micro_batch_size_per_gpu": "auto", **deepspeed}
    args = training_args(tmp_path, args_class=TrainingArguments, deepspeed=config, bf16=bf16)
    with pytest.raises(UnsupportedEngineError) as raised:
        refuse_for_callback(SkipNonFiniteCallback(), args)
    message = str(raised.value)
    assert "\n" not in message and says in message and message.startswith("`deepspeed`: hf-stability's Skip")


def test_deepspeed_skip_requested_where_deepspeed_does_not_skip_refuses_telemetry_alone_warns(tmp_path, caplog):
    from transformers import TrainerControl, TrainerState

    from hf_stability.callbacks.deepspeed_telemetry import DeepSpeedSkipTelemetryCallback

    unchecked = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
                 "bf16": {"enabled": True, "check_grad_overflow": False}}
    args = training_args(tmp_path, args_class=TrainingArguments, deepspeed=unchecked)
    with pytest.raises(UnsupportedEngineError, match=r"^`deepspeed`: `skip_nonfinite` cannot be honoured: .*"
                       r"`bf16.check_grad_overflow: false`") as raised:
        DeepSpeedSkipTelemetryCallback(require_skip=True).on_train_begin(args, TrainerState(), TrainerControl())
    assert "\n" not in str(raised.value)
    with caplog.at_level("WARNING"):
        DeepSpeedSkipTelemetryCallback().on_train_begin(args, TrainerState(), TrainerControl())
    assert "DeepSpeed will NOT skip" in caplog.text


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_snapshots_restore_every_rank_bit_for_bit_per_zero_stage(tmp_path):
    """`DeepSpeedSnapshotStore` on a real ZeRO-1/2/3 engine, fp32 and bf16 (one launch, six engines, ~30 s): after a
    loss spike on rank 1 and one more step, the restore (from host memory, and later from disk) puts back every
    rank's parameters or ZeRO-3 partitions, fp32 master partitions, Adam moments and step, param-group LR, engine
    counters and LR scheduler bit for bit, with the bit16 weights recomputed from the masters; training goes on."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[dev]' installs it)")
    run_two_ranks("tests.scripts.deepspeed_rollback_two_ranks", tmp_path, timeout=580)
    for rank in (0, 1):
        outcomes = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert set(outcomes) == {f"zero{stage}-{precision}" for stage in (1, 2, 3) for precision in ("fp32", "bf16")}
        for name, outcome in outcomes.items():
            assert all(outcome["restored"].values()), (rank, name, outcome["restored"])
            assert all(outcome["restored_from_disk"].values()), (rank, name, outcome["restored_from_disk"])
            assert outcome["bit16_from_masters"] and outcome["visible"] and outcome["finite"], (rank, name)
            # The spike and the step after it changed what the restore put back, and the run went on from it
            # (not the loss scale: static outside fp16).
            moving = ("parameters", "gathered", "fp32_masters", "optimizer_state", "lr", "counters", "scheduler")
            assert all(outcome["moved"][key] and outcome["went_on"][key] for key in moving), (rank, name, outcome)
    assert not (tmp_path / "snapshots").exists()  # the disk snapshots are removed by `clear`


@pytest.mark.parametrize(
    ("deepspeed", "says"),
    [
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "not proven under `fp16`"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "under ZeRO offload"),
        ({"zero_optimization": {"stage": 0}}, "under `zero_optimization.stage: 0`"),
        (
            {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
            "under the BF16_Optimizer path",
        ),
        ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, None),
    ],
    ids=["fp16", "offload", "stage0", "bf16-optimizer", "zero3-bf16"],
)
def test_deepspeed_rollback_refused_alone_where_not_proven(tmp_path, deepspeed, says):
    """Under DeepSpeed, spike rollback runs where proven (ZeRO-1/2/3, fp32/bf16, no offload) and is otherwise refused
    on its own, naming the setting; the protections that cannot run under DeepSpeed are refused without it."""
    config = {"train_micro_batch_size_per_gpu": "auto", **deepspeed}
    args = training_args(tmp_path, args_class=TrainingArguments, deepspeed=config)
    if says is None:
        refuse_protections(["SpikeRollbackCallback"], args)
    else:
        with pytest.raises(UnsupportedEngineError) as raised:
            refuse_protections(["SpikeRollbackCallback"], args)
        message = str(raised.value)
        assert "\n" not in message and says in message and "spike_rollback=False" in message
        assert message.startswith("`deepspeed`: hf-stability's SpikeRollbackCallback is not proven")
    with pytest.raises(UnsupportedEngineError) as raised:
        refuse_protections(["AdaptiveClipCallback", "SpikeRollbackCallback"], args)
    assert str(raised.value).startswith("`deepspeed`: hf-stability's AdaptiveClipCallback cannot work under DeepSpeed")


def test_deepspeed_rollback_under_a_plain_trainer_refuses_before_the_first_step(tmp_path):
    """A plain `Trainer` cannot hand the callback the DeepSpeed engine whose partitions the snapshots hold."""
    from transformers import TrainerControl, TrainerState

    from hf_stability import SpikeRollbackCallback

    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
    args = training_args(tmp_path, args_class=TrainingArguments, deepspeed=config)
    model = tiny_bert(bert_tokenizer())
    with pytest.raises(UnsupportedEngineError, match=r"^`deepspeed`: SpikeRollbackCallback under DeepSpeed .* needs "
                       r"StabilityTrainer") as raised:
        SpikeRollbackCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_deepspeed_bf16_without_overflow_check_refuses_skip_warns_and_rollback_restores(tmp_path):
    """`StabilityTrainer` + DeepSpeed ZeRO-2 bf16 with ``check_grad_overflow: false`` (one process, ~15 s): the
    default ``skip_nonfinite`` refuses before the first step, naming the setting; without it a one-line warning, the
    NaN update is applied (DeepSpeed counts nothing), and spike rollback restores the snapshot before it, also after
    a resume from a DeepSpeed checkpoint."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[dev]' installs it)")
    result = run_module("tests.scripts.deepspeed_unchecked_bf16", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads((tmp_path / "result.json").read_text())
    unchecked = "DeepSpeed will NOT skip a non-finite step here (`bf16.check_grad_overflow: false`)"
    assert outcome["refusal"] == f"`deepspeed`: `skip_nonfinite` cannot be honoured: {unchecked}."
    assert outcome["refused_global_step"] == 0
    assert outcome["warnings"] == [f"DeepSpeed: non-finite steps are not skipped: {unchecked}."]
    assert outcome["skipped_steps"] == 0  # DeepSpeed applied the NaN step of step 4
    events = read_events(tmp_path / "warned")
    assert [(e["event"], e["step"], e["restored_step"], e["nonfinite_weights"]) for e in events] == [
        ("rollback", 4, 2, True)
    ]
    assert outcome["final_finite"] and outcome["last_loss_finite"] and len(outcome["losses"]) == 8
    # Resumed at step 4 from a DeepSpeed checkpoint (Trainer re-creates the callbacks): the NaN update of step 6 is
    # rolled back to the state resumed from, and training ends at step 7 with finite weights.
    resumed = [(e["event"], e["step"], e.get("restored_step")) for e in read_events(tmp_path / "resumed")]
    assert resumed == [("rollback", 6, 4)] and outcome["resumed_global_step"] == 7 and outcome["resumed_final_finite"]
