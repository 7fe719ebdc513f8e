"""A StabilityTrainer run with rollback snapshots on disk, optionally under a file-size limit that fails their writes.

``python -m tests.scripts.snapshot_disk_run OUTPUT_DIR FSIZE_LIMIT_BYTES [RAISE_AT_STEP]``: the limit is set with
`resource.setrlimit(RLIMIT_FSIZE)` (SIGXFSZ ignored, so a write past it fails with EFBIG, as a full disk
fails with ENOSPC); 0 means no limit. With RAISE_AT_STEP, a callback raises at that step. Prints the
final global step.
"""

from __future__ import annotations

import resource
import signal
import sys

from transformers import TrainerCallback  # noqa: E402

from hf_stability import StabilityTrainer  # noqa: E402
from tests.testing_utils import bert_tokenizer, mlm_dataset, tiny_bert, training_args  # noqa: E402


class RaiseAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


def main() -> None:
    output_dir, limit = sys.argv[1], int(sys.argv[2])
    raise_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    tokenizer = bert_tokenizer()
    dataset = mlm_dataset(tokenizer, rows=64)
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    args = training_args(output_dir, max_steps=8, snapshot_storage="disk", snapshot_interval=2, spike_check_interval=2)
    callbacks = [RaiseAt(raise_at)] if raise_at is not None else []
    trainer = StabilityTrainer(tiny_bert(tokenizer), args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    print("global_step", trainer.state.global_step)


if __name__ == "__main__":
    main()
