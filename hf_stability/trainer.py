"""`StabilityTrainer`: a `Trainer` that installs the stability callbacks its config asks for and logs their metrics."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback

from hf_stability.callbacks.rollback import SpikeRollbackCallback
from hf_stability.callbacks.signals import PreClipGradNorm, completing_step
from hf_stability.callbacks.skip import SkipNonFiniteCallback
from hf_stability.callbacks.telemetry import LossScaleTelemetryCallback, find_callback
from hf_stability.config import StabilityConfig
from hf_stability.engines import refuse_unsupported_engine

logger = logging.getLogger(__name__)

_TRAINING_ARGUMENT_NAMES = {f.name for f in dataclasses.fields(TrainingArguments)}
_STABILITY_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(StabilityConfig) if f.name not in _TRAINING_ARGUMENT_NAMES
}


def stability_option(args: TrainingArguments, name: str) -> Any:
    """A stability field of ``args``; a plain `TrainingArguments` gets the `StabilityConfig` default."""
    if name not in _STABILITY_DEFAULTS:
        raise ValueError(f"`name`: {name!r} is not a StabilityConfig field")
    return getattr(args, name, _STABILITY_DEFAULTS[name])


def stability_callbacks(args: TrainingArguments) -> list[TrainerCallback]:
    """The stability callbacks ``args`` asks for, in the order they must run.

    Order matters for ``on_pre_optimizer_step``: skipping decides first, so that rollback sees a
    skipped step (gradients ``None``, ``SkipRecord``) and telemetry measures only real updates.
    """
    callbacks: list[TrainerCallback] = []
    if stability_option(args, "skip_nonfinite"):
        callbacks.append(SkipNonFiniteCallback(max_consecutive_skips=stability_option(args, "max_consecutive_skips")))
    if stability_option(args, "spike_rollback"):
        # Reads its spike_*/snapshot_*/rollback settings from `args` when training begins.
        callbacks.append(SpikeRollbackCallback())
    callbacks.append(
        LossScaleTelemetryCallback(
            log_fp16_pressure=stability_option(args, "log_fp16_pressure"),
            log_layer_grad_norms=stability_option(args, "log_layer_grad_norms"),
        )
    )
    return callbacks


class StabilityTrainer(Trainer):
    """`Trainer` plus non-finite step skipping, spike rollback and stability telemetry, configured by `args`.

    Pass ``args=StabilityConfig(...)``; everything else is `Trainer`'s. A plain `TrainingArguments`
    works too and gets the `StabilityConfig` defaults for the stability fields (it keeps its own
    ``restore_callback_states_from_checkpoint=False``, so counters then do not survive a resume — a
    warning says so). The stability callbacks go right after `DefaultFlowCallback`, ahead of the
    reporting and user callbacks; a type the caller already passed in ``callbacks`` is not added again.

    ``log()`` merges the ``stability/*`` metrics into every training log entry before `Trainer`
    records it, so ``log_history``, W&B and TensorBoard receive them (keys in
    `LossScaleTelemetryCallback`). On resume, Trainer re-creates the stateful callbacks and appends
    them at the end of the list; this trainer puts them back in their original order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        callbacks = self.callback_handler.callbacks
        flow = find_callback(callbacks, DefaultFlowCallback)
        position = callbacks.index(flow) + 1 if flow is not None else 0
        for callback in stability_callbacks(self.args):
            if find_callback(callbacks, type(callback)) is None:
                callbacks.insert(position, callback)
                position += 1
        telemetry = find_callback(callbacks, LossScaleTelemetryCallback)
        telemetry.bind(self.callback_handler)
        stability_types = (SkipNonFiniteCallback, SpikeRollbackCallback, LossScaleTelemetryCallback)
        refuse_unsupported_engine(
            [type(callback).__name__ for callback in callbacks if isinstance(callback, stability_types)],
            self.is_deepspeed_enabled or self.accelerator.distributed_type == DistributedType.DEEPSPEED,
        )
        if not isinstance(self.args, StabilityConfig) and not self.args.restore_callback_states_from_checkpoint:
            logger.warning(
                "StabilityTrainer got TrainingArguments with restore_callback_states_from_checkpoint=False: skip and "
                "rollback counters restart from 0 after resume_from_checkpoint. Use StabilityConfig or set it True."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training-step entry (evaluation and the final summary have other keys)
            telemetry = find_callback(self.callback_handler.callbacks, LossScaleTelemetryCallback)
            if telemetry is not None:
                logs.update(telemetry.collect(self.callback_handler.callbacks))
        super().log(logs, start_time)

    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer's gradient norm (before clipping), also shared with the callbacks through `PreClipGradNorm`.

        Callbacks run after clipping and could only measure the clipped norm, blind to spikes above the clip.
        The record is keyed by the model the callbacks receive (the callback handler's).
        """
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None:
            PreClipGradNorm.for_model(self.callback_handler.model).record(completing_step(self.state), grad_norm)
        return grad_norm

    def _load_callback_state(self) -> None:
        order = {}
        for index, callback in enumerate(self.callback_handler.callbacks):
            order.setdefault(type(callback), index)
        super()._load_callback_state()
        self.callback_handler.callbacks.sort(key=lambda callback: order.get(type(callback), len(order)))
