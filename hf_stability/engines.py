"""Which distributed engine drives training, and refusing the one the stability callbacks cannot protect.

Under DeepSpeed, accelerate 1.15's ``DeepSpeedEngineWrapper.backward`` runs ``engine.backward(loss)`` and, at
the accumulation boundary, ``engine.step()``. By ``on_pre_optimizer_step`` the update is applied, so dropping
the gradients skips nothing; the fp32 master weights and (ZeRO-partitioned) optimizer state live in the engine,
out of reach of rollback snapshots; and gradients live in the engine's buffers, with DeepSpeed's own loss scaler,
so telemetry would measure nothing. Each protection would be silently inactive, so training refuses to start.
DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) are supported.
"""

from __future__ import annotations

from collections.abc import Iterable

from accelerate.utils import DistributedType

from hf_stability._compat import accelerate_shared_states

ALTERNATIVE = "use FSDP2 (recipes/accelerate_configs/fsdp.yaml) or DDP (multi_gpu.yaml)"


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


def refuse_for_callback(callback: object, args: object) -> None:
    """Called by each stability callback in ``on_train_begin``: a plain `Trainer` under DeepSpeed stops here."""
    refuse_unsupported_engine([type(callback).__name__], deepspeed_enabled(args))


def refuse_unsupported_engine(protections: Iterable[str], deepspeed: bool) -> None:
    """Raise `UnsupportedEngineError` (one line) naming ``protections`` when ``deepspeed`` is True."""
    names = list(protections)
    if deepspeed and names:
        raise UnsupportedEngineError(
            f"`deepspeed`: hf-stability's {', '.join(names)} cannot work under DeepSpeed (accelerate runs "
            f"engine.step() inside backward, before any callback can act) and would be silently inactive; "
            f"{ALTERNATIVE}."
        )
