"""Launched by tests/integration/callbacks/test_rollback.py:
``torchrun --nproc_per_node 2 -m tests.scripts.nonfinite_two_ranks OUTPUT_DIR``.

Only rank 1's weights turn NaN after the update of step 25 (an overflow inside its update). DDP averages the NaN
gradients into both ranks, so no batch is to blame: both ranks must roll back together (at the next check, step
30, as the fused optimizer's flags are queued on device) to their own snapshot of step 10, without counting a
skipped batch, and end with identical finite parameters, which each rank saves to ``OUTPUT_DIR/rank{N}.pt`` for
the test to compare (no collective of its own: see rollback_two_ranks.py).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from hf_stability import SkipNonFiniteCallback, SpikeRollbackCallback, StabilityTrainer  # noqa: E402
from hf_stability.callbacks.order import find_callback  # noqa: E402
from tests.rollback_faults import NanWeights  # noqa: E402
from tests.testing_utils import bert_tokenizer, mlm_dataset, tiny_bert, training_args  # noqa: E402


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    args = training_args(output_dir, max_steps=40, per_device_train_batch_size=4, logging_steps=25,
                         max_grad_norm=0.0, ddp_backend="gloo", snapshot_interval=10, spike_window=16, spike_warmup=8)
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=mlm_dataset(tokenizer, rows=128),
                               callbacks=[NanWeights([25], ranks=[1])])
    trainer.train()
    callbacks = trainer.callback_handler.callbacks
    rollbacks = find_callback(callbacks, SpikeRollbackCallback).rollbacks
    skipped = find_callback(callbacks, SkipNonFiniteCallback).skipped_steps
    if (rollbacks, skipped) != (1, 0):
        raise RuntimeError(f"rank {args.process_index}: expected 1 rollback, 0 skips; got {rollbacks}, {skipped}")
    parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    torch.save(parameters, os.path.join(output_dir, f"rank{args.process_index}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
