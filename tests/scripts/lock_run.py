"""A StabilityTrainer run into OUTPUT_DIR, optionally pausing mid-training while it holds the directory.

``python -m tests.scripts.lock_run OUTPUT_DIR [PAUSE_AT_STEP RELEASE_FILE]``: with a pause, the run prints ``holding``
at the end of that step and waits until RELEASE_FILE exists (or is killed there). Saves a checkpoint every
2 steps; prints the final global step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from hf_stability import StabilityTrainer
from tests.testing_utils import bert_tokenizer, mlm_dataset, tiny_bert, training_args


class PauseAt(TrainerCallback):
    def __init__(self, step: int, release: Path) -> None:
        self.step = step
        self.release = release

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            print("holding", flush=True)
            while not self.release.exists():
                time.sleep(0.1)


def main() -> None:
    output_dir = sys.argv[1]
    callbacks = [PauseAt(int(sys.argv[2]), Path(sys.argv[3]))] if len(sys.argv) > 2 else []
    tokenizer = bert_tokenizer()
    args = training_args(output_dir, max_steps=6, save_strategy="steps", save_steps=2)
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=mlm_dataset(tokenizer, rows=64),
                               callbacks=callbacks)
    trainer.train(resume_from_checkpoint=any(Path(output_dir).glob("checkpoint-*")))
    print("global_step", trainer.state.global_step)


if __name__ == "__main__":
    main()
