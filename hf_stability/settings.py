"""One settings object per stability component: names, defaults, help and validation in one place.

Each component owns a dataclass (`SkipSettings`, `RollbackSettings`, `TelemetrySettings`,
`AdaptiveClipSettings`, `BatchRampSettings`), as OLMo-core's callback dataclasses and torchtitan's
component-owned ``Config`` do. A field carries its default, its ``--help`` text and its check (`option`).
`StabilityConfig` declares its fields from here (`setting`) and checks each value as it is set.

The classes live in this one light module rather than next to each callback: `StabilityConfig` needs all
of them, and the callback modules import the config, so per-callback homes would make an import cycle
(and pull torch-heavy code into argument parsing).

Each setting has one name, its flat `StabilityConfig` field (``spike_window``), used by the settings class,
``--help``, checkpoints and every error message (two knobs compared: "`spike_window` (10) must be >=
`spike_warmup` (20)"). A callback constructor may also accept an older short keyword (``window=``) as an
alias (`ConfiguredCallback.aliases`); it is translated on entry.

One validation per value (`check_knob`, the one place a knob is judged): a value is checked where it enters:
a `StabilityConfig` field when it is set (creation or a later assignment), a callback constructor keyword
when the callback is built, a checkpoint's stored value when it is read (under `StabilityTrainer` that is twice:
before Trainer loads the checkpoint, naming it, and when Trainer rebuilds the callback from the stored values,
which the resumed run's own settings then replace). Defaults are valid by construction
(tests check them once). Combining values (`ComponentSettings.resolve`: trainer built, training begins,
resume) checks no knob again, only the relations between knobs (`check_relations`), and only when the
combination is new.

How a callback gets its settings (`ComponentSettings.resolve`, used by every callback): a keyword given
to its constructor wins, then the `StabilityConfig` field of the ``args`` it trains with, then the default.

Choices are `str` enums (`SpikeMetric`, `SnapshotStorage`, `RampUnit`): members compare equal to, format
as and serialise like their strings. They derive from ``(str, Enum)`` rather than `enum.StrEnum` because
the package supports Python 3.10, where `StrEnum` does not exist; `Choice` gives them StrEnum's behaviour.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, TypeVar

_Settings = TypeVar("_Settings", bound="ComponentSettings")
Number = TypeVar("Number", int, float)
# A knob's check: (flat name, value) -> the normalised value, or a `ValueError` naming the knob.
Check = Callable[[str, Any], Any]


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


def number(kind: type[int] | type[float], minimum: float | None = None, maximum: float | None = None,
           open_minimum: bool = False, open_maximum: bool = False) -> Check:
    """The check of a numeric knob (`checked_number` with these bounds)."""
    return lambda name, value: checked_number(name, value, kind, minimum, maximum, open_minimum, open_maximum)


def flag(name: str, value: Any) -> bool:
    """The check of an on/off knob: a real bool (``"false"`` from a file would be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def option(default: Any, help: str, check: Check) -> Any:
    """A settings field, named as its `StabilityConfig` field: default, help text and its one check."""
    return field(default=default, metadata={"help": help, "check": check})


def check_knob(settings_class: type[ComponentSettings], name: str, value: Any) -> Any:
    """The one validation of knob ``name``: ``value`` normalised, or a `ValueError` naming the knob.

    Every check of a knob's value goes through here (the tests count its calls on a real run).
    """
    return settings_class.field_of(name).metadata["check"](name, value)


@dataclass
class ComponentSettings:
    """Base of the settings dataclasses: building one checks nothing (see `checked` and `resolve`)."""

    @classmethod
    def field_of(cls, name: str) -> Field:
        """The dataclass field of setting ``name``."""
        for candidate in fields(cls):
            if candidate.name == name:
                return candidate
        raise ValueError(f"`name`: {cls.__name__} has no setting {name!r}.")

    @classmethod
    def checked(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` (setting name -> value, e.g. constructor keywords) checked and normalised, once each."""
        return {name: check_knob(cls, name, value) for name, value in values.items()}

    def check_relations(self) -> None:
        """Raise a `ValueError` naming both knobs when two valid values contradict each other."""

    @classmethod
    def resolve(cls: type[_Settings], given: Mapping[str, Any], args: Any = None,
                previous: _Settings | None = None) -> _Settings:
        """The settings a component runs with: ``given`` (non-None) > ``args``' `StabilityConfig` field > default.

        ``given`` values are checked already (`checked`), as are a `StabilityConfig`'s; ``args`` may also be a
        plain `TrainingArguments` (defaults then) or ``None``. Only the relations between knobs are checked,
        unless the result equals ``previous`` (the same combination, judged before).
        """
        values = {}
        for setting in fields(cls):
            if given.get(setting.name) is not None:
                values[setting.name] = given[setting.name]
            elif args is not None and hasattr(args, setting.name):
                values[setting.name] = getattr(args, setting.name)
        settings = cls(**values)
        if settings != previous:
            settings.check_relations()
        return settings

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
        "Stop training cleanly, with a checkpoint, after this many consecutive skipped steps: the run is not "
        "recovering on its own.",
        number(int, minimum=1),
    )
    max_underflow_steps: int = option(
        100,
        "Stop training cleanly, with a checkpoint, after this many consecutive steps whose fp16 loss scale is below "
        "1 or whose gradients are all exactly zero (reported at the first such step): the updates carry no signal, "
        "and a loss scale that keeps halving ends in NaN gradients the grad scaler does not see.",
        number(int, minimum=1),
    )


@dataclass
class RollbackSettings(ComponentSettings):
    """`SpikeRollbackCallback` and its `SpikeDetector` and `SnapshotStore`."""

    spike_metric: SpikeMetric = option(SpikeMetric.LOSS, "Signal the spike detector watches.", SpikeMetric.checked)
    spike_window: int = option(
        128,
        "Number of recent healthy steps the detector's running mean and deviation cover.",
        number(int, minimum=2),  # a standard deviation needs two values
    )
    spike_warmup: int = option(
        64, "Healthy steps the detector must see before it may fire. Must not exceed `spike_window`.",
        number(int, minimum=1),
    )
    spike_sigma: float = option(
        6.0, "A value above mean + `spike_sigma` x standard deviation of the window is a spike.",
        number(float, minimum=0, open_minimum=True),
    )
    spike_check_interval: int = option(
        10,
        "Judge the buffered loss/grad-norm values at least every this many steps (and on logging, snapshot and "
        "checkpoint steps): one small device-to-host copy per check, none on the steps in between. A snapshot "
        "becomes a rollback target once a check has found this many healthy steps after it.",
        number(int, minimum=1),
    )
    snapshot_interval: int = option(
        100,
        "Take a rollback snapshot every this many optimizer steps (only while the run is healthy).",
        number(int, minimum=1),
    )
    snapshot_keep: int = option(
        2, "Number of healthy snapshots to keep; the oldest is dropped when a new one is taken.",
        number(int, minimum=1),
    )
    snapshot_storage: SnapshotStorage = option(
        SnapshotStorage.CPU,
        "Where snapshots live: 'cpu' (host memory, ~3x the fp32 parameter size per snapshot with Adam) or 'disk' "
        "(safetensors under `<output_dir>/stability_snapshots/`, for models whose snapshots do not fit).",
        SnapshotStorage.checked,
    )
    rollback_lr_factor: float = option(
        1.0,
        "Multiply the learning rate by this factor after each rollback, in (0, 1] (1.0 keeps it).",
        number(float, 0, 1, open_minimum=True),  # above 1 a rollback would raise the LR
    )
    max_rollbacks: int = option(
        5,
        "Stop training cleanly, with a checkpoint, when a spike would need rollback number `max_rollbacks + 1`.",
        number(int, minimum=0),
    )

    def check_relations(self) -> None:
        if self.spike_window < self.spike_warmup:
            raise ValueError(
                f"`spike_window` ({self.spike_window}) must be >= `spike_warmup` ({self.spike_warmup}): the "
                "detector cannot wait for more healthy steps than its window holds."
            )


@dataclass
class TelemetrySettings(ComponentSettings):
    """`LossScaleTelemetryCallback`."""

    log_fp16_pressure: bool = option(
        True,
        "On logging steps, log the fraction of gradient elements that underflow fp16 after loss scaling and the "
        "headroom of the largest scaled gradient to the fp16 maximum (65504).",
        flag,
    )
    log_layer_grad_norms: bool = option(
        False, "On logging steps, also log the gradient norm of every parameter tensor.", flag
    )


@dataclass
class AdaptiveClipSettings(ComponentSettings):
    """`AdaptiveClipCallback`."""

    adaptive_clip_z: float = option(
        2.5, "z-score threshold of adaptive clipping: a norm above mean + z x std is clipped to it.",
        number(float, minimum=0, open_minimum=True),
    )
    adaptive_clip_alpha: float = option(
        0.97,
        "EMA decay (weight of the past) of the gradient-norm mean and variance, in (0, 1).",
        number(float, 0, 1, open_minimum=True, open_maximum=True),
    )
    adaptive_clip_warmup: int = option(
        25,
        "Healthy steps that only build the norm statistics before adaptive clipping starts (>= 2).",
        number(int, minimum=2),  # a deviation needs two norms
    )


@dataclass
class BatchRampSettings(ComponentSettings):
    """The batch-size ramp (`hf_stability.batch_ramp`); checks that need the target batch are `BatchRamp`'s."""

    batch_ramp_start: int = option(
        0,
        "Global batch size (samples) of the first step; 0 turns the ramp off. The batch then grows by "
        "`batch_ramp_increment` up to per_device_train_batch_size x gradient_accumulation_steps x world size, "
        "evenly over `batch_ramp_length`, in whole micro-batches (a multiple of the per-device batch x world size).",
        number(int, minimum=0),  # 0 turns the ramp off
    )
    batch_ramp_increment: int = option(
        0, "Samples the global batch grows by at each increase (a whole number of micro-batches).",
        number(int, minimum=0),
    )
    batch_ramp_length: int = option(
        0, "Samples (or steps, see `batch_ramp_unit`) over which the batch reaches the target.",
        number(int, minimum=0),
    )
    batch_ramp_unit: RampUnit = option(
        RampUnit.SAMPLES, "Unit of `batch_ramp_length` (Megatron-LM counts samples).", RampUnit.checked
    )


# Events an alert can be raised on; ``skip_burst`` is `stability_alert_skip_burst` skips within a window of steps.
ALERT_EVENTS = ("stop", "rollback", "skip_burst", "skip", "nonfinite_loss", "nonfinite_parameters")


def _alert_events(name: str, value: Any) -> str:
    """The check of `stability_alerts`: known event names, comma-separated, each once."""
    if not isinstance(value, str):
        raise ValueError(f"`{name}` must be a comma-separated string, got {value!r}.")
    names = [event.strip() for event in value.split(",") if event.strip()]
    unknown = [event for event in names if event not in ALERT_EVENTS]
    if unknown:
        raise ValueError(f"`{name}`: unknown event(s) {unknown}; choose from {list(ALERT_EVENTS)}.")
    return ",".join(dict.fromkeys(names))


@dataclass
class AlertSettings(ComponentSettings):
    """Alerts on stability events (`hf_stability.alerts`)."""

    stability_alerts: str = option(
        "",
        "Comma-separated events that raise an alert (wandb.alert when W&B is active, and the callables given to "
        f"`StabilityTrainer.on_stability_event`), on the main process only: any of {', '.join(ALERT_EVENTS)}. "
        "Empty: no alerts.",
        _alert_events,
    )
    stability_alert_skip_burst: int = option(
        5, "A skip_burst is this many skipped steps within `stability_alert_skip_window`.", number(int, minimum=1)
    )
    stability_alert_skip_window: int = option(100, "Steps over which a skip_burst is counted.", number(int, minimum=1))
    stability_alert_interval: float = option(
        600.0,
        "Seconds after an alert during which further alerts of the same event are held back (counted in the next).",
        number(float, minimum=0),
    )

    @property
    def event_names(self) -> tuple[str, ...]:
        return tuple(name for name in self.stability_alerts.split(",") if name)


# `ExcludeSettings.samples` naming the output directory's own bad-samples file (`hf_stability.exclude`).
EXCLUDE_AUTO = "auto"


def _exclude_samples(name: str, value: Any) -> str:
    """The check of `exclude_samples`: a path or 'auto' (the file itself is read when the dataloader is built)."""
    if not isinstance(value, str):
        raise ValueError(f"`{name}` must be a file path or '{EXCLUDE_AUTO}', got {value!r}.")
    return value.strip()


@dataclass
class ExcludeSettings(ComponentSettings):
    """The exclude list: samples the train dataloader leaves out (`hf_stability.exclude`)."""

    exclude_samples: str = option(
        "",
        "A bad-samples JSON file (`{\"<index>\": [event, ...]}`, as a run writes to stability_bad_samples.json) whose "
        "samples the train dataloader leaves out (dataset indices; stream positions for an IterableDataset), or "
        f"'{EXCLUDE_AUTO}': `<output_dir>/stability_bad_samples.json` when it exists (on a resume). Empty: none.",
        _exclude_samples,
    )


def setting(settings_class: type[ComponentSettings], name: str) -> Any:
    """A `StabilityConfig` field declared from setting ``name`` of ``settings_class``: same default and help.

    Choices are listed for ``--help`` and the parser; the default is the plain value for the same reason.
    """
    source = settings_class.field_of(name)
    metadata: dict[str, Any] = {"help": source.metadata["help"]}
    if isinstance(source.default, Choice):
        metadata["choices"] = [member.value for member in type(source.default)]
    return field(default=_plain(source.default), metadata=metadata)
