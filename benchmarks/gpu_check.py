"""GPU validation: one command, one table, for everything CPU runs cannot show.

Run on one CUDA GPU (under 5 minutes): ``python benchmarks/gpu_check.py``. On CPU,
``python benchmarks/gpu_check.py --device cpu --small`` runs the rows that can run there (fp16 through an
emulated CPU GradScaler) with small models and marks the others "needs CUDA"; CI runs that mode.

Rows:
- fp16: a real GradScaler with the default fused AdamW and a poisoned batch (NaN activations): the step is
  skipped bit-exactly (parameters and optimizer state), counted once, and the loss scale halves;
- bf16 autocast: the same poisoned batch is skipped bit-exactly;
- rollback: a snapshot of a ~125M-parameter BART with AdamW state, restored after two updates, is bit-exact,
  and its host buffers are pinned (CUDA);
- snapshot capture/restore time against the device<->host copy floor of the same bytes, measured in the same
  run (target <= 2x);
- Trainer + FSDP2 (world size 1, NCCL) with the stability callbacks skips a poisoned batch bit-exactly, and a
  CPU tensor handed to the callbacks' all-reduce reaches NCCL (which takes CUDA tensors only);
- synchronising CUDA calls per ordinary (non-logging) training step, counted with
  ``torch.cuda.set_sync_debug_mode``, for fp32, bf16 and fp16, Trainer against StabilityTrainer;
- StabilityTrainer against Trainer steps/s on a ~125M BART in bf16 (target <= 1% overhead).

``--json PATH`` also writes the rows as JSON. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.testing_utils

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import BartConfig, BartForConditionalGeneration, Trainer, TrainerCallback  # noqa: E402

from hf_stability import StabilityTrainer  # noqa: E402
from hf_stability.callbacks import SkipNonFiniteCallback  # noqa: E402
from hf_stability.callbacks.signals import reduce_across_ranks  # noqa: E402
from hf_stability.snapshots import SnapshotStore, restore_training_state  # noqa: E402
from tests.testing_utils import (  # noqa: E402
    PoisonActivations,
    bert_tokenizer,
    emulate_fp16_scaler,
    mlm_dataset,
    tiny_bert,
    training_args,
)

NEEDS_CUDA = "needs CUDA"
POISONED_STEP = 3  # global_step before the poisoned step


@dataclass
class Row:
    check: str
    result: str
    target: str
    status: str  # PASS, FAIL, INFO or NEEDS_CUDA


# ---- shared pieces ---------------------------------------------------------------------------------------------


def local_copy(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Clones of this rank's parameters and optimizer state tensors (the local shards of DTensors)."""

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone()

    tensors = [local(p) for p in model.parameters()]
    for state in optimizer.state.values():
        tensors.extend(local(v) for v in state.values() if isinstance(v, torch.Tensor))
    return tensors


def identical(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


class AroundStep(TrainerCallback):
    """Copies model + optimizer state and the loss scale around the step that starts at ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: list[torch.Tensor] | None = None
        self.after: list[torch.Tensor] | None = None
        self.scales: list[float] = []
        self._optimizer = None

    def _scale(self) -> float | None:
        scaler = getattr(self._optimizer, "scaler", None)
        return None if scaler is None else float(scaler.get_scale())

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.step:
            self._optimizer = optimizer
            self.before = local_copy(model, getattr(optimizer, "optimizer", optimizer))
            self.scales.append(self._scale())

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.step + 1:
            self.after = local_copy(model, getattr(optimizer, "optimizer", optimizer))
            self.scales.append(self._scale())


def skip_callback(trainer: Trainer) -> SkipNonFiniteCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, SkipNonFiniteCallback))


def poisoned_run(device: str, regime: str, output_dir: str, **overrides) -> tuple[Trainer, AroundStep]:
    """StabilityTrainer on a small BERT whose step ``POISONED_STEP`` gets NaN activations (a poisoned batch)."""
    tokenizer = bert_tokenizer()
    args = training_args(
        output_dir,
        max_steps=POISONED_STEP + 3,
        use_cpu=device == "cpu",
        bf16=regime == "bf16",
        fp16=regime == "fp16",
        **overrides,
    )
    around = AroundStep(POISONED_STEP)
    trainer = StabilityTrainer(
        tiny_bert(tokenizer, hidden=64, layers=2),
        args,
        train_dataset=mlm_dataset(tokenizer, rows=64),
        callbacks=[PoisonActivations([POISONED_STEP]), around],
    )
    if regime == "fp16" and device == "cpu":
        emulate_fp16_scaler(trainer)
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    return trainer, around


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ---- rows ------------------------------------------------------------------------------------------------------


def check_fp16(device: str) -> Row:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, around = poisoned_run(device, "fp16", output_dir)
    exact = around.before is not None and identical(around.before, around.after)
    skipped = skip_callback(trainer).skipped_steps
    before, after = around.scales
    halved = before is not None and after == before / 2
    scaler = "emulated CPU GradScaler" if device == "cpu" else "GradScaler"
    return Row(
        f"fp16 {scaler} + {getattr(trainer.args.optim, 'value', trainer.args.optim)} + poisoned batch",
        f"bit-exact={exact}, skipped_steps={skipped}, loss scale {before:g} -> {after:g}",
        "bit-exact, 1 skip, scale halved",
        verdict(exact and skipped == 1 and halved),
    )


def check_bf16(device: str) -> Row:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, around = poisoned_run(device, "bf16", output_dir)
    exact = around.before is not None and identical(around.before, around.after)
    skipped = skip_callback(trainer).skipped_steps
    return Row(
        "bf16 autocast + poisoned batch",
        f"bit-exact={exact}, skipped_steps={skipped}",
        "bit-exact, 1 skip",
        verdict(exact and skipped == 1),
    )


def bart(small: bool) -> BartForConditionalGeneration:
    """A BART from scratch: ~140M parameters (bart-base shape), or a tiny one for CPU."""
    torch.manual_seed(0)
    if small:
        config = BartConfig(vocab_size=1000, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                            max_position_embeddings=128)
    else:
        config = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                            encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                            decoder_ffn_dim=3072, max_position_embeddings=1024)
    return BartForConditionalGeneration(config)


class TokenRows(Dataset):
    """Fixed random token rows with labels = inputs (a denoising-shaped batch; the content does not matter)."""

    def __init__(self, vocab: int, length: int, rows: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, vocab, (rows, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, action: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``action`` over ``repeats`` runs, device work included."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        action()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_floor(device: str, nbytes: int) -> tuple[float, float]:
    """Seconds to copy ``nbytes`` device->pinned host and back, as one tensor (the bandwidth floor)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")
    to_host = timed(device, lambda: host.copy_(source, non_blocking=True))
    to_device = timed(device, lambda: source.copy_(host, non_blocking=True))
    return to_host, to_device


def check_snapshots(device: str, small: bool) -> list[Row]:
    model = bart(small).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    batch = TokenRows(model.config.vocab_size, 64, 4)[0]
    batch = {k: v.unsqueeze(0).repeat(4, 1).to(device) for k, v in batch.items()}

    def update() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    update()  # Adam state exists from here on
    store = SnapshotStore(1, "cpu")
    step = iter(range(1, 1000))
    store.capture(next(step), model, optimizer, None, 1.0, trusted=True)  # allocates the host buffers
    capture = timed(device, lambda: store.capture(next(step), model, optimizer, None, 1.0, trusted=True))
    snapshot = store.snapshots[-1]
    saved = local_copy(model, optimizer)
    update()
    update()
    moved = not identical(saved, local_copy(model, optimizer))
    restore = timed(device, lambda: restore_training_state(snapshot, model, optimizer, None))
    exact = moved and identical(saved, local_copy(model, optimizer))
    pinned = all(t.is_pinned() for t in snapshot.tensors.values())
    to_host, to_device = copy_floor(device, snapshot.nbytes)
    parameters = sum(p.numel() for p in model.parameters())
    capture_ratio, restore_ratio = capture / to_host, restore / to_device
    size = f"{parameters / 1e6:.1f}M params + AdamW, {snapshot.nbytes / 2**30:.2f} GiB"
    rows = [
        Row(
            "rollback restore through pinned host buffers",
            f"{size}: bit-exact={exact}, pinned={pinned}",
            "bit-exact, pinned",
            verdict(exact and pinned) if device == "cuda" else verdict(exact) + f" (CPU, no pinning; {NEEDS_CUDA})",
        )
    ]
    timing = (
        f"capture {capture * 1e3:.1f} ms vs D2H {to_host * 1e3:.1f} ms ({capture_ratio:.2f}x); "
        f"restore {restore * 1e3:.1f} ms vs H2D {to_device * 1e3:.1f} ms ({restore_ratio:.2f}x)"
    )
    within = capture_ratio <= 2 and restore_ratio <= 2
    rows.append(Row("snapshot time vs device<->host floor", timing, "<= 2x", verdict(within) if device == "cuda"
                    else f"INFO (host copies; {NEEDS_CUDA})"))
    return rows


class SyncCounter(TrainerCallback):
    """Counts synchronising CUDA calls (``set_sync_debug_mode("warn")`` warnings) in steps ``start`` to ``stop - 1``.

    The window holds ordinary steps only: no logging step, and not the last step (a flush step of the skip
    callback's fp16 queue).
    """

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.steps = 0
        self._recorder: contextlib.ExitStack | None = None
        self.records: list = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            self._recorder = contextlib.ExitStack()
            self.records = self._recorder.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        if self._recorder is None:
            return
        self.steps += 1
        if state.global_step == self.stop:
            torch.cuda.set_sync_debug_mode(0)
            self._recorder.close()
            self._recorder = None

    def per_step(self) -> float:
        syncs = [r for r in self.records if "synchroniz" in str(r.message)]
        return len(syncs) / max(self.steps, 1)


def check_syncs(device: str) -> Row:
    if device != "cuda":
        return Row("synchronising CUDA calls per ordinary step", "-", "fp16: 0 added; fp32/bf16: 1 added", NEEDS_CUDA)
    tokenizer = bert_tokenizer()
    data = mlm_dataset(tokenizer, rows=64)
    figures = {}
    for regime in ("fp32", "bf16", "fp16"):
        for label, trainer_class in (("Trainer", Trainer), ("Stability", StabilityTrainer)):
            with tempfile.TemporaryDirectory() as output_dir:
                args = training_args(output_dir, max_steps=30, use_cpu=False, logging_steps=1000,
                                     bf16=regime == "bf16", fp16=regime == "fp16")
                counter = SyncCounter(start=10, stop=25)
                trainer = trainer_class(tiny_bert(tokenizer, hidden=64, layers=2), args, train_dataset=data,
                                        callbacks=[counter])
                with contextlib.redirect_stdout(sys.stderr):
                    trainer.train()
                figures[regime, label] = counter.per_step()
    added = {regime: figures[regime, "Stability"] - figures[regime, "Trainer"] for regime in ("fp32", "bf16", "fp16")}
    result = ", ".join(
        f"{regime} {figures[regime, 'Trainer']:.1f} -> {figures[regime, 'Stability']:.1f}" for regime in added
    )
    ok = added["fp16"] <= 0 and added["fp32"] <= 1 and added["bf16"] <= 1
    return Row("synchronising CUDA calls per ordinary step (Trainer -> StabilityTrainer)", result,
               "fp16: 0 added; fp32/bf16: 1 added", verdict(ok))


def check_overhead(device: str, small: bool) -> Row:
    steps, warmup = (12, 4) if small else (60, 10)
    length, batch = (64, 4) if small else (512, 8)
    data = TokenRows(1000 if small else 50265, length, steps * batch)
    rates: dict[str, list[float]] = {"Trainer": [], "StabilityTrainer": []}
    parameters = 0
    for _ in range(1 if small else 2):
        for label, trainer_class in (("Trainer", Trainer), ("StabilityTrainer", StabilityTrainer)):
            with tempfile.TemporaryDirectory() as output_dir:
                args = training_args(output_dir, max_steps=steps, use_cpu=device == "cpu", bf16=True,
                                     per_device_train_batch_size=batch, logging_steps=50, learning_rate=1e-4)
                clock = StepClock(warmup)
                trainer = trainer_class(bart(small), args, train_dataset=data, callbacks=[clock])
                with contextlib.redirect_stdout(sys.stderr):
                    trainer.train()
                rates[label].append(clock.rate(steps))
                parameters = sum(p.numel() for p in trainer.model.parameters())
    plain, stable = statistics.median(rates["Trainer"]), statistics.median(rates["StabilityTrainer"])
    overhead = plain / stable - 1
    result = f"{parameters / 1e6:.1f}M BART bf16: {plain:.2f} vs {stable:.2f} steps/s ({overhead * 100:+.1f}%)"
    status = verdict(overhead <= 0.01) if device == "cuda" and not small else f"INFO ({NEEDS_CUDA} for the target)"
    return Row("StabilityTrainer vs Trainer steps/s", result, "<= 1% overhead", status)


class StepClock(TrainerCallback):
    """Wall time from the start of step ``warmup`` to the end of the last step (device work included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            synchronize("cuda" if torch.cuda.is_available() else "cpu")
            self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        synchronize("cuda" if torch.cuda.is_available() else "cpu")
        self.end = time.perf_counter()

    def rate(self, steps: int) -> float:
        return (steps - self.warmup) / (self.end - self.start)


# ---- FSDP2, world size 1, in its own process (it initialises a process group) ----------------------------------


def fsdp2_child(output: str) -> None:
    """Trainer + FSDP2 on one GPU (NCCL) with the stability callbacks; writes its result to ``output``."""
    from hf_stability.callbacks.signals import distributed

    with tempfile.TemporaryDirectory() as output_dir:
        trainer, around = poisoned_run(
            "cuda",
            "bf16",
            output_dir,
            fsdp="full_shard",
            fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]},
        )
    fsdp2 = bool(getattr(trainer, "is_fsdp_enabled", False))
    exact = around.before is not None and identical(around.before, around.after)
    skipped = skip_callback(trainer).skipped_steps
    # The callbacks hand CPU flags to the all-reduce at train end; NCCL takes CUDA tensors only.
    placed = distributed() and reduce_across_ranks(torch.tensor([1.0, 0.0])).tolist() == [1.0, 0.0]
    with open(output, "w") as handle:
        json.dump({"fsdp2": fsdp2, "exact": exact, "skipped": skipped, "placed": bool(placed)}, handle)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_fsdp2(device: str) -> list[Row]:
    names = ("Trainer + FSDP2 (world size 1) + callbacks, poisoned batch", "CPU tensor into the NCCL all-reduce")
    if device != "cuda":
        return [Row(names[0], "-", "bit-exact, 1 skip", NEEDS_CUDA), Row(names[1], "-", "reduced on CUDA", NEEDS_CUDA)]
    with tempfile.TemporaryDirectory() as scratch:
        output = os.path.join(scratch, "fsdp2.json")
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
        child = subprocess.run([sys.executable, __file__, "--fsdp2-child", output], env=env, capture_output=True,
                               text=True, timeout=240)
        if child.returncode != 0 or not os.path.exists(output):
            failure = (child.stderr.strip().splitlines() or ["no output"])[-1][:150]
            return [Row(names[0], failure, "bit-exact, 1 skip", "FAIL"), Row(names[1], "-", "reduced on CUDA", "FAIL")]
        result = json.loads(Path(output).read_text())
    ok = result["fsdp2"] and result["exact"] and result["skipped"] == 1
    return [
        Row(names[0], f"fsdp2={result['fsdp2']}, bit-exact={result['exact']}, skipped_steps={result['skipped']}",
            "bit-exact, 1 skip", verdict(ok)),
        Row(names[1], f"reduced={result['placed']}", "reduced on CUDA", verdict(result["placed"])),
    ]


# ---- main ------------------------------------------------------------------------------------------------------


def run_checks(device: str, small: bool) -> Iterator[Row]:
    yield check_fp16(device)
    yield check_bf16(device)
    yield from check_snapshots(device, small)
    yield from check_fsdp2(device)
    yield check_syncs(device)
    yield check_overhead(device, small)


def print_table(rows: list[Row], device_name: str) -> None:
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"hf-stability GPU check on {device_name} ({versions})")
    header = Row("check", "result", "target", "status")
    widths = [max(len(getattr(r, f)) for r in [header, *rows]) for f in ("check", "result", "target", "status")]
    for row in [header, Row(*("-" * w for w in widths)), *rows]:
        cells = (row.check, row.result, row.target, row.status)
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small models (CPU smoke run); the targets need full size")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--fsdp2-child", help=argparse.SUPPRESS)
    options = parser.parse_args()
    transformers.logging.set_verbosity_error()
    if options.fsdp2_child:
        fsdp2_child(options.fsdp2_child)
        return
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("`--device cuda`: no CUDA device; use --device cpu --small")
    if options.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows = []
    for row in run_checks(options.device, options.small):
        rows.append(row)
        print(f"[gpu_check] {row.status}: {row.check}", file=sys.stderr, flush=True)
    print_table(rows, torch.cuda.get_device_name() if options.device == "cuda" else "CPU")
    if options.json:
        Path(options.json).write_text(json.dumps([asdict(row) for row in rows], indent=1))
    sys.exit(1 if any(row.status.startswith("FAIL") for row in rows) else 0)


if __name__ == "__main__":
    main()
