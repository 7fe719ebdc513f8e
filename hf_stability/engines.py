"""Which distributed engine drives training, and refusing the ones the stability callbacks cannot protect.

Under DeepSpeed, accelerate 1.15's ``DeepSpeedEngineWrapper.backward`` runs ``engine.backward(loss)`` and, at
the accumulation boundary, ``engine.step()``. By ``on_pre_optimizer_step`` the update is applied, so dropping
the gradients skips nothing (DeepSpeed's own overflow skip is reported instead: `DeepSpeedSkipTelemetryCallback`)
and gradients live in the engine's buffers, with DeepSpeed's own loss scaler, so the gradient telemetry and
adaptive clipping would measure nothing. Spike rollback works there: it judges the loss after the step and
snapshots the engine's own ZeRO partitions (`hf_stability.deepspeed.DeepSpeedSnapshotStore`), where
`hf_stability.deepspeed.rollback_refusal` finds that proven.

FSDP version 1 (accelerate's default ``fsdp_version: 1``) flattens each wrapped module's parameters into one
`FlatParameter` shard per rank: per-tensor norms, snapshots and the skip's gradient check were written for
FSDP2's per-parameter DTensors and have not been proven on flat shards.

Tensor parallelism (transformers' ``tp_plan`` / accelerate's ``ParallelismConfig(tp_size>1)``) splits single
weights across a TP group: the skip flag and norms are reduced over the data-parallel world only and snapshots
would hold one TP shard, unproven. Each of these refuses to start rather than stay silently inactive or wrong.
DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) are supported.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from accelerate.utils import DistributedType

from hf_stability._compat import accelerate_shared_states
from hf_stability.deepspeed import active_deepspeed_config, overflow_skip, rollback_refusal

ALTERNATIVE = "use FSDP2 (recipes/accelerate_configs/fsdp.yaml) or DDP (multi_gpu.yaml)"
# The protection that runs under DeepSpeed where `rollback_refusal` finds the configuration proven.
DEEPSPEED_ROLLBACK = "SpikeRollbackCallback"


class UnsupportedEngineError(ValueError):
    """Training was launched under an engine with which a requested protection would be silently inactive."""


def deepspeed_enabled(args: object = None) -> bool:
    """Whether training runs under DeepSpeed, from ``args.deepspeed`` or accelerate's shared state.

    Reads accelerate's state without creating it (``AcceleratorState()`` would initialise one as a side effect).
    """
    if getattr(args, "deepspeed", None):
        return True
    for shared in accelerate_shared_states():
        if shared.get("distributed_type") == DistributedType.DEEPSPEED or shared.get("deepspeed_plugin") is not None:
            return True
    return False


def fsdp1_enabled() -> bool:
    """Whether accelerate drives FSDP version 1 (what `Accelerator.is_fsdp2` is False for under FSDP).

    From accelerate's shared state, as `AcceleratorState.is_fsdp2` reads it, without creating one.
    """
    shared = accelerate_shared_states()[0]
    plugin = shared.get("fsdp_plugin")
    return shared.get("distributed_type") == DistributedType.FSDP and getattr(plugin, "fsdp_version", 1) != 2


def tensor_parallel_size(args: object = None, model: Any = None) -> int:
    """The tensor-parallel degree of this run (1 without TP), from every place transformers 5 / accelerate keep it.

    ``args.parallelism_config`` and accelerate's state (`ParallelismConfig.tp_size`, where Trainer also copies a
    TP-loaded model's size) and the model's own ``tp_size`` (set by ``from_pretrained(tp_plan=...)``).
    """
    configs = [getattr(args, "parallelism_config", None), accelerate_shared_states()[0].get("parallelism_config")]
    sizes = [getattr(config, "tp_size", None) for config in configs]
    sizes.append(getattr(model, "tp_size", None))
    return max(int(size or 1) for size in sizes)


def engine_refusal(args: object = None, model: Any = None) -> str | None:
    """Why the stability protections cannot run under this run's engine (the message's start), or None."""
    if deepspeed_enabled(args):
        config = active_deepspeed_config(args)
        engine_skip = "" if config is None else f"; {overflow_skip(config, args)}"
        return (
            "`deepspeed`: {names} cannot work under DeepSpeed (accelerate runs engine.step() inside backward, "
            f"before any callback can act) and would be silently inactive{engine_skip}; {ALTERNATIVE}, or, with "
            f"StabilityTrainer, adaptive_clip=False (DeepSpeed's own skips are then reported)"
        )
    if fsdp1_enabled():
        return (
            "`fsdp_version: 1`: {names} cannot run on FSDP version 1's flat parameters (accelerate's default; not "
            "proven there); "
            "set `fsdp_version: 2` in the accelerate config (recipes/accelerate_configs/fsdp.yaml) or "
            "`fsdp_config={{'version': 2}}`"
        )
    tp_size = tensor_parallel_size(args, model)
    if tp_size > 1:
        return (
            f"`tp_size={tp_size}`: {{names}} cannot run under tensor parallelism (not proven: skip flags and "
            f"norms are reduced over the data-parallel ranks, snapshots would hold one TP shard); train without "
            f"`tp_plan`/`tp_size`, e.g. with FSDP2"
        )
    return None


def refuse_for_callback(callback: object, args: object, model: Any = None) -> None:
    """Called by each stability callback in ``on_train_begin``: a plain `Trainer` under such an engine stops here."""
    refuse_protections([type(callback).__name__], args, model)


def refuse_protections(protections: Iterable[str], args: object, model: Any = None) -> None:
    """Raise `UnsupportedEngineError` (one line) for the ``protections`` this run's engine cannot honour.

    Under DeepSpeed, spike rollback is judged on its own (`rollback_refusal`): where it is proven it runs while
    the others are refused, and where it is not, it alone is refused, naming the setting.
    """
    names = list(protections)
    if deepspeed_enabled(args) and DEEPSPEED_ROLLBACK in names:
        names.remove(DEEPSPEED_ROLLBACK)
        refuse_unsupported_engine(names, engine_refusal(args, model))
        config = active_deepspeed_config(args)
        why = "no DeepSpeed config was found" if config is None else rollback_refusal(config, args)
        if why is not None:
            raise UnsupportedEngineError(
                f"`deepspeed`: hf-stability's {DEEPSPEED_ROLLBACK} is not proven under {why}; set "
                "spike_rollback=False (DeepSpeed's own skips are still reported) or use ZeRO-1/2/3 in fp32/bf16 "
                "without offload."
            )
        return
    refuse_unsupported_engine(names, engine_refusal(args, model))


def refuse_unsupported_engine(protections: Iterable[str], refusal: str | None) -> None:
    """Raise `UnsupportedEngineError` (one line) naming ``protections`` when ``refusal`` (`engine_refusal`) is set."""
    names = list(protections)
    if refusal is not None and names:
        raise UnsupportedEngineError(refusal.format(names=f"hf-stability's {', '.join(names)}") + ".")
