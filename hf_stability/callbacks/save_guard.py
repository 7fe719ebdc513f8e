"""Every checkpoint write judged: no checkpoint with non-finite weights, whoever asked for the save.

Trainer writes every checkpoint in ``_save_checkpoint``, which ``_maybe_log_save_evaluate`` calls whenever
``control.should_save`` is set: by the save strategy, by ``save_strategy="best"`` after an evaluation, on the last
step, or by any callback, also one that runs after the stability callbacks (a time-budget or preemption saver). A
check in a callback event is bypassed by whatever decides after it; a check at the write is not. So the weights are
judged right there (one fused norm, one all-reduce, one host read per checkpoint). When they are non-finite, the
callbacks that judge checkpoints (`CheckpointJudge`) answer in callback order: `SkipNonFiniteCallback` reports it
and, when nothing can restore the weights, stops training without writing; `SpikeRollbackCallback` restores its
newest trusted snapshot, whose state is then written instead.

`guard_checkpoint_writes` wraps a trainer's own ``_save_checkpoint`` and ``save_model`` (the methods Trainer calls,
a subclass's overrides included, with or without ``super()``): `StabilityTrainer` when it is built, a plain
`Trainer` when the judges start training (`hf_stability._compat.route_checkpoint_writes`). ``save_model`` (a
user's own save, ``push_to_hub``) refuses non-finite weights with a `ValueError`.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_stability._compat import calling_trainer, route_checkpoint_writes
from hf_stability.step.channel import StepSignals
from hf_stability.step.skip_decision import parameters_nonfinite, weights_nonfinite


class CheckpointJudge:
    """A stability callback that answers non-finite weights found when a checkpoint is about to be written."""

    def judge_nonfinite_checkpoint(self, args, state, control, model, optimizer, lr_scheduler) -> None:
        """Act on non-finite weights before the write: restore them, or clear ``control.should_save``."""
        raise NotImplementedError

    def guard_checkpoint_writes(self) -> None:
        """From ``on_train_begin``: judge the writes of the `Trainer` calling (a custom loop has none)."""
        trainer = calling_trainer(self)
        if trainer is not None:
            guard_checkpoint_writes(trainer)


def guard_checkpoint_writes(trainer: Any) -> None:
    """Judge every checkpoint and model write of ``trainer`` from now on (once per trainer)."""
    route_checkpoint_writes(trainer, checkpoint_write_allowed, refuse_nonfinite_model)


def _judges(trainer: Any) -> list[CheckpointJudge]:
    return [callback for callback in trainer.callback_handler.callbacks if isinstance(callback, CheckpointJudge)]


def _weights_nonfinite_now(model: torch.nn.Module, step: int) -> bool:
    """A fresh verdict on the weights: a restore since the last one (a rollback this step) makes that one stale."""
    StepSignals.for_model(model).guard.weights.forget()
    return weights_nonfinite(model, step)


def checkpoint_write_allowed(trainer: Any) -> bool:
    """Whether ``trainer`` may write the checkpoint due now: its weights are finite, or were restored to be."""
    judges = _judges(trainer)
    handler = trainer.callback_handler
    args, state, control, model = trainer.args, trainer.state, trainer.control, handler.model
    if not judges or not _weights_nonfinite_now(model, state.global_step):
        return True
    for judge in judges:
        judge.judge_nonfinite_checkpoint(args, state, control, model, handler.optimizer, handler.lr_scheduler)
    return bool(control.should_save) and not _weights_nonfinite_now(model, state.global_step)


def refuse_nonfinite_model(trainer: Any, output_dir: str | None) -> None:
    """Raise `ValueError` before ``save_model`` writes non-finite weights (this rank's: no collective)."""
    if _judges(trainer) and bool(parameters_nonfinite(trainer.model)):
        raise ValueError(
            f"save_model(output_dir={output_dir or trainer.args.output_dir!r}): the model's weights are non-finite "
            "(NaN/Inf); refusing to write them. Load the last checkpoint (they are never non-finite) and save that."
        )
