"""`StabilityConfig`: `TrainingArguments` plus the knobs of skipping, rollback and telemetry.

Each knob is a setting of one component (`hf_stability.settings`), which owns its default, help and
validation; here it gets its flat command-line name (``--spike_window``), and ``__post_init__`` validates by
building the component settings (errors name the flat field).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    checked_number,
    setting,
)

__all__ = ["COMPONENT_SETTINGS", "StabilityConfig", "checked_number"]

# The settings classes whose every field is a `StabilityConfig` field (named by its metadata "config").
COMPONENT_SETTINGS: tuple[type[ComponentSettings], ...] = (
    SkipSettings,
    RollbackSettings,
    TelemetrySettings,
    AdaptiveClipSettings,
    BatchRampSettings,
    AlertSettings,
    ExcludeSettings,
)


@dataclass
class StabilityConfig(TrainingArguments):
    """Training arguments for [`StabilityTrainer`]; every `TrainingArguments` field works as usual.

    Being a `TrainingArguments` subclass, it parses with `HfArgumentParser` (``--spike_sigma 5``) and
    loads from YAML/JSON. Only the fields below are new; `restore_callback_states_from_checkpoint`
    defaults to ``True`` here so that skip and rollback counters survive ``resume_from_checkpoint``.
    The callbacks read their settings from these fields (`hf_stability.settings.ComponentSettings.resolve`),
    under `StabilityTrainer` and under a plain `Trainer` alike.
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
    spike_metric: str = setting(RollbackSettings, "metric")
    spike_window: int = setting(RollbackSettings, "window")
    spike_warmup: int = setting(RollbackSettings, "warmup")
    spike_sigma: float = setting(RollbackSettings, "sigma")
    spike_check_interval: int = setting(RollbackSettings, "check_interval")
    snapshot_interval: int = setting(RollbackSettings, "snapshot_interval")
    snapshot_keep: int = setting(RollbackSettings, "snapshot_keep")
    snapshot_storage: str = setting(RollbackSettings, "snapshot_storage")
    rollback_lr_factor: float = setting(RollbackSettings, "lr_factor")
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
    adaptive_clip_z: float = setting(AdaptiveClipSettings, "z")
    adaptive_clip_alpha: float = setting(AdaptiveClipSettings, "alpha")
    adaptive_clip_warmup: int = setting(AdaptiveClipSettings, "warmup")

    # Batch-size ramp (GPT-3), see `hf_stability.batch_ramp`
    batch_ramp_start: int = setting(BatchRampSettings, "start")
    batch_ramp_increment: int = setting(BatchRampSettings, "increment")
    batch_ramp_length: int = setting(BatchRampSettings, "length")
    batch_ramp_unit: str = setting(BatchRampSettings, "unit")

    # Alerts on stability events, see `hf_stability.alerts`
    stability_alerts: str = setting(AlertSettings, "events")
    stability_alert_skip_burst: int = setting(AlertSettings, "skip_burst")
    stability_alert_skip_window: int = setting(AlertSettings, "skip_window")
    stability_alert_interval: float = setting(AlertSettings, "interval")

    # The exclude list, see `hf_stability.exclude`
    exclude_samples: str = setting(ExcludeSettings, "samples")

    def __post_init__(self) -> None:
        super().__post_init__()
        # One validation: build every component's settings from these fields and keep the normalised values.
        for settings_class in COMPONENT_SETTINGS:
            for name, value in vars(settings_class.resolve({}, self)).items():
                setattr(self, settings_class.field_of(name).metadata["config"], value)
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
