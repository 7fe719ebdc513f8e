"""The skip decision of one step, on device: flags, one all-reduce, and how the update is dropped.

Two checks per step (gradients, training loss) fill a 3-element flag vector, all-reduced (max) so every
rank decides alike; its third place, the weights the step started from, is judged only when a flag is set
(:func:`judge_flagged_weights`): non-finite weights make every later loss and gradient non-finite, so no
step needs a walk of its parameters until its gradient or loss flag says so. The update of a step with
non-finite gradients is then dropped in one of two ways:

- **on device, no host read**: the grad scaler's found-inf flag (fp16; the reduced flag is written back
  into it), or, without a scaler, the optimizer's ``found_inf`` attribute when the optimizer honours it
  (`_compat.found_inf_supported`): its step leaves parameters, state and step count bit-identical;
- **on the host**: every gradient set to ``None`` (torch optimizers then leave parameters, state and
  ``step`` alone) and the user's ``optimizer.step()`` not run at all (a wrapper's own logic, e.g. a
  Lookahead's interpolation, would run on ``None`` gradients), which needs the flags on the host first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import cast

import torch

from hf_stability._compat import foreach_norm, found_inf_per_device, scaler_scale, unwrap_optimizer
from hf_stability.step.channel import (
    StepSignals,
    global_grad_norm,
    gradients,
    reduce_across_ranks,
    replicated,
)
from hf_stability.step.skip_queue import GRADIENTS, PARAMETERS, QueuedStep, ReadStep


def innermost(optimizer: object) -> torch.optim.Optimizer:
    """The user's optimizer under accelerate's wrapper: a user's own wrapper (Lookahead) is kept whole."""
    return cast(torch.optim.Optimizer, unwrap_optimizer(optimizer))


def unscaled_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The scaler's per-device found-inf tensors of ``optimizer`` (the user's: `innermost`) for this step,
    unscaling first if Trainer has not.

    Trainer unscales through ``accelerator.clip_grad_norm_`` before ``on_pre_optimizer_step`` even
    with ``max_grad_norm=0``; the explicit ``unscale_`` only covers custom training loops.
    """
    found = found_inf_per_device(scaler, optimizer)
    if not found:
        scaler.unscale_(optimizer)
        found = found_inf_per_device(scaler, optimizer)
    return list(found.values())


class TrainedParameters:
    """The model's parameters, listed once per run, and the fused checks the skip runs over them.

    Listing them once spares every step a walk of the module tree; the checks are one fused kernel and one
    stack (no per-tensor Python call), which on a model of BART-base's layout (259 tensors) is what keeps the
    host cost of a step near zero. :meth:`zero` is a constant kept on the parameters' device, the value of a
    check a step leaves out (no new tensor per step).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.parameters: list[torch.Tensor] = list(model.parameters())
        devices = {p.device for p in self.parameters}
        self._device = devices.pop() if len(devices) == 1 else None  # None: spread over devices (device_map)
        self._zeros: dict[torch.device, torch.Tensor] = {}
        self._covered: tuple[object, bool] | None = None  # (an optimizer, whether these hold all it steps)

    def zero(self, device: torch.device) -> torch.Tensor:
        """A 0-d fp32 zero on ``device``, made once (read only: stacked into the step's value vector)."""
        zero = self._zeros.get(device)
        if zero is None:
            zero = self._zeros[device] = torch.zeros((), device=device)
        return zero

    def cover(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether every parameter ``optimizer`` steps is one of these (checked once per optimizer).

        Then a norm of these gradients is non-finite whenever a grad scaler finds an overflow in the optimizer's.
        """
        if self._covered is None or self._covered[0] is not optimizer:
            listed = {id(p) for p in self.parameters}
            stepped = (p for group in optimizer.param_groups for p in group["params"])
            self._covered = (optimizer, all(id(p) in listed for p in stepped))
        return self._covered[1]

    def _global_norm(self, norms: Sequence[torch.Tensor]) -> torch.Tensor:
        if self._device is None:
            norms = [n.to(norms[0].device) for n in norms]
        return torch.linalg.vector_norm(replicated(torch.stack(list(norms))).float())

    def norm(self) -> torch.Tensor:
        """The 0-d fp32 norm of this rank's weights: non-finite iff some parameter holds NaN/Inf (one fused norm)."""
        if not self.parameters:
            return torch.zeros(())
        with torch.no_grad():
            return self._global_norm(foreach_norm(self.parameters))

    def verdict(self) -> tuple[bool, bool]:
        """``(this rank's weights non-finite, any rank's)``: one fused norm, one all-reduce, one host read."""
        local = (~torch.isfinite(self.norm())).float().reshape(1)
        here, anywhere = torch.cat([local, reduce_across_ranks(local, "max")]).tolist()
        return here > 0, anywhere > 0

    def grad_norm(self) -> torch.Tensor:
        """The norm of the gradients as they are now (the fallback where Trainer's pre-clip norm is out of reach)."""
        grads = gradients(self.parameters)
        if not grads:
            return torch.zeros(())
        return self._global_norm(foreach_norm(grads))


def parameters_nonfinite(model: torch.nn.Module) -> torch.Tensor:
    """A 0-d device bool: some parameter of this rank holds NaN/Inf (one fused norm, no host read)."""
    return ~torch.isfinite(global_grad_norm([p.detach() for p in model.parameters()]))


def weights_check(model: torch.nn.Module) -> tuple[bool, bool]:
    """``(this rank's weights non-finite, any rank's)`` now: one all-reduce and one host read (rare paths)."""
    local = parameters_nonfinite(model).float().reshape(1)
    here, anywhere = torch.cat([local, reduce_across_ranks(local, "max")]).tolist()
    return here > 0, anywhere > 0


def weights_nonfinite(model: torch.nn.Module, step: int) -> bool:
    """Whether any rank's weights are non-finite at the end of ``step``: one all-reduce and one host read.

    Run before a checkpoint is written (rarely enough to afford the read). The verdict is kept in the run's
    `WeightsLedger`, so a second stage asking about the same step gets it without another read; a verdict
    already made for ``step`` by the per-step flags is reused as is.
    """
    weights = StepSignals.for_model(model).guard.weights
    verdict = weights.verdict(step)
    if verdict is None:
        verdict = reduce_across_ranks(parameters_nonfinite(model).float(), "max").item() > 0
        weights.judge(step, verdict)
    return verdict


def measure_step(
    step: int,
    parameters: TrainedParameters,
    loss: torch.Tensor | None,
    grad_norm: torch.Tensor | None,
    scaler: torch.amp.GradScaler | None,
    optimizer: torch.optim.Optimizer | None,
    judge_weights: bool = False,
) -> QueuedStep:
    """The step's flags, local and all-reduced, with its event values, all on device.

    The flags are the non-finite places of one value vector, in `Flags` order: the gradient norm, the loss, and
    the norm of the weights the step started from. ``judge_weights``: measure that third value (one fused norm)
    on a step whose flags are read at once anyway (a flush); ordinary steps leave a constant zero there
    (`judge_flagged_weights` judges the weights of a flagged step). A step so costs three small ops (stack,
    subtract, compare) and one all-reduce: no parameter walk, no per-tensor Python call.

    ``optimizer`` is the user's optimizer (`innermost`), whose found-inf flags ``scaler`` keeps.
    ``grad_norm`` is Trainer's pre-clip norm of the (unscaled) gradients when the trainer shares it
    (`StabilityTrainer`): it is non-finite exactly when a gradient is, so it is not computed again. ``None``
    (a plain `Trainer`) computes it here.

    The gradient flag is raised whenever the unscaled gradients are non-finite, whatever a grad scaler says: its
    found-inf flag checks the *scaled* gradients, so once the loss scale is subnormal (its inverse overflows)
    the unscaled ones are NaN with the flag clear. In fp16 the reduced flag is written back into the scaler, so
    every rank skips and lowers its scale alike.
    """
    found_inf = unscaled_found_inf(scaler, optimizer) if scaler is not None and optimizer is not None else None
    if grad_norm is None:
        grad_norm = parameters.grad_norm()
    grad_norm = replicated(grad_norm)
    device = grad_norm.device
    zero = parameters.zero(device)
    values = torch.stack([
        _scalar(grad_norm, device),
        zero if loss is None else _scalar(loss, device),
        _scalar(parameters.norm(), device) if judge_weights else zero,
    ])
    local = values.sub(values).ne_(0)  # x - x is 0 for a finite x, NaN for NaN/Inf: 1.0 where non-finite
    # The scaler's overflow raises the gradient flag too. Unscaling keeps an Inf/NaN, so the norm of the gradients
    # already sees it when it covers every parameter the optimizer steps (the usual case: no op added).
    if found_inf and optimizer is not None and not parameters.cover(optimizer):
        overflow = found_inf[0] if len(found_inf) == 1 else torch.stack([f.to(device) for f in found_inf]).amax(0)
        local.narrow(0, GRADIENTS, 1).clamp_(min=overflow if overflow.device == device else overflow.to(device))
    reduced = reduce_across_ranks(local, "max")
    for flag in found_inf or ():
        flag.copy_(reduced[GRADIENTS])
    return QueuedStep(
        step=step,
        local=local,
        reduced=reduced,
        grad_norm=grad_norm,
        loss=loss,
        loss_scale=None if scaler is None else _scale_copy(scaler, device),
    )


def _scalar(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-d fp32 tensor on ``device``, with no op where it already is one (the usual case)."""
    if value.dtype != torch.float32:
        value = value.float()
    if value.dim():
        value = value.reshape(())
    return value if value.device == device else value.to(device)


def _scale_copy(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor:
    """The loss scale now, as a device copy: the scaler updates its scale tensor in place after the step."""
    scale = scaler_scale(scaler)
    return scale.clone() if scale.device == device else scale.to(device, copy=True)


def judge_flagged_weights(
    steps: list[ReadStep],
    local: torch.Tensor | None,
    parameters: TrainedParameters | None,
    known: dict[int, bool],
    weights_measured: bool = False,
) -> tuple[list[ReadStep], torch.Tensor | None]:
    """Mark the read ``steps`` that started from non-finite weights, judging the weights once if a step is flagged.

    Weights blown up by an update stay non-finite (every later gradient is, so every later update is dropped)
    until a restore: if they are non-finite now, the steps that started from them are the trailing run of
    steps with non-finite gradients. ``known`` holds steps already judged so (``step`` -> this rank's own
    verdict), by a spike rollback before it restored them or by an earlier flush; the steps found here are
    added to it, for the rollback's check of the same steps. ``weights_measured``: the last step's flags
    hold its weights' verdict (a flush step measures it with the others, `measure_step`), so no read is
    added; otherwise the weights are judged here when a step is flagged (one read), and never without one.
    """
    if not steps or (not weights_measured and not any(step.reduced.gradients or step.reduced.loss for step in steps)):
        return steps, local
    labels = {step.step: known[step.step] for step in steps if step.step in known}
    if weights_measured:
        here, anywhere = steps[-1].local.parameters, steps[-1].reduced.parameters
    else:
        here, anywhere = parameters.verdict() if parameters is not None else (False, False)
    if anywhere:
        for index in reversed(range(len(steps))):
            if not (steps[index].reduced.gradients or (weights_measured and index == len(steps) - 1)):
                break
            labels[steps[index].step] = here
    known.update(labels)
    if not labels:
        return steps, local
    rows = [index for index, step in enumerate(steps) if step.step in labels]
    marked = list(steps)
    for index in rows:
        step = steps[index]
        marked[index] = replace(
            step,
            local=replace(step.local, parameters=labels[step.step]),
            reduced=replace(step.reduced, parameters=True),
        )
    if local is not None:
        local = local.clone()
        local[rows, PARAMETERS] = torch.tensor([float(labels[steps[i].step]) for i in rows], device=local.device)
    return marked, local
