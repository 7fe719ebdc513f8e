"""Launched by tests/integration/callbacks/test_save_guard.py:
``torchrun --nproc_per_node 2 -m tests.scripts.save_two_ranks OUTPUT_DIR``.

Only rank 1's weights turn NaN in the update of step 25, and a user callback asks for a checkpoint at step 25 (no
save strategy). The check at the write all-reduces the verdict, so both ranks roll back together to their snapshot
of step 10 before checkpoint-25 is written, and end with identical parameters, which each rank saves to
``OUTPUT_DIR/rank{N}.pt`` for the test to compare.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from hf_stability import StabilityTrainer  # noqa: E402
from tests.rollback_faults import NanWeights, SaveAt  # noqa: E402
from tests.testing_utils import bert_tokenizer, mlm_dataset, tiny_bert, training_args  # noqa: E402


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    args = training_args(output_dir, max_steps=30, per_device_train_batch_size=4, logging_steps=25,
                         max_grad_norm=0.0, ddp_backend="gloo", snapshot_interval=10, spike_window=16, spike_warmup=8)
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=mlm_dataset(tokenizer, rows=128),
                               callbacks=[NanWeights([25], ranks=[1]), SaveAt([25])])
    trainer.train()
    parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    torch.save(parameters, os.path.join(output_dir, f"rank{args.process_index}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
