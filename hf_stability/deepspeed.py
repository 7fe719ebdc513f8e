"""DeepSpeed: what the engine itself does with a non-finite step (read from the run's DeepSpeed config), and spike
rollback's snapshots of the engine's own ZeRO partitions (`DeepSpeedSnapshotStore`, where `rollback_refusal` finds
the configuration proven).

Measured in ``tests/integration/test_engines.py`` (DeepSpeed 0.19.8, CPU accelerator, 2 processes, NaN loss on one
rank):
ZeRO-1/2/3 in fp32 and in bf16 with ``bf16.check_grad_overflow`` on (its default) skip the step on every rank,
bit for bit; bf16 with that check off applies the NaN step and counts nothing. Everything else is not measured:
fp16 (the CPU accelerator cannot run it), ZeRO stage 0, optimizer offload, and the `BF16_Optimizer` path (bf16
+ ZeRO-1 + fp32 gradient accumulation, DeepSpeed's ``engine._do_optimizer_sanity_check``). hf-stability's
refusal under DeepSpeed says which case a run is in, naming the setting.

The snapshots read DeepSpeed 0.19's ZeRO optimizer attributes (the fp32 partitions, the inner optimizer's state
keyed by them, ``update_lp_params``, ZeRO-3's flat bit16 partitions and persistent parameters): they are public
attributes but no documented API, so `tests/integration/test_engines.py` proves the restore per stage and precision.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hf_stability._compat import accelerate_shared_states, unwrap_scheduler
from hf_stability.snapshots import (
    Snapshot,
    SnapshotStore,
    join_tensors,
    rng_state,
    set_rng_state,
    snapshot_contents,
    split_tensors,
)


def active_deepspeed_config(args: object = None) -> dict[str, Any] | None:
    """The DeepSpeed config dict of this run: Trainer's (``args.deepspeed``) or the active accelerate plugin's."""
    trainer_config = getattr(args, "hf_deepspeed_config", None)
    if trainer_config is not None:
        return trainer_config.config
    plugins = accelerate_shared_states()[0].get("deepspeed_plugins")
    if isinstance(plugins, dict):
        plugins = next((plugin for plugin in plugins.values() if getattr(plugin, "selected", False)), None)
    return getattr(plugins, "deepspeed_config", None)


def _enabled(section: Any, fallback: bool) -> bool:
    """A precision section's ``enabled`` (``"auto"`` and a missing value follow Trainer's ``--fp16/--bf16``)."""
    value = section.get("enabled", False) if isinstance(section, dict) else False
    return fallback if value == "auto" else bool(value)


def overflow_skip(config: dict[str, Any], args: object = None) -> str:
    """One clause saying whether DeepSpeed skips a non-finite step under ``config``, naming the deciding setting."""
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    bf16_section = config.get("bf16", config.get("bfloat16"))
    bf16 = _enabled(bf16_section, bool(getattr(args, "bf16", False)))
    fp16 = _enabled(config.get("fp16"), bool(getattr(args, "fp16", False)))
    grad_accum = (config.get("data_types") or {}).get("grad_accum_dtype")
    if bf16 and isinstance(bf16_section, dict) and bf16_section.get("check_grad_overflow") is False:
        return "DeepSpeed will NOT skip a non-finite step here (`bf16.check_grad_overflow: false`)"
    unmeasured = None
    if fp16:
        unmeasured = "`fp16`"
    elif stage not in (1, 2, 3):
        unmeasured = f"`zero_optimization.stage: {stage}`"
    elif zero.get("offload_optimizer") or zero.get("offload_param"):
        unmeasured = "ZeRO offload (`offload_optimizer`/`offload_param`)"
    elif bf16 and stage == 1 and grad_accum in ("fp32", "float32"):
        unmeasured = "the BF16_Optimizer path (bf16 + ZeRO-1 + `data_types.grad_accum_dtype: fp32`)"
    if unmeasured is not None:
        return f"whether DeepSpeed skips a non-finite step with {unmeasured} is not measured"
    precision = "bf16 with `check_grad_overflow`" if bf16 else "fp32"
    return f"DeepSpeed's own overflow skip (ZeRO-{stage}, {precision}) is measured bit-exact but not yet reported"


def rollback_refusal(config: dict[str, Any], args: object = None) -> str | None:
    """Why spike rollback is not proven under ``config`` (one clause naming the setting), or None where it is.

    Proven (tests/integration/test_engines.py): ZeRO-1/2/3, fp32 and bf16, snapshots in host memory and on disk, no
    offload.
    """
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    bf16_section = config.get("bf16", config.get("bfloat16"))
    bf16 = _enabled(bf16_section, bool(getattr(args, "bf16", False)))
    if _enabled(config.get("fp16"), bool(getattr(args, "fp16", False))):
        return "`fp16` (its loss scaler is snapshotted, but fp16 cannot run on the CPU accelerator the proof runs on)"
    if stage not in (1, 2, 3):
        return f"`zero_optimization.stage: {stage}`"
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        return "ZeRO offload (`offload_optimizer`/`offload_param`)"
    if bf16 and stage == 1 and (config.get("data_types") or {}).get("grad_accum_dtype") in ("fp32", "float32"):
        return "the BF16_Optimizer path (bf16 + ZeRO-1 + `data_types.grad_accum_dtype: fp32`)"
    return None


def _fp32_partitions(zero: Any) -> list[torch.Tensor]:
    """This rank's fp32 master partitions, the tensors the inner optimizer steps (one per parameter group).

    ZeRO-1/2 keep them in ``single_partition_of_fp32_groups``; ZeRO-3 in ``fp32_partitioned_groups_flat``, which it
    puts into the inner optimizer's param groups only around its step (DeepSpeed 0.19 ``stage3._optimizer_step``).
    """
    flat = getattr(zero, "fp32_partitioned_groups_flat", None)
    return list(flat if flat is not None else zero.single_partition_of_fp32_groups)


def _refresh_bit16(zero: Any) -> None:
    """Recompute the model's bit16 weights from the restored fp32 masters, as the end of ``zero.step()`` does.

    ZeRO-1/2: ``update_lp_params`` (copy into this rank's bit16 partition, all-gather the full weights). ZeRO-3,
    as its ``step`` does: release every gathered parameter (``partition_all_parameters``), copy into the flat bit16
    partition the parameters' ``ds_tensor`` views, then gather the persistent (small, always whole) parameters again.
    """
    if not hasattr(zero, "fp32_partitioned_groups_flat"):
        zero.update_lp_params()
        return
    zero.parameter_offload.partition_all_parameters()
    with torch.no_grad():
        for bit16, fp32 in zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat, strict=True):
            bit16.copy_(fp32)
    persistent = zero.persistent_parameters
    if persistent:
        persistent[0].all_gather(persistent)


ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
_SCALER_FIELDS = (int, float, bool, type(None))


class DeepSpeedSnapshotStore(SnapshotStore):
    """`SnapshotStore` of a DeepSpeed ZeRO engine: each rank keeps its own partitions, restored bit for bit.

    A snapshot holds this rank's fp32 master partitions, the inner optimizer's state for them (Adam moments and
    step) and its param-group hyperparameters (the LR a rollback cuts), the engine's counters (``ENGINE_COUNTERS``),
    its loss scaler's scalar state, the LR schedulers (Trainer's and the engine's own), the model's buffers and the
    RNG states. The bit16 weights are not stored: a restore recomputes them from the restored masters
    (`_refresh_bit16`, one all-gather), which is how DeepSpeed itself produced them. ``engine`` is called at each
    capture and restore for the live `DeepSpeedEngine` (`StabilityTrainer` hands its ``model_wrapped``).
    """

    def __init__(self, engine: Callable[[], Any], keep: int, storage: str = "cpu",
                 directory: str | Path | None = None) -> None:
        super().__init__(keep, storage, directory)
        self._engine = engine

    def live_state(self, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> tuple[dict[str, Any], dict]:
        engine = self._engine()
        zero = engine.optimizer
        inner = zero.optimizer
        tensors: dict[str, torch.Tensor] = {
            f"master.{index}": master.detach() for index, master in enumerate(_fp32_partitions(zero))
        }
        tensors.update({f"buffer.{name}": buffer.detach() for name, buffer in model.named_buffers()})
        optimizer_state = {
            "state": [dict(inner.state.get(master, {})) for master in _fp32_partitions(zero)],
            "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups],
        }
        scaler = getattr(zero, "loss_scaler", None)
        structure = {
            "optimizer": split_tensors(optimizer_state, "optimizer", tensors),
            "schedulers": [split_tensors(item.state_dict(), f"scheduler.{index}", tensors)
                           for index, item in enumerate(_schedulers(engine, scheduler))],
            "counters": {name: getattr(engine, name) for name in ENGINE_COUNTERS},
            "loss_scaler": {} if scaler is None else {
                name: value for name, value in vars(scaler).items() if isinstance(value, _SCALER_FIELDS)
            },
            "rng": rng_state(),
        }
        return tensors, structure

    def restore(self, snapshot: Snapshot, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
        engine = self._engine()
        zero = engine.optimizer
        inner = zero.optimizer
        tensors, structure = snapshot_contents(snapshot)
        saved = join_tensors(structure["optimizer"], tensors)
        masters = _fp32_partitions(zero)
        with torch.no_grad():
            for index, master in enumerate(masters):
                master.copy_(tensors[f"master.{index}"])
            for name, buffer in model.named_buffers():
                buffer.copy_(tensors[f"buffer.{name}"])
            for master, state in zip(masters, saved["state"], strict=True):
                live = inner.state.get(master, {})
                if live.keys() == state.keys() and all(
                    not isinstance(v, torch.Tensor) or (isinstance(live[k], torch.Tensor) and live[k].shape == v.shape)
                    for k, v in state.items()
                ):
                    for key, value in state.items():
                        if isinstance(value, torch.Tensor):
                            live[key].copy_(value)
                        else:
                            live[key] = value
                elif state:
                    inner.state[master] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
                else:  # the snapshot precedes the optimizer's first step: its state is created lazily again
                    inner.state.pop(master, None)
            for group, hyper in zip(inner.param_groups, saved["param_groups"], strict=True):
                for key, value in hyper.items():
                    if isinstance(value, torch.Tensor) and isinstance(group.get(key), torch.Tensor):
                        group[key].copy_(value)
                    else:
                        group[key] = value.clone() if isinstance(value, torch.Tensor) else value
            _refresh_bit16(zero)
        for item, state_dict in zip(_schedulers(engine, scheduler), structure["schedulers"], strict=True):
            item.load_state_dict(join_tensors(state_dict, tensors))
        for name, value in structure["counters"].items():
            setattr(engine, name, value)
        scaler = getattr(zero, "loss_scaler", None)
        if scaler is not None:
            vars(scaler).update(structure["loss_scaler"])
        set_rng_state(structure["rng"])


def _schedulers(engine: Any, scheduler: Any) -> list[Any]:
    """The LR schedulers a snapshot holds: Trainer's and the engine's own, each once (often the same object)."""
    found: list[Any] = []
    for item in (unwrap_scheduler(scheduler) if scheduler is not None else None, engine.lr_scheduler):
        if item is not None and all(item is not other for other in found):
            found.append(item)
    return found
