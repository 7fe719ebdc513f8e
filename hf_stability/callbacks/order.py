"""Where the stability callbacks sit in a Trainer's callback list, and how to find one there.

Each stability callback has a class attribute ``priority`` (as in OLMo-core); within an event, higher runs
first: `SkipNonFiniteCallback` (400; under DeepSpeed, `DeepSpeedSkipTelemetryCallback`),
`AdaptiveClipCallback` (300), `SpikeRollbackCallback` (200), `LossScaleTelemetryCallback` (100). The step's
own work does not depend on it: the callbacks hand Trainer's step events to the run's `StepGuard`
(`hf_stability.step.guard`), which runs the stages in its own order wherever the callbacks sit.

All of them run right after `DefaultFlowCallback` (whose ``on_step_end`` decides ``should_save``, which the
checkpoint checks read) and ahead of the reporting callbacks (W&B, TensorBoard), so those receive the
``stability/*`` metrics; callbacks without ``priority`` keep their relative order.

:func:`keep_in_priority_order` is the one place that sorts: it makes the trainer's callback list keep this
order whenever a callback is added, which covers Trainer's restore on ``resume_from_checkpoint`` (it
re-creates the stateful callbacks and appends them at the end). `StabilityTrainer` calls it; under a
plain `Trainer`, `LossScaleTelemetryCallback.attach` does, or call it yourself before ``train()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, SupportsIndex, TypeVar

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from hf_stability._compat import ordered_callback_list

_Callback = TypeVar("_Callback", bound=TrainerCallback)


def find_callback(callbacks: Sequence[TrainerCallback], callback_type: type[_Callback]) -> _Callback | None:
    """The first callback of ``callback_type`` in a callback list (look-ups survive Trainer's restore)."""
    return next((callback for callback in callbacks if isinstance(callback, callback_type)), None)


def priority(callback: Any) -> int | None:
    """The run-order priority of ``callback`` (higher runs first), ``None`` for callbacks without one."""
    return getattr(type(callback), "priority", None)


class _PriorityOrder(list):
    """A callback list that puts the callbacks with a ``priority`` after `DefaultFlowCallback`, highest first.

    Trainer's `CallbackHandler` adds callbacks with ``append`` (``add_callback``, and the restore of
    ``resume_from_checkpoint``); ``insert`` and ``extend`` keep the order too.
    """

    def append(self, callback: Any) -> None:
        super().append(callback)
        self.arrange()

    def insert(self, index: SupportsIndex, callback: Any) -> None:
        super().insert(index, callback)
        self.arrange()

    def extend(self, callbacks: Iterable[Any]) -> None:
        super().extend(callbacks)
        self.arrange()

    def arrange(self) -> None:
        ranked = sorted((c for c in self if priority(c) is not None), key=lambda c: -(priority(c) or 0))  # stable
        rest = [c for c in self if priority(c) is None]
        flow = next((index + 1 for index, c in enumerate(rest) if isinstance(c, DefaultFlowCallback)), 0)
        super().__setitem__(slice(None), rest[:flow] + ranked + rest[flow:])


def keep_in_priority_order(trainer: Trainer) -> None:
    """Sort ``trainer``'s callbacks by priority now, and again whenever one is added (a resume's restore too)."""
    callbacks = ordered_callback_list(trainer, _PriorityOrder)
    callbacks.arrange()
