"""Rollback snapshots: a copy of everything an optimizer step changes, kept off the accelerator.

A snapshot holds, for the calling rank only, the model's local `state_dict` tensors, the state of the
optimizer the user passed (moments and step counts; a wrapper's own state through its ``state_dict``), the
LR scheduler state, the grad scaler state and the RNG states (python, numpy, torch CPU, CUDA when present).
Each rank snapshots its own local tensors, so sharded setups (FSDP, ZeRO) snapshot their shards the same
way DDP snapshots full replicas.

Cost: one snapshot of an Adam run is about 3x the fp32 parameter size (weights + two moments); tied
weights are stored once. ``cpu`` storage keeps it in host memory (pinned, copied with
``non_blocking=True`` when the source lives on a CUDA device — the copy is queued on the current stream,
so later kernels cannot overwrite the source before it is read, and a restore is queued after it);
``disk`` storage writes tensors as safetensors and the remaining small, non-tensor state (scheduler,
scaler, python/numpy RNG, the optimizer's structure) with `torch.save`, because safetensors holds only
tensors.

Reading a snapshot back never runs code: the structure holds only plain data (dicts, lists, tuples, numbers,
strings, tensors; a tensor stored in the safetensors file is a ``{"__hf_stability_tensor__": key}`` entry)
and is loaded with ``torch.load(weights_only=True)``. Whoever can write into ``stability_snapshots/`` (a
shared output directory) cannot make a rollback execute a pickle: a file that is not plain data is refused
(`UnsafeSnapshotError`) before anything is restored. State that is not plain data (e.g. a user scheduler
holding a custom object) is refused at the first ``disk`` snapshot, when training begins.

A snapshot is protection, not a result: on ``disk``, a write that fails (full disk, quota, file-size limit)
never aborts training. The partial snapshot is removed with a warning, the older snapshots stay valid, and
training goes on. Free space is checked against the snapshot size at the first write (a warning when fewer
than ``keep + 1`` snapshots fit). :meth:`SnapshotStore.clear` removes the snapshots it wrote and then its
directory and that directory's parent (``stability_snapshots/``) when they are left empty; the same happens
when the store is garbage-collected or the interpreter exits, so a run that raises leaves none behind.
Nothing the store did not write is ever removed.
"""

from __future__ import annotations

import copy
import io
import pickle
import random
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hf_stability._compat import grad_scaler, unwrap_scheduler
from hf_stability._logging import get_logger
from hf_stability.settings import SnapshotStorage
from hf_stability.user_optimizer import user_optimizer

logger = get_logger(__name__, every_rank=True)  # about this rank's own snapshots

_SNAPSHOT_FILES = {"tensors.safetensors", "structure.pt"}
_SLOT_KEY = "__hf_stability_tensor__"  # how a `_TensorSlot` is written to ``structure.pt``


class UnsafeSnapshotError(ValueError):
    """A snapshot file (or the state to write into one) is not plain data: loading it could run code."""


@dataclass(frozen=True)
class _TensorSlot:
    """Placeholder for a tensor inside a nested state structure (the tensor lives in a flat dict)."""

    key: str


@dataclass
class Snapshot:
    """One rank's training state at the end of optimizer step ``step``.

    ``trusted`` turns True once the caller has judged the steps *after* ``step`` healthy: the loss of a step
    is measured before that step's update, so only later losses vouch for the weights saved here (see
    `SpikeRollbackCallback`). ``lr_scale`` is the rollback LR factor in force when it was taken.
    """

    step: int
    lr_scale: float
    trusted: bool = False
    nbytes: int = 0
    tensors: dict[str, torch.Tensor] | None = None
    structure: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a tensor (the shard of a DTensor, the tensor itself otherwise)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's live state tensors by name, each storage once, plus ``alias -> stored name`` for tied ones."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        local = _local(tensor.detach())
        owner = seen.get(id(tensor))
        if owner is None:
            seen[id(tensor)] = name
            unique[name] = local
        else:
            aliases[name] = owner
    return unique, aliases


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list structure by a slot, collecting tensors by key."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = _local(obj.detach())
        return _TensorSlot(prefix)
    if isinstance(obj, dict):
        return {k: split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return _same_sequence(obj, [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)])
    return copy.deepcopy(obj)


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor], clone: bool = False) -> Any:
    """The inverse of `split_tensors`: each slot replaced by its tensor (a copy with ``clone``)."""
    if isinstance(obj, _TensorSlot):
        return tensors[obj.key].clone() if clone else tensors[obj.key]
    if isinstance(obj, dict):
        return {k: join_tensors(v, tensors, clone) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return _same_sequence(obj, [join_tensors(v, tensors, clone) for v in obj])
    return copy.deepcopy(obj)


def _same_sequence(original: list | tuple, items: list) -> list | tuple:
    """``items`` in a sequence of ``original``'s type (a named tuple takes them as positional arguments)."""
    return type(original)(*items) if hasattr(original, "_fields") else type(original)(items)


def _host_copy(source: dict[str, torch.Tensor], reuse: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Copy tensors to host memory, into ``reuse``'s buffers where name, shape and dtype match."""
    copies = {}
    for key, tensor in source.items():
        buffer = None if reuse is None else reuse.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = tensor.device.type == "cuda"
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        buffer.copy_(tensor, non_blocking=tensor.device.type == "cuda")
        copies[key] = buffer
    return copies


def _plain(obj: Any) -> Any:
    """``obj`` with each `_TensorSlot` as a one-key dict: a structure `torch.load(weights_only=True)` reads."""
    if isinstance(obj, _TensorSlot):
        return {_SLOT_KEY: obj.key}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if obj.keys() == {_SLOT_KEY}:
            return _TensorSlot(obj[_SLOT_KEY])
        return {k: _from_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_plain(v) for v in obj)
    return obj


def _unpickler_reason(error: BaseException) -> str:
    """The one line of torch's ``weights_only`` refusal that says what was refused (it also suggests unsafe loads)."""
    text = " ".join(str(error).split())
    reason = text.partition("WeightsUnpickler error:")[2] or text
    return reason.split(" Please use")[0].split(" Check the documentation")[0].strip()


def _plain_bytes(structure: dict[str, Any]) -> bytes:
    """``structure`` serialised as plain data, checked to load with ``weights_only=True`` (`UnsafeSnapshotError`)."""
    buffer = io.BytesIO()
    torch.save(_plain(structure), buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeSnapshotError(
            "The training state holds a value that is not plain data (dicts, lists, numbers, strings, tensors), so "
            f"a disk snapshot could not be read back safely ({_unpickler_reason(error)}). Use snapshot_storage='cpu'."
        ) from None
    return data


def _load_structure(path: Path) -> dict[str, Any]:
    """Read ``structure.pt`` as plain data only; a file that would run code or is damaged is refused."""
    try:
        return _from_plain(torch.load(path, weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise UnsafeSnapshotError(
            f"{path}: refusing to load this rollback snapshot: it is not plain data written by hf-stability (replaced "
            f"or damaged; loading it could run code): {_unpickler_reason(error)}"
        ) from None


def rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    numpy_state = (kind, np.asarray(keys).tolist(), position, has_gauss, cached)  # plain ints, no numpy object
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _capture(model: torch.nn.Module, optimizer: Any, scheduler: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Live tensors (not yet copied) and the small non-tensor structure of the training state."""
    tensors, aliases = _model_tensors(model)
    tensors = {f"model.{name}": t for name, t in tensors.items()}
    # Tensors anywhere in the optimizer's or scheduler's state (a tensor LR in a param group, Adafactor's RMS-scaled
    # LR that AdafactorSchedule writes there, tensor base_lrs) go with the other tensors, so they come back as
    # tensors, bit for bit, from host memory and from disk alike.
    optimizer_structure = split_tensors(user_optimizer(optimizer).state_dict(), "optimizer", tensors)
    scaler = grad_scaler(optimizer)
    structure = {
        "model_aliases": aliases,
        "optimizer": optimizer_structure,
        "scheduler": None if scheduler is None else split_tensors(
            unwrap_scheduler(scheduler).state_dict(), "scheduler", tensors
        ),
        "scaler": None if scaler is None else copy.deepcopy(scaler.state_dict()),
        "rng": rng_state(),
    }
    return tensors, structure


def _restore_optimizer(optimizer: torch.optim.Optimizer, structure: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the saved state into the live optimizer state in place when the layout matches, else reload it.

    In-place copies keep the optimizer's own tensors (no reallocation, and any reference a fused kernel or
    wrapper holds stays valid); a layout change (e.g. a snapshot taken before Adam's lazy state existed), or an
    optimizer with its own ``state_dict`` format (a Lookahead-style wrapper), goes through ``load_state_dict``
    with cloned tensors so the snapshot is never aliased by live state.
    """
    torch_format = all(
        getattr(type(optimizer), name, None) is getattr(torch.optim.Optimizer, name)
        for name in ("state_dict", "load_state_dict")
    )
    live_tensors: dict[str, torch.Tensor] = {}
    live_structure = split_tensors(optimizer.state_dict(), "optimizer", live_tensors)
    same_layout = live_tensors.keys() == {k for k in tensors if k.startswith("optimizer.")} and all(
        live_tensors[k].shape == tensors[k].shape and live_tensors[k].dtype == tensors[k].dtype for k in live_tensors
    )
    if not (torch_format and same_layout and live_structure["state"].keys() == structure["state"].keys()):
        optimizer.load_state_dict(join_tensors(structure, tensors, clone=True))
        return
    for key, live in live_tensors.items():
        live.copy_(tensors[key], non_blocking=True)
    # Non-tensor state (Adafactor's `step` is a Python int) lives outside the tensors copied above.
    parameters = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's index order
    for index, saved in structure["state"].items():
        live_state = optimizer.state[parameters[index]]
        live_state.update({k: copy.deepcopy(v) for k, v in saved.items() if not isinstance(v, _TensorSlot)})
    # Tensors in param groups (a tensor `lr`) were copied in place above, as torch's schedulers update them.
    for group, saved in zip(optimizer.param_groups, structure["param_groups"], strict=True):
        group.update({k: join_tensors(v, tensors, clone=True) for k, v in saved.items() if k != "params"
                      and not isinstance(v, _TensorSlot)})


def _disk_path(snapshot: Snapshot) -> Path:
    """The directory of a ``disk`` snapshot (a ``cpu`` snapshot holds its tensors instead)."""
    if snapshot.path is None:
        raise ValueError(f"`snapshot` of step {snapshot.step} holds neither its tensors nor a path to them")
    return snapshot.path


def snapshot_contents(snapshot: Snapshot) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the structure of ``snapshot``, from host memory or read back from disk (plain data only)."""
    tensors = snapshot.tensors
    if tensors is None:
        tensors = load_file(_disk_path(snapshot) / "tensors.safetensors")
    return tensors, snapshot.structure or _load_structure(_disk_path(snapshot) / "structure.pt")


def restore_training_state(snapshot: Snapshot, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Put ``snapshot`` back into the live model, optimizer, scheduler, grad scaler and RNGs of this rank."""
    tensors, structure = snapshot_contents(snapshot)
    live, _ = _model_tensors(model)
    missing = live.keys() - {k[len("model.") :] for k in tensors if k.startswith("model.")}
    if missing:
        raise ValueError(f"`model` does not match the snapshot of step {snapshot.step}: missing {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, tensor in live.items():
            tensor.copy_(tensors[f"model.{name}"], non_blocking=True)
        _restore_optimizer(user_optimizer(optimizer), structure["optimizer"], tensors)
    if scheduler is not None and structure["scheduler"] is not None:
        unwrap_scheduler(scheduler).load_state_dict(join_tensors(structure["scheduler"], tensors, clone=True))
    scaler = grad_scaler(optimizer)
    if scaler is not None and structure["scaler"]:
        scaler.load_state_dict(copy.deepcopy(structure["scaler"]))
    set_rng_state(structure["rng"])


class SnapshotStore:
    """Keeps this rank's rollback snapshots: at most ``keep`` trusted ones plus the untrusted newer ones.

    Args:
        keep: trusted snapshots to keep; the oldest is dropped (its host buffers reused) when a newer one
            becomes trusted.
        storage: ``"cpu"`` (host memory) or ``"disk"`` (``directory``, one sub-directory per snapshot).
        directory: where ``disk`` snapshots go; required for ``disk``.
    """

    def __init__(self, keep: int, storage: str = "cpu", directory: str | Path | None = None) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"`keep` must be an int >= 1, got {keep!r}.")
        storage = SnapshotStorage.checked("storage", storage)
        if storage == SnapshotStorage.DISK and directory is None:
            raise ValueError("`directory` is required when `storage` is 'disk'.")
        self.keep = keep
        self.storage = storage
        self.directory = None if directory is None else Path(directory)
        self.snapshots: list[Snapshot] = []
        self._spare: dict[str, torch.Tensor] | None = None
        # Snapshot directories this store wrote and not yet removed, shared with its finalizer.
        self._written: set[Path] = set()
        self._finalizer: weakref.finalize | None = None

    def capture(
        self, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any, lr_scale: float, trusted: bool
    ) -> Snapshot | None:
        """Snapshot the live state at the end of ``step`` (replacing an older snapshot of the same step).

        Returns ``None`` when a ``disk`` snapshot could not be written (warned; the other snapshots stay).
        """
        for stale in [s for s in self.snapshots if s.step == step]:
            self._drop(stale)
        live, structure = self.live_state(model, optimizer, scheduler)
        snapshot = Snapshot(step=step, lr_scale=lr_scale, trusted=trusted)
        snapshot.nbytes = sum(t.numel() * t.element_size() for t in live.values())
        if self.storage == "cpu":
            snapshot.tensors, self._spare = _host_copy(live, self._spare), None
            snapshot.structure = structure
        elif not self._write(snapshot, live, structure):
            return None
        self.snapshots.append(snapshot)
        if trusted:
            self._evict()
        return snapshot

    def live_state(
        self, model: torch.nn.Module, optimizer: Any, scheduler: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The live tensors (not yet copied) and the plain structure a snapshot holds: the seam an engine that keeps
        its state elsewhere overrides with :meth:`restore` (`hf_stability.deepspeed.DeepSpeedSnapshotStore`)."""
        return _capture(model, optimizer, scheduler)

    def restore(self, snapshot: Snapshot, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
        """Put ``snapshot`` back into the live training state of this rank (`restore_training_state`)."""
        restore_training_state(snapshot, model, optimizer, scheduler)

    def _write(self, snapshot: Snapshot, live: dict[str, torch.Tensor], structure: dict[str, Any]) -> bool:
        """Write a ``disk`` snapshot; on failure remove what was written, warn, and return False."""
        directory = self.directory
        assert directory is not None  # `__init__` requires one for disk storage
        if self._finalizer is None:
            self._remove_stale(directory)
            self._check_free_space(directory, snapshot.nbytes)
            self._finalizer = weakref.finalize(self, _remove_written, self._written, directory)
        snapshot.path = path = directory / f"step-{snapshot.step}"
        plain = _plain_bytes(structure)  # not plain data: refused here, before any file is written
        try:
            path.mkdir(parents=True)
            self._written.add(path)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            # safetensors refuses views into shared or non-contiguous storage, so hand it compact copies.
            save_file({k: t.detach().to("cpu").contiguous().clone() for k, t in live.items()},
                      str(path / "tensors.safetensors"))
            (path / "structure.pt").write_bytes(plain)
        except (OSError, SafetensorError) as error:
            if path in self._written:
                self._written.discard(path)
                shutil.rmtree(path, ignore_errors=True)
            logger.warning(
                "Could not write the rollback snapshot of step %d to %s (%s): removed it and training goes on; "
                "snapshots kept: steps %s. Free disk space, or use snapshot_storage='cpu'.",
                snapshot.step, snapshot.path, " ".join(str(error).split()), [s.step for s in self.snapshots],
            )
            return False
        return True

    def _remove_stale(self, directory: Path) -> None:
        """Remove snapshots a killed process left in this directory: they cannot be resumed from, only fill the disk."""
        if not directory.is_dir():
            return
        for path in directory.glob("step-*"):
            if path.is_dir() and {p.name for p in path.iterdir()} <= _SNAPSHOT_FILES:
                shutil.rmtree(path, ignore_errors=True)

    def _check_free_space(self, directory: Path, nbytes: int) -> None:
        """Warn when the disk cannot hold the snapshots this store keeps at once (``keep`` + one unconfirmed)."""
        probe = directory
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < (self.keep + 1) * nbytes:
            logger.warning(
                "%s has %.1f MB free but %d rollback snapshots of %.1f MB each may be kept there: snapshot writes "
                "may fail (training goes on without them). Free space or use snapshot_storage='cpu'.",
                directory, free / 2**20, self.keep + 1, nbytes / 2**20,
            )

    def trust_through(self, step: int) -> None:
        """Mark snapshots taken before ``step`` trusted (the caller vouches for the steps that followed them)."""
        changed = False
        for snapshot in self.snapshots:
            if not snapshot.trusted and snapshot.step < step:
                snapshot.trusted = changed = True
        if changed:
            self._evict()

    def newest_trusted(self) -> Snapshot | None:
        trusted = [s for s in self.snapshots if s.trusted]
        return trusted[-1] if trusted else None

    def discard_untrusted(self) -> None:
        """Drop snapshots no healthy step has vouched for (they may hold the update that caused a spike)."""
        for snapshot in [s for s in self.snapshots if not s.trusted]:
            self._drop(snapshot)

    def clear(self) -> None:
        """Drop every snapshot; on ``disk``, remove what the store wrote and its emptied directories."""
        for snapshot in list(self.snapshots):
            self._drop(snapshot)
        self._spare = None
        if self.directory is not None:
            _remove_written(self._written, self.directory)

    def _evict(self) -> None:
        trusted = [s for s in self.snapshots if s.trusted]
        for snapshot in trusted[: max(0, len(trusted) - self.keep)]:
            self._drop(snapshot)

    def _drop(self, snapshot: Snapshot) -> None:
        self.snapshots.remove(snapshot)
        if snapshot.tensors is not None:
            self._spare = snapshot.tensors  # pinned host buffers are slow to allocate; the next capture reuses them
        if snapshot.path is not None and snapshot.path in self._written:
            self._written.discard(snapshot.path)
            shutil.rmtree(snapshot.path, ignore_errors=True)


def _remove_written(written: set[Path], directory: Path) -> None:
    """Remove the snapshot directories in ``written``, then ``directory`` and its parent if left empty."""
    for path in list(written):
        shutil.rmtree(path, ignore_errors=True)
        written.discard(path)
    for empty in (directory, directory.parent):
        try:
            empty.rmdir()  # only ever removes an empty directory
        except OSError:  # not empty (another rank's snapshots, other files) or already gone
            return
