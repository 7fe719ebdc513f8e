"""Launched by tests/integration/test_compat.py:
``torchrun --nproc_per_node 2 -m tests.scripts.warnings_two_ranks OUTPUT_DIR``.

Both ranks build a `StabilityTrainer` from plain `TrainingArguments` (a construction warning) and get a NaN
loss at one step (a skip warning and the `logging_nan_inf_filter` UserWarning): each must be printed once.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")

from transformers import TrainingArguments  # noqa: E402

from hf_stability import StabilityTrainer  # noqa: E402
from tests.testing_utils import PoisonActivations, bert_tokenizer, mlm_dataset, tiny_bert, training_args  # noqa: E402


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    args = training_args(output_dir, TrainingArguments, max_steps=3, per_device_train_batch_size=4, ddp_backend="gloo")
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=mlm_dataset(tokenizer, rows=32))
    trainer.add_callback(PoisonActivations([1]))
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
