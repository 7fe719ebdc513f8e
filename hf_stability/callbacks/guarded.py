"""`GuardedStep`: how a stability callback hands Trainer's three step events to the run's `StepGuard`."""

from __future__ import annotations

import torch
from transformers import TrainerState

from hf_stability.step.channel import StepSignals
from hf_stability.step.guard import Stage, StageHooks


class GuardedStep(StageHooks):
    """Trainer's three step events, handed to the run's `StepGuard` (which runs each once per step).

    A stability callback mixes this in ahead of `TrainerCallback` and registers its stage in ``on_train_begin``
    (:meth:`register_stage`): its position in the callback list then changes nothing.
    """

    # The run it registered in: (its TrainerState, its StepSignals, whether this callback drives the guard).
    _run: tuple[TrainerState, StepSignals, bool] | None = None

    def register_stage(
        self, role: str, state: TrainerState, model: torch.nn.Module, stage: Stage | None = None
    ) -> StepSignals:
        """Open the run's signals and make ``stage`` (default: this callback) the guard's ``role``."""
        signals = StepSignals.for_model(model).open(state)
        signals.guard.register(role, self if stage is None else stage)
        self._run = (state, signals, signals.guard.claim(self))
        return signals

    def _signals(self, state: TrainerState, model: torch.nn.Module) -> StepSignals:
        """The signals this callback registered with in the run of ``state`` (no registry lookup per event);
        for a run it did not register in, those of ``model``."""
        run = self._run
        return run[1] if run is not None and run[0] is state else StepSignals.for_model(model)

    def _driven(self, state: TrainerState, model: torch.nn.Module) -> StepSignals | None:
        """The signals whose guard this callback hands the step events to; ``None`` where the run's first registered
        callback does (`StepGuard.claim`), which has received the event already."""
        run = self._run
        if run is not None and run[0] is state and not run[2]:
            return None
        return self._signals(state, model)

    def log_step_metrics(self, state: TrainerState, logs: dict | None, model: torch.nn.Module | None) -> None:
        """Plain-`Trainer` path of ``on_log``: the guard's metrics into a training log entry, once per entry.

        They go into ``logs`` (which W&B/TensorBoard receive next) and the entry Trainer already appended to
        ``log_history``. Whichever stability callback's ``on_log`` comes first merges them; after it, or after
        `StabilityTrainer.log`, the guard gives nothing (`StepGuard.log_metrics`).
        """
        if logs is None or "loss" not in logs or model is None:
            return  # not a training-step entry
        metrics = self._signals(state, model).guard.log_metrics(state.global_step)
        logs.update(metrics)
        if metrics and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        signals = self._driven(state, model)
        if signals is not None:
            signals.guard.before_update(signals.record(args, state, control, model, optimizer, lr_scheduler))

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        signals = self._driven(state, model)
        if signals is not None:
            signals.guard.update_applied(signals.record(args, state, control, model, optimizer, lr_scheduler))

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        signals = self._driven(state, model)
        if signals is not None:
            record = signals.record(args, state, control, model, optimizer, lr_scheduler, step=state.global_step)
            signals.guard.after_update(record, control)
