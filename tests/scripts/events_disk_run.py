"""A StabilityTrainer run with poisoned batches whose events file cannot be written (a real file-size limit).

``python -m tests.scripts.events_disk_run OUTPUT_DIR LIFT_AT_STEP``: `RLIMIT_FSIZE` is set to 1 byte before training
(SIGXFSZ ignored, so a write past it fails with EFBIG, as a full disk fails with ENOSPC), which fails every
write of ``stability_events.jsonl``. Batches 3 and 6 have an Inf gradient. With LIFT_AT_STEP > 0 a callback
raises the limit again at the end of that step. Prints the final global step, the skip counter, the event steps
`read_events` returns in this process and the event steps on disk.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from hf_stability import SkipNonFiniteCallback, StabilityTrainer, read_events
from hf_stability.callbacks.order import find_callback
from hf_stability.events import EVENTS_FILENAME
from tests.testing_utils import PoisonGradient, bert_tokenizer, mlm_dataset, tiny_bert, training_args


class LiftLimitAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def main() -> None:
    output_dir, lift_at = sys.argv[1], int(sys.argv[2])
    tokenizer = bert_tokenizer()
    dataset = mlm_dataset(tokenizer, rows=64)
    callbacks: list[TrainerCallback] = [PoisonGradient([2, 5])]
    if lift_at:
        callbacks.append(LiftLimitAt(lift_at))
    trainer = StabilityTrainer(tiny_bert(tokenizer), training_args(output_dir, max_steps=8), train_dataset=dataset,
                               callbacks=callbacks)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
    trainer.train()
    print("global_step", trainer.state.global_step)
    print("skipped_steps", find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback).skipped_steps)
    print("read_events", json.dumps([(e["event"], e["step"]) for e in read_events(output_dir)]))
    path = Path(output_dir) / EVENTS_FILENAME
    lines = path.read_text().splitlines() if path.exists() else []
    print("on_disk", json.dumps([(json.loads(line)["event"], json.loads(line)["step"]) for line in lines]))


if __name__ == "__main__":
    main()
