"""The ``stability/`` metric names: the one vocabulary the callbacks log and the report, batch ramp and card read.

Every key a training log entry gets from hf-stability is named here, so a writer and its readers cannot drift
apart (a renamed key would otherwise leave the report plotting nothing, silently).
"""

from __future__ import annotations

PREFIX = "stability/"

# Skip (`SkipNonFiniteCallback`, logged by the telemetry callback).
SKIPPED_STEPS = f"{PREFIX}skipped_steps"
NONFINITE_LOSS_STEPS = f"{PREFIX}nonfinite_loss_steps"
UNDERFLOW_STEPS = f"{PREFIX}underflow_steps"
# Spike rollback: the cumulative count.
ROLLBACKS = f"{PREFIX}rollbacks"
# Telemetry: the grad scaler's loss scale, fp16 pressure, per-parameter gradient norms.
LOSS_SCALE = f"{PREFIX}loss_scale"
FP16_UNDERFLOW_FRACTION = f"{PREFIX}fp16_underflow_fraction"
FP16_HEADROOM_LOG2 = f"{PREFIX}fp16_headroom_log2"
LAYER_GRAD_NORM_PREFIX = f"{PREFIX}grad_norm/"
# Adaptive clipping (ZClip).
ZCLIP_BOUND = f"{PREFIX}zclip_bound"
ZCLIP_CLIPPED_STEPS = f"{PREFIX}zclip_clipped_steps"
# Batch ramp.
GLOBAL_BATCH_SIZE = f"{PREFIX}global_batch_size"
CONSUMED_SAMPLES = f"{PREFIX}consumed_samples"


def layer_grad_norm(parameter_name: str) -> str:
    """The key of one parameter tensor's gradient norm (``log_layer_grad_norms``)."""
    return f"{LAYER_GRAD_NORM_PREFIX}{parameter_name}"
