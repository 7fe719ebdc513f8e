"""Launched by tests/integration/callbacks/test_skip.py:
``torchrun --nproc_per_node 2 -m tests.scripts.skip_two_ranks OUTPUT_DIR``.

Rank 1 alone gets a NaN forward pass at one step. Each rank checks that its parameters and optimizer
state did not change across that step and did change afterwards, then saves its final parameters for
the test to compare across ranks.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from hf_stability import SkipNonFiniteCallback, StabilityTrainer  # noqa: E402
from hf_stability.callbacks.order import find_callback  # noqa: E402
from tests.testing_utils import (  # noqa: E402
    PoisonActivations,
    StepSnapshots,
    assert_same_state,
    bert_tokenizer,
    changed_parameters,
    mlm_dataset,
    tiny_bert,
    training_args,
)

POISONED = 2


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    args = training_args(output_dir, max_steps=5, per_device_train_batch_size=4, ddp_backend="gloo")
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=mlm_dataset(tokenizer, rows=64))
    snapshots = StepSnapshots([POISONED, POISONED + 1])
    trainer.add_callback(PoisonActivations([POISONED], ranks=[1]))
    trainer.add_callback(snapshots)
    trainer.train()

    assert_same_state(snapshots.before[POISONED], snapshots.after[POISONED])
    rank = trainer.args.process_index
    torch.save(
        {
            "parameters": {name: p.detach().clone() for name, p in trainer.model.named_parameters()},
            "unchanged_across_poisoned_step": True,
            "changed_after": bool(changed_parameters(snapshots.before[POISONED + 1], snapshots.after[POISONED + 1])),
            "skipped_steps": find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback).skipped_steps,
        },
        os.path.join(output_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
