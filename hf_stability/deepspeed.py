"""What DeepSpeed itself does with a non-finite step, read from the run's DeepSpeed config.

Measured in ``tests/integration/test_engines.py`` (DeepSpeed 0.19.8, CPU accelerator, 2 processes, NaN loss on one
rank):
ZeRO-1/2/3 in fp32 and in bf16 with ``bf16.check_grad_overflow`` on (its default) skip the step on every rank,
bit for bit; bf16 with that check off applies the NaN step and counts nothing. Everything else is not measured:
fp16 (the CPU accelerator cannot run it), ZeRO stage 0, optimizer offload, and the `BF16_Optimizer` path (bf16
+ ZeRO-1 + fp32 gradient accumulation, DeepSpeed's ``engine._do_optimizer_sanity_check``). hf-stability's
refusal under DeepSpeed says which case a run is in, naming the setting.
"""

from __future__ import annotations

from typing import Any

from hf_stability._compat import accelerate_shared_states


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
