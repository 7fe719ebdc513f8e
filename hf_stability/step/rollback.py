"""`SpikeStage`, the spike stage of `StepGuard`: on a loss/grad-norm spike, restore a healthy snapshot and keep
training. `SpikeRollbackCallback` (``callbacks/rollback.py``) is its public face (settings, checkpoint state).

How a step flows through the stage:

1. Before and right after the update (``before_update`` / ``update_applied``, run by `StepGuard`
   after the skip stage): the step's metric (the training loss from `StepSignals`,
   or the global grad norm) is appended to a buffer **on device** — no host
   sync. Steps that `SkipNonFiniteCallback` skipped are never judged: a host decision leaves the value
   out at once; an fp16 decision still on device (the record's ``skip``) is buffered next to the value
   and read with it, as are fp16 overflows seen by the grad-norm metric without the skip callback.
2. At the step's end (``after_update``), on *check steps* only — every `spike_check_interval` (10) steps,
   every logging step (Trainer synchronises there anyway), every snapshot and checkpoint step, the step
   after a checkpoint (its loss judges the update the checkpoint holds), the steps until the first judged
   loss after a resume, steps with non-finite weights and the last step — the buffered values are copied to
   the host at once and judged by `SpikeDetector` (mean + ``spike_sigma``·σ over the last
   ``spike_window`` healthy values, non-finite = spike). Each rank's first spike position goes through
   one all-reduce (MIN), so every rank acts on the same step.
3. If no step spiked, snapshots followed by enough healthy steps become *trusted* (below), and on
   snapshot steps a new snapshot is captured. If a step spiked, every rank restores its newest trusted snapshot
   right there, after the scheduler stepped, so nothing advances the restored state a second time.

Non-finite weights (reported by `SkipNonFiniteCallback` or found by the check before a checkpoint) are a
spike at the step they are found, whatever the metric. A checkpoint is judged after the fact: if the step
after it spikes, the checkpoint is deleted and the restored state saved in its place. A spike on the first
loss after a resume, measured on the resumed weights themselves, stops training (naming an earlier
checkpoint) instead of rolling back to that same state.

Why "trusted": the loss of step k is computed before step k's update, so a bad update at step k first
shows in the loss of step k+1 (or later, once Adam's moments carry it). A snapshot taken at the end of
step k may therefore already hold the update that caused the spike; it becomes a rollback target only
when a check has judged all of steps k+1 .. k+`spike_check_interval` healthy. Untrusted snapshots are discarded
on a spike. The snapshot taken when training begins is trusted at once: it is the state the run started
from, which no update of this run can have spoiled.

What is *not* rewound: ``global_step``, ``log_history`` and the W&B step axis go on increasing, and the
dataloader keeps going, so the batches after a rollback are new ones (PaLM/OPT practice). The LR
scheduler *is* restored (its position is part of the snapshot) and then scaled by ``rollback_lr_factor``
per rollback, everywhere the scheduler reads the LR from (`hf_stability.user_optimizer.scale_learning_rate`).

Memory: ``snapshot_keep`` trusted snapshots plus the untrusted ones awaiting confirmation (one when
``snapshot_interval >= spike_check_interval``), each ≈ 3x the fp32 parameter
size with Adam (weights + two moments), per rank — see `hf_stability.snapshots`. Use
``snapshot_storage="disk"`` when that does not fit in host memory.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerControl, TrainerState

from hf_stability import metric_names as names
from hf_stability._compat import is_logging_step
from hf_stability._logging import get_logger
from hf_stability.deepspeed import DeepSpeedSnapshotStore
from hf_stability.engines import UnsupportedEngineError, deepspeed_enabled
from hf_stability.events import StabilityEventLog
from hf_stability.samples import event_samples, public, record_bad_samples
from hf_stability.settings import RollbackSettings, SnapshotStorage, SpikeMetric
from hf_stability.snapshots import SnapshotStore
from hf_stability.spike import SpikeDetector
from hf_stability.step.channel import (
    StepSignals,
    active_grad_scaler,
    distributed,
    global_grad_norm,
    gradients,
    reduce_across_ranks,
)
from hf_stability.step.guard import StepRecord
from hf_stability.step.skip_decision import weights_check, weights_nonfinite
from hf_stability.user_optimizer import check_lr_cut, scale_learning_rate

logger = get_logger(__name__)

SNAPSHOT_DIRNAME = "stability_snapshots"


@dataclass(frozen=True)
class Spike:
    """The earliest spike a check found, on any rank: its ``step``, this rank's ``value`` and ``threshold`` there
    (``None`` while the detector warms up, or when non-finite weights, not a value, are the spike), and whether
    this rank's own value spiked (``seen_here``; else another rank's did)."""

    step: int
    value: float
    threshold: float | None
    seen_here: bool


class SpikeStage:
    """The spike stage of `StepGuard`: buffers the step's metric on device, judges it on check steps, restores the
    newest trusted snapshot on a spike and captures snapshots on healthy snapshot steps.

    `SpikeRollbackCallback` owns one, resolves its ``settings`` and exports
    ``rollbacks`` and ``lr_scale`` with checkpoints. ``restoring`` is read by the guard
    (`StepGuard.restores_weights`): from :meth:`begin` to :meth:`end`, non-finite weights are answered by a restore.
    """

    def __init__(self, settings: RollbackSettings) -> None:
        self.settings = settings
        self.rollbacks = 0
        self.lr_scale = 1.0
        self._detector: SpikeDetector | None = None
        self._store: SnapshotStore | None = None
        # (step, value or None when known skipped, device flag "leave this value out" or None)
        self._pending: list[tuple[int, torch.Tensor | None, torch.Tensor | None]] = []
        self._grad_norm: torch.Tensor | None = None
        self._clipped_norm_warned = False
        self._overflow: torch.Tensor | None = None
        self._resumed_from: int | None = None  # the step training resumed from, until a check vouches for it
        self._first_resumed_step: int | None = None  # the first judged step after the resume: its loss judges it
        self._unjudged_checkpoint: Path | None = None  # written on the last step, its update not judged yet
        self.restoring = False  # a run is under way: non-finite weights are answered by a restore (`StepGuard`)

    def begin(self, args, state: TrainerState, model, optimizer, lr_scheduler, window: list[float]) -> None:
        """Start a run: the detector (primed with ``window``, healthy values restored from a checkpoint), a fresh
        snapshot store, and the starting state captured as a trusted snapshot."""
        s = self.settings
        check_lr_cut(optimizer, lr_scheduler, s.rollback_lr_factor)
        self._detector = SpikeDetector.from_settings(s)
        self._detector.accept(window[-s.spike_window :])
        rank_dir = None
        if s.snapshot_storage == SnapshotStorage.DISK:
            rank_dir = f"{args.output_dir}/{SNAPSHOT_DIRNAME}/rank-{args.process_index}"
        if self._store is not None:
            self._store.clear()
        self._store = self._snapshot_store(args, model, rank_dir)
        self._pending = []
        self._resumed_from = state.global_step if state.global_step > 0 else None
        self._first_resumed_step = None
        self._unjudged_checkpoint = None
        self.restoring = True  # until end(), non-finite weights are answered by a restore
        # The starting state cannot hold a bad update made in this run, so it is a rollback target at once.
        self._store.capture(state.global_step, model, optimizer, lr_scheduler, self.lr_scale, trusted=True)
        self._hold_samples(model, state.global_step)

    def metrics(self) -> dict[str, int]:
        """The spike stage's log metric (`StepGuard.metrics`): the run's rollbacks so far."""
        return {names.ROLLBACKS: self.rollbacks}

    def window(self) -> list[float] | None:
        """The detector's window of healthy values, ``None`` before :meth:`begin`."""
        return None if self._detector is None else self._detector.values

    def _snapshot_store(self, args, model, directory: str | None) -> SnapshotStore:
        """The store for this run's engine: the model/optimizer/scheduler, or a DeepSpeed engine's ZeRO partitions
        (the engine comes through `StepSignals.engine`, which `StabilityTrainer` sets)."""
        s = self.settings
        if not deepspeed_enabled(args):
            return SnapshotStore(s.snapshot_keep, s.snapshot_storage, directory)
        engine = StepSignals.for_model(model).engine
        if engine is None:
            raise UnsupportedEngineError(
                "`deepspeed`: SpikeRollbackCallback under DeepSpeed snapshots the engine's ZeRO partitions and needs "
                "StabilityTrainer, which hands it the engine; use StabilityTrainer (spike_rollback=True)."
            )
        return DeepSpeedSnapshotStore(engine, s.snapshot_keep, s.snapshot_storage, directory)

    def before_update(self, record: StepRecord) -> None:
        """Take the step's grad-norm metric (and an fp16 overflow flag) before the optimizer steps."""
        if self.settings.spike_metric == SpikeMetric.GRAD_NORM:
            norm = record.pre_clip_norm()
            if norm is None:
                norm = global_grad_norm(gradients(record.model.parameters()))
                self._warn_clipped_norm(record.args)
            if record.skip is False and active_grad_scaler(record.optimizer) is not None:
                # An fp16 overflow is the grad scaler's business (it skips the update and lowers the scale),
                # not a spike: flag it on device, to be dropped when the buffer is read. A non-finite loss
                # too means non-finite weights (or a NaN batch): a spike, as in fp32. A step the skip stage
                # decided on device needs no second flag: its own flag is raised by every non-finite norm.
                loss = record.loss()
                self._overflow = ~torch.isfinite(norm)
                if loss is not None:
                    self._overflow &= torch.isfinite(loss).to(self._overflow.device)
            self._grad_norm = norm

    def _warn_clipped_norm(self, args) -> None:
        if self._clipped_norm_warned or not getattr(args, "max_grad_norm", 0) > 0:
            return
        self._clipped_norm_warned = True
        logger.warning(
            f"SpikeRollbackCallback watches grad_norm with clipping on (max_grad_norm={args.max_grad_norm}) under a "
            "trainer that does not share the pre-clip norm: it sees the clipped norm, which hides spikes above the "
            "clip. Use StabilityTrainer, or spike_metric='loss'."
        )

    def update_applied(self, record: StepRecord) -> None:
        """Buffer the step's value on device, with the skip's device flag (read at the next check)."""
        step = record.step
        skipped = record.skip
        if skipped is True:
            value = None
        elif self.settings.spike_metric == SpikeMetric.LOSS:
            value = record.loss()
        else:
            value = self._grad_norm
        left_out = None  # device flags, read with the value at the next check
        for flag in (skipped, self._overflow):
            if isinstance(flag, torch.Tensor):
                left_out = flag if left_out is None else left_out.logical_or(flag.to(left_out.device))
        self._pending.append((step, value, left_out))
        self._grad_norm = self._overflow = None

    def after_update(self, record: StepRecord) -> None:
        """On a check step: judge the buffer (one read); roll back on a spike, else snapshot on snapshot steps."""
        args, state, control = record.args, record.state, record.control
        model, optimizer, lr_scheduler = record.model, record.optimizer, record.lr_scheduler
        step = state.global_step
        snapshot_due = step % self.settings.snapshot_interval == 0
        last_step = state.max_steps > 0 and step >= state.max_steps
        weights_bad = self._weights_bad(model, step)
        check_due = (
            snapshot_due
            or last_step
            or control.should_save  # judge before a checkpoint is written, and export a current window
            or weights_bad
            or self._unjudged_checkpoint is not None  # the step after a checkpoint judges the update it holds
            or (self._resumed_from is not None and self._first_resumed_step is None)  # and the one after a resume
            or step % self.settings.spike_check_interval == 0
            or is_logging_step(args, state, step)
        )
        if not check_due or self._detector is None:
            return
        spike = self._check(args.device, step, weights_bad, model)
        if spike is not None:
            self._roll_back(record, spike)
        elif snapshot_due and not last_step:
            self._running()[1].capture(step, model, optimizer, lr_scheduler, self.lr_scale, trusted=False)
        self._hold_samples(model, step)

    def check_at_epoch_end(self, record: StepRecord) -> None:
        """Judge what is still buffered (and weights the flags found bad) before an epoch-strategy checkpoint."""
        args, state, control, model = record.args, record.state, record.control, record.model
        if control.should_save and self._detector is not None:
            weights_bad = self._weights_bad(model, state.global_step)
            spike = self._check(args.device, state.global_step, weights_bad, model)
            if spike is not None:
                self._roll_back(record, spike)

    def checkpoint_saved(self, args, state: TrainerState) -> None:
        """A checkpoint holds the update of its own step, which only the next step's loss can judge."""
        self._unjudged_checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def end(self) -> None:
        """The run is over (or raised): no restore any more, the snapshots freed."""
        self.restoring = False
        if self._store is not None:
            self._store.clear()

    def judge_nonfinite_checkpoint(self, record: StepRecord) -> None:
        """A checkpoint is due on non-finite weights (`save_guard`): roll back now, and the restored state is
        written instead (or, without a trusted snapshot, stop unsaved)."""
        if self._detector is None:
            return
        spike = self._check(record.args.device, record.state.global_step, True, record.model)
        if spike is not None:  # always: non-finite weights are a spike
            self._roll_back(record, spike)

    def _hold_samples(self, model, checked: int) -> None:
        """Keep the samples a rollback may name: the steps after the oldest snapshot (indices), and the steps
        after ``checked``, the last step judged (inputs, for per-sample losses of a spike still to be found)."""
        samples = StepSignals.for_model(model).samples
        if samples is not None and self._store is not None:
            oldest = min((snapshot.step for snapshot in self._store.snapshots), default=checked)
            samples.hold("rollback", oldest + 1, checked + 1)

    def _samples(self, args, state, model, event: str, spike_step: int, seen_here: bool, restored: int | None,
                 nonfinite_weights: bool, threshold: float | None = None, replay: bool = False) -> dict[str, Any]:
        """The event fields naming the spiking step's samples (and the steps between the restored snapshot and
        the spike), per-sample losses from the weights now in place; on every rank (they are gathered). The
        spiking step's samples go into ``stability_bad_samples.json``; with non-finite weights (an update blew
        them up) only those whose own loss is non-finite on the weights now in place (the data, not the state).

        ``replay`` (``spike_replay``, after a restore): the spiking step's micro-batches run again from the restored
        state, no update; the spike *reproduces* when this rank's value is non-finite or above ``threshold``.
        """
        samples = StepSignals.for_model(model).samples
        again = samples.replay(spike_step) if replay and samples is not None else None
        if again is not None:
            value = again["loss"] if self.settings.spike_metric == SpikeMetric.LOSS else again["grad_norm"]
            again["reproduced"] = not math.isfinite(value) or (threshold is not None and value > threshold)
        between = None if restored is None else (restored, spike_step)
        fields = event_samples(samples, spike_step, seen_here, between, again)
        if nonfinite_weights:
            fields["_blamed"] = [s for s in fields.get("_blamed", []) if not math.isfinite(s.get("loss", 0.0))]
        if state.is_world_process_zero:
            record_bad_samples(args.output_dir, event, fields)
        return public(fields)

    @staticmethod
    def _weights_bad(model, step: int) -> bool:
        """Non-finite weights at the end of ``step`` as the skip flags found them (before a write: `save_guard`)."""
        return StepSignals.for_model(model).guard.weights.nonfinite_after(step)

    # ---- detection -----------------------------------------------------------------------------

    def _running(self) -> tuple[SpikeDetector, SnapshotStore]:
        """The detector and snapshot store, which exist from ``on_train_begin`` on."""
        if self._detector is None or self._store is None:
            raise RuntimeError("SpikeRollbackCallback is used before on_train_begin created its detector and store")
        return self._detector, self._store

    def _check(
        self, device: torch.device, step: int, weights_bad: bool, model: torch.nn.Module | None
    ) -> Spike | None:
        """Judge the buffered steps; on a spike return it (`Spike`).

        The step is the earliest spike on any rank (one all-reduce); ``seen_here`` says whether this
        rank's own value spiked there, the value and threshold being this rank's. Non-finite weights at
        the end of ``step`` (``weights_bad``, agreed by all ranks) are a spike at ``step`` when no buffered
        value spiked: an update made them, and no loss has shown it yet.

        A value left out as a skipped batch may be a step that started from non-finite weights (their
        gradients are non-finite too): when one is buffered, the weights are judged once here
        (:meth:`_unskip_nonfinite_weights`), so ordinary steps never walk the parameters.
        """
        pending, self._pending = self._pending, []
        judged = [(step, value, left_out) for step, value, left_out in pending if value is not None]
        values = []
        if judged:
            device_values = [value.detach().float().reshape(()) for _, value, _ in judged]
            flags = [
                torch.zeros_like(value) if left_out is None else left_out.float().reshape(()).to(value.device)
                for value, (_, _, left_out) in zip(device_values, judged, strict=True)
            ]
            values, left_out = torch.stack([torch.stack(device_values), torch.stack(flags)]).tolist()  # one host sync
            if model is not None:
                weights_bad |= self._unskip_nonfinite_weights(model, step, [s for s, _, _ in judged], values, left_out)
            kept = [index for index, flag in enumerate(left_out) if not flag]
            judged, values = [judged[i] for i in kept], [values[i] for i in kept]
        if self._resumed_from is not None and self._first_resumed_step is None and judged:
            self._first_resumed_step = judged[0][0]
        detector, store = self._running()
        local_first, verdicts = detector.scan(values)
        first = int(reduce_across_ranks(torch.tensor(local_first, device=device), "min").item())
        detector.accept(values[:first])
        if first == len(values):
            if weights_bad:
                return Spike(step, math.nan, None, True)
            if judged:
                # A snapshot vouched for by `spike_check_interval` healthy steps after it becomes a rollback target.
                store.trust_through(judged[-1][0] - self.settings.spike_check_interval + 1)
                self._resumed_from = self._unjudged_checkpoint = None  # healthy losses vouch for both
            return None
        verdict = verdicts[first]
        return Spike(judged[first][0], verdict.value, verdict.threshold, verdict.spike)

    @staticmethod
    def _unskip_nonfinite_weights(
        model: torch.nn.Module, step: int, steps: list[int], values: list[float], left_out: list[float]
    ) -> bool:
        """Put back (in ``left_out``) the values of steps that started from non-finite weights: a spike, no skip.

        Judged only when a left-out value is buffered on some rank (one parameter check, one read; with several
        ranks, one more all-reduce first so that all of them take part in the check's). Weights an update blew up
        stay non-finite until a restore, so the steps that started from them are the trailing run of left-out or
        non-finite values. They are also handed to the skip stage (the run's `WeightsLedger.started_nonfinite`), which
        reports them as such at its next flush even when this rollback has restored the weights by then. Returns
        whether a buffered step started from non-finite weights.
        """
        weights = StepSignals.for_model(model).guard.weights
        known = weights.started_nonfinite
        unexplained = any(flag and s not in known for s, flag in zip(steps, left_out, strict=True))
        if distributed():
            # A left-out fp16 overflow also depends on this rank's loss: agree before the check's all-reduce.
            unexplained = reduce_across_ranks(torch.tensor(float(unexplained)), "max").item() > 0
        if not unexplained:
            for index, s in enumerate(steps):
                if s in known:
                    left_out[index] = 0.0
            return False
        here, anywhere = weights_check(model)
        run = []
        if anywhere:
            for index in reversed(range(len(steps))):
                if not (left_out[index] or not math.isfinite(values[index])):
                    break
                run.append(steps[index])
        # Weights that no buffered step started from were written by this very step's update: the next steps'
        # flags show them, as for any update, and the check after them judges them (no earlier, no later).
        if run:
            weights.judge(step, True)
            for s in run:
                known.setdefault(s, here)
        elif not anywhere:
            weights.judge(step, False)
        for index, s in enumerate(steps):
            if s in known:
                left_out[index] = 0.0
        return bool(run)

    # ---- rollback ------------------------------------------------------------------------------

    def _roll_back(self, record: StepRecord, spike: Spike) -> None:
        args, state, control = record.args, record.state, record.control
        model, optimizer, lr_scheduler = record.model, record.optimizer, record.lr_scheduler
        spike_step, value, threshold, seen_here = spike.step, spike.value, spike.threshold, spike.seen_here
        store = self._running()[1]
        store.discard_untrusted()
        target = store.newest_trusted()
        metric = self.settings.spike_metric
        # One read on this rare path tells a blown-up model from a bad batch, on every rank alike.
        nonfinite_weights = weights_nonfinite(model, state.global_step)
        if nonfinite_weights:
            reason = f"non-finite weights at step {state.global_step} ({metric} spike first at step {spike_step})"
        elif not seen_here:
            reason = f"{metric} spike on another rank at step {spike_step} (here {value:.6g})"
        elif not math.isfinite(value):
            reason = f"non-finite {metric} {value} at step {spike_step}"
        else:
            reason = f"{metric} {value:.6g} above threshold {threshold:.6g} at step {spike_step}"
        event_fields = {"metric": metric, "value": value, "threshold": threshold, "spike_step": spike_step,
                        "nonfinite_weights": nonfinite_weights}
        events = StabilityEventLog(args.output_dir) if state.is_world_process_zero else None
        limit = self.settings.max_rollbacks
        if self._resumed_from is not None and spike_step == self._first_resumed_step:
            # The first loss after a resume is measured on the checkpoint's own weights: rolling back to them
            # (the only trusted snapshot yet) would repeat the spike until max_rollbacks.
            event_fields.update(
                self._samples(args, state, model, "stop", spike_step, seen_here, None, nonfinite_weights))
            message = (
                f"Spike rollback: {reason}, the first loss after resuming from step {self._resumed_from}: the "
                f"resumed checkpoint itself holds the update that spiked, so rolling back to it cannot help. Stopping "
                f"without saving; resume from {_earlier_checkpoint(args.output_dir, self._resumed_from)} instead."
            )
            self._stop(control, events, state, message, restored_step=None, **event_fields)
            return
        if self.rollbacks >= limit or target is None:
            if target is not None:
                store.restore(target, model, optimizer, lr_scheduler)
                self._replace_unjudged_checkpoint(state, control)
            restored = None if target is None else target.step
            why = f"the limit of max_rollbacks={limit} rollbacks is reached" if target is not None else (
                "no trusted snapshot exists to restore")
            if target is None and not nonfinite_weights:
                logger.warning(f"Spike rollback: {reason}, but {why}; continuing without one.")
                return
            event_fields.update(
                self._samples(args, state, model, "stop", spike_step, seen_here, restored, nonfinite_weights))
            saved = "saving a checkpoint holding the healthy state of step" if target is not None else "without saving"
            message = (
                f"Spike rollback: {reason}, but {why}; stopping training at step {state.global_step} "
                + (f"{saved} {restored}" if target is not None else saved)
                + ". Lower the learning rate or inspect the data around the spike before resuming."
            )
            self._stop(control, events, state, message, restored_step=restored, **event_fields)
            control.should_save = target is not None  # never a checkpoint of the spiked or non-finite state
            return
        store.restore(target, model, optimizer, lr_scheduler)
        removed = self._replace_unjudged_checkpoint(state, control)
        self.rollbacks += 1
        previous_scale, self.lr_scale = self.lr_scale, self.lr_scale * self.settings.rollback_lr_factor
        scale_learning_rate(optimizer, lr_scheduler, self.lr_scale / target.lr_scale)
        logger.warning(
            f"Spike rollback {self.rollbacks}/{limit}: {reason}; restored the snapshot of step {target.step} and "
            f"continue at step {state.global_step} with new batches (LR scale {previous_scale:g} -> {self.lr_scale:g})."
            + (f" Replaced {removed}, whose update the spike judged, by a checkpoint of the restored state." if removed
               else "")
        )
        event_fields.update(self._samples(args, state, model, "rollback", spike_step, seen_here, target.step,
                                          nonfinite_weights, threshold, replay=True))
        if events is not None:
            events.append(state.global_step, "rollback", reason, restored_step=target.step, rollbacks=self.rollbacks,
                          lr_scale=self.lr_scale, removed_checkpoint=removed, **event_fields)

    def _stop(self, control: TrainerControl, events: StabilityEventLog | None, state: TrainerState, message: str,
              **fields_: Any) -> None:
        logger.error(message)
        if events is not None:
            events.append(state.global_step, "stop", message, **fields_)
        control.should_training_stop = True
        control.should_save = False

    def _replace_unjudged_checkpoint(self, state: TrainerState, control: TrainerControl) -> str | None:
        """After a restore, drop the checkpoint whose update the spike judged and save the restored state instead.

        Returns the removed checkpoint's name, or ``None`` when the spike judged no checkpoint or it is Trainer's
        ``best_model_checkpoint``, which is kept (removing it would lose the best model).
        """
        checkpoint, self._unjudged_checkpoint = self._unjudged_checkpoint, None
        if checkpoint is None:
            return None
        control.should_save = True
        best = state.best_model_checkpoint
        if best is not None and Path(best).resolve() == checkpoint.resolve():
            # Trainer's record of the best model (load_best_model_at_end, kept by save_total_limit) stays true.
            logger.warning(f"Spike rollback: kept {checkpoint.name}, whose update the spike judged: it is Trainer's "
                           "best_model_checkpoint (best evaluation metric). Do not resume from it.")
            return None
        if state.is_world_process_zero:
            shutil.rmtree(checkpoint, ignore_errors=True)
        return checkpoint.name


def _earlier_checkpoint(output_dir: str, step: int) -> str:
    """The newest complete checkpoint in ``output_dir`` older than ``step``, named for a message."""
    steps = sorted(
        int(match.group(1))
        for path in Path(output_dir).glob("checkpoint-*")
        if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and (path / "trainer_state.json").is_file()
    )
    earlier = [s for s in steps if s < step]
    if not earlier:
        return f"an earlier checkpoint (none is left in {output_dir}: start over with a lower learning rate)"
    return str(Path(output_dir) / f"checkpoint-{earlier[-1]}")


