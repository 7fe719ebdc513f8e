"""`StabilityConfig`: `TrainingArguments` plus the knobs of skipping, rollback and telemetry."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from transformers import TrainingArguments

SPIKE_METRICS = ("loss", "grad_norm")
SNAPSHOT_STORAGES = ("cpu", "disk")


Number = TypeVar("Number", int, float)


def checked_number(
    name: str,
    value: Any,
    kind: type[Number],
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
) -> Number:
    """``value`` as a finite ``kind`` within the bounds, or a `ValueError` naming ``name``.

    One check for `StabilityConfig` and the callbacks built directly, so a knob is judged alike however
    it arrives: a YAML/JSON file or a program may hand over a string (PyYAML reads ``1e-3`` as one),
    which is converted when it spells a number and rejected otherwise, instead of failing later in a
    comparison with a `TypeError`. Booleans are rejected: ``True`` is an int to Python, not a setting.
    NaN and infinities are rejected: every comparison with NaN is False, so a NaN threshold would
    silently switch the protection off.
    """
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"`{name}` must be a number, got the string {value!r}.") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    if kind is int:
        if number != int(number):
            raise ValueError(f"`{name}` must be an integer, got {value!r}.")
        number = int(number)
    else:
        number = float(number)
    if minimum is not None and (number <= minimum if open_minimum else number < minimum):
        raise ValueError(f"`{name}` must be {'>' if open_minimum else '>='} {minimum}, got {value!r}.")
    if maximum is not None and number > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value!r}.")
    return number


@dataclass
class StabilityConfig(TrainingArguments):
    """Training arguments for [`StabilityTrainer`]; every `TrainingArguments` field works as usual.

    Being a `TrainingArguments` subclass, it parses with `HfArgumentParser` (``--spike_sigma 5``) and
    loads from YAML/JSON. Only the fields below are new; `restore_callback_states_from_checkpoint`
    defaults to ``True`` here so that skip and rollback counters survive ``resume_from_checkpoint``.
    """

    # Non-finite batch skipping
    skip_nonfinite: bool = field(
        default=True,
        metadata={
            "help": "Skip the optimizer update of any step whose gradients (after unscaling) hold NaN/Inf on any "
            "rank: no parameter, optimizer moment or optimizer step count changes. `global_step` still counts it."
        },
    )
    max_consecutive_skips: int = field(
        default=50,
        metadata={
            "help": "Stop training cleanly, with a checkpoint, after this many consecutive skipped steps: the run is "
            "not recovering on its own."
        },
    )

    # Spike detection and rollback
    spike_rollback: bool = field(
        default=True,
        metadata={
            "help": "Watch `spike_metric` for spikes and, on one, restore the newest healthy in-memory snapshot and "
            "continue with the next batches."
        },
    )
    spike_metric: str = field(
        default="loss",
        metadata={"help": "Signal the spike detector watches.", "choices": list(SPIKE_METRICS)},
    )
    spike_window: int = field(
        default=128,
        metadata={"help": "Number of recent healthy steps the detector's running mean and deviation cover."},
    )
    spike_warmup: int = field(
        default=64,
        metadata={"help": "Healthy steps the detector must see before it may fire. Must not exceed `spike_window`."},
    )
    spike_sigma: float = field(
        default=6.0,
        metadata={"help": "A value above mean + `spike_sigma` x standard deviation of the window is a spike."},
    )
    spike_check_interval: int = field(
        default=10,
        metadata={
            "help": "Judge the buffered loss/grad-norm values at least every this many steps (and on logging, "
            "snapshot and checkpoint steps): one small device-to-host copy per check, none on the steps in "
            "between. A snapshot becomes a rollback target once a check has found this many healthy steps after it."
        },
    )
    snapshot_interval: int = field(
        default=100,
        metadata={"help": "Take a rollback snapshot every this many optimizer steps (only while the run is healthy)."},
    )
    snapshot_keep: int = field(
        default=2,
        metadata={"help": "Number of healthy snapshots to keep; the oldest is dropped when a new one is taken."},
    )
    snapshot_storage: str = field(
        default="cpu",
        metadata={
            "help": "Where snapshots live: 'cpu' (host memory, ~3x the fp32 parameter size per snapshot with Adam) or "
            "'disk' (safetensors under `<output_dir>/stability_snapshots/`, for models whose snapshots do not fit).",
            "choices": list(SNAPSHOT_STORAGES),
        },
    )
    rollback_lr_factor: float = field(
        default=1.0,
        metadata={"help": "Multiply the learning rate by this factor after each rollback, in (0, 1] (1.0 keeps it)."},
    )
    max_rollbacks: int = field(
        default=5,
        metadata={"help": "Stop training cleanly, with a checkpoint, when a spike would need rollback number "
                  "`max_rollbacks + 1`."},
    )

    # Telemetry
    log_fp16_pressure: bool = field(
        default=True,
        metadata={
            "help": "On logging steps, log the fraction of gradient elements that underflow fp16 after loss scaling "
            "and the headroom of the largest scaled gradient to the fp16 maximum (65504)."
        },
    )
    log_layer_grad_norms: bool = field(
        default=False,
        metadata={"help": "On logging steps, also log the gradient norm of every parameter tensor."},
    )

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
    adaptive_clip_z: float = field(
        default=2.5,
        metadata={"help": "z-score threshold of adaptive clipping: a norm above mean + z x std is clipped to it."},
    )
    adaptive_clip_alpha: float = field(
        default=0.97,
        metadata={"help": "EMA decay (weight of the past) of the gradient-norm mean and variance, in (0, 1)."},
    )
    adaptive_clip_warmup: int = field(
        default=25,
        metadata={"help": "Healthy steps that only build the norm statistics before adaptive clipping starts (>= 2)."},
    )

    # Batch-size ramp (GPT-3), see `hf_stability.batch_ramp`
    batch_ramp_start: int = field(
        default=0,
        metadata={
            "help": "Global batch size (samples) of the first step; 0 turns the ramp off. The batch then grows by "
            "`batch_ramp_increment` up to per_device_train_batch_size x gradient_accumulation_steps x world size, "
            "evenly over `batch_ramp_length`, in whole micro-batches (a multiple of the per-device batch x world size)."
        },
    )
    batch_ramp_increment: int = field(
        default=0,
        metadata={"help": "Samples the global batch grows by at each increase (a whole number of micro-batches)."},
    )
    batch_ramp_length: int = field(
        default=0,
        metadata={"help": "Samples (or steps, see `batch_ramp_unit`) over which the batch reaches the target."},
    )
    batch_ramp_unit: str = field(
        default="samples",
        metadata={"help": "Unit of `batch_ramp_length` (Megatron-LM counts samples).", "choices": ["samples", "steps"]},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate_remedies()
        if self.spike_metric not in SPIKE_METRICS:
            raise ValueError(f"`spike_metric` must be one of {SPIKE_METRICS}, got {self.spike_metric!r}.")
        if self.snapshot_storage not in SNAPSHOT_STORAGES:
            raise ValueError(f"`snapshot_storage` must be one of {SNAPSHOT_STORAGES}, got {self.snapshot_storage!r}.")
        # (field, type, minimum, maximum, open minimum): every numeric knob goes through `checked_number`.
        bounds = [
            ("spike_window", int, 2, None, False),  # a standard deviation needs two values
            ("spike_warmup", int, 1, None, False),
            ("spike_check_interval", int, 1, None, False),
            ("snapshot_interval", int, 1, None, False),
            ("snapshot_keep", int, 1, None, False),
            ("max_consecutive_skips", int, 1, None, False),
            ("max_rollbacks", int, 0, None, False),
            ("spike_sigma", float, 0, None, True),
            ("rollback_lr_factor", float, 0, 1, True),  # above 1 a rollback would raise the LR that diverged
        ]
        for name, kind, minimum, maximum, open_minimum in bounds:
            setattr(self, name, checked_number(name, getattr(self, name), kind, minimum, maximum, open_minimum))
        if self.spike_window < self.spike_warmup:
            raise ValueError(
                f"`spike_window` ({self.spike_window}) must be >= `spike_warmup` ({self.spike_warmup}): the detector "
                "cannot wait for more healthy steps than its window holds."
            )

    def _validate_remedies(self) -> None:
        """Checks of the adaptive-clipping and batch-ramp fields."""
        from hf_stability.callbacks.adaptive_clip import validate_adaptive_clip

        validate_adaptive_clip(
            self.adaptive_clip_z,
            self.adaptive_clip_alpha,
            self.adaptive_clip_warmup,
            names=("adaptive_clip_z", "adaptive_clip_alpha", "adaptive_clip_warmup"),
        )
        from hf_stability.batch_ramp import RAMP_UNITS, BatchRamp

        if self.batch_ramp_unit not in RAMP_UNITS:
            raise ValueError(f"`batch_ramp_unit` must be one of {RAMP_UNITS}, got {self.batch_ramp_unit!r}.")
        if self.batch_ramp_start < 0:
            raise ValueError(f"`batch_ramp_start` must be >= 0 (0 turns the ramp off), got {self.batch_ramp_start}.")
        if self.batch_ramp_start:

            # The target needs the world size; StabilityTrainer checks the micro-batch multiples.
            target = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
            BatchRamp(self.batch_ramp_start, self.batch_ramp_increment, self.batch_ramp_length, target,
                      self.batch_ramp_unit)
