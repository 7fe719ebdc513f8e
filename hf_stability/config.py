"""`StabilityConfig`: `TrainingArguments` plus the knobs of skipping, rollback and telemetry.

Each knob is a setting of one component (`hf_stability.settings`), which owns its default, help and
check under the same flat name (``--spike_window``). A value is checked once, when it is set (`__setattr__`:
at creation and on a later assignment); ``__post_init__`` checks the relations between knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from hf_stability.settings import (
    AdaptiveClipSettings,
    AlertSettings,
    BatchRampSettings,
    ComponentSettings,
    ExcludeSettings,
    RollbackSettings,
    SkipSettings,
    TelemetrySettings,
    check_knob,
    checked_number,
    setting,
)

__all__ = ["COMPONENT_SETTINGS", "StabilityConfig", "checked_number"]

# The settings classes whose every field is a `StabilityConfig` field of the same name.
COMPONENT_SETTINGS: tuple[type[ComponentSettings], ...] = (
    SkipSettings,
    RollbackSettings,
    TelemetrySettings,
    AdaptiveClipSettings,
    BatchRampSettings,
    AlertSettings,
    ExcludeSettings,
)
# Flat knob name -> the settings class that checks it.
_KNOBS: dict[str, type[ComponentSettings]] = {
    knob.name: settings_class for settings_class in COMPONENT_SETTINGS for knob in fields(settings_class)
}


@dataclass
class StabilityConfig(TrainingArguments):
    """Training arguments for [`StabilityTrainer`]; every `TrainingArguments` field works as usual.

    Being a `TrainingArguments` subclass, it parses with `HfArgumentParser` (``--spike_sigma 5``) and
    loads from YAML/JSON. Only the fields below are new; `restore_callback_states_from_checkpoint`
    defaults to ``True`` here so that skip and rollback counters survive ``resume_from_checkpoint``.
    The callbacks read their settings from these fields (`hf_stability.settings.ComponentSettings.resolve`),
    under `StabilityTrainer` and under a plain `Trainer` alike; each value is checked once, when it is set.
    """

    # Non-finite batch skipping
    skip_nonfinite: bool = field(
        default=True,
        metadata={
            "help": "Skip the optimizer update of any step whose gradients (after unscaling) hold NaN/Inf on any "
            "rank: no parameter, optimizer moment or optimizer step count changes. `global_step` still counts it."
        },
    )
    max_consecutive_skips: int = setting(SkipSettings, "max_consecutive_skips")
    max_underflow_steps: int = setting(SkipSettings, "max_underflow_steps")

    # Spike detection and rollback
    spike_rollback: bool = field(
        default=True,
        metadata={
            "help": "Watch `spike_metric` for spikes and, on one, restore the newest healthy in-memory snapshot and "
            "continue with the next batches."
        },
    )
    spike_metric: str = setting(RollbackSettings, "spike_metric")
    spike_window: int = setting(RollbackSettings, "spike_window")
    spike_warmup: int = setting(RollbackSettings, "spike_warmup")
    spike_sigma: float = setting(RollbackSettings, "spike_sigma")
    spike_check_interval: int = setting(RollbackSettings, "spike_check_interval")
    snapshot_interval: int = setting(RollbackSettings, "snapshot_interval")
    snapshot_keep: int = setting(RollbackSettings, "snapshot_keep")
    snapshot_storage: str = setting(RollbackSettings, "snapshot_storage")
    rollback_lr_factor: float = setting(RollbackSettings, "rollback_lr_factor")
    max_rollbacks: int = setting(RollbackSettings, "max_rollbacks")

    # Telemetry
    log_fp16_pressure: bool = setting(TelemetrySettings, "log_fp16_pressure")
    log_layer_grad_norms: bool = setting(TelemetrySettings, "log_layer_grad_norms")

    # Changed default of a TrainingArguments field
    restore_callback_states_from_checkpoint: bool = field(
        default=True,
        metadata={
            "help": "Restore callback states (skip and rollback counters) from the checkpoint on resume. Defaults to "
            "True here, unlike in `TrainingArguments`."
        },
    )

    # Adaptive (z-score) gradient clipping, see `AdaptiveClipCallback`
    adaptive_clip: bool = field(
        default=False,
        metadata={
            "help": "Clip each step's gradient norm to mean + `adaptive_clip_z` x standard deviation of an EMA of the "
            "recent norms (ZClip), on the device. Applies after `max_grad_norm`; the tighter bound wins."
        },
    )
    adaptive_clip_z: float = setting(AdaptiveClipSettings, "adaptive_clip_z")
    adaptive_clip_alpha: float = setting(AdaptiveClipSettings, "adaptive_clip_alpha")
    adaptive_clip_warmup: int = setting(AdaptiveClipSettings, "adaptive_clip_warmup")

    # Batch-size ramp (GPT-3), see `hf_stability.batch_ramp`
    batch_ramp_start: int = setting(BatchRampSettings, "batch_ramp_start")
    batch_ramp_increment: int = setting(BatchRampSettings, "batch_ramp_increment")
    batch_ramp_length: int = setting(BatchRampSettings, "batch_ramp_length")
    batch_ramp_unit: str = setting(BatchRampSettings, "batch_ramp_unit")

    # Alerts on stability events, see `hf_stability.alerts`
    stability_alerts: str = setting(AlertSettings, "stability_alerts")
    stability_alert_skip_burst: int = setting(AlertSettings, "stability_alert_skip_burst")
    stability_alert_skip_window: int = setting(AlertSettings, "stability_alert_skip_window")
    stability_alert_interval: float = setting(AlertSettings, "stability_alert_interval")

    # The exclude list, see `hf_stability.exclude`
    exclude_samples: str = setting(ExcludeSettings, "exclude_samples")

    def __setattr__(self, name: str, value: object) -> None:
        """A knob's one check, whenever it is set (the dataclass ``__init__`` sets every field once)."""
        settings_class = _KNOBS.get(name)
        super().__setattr__(name, value if settings_class is None else check_knob(settings_class, name, value))

    def __post_init__(self) -> None:
        super().__post_init__()
        for settings_class in COMPONENT_SETTINGS:  # the relations between knobs (each knob is checked already)
            settings_class.resolve({}, self)
        if self.batch_ramp_start:
            from hf_stability.batch_ramp import BatchRamp

            # The target needs the world size; StabilityTrainer checks the micro-batch multiples.
            target = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
            BatchRamp(self.batch_ramp_start, self.batch_ramp_increment, self.batch_ramp_length, target,
                      self.batch_ramp_unit)
        if self.exclude_samples:
            from hf_stability._compat import output_dir
            from hf_stability.exclude import read_exclude_list

            read_exclude_list(self.exclude_samples, output_dir(self))  # a bad path or file fails here, in one line
