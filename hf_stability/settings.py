"""One settings object per stability component: names, defaults, help and validation in one place.

Each component owns a dataclass (`SkipSettings`, `RollbackSettings`, `TelemetrySettings`,
`AdaptiveClipSettings`, `BatchRampSettings`), as OLMo-core's callback dataclasses and torchtitan's
component-owned ``Config`` do. A field carries its default, its ``--help`` text and the flat
`StabilityConfig` field it is exposed as (metadata ``"config"``); ``__post_init__`` is the one validation.
`StabilityConfig` declares its fields from here (`setting`) and validates by building these objects.

The classes live in this one light module rather than next to each callback: `StabilityConfig` needs all
of them, and the callback modules import the config, so per-callback homes would make an import cycle
(and pull torch-heavy code into argument parsing).

How a callback gets its settings (`ComponentSettings.resolve`, used by every callback): a keyword given
to its constructor wins, then the `StabilityConfig` field of the ``args`` it trains with, then the default.
A value that came from ``args`` is named by its `StabilityConfig` field in error messages.

Choices are `str` enums (`SpikeMetric`, `SnapshotStorage`, `RampUnit`): members compare equal to, format
as and serialise like their strings. They derive from ``(str, Enum)`` rather than `enum.StrEnum` because
the package supports Python 3.10, where `StrEnum` does not exist; `Choice` gives them StrEnum's behaviour.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import Field, dataclass, field, fields
from types import MappingProxyType
from typing import Any, TypeVar

_Settings = TypeVar("_Settings", bound="ComponentSettings")
Number = TypeVar("Number", int, float)

# While settings are built from `StabilityConfig` values: setting name -> the config field to name in errors.
_LABELS: ContextVar[Mapping[str, str]] = ContextVar("hf_stability_setting_labels", default=MappingProxyType({}))


def checked_number(
    name: str,
    value: Any,
    kind: type[Number],
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
    open_maximum: bool = False,
) -> Number:
    """``value`` as a finite ``kind`` within the bounds, or a `ValueError` naming ``name``.

    One check for every numeric setting, so a knob is judged alike however it arrives: a YAML/JSON file
    or a program may hand over a string (PyYAML reads ``1e-3`` as one), which is converted when it spells
    a number and rejected otherwise, instead of failing later in a comparison with a `TypeError`. Booleans
    are rejected: ``True`` is an int to Python, not a setting. NaN and infinities are rejected: every
    comparison with NaN is False, so a NaN threshold would silently switch the protection off.
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
    if maximum is not None and (number >= maximum if open_maximum else number > maximum):
        raise ValueError(f"`{name}` must be {'<' if open_maximum else '<='} {maximum}, got {value!r}.")
    return number


class Choice(str, enum.Enum):
    """A setting with a fixed set of string values (`enum.StrEnum` behaviour, also on Python 3.10)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)

    @classmethod
    def checked(cls, name: str, value: Any) -> Choice:
        """``value`` as a member, or a `ValueError` naming ``name`` and the allowed values."""
        try:
            return cls(value)
        except (ValueError, TypeError):
            raise ValueError(f"`{name}` must be one of {[m.value for m in cls]}, got {value!r}.") from None


class SpikeMetric(Choice):
    LOSS = "loss"
    GRAD_NORM = "grad_norm"


class SnapshotStorage(Choice):
    CPU = "cpu"
    DISK = "disk"


class RampUnit(Choice):
    SAMPLES = "samples"
    STEPS = "steps"


def option(default: Any, config: str, help: str) -> Any:
    """A settings field: its default, the `StabilityConfig` field that exposes it, and its help text."""
    return field(default=default, metadata={"config": config, "help": help})


@dataclass
class ComponentSettings:
    """Base of the settings dataclasses: the validation helpers and the one resolution rule."""

    def label(self, name: str) -> str:
        """How errors name setting ``name``: its `StabilityConfig` field when the value came from there."""
        return _LABELS.get().get(name, name)

    def check_number(self, name: str, kind: type[int] | type[float], minimum: float | None = None,
                     maximum: float | None = None, open_minimum: bool = False, open_maximum: bool = False) -> None:
        """Validate and normalise the numeric setting ``name`` in place (`checked_number`)."""
        value = checked_number(self.label(name), getattr(self, name), kind, minimum, maximum, open_minimum,
                               open_maximum)
        setattr(self, name, value)

    def check_choice(self, name: str, choices: type[Choice]) -> None:
        """Validate setting ``name`` against ``choices`` and store it as a member."""
        setattr(self, name, choices.checked(self.label(name), getattr(self, name)))

    def check_flag(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            raise ValueError(f"`{self.label(name)}` must be True or False, got {getattr(self, name)!r}.")

    @classmethod
    def field_of(cls, name: str) -> Field:
        """The dataclass field of setting ``name``."""
        for candidate in fields(cls):
            if candidate.name == name:
                return candidate
        raise ValueError(f"`name`: {cls.__name__} has no setting {name!r}.")

    @classmethod
    def resolve(cls: type[_Settings], given: Mapping[str, Any], args: Any = None) -> _Settings:
        """The settings a component runs with: ``given`` (non-None) > ``args``' `StabilityConfig` field > default.

        ``args`` may be a `StabilityConfig`, a plain `TrainingArguments` (defaults then) or ``None``.
        """
        values, labels = {}, {}
        for setting in fields(cls):
            config = setting.metadata["config"]
            if given.get(setting.name) is not None:
                values[setting.name] = given[setting.name]
            elif args is not None and hasattr(args, config):
                values[setting.name] = getattr(args, config)
                labels[setting.name] = config
        token = _LABELS.set(labels)
        try:
            return cls(**values)
        finally:
            _LABELS.reset(token)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (choices as strings), as exported with a checkpoint."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Choice) else value


@dataclass
class SkipSettings(ComponentSettings):
    """`SkipNonFiniteCallback`."""

    max_consecutive_skips: int = option(
        50,
        "max_consecutive_skips",
        "Stop training cleanly, with a checkpoint, after this many consecutive skipped steps: the run is not "
        "recovering on its own.",
    )
    max_underflow_steps: int = option(
        100,
        "max_underflow_steps",
        "Stop training cleanly, with a checkpoint, after this many consecutive steps whose fp16 loss scale is below "
        "1 or whose gradients are all exactly zero (reported at the first such step): the updates carry no signal, "
        "and a loss scale that keeps halving ends in NaN gradients the grad scaler does not see.",
    )

    def __post_init__(self) -> None:
        self.check_number("max_consecutive_skips", int, minimum=1)
        self.check_number("max_underflow_steps", int, minimum=1)


@dataclass
class RollbackSettings(ComponentSettings):
    """`SpikeRollbackCallback` and its `SpikeDetector` and `SnapshotStore`."""

    metric: SpikeMetric = option(SpikeMetric.LOSS, "spike_metric", "Signal the spike detector watches.")
    window: int = option(
        128, "spike_window", "Number of recent healthy steps the detector's running mean and deviation cover."
    )
    warmup: int = option(
        64, "spike_warmup", "Healthy steps the detector must see before it may fire. Must not exceed `spike_window`."
    )
    sigma: float = option(
        6.0, "spike_sigma", "A value above mean + `spike_sigma` x standard deviation of the window is a spike."
    )
    check_interval: int = option(
        10,
        "spike_check_interval",
        "Judge the buffered loss/grad-norm values at least every this many steps (and on logging, snapshot and "
        "checkpoint steps): one small device-to-host copy per check, none on the steps in between. A snapshot "
        "becomes a rollback target once a check has found this many healthy steps after it.",
    )
    snapshot_interval: int = option(
        100,
        "snapshot_interval",
        "Take a rollback snapshot every this many optimizer steps (only while the run is healthy).",
    )
    snapshot_keep: int = option(
        2, "snapshot_keep", "Number of healthy snapshots to keep; the oldest is dropped when a new one is taken."
    )
    snapshot_storage: SnapshotStorage = option(
        SnapshotStorage.CPU,
        "snapshot_storage",
        "Where snapshots live: 'cpu' (host memory, ~3x the fp32 parameter size per snapshot with Adam) or 'disk' "
        "(safetensors under `<output_dir>/stability_snapshots/`, for models whose snapshots do not fit).",
    )
    lr_factor: float = option(
        1.0,
        "rollback_lr_factor",
        "Multiply the learning rate by this factor after each rollback, in (0, 1] (1.0 keeps it).",
    )
    max_rollbacks: int = option(
        5,
        "max_rollbacks",
        "Stop training cleanly, with a checkpoint, when a spike would need rollback number `max_rollbacks + 1`.",
    )

    def __post_init__(self) -> None:
        self.check_choice("metric", SpikeMetric)
        self.check_choice("snapshot_storage", SnapshotStorage)
        self.check_number("window", int, minimum=2)  # a standard deviation needs two values
        self.check_number("warmup", int, minimum=1)
        self.check_number("check_interval", int, minimum=1)
        self.check_number("snapshot_interval", int, minimum=1)
        self.check_number("snapshot_keep", int, minimum=1)
        self.check_number("max_rollbacks", int, minimum=0)
        self.check_number("sigma", float, minimum=0, open_minimum=True)
        self.check_number("lr_factor", float, 0, 1, open_minimum=True)  # above 1 a rollback would raise the LR
        if self.window < self.warmup:
            raise ValueError(
                f"`{self.label('window')}` ({self.window}) must be >= `{self.label('warmup')}` ({self.warmup}): the "
                "detector cannot wait for more healthy steps than its window holds."
            )


@dataclass
class TelemetrySettings(ComponentSettings):
    """`LossScaleTelemetryCallback`."""

    log_fp16_pressure: bool = option(
        True,
        "log_fp16_pressure",
        "On logging steps, log the fraction of gradient elements that underflow fp16 after loss scaling and the "
        "headroom of the largest scaled gradient to the fp16 maximum (65504).",
    )
    log_layer_grad_norms: bool = option(
        False, "log_layer_grad_norms", "On logging steps, also log the gradient norm of every parameter tensor."
    )

    def __post_init__(self) -> None:
        self.check_flag("log_fp16_pressure")
        self.check_flag("log_layer_grad_norms")


@dataclass
class AdaptiveClipSettings(ComponentSettings):
    """`AdaptiveClipCallback`."""

    z: float = option(
        2.5, "adaptive_clip_z", "z-score threshold of adaptive clipping: a norm above mean + z x std is clipped to it."
    )
    alpha: float = option(
        0.97,
        "adaptive_clip_alpha",
        "EMA decay (weight of the past) of the gradient-norm mean and variance, in (0, 1).",
    )
    warmup: int = option(
        25,
        "adaptive_clip_warmup",
        "Healthy steps that only build the norm statistics before adaptive clipping starts (>= 2).",
    )

    def __post_init__(self) -> None:
        self.check_number("z", float, minimum=0, open_minimum=True)
        self.check_number("alpha", float, 0, 1, open_minimum=True, open_maximum=True)
        self.check_number("warmup", int, minimum=2)  # a deviation needs two norms


@dataclass
class BatchRampSettings(ComponentSettings):
    """The batch-size ramp (`hf_stability.batch_ramp`); checks that need the target batch are `BatchRamp`'s."""

    start: int = option(
        0,
        "batch_ramp_start",
        "Global batch size (samples) of the first step; 0 turns the ramp off. The batch then grows by "
        "`batch_ramp_increment` up to per_device_train_batch_size x gradient_accumulation_steps x world size, "
        "evenly over `batch_ramp_length`, in whole micro-batches (a multiple of the per-device batch x world size).",
    )
    increment: int = option(
        0,
        "batch_ramp_increment",
        "Samples the global batch grows by at each increase (a whole number of micro-batches).",
    )
    length: int = option(
        0, "batch_ramp_length", "Samples (or steps, see `batch_ramp_unit`) over which the batch reaches the target."
    )
    unit: RampUnit = option(
        RampUnit.SAMPLES, "batch_ramp_unit", "Unit of `batch_ramp_length` (Megatron-LM counts samples)."
    )

    def __post_init__(self) -> None:
        self.check_choice("unit", RampUnit)
        self.check_number("start", int, minimum=0)  # 0 turns the ramp off
        self.check_number("increment", int, minimum=0)
        self.check_number("length", int, minimum=0)


# Events an alert can be raised on; ``skip_burst`` is `AlertSettings.skip_burst` skips within a window of steps.
ALERT_EVENTS = ("stop", "rollback", "skip_burst", "skip", "nonfinite_loss", "nonfinite_parameters")


@dataclass
class AlertSettings(ComponentSettings):
    """Alerts on stability events (`hf_stability.alerts`)."""

    events: str = option(
        "",
        "stability_alerts",
        "Comma-separated events that raise an alert (wandb.alert when W&B is active, and the callables given to "
        f"`StabilityTrainer.on_stability_event`), on the main process only: any of {', '.join(ALERT_EVENTS)}. "
        "Empty: no alerts.",
    )
    skip_burst: int = option(
        5, "stability_alert_skip_burst", "A skip_burst is this many skipped steps within `stability_alert_skip_window`."
    )
    skip_window: int = option(100, "stability_alert_skip_window", "Steps over which a skip_burst is counted.")
    interval: float = option(
        600.0,
        "stability_alert_interval",
        "Seconds after an alert during which further alerts of the same event are held back (counted in the next).",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.events, str):
            raise ValueError(f"`{self.label('events')}` must be a comma-separated string, got {self.events!r}.")
        names = [name.strip() for name in self.events.split(",") if name.strip()]
        unknown = [name for name in names if name not in ALERT_EVENTS]
        if unknown:
            raise ValueError(f"`{self.label('events')}`: unknown event(s) {unknown}; choose from {list(ALERT_EVENTS)}.")
        self.events = ",".join(dict.fromkeys(names))
        self.check_number("skip_burst", int, minimum=1)
        self.check_number("skip_window", int, minimum=1)
        self.check_number("interval", float, minimum=0)

    @property
    def event_names(self) -> tuple[str, ...]:
        return tuple(name for name in self.events.split(",") if name)


# `ExcludeSettings.samples` naming the output directory's own bad-samples file (`hf_stability.exclude`).
EXCLUDE_AUTO = "auto"


@dataclass
class ExcludeSettings(ComponentSettings):
    """The exclude list: samples the train dataloader leaves out (`hf_stability.exclude`)."""

    samples: str = option(
        "",
        "exclude_samples",
        "A bad-samples JSON file (`{\"<index>\": [event, ...]}`, as a run writes to stability_bad_samples.json) whose "
        "samples the train dataloader leaves out (dataset indices; stream positions for an IterableDataset), or "
        f"'{EXCLUDE_AUTO}': `<output_dir>/stability_bad_samples.json` when it exists (on a resume). Empty: none.",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.samples, str):
            raise ValueError(
                f"`{self.label('samples')}` must be a file path or '{EXCLUDE_AUTO}', got {self.samples!r}."
            )
        self.samples = self.samples.strip()


def setting(settings_class: type[ComponentSettings], name: str) -> Any:
    """A `StabilityConfig` field declared from setting ``name`` of ``settings_class``: same default and help.

    Choices are listed for ``--help`` and the parser; the default is the plain value for the same reason.
    """
    source = settings_class.field_of(name)
    metadata: dict[str, Any] = {"help": source.metadata["help"]}
    if isinstance(source.default, Choice):
        metadata["choices"] = [member.value for member in type(source.default)]
    return field(default=_plain(source.default), metadata=metadata)
