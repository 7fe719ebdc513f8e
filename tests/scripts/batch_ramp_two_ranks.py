"""Two-rank batch ramp (torchrun, gloo): every rank writes the dataset indices it trained on per step to rank<N>.json.

Micro-batches of 4 per rank, 2 at the target (global batch 16); the ramp starts at 8 and adds 8 after 16 samples.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hf_stability import StabilityTrainer
from tests.scripts.ramp_probe import StepRows
from tests.testing_utils import bert_tokenizer, mlm_dataset, rank, tiny_bert, training_args


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    args = training_args(output_dir, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         batch_ramp_start=8, batch_ramp_increment=8, batch_ramp_length=16, ddp_backend="gloo")
    dataset = mlm_dataset(tokenizer, rows=128)
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=dataset)
    probe = StepRows()
    trainer.add_callback(probe)
    trainer.train()
    assert trainer.state.global_step == 6
    # Indices, not token ids: each process trains its own tokenizer, and token ids may differ between processes.
    # Identical rows count as one sample: each row maps to the first index that holds it.
    first: dict[tuple[int, ...], int] = {}
    canonical = [first.setdefault(tuple(ids), i) for i, ids in enumerate(dataset["input_ids"])]
    steps = {step: [first[row] for row in rows] for step, rows in probe.rows.items()}
    (Path(output_dir) / f"rank{rank()}.json").write_text(json.dumps({"steps": steps, "canonical": canonical}))

if __name__ == "__main__":
    main(sys.argv[1])
