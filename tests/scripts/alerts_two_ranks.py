"""Two-rank alerts (torchrun, gloo): rank 1's gradients are non-finite at step 3; every rank registers a hook that
appends each alert it receives to alerts-rank<N>.jsonl. Only the main process may alert."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hf_stability import StabilityTrainer
from hf_stability.alerts import StabilityAlert
from tests.testing_utils import PoisonGradient, bert_tokenizer, mlm_dataset, rank, tiny_bert, training_args


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    args = training_args(output_dir, max_steps=4, ddp_backend="gloo", stability_alerts="skip")
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=mlm_dataset(tokenizer, rows=64),
                               callbacks=[PoisonGradient([2], ranks=[1])])
    path = Path(output_dir) / f"alerts-rank{rank()}.jsonl"

    def record(alert: StabilityAlert) -> None:
        with path.open("a") as handle:
            handle.write(json.dumps({"kind": alert.kind, "step": alert.step, "ranks": alert.event.get("ranks")}) + "\n")

    trainer.on_stability_event(record)
    trainer.train()
    assert trainer.state.global_step == 4


if __name__ == "__main__":
    main(sys.argv[1])
