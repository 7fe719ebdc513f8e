"""Launched by tests/integration/test_engines.py:
``accelerate launch --config_file DS.yaml -m tests.scripts.deepspeed_two_ranks OUTPUT_DIR fp32|bf16``.

A real DeepSpeed engine (CPU accelerator, gloo) on two processes, through `Trainer` and accelerate, in the
precision given (Trainer's ``bf16``, which fills the DeepSpeed config's ``bf16.enabled: auto``). Per rank,
written to ``OUTPUT_DIR/rank{N}.json`` for the test to read:

- ``StabilityTrainer(adaptive_clip=True)`` refuses in ``__init__`` with `UnsupportedEngineError`, naming adaptive
  clipping alone (spike rollback runs under DeepSpeed);
- a plain ``Trainer`` with ``SkipNonFiniteCallback`` refuses in ``train()`` before the first step;
- the same ``Trainer`` without the callback trains (DeepSpeed really runs here), so the refusals are not a crash;
- a plain ``Trainer`` with `DeepSpeedSkipTelemetryCallback`, rank 1 alone getting a NaN forward pass at step 2:
  DeepSpeed skips it, the callback counts it (``stability/skipped_steps``) and writes one ``skip`` event;
- ``StabilityTrainer`` with its defaults (in ``OUTPUT_DIR/stability``): the same NaN step 2 is skipped by
  DeepSpeed, reported, and not judged as a spike; a loss spike on rank 1 alone at step 5 rolls both ranks back to
  their snapshot of step 2, whose engine state (recorded at step 2 by a test callback) each rank then holds
  again bit for bit (LR cut by ``rollback_lr_factor``); training goes on to step 8.
"""

from __future__ import annotations

import json
import math
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_stability import SkipNonFiniteCallback, SpikeRollbackCallback, StabilityTrainer  # noqa: E402
from hf_stability.callbacks.deepspeed_telemetry import DeepSpeedSkipTelemetryCallback  # noqa: E402
from hf_stability.callbacks.order import find_callback  # noqa: E402
from hf_stability.engines import UnsupportedEngineError  # noqa: E402
from tests.scripts.deepspeed_rollback_two_ranks import EngineRecord, SpikeLoss  # noqa: E402
from tests.testing_utils import PoisonActivations, bert_tokenizer, mlm_dataset, tiny_bert, training_args  # noqa: E402

LR_FACTOR = 0.5


def refusal(build) -> str | None:
    """The one-line message of the `UnsupportedEngineError` ``build()`` raises, or None when it raises nothing."""
    try:
        build()
    except UnsupportedEngineError as error:
        return str(error)
    return None


def main(output_dir: str, precision: str) -> None:
    tokenizer = bert_tokenizer()
    data = mlm_dataset(tokenizer, rows=64)

    def arguments(args_class, directory=output_dir, max_steps=2, **overrides):
        return training_args(directory, args_class=args_class, max_steps=max_steps, per_device_train_batch_size=2,
                             bf16=precision == "bf16", **overrides)

    result = {"stability_trainer": refusal(
        lambda: StabilityTrainer(tiny_bert(tokenizer), arguments(None, adaptive_clip=True))
    )}
    trainer = Trainer(
        tiny_bert(tokenizer), arguments(TrainingArguments), train_dataset=data, callbacks=[SkipNonFiniteCallback()]
    )
    result["deepspeed_enabled"] = trainer.is_deepspeed_enabled
    result["callback"] = refusal(trainer.train)
    result["callback_global_step"] = trainer.state.global_step
    plain = Trainer(tiny_bert(tokenizer), arguments(TrainingArguments), train_dataset=data)
    result["plain_loss"] = plain.train().training_loss
    result["plain_global_step"] = plain.state.global_step
    telemetry = DeepSpeedSkipTelemetryCallback()
    reported = Trainer(
        tiny_bert(tokenizer),
        arguments(TrainingArguments, max_steps=3),
        train_dataset=data,
        callbacks=[telemetry, PoisonActivations([1], ranks=[1])],
    )
    reported.train()
    result["reported_skipped_steps"] = telemetry.skipped_steps
    result["reported_log"] = [
        (row["step"], row.get("stability/skipped_steps"), row.get("grad_norm")) for row in reported.state.log_history
        if "loss" in row
    ]
    stability_dir = os.path.join(output_dir, "stability")
    recorder = EngineRecord({2, 5})
    stability = StabilityTrainer(
        tiny_bert(tokenizer),
        arguments(None, stability_dir, max_steps=8, spike_window=8, spike_warmup=3, spike_check_interval=1,
                  snapshot_interval=2, rollback_lr_factor=LR_FACTOR),
        train_dataset=data,
        callbacks=[PoisonActivations([1], ranks=[1]), SpikeLoss(5, ranks=[1]), recorder],
    )
    recorder.trainer = stability
    stability.train()
    rollback = find_callback(stability.callback_handler.callbacks, SpikeRollbackCallback)
    result["rollbacks"] = rollback.rollbacks
    result["stability_log"] = [
        (row["step"], row.get("stability/skipped_steps"), row["loss"]) for row in stability.state.log_history
        if "loss" in row
    ]
    result.update(recorder.rollback_outcome(2, 5, LR_FACTOR))
    engine = stability.model_wrapped
    result["counters_at_end"] = [engine.global_steps, engine.skipped_steps]
    result["final_finite"] = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())
                                 for p in engine.module.parameters())
    result["final_loss_finite"] = math.isfinite(result["stability_log"][-1][2])
    with open(os.path.join(output_dir, f"rank{plain.args.process_index}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
