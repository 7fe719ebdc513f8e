"""The skip stage: drop the update of a step whose gradients are NaN/Inf on any rank.

`SkipStage` is the step work behind `SkipNonFiniteCallback` (the callback is its facade: settings, exported
counters, Trainer events). The check runs before ``optimizer.step()`` (``on_pre_optimizer_step``), when Trainer
has already unscaled (fp16) and clipped the gradients. Clipping does not hide a non-finite gradient (a NaN turns
every gradient NaN, an Inf becomes NaN), so the norm of the gradients (Trainer's pre-clip norm) tells whether the
step is sane. A skip sets every gradient to ``None``: torch optimizers then leave parameters, moments and their
``step`` count alone (zeroing to 0 would not — Adam still decays its moments and counts the step).

Per step this costs an all-reduce of a 3-element flag vector (gradients, loss, parameters), and no
device-to-host read when the update can be dropped on device. The gradient flag reuses the pre-clip norm
Trainer has just computed in ``clip_grad_norm_`` (shared by `StabilityTrainer`; it is non-finite exactly when
a gradient is), so no gradient norm is computed again; under a plain `Trainer`, which does not share it, the
gradients are measured here (one fused norm). The weights are not judged on ordinary steps: a NaN/Inf that
the update of step ``k`` writes makes the loss and gradients of step ``k + 1`` and every later step
non-finite, which the gradient and loss flags already see. The weights are judged (one fused norm over the
parameter list taken once per run) on a flush step, in the same read as its flags, and otherwise only where
a flag is set: at a flush that reads a flagged step (`skip_decision.judge_flagged_weights`) and at a spike
rollback's check holding a left-out value, which tell non-finite weights (a spike: restore) from a bad batch
(skip). The update of a checkpoint step is judged by the check before the save. The drops: in fp16 the
reduced gradient flag is written into the grad scaler's found-inf and the scaler skips the update itself;
in fp32/bf16 a fused Adam/AdamW/Adagrad (the Trainer default ``adamw_torch_fused``) is given the reduced flag as its
``found_inf`` attribute, the way `GradScaler` does, and skips bit-exactly on device. The step's flags then
stay on device in a queue that is read at once (one read) on logging, save and last steps, every
``max_consecutive_skips`` steps and at epoch/train end. Counters, events and the consecutive-skip stop of a
queued step are therefore applied at the next flush, at most ``max_consecutive_skips - 1`` steps later. Log
entries and checkpoints see current counters (a flush also runs after every evaluation, where
``save_strategy="best"`` decides to save); only a checkpoint requested by a user callback can export
counters that miss the steps still queued. Other optimizers (Adafactor, SGD, plain ``adamw_torch``) take the
host path: one read per step, the skip decided before ``optimizer.step()``.

The pieces: `skip_decision` (flags, all-reduce, how an update is dropped), `skip_queue` (the step queue and
its flush rule), `skip_health` (counters, events, warnings, stops); this module runs them in the step.
"""

from __future__ import annotations

import torch
from transformers import TrainerState

from hf_stability import metric_names as names
from hf_stability._compat import clear_found_inf, found_inf_supported, set_found_inf
from hf_stability.settings import SkipSettings
from hf_stability.step.channel import StepSignals, active_grad_scaler, completing_step
from hf_stability.step.guard import StepRecord
from hf_stability.step.skip_decision import (
    TrainedParameters,
    innermost,
    judge_flagged_weights,
    measure_step,
    weights_nonfinite,
)
from hf_stability.step.skip_health import SkipHealth
from hf_stability.step.skip_queue import GRADIENTS, QueuedStep, StepQueue
from hf_stability.user_optimizer import hold_step, release_step


class SkipStage:
    """The skip's part in the step (role ``skip`` of `StepGuard`), and its flushes outside the step.

    Owns the run's step queue and its counters (:attr:`health`, which the callback exports). ``settings`` are
    the callback's resolved `SkipSettings`, handed over again when a run begins (:meth:`begin_run`).
    """

    def __init__(self, settings: SkipSettings) -> None:
        self.settings = settings
        self.health = SkipHealth(settings.max_consecutive_skips, settings.max_underflow_steps)
        self._queue = StepQueue()
        # (the optimizer Trainer steps, the user's optimizer inside it, whether that one takes ``found_inf``)
        self._optimizers: tuple[object, torch.optim.Optimizer, bool] | None = None
        self._found_inf_set: torch.optim.Optimizer | None = None  # told to skip this step's update on device
        self._held: object = None  # the optimizer whose ``step`` this step's skip holds (`hold_step`)
        self._parameters: TrainedParameters | None = None  # listed at the first step of each run

    @property
    def max_consecutive_skips(self) -> int:
        return self.settings.max_consecutive_skips

    def metrics(self) -> dict[str, int]:
        """The log metrics (`StepGuard.metrics`): the counters, as of the last flush (every logging step flushes)."""
        health = self.health
        return {names.SKIPPED_STEPS: health.skipped_steps, names.NONFINITE_LOSS_STEPS: health.nonfinite_loss_steps,
                names.UNDERFLOW_STEPS: health.underflow_steps}

    def begin_run(self, settings: SkipSettings, signals: StepSignals, state: TrainerState) -> None:
        """A run begins with this run's ``settings``: an empty queue, the counters' run-level state reset."""
        self.settings = settings
        self.health.max_consecutive_skips = settings.max_consecutive_skips
        self.health.max_underflow_steps = settings.max_underflow_steps
        if signals.samples is not None:  # the samples of the steps still queued may be reported
            signals.samples.hold("skip", completing_step(state))
        self._queue = StepQueue()
        self._parameters = None
        self._release()  # a run that raised mid-step may have left its flag or a held step behind
        self.health.begin_run()

    def _user_optimizer(self, optimizer: object) -> tuple[torch.optim.Optimizer, bool]:
        """The user's optimizer inside ``optimizer`` and whether it skips on a ``found_inf`` flag (looked up once
        per optimizer Trainer steps)."""
        if self._optimizers is None or self._optimizers[0] is not optimizer:
            inner = innermost(optimizer)
            self._optimizers = (optimizer, inner, found_inf_supported(inner))
        return self._optimizers[1], self._optimizers[2]

    # ---- the step --------------------------------------------------------------------------------

    def before_update(self, step_record: StepRecord) -> None:
        """Decide the step: flags, one all-reduce, the update dropped on device (queued) or on the host (flush)."""
        args, state, model, optimizer = step_record.args, step_record.state, step_record.model, step_record.optimizer
        step = step_record.step
        scaler = active_grad_scaler(optimizer)
        if self._parameters is None:
            self._parameters = TrainedParameters(model)
        # The update can be dropped on device: by the grad scaler (fp16), or by a fused optimizer's found_inf flag.
        user_optimizer, takes_found_inf = self._user_optimizer(optimizer)
        device_skip = user_optimizer if scaler is None and takes_found_inf else None
        queued = (scaler is not None or device_skip is not None) and not self._queue.due(
            args, state, step, self.max_consecutive_skips, adding=1
        )
        # A flush step reads its flags at once: the weights it started from are judged in the same read.
        entry = measure_step(
            step, self._parameters, step_record.loss(), step_record.pre_clip_norm(), scaler, user_optimizer, not queued
        )
        self._queue.append(entry)
        if queued:
            self._drop_on_device(step_record, entry, device_skip, "fp16_overflow" if scaler else "nonfinite_gradients")
            return
        record = StepSignals.for_model(model)
        reason = self._flush(args, state, step_record.control, step, record, weights_measured=True)
        if reason is not None or record.guard.weights.nonfinite_after(step):
            model.zero_grad(set_to_none=True)  # no update: neither a bad batch's nor one made from NaN weights
            hold_step(optimizer)  # nor a wrapper optimizer's own step logic (a Lookahead's interpolation)
            self._held = optimizer
        step_record.decide(reason is not None, reason)

    def _drop_on_device(
        self, step_record: StepRecord, entry: QueuedStep, optimizer: torch.optim.Optimizer | None, reason: str
    ) -> None:
        """Leave the step's flags on device: the scaler (already told by `measure_step`) or ``optimizer``'s
        ``found_inf`` drops the update. Until a flush or the rollback's check judges the weights, a flagged step
        counts as a skipped batch."""
        flag = entry.reduced[GRADIENTS]  # 0.0 or 1.0: what a fused optimizer's ``found_inf`` takes
        if optimizer is not None:
            set_found_inf(optimizer, flag)
            self._found_inf_set = optimizer
        step_record.decide(flag, reason)

    def update_applied(self, step_record: StepRecord) -> None:
        self._release()

    def after_update(self, step_record: StepRecord) -> None:
        """Nothing: the skip's work of a step is done once the update is applied (or dropped)."""

    def _release(self) -> None:
        """Take the ``found_inf`` flag and a held ``step`` back: the next step decides anew."""
        if self._held is not None:
            release_step(self._held)
            self._held = None
        if self._found_inf_set is not None:
            clear_found_inf(self._found_inf_set)
            self._found_inf_set = None

    # ---- outside the step: flushes, checkpoint writes, train end ----------------------------------

    def _flush(self, args, state, control, now: int, record: StepSignals, weights_measured: bool = False) -> str | None:
        """Read the queued steps at once, count and report them; the skip reason of the last one (or None).

        ``weights_measured``: the last queued step was measured with its weights' flag (a flush step).
        """
        steps, local = self._queue.drain()
        steps, local = judge_flagged_weights(
            steps, local, self._parameters, record.guard.weights.started_nonfinite, weights_measured
        )
        reason = self.health.apply(args, state, control, steps, local, now, record, record.guard.restores_weights())
        if record.samples is not None:  # every step up to ``now`` is reported
            record.samples.hold("skip", now + 1)
        return reason

    def flush(self, args, state, control, model: torch.nn.Module) -> None:
        """Read, count and report the queued steps now (after an evaluation, at epoch end): one read."""
        self._flush(args, state, control, state.global_step, StepSignals.for_model(model))

    def judge_nonfinite_checkpoint(self, args, state, control, model: torch.nn.Module) -> None:
        """A checkpoint is due on non-finite weights (`save_guard`): report them; stop unsaved if nothing restores.

        The per-step flags check the weights a step *starts* from; the read at the write covers the update of the
        checkpoint step itself. With spike rollback installed it restores a trusted snapshot before the write.
        """
        if self.health.weights_stop:
            control.should_save = False
            return
        record = StepSignals.for_model(model)
        restoring = record.guard.restores_weights()
        self.health.report_parameters(args, state, state.global_step, None, None, restoring)
        if not restoring:
            self.health.stop_for_weights(args, state, control, state.global_step, state.global_step, record.samples)

    def end_run(self, args, state, control, model: torch.nn.Module) -> None:
        """Flush queued steps, then report weights the last update left non-finite."""
        # A step that raised may have left its flag (or a held step) behind.
        self._release()
        record = StepSignals.for_model(model)
        self._flush(args, state, control, state.global_step, record)
        if not self.health.weights_stop and weights_nonfinite(model, state.global_step):
            self.health.report_parameters(args, state, state.global_step, None, None, None)
