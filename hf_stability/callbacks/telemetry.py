"""`LossScaleTelemetryCallback`: loss scale, skip/rollback counts and fp16 pressure in the training logs.

Values are measured on device in ``on_pre_optimizer_step`` of logging steps only (when the unscaled
gradients of the step exist) and read to the host once, when the log entry is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler

from hf_stability import metric_names as names
from hf_stability._compat import foreach_abs, foreach_mul, scaler_scale
from hf_stability._logging import get_logger
from hf_stability.callbacks.guarded import GuardedStep
from hf_stability.callbacks.order import find_callback, keep_in_priority_order
from hf_stability.callbacks.resume import ConfiguredCallback
from hf_stability.callbacks.rollback import SpikeRollbackCallback
from hf_stability.callbacks.skip import SkipNonFiniteCallback
from hf_stability.engines import refuse_for_callback
from hf_stability.settings import TelemetrySettings
from hf_stability.step.channel import (
    active_grad_scaler,
    is_logging_step,
    replicated,
    tensor_norms,
)
from hf_stability.step.guard import StepRecord

logger = get_logger(__name__)

FP16_MAX = 65504.0
FP16_SMALLEST_SUBNORMAL = 2.0**-24


class LossScaleTelemetryCallback(GuardedStep, ConfiguredCallback):
    """Adds ``stability/*`` metrics to every training log entry.

    Logged keys: ``stability/skipped_steps``, ``stability/nonfinite_loss_steps`` and
    ``stability/underflow_steps`` (steps with an fp16 loss scale under 1 or all-zero gradients; when a
    `SkipNonFiniteCallback` runs), ``stability/rollbacks`` (cumulative, 0 without a
    `SpikeRollbackCallback`), ``stability/loss_scale`` (when a grad scaler is active), and on
    logging steps with ``log_fp16_pressure``: ``stability/fp16_underflow_fraction`` (share of nonzero
    gradient elements with ``|g * scale| < 2**-24``, lost if the backward ran in fp16; a gradient tensor that is
    all exactly zero counts as flushed, all its elements underflowed) and
    ``stability/fp16_headroom_log2`` (``log2(65504 / max|g * scale|)``; below 0 means overflow). Without
    a scaler the scale is 1, which tells how fp16 would fare. With ``log_layer_grad_norms``:
    ``stability/grad_norm/<parameter name>`` per parameter tensor.

    How the metrics reach the loggers: `StabilityTrainer` binds the callback with ``merged_by_trainer=True``
    and merges them in its ``log()`` override, so ``log_history``, W&B, TensorBoard and the console all get
    them. With a plain `Trainer`, call ``LossScaleTelemetryCallback.attach(trainer)``: it keeps the stability
    callbacks in priority order ahead of the reporting callbacks (`hf_stability.callbacks.order`) and its
    ``on_log`` adds the metrics to ``logs`` (which W&B/TensorBoard receive next) and to
    ``state.log_history[-1]``. A callback passed as ``Trainer(callbacks=[...])`` without ``attach`` sits
    behind the reporting callbacks and does not know the other callbacks: it still fills
    ``log_history`` and the console with what it measures itself, and warns once.

    The callback keeps no state of its own across steps (counts live in the skip and rollback
    callbacks), so it is not an `ExportableState` and survives Trainer's callback restore unchanged.

    Args (``None``: the `StabilityConfig` field of the same name in the trainer's ``args``, else the default):
        log_fp16_pressure: log fp16 underflow fraction and overflow headroom on logging steps (default True).
        log_layer_grad_norms: log the gradient norm of every parameter tensor on logging steps (default False).

    Example:
        ```python
        trainer = Trainer(model, args, train_dataset=data, callbacks=[SkipNonFiniteCallback()])
        LossScaleTelemetryCallback.attach(trainer)
        ```
    """

    settings_class = TelemetrySettings
    settings: TelemetrySettings
    priority = 100  # list position only (hf_stability.callbacks.order); the step's order is `StepGuard`'s

    def __init__(self, log_fp16_pressure: bool | None = None, log_layer_grad_norms: bool | None = None) -> None:
        super().__init__(log_fp16_pressure=log_fp16_pressure, log_layer_grad_norms=log_layer_grad_norms)
        self._handler: CallbackHandler | None = None
        self._optimizer: object = None
        self._measured: dict[str, torch.Tensor] = {}
        self._unbound_warned = False
        self._merged_by_trainer = False

    @classmethod
    def attach(cls, trainer: Trainer, **kwargs: bool) -> LossScaleTelemetryCallback:
        """Bind to ``trainer`` and keep its stability callbacks in priority order, ahead of the loggers.

        Reuses a `LossScaleTelemetryCallback` already in the trainer (``kwargs`` then must be empty). The order
        also holds after Trainer's callback restore on ``resume_from_checkpoint``.
        """
        callback = find_callback(trainer.callback_handler.callbacks, cls)
        if callback is None:
            callback = cls(**kwargs)
            trainer.callback_handler.callbacks.append(callback)
        elif kwargs:
            raise TypeError(f"`attach`: the trainer already has a {cls.__name__}; got options {sorted(kwargs)}")
        keep_in_priority_order(trainer)
        callback.bind(trainer.callback_handler)
        return callback

    @property
    def log_fp16_pressure(self) -> bool:
        return self.settings.log_fp16_pressure

    @property
    def log_layer_grad_norms(self) -> bool:
        return self.settings.log_layer_grad_norms

    def bind(self, handler: CallbackHandler, merged_by_trainer: bool = False) -> None:
        """Let the callback find its siblings (skip, rollback) in ``handler`` at logging time.

        ``merged_by_trainer``: the trainer merges :meth:`collect` into its training log entries itself
        (`StabilityTrainer.log`), so ``on_log`` adds nothing.
        """
        self._handler = handler
        self._merged_by_trainer = merged_by_trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        refuse_for_callback(self, args, kwargs.get("model"))
        self.configure(args)
        self.register_stage("telemetry", state, kwargs["model"])
        self._optimizer = optimizer
        self._measured = {}
        if self._handler is None and not self._unbound_warned:
            self._unbound_warned = True
            logger.warning(
                "LossScaleTelemetryCallback is not attached to its Trainer: skip/rollback counts are not logged and "
                "W&B/TensorBoard do not receive stability metrics. Use LossScaleTelemetryCallback.attach(trainer)."
            )

    def before_update(self, record: StepRecord) -> None:
        """On logging steps: measure the gradients the optimizer is about to apply (on device)."""
        if not (self.log_fp16_pressure or self.log_layer_grad_norms):
            return
        if not is_logging_step(record.args, record.state, record.step):
            return
        optimizer = record.optimizer
        named = [(name, p.grad.detach()) for name, p in record.model.named_parameters() if p.grad is not None]
        if not named:  # the step was skipped: nothing to measure
            return
        grads = [grad for _, grad in named]
        if self.log_fp16_pressure:
            scaler = active_grad_scaler(optimizer)
            scale = scaler_scale(scaler) if scaler is not None else None
            self._measured.update({key: replicated(value) for key, value in fp16_pressure(grads, scale).items()})
        if self.log_layer_grad_norms:
            norms = tensor_norms(grads)  # global norms under FSDP2
            for (name, _), norm in zip(named, norms, strict=True):
                self._measured[names.layer_grad_norm(name)] = norm

    def collect(self, callbacks: Sequence[TrainerCallback] | None = None) -> dict[str, float]:
        """The ``stability/*`` metrics for the log entry being built (one device-to-host read).

        ``callbacks`` is the trainer's callback list (defaults to the bound handler's); the skip and
        rollback callbacks are looked up there by type each time, never cached.
        """
        if callbacks is None and self._handler is not None:
            callbacks = self._handler.callbacks
        metrics: dict[str, float] = {}
        if callbacks is not None:
            skip = find_callback(callbacks, SkipNonFiniteCallback)
            if skip is not None:
                metrics[names.SKIPPED_STEPS] = skip.skipped_steps
                metrics[names.NONFINITE_LOSS_STEPS] = skip.nonfinite_loss_steps
                metrics[names.UNDERFLOW_STEPS] = skip.underflow_steps
            rollback = find_callback(callbacks, SpikeRollbackCallback)
            metrics[names.ROLLBACKS] = rollback.rollbacks if rollback is not None else 0
        device_values = dict(self._measured)
        self._measured = {}
        scaler = active_grad_scaler(self._optimizer)
        if scaler is not None:
            device_values[names.LOSS_SCALE] = scaler_scale(scaler)
        if device_values:
            device = next(iter(device_values.values())).device
            values = torch.stack([v.detach().float().reshape(()).to(device) for v in device_values.values()]).tolist()
            metrics.update(zip(device_values, values, strict=True))
        return metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Plain-Trainer path: add the metrics to ``logs`` and the entry Trainer already appended to history."""
        if logs is None or "loss" not in logs or self._merged_by_trainer:
            return  # not a training-step entry, or StabilityTrainer.log merged the metrics
        metrics = self.collect()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def fp16_pressure(grads: list[torch.Tensor], scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Underflow fraction and overflow headroom of ``grads * scale`` in fp16, as 0-d device tensors."""
    magnitudes = foreach_abs(grads)
    if scale is not None:
        magnitudes = foreach_mul(magnitudes, scale.to(grads[0].device, torch.float32))
    # A gradient tensor that is all exactly zero flushed to zero (a parameter the step does not reach has no
    # gradient at all): all its elements underflowed. Zeros inside a tensor with nonzero elements (embedding
    # rows the batch does not use) are no underflow and are left out.
    # Judged on the whole tensor: an FSDP2 shard's counts are partial DTensors, whose comparison reduces them.
    nonzero_counts = [(m > 0).sum() for m in magnitudes]
    flushed = torch.stack([(count == 0) * m.numel() for count, m in zip(nonzero_counts, magnitudes, strict=True)]).sum()
    underflow = torch.stack([((m < FP16_SMALLEST_SUBNORMAL) & (m > 0)).sum() for m in magnitudes]).sum() + flushed
    nonzero = (torch.stack(nonzero_counts).sum() + flushed).clamp(min=1)
    largest = torch.stack([m.max().float() for m in magnitudes if m.numel()]).max()
    headroom = math.log2(FP16_MAX) - torch.log2(largest)
    return {
        names.FP16_UNDERFLOW_FRACTION: underflow.float() / nonzero.float(),
        names.FP16_HEADROOM_LOG2: headroom,
    }
