"""`SkipNonFiniteCallback`: drop the update of a step whose gradients are NaN/Inf on any rank.

The callback is a facade over the skip stage (`hf_stability.step.skip.SkipStage`, where the step's work and
its cost are explained): it resolves the settings, exports the stage's counters with checkpoints, registers the
stage with the run's `StepGuard` and hands it Trainer's evaluation, epoch-end and train-end events.
"""

from __future__ import annotations

from hf_stability.callbacks.guarded import GuardedStep
from hf_stability.callbacks.resume import ResumableCallback, stored_count
from hf_stability.callbacks.save_guard import CheckpointJudge
from hf_stability.engines import refuse_for_callback
from hf_stability.settings import SkipSettings
from hf_stability.step.channel import StepSignals
from hf_stability.step.skip import SkipStage
from hf_stability.step.skip_decision import parameters_nonfinite, weights_nonfinite
from hf_stability.step.skip_health import COUNTERS
from hf_stability.step.skip_queue import GRADIENTS, LOSS, PARAMETERS

__all__ = [
    "GRADIENTS",
    "LOSS",
    "PARAMETERS",
    "SkipNonFiniteCallback",
    "parameters_nonfinite",
    "weights_nonfinite",
]


class _Delegated:
    """A counter kept by the stage's `SkipHealth`: Trainer restores counters by name with ``setattr``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, callback: SkipNonFiniteCallback | None, owner: type | None = None):
        return self if callback is None else getattr(callback._stage.health, self.name)

    def __set__(self, callback: SkipNonFiniteCallback, value: int) -> None:
        setattr(callback._stage.health, self.name, value)


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
        self._stage = SkipStage(self.settings)  # the step's work; holds the counters exported below

    @property
    def max_consecutive_skips(self) -> int:
        return self.settings.max_consecutive_skips

    def attributes(self) -> dict:
        return {name: getattr(self, name) for name in COUNTERS}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_for_callback(self, args, model)
        self.begin_run(args, state, model)  # resolves this run's settings
        signals = self.register_stage("skip", state, model, self._stage)
        self._stage.begin_run(self.settings, signals, state)
        self.guard_checkpoint_writes()

    def judge_nonfinite_checkpoint(self, args, state, control, model, optimizer, lr_scheduler) -> None:
        """A checkpoint is due on non-finite weights: the stage reports them, and stops unsaved if nothing restores."""
        self._stage.judge_nonfinite_checkpoint(args, state, control, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        """Flush queued steps: ``save_strategy="best"`` may save right after an evaluation."""
        self._stage.flush(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        """Flush queued steps, so an epoch-end checkpoint exports current counters (one read per epoch)."""
        self._stage.flush(args, state, control, model)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Flush queued steps, then report weights the last update left non-finite."""
        self._stage.end_run(args, state, control, model)
        StepSignals.for_model(model).close()
        super().on_train_end(args, state, control, **kwargs)
