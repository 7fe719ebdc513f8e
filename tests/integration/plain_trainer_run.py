"""A real plain-`Trainer` run with the stability callbacks and one poisoned step, for report tests.

It calls no `save_state`, so the only ``trainer_state.json`` is the one in its final checkpoint, as
after a run that stopped without the recipes' bookkeeping.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer, TrainingArguments, default_data_collator

from hf_stability import LossScaleTelemetryCallback, SkipNonFiniteCallback
from tests.testing_utils import PoisonGradient, mlm_dataset, tiny_bert

STEPS = 8
POISONED_STEP = 3  # `state.global_step` when the step begins: the 4th optimizer step gets an Inf gradient


def train_plain_run(output_dir: Path, tokenizer) -> Path:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_steps=STEPS,
        report_to="none",
        train_sampling_strategy="sequential",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny_bert(tokenizer),
        args=args,
        train_dataset=mlm_dataset(tokenizer, rows=64),
        data_collator=default_data_collator,
        callbacks=[SkipNonFiniteCallback(), PoisonGradient(steps=[POISONED_STEP])],
    )
    LossScaleTelemetryCallback.attach(trainer)
    trainer.train()
    return output_dir
