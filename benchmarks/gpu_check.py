"""GPU validation: one command, one table, for everything CPU runs cannot show.

Run on one CUDA GPU (sized to take well under 8 minutes on an H100/H200; not yet timed on one):
``python benchmarks/gpu_check.py``. On CPU,
``python benchmarks/gpu_check.py --device cpu --small`` runs the rows that can run there (fp16 through an
emulated CPU GradScaler, host reads in place of CUDA syncs) with small models and marks the others "needs
CUDA"; CI runs that mode.

Each check runs isolated: one that raises, or an FSDP2 child that hangs or dies, gives FAIL rows with the
traceback in the JSON (``error``) and the table goes on. The JSON is rewritten after every check.

Rows:
- device: the GPU's name and the versions that ran;
- fp16: a real GradScaler with the default fused AdamW and a poisoned batch (NaN activations) on an ordinary
  (non-logging) step, so the skip is the on-device one: the step is skipped bit-exactly (parameters and
  optimizer state), counted once, and the loss scale halves;
- bf16 autocast: the same poisoned batch is skipped bit-exactly, on device;
- rollback: a snapshot of a ~125M-parameter BART with AdamW state, restored after two updates, is bit-exact,
  and its host buffers are pinned (CUDA);
- snapshot capture/restore time against the device<->host copy floor of the same bytes, measured in the same
  run (target <= 2x);
- Trainer + FSDP2 (world size 1, NCCL) with the stability callbacks skips a poisoned batch bit-exactly, and a
  CPU tensor handed to the callbacks' all-reduce reaches NCCL (which takes CUDA tensors only);
- synchronising CUDA calls per ordinary training step (no logging, save, evaluation, epoch end, skip-queue
  flush, spike check or snapshot), counted step by step with ``torch.cuda.set_sync_debug_mode``, for fp32,
  bf16 and fp16, Trainer against StabilityTrainer: 0 added in every precision;
- StabilityTrainer against Trainer steps/s on a ~125M BART in bf16 (target <= 1% overhead);
- Trainer + DeepSpeed ZeRO-2 (world size 1, bf16, in a child process: it initialises DeepSpeed and a process
  group) with StabilityTrainer's defaults: a poisoned batch on an ordinary step is skipped by DeepSpeed bit-exactly
  and reported, and a loss spike is rolled back to the snapshot bit-exactly (fp32 masters, Adam state, engine
  counters); then, Trainer against StabilityTrainer, synchronising calls per ordinary step (0 added) and time
  per step. It runs on CPU too (DeepSpeed's CPU accelerator), host reads in place of syncs.

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
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.testing_utils

import accelerate  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import BartConfig, BartForConditionalGeneration, Trainer, TrainerCallback  # noqa: E402

from benchmarks.host_reads import counting_host_reads  # noqa: E402
from hf_stability import StabilityTrainer  # noqa: E402
from hf_stability.callbacks import SkipNonFiniteCallback  # noqa: E402
from hf_stability.snapshots import SnapshotStore, restore_training_state  # noqa: E402
from hf_stability.step.channel import reduce_across_ranks  # noqa: E402
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
RARELY = 1000  # a logging interval no run here reaches: the poisoned and counted steps are ordinary ones
FSDP2_TIMEOUT_S = 180.0  # the FSDP2 child takes well under a minute; a hung NCCL init must not eat the session
DEEPSPEED_TIMEOUT_S = 420.0  # three DeepSpeed engines; the first run on a machine JIT-builds an op (minutes on CPU)


@dataclass
class Row:
    check: str
    result: str
    target: str
    status: str  # PASS, FAIL, INFO or NEEDS_CUDA
    error: str = ""  # the traceback of a check that raised (or of the FSDP2 child)
    data: dict[str, Any] = field(default_factory=dict)  # figures behind the result, for the JSON


@dataclass(frozen=True)
class Spec:
    """One row's name and target: what a failed check still reports."""

    check: str
    target: str

    def row(self, result: str, status: str, **extra: Any) -> Row:
        return Row(self.check, result, self.target, status, **extra)


@dataclass(frozen=True)
class Check:
    """A check and the rows it gives, in order."""

    specs: tuple[Spec, ...]
    run: Callable[[], list[Row]]


DEVICE = Spec("device", "-")
FP16 = Spec("fp16 GradScaler + default fused AdamW + poisoned batch on an ordinary step",
            "bit-exact, 1 skip, scale halved")
BF16 = Spec("bf16 autocast + poisoned batch on an ordinary step", "bit-exact, 1 skip")
RESTORE = Spec("rollback restore through pinned host buffers", "bit-exact, pinned")
SNAPSHOT_TIME = Spec("snapshot time vs device<->host floor", "<= 2x")
FSDP2 = Spec("Trainer + FSDP2 (world size 1) + callbacks, poisoned batch", "fsdp2, bit-exact, 1 skip")
NCCL = Spec("CPU tensor into the NCCL all-reduce", "reduced on CUDA")
SYNCS = Spec("synchronising CUDA calls per ordinary step (Trainer -> StabilityTrainer)",
             "0 added (fp32, bf16, fp16)")
OVERHEAD = Spec("StabilityTrainer vs Trainer steps/s", "<= 1% overhead")
DEEPSPEED = Spec("Trainer + DeepSpeed ZeRO-2 bf16 (world size 1) + StabilityTrainer: poisoned batch, loss spike",
                 "DeepSpeed skip bit-exact, reported; 1 rollback bit-exact")
DEEPSPEED_COST = Spec("DeepSpeed ZeRO-2: synchronising calls and time per ordinary step (Trainer -> StabilityTrainer)",
                      "0 added")


def failed(specs: tuple[Spec, ...], trace: str) -> list[Row]:
    """One FAIL row per spec, its result the last line of ``trace`` and the whole of it in ``error``."""
    summary = next((line for line in reversed(trace.strip().splitlines()) if line.strip()), "no output")
    return [spec.row(summary.strip()[:200], "FAIL", error=trace) for spec in specs]


def run_isolated(check: Check) -> list[Row]:
    """The check's rows; FAIL rows with the traceback if it raises, so one check never costs the table."""
    try:
        return check.run()
    except Exception:
        return failed(check.specs, traceback.format_exc())


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
        self.scales: list[float | None] = []
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

    def exact(self) -> bool:
        """Whether the poisoned step left parameters and optimizer state bit-identical."""
        return self.before is not None and self.after is not None and identical(self.before, self.after)


def skip_callback(trainer: Trainer) -> SkipNonFiniteCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, SkipNonFiniteCallback))


def poisoned_run(device: str, regime: str, output_dir: str, **overrides) -> tuple[Trainer, AroundStep]:
    """StabilityTrainer on a small BERT whose step ``POISONED_STEP + 1`` gets NaN activations (a poisoned batch).

    No step before the last one logs, so the poisoned step takes the on-device skip of ordinary steps (a logging
    step reads the flags on the host); the last step's flush counts it.
    """
    tokenizer = bert_tokenizer()
    args = training_args(
        output_dir,
        max_steps=POISONED_STEP + 3,
        use_cpu=device == "cpu",
        bf16=regime == "bf16",
        fp16=regime == "fp16",
        logging_steps=RARELY,
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


def device_row(device: str) -> Row:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    cuda = f", CUDA {torch.version.cuda}" if device == "cuda" else ""
    versions = (
        f"torch {torch.__version__}{cuda}, transformers {transformers.__version__}, accelerate {accelerate.__version__}"
    )
    return DEVICE.row(f"{name} ({versions})", "INFO", data={"name": name})


def check_fp16(device: str) -> Row:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, around = poisoned_run(device, "fp16", output_dir)
    exact = around.exact()
    skipped = skip_callback(trainer).skipped_steps
    before, after = around.scales
    halved = before is not None and after == before / 2
    scaler = "emulated CPU GradScaler" if device == "cpu" else "GradScaler"
    optim = getattr(trainer.args.optim, "value", trainer.args.optim)
    return FP16.row(
        f"{scaler}, {optim}: bit-exact={exact}, skipped_steps={skipped}, loss scale {before} -> {after}",
        verdict(exact and skipped == 1 and halved),
    )


def check_bf16(device: str) -> Row:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, around = poisoned_run(device, "bf16", output_dir)
    exact = around.exact()
    skipped = skip_callback(trainer).skipped_steps
    return BF16.row(f"bit-exact={exact}, skipped_steps={skipped}", verdict(exact and skipped == 1))


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
    timing = (
        f"capture {capture * 1e3:.1f} ms vs D2H {to_host * 1e3:.1f} ms ({capture_ratio:.2f}x); "
        f"restore {restore * 1e3:.1f} ms vs H2D {to_device * 1e3:.1f} ms ({restore_ratio:.2f}x)"
    )
    within = capture_ratio <= 2 and restore_ratio <= 2
    if device != "cuda":
        timing_status = f"INFO (host copies; {NEEDS_CUDA})"
    elif small:  # fixed per-tensor costs dominate a tiny model: the target is for the full-size snapshot
        timing_status = "INFO (tiny model; the target needs the full-size run)"
    else:
        timing_status = verdict(within)
    pinning = verdict(exact and pinned) if device == "cuda" else f"{verdict(exact)} (CPU, no pinning; {NEEDS_CUDA})"
    return [
        RESTORE.row(f"{size}: bit-exact={exact}, pinned={pinned}", pinning),
        SNAPSHOT_TIME.row(timing, timing_status),
    ]


# ---- host syncs per ordinary step ------------------------------------------------------------------------------

SYNC_ROWS, SYNC_STEPS, SYNC_WARMUP = 256, 30, 10  # 32 steps per epoch at batch 8: no epoch ends inside the run


@contextlib.contextmanager
def cuda_syncs() -> Iterator[Callable[[], int]]:
    """Synchronising CUDA calls so far (``set_sync_debug_mode("warn")`` warnings); the mode is reset on any exit."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield lambda: sum("synchroniz" in str(record.message) for record in records)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@contextlib.contextmanager
def host_reads() -> Iterator[Callable[[], int]]:
    """Device-to-host reads so far (the tests' instrument): CPU's stand-in for CUDA syncs."""
    with counting_host_reads() as counts:
        yield lambda: sum(counts.values())


class PerStep(TrainerCallback):
    """What ``count`` counts from the start of each optimizer step to the start of the next (its logging,
    saving and callbacks included)."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count
        self.marks: dict[int, int] = {}  # step -> count when it began

    def on_step_begin(self, args, state, control, **kwargs):
        self.marks[state.global_step + 1] = self.count()

    def on_train_end(self, args, state, control, **kwargs):
        self.marks[state.global_step + 1] = self.count()

    def per_step(self) -> dict[int, int]:
        return {step: self.marks[step + 1] - mark for step, mark in self.marks.items() if step + 1 in self.marks}


def ordinary_steps(args: Any, steps_per_epoch: int, warmup: int) -> list[int]:
    """Steps after ``warmup`` and before the last on which neither Trainer nor the callbacks do periodic work.

    Excluded: logging, save and evaluation steps, epoch ends, the skip queue's flush (every
    ``max_consecutive_skips`` steps when nothing else flushes), spike checks and snapshots.
    """
    periods = [steps_per_epoch, args.logging_steps, args.max_consecutive_skips, args.spike_check_interval,
               args.snapshot_interval]
    periods += [args.save_steps] if args.save_strategy == "steps" else []
    periods += [args.eval_steps or args.logging_steps] if args.eval_strategy == "steps" else []
    return [step for step in range(warmup + 1, args.max_steps) if all(step % int(period) for period in periods)]


def span(steps: list[int]) -> str:
    """``11-29 but 20`` for 11..29 without 20."""
    if not steps:
        return "none"
    missing = sorted(set(range(steps[0], steps[-1] + 1)) - set(steps))
    return f"{steps[0]}-{steps[-1]}" + (f" but {', '.join(map(str, missing))}" if missing else "")


def check_syncs(device: str) -> Row:
    """Trainer and StabilityTrainer, step by step, in each precision; StabilityTrainer may add none."""
    tokenizer = bert_tokenizer()
    data = mlm_dataset(tokenizer, rows=SYNC_ROWS)
    regimes = ("fp32", "bf16", "fp16")
    counts: dict[str, dict[int, int]] = {}
    for regime in regimes:
        for trainer_class in (Trainer, StabilityTrainer):
            with tempfile.TemporaryDirectory() as output_dir:
                args = training_args(output_dir, max_steps=SYNC_STEPS, use_cpu=device == "cpu", logging_steps=RARELY,
                                     bf16=regime == "bf16", fp16=regime == "fp16")
                trainer = trainer_class(tiny_bert(tokenizer, hidden=64, layers=2), args, train_dataset=data)
                if regime == "fp16" and device == "cpu":
                    emulate_fp16_scaler(trainer)
                with cuda_syncs() if device == "cuda" else host_reads() as count:
                    counter = PerStep(count)
                    trainer.add_callback(counter)
                    with contextlib.redirect_stdout(sys.stderr):
                        trainer.train()
            counts[f"{regime} {trainer_class.__name__}"] = counter.per_step()
    ordinary = ordinary_steps(args, -(-len(data) // args.train_batch_size), SYNC_WARMUP)
    if not ordinary:
        raise RuntimeError("no ordinary step in the counted run: the window is empty")

    def mean(regime: str, label: str) -> float:
        return statistics.fmean(counts[f"{regime} {label}"][step] for step in ordinary)

    added = {
        regime: max(counts[f"{regime} StabilityTrainer"][s] - counts[f"{regime} Trainer"][s] for s in ordinary)
        for regime in regimes
    }
    what = "syncs" if device == "cuda" else "host reads"
    result = ", ".join(f"{r} {mean(r, 'Trainer'):.1f} -> {mean(r, 'StabilityTrainer'):.1f}" for r in regimes)
    result = f"{what}/step: {result} (most added on one step: {max(added.values())}; steps {span(ordinary)})"
    status = verdict(all(extra <= 0 for extra in added.values()))
    if device != "cuda":
        status += f" (CPU host reads; {NEEDS_CUDA} for syncs)"
    data_out = {"ordinary_steps": ordinary, "per_step": {k: [v[s] for s in sorted(v)] for k, v in counts.items()}}
    return SYNCS.row(result, status, data=data_out)


# ---- steps/s ---------------------------------------------------------------------------------------------------


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
    return OVERHEAD.row(result, status)


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


def fsdp2_result() -> dict[str, Any]:
    """Trainer + FSDP2 on one GPU (NCCL) with the stability callbacks and a poisoned batch."""
    from hf_stability.step.channel import distributed

    with tempfile.TemporaryDirectory() as output_dir:
        trainer, around = poisoned_run(
            "cuda",
            "bf16",
            output_dir,
            fsdp="full_shard",
            fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]},
        )
    # The callbacks hand CPU flags to the all-reduce at train end; NCCL takes CUDA tensors only.
    placed = distributed() and reduce_across_ranks(torch.tensor([1.0, 0.0])).tolist() == [1.0, 0.0]
    return {"fsdp2": bool(trainer.accelerator.is_fsdp2), "exact": around.exact(),
            "skipped": skip_callback(trainer).skipped_steps, "placed": bool(placed)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def text_tail(output: str | bytes | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a child's output (``TimeoutExpired`` may hold bytes even with ``text=True``)."""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output or ""
    return "\n".join(text.strip().splitlines()[-lines:])


def run_child(option: str, label: str, specs: tuple[Spec, ...], timeout_s: float,
              *arguments: str) -> dict[str, Any] | list[Row]:
    """This script with ``option OUT`` in a child process (world size 1, a free port), killed after ``timeout_s``:
    the JSON it wrote, or FAIL rows for ``specs`` holding its traceback (or the tail of its output)."""
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "child.json"
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
        try:
            child = subprocess.run([sys.executable, __file__, *arguments, option, str(output)], env=env,
                                   capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as expired:
            trace = f"{text_tail(expired.stderr)}\nthe {label} child timed out after {timeout_s:g} s and was killed"
            return failed(specs, trace)
        result = json.loads(output.read_text()) if output.exists() else {}
    if child.returncode != 0 or "error" in result or not result:
        trace = result.get("error") or f"{text_tail(child.stderr)}\nthe {label} child exited with {child.returncode}"
        return failed(specs, trace)
    return result


def child_main(output: str, result: Callable[[], dict[str, Any]]) -> int:
    """Writes ``result()``, or the traceback that stopped it, to ``output``; the exit status."""
    try:
        written, status = result(), 0
    except Exception:
        written, status = {"error": traceback.format_exc()}, 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    Path(output).write_text(json.dumps(written))
    return status


def check_fsdp2(device: str, timeout_s: float = FSDP2_TIMEOUT_S) -> list[Row]:
    """The FSDP2 rows, from a child process that is killed after ``timeout_s`` (a hung NCCL init)."""
    if device != "cuda":
        return [FSDP2.row("-", NEEDS_CUDA), NCCL.row("-", NEEDS_CUDA)]
    result = run_child("--fsdp2-child", "FSDP2", (FSDP2, NCCL), timeout_s)
    if isinstance(result, list):
        return result
    ok = result["fsdp2"] and result["exact"] and result["skipped"] == 1
    return [
        FSDP2.row(f"fsdp2={result['fsdp2']}, bit-exact={result['exact']}, skipped_steps={result['skipped']}",
                  verdict(ok)),
        NCCL.row(f"reduced={result['placed']}", verdict(result["placed"])),
    ]


# ---- DeepSpeed ZeRO-2, world size 1, in its own process --------------------------------------------------------

DEEPSPEED_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                    "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
SPIKE_STEP = POISONED_STEP + 3  # two steps after the poisoned one (POISONED_STEP + 1, an even, snapshot step)


def deepspeed_result(device: str) -> dict[str, Any]:
    """StabilityTrainer under DeepSpeed ZeRO-2: skip and rollback, then the per-step cost against Trainer."""
    from hf_stability.callbacks.deepspeed_telemetry import DeepSpeedSkipTelemetryCallback
    from hf_stability.callbacks.order import find_callback
    from hf_stability.callbacks.rollback import SpikeRollbackCallback
    from tests.scripts.deepspeed_rollback_two_ranks import EngineRecord, SpikeLoss, same

    tokenizer = bert_tokenizer()
    data = mlm_dataset(tokenizer, rows=SYNC_ROWS)
    poisoned = POISONED_STEP + 1
    recorder = EngineRecord({POISONED_STEP, poisoned, SPIKE_STEP})
    with tempfile.TemporaryDirectory() as output_dir:
        args = training_args(output_dir, max_steps=SPIKE_STEP + 3, use_cpu=device == "cpu", bf16=True,
                             logging_steps=RARELY, deepspeed=DEEPSPEED_CONFIG, spike_window=8, spike_warmup=3,
                             spike_check_interval=1, snapshot_interval=2, rollback_lr_factor=0.5)
        trainer = StabilityTrainer(tiny_bert(tokenizer, hidden=64, layers=2), args, train_dataset=data,
                                   callbacks=[PoisonActivations([POISONED_STEP]), SpikeLoss(SPIKE_STEP, [0]), recorder])
        recorder.trainer = trainer
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
    records = recorder.records
    untouched = ("parameters", "fp32_masters", "optimizer_state", "lr", "scheduler")
    skip_exact = all(same({k: records[POISONED_STEP][k] for k in untouched},
                          {k: records[poisoned][k] for k in untouched}).values())
    # Snapshots every 2 steps, trusted after one healthy checked step: at the spike the newest trusted one is that
    # of the poisoned (skipped) step, SPIKE_STEP - 2.
    outcome = recorder.rollback_outcome(poisoned, SPIKE_STEP, 0.5)
    rollback = find_callback(trainer.callback_handler.callbacks, SpikeRollbackCallback)
    telemetry = find_callback(trainer.callback_handler.callbacks, DeepSpeedSkipTelemetryCallback)
    result: dict[str, Any] = {
        "skip_exact": skip_exact, "engine_skipped": trainer.model_wrapped.skipped_steps,
        "reported_skipped": telemetry.skipped_steps, "rollbacks": rollback.rollbacks,
        "rollback_exact": all(outcome["restored"].values()) and outcome["visible"], "lr_cut": outcome["lr_cut"],
    }
    counts: dict[str, dict[int, int]] = {}
    times: dict[str, float] = {}
    for trainer_class in (Trainer, StabilityTrainer):
        with tempfile.TemporaryDirectory() as output_dir:
            args = training_args(output_dir, max_steps=SYNC_STEPS, use_cpu=device == "cpu", bf16=True,
                                 logging_steps=RARELY, deepspeed=DEEPSPEED_CONFIG)
            clock = StepClock(SYNC_WARMUP)
            trainer = trainer_class(tiny_bert(tokenizer, hidden=64, layers=2), args, train_dataset=data,
                                    callbacks=[clock])
            with cuda_syncs() if device == "cuda" else host_reads() as count:
                counter = PerStep(count)
                trainer.add_callback(counter)
                with contextlib.redirect_stdout(sys.stderr):
                    trainer.train()
        counts[trainer_class.__name__] = counter.per_step()
        times[trainer_class.__name__] = 1 / clock.rate(SYNC_STEPS)
    ordinary = ordinary_steps(args, -(-len(data) // args.train_batch_size), SYNC_WARMUP)
    result.update(ordinary_steps=ordinary, per_step={k: [v[s] for s in sorted(v)] for k, v in counts.items()},
                  seconds_per_step=times)
    return result


def check_deepspeed(device: str, timeout_s: float = DEEPSPEED_TIMEOUT_S) -> list[Row]:
    """The DeepSpeed rows, from a child process killed after ``timeout_s``."""
    result = run_child("--deepspeed-child", "DeepSpeed", (DEEPSPEED, DEEPSPEED_COST), timeout_s, "--device", device)
    if isinstance(result, list):
        return result
    skip_ok = result["skip_exact"] and result["engine_skipped"] == 1 and result["reported_skipped"] == 1
    rollback_ok = result["rollbacks"] == 1 and result["rollback_exact"] and result["lr_cut"]
    protection = DEEPSPEED.row(
        f"skip bit-exact={result['skip_exact']}, skipped_steps engine/reported={result['engine_skipped']}/"
        f"{result['reported_skipped']}; rollbacks={result['rollbacks']}, bit-exact={result['rollback_exact']}, "
        f"LR cut={result['lr_cut']}",
        verdict(skip_ok and rollback_ok),
    )
    ordinary = result["ordinary_steps"]
    if not ordinary:
        raise RuntimeError("no ordinary step in the counted DeepSpeed run: the window is empty")
    plain, stable = (result["per_step"][name] for name in ("Trainer", "StabilityTrainer"))
    added = max(stable[step - 1] - plain[step - 1] for step in ordinary)
    what = "syncs" if device == "cuda" else "host reads"
    before, after = (result["seconds_per_step"][name] * 1e3 for name in ("Trainer", "StabilityTrainer"))
    cost = DEEPSPEED_COST.row(
        f"{what}/step {statistics.fmean(plain[s - 1] for s in ordinary):.1f} -> "
        f"{statistics.fmean(stable[s - 1] for s in ordinary):.1f} (most added on one step: {added}; steps "
        f"{span(ordinary)}); time/step {before:.1f} -> {after:.1f} ms ({(after / before - 1) * 100:+.1f}%)",
        verdict(added <= 0) + ("" if device == "cuda" else f" (CPU host reads; {NEEDS_CUDA} for syncs)"),
        data={k: result[k] for k in ("ordinary_steps", "per_step", "seconds_per_step")},
    )
    return [protection, cost]


# ---- main ------------------------------------------------------------------------------------------------------


def plan(device: str, small: bool) -> list[Check]:
    """The checks in table order."""
    return [
        Check((DEVICE,), lambda: [device_row(device)]),
        Check((FP16,), lambda: [check_fp16(device)]),
        Check((BF16,), lambda: [check_bf16(device)]),
        Check((RESTORE, SNAPSHOT_TIME), lambda: check_snapshots(device, small)),
        Check((FSDP2, NCCL), lambda: check_fsdp2(device)),
        Check((SYNCS,), lambda: [check_syncs(device)]),
        Check((OVERHEAD,), lambda: [check_overhead(device, small)]),
        Check((DEEPSPEED, DEEPSPEED_COST), lambda: check_deepspeed(device)),
    ]


def collect(checks: list[Check], json_path: str | None = None) -> list[Row]:
    """Runs each check isolated, in order; the JSON (if asked) is rewritten after each, so a crash keeps the rows."""
    rows: list[Row] = []
    for check in checks:
        start = time.perf_counter()
        rows.extend(run_isolated(check))
        for row in rows[-len(check.specs):]:
            print(f"[gpu_check] {row.status}: {row.check} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps([asdict(row) for row in rows], indent=1))
    return rows


def print_table(rows: list[Row]) -> None:
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    name = next((row.data.get("name") for row in rows if row.check == DEVICE.check), None) or "?"
    print(f"hf-stability GPU check on {name} ({versions})")
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
    parser.add_argument("--deepspeed-child", help=argparse.SUPPRESS)
    options = parser.parse_args()
    transformers.logging.set_verbosity_error()
    if options.fsdp2_child:
        sys.exit(child_main(options.fsdp2_child, fsdp2_result))
    if options.deepspeed_child:
        sys.exit(child_main(options.deepspeed_child, lambda: deepspeed_result(options.device)))
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("`--device cuda`: no CUDA device; use --device cpu --small")
    if options.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows = collect(plan(options.device, options.small), options.json)
    print_table(rows)
    sys.exit(1 if any(row.status.startswith("FAIL") for row in rows) else 0)


if __name__ == "__main__":
    main()
