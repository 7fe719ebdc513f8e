"""Cost of spike rollback on a small BERT: snapshot bytes, capture/restore time, and training overhead.

Run: ``python benchmarks/rollback.py [--steps 200] [--repeats 2]``. One process, CPU. The model is
`BertForMaskedLM` (hidden 384, 4 layers, vocab 8k: ~10M parameters, sequences of 64) trained with AdamW by the real
`Trainer`; overhead compares steps/s with `SpikeRollbackCallback` (snapshots every 100 steps, checks every
10) against a plain `Trainer`, alternating the two in the same run and keeping each one's best repeat.
Because wall-clock steps/s is noisy on a shared machine, the time spent inside the callback's own hooks is
also measured directly and reported as a share of the training time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from timing import Stopwatch  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_stability import SpikeRollbackCallback  # noqa: E402
from hf_stability.snapshots import SnapshotStore, restore_training_state  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, SEQ, BATCH = 8000, 384, 4, 6, 64, 8
REFERENCE_PARAMETERS = 125e6


def build_model() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=4 * HIDDEN, max_position_embeddings=SEQ)
    return BertForMaskedLM(config)


def build_dataset(rows: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (rows, SEQ), generator=generator)
    labels = torch.where(torch.rand(rows, SEQ, generator=generator) < 0.15, ids, torch.full_like(ids, -100))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def train_seconds(
    steps: int, with_rollback: bool, dataset: Dataset, output_dir: str
) -> tuple[float, float, Trainer]:
    """Training seconds, seconds inside the rollback callback's hooks, and the trainer."""
    args = TrainingArguments(output_dir, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-4,
                             logging_steps=50, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             train_sampling_strategy="sequential", seed=0, log_level="error")
    callbacks = [SpikeRollbackCallback(snapshot_interval=100)] if with_rollback else []
    timer = Stopwatch()
    for callback in callbacks:
        timer.time_events(callback)
    trainer = Trainer(build_model(), args, train_dataset=dataset, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, timer.seconds, trainer


def median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per training run (>100: one snapshot)")
    parser.add_argument("--repeats", type=int, default=2, help="training runs per variant (best one counts)")
    options = parser.parse_args()
    hf_logging.set_verbosity_error()
    dataset = build_dataset(options.steps * BATCH)

    with tempfile.TemporaryDirectory() as workdir:
        best = {False: float("inf"), True: float("inf")}
        hook_share = []
        trainer = None
        for _ in range(options.repeats):
            for with_rollback in (False, True):
                seconds, in_hooks, trainer = train_seconds(options.steps, with_rollback, dataset, workdir)
                best[with_rollback] = min(best[with_rollback], seconds)
                if with_rollback:
                    hook_share.append(in_hooks / seconds)

        # Capture/restore on the trained model, optimizer (with Adam state) and scheduler of the last run.
        model, optimizer, scheduler = trainer.model, trainer.optimizer, trainer.lr_scheduler
        parameters = sum(p.numel() for p in model.parameters())
        rows = []
        for storage in ("cpu", "disk"):
            store = SnapshotStore(keep=1, storage=storage, directory=os.path.join(workdir, "snapshots"))
            capture = median_seconds(
                lambda store=store: store.capture(1, model, optimizer, scheduler, 1.0, trusted=True), 5
            )
            snapshot = store.newest_trusted()
            restore = median_seconds(
                lambda snapshot=snapshot: restore_training_state(snapshot, model, optimizer, scheduler), 5
            )
            rows.append((storage, snapshot.nbytes, capture, restore))
            store.clear()

    plain, rolled = options.steps / best[False], options.steps / best[True]
    print(f"BertForMaskedLM hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}: {parameters / 1e6:.2f}M parameters, "
          f"AdamW, batch {BATCH} x {SEQ} tokens, {options.steps} steps, torch threads {torch.get_num_threads()}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| steps/s, plain Trainer | {plain:.2f} |")
    print(f"| steps/s, with SpikeRollbackCallback (snapshot every 100 steps, check every 10) | {rolled:.2f} |")
    print(f"| overhead from steps/s (noisy) | {100 * (plain / rolled - 1):+.1f} % |")
    print(f"| time inside the callback's hooks (incl. snapshots, checks) | {100 * min(hook_share):.2f} % of training |")
    scale = REFERENCE_PARAMETERS / parameters
    for storage, nbytes, capture, restore in rows:
        print(f"| bytes per snapshot ({storage}) | {nbytes / 2**20:.1f} MiB ({nbytes / (4 * parameters):.2f}x fp32 "
              f"params) |")
        print(f"| capture / restore time ({storage}) | {1e3 * capture:.1f} ms / {1e3 * restore:.1f} ms |")
        print(f"| estimate for 125M params ({storage}, scaled by bytes) | {nbytes * scale / 2**30:.2f} GiB, capture "
              f"{capture * scale:.2f} s, restore {restore * scale:.2f} s |")


if __name__ == "__main__":
    main()
