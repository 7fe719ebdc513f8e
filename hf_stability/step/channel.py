"""Per-step signals the stability callbacks share, read without host synchronisation.

A `TrainerCallback` sees the model and optimizer but not the step's loss or grad norm: `StepSignals`
carries both (and the skip decision) from the trainer, or from a forward hook, to the callbacks, on device.
The norm of the gradients as the callbacks see them takes one fused ``torch._foreach_norm``. Decisions that
must agree across ranks go through :func:`reduce_across_ranks`, one small all-reduce.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerState

from hf_stability._compat import (
    SUPPORTED,
    UpstreamChangedError,
    foreach_norm,
    grad_scaler,
    wait_until_backend_releases,
)
from hf_stability._logging import get_logger
from hf_stability.samples import SampleRecord
from hf_stability.step.guard import StepGuard, StepRecord

logger = get_logger(__name__)


class StepSignals:
    """What the stability callbacks share about the optimizer step being taken: one object per model and run.

    Holds the step's training loss and Trainer's pre-clip gradient norm (and, through its guard, the skip
    decision), each keyed by the step it belongs to (``completing_step(state)`` until the update, then
    ``state.global_step``), so that a value of another step is never mistaken for this one's.

    Who feeds it:

    - `StabilityTrainer` owns one object and registers it for its model while it trains (:meth:`attach` in
      ``train()``, :meth:`detach` after), so that of two trainers built on one model (a second phase) the one
      training is the one the callbacks hear. It feeds the loss Trainer optimises (the return of the
      ``training_step`` Trainer calls, whatever a subclass overrides: also with ``label_smoothing_factor`` or
      ``compute_loss_func``, where the model itself returns no loss) and Trainer's pre-clip gradient norm. The
      step's loss is the sum of ``training_step``'s returns over its micro-batches, the value Trainer logs for
      the step. While that trainer trains (:attr:`trainer_fed`), a missing loss or pre-clip norm means a seam
      broke: :meth:`loss` and :meth:`grad_norm` raise instead of returning ``None``.
    - Under a plain `Trainer` the first :meth:`for_model` creates one fed by a forward hook on the model: the
      mean of the model's own ``output.loss`` over the step's training-mode forwards. Trainer's pre-clip norm is
      out of reach there (:meth:`grad_norm` returns ``None``); a loss the model does not return is reported by
      a one-time warning when a callback asks for it.
    - `StabilityTrainer` also hands over its live engine (:attr:`engine`): under DeepSpeed, spike rollback snapshots
      the engine's ZeRO partitions (a callback Trainer re-creates on resume finds it here too).
    - The step's stability work runs in :attr:`guard` (`hf_stability.step.guard.StepGuard`), which passes one
      `StepRecord` (skip decision included) from stage to stage; :meth:`skip_flag` reads the decision there. The
      run's verdicts on its weights are the guard's (`StepGuard.weights`).

    Lifecycle: the stability callbacks call :meth:`open` in ``on_train_begin`` (the first call of a run resets
    the values and installs the hook) and :meth:`close` in ``on_train_end`` (removes the hook). The registry
    behind :meth:`for_model` is the package's only per-model lookup; it holds models weakly.
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self._model = None if model is None else weakref.ref(model)  # a strong reference would keep its entry alive
        self.trainer_fed = False  # True while StabilityTrainer trains with this object (it then feeds every step)
        # StabilityTrainer's live engine (`model_wrapped`): under DeepSpeed, spike rollback snapshots its partitions.
        self.engine: Callable[[], Any] | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._state: TrainerState | None = None
        self._missing_loss_warned = False
        # The samples of the recent steps (`StabilityTrainer` records them; None under a plain Trainer).
        self.samples: SampleRecord | None = None
        self.guard = StepGuard(self)  # runs the step's stages; the callbacks register them in on_train_begin
        self.reset()

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> StepSignals:
        """The signals of the run training ``model``: the trainer's own, else one fed by a forward hook."""
        signals = _SIGNALS.get(model)
        if signals is None:
            signals = _SIGNALS[model] = cls(model)
        return signals

    def attach(self, model: torch.nn.Module) -> None:
        """Make this trainer-fed object (no forward hook) the one :meth:`for_model` finds for ``model`` until
        :meth:`detach`: a run, not a trainer's construction, decides whose signals the callbacks read."""
        _SIGNALS[model] = self
        self.trainer_fed = True  # a missing loss or pre-clip norm is now a broken seam, not a plain Trainer

    def detach(self, model: torch.nn.Module) -> None:
        """The run is over: a later trainer of ``model`` (a plain `Trainer` too) gets its own signals."""
        self.trainer_fed = False
        if _SIGNALS.get(model) is self:
            del _SIGNALS[model]

    def reset(self) -> None:
        """Forget every value (a new run starts)."""
        self._loss_step: int | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._missing_loss = False
        self._norm_step: int | None = None
        self._norm: torch.Tensor | None = None
        self.guard.reset()

    def open(self, state: TrainerState) -> StepSignals:
        """Start the run of ``state`` (Trainer's `TrainerState`): reset and hook once per run, whoever calls first."""
        if self._state is not state:
            self.reset()
            self._state = state
        model = None if self._model is None else self._model()
        if model is not None and self._handle is None:
            self._handle = model.register_forward_hook(self._hook)
        return self

    def close(self) -> None:
        """End the run: remove the forward hook (values stay readable)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._state = None

    # ---- the step's training loss ----------------------------------------------------------------

    def add_loss(self, step: int, value: torch.Tensor) -> None:
        """Add one micro-batch's loss (detached, on device) to ``step``'s.

        Trainer's ``training_step`` returns a detached 0-d fp32 loss, taken as it is (no op); anything else (the
        forward hook's loss, a half-precision or per-token loss) is detached and reduced to a 0-d fp32 mean.
        """
        if value.requires_grad:
            value = value.detach()
        if value.dtype != torch.float32 or value.dim():
            value = value.float().mean()
        if self._loss_step != step or self._loss_sum is None:
            self._loss_step, self._loss_sum, self._loss_count, self._missing_loss = step, value, 1, False
        else:
            self._loss_sum, self._loss_count = self._loss_sum + value, self._loss_count + 1

    def loss(self, step: int) -> torch.Tensor | None:
        """Training loss of ``step`` (a 0-d device tensor), or ``None`` when no training forward returned one."""
        if self._loss_step != step or self._loss_sum is None:
            if self.trainer_fed:
                raise UpstreamChangedError(
                    f"StabilityTrainer recorded no training loss for step {step}: the `training_step` Trainer "
                    f"called did not return through StabilityTrainer's feed. {SUPPORTED}."
                )
            if self._missing_loss:
                self._warn_missing_loss()
            return None
        return self._loss_sum / self._loss_count if self._model is not None else self._loss_sum

    def _hook(self, module: torch.nn.Module, args: object, output: object) -> None:
        if not module.training or self._state is None:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self.add_loss(completing_step(self._state), loss)
        else:
            self._missing_loss = True

    def _warn_missing_loss(self) -> None:
        if self._missing_loss_warned:
            return
        self._missing_loss_warned = True
        logger.warning(
            "The model returned no loss in training (Trainer pops the labels with `label_smoothing_factor` or "
            "`compute_loss_func`, or a custom `compute_loss` computes it): the stability callbacks' loss checks "
            "(spike_metric='loss', the non-finite loss report) judge nothing under this trainer. Use "
            "StabilityTrainer, which reads the loss Trainer optimises."
        )

    # ---- Trainer's pre-clip gradient norm --------------------------------------------------------

    def record_grad_norm(self, step: int, value: torch.Tensor | float) -> None:
        self._norm_step, self._norm = step, torch.as_tensor(value)

    def grad_norm(self, step: int) -> torch.Tensor | None:
        """The gradient norm of ``step`` before clipping, as Trainer logs it (0-d), or ``None`` if not shared.

        Callbacks run after clipping, so with ``max_grad_norm > 0`` a norm they compute themselves is capped.
        Trainer-fed (`StabilityTrainer`), a missing norm means Trainer did not call the hook: that raises.
        """
        if self._norm_step == step:
            return self._norm
        if self.trainer_fed:
            raise UpstreamChangedError(
                f"StabilityTrainer recorded no pre-clip gradient norm for step {step}: Trainer did not call "
                f"`_get_grad_norm` (or it returned None). {SUPPORTED}."
            )
        return None

    # ---- the step guard ---------------------------------------------------------------------------

    def record(self, args, state: TrainerState, control, model, optimizer=None, lr_scheduler=None,
               step: int | None = None) -> StepRecord:
        """The record of ``step`` (default: the step being taken): the one the guard holds, else a new one."""
        step = completing_step(state) if step is None else step
        current = self.guard.record
        if current is not None and current.step == step:
            return current
        return StepRecord(step, args, state, control, model, optimizer, lr_scheduler, inputs=self)

    def skip_flag(self, step: int) -> torch.Tensor | bool:
        """Whether ``step`` is skipped: a host bool, or the pending 0-d bool device tensor (no host read)."""
        return self.guard.skip_flag(step)

    def skipped(self, step: int) -> bool:
        """Whether ``step`` is skipped, on the host (a pending flag costs one device-to-host read)."""
        return bool(self.skip_flag(step))


_SIGNALS: weakref.WeakKeyDictionary[torch.nn.Module, StepSignals] = weakref.WeakKeyDictionary()


def gradients(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
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
    settle_collective(work)
    return work.to(value.device)


def settle_collective(*tensors: torch.Tensor) -> None:
    """After a collective on CPU tensors (gloo, alone or as a mixed backend's CPU part): wait until gloo's worker
    thread has let go of ``tensors``, so that no collective of ours, the end-of-run check last of all, can abort the
    process at exit (`wait_until_backend_releases`)."""
    if tensors[0].device.type == "cpu" and "gloo" in dist.get_backend():
        wait_until_backend_releases(*tensors)


def active_grad_scaler(optimizer: object) -> torch.amp.GradScaler | None:
    """The enabled grad scaler of an accelerate-wrapped optimizer (fp16), else ``None``."""
    scaler = grad_scaler(optimizer)
    return scaler if scaler is not None and scaler.is_enabled() else None


def completing_step(state: TrainerState) -> int:
    """Number the step being computed will have once done (``global_step`` is incremented after the update)."""
    return state.global_step + 1

