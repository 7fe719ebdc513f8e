"""`TelemetryStage`: the loss scale, fp16 pressure and per-layer gradient norms, the guard's ``telemetry`` stage.

Values are measured on device before the update of logging steps only (when the unscaled gradients of the step
exist) and offered as device values to the log entry, where `StepGuard.metrics` reads them with the other
stages' at once. `hf_stability.callbacks.LossScaleTelemetryCallback` is its facade.
"""

from __future__ import annotations

import math

import torch

from hf_stability import metric_names as names
from hf_stability._compat import foreach_abs, foreach_mul, is_logging_step, scaler_scale
from hf_stability.settings import TelemetrySettings
from hf_stability.step.channel import active_grad_scaler, replicated, tensor_norms
from hf_stability.step.guard import Metric, StageHooks, StepRecord

FP16_MAX = 65504.0
FP16_SMALLEST_SUBNORMAL = 2.0**-24


class TelemetryStage(StageHooks):
    """Measures, on logging steps, the gradients the optimizer is about to apply; offers them with the loss scale.

    ``logs_run_counts``: the log entry also carries the run's counts, ``stability/rollbacks`` 0 where no spike
    stage runs (set by the facade when its trainer keeps it ahead of the loggers: `StabilityTrainer`, ``attach``).
    """

    def __init__(self, settings: TelemetrySettings) -> None:
        self.settings = settings
        self.logs_run_counts = False
        self._optimizer: object = None
        self._measured: dict[str, torch.Tensor] = {}

    def begin_run(self, settings: TelemetrySettings, optimizer: object) -> None:
        """This run's settings and optimizer (whose grad scaler gives the loss scale); nothing measured yet."""
        self.settings, self._optimizer, self._measured = settings, optimizer, {}

    def before_update(self, record: StepRecord) -> None:
        """On logging steps: measure the gradients the optimizer is about to apply (on device)."""
        pressure, layer_norms = self.settings.log_fp16_pressure, self.settings.log_layer_grad_norms
        if not (pressure or layer_norms) or not is_logging_step(record.args, record.state, record.step):
            return
        named = [(name, p.grad.detach()) for name, p in record.model.named_parameters() if p.grad is not None]
        if not named:  # the step was skipped: nothing to measure
            return
        grads = [grad for _, grad in named]
        if pressure:
            scaler = active_grad_scaler(record.optimizer)
            scale = scaler_scale(scaler) if scaler is not None else None
            self._measured.update({key: replicated(value) for key, value in fp16_pressure(grads, scale).items()})
        if layer_norms:
            norms = tensor_norms(grads)  # global norms under FSDP2
            for (name, _), norm in zip(named, norms, strict=True):
                self._measured[names.layer_grad_norm(name)] = norm

    def metrics(self) -> dict[str, Metric]:
        """What was measured since the last entry (then forgotten) and the grad scaler's loss scale, on device."""
        offered: dict[str, Metric] = dict(self._measured)
        self._measured = {}
        scaler = active_grad_scaler(self._optimizer)
        if scaler is not None:
            offered[names.LOSS_SCALE] = scaler_scale(scaler)
        return offered


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
