"""Run by tests/integration/test_engines.py (one process):
``python -m tests.scripts.deepspeed_unchecked_bf16 OUTPUT_DIR``.

`StabilityTrainer` + DeepSpeed ZeRO-2 (world size 1, CPU accelerator) in bf16 with ``bf16.check_grad_overflow:
false``, where DeepSpeed applies a NaN step: with its defaults it refuses at train begin (``skip_nonfinite`` cannot
be honoured), in one line naming the setting; with ``skip_nonfinite=False`` it warns in one line and trains, and
spike rollback (which runs there) restores the snapshot the NaN update spoiled, also after resuming from a
DeepSpeed checkpoint. ``OUTPUT_DIR/result.json``; the runs' events in ``OUTPUT_DIR/warned`` and ``/resumed``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys

with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port), "WANDB_MODE": "disabled"}.items():
    os.environ.setdefault(name, value)

import torch  # noqa: E402

from hf_stability import StabilityTrainer  # noqa: E402
from hf_stability.engines import UnsupportedEngineError  # noqa: E402
from tests.testing_utils import PoisonActivations, bert_tokenizer, mlm_dataset, tiny_bert, training_args  # noqa: E402

UNCHECKED = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto", "check_grad_overflow": False}}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    data = mlm_dataset(tokenizer, rows=64)

    def arguments(directory: str, **overrides):
        settings = dict(max_steps=8, per_device_train_batch_size=4, bf16=True, deepspeed=UNCHECKED, spike_window=8,
                        spike_warmup=3, spike_check_interval=1, snapshot_interval=2)
        return training_args(os.path.join(output_dir, directory), **{**settings, **overrides})

    result: dict[str, object] = {}
    refused = StabilityTrainer(tiny_bert(tokenizer), arguments("refused"), train_dataset=data)
    try:
        refused.train()
    except UnsupportedEngineError as error:
        result["refusal"] = str(error)
    result["refused_global_step"] = refused.state.global_step
    lines = Lines()
    logging.getLogger("hf_stability").addHandler(lines)
    trainer = StabilityTrainer(tiny_bert(tokenizer), arguments("warned", skip_nonfinite=False), train_dataset=data,
                               callbacks=[PoisonActivations([3])])
    trainer.train()
    result["warnings"] = [line for line in lines.lines if "DeepSpeed" in line]
    engine = trainer.model_wrapped
    result["skipped_steps"] = engine.skipped_steps
    result["losses"] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    result["final_finite"] = all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())
    result["last_loss_finite"] = math.isfinite(result["losses"][-1])
    # Resumed from a DeepSpeed checkpoint, Trainer re-creates the rollback callback: it still gets the engine.
    for max_steps, resume in ((4, None), (7, True)):
        resumed = StabilityTrainer(
            tiny_bert(tokenizer), arguments("resumed", skip_nonfinite=False, save_strategy="steps", save_steps=4,
                                            max_steps=max_steps),
            train_dataset=data, callbacks=[PoisonActivations([5])],
        )
        resumed.train(resume_from_checkpoint=resume)
    result["resumed_global_step"] = resumed.state.global_step
    weights = resumed.model_wrapped.module.parameters()
    result["resumed_final_finite"] = all(bool(torch.isfinite(p).all()) for p in weights)
    with open(os.path.join(output_dir, "result.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
