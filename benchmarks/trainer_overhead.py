"""Steps/s and device-to-host reads per step: `StabilityTrainer` against a plain `Trainer`, same run.

Both train the same tiny BERT MLM (tests/testing_utils.py) on the same real rows for ``--steps`` steps per
run; runs alternate between the trainers ``--repeats`` times per precision regime and the median
steps/s (first 20 steps excluded) is reported, so drift in machine load hits both alike. A second,
untimed run per trainer counts the Python-level device-to-host reads (``Tensor.item``, ``tolist``,
``numpy``, ``cpu``, ``bool``, ``float``, ``int``) made while training, divided by the number of steps.
One process, one torch thread. Wall-clock rates on a shared machine drift by more than the overhead
being measured, so the same runs also time every call into hf-stability code (callback hooks, the
loss tap, the metrics merged in ``log()``) with ``perf_counter``: its share of the training time is
the overhead, measured directly and unaffected by load on the machine. The sample recording behind the
events' dataset indices (tagging items, moving the tags through the collator, recording them per micro-batch:
`hf_stability.samples`) is timed on its own too and printed in microseconds per step.

Run: ``python benchmarks/trainer_overhead.py [--steps 300 --repeats 3 --logging-steps 50]``.

``--model bart-layout`` measures instead the host cost per ordinary step on a model with BART-base's layout
(259 parameter tensors, tiny widths, so that what is measured is Python and op dispatch, the host time that
adds to a GPU step): plain `Trainer` against `StabilityTrainer` with its defaults, fused AdamW, the two trained
in one process by two threads that take turns step by step (`Lockstep`), so that both see the same machine;
the wall time of the ordinary steps (no logging, save, check, flush or last step: ``step % 10 != 0``; the run
is one epoch) from ``on_step_begin`` to ``on_step_end``, the added time as the median difference between the
two trainers' same steps, over all repeats; and the part of the added time that is torch's fused AdamW handling
the ``found_inf`` flag on CPU. Run:
``python benchmarks/trainer_overhead.py --model bart-layout [--steps 200 --repeats 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.testing_utils

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from benchmarks.host_reads import counting_host_reads  # noqa: E402
from benchmarks.timing import Stopwatch  # noqa: E402
from hf_stability import StabilityTrainer, samples  # noqa: E402
from hf_stability import trainer as stability_trainer  # noqa: E402
from hf_stability._compat import clear_found_inf, set_found_inf  # noqa: E402
from hf_stability.step.channel import StepSignals  # noqa: E402
from hf_stability.step.guard import StepGuard  # noqa: E402
from tests.testing_utils import (  # noqa: E402
    BART_BASE_TENSORS,
    bart_layout_model,
    bert_tokenizer,
    emulate_fp16_scaler,
    mlm_dataset,
    seq2seq_dataset,
    tiny_bert,
    training_args,
)

WARMUP_STEPS = 20
REGIMES = ("fp32", "bf16", "fp16")


class StepClock(TrainerCallback):
    """Wall time from the beginning of step ``WARMUP_STEPS`` to the end of the last step."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == WARMUP_STEPS:
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()


# (label, trainer class, StabilityConfig overrides): skip + telemetry alone, then the defaults (with spike rollback).
CONFIGS = (
    ("Trainer", Trainer, {}),
    ("StabilityTrainer, skip+telemetry", StabilityTrainer, {"spike_rollback": False}),
    ("StabilityTrainer, defaults", StabilityTrainer, {}),
)


class StabilityClock(Stopwatch):
    """Accumulates the wall time spent inside hf-stability's callbacks, loss tap and log merge."""

    @contextlib.contextmanager
    def watching(self, trainer: Trainer) -> Iterator[StabilityClock]:
        patched = [
            (StepSignals, "add_loss"),
            (StepSignals, "record_grad_norm"),
            (StepGuard, "metrics"),
        ]
        originals = [getattr(owner, name) for owner, name in patched]
        for owner, name in patched:
            setattr(owner, name, self.timed(getattr(owner, name)))
        for callback in trainer.callback_handler.callbacks:
            if type(callback).__module__.startswith("hf_stability."):
                self.time_events(callback)
        try:
            yield self
        finally:
            for (owner, name), original in zip(patched, originals, strict=True):
                setattr(owner, name, original)


class RecordingClock(Stopwatch):
    """Accumulates the wall time of the sample recording (`hf_stability.samples`): tagging each item, moving the
    tags into the batch, taking them out before the model and adding them to the record."""

    @contextlib.contextmanager
    def watching(self) -> Iterator[RecordingClock]:
        patched = [(samples, "_tag"), (samples, "take_tags"), (samples, "put_tags"),
                   (stability_trainer, "pop_sample_indices"), (samples.SampleRecord, "add")]
        originals = [getattr(owner, name) for owner, name in patched]
        for owner, name in patched:
            setattr(owner, name, self.timed(getattr(owner, name)))
        try:
            yield self
        finally:
            for (owner, name), original in zip(patched, originals, strict=True):
                setattr(owner, name, original)


def build(config, regime: str, steps: int, logging_steps: int, tokenizer, dataset, output_dir):
    _, trainer_class, overrides = config
    args = training_args(
        output_dir,
        max_steps=steps,
        per_device_train_batch_size=16,
        logging_steps=logging_steps,
        bf16=regime == "bf16",
        fp16=regime == "fp16",
        disable_tqdm=False,  # progress bars go to stderr
        **overrides,
    )
    trainer = trainer_class(tiny_bert(tokenizer, hidden=64, layers=2), args, train_dataset=dataset)
    if regime == "fp16":
        emulate_fp16_scaler(trainer, init_scale=2.0**8)
    return trainer


def timed_run(config, regime, steps, logging_steps, tokenizer, dataset) -> tuple[float, float, float]:
    """(steps/s after warm-up, share of the whole training time spent in hf-stability code, microseconds per step
    spent recording the samples)."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build(config, regime, steps, logging_steps, tokenizer, dataset, output_dir)
        clock = StepClock()
        trainer.add_callback(clock)
        started = time.perf_counter()
        with StabilityClock().watching(trainer) as stability, RecordingClock().watching() as recording, \
                contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        total = time.perf_counter() - started
    inside = stability.seconds + recording.seconds
    return ((steps - WARMUP_STEPS) / (clock.end - clock.start), inside / (total - inside),
            recording.seconds / steps * 1e6)


def host_reads_per_step(config, regime, steps, logging_steps, tokenizer, dataset) -> float:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build(config, regime, steps, logging_steps, tokenizer, dataset, output_dir)
        with counting_host_reads() as counts, contextlib.redirect_stdout(sys.stderr):
            trainer.train()
    return sum(counts.values()) / steps


class Lockstep:
    """Two training threads that take turns, one optimizer step each, so that both trainers' steps interleave.

    Alternated runs leave the two trainers minutes apart, and this shared machine's speed drifts between runs by
    more than the overhead measured; steps taken in turn see the same machine. A thread hands the turn over when it
    reaches its next step (its logging, saving and data loading done), so no two steps ever overlap.
    """

    def __init__(self, first: int = 0) -> None:
        self._turn = first  # the party whose step comes first
        self._finished: set[int] = set()
        self._condition = threading.Condition()

    def take_turn(self, party: int) -> None:
        with self._condition:
            if not self._condition.wait_for(lambda: self._turn == party or 1 - party in self._finished, timeout=600):
                raise TimeoutError("the other training thread stopped taking turns")

    def pass_turn(self, party: int) -> None:
        with self._condition:
            self._turn = 1 - party
            self._condition.notify_all()

    def finish(self, party: int) -> None:
        with self._condition:
            self._finished.add(party)
            self._turn = 1 - party
            self._condition.notify_all()


class OrdinaryStepClock(TrainerCallback):
    """Wall time of each ordinary step (``step % 10 != 0``, not the last), ``on_step_begin`` to ``on_step_end``,
    and the part of it spent inside hf-stability code (``inside``: callback hooks, the trainer's taps and the sample
    recording). With a `Lockstep`, each step waits for its turn before it is timed.

    Steps that log, save, judge buffered spike values or flush the skip queue are multiples of 10 here.
    """

    def __init__(self, *inside: Stopwatch, lockstep: Lockstep | None = None, party: int = 0) -> None:
        self.inside = inside
        self.lockstep, self.party = lockstep, party
        self.milliseconds: list[float] = []
        self.inside_milliseconds: list[float] = []
        self._start = self._inside_start = 0.0
        self._stepped = False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.lockstep is not None:
            if self._stepped:
                self.lockstep.pass_turn(self.party)
            self.lockstep.take_turn(self.party)
            self._stepped = True
        self._start, self._inside_start = time.perf_counter(), self._inside_seconds()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step > WARMUP_STEPS // 2 and step % 10 and step < state.max_steps:
            self.milliseconds.append((time.perf_counter() - self._start) * 1000)
            self.inside_milliseconds.append((self._inside_seconds() - self._inside_start) * 1000)

    def _inside_seconds(self) -> float:
        return sum(stopwatch.seconds for stopwatch in self.inside)


BART_CONFIGS = (("Trainer", Trainer), ("StabilityTrainer, defaults", StabilityTrainer))
BART_LAYOUT_BATCH = 2


def bart_layout_trainer(trainer_class: type[Trainer], regime: str, steps: int, dataset, output_dir: str) -> Trainer:
    args = training_args(
        output_dir,
        max_steps=steps,
        per_device_train_batch_size=BART_LAYOUT_BATCH,
        logging_steps=50,
        optim="adamw_torch_fused",
        bf16=regime == "bf16",
        fp16=regime == "fp16",
    )
    trainer = trainer_class(bart_layout_model(), args, train_dataset=dataset)
    if regime == "fp16":
        emulate_fp16_scaler(trainer, init_scale=2.0**8)
    return trainer


def bart_layout_lockstep(regime: str, steps: int, dataset, first: int) -> list[OrdinaryStepClock]:
    """One run of each trainer (`BART_CONFIGS`), in two threads taking turns step by step; ``first`` starts."""
    lockstep = Lockstep(first)
    stability, recording = StabilityClock(), RecordingClock()
    clocks, errors = [], []
    with tempfile.TemporaryDirectory() as output_dir, contextlib.ExitStack() as stack:
        trainers = [
            bart_layout_trainer(trainer_class, regime, steps, dataset, f"{output_dir}/{party}")
            for party, (_, trainer_class) in enumerate(BART_CONFIGS)
        ]
        for party, trainer in enumerate(trainers):
            clocks.append(OrdinaryStepClock(stability, recording, lockstep=lockstep, party=party))
            trainer.add_callback(clocks[-1])
            if isinstance(trainer, StabilityTrainer):
                stack.enter_context(stability.watching(trainer))
        stack.enter_context(recording.watching())
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))

        def train(party: int) -> None:
            try:
                trainers[party].train()
            except BaseException as error:  # reported by the main thread
                errors.append(error)
            finally:
                lockstep.finish(party)

        threads = [threading.Thread(target=train, args=(party,)) for party in range(len(trainers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return clocks


def found_inf_milliseconds(repeats: int = 300) -> tuple[float, float]:
    """CPU ms of one fused AdamW step on the BART-base layout without and with a ``found_inf`` flag (median).

    `StabilityTrainer` hands the step's skip flag to the fused optimizer as ``found_inf`` (no host read); torch then
    subtracts the flag from every step count with one ``_foreach_sub_``, which the CPU runs as a loop over the 259
    tensors and CUDA as one multi-tensor kernel. That cost is torch's, inside ``optimizer.step()``, on every step.
    """
    parameters = list(bart_layout_model().parameters())
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, fused=True)
    flag = torch.zeros(())

    def median_step(with_flag: bool) -> float:
        seconds = []
        for _ in range(repeats):
            if with_flag:
                set_found_inf(optimizer, flag)
            started = time.thread_time()
            optimizer.step()
            seconds.append(time.thread_time() - started)
            clear_found_inf(optimizer)
        return statistics.median(seconds[repeats // 5:]) * 1000

    return median_step(False), median_step(True)


def bart_layout_table(options: argparse.Namespace) -> None:
    # One epoch longer than the run: an epoch's end (a flush of the skip queue) is no ordinary step.
    dataset = seq2seq_dataset(rows=BART_LAYOUT_BATCH * options.steps)
    rows = []
    for regime in options.regimes:
        times: dict[str, list[float]] = {label: [] for label, _ in BART_CONFIGS}
        added: list[float] = []
        inside: list[float] = []
        for repeat in range(options.repeats):
            base_clock, stability_clock = bart_layout_lockstep(regime, options.steps, dataset, first=repeat % 2)
            times["Trainer"] += base_clock.milliseconds
            times["StabilityTrainer, defaults"] += stability_clock.milliseconds
            # Step k of one trainer against step k of the other, taken one right after the other.
            added += [s - b for s, b in zip(stability_clock.milliseconds, base_clock.milliseconds, strict=True)]
            inside += stability_clock.inside_milliseconds
        base, stability = (statistics.median(times[label]) for label, _ in BART_CONFIGS)
        difference = statistics.median(added)
        rows.append(
            f"| {regime} | {base:.2f} | {stability:.2f} "
            f"| {difference:+.2f} ({difference / base * 100:+.1f}%) "
            f"| {statistics.median(inside):.2f} |"
        )
    print(
        f"BART-base layout ({BART_BASE_TENSORS} parameter tensors, d_model 16, 6+6 layers, "
        f"batch {BART_LAYOUT_BATCH} x 16 tokens, one epoch), "
        f"fused AdamW, {options.steps} steps/run, {options.repeats} runs of each trainer, the two trainers taking "
        "turns step by step in one process; medians over the ordinary steps, the added time the median of the "
        "differences between the trainers' same steps; 1 torch thread\n"
    )
    print(
        "| precision | Trainer ms/step | StabilityTrainer ms/step | added ms/step (wall clock, paired steps) "
        "| ms/step inside hf-stability code |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    plain, flagged = found_inf_milliseconds()
    print(
        f"\nPart of the added time is torch's: a fused AdamW step on this layout takes {plain:.3f} ms of CPU without a "
        f"`found_inf` flag and {flagged:.3f} ms with one ({flagged - plain:+.3f} ms, the `_foreach_sub_` over the step "
        "counts that CPU runs tensor by tensor and CUDA as one kernel)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert", choices=["bert", "bart-layout"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logging-steps", type=int, default=50)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    options = parser.parse_args()
    # One thread: with other processes on the machine, OpenMP's spinning threads slow tiny steps by 30x.
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    if options.model == "bart-layout":
        bart_layout_table(options)
        return
    tokenizer = bert_tokenizer()
    dataset = mlm_dataset(tokenizer, rows=512)
    run = (options.steps, options.logging_steps, tokenizer, dataset)

    rows = []
    for regime in options.regimes:
        rates: dict[str, list[float]] = {label: [] for label, _, _ in CONFIGS}
        shares: dict[str, list[float]] = {label: [] for label, _, _ in CONFIGS}
        recordings: dict[str, list[float]] = {label: [] for label, _, _ in CONFIGS}
        for repeat in range(options.repeats):
            order = CONFIGS if repeat % 2 == 0 else CONFIGS[::-1]
            for config in order:
                rate, share, recording = timed_run(config, regime, *run)
                rates[config[0]].append(rate)
                shares[config[0]].append(share)
                recordings[config[0]].append(recording)
        base = statistics.median(rates["Trainer"])
        for config in CONFIGS:
            label = config[0]
            rate, share = statistics.median(rates[label]), statistics.median(shares[label])
            recording = statistics.median(recordings[label])
            reads = host_reads_per_step(config, regime, *run)
            overhead = (base / rate - 1) * 100
            rows.append(f"| {regime} | {label} | {rate:.1f} | {overhead:+.1f}% | {share * 100:.2f}% | {recording:.0f} "
                        f"| {reads:.2f} |")
    print(
        f"tiny BERT MLM (hidden 64, 2 layers, seq 32, batch 16), {options.steps} steps/run, logging every "
        f"{options.logging_steps} steps, median of {options.repeats} interleaved runs, 1 torch thread\n"
    )
    print(
        "| precision | trainer | steps/s | wall-clock overhead vs Trainer | time in hf-stability code "
        "| sample recording µs/step | host reads/step |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
