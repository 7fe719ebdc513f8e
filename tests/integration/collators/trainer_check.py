"""The check every collator test file ends with: a real `Trainer` takes steps with the collator."""

from __future__ import annotations

import math

import torch
from transformers import Trainer, TrainingArguments


def assert_trainer_steps(model, train_dataset, data_collator, output_dir, batch_size: int = 4) -> Trainer:
    """Two optimizer steps of a real `Trainer`: the loss is finite and most parameters moved."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator)
    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[name])]
    assert len(changed) > len(before) // 2
    return trainer
