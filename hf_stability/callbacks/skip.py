"""`SkipNonFiniteCallback`: drop the update of a step whose gradients are NaN/Inf on any rank.

The check runs in ``on_pre_optimizer_step``, when Trainer has already unscaled (fp16) and clipped
the gradients. Clipping does not hide a non-finite gradient (a NaN turns every gradient NaN, an Inf
becomes NaN), so the norm of the gradients (Trainer's pre-clip norm) tells whether the step is sane. A skip sets every
gradient to ``None``: torch optimizers then leave parameters, moments and their ``step`` count alone
(zeroing to 0 would not — Adam still decays its moments and counts the step).

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
its flush rule), `skip_health` (counters, events, warnings, stops); this module wires them to Trainer.
"""

from __future__ import annotations

import torch

from hf_stability._compat import clear_found_inf, found_inf_supported, set_found_inf
from hf_stability.callbacks.guarded import GuardedStep
from hf_stability.callbacks.resume import ResumableCallback, stored_count
from hf_stability.callbacks.save_guard import CheckpointJudge
from hf_stability.engines import refuse_for_callback
from hf_stability.settings import SkipSettings
from hf_stability.step.channel import StepSignals, active_grad_scaler, completing_step
from hf_stability.step.guard import StepRecord
from hf_stability.step.skip_decision import (
    TrainedParameters,
    innermost,
    judge_flagged_weights,
    measure_step,
    parameters_nonfinite,
    update_dropped,
    weights_nonfinite,
)
from hf_stability.step.skip_health import COUNTERS, SkipHealth
from hf_stability.step.skip_queue import GRADIENTS, LOSS, PARAMETERS, StepQueue
from hf_stability.user_optimizer import hold_step, release_step

__all__ = [
    "GRADIENTS",
    "LOSS",
    "PARAMETERS",
    "SkipNonFiniteCallback",
    "parameters_nonfinite",
    "weights_nonfinite",
]


class _Delegated:
    """A counter of the callback kept by its `SkipHealth`: Trainer restores counters by name with ``setattr``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, callback: SkipNonFiniteCallback | None, owner: type | None = None):
        return self if callback is None else getattr(callback._health, self.name)

    def __set__(self, callback: SkipNonFiniteCallback, value: int) -> None:
        setattr(callback._health, self.name, value)


class SkipNonFiniteCallback(GuardedStep, ResumableCallback, CheckpointJudge):
    """Skip the optimizer update of any step with a NaN/Inf gradient on any rank; report NaN losses and weights.

    On a skip, every gradient is set to ``None``, the decision is written to
    :class:`~hf_stability.step.channel.StepSignals` (``StepSignals.for_model(model).skipped(step)``),
    the counters below move once, and the main process appends a ``"skip"`` event to
    ``<output_dir>/stability_events.jsonl``. ``global_step`` still counts the batch and training goes on.
    After ``max_consecutive_skips`` skips in a row the run stops with a checkpoint (event ``"stop"``).

    Also reported (event, counter and warning; no skip): a non-finite training loss with finite gradients
    (``"nonfinite_loss"``, e.g. a batch without a single label: 0/0).

    Non-finite weights are no bad batch: the third flag judges the parameters a step starts from, on flush
    steps and wherever a gradient or loss flag is set (they make every later gradient non-finite, so ordinary
    steps need no check). Such a step is not counted as skipped (``"nonfinite_parameters"``,
    ``nonfinite_parameter_steps``) and its update is dropped; `SpikeRollbackCallback`, when installed, treats
    it as a spike and restores a trusted snapshot. Alone, this callback stops training at once without a
    checkpoint. Before every checkpoint write, whoever asked for it, the weights are checked once more (one read,
    `save_guard`), covering the update of the checkpoint step itself: a checkpoint with non-finite weights is
    never written.

    Skipping on device: fp16's grad scaler uses its found-inf flag as the gradient check (the reduced flag is
    written back so every rank halves its scale alike) and skips the update itself (with the fused AdamW
    kernel on device, ``accelerator.optimizer_step_was_skipped`` staying False); the counters here see the
    overflow exactly once either way. In fp32/bf16 a fused Adam/AdamW/Adagrad gets the reduced flag as its
    ``found_inf`` attribute for the step (taken back in ``on_optimizer_step``). Either way the flags are not
    read per step but queued on device and read together at the next flush (logging, save, evaluation and
    last steps, every ``max_consecutive_skips`` steps, epoch and train end): events, counters and the stop of
    a queued skipped step (or of non-finite weights) come at most ``max_consecutive_skips - 1`` steps late,
    and its gradients are left in place (the optimizer ignores them). On a flush step the current step is
    decided on the host, gradients set to ``None``. `StepSignals` holds a device flag for a queued step
    (``StepSignals.skip_flag``); other optimizers decide every step on the host.

    LR scheduler: Trainer steps it on skipped steps too (it only checks accelerate's flag, which neither a
    device skip nor ``None`` gradients set), so the schedule follows ``global_step``, not the number of updates.
    This is deliberate: the schedule stays aligned with the data position and with resumed runs.

    fp16 loss-scale collapse: overflows that never come two in a row each halve GradScaler's scale, which
    regains a factor 2 only after 2,000 clean steps, so the scale only falls. Once it is tiny, every clean
    step's gradients flush to exactly zero, and once it is subnormal the unscaled gradients are NaN although
    the scaler's found-inf flag (it checks the *scaled* values) is clear. The gradient flag is therefore
    non-finite whenever the unscaled gradients are, whatever the scaler says (the flag written back into the
    scaler makes it skip); and a step whose loss scale is under 1, or whose gradients are all exactly zero, is
    counted (``underflow_steps``), reported at the first of a run (event ``"underflow"``, a warning), and
    ``max_underflow_steps`` of them in a row stop the run with a checkpoint (event ``"stop"``).

    Counters (``skipped_steps``, ``consecutive_skips``, ``nonfinite_loss_steps``,
    ``nonfinite_parameter_steps``, ``underflow_steps``, ``consecutive_underflow_steps``) are exported with the
    checkpoint and come back on ``resume_from_checkpoint`` when ``restore_callback_states_from_checkpoint=True``; the
    ``max_consecutive_skips`` given for the resumed run wins over the stored one.

    With ``logging_nan_inf_filter=True`` (Trainer's default) the first non-finite loss also raises a
    one-time warning, since Trainer's logged ``loss`` hides it.

    Args:
        max_consecutive_skips: stop training after this many skipped steps in a row.
        max_underflow_steps: stop training after this many steps in a row with a loss scale under 1 or all-zero
            gradients.

    Example:
        ```python
        trainer = Trainer(model, args, train_dataset=data, callbacks=[SkipNonFiniteCallback(max_consecutive_skips=20)])
        ```
    """

    settings_class = SkipSettings
    settings: SkipSettings
    priority = 400  # first of the stability callbacks in the list (hf_stability.callbacks.order); the step's work
    # runs in the order of `StepGuard`, wherever the callback sits

    stored_attributes = {name: stored_count for name in COUNTERS}
    skipped_steps = _Delegated()
    consecutive_skips = _Delegated()
    nonfinite_loss_steps = _Delegated()
    nonfinite_parameter_steps = _Delegated()
    underflow_steps = _Delegated()
    consecutive_underflow_steps = _Delegated()

    def __init__(self, max_consecutive_skips: int | None = None, max_underflow_steps: int | None = None) -> None:
        super().__init__(max_consecutive_skips=max_consecutive_skips, max_underflow_steps=max_underflow_steps)
        self._health = SkipHealth(self.settings.max_consecutive_skips, self.settings.max_underflow_steps)
        self._queue = StepQueue()
        self._device_skip: tuple[object, bool] | None = None  # (optimizer, whether it takes ``found_inf``)
        self._found_inf_set: torch.optim.Optimizer | None = None
        self._parameters: TrainedParameters | None = None  # listed at the first step of each run

    @property
    def max_consecutive_skips(self) -> int:
        return self.settings.max_consecutive_skips

    def attributes(self) -> dict:
        return {name: getattr(self, name) for name in COUNTERS}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_for_callback(self, args, model)
        self.begin_run(args, state, model)  # resolves this run's settings
        self._health.max_consecutive_skips = self.max_consecutive_skips
        self._health.max_underflow_steps = self.settings.max_underflow_steps
        record = self.register_stage("skip", state, model)
        if record.samples is not None:  # the samples of the steps still queued may be reported
            record.samples.hold("skip", completing_step(state))
        self._queue = StepQueue()
        self._parameters = None
        self._health.begin_run()
        self.guard_checkpoint_writes()

    def _takes_found_inf(self, optimizer: object) -> torch.optim.Optimizer | None:
        """The torch optimizer when it skips on a ``found_inf`` flag (checked once per optimizer), else None."""
        inner = innermost(optimizer)
        if self._device_skip is None or self._device_skip[0] is not inner:
            self._device_skip = (inner, found_inf_supported(inner))
        return inner if self._device_skip[1] else None

    def before_update(self, step_record: StepRecord) -> None:
        """Decide the step: flags, one all-reduce, the update dropped on device (queued) or on the host (flush)."""
        args, state, control, model, optimizer = (
            step_record.args, step_record.state, step_record.control, step_record.model, step_record.optimizer)
        step = step_record.step
        scaler = active_grad_scaler(optimizer)
        record = StepSignals.for_model(model)
        if self._parameters is None:
            self._parameters = TrainedParameters(model)
        # The update can be dropped on device: by the grad scaler (fp16), or by a fused optimizer's found_inf flag.
        device_skip = None if scaler is not None else self._takes_found_inf(optimizer)
        queued = (scaler is not None or device_skip is not None) and not self._queue.due(
            args, state, step, self.max_consecutive_skips, adding=1
        )
        # A flush step reads its flags at once: the weights it started from are judged in the same read.
        entry = measure_step(
            step, self._parameters, step_record.loss(), step_record.pre_clip_norm(), scaler, optimizer, not queued
        )
        self._queue.append(entry)
        if queued:
            if device_skip is not None:
                set_found_inf(device_skip, update_dropped(entry))
                self._found_inf_set = device_skip
            # Until a flush or the rollback's check judges the weights, a flagged step counts as a skipped batch.
            step_record.decide(update_dropped(entry), "fp16_overflow" if scaler else "nonfinite_gradients")
            return
        reason = self._flush(args, state, control, step, record, weights_measured=True)
        if reason is not None or record.guard.weights.nonfinite_after(step):
            model.zero_grad(set_to_none=True)  # no update: neither a bad batch's nor one made from NaN weights
            hold_step(optimizer)  # nor a wrapper optimizer's own step logic (a Lookahead's interpolation)
        step_record.decide(reason is not None, reason)

    def update_applied(self, step_record: StepRecord) -> None:
        self._release(step_record.optimizer)

    def _release(self, optimizer: object) -> None:
        """Take the ``found_inf`` flag and a held ``step`` back: the next step decides anew."""
        release_step(optimizer)
        if self._found_inf_set is not None:
            clear_found_inf(self._found_inf_set)
            self._found_inf_set = None

    def _flush(self, args, state, control, now: int, record: StepSignals, weights_measured: bool = False) -> str | None:
        """Read the queued steps at once, count and report them; the skip reason of the last one (or None).

        ``weights_measured``: the last queued step was measured with its weights' flag (a flush step).
        """
        steps, local = self._queue.drain()
        steps, local = judge_flagged_weights(
            steps, local, self._parameters, record.guard.weights.started_nonfinite, weights_measured
        )
        reason = self._health.apply(args, state, control, steps, local, now, record, record.guard.restores_weights())
        if record.samples is not None:  # every step up to ``now`` is reported
            record.samples.hold("skip", now + 1)
        return reason

    def judge_nonfinite_checkpoint(self, args, state, control, model, optimizer, lr_scheduler) -> None:
        """A checkpoint is due on non-finite weights (`save_guard`): report them; stop unsaved if nothing restores.

        The per-step flags check the weights a step *starts* from; the read at the write covers the update of the
        checkpoint step itself. With spike rollback installed it restores a trusted snapshot before the write.
        """
        if self._health.weights_stop:
            control.should_save = False
            return
        record = StepSignals.for_model(model)
        restoring = record.guard.restores_weights()
        self._health.report_parameters(args, state, state.global_step, None, None, restoring)
        if not restoring:
            self._health.stop_for_weights(args, state, control, state.global_step, state.global_step, record.samples)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        """Flush queued steps: ``save_strategy="best"`` may save right after an evaluation."""
        self._flush(args, state, control, state.global_step, StepSignals.for_model(model))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        """Flush queued steps, so an epoch-end checkpoint exports current counters (one read per epoch)."""
        self._flush(args, state, control, state.global_step, StepSignals.for_model(model))

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Flush queued steps, then report weights the last update left non-finite."""
        # A step that raised may have left its flag (or a held step) behind.
        self._release(optimizer)
        record = StepSignals.for_model(model)
        self._flush(args, state, control, state.global_step, record)
        if not self._health.weights_stop and weights_nonfinite(model, state.global_step):
            self._health.report_parameters(args, state, state.global_step, None, None, None)
        record.close()
        super().on_train_end(args, state, control, **kwargs)
