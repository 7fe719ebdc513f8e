"""Launched by tests/integration/callbacks/test_rollback.py:
``torchrun --nproc_per_node 2 -m tests.scripts.rollback_two_ranks OUTPUT_DIR``.

Only rank 1's weights are thrown at step 30, so only rank 1's loss spikes. Both ranks must roll back
at the same step to their own snapshot of step 20 and end with bit-identical parameters; each rank saves its
parameters to ``OUTPUT_DIR/rank{N}.pt`` for the test to compare.

The script ends without a collective of its own: a gloo worker thread that releases the last reference to a
collective's tensors while the interpreter shuts down aborts the process ("terminate called without an
active exception"), so the comparison happens in the test instead.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_stability import SpikeRollbackCallback  # noqa: E402
from tests.rollback_faults import ThrowWeights  # noqa: E402
from tests.testing_utils import bert_tokenizer, mlm_dataset, tiny_bert, training_args  # noqa: E402


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    args = training_args(
        output_dir,
        args_class=TrainingArguments,
        max_steps=50,
        per_device_train_batch_size=4,
        logging_steps=25,
        max_grad_norm=0.0,
        ddp_backend="gloo",
    )
    callback = SpikeRollbackCallback(window=16, warmup=8, snapshot_interval=10)
    trainer = Trainer(
        tiny_bert(tokenizer),
        args,
        train_dataset=mlm_dataset(tokenizer, rows=128),
        callbacks=[callback, ThrowWeights([30], ranks=[1])],
    )
    trainer.train()
    if callback.rollbacks != 1:
        raise RuntimeError(f"rank {args.process_index}: expected one rollback, got {callback.rollbacks}")
    parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    torch.save(parameters, os.path.join(output_dir, f"rank{args.process_index}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
