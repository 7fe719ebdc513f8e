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
    refuse_unsupported_engine,
)
from hf_stability.events import read_events
from tests.testing_utils import bert_tokenizer, run_two_ranks, subprocess_env, tiny_bert, training_args


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
    """An accelerate config for two DeepSpeed processes on CPU (DeepSpeed's CPU accelerator, gloo)."""
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": stage},
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
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_two_ranks_refuse_before_the_first_step(tmp_path, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[dev]' installs it)")
    launch = _deepspeed_launch_config(tmp_path, stage)
    module = "tests.scripts.deepspeed_two_ranks"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch), "-m", module, str(tmp_path)],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["deepspeed_enabled"]
        for protections in ("stability_trainer", "callback"):
            assert outcome[protections] is not None and "FSDP2" in outcome[protections], outcome
        assert "SpikeRollbackCallback" in outcome["stability_trainer"]
        # The refusal reads accelerate's DeepSpeed plugin config: fp32 here, DeepSpeed's own skip measured.
        assert f"DeepSpeed's own overflow skip (ZeRO-{stage}, fp32) is measured" in outcome["callback"], outcome
        assert outcome["callback_global_step"] == 0  # refused before any update
        # DeepSpeed itself trains here:
        assert outcome["plain_global_step"] == 2 and math.isfinite(outcome["plain_loss"])
        # DeepSpeed's own skip of rank 1's NaN step 2, made visible: counted on both ranks, logged, one event.
        assert outcome["reported_skipped_steps"] == 1
        assert [(step, skipped) for step, skipped, _ in outcome["reported_log"]] == [(1, 0), (2, 1), (3, 1)]
        assert outcome["reported_log"][1][2] == math.inf  # the engine's global grad norm of the skipped step
        # StabilityTrainer without rollback delegates the skip to DeepSpeed and reports it the same way.
        assert outcome["stability_log"] == [[1, 0], [2, 1], [3, 1]]  # JSON lists
    for output_dir in (tmp_path, tmp_path / "stability"):
        events = read_events(output_dir)
        assert [(e["event"], e["step"], e["reason"]) for e in events] == [("skip", 2, "deepspeed_overflow")]


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
