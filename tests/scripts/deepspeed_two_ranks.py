"""Launched by tests/integration/test_engines.py:
``accelerate launch --config_file DS.yaml -m tests.scripts.deepspeed_two_ranks OUTPUT_DIR``.

A real DeepSpeed engine (CPU accelerator, gloo) on two processes. Three checks per rank, written to
``OUTPUT_DIR/rank{N}.json`` for the test to read:

- ``StabilityTrainer`` refuses in ``__init__`` with `UnsupportedEngineError`;
- a plain ``Trainer`` with ``SkipNonFiniteCallback`` refuses in ``train()`` before the first step;
- the same ``Trainer`` without the callback trains (DeepSpeed really runs here), so the refusals are not a crash;
- a plain ``Trainer`` with `DeepSpeedSkipTelemetryCallback`, rank 1 alone getting a NaN forward pass at step 2:
  DeepSpeed skips it, the callback counts it (``stability/skipped_steps``) and writes one ``skip`` event;
- the same with ``StabilityTrainer(spike_rollback=False)`` (in ``OUTPUT_DIR/stability``), which installs it.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")

from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_stability import SkipNonFiniteCallback, StabilityTrainer  # noqa: E402
from hf_stability.callbacks.deepspeed_telemetry import DeepSpeedSkipTelemetryCallback  # noqa: E402
from hf_stability.engines import UnsupportedEngineError  # noqa: E402
from tests.testing_utils import PoisonActivations, bert_tokenizer, mlm_dataset, tiny_bert, training_args  # noqa: E402


def refusal(build) -> str | None:
    """The one-line message of the `UnsupportedEngineError` ``build()`` raises, or None when it raises nothing."""
    try:
        build()
    except UnsupportedEngineError as error:
        return str(error)
    return None


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    data = mlm_dataset(tokenizer, rows=16)

    def arguments(args_class):
        return training_args(output_dir, args_class=args_class, max_steps=2, per_device_train_batch_size=2)

    result = {"stability_trainer": refusal(lambda: StabilityTrainer(tiny_bert(tokenizer), arguments(None)))}
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
        training_args(output_dir, args_class=TrainingArguments, max_steps=3, per_device_train_batch_size=2),
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
    stability = StabilityTrainer(
        tiny_bert(tokenizer),
        training_args(stability_dir, max_steps=3, per_device_train_batch_size=2, spike_rollback=False),
        train_dataset=data,
        callbacks=[PoisonActivations([1], ranks=[1])],
    )
    stability.train()
    result["stability_log"] = [
        (row["step"], row.get("stability/skipped_steps")) for row in stability.state.log_history if "loss" in row
    ]
    with open(os.path.join(output_dir, f"rank{plain.args.process_index}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
