"""Per-step signals the stability callbacks share, read without host synchronisation.

A `TrainerCallback` sees the model and optimizer but not the step's loss or grad norm, so these
helpers recover both on device: the loss from the model's own forward output, the norm with one
fused ``torch._foreach_norm``. Decisions that must agree across ranks go through
:func:`reduce_across_ranks`, one small all-reduce.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import ClassVar, TypeVar

import torch
import torch.distributed as dist
from transformers import TrainerState

from hf_stability._compat import SUPPORTED, UpstreamChangedError, foreach_norm, grad_scaler
from hf_stability._compat import is_logging_step as is_logging_step  # re-exported: its former home

_Shared = TypeVar("_Shared", bound="_OnePerModel")


class _OnePerModel:
    """Base of the per-model objects the callbacks share: created on first use, dropped with the model."""

    _instances: ClassVar[weakref.WeakKeyDictionary]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._instances = weakref.WeakKeyDictionary()

    @classmethod
    def for_model(cls: type[_Shared], model: torch.nn.Module) -> _Shared:
        """The instance for ``model``, so that every callback reads and writes the same one."""
        instance = cls._instances.get(model)
        if instance is None:
            instance = cls._instances[model] = cls._create(model)
        return instance

    @classmethod
    def _create(cls: type[_Shared], model: torch.nn.Module) -> _Shared:
        return cls()


class TrainingLossTap(_OnePerModel):
    """Collects the training loss of the current optimizer step from the model's forward output.

    A forward hook adds ``output.loss`` (detached, on device) for every training-mode forward; the
    mean over the step's micro-batches is available from :meth:`read` until the next forward starts
    a new step. Evaluation forwards (``model.training`` is False) are ignored. Models called without
    ``labels`` return no loss, in which case :meth:`read` returns ``None``.

    Use :meth:`for_model` so that every callback shares one tap (and one hook) per model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._closed = False
        self._last: torch.Tensor | None = None
        self._handle = model.register_forward_hook(self._hook)

    @classmethod
    def _create(cls, model: torch.nn.Module) -> TrainingLossTap:
        return cls(model)

    def _hook(self, module: torch.nn.Module, args: object, output: object) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            return
        if self._closed:
            self._sum, self._count, self._closed = None, 0, False
        value = loss.detach().float().mean()
        self._sum = value if self._sum is None else self._sum + value
        self._count += 1

    def read(self) -> torch.Tensor | None:
        """Mean training loss of the step just computed (a 0-d device tensor), or ``None``."""
        if not self._closed:
            self._last = None if self._sum is None else self._sum / self._count
            self._closed = True
        return self._last

    def remove(self) -> None:
        self._handle.remove()
        type(self)._instances = weakref.WeakKeyDictionary({m: t for m, t in self._instances.items() if t is not self})


def gradients(parameters: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The gradients that exist (parameters without one are frozen or unused)."""
    return [p.grad for p in parameters if p.grad is not None]


def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the global value of ``tensor``: a DTensor (FSDP2) is reduced, anything else is returned.

    Norms of FSDP2 shards come back as partial DTensors; mixing them with plain tensors fails, and their local
    part is only this rank's share. All ranks call the callbacks alike, so the reduction is a matched collective.
    """
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor as one 1-d fp32 tensor (one fused kernel; for FSDP2 shards, one all-reduce)."""
    if not tensors:
        return torch.zeros(0)
    norms = foreach_norm(tensors)
    return replicated(torch.stack([n.float().to(norms[0].device) for n in norms]))


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients as one 0-d fp32 tensor; non-finite iff some gradient is (or the norm overflows).

    For FSDP2's sharded gradients it is the norm of the whole gradient, the same on every rank.
    """
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(tensor_norms(grads))


def collective_device(backend: str, device: torch.device) -> torch.device:
    """Where a collective of ``backend`` needs a tensor now on ``device``: gloo reduces on CPU, NCCL on CUDA only.

    Other backends (e.g. ``"cpu:gloo,cuda:nccl"``) take the tensor where it is.
    """
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda")  # the current CUDA device, the one NCCL's communicator uses
    return device


def distributed() -> bool:
    """Whether a process group is up (even of one rank: its collectives still need the backend's device)."""
    return dist.is_available() and dist.is_initialized()


def for_collective(value: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``value`` on the current backend's device, ready to be reduced or gathered in place."""
    return value.detach().to(collective_device(dist.get_backend(), value.device), copy=True).contiguous()


def reduce_across_ranks(value: torch.Tensor, op: str = "max") -> torch.Tensor:
    """All-reduce a small tensor (``op`` in ``"max"``, ``"min"``, ``"sum"``) when a process group is up.

    The reduction runs on the backend's device (:func:`collective_device`); the caller gets a tensor on
    the device it passed.
    """
    if not distributed():
        return value
    reduce_op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op]
    work = for_collective(value)
    dist.all_reduce(work, op=reduce_op)
    return work.to(value.device)


class SkipRecord(_OnePerModel):
    """The skip decision of the latest optimizer step, shared per model by the stability callbacks.

    `SkipNonFiniteCallback` writes it in ``on_pre_optimizer_step`` (before ``optimizer.step()``);
    any later callback of the same step reads it with ``SkipRecord.for_model(model).skip_flag(step)``
    or ``.skipped(step)``, where ``step = state.global_step + 1`` in ``on_pre_optimizer_step``/
    ``on_optimizer_step`` and ``state.global_step`` from ``on_step_end`` on.

    The decision is either on the host (:meth:`mark`: fp32/bf16, and fp16 flush steps; a skipped step
    also leaves every gradient ``None``) or, on the other fp16 steps, a 0-d bool device tensor
    (:meth:`mark_pending`): the grad scaler skips the update itself and nobody has read the flag yet.
    :meth:`skip_flag` hands out either form without a host read, for callers that can keep it on
    device; :meth:`skipped` always answers on the host (reading a pending flag: one device-to-host read).
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.reason: str | None = None
        self._flag: torch.Tensor | None = None
        # The latest host verdict on the weights: ``(step, True)`` when some parameter was NaN/Inf at the end
        # of ``step`` (all ranks agree). Such a step is no skip: its loss stays in the spike detector's view.
        self.weights_verdict: tuple[int, bool] | None = None
        # True while a callback (spike rollback) answers non-finite weights by restoring a trusted snapshot.
        self.recovery = False

    def mark(self, step: int, reason: str | None) -> None:
        """Record the host decision for ``step``: ``reason`` is ``None`` when the update goes ahead."""
        self.step, self.reason, self._flag = step, reason, None

    def mark_pending(self, step: int, flag: torch.Tensor, reason: str) -> None:
        """Record a decision still on device: ``step`` is skipped for ``reason`` iff ``flag`` is True."""
        self.step, self.reason, self._flag = step, reason, flag

    def skip_flag(self, step: int) -> torch.Tensor | bool:
        """Whether ``step`` is skipped: a host bool, or the pending 0-d bool device tensor (no host read)."""
        if self.step != step:
            return False
        return self._flag if self._flag is not None else self.reason is not None

    def skipped(self, step: int) -> bool:
        return bool(self.skip_flag(step))


class PreClipGradNorm(_OnePerModel):
    """The gradient norm of the latest step before clipping, as Trainer logs it, if the trainer shares it.

    Callbacks run after clipping, so with ``max_grad_norm > 0`` a norm they compute themselves is capped
    at the clip. `StabilityTrainer` records Trainer's own (pre-clip) norm here, keyed by step; a plain
    `Trainer` does not, and :meth:`read` then returns ``None``. While `StabilityTrainer` trains (``shared``),
    a missing norm means Trainer stopped calling the hook: :meth:`read` raises instead.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.value: torch.Tensor | None = None
        self.shared = False

    def record(self, step: int, value: torch.Tensor | float) -> None:
        self.step, self.value = step, torch.as_tensor(value)

    def read(self, step: int) -> torch.Tensor | None:
        """The pre-clip norm of ``step`` (a 0-d tensor), or ``None`` when nobody recorded it."""
        if self.step == step:
            return self.value
        if self.shared:
            raise UpstreamChangedError(
                f"StabilityTrainer recorded no pre-clip gradient norm for step {step}: Trainer did not call "
                f"`_get_grad_norm` (or it returned None). {SUPPORTED}."
            )
        return None


def active_grad_scaler(optimizer: object) -> torch.amp.GradScaler | None:
    """The enabled grad scaler of an accelerate-wrapped optimizer (fp16), else ``None``."""
    scaler = grad_scaler(optimizer)
    return scaler if scaler is not None and scaler.is_enabled() else None


def completing_step(state: TrainerState) -> int:
    """Number the step being computed will have once done (``global_step`` is incremented after the update)."""
    return state.global_step + 1
