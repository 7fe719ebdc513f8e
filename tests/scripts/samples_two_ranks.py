"""Launched by tests/integration/test_samples.py:
``torchrun --nproc_per_node 2 -m tests.scripts.samples_two_ranks OUTPUT_DIR``.

Two runs, each with samples 6 and 33 poisoned (`poison_samples`): a map-style dataset (each rank's sampler shard,
``OUTPUT_DIR/map``) and a stream without a length (``OUTPUT_DIR/stream``: accelerate reads the batches on rank 0
and dispatches them, the tags with them). Each rank saves the batches its collator built to
``OUTPUT_DIR/<run>/rank{N}.json`` for the test to read the events' indices against.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")

from hf_stability import StabilityTrainer  # noqa: E402
from tests.integration.test_samples import Collated, Stream  # noqa: E402
from tests.testing_utils import (  # noqa: E402
    bert_tokenizer,
    mlm_dataset,
    poison_embeddings,
    poison_samples,
    tiny_bert,
    training_args,
)

POISONED = [6, 33]


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    token = len(tokenizer) - 1
    dataset = poison_samples(mlm_dataset(tokenizer, rows=64), POISONED, token)
    for run, train_dataset in (("map", dataset), ("stream", Stream(dataset))):
        model = tiny_bert(tokenizer)
        poison_embeddings(model, token)
        collated = Collated()
        args = training_args(os.path.join(output_dir, run), max_steps=6, per_device_train_batch_size=4,
                             logging_steps=100, ddp_backend="gloo")
        trainer = StabilityTrainer(model, args, train_dataset=train_dataset, data_collator=collated)
        trainer.train()
        with open(os.path.join(output_dir, run, f"rank{args.process_index}.json"), "w") as file:
            json.dump(sorted(collated.batches), file)


if __name__ == "__main__":
    main(sys.argv[1])
