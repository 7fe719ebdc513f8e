"""Read a finished (or crashed) run back from its output directory: summary and training curves.

Works for any run that used the stability callbacks — `StabilityTrainer`, a recipe, or a plain
`Trainer` with callbacks: the logged history comes from ``trainer_state.json`` (in the output directory,
else in its newest ``checkpoint-*``) and the events from ``stability_events.jsonl``.

Counts describe the run's final state, not its last logging step: a run can stop (or be killed) between
logging steps. They come from the events file, which holds every skip and rollback as it happened and is
aligned with the state a resumed run starts from; without one, from the callbacks' counters stored with
the trainer state; only then from the last logged value.

The events are streamed into a bounded `EventDigest` (counts per type and reason, step range, the last few
events in full), and the plot marks them per bin of steps once there are more than `MAX_EVENT_LINES`, so a run
with a million events reports in seconds (docs/events.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_stability import metric_names as names
from hf_stability._extras import require
from hf_stability.event_digest import EventDigest, read_event_digest
from hf_stability.events import EVENTS_FILENAME, SUPERSEDED_PREFIX

STATE_FILENAME = "trainer_state.json"
# What a run left out (`hf_stability.exclude`): {"exclude_samples", "file", "index_kind", "samples"}.
EXCLUDED_FILENAME = "stability_excluded_samples.json"
# Event kind -> (callback, attribute) whose checkpointed value counts it.
_STORED_COUNTERS = {
    "skip": ("SkipNonFiniteCallback", "skipped_steps"),
    "rollback": ("SpikeRollbackCallback", "rollbacks"),
}
PLOT_FILENAME = "training_curves.png"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# A layer whose median gradient norm over the run is below VANISHING_RATIO or above EXPLODING_RATIO times the
# median layer's is named. Healthy 40-step runs of the tiny BERT/BART/T5 recipes span 1.1e-3x (BART's query
# projections, whose gradient is small while attention logits start near 0) to 2.1e3x (BART's tied embedding and
# LM head): four orders of magnitude either way leave a factor of 5 to 10 of margin (docs/trainer.md).
VANISHING_RATIO = 1e-4
EXPLODING_RATIO = 1e4
# The heat map names each layer up to this many rows, each block beyond; inches of figure per layer row.
_NAMED_LAYER_ROWS = 48
_HEAT_MAP_ROW_INCHES = 0.11
# Up to this many skips (or rollbacks) are drawn one line each; more are drawn as counts per bin of steps
# (EVENT_BINS bins at most), which stays readable and fast for any number of events.
MAX_EVENT_LINES = 50
EVENT_BINS = 200
# Extra fields of a listed event are shown up to this many characters.
_EVENT_DETAIL_CHARS = 160
_LISTED_KEYS = ("step", "event", "reason", "restored_step", "time")
# The summary lists the event/reason groups with the most events, up to this many.
_LISTED_REASON_GROUPS = 10


@dataclass
class RunRecord:
    """What a run left on disk: the Trainer's logged history and the stability events.

    ``events`` are the most recent events in full (all of them when built from a list), ``digest`` the counts
    over every event (built from ``events`` when not given).
    """

    output_dir: Path
    log_history: list[dict[str, Any]]
    events: list[dict[str, Any]]
    state_path: Path | None
    trainer_state: dict[str, Any] = field(default_factory=dict)
    has_events_file: bool = False
    # Events moved aside (an earlier run in this directory, or steps replayed after a resume), oldest first.
    superseded: list[Path] = field(default_factory=list)
    digest: EventDigest | None = None

    def __post_init__(self) -> None:
        if self.digest is None:
            self.digest = EventDigest.of(self.events)

    @property
    def event_digest(self) -> EventDigest:
        assert self.digest is not None  # set by __post_init__
        return self.digest

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every finite logged value of ``key``."""
        points = []
        for entry in self.log_history:
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value) and "step" in entry:
                points.append((int(entry["step"]), float(value)))
        return points

    def counter(self, key: str, kind: str) -> int:
        """Final count of ``kind`` events: the events file, else the stored callback counter, else the last log."""
        if self.has_events_file:
            return self.event_digest.count(kind)
        stored = _STORED_COUNTERS.get(kind)
        callbacks = self.trainer_state.get("stateful_callbacks") or {}
        if stored is not None and isinstance(callbacks.get(stored[0]), dict):
            value = callbacks[stored[0]].get("attributes", {}).get(stored[1])
            if isinstance(value, int):
                return value
        logged = self.series(key)
        return int(logged[-1][1]) if logged else 0

    @property
    def global_step(self) -> int:
        """The step the run ended at (the trainer state's), else the last logged step."""
        step = self.trainer_state.get("global_step")
        logged = max((int(entry.get("step", 0)) for entry in self.log_history), default=0)
        return step if isinstance(step, int) else logged

    def summary(self) -> dict[str, Any]:
        """The run's figures as plain values (used by the model card and the ``report`` command)."""
        losses = self.series("loss")
        scales = [value for _, value in self.series(names.LOSS_SCALE)]
        grad_norms = [value for _, value in self.series("grad_norm")]
        eval_losses = self.series("eval_loss")
        stop = self.event_digest.last_stop
        return {
            "steps": self.global_step,
            "stopped": stop["reason"] if stop else None,
            "first_loss": losses[0][1] if losses else None,
            "last_loss": losses[-1][1] if losses else None,
            "min_loss": min((value for _, value in losses), default=None),
            "last_eval_loss": eval_losses[-1][1] if eval_losses else None,
            "max_grad_norm": max(grad_norms, default=None),
            "skipped_steps": self.counter(names.SKIPPED_STEPS, "skip"),
            "rollbacks": self.counter(names.ROLLBACKS, "rollback"),
            "loss_scale_min": min(scales, default=None),
            "loss_scale_max": max(scales, default=None),
            "events": self.events,
            "superseded": [path.name for path in self.superseded],
            "excluded_samples": len((read_excluded(self.output_dir) or {}).get("samples", [])),
        }


def load_run(output_dir: str | os.PathLike) -> RunRecord:
    """Load a run directory; raises ``ValueError`` when it holds neither a trainer state nor events."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"`output_dir` {str(output_dir)!r} is not a directory.")
    state_path = _find_state(output_dir)
    digest = read_event_digest(output_dir)
    if state_path is None and not (output_dir / EVENTS_FILENAME).exists():
        raise ValueError(
            f"`output_dir` {str(output_dir)!r} holds no {STATE_FILENAME} (nor a checkpoint with one) and no "
            f"{EVENTS_FILENAME}: is it a training output directory?"
        )
    trainer_state: dict[str, Any] = {}
    if state_path is not None:
        try:
            trainer_state = json.loads(state_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{state_path} is not a valid trainer state: {error}") from error
        if not isinstance(trainer_state, dict):
            raise ValueError(f"{state_path} is not a valid trainer state: not a JSON object")
    return RunRecord(
        output_dir=output_dir,
        log_history=trainer_state.get("log_history", []),
        events=list(digest.recent),
        state_path=state_path,
        trainer_state=trainer_state,
        has_events_file=(output_dir / EVENTS_FILENAME).is_file(),
        superseded=superseded_event_files(output_dir),
        digest=digest,
    )


def read_excluded(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What the run left out (`EXCLUDED_FILENAME`, written by `hf_stability.exclude`), or ``None``."""
    path = Path(output_dir) / EXCLUDED_FILENAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("samples"), list) else None


def superseded_event_files(output_dir: Path) -> list[Path]:
    """The event files moved aside in ``output_dir`` (earlier runs, or steps replayed after a resume), oldest first."""
    return sorted(output_dir.glob(f"{SUPERSEDED_PREFIX}*.jsonl"))


def _find_state(output_dir: Path) -> Path | None:
    """``trainer_state.json`` of the output directory, else of its highest-numbered checkpoint."""
    if (output_dir / STATE_FILENAME).is_file():
        return output_dir / STATE_FILENAME
    checkpoints = sorted(
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and (path / STATE_FILENAME).is_file()
    )
    return checkpoints[-1][1] / STATE_FILENAME if checkpoints else None


def format_summary(run: RunRecord) -> str:
    """A short human-readable report of the run's loss and stability events."""
    figures = run.summary()
    lines = [f"Run: {run.output_dir}", f"  trainer state: {run.state_path or 'none found'}"]
    logged = len(run.series("loss"))
    lines.append(f"  last step: {figures['steps']} ({logged} training loss entr{'y' if logged == 1 else 'ies'} logged)")
    if figures["first_loss"] is not None:
        lines.append(
            f"  loss: first {figures['first_loss']:.4f}, last {figures['last_loss']:.4f}, min {figures['min_loss']:.4f}"
        )
    if figures["last_eval_loss"] is not None:
        lines.append(f"  eval loss: {figures['last_eval_loss']:.4f}")
    if figures["max_grad_norm"] is not None:
        lines.append(f"  max grad norm: {figures['max_grad_norm']:.4g}")
    lines.append(f"  skipped steps: {figures['skipped_steps']}")
    lines.append(f"  rollbacks: {figures['rollbacks']}")
    if figures["excluded_samples"]:
        lines.append(f"  excluded samples: {figures['excluded_samples']} (exclude_samples; `--bad-samples` lists "
                     "what the events named)")
    if figures["loss_scale_min"] is not None:
        lines.append(f"  loss scale: {figures['loss_scale_min']:g} .. {figures['loss_scale_max']:g}")
    lines += event_summary_lines(run.event_digest)
    if run.superseded:
        lines.append(f"  earlier events moved aside (not counted here): {', '.join(p.name for p in run.superseded)}")
    health = gradient_health(run)
    if health is not None:
        headline, *outliers = gradient_health_lines(health)
        lines += [f"  {headline}", *(f"    {line}" for line in outliers)]
    return "\n".join(lines)


def event_summary_lines(digest: EventDigest) -> list[str]:
    """Counts per event type and reason, the step range, then the most recent events (a capped listing)."""
    damaged = f"; {digest.damaged_lines} damaged line(s) skipped" if digest.damaged_lines else ""
    if not digest.total:
        return [f"  events: none{damaged}"]
    lines = [f"  events: {digest.total}, steps {digest.first_step} .. {digest.last_step}{damaged}"]
    groups = digest.counts.most_common()
    lines += [f"    {kind} ({reason}): {count}" for (kind, reason), count in groups[:_LISTED_REASON_GROUPS]]
    if len(groups) > _LISTED_REASON_GROUPS:
        rest = groups[_LISTED_REASON_GROUPS:]
        lines.append(f"    ... {len(rest)} more event/reason group(s), {sum(count for _, count in rest)} event(s)")
    shown = len(digest.recent)
    of_all = f" of {digest.total} (all are in {EVENTS_FILENAME})" if shown < digest.total else ""
    lines.append(f"  last {shown} event(s){of_all}:")
    for event in digest.recent:
        lines.append(f"    {event_line(event)}")
    return lines


def event_line(event: dict[str, Any]) -> str:
    """``step S: event (reason) -> restored step R`` and the event's other fields, cut to a readable length."""
    detail = f" -> restored step {event['restored_step']}" if "restored_step" in event else ""
    extra = {key: value for key, value in event.items() if key not in _LISTED_KEYS}
    text = json.dumps(extra, default=str)[:_EVENT_DETAIL_CHARS] if extra else ""
    return f"step {event['step']}: {event['event']} ({event['reason']}){detail}" + (f" {text}" if text else "")


@dataclass(frozen=True)
class LayerOutlier:
    """A layer whose gradient norm sits orders of magnitude off the median layer's over the run."""

    layer: str
    median_norm: float
    ratio: float  # median_norm / the median layer's

    @property
    def kind(self) -> str:
        return "vanishing" if self.ratio < 1 else "exploding"


@dataclass(frozen=True)
class GradientHealth:
    """Per-layer gradient norms of a run compared with the median layer (see `gradient_health`)."""

    layers: list[str]
    steps: int
    median_norm: float
    outliers: list[LayerOutlier]
    vanishing_ratio: float
    exploding_ratio: float


def layer_grad_norms(run: RunRecord) -> dict[str, list[tuple[int, float]]]:
    """``(step, norm)`` per layer, by name (numbers by value), from the ``stability/grad_norm/<parameter>`` entries.

    A layer is the module owning the parameters (``….attention.self.key`` for its ``weight`` and ``bias``) and
    its norm the Euclidean norm of theirs. Per parameter, an attention key bias, whose gradient is exactly 0 (softmax
    ignores a shift shared by all keys), would read as a vanishing layer in every healthy run. A step where one of
    a layer's norms is not finite is left out for that layer.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in run.log_history:
        if "step" not in entry:
            continue
        norms: dict[str, list[float]] = {}
        for key, value in entry.items():
            if key.startswith(names.LAYER_GRAD_NORM_PREFIX) and isinstance(value, (int, float)):
                parameter = key.removeprefix(names.LAYER_GRAD_NORM_PREFIX)
                norms.setdefault(parameter.rpartition(".")[0] or parameter, []).append(float(value))
        for layer, values in norms.items():
            norm = math.hypot(*values)
            if math.isfinite(norm):
                series.setdefault(layer, []).append((int(entry["step"]), norm))
    return {layer: series[layer] for layer in sorted(series, key=_natural_key)}


def _natural_key(name: str) -> list[tuple[int, str]]:
    """Sort key: digit runs read as numbers (``layer.2`` before ``layer.10``), an encoder before its decoder.

    ``trainer_state.json`` stores keys sorted as text, so the model's own order is not on disk; this one puts
    the input side first and each block's layers together.
    """
    name = name.replace("decoder", "encoder\x7f")  # right after "encoder" and everything under it
    return [(int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"(\d+)", name)]


def gradient_health(
    run: RunRecord, vanishing_ratio: float = VANISHING_RATIO, exploding_ratio: float = EXPLODING_RATIO
) -> GradientHealth | None:
    """Layers whose median gradient norm over the run is below ``vanishing_ratio`` or above ``exploding_ratio``
    times the median layer's; ``None`` when no per-layer norm was logged.

    Medians, over steps and over layers, so that a few spiky steps or a handful of odd layers do not move the
    reference the way a mean would.
    """
    if not 0 < vanishing_ratio < 1:
        raise ValueError(f"`vanishing_ratio` must be in (0, 1), got {vanishing_ratio!r}.")
    if not exploding_ratio > 1:
        raise ValueError(f"`exploding_ratio` must be above 1, got {exploding_ratio!r}.")
    series = layer_grad_norms(run)
    if not series:
        return None
    medians = {layer: statistics.median(norm for _, norm in points) for layer, points in series.items()}
    reference = statistics.median(medians.values())
    outliers = []
    for layer, norm in medians.items():
        ratio = norm / reference if reference > 0 else (math.inf if norm > 0 else 1.0)
        if not vanishing_ratio <= ratio <= exploding_ratio:
            outliers.append(LayerOutlier(layer, norm, ratio))
    steps = len({step for points in series.values() for step, _ in points})
    return GradientHealth(list(series), steps, reference, outliers, vanishing_ratio, exploding_ratio)


def gradient_health_lines(health: GradientHealth, code: Callable[[str], str] = str) -> list[str]:
    """A headline, then one line per flagged layer (``code`` formats a layer name, e.g. in backticks)."""
    headline = (
        f"per-layer gradient norms: {len(health.layers)} layers over {health.steps} logged steps, median layer "
        f"{health.median_norm:.3g}; "
    )
    bounds = f"{health.vanishing_ratio:g}x .. {health.exploding_ratio:g}x the median layer"
    if not health.outliers:
        return [headline + f"every layer's median norm within {bounds}"]
    lines = [headline + f"{len(health.outliers)} layer(s) outside {bounds}:"]
    for outlier in health.outliers:
        lines.append(
            f"{outlier.kind}: {code(outlier.layer)} median norm {outlier.median_norm:.3g} "
            f"({outlier.ratio:.2g}x the median layer)"
        )
    return lines


def plot_training_curves(run: RunRecord, path: str | os.PathLike | None = None) -> Path:
    """Draw loss (and grad norm / loss scale when logged) with skip and rollback markers; return the PNG path."""
    matplotlib = require("matplotlib", "plot", "Plotting training curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path) if path is not None else run.output_dir / PLOT_FILENAME
    figure = draw_training_curves(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def draw_training_curves(run: RunRecord) -> Any:
    """The figure `plot_training_curves` saves: one panel per scale, each with its own legend.

    With per-layer gradient norms logged (``log_layer_grad_norms``), a last panel maps them (layer x step,
    log colour scale), with the layers `gradient_health` flags outlined in red.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    losses, eval_losses = run.series("loss"), run.series("eval_loss")
    grad_norms, scales = run.series("grad_norm"), run.series(names.LOSS_SCALE)
    layer_norms = layer_grad_norms(run)
    heights = [3.2] * (2 if grad_norms or scales else 1)
    if layer_norms:
        heights.append(max(3.2, 1.2 + _HEAT_MAP_ROW_INCHES * min(len(layer_norms), _NAMED_LAYER_ROWS)))
    figure = plt.figure(figsize=(10, sum(heights)), layout="constrained")  # aligns panels and fits long labels
    grid = figure.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[1, 0.015])
    loss_axis = figure.add_subplot(grid[0, 0])
    axes = [loss_axis] + [figure.add_subplot(grid[row, 0], sharex=loss_axis) for row in range(1, len(heights))]
    if losses:
        loss_axis.plot(*_xy(losses), label="training loss", color="tab:blue")
    if eval_losses:
        loss_axis.plot(*_xy(eval_losses), "o", label="eval loss", color="tab:green")
    loss_axis.set_ylabel("loss")
    loss_axis.set_title(f"{run.output_dir.name}: loss with stability events")
    for axis in axes:
        _mark_events(axis, run)
    if grad_norms or scales:
        lower = axes[1]
        if grad_norms:
            lower.semilogy(*_xy(grad_norms), color="tab:purple", label="grad norm (before clipping)")
            lower.set_ylabel("grad norm")
            _readable_log_ticks(lower, [value for _, value in grad_norms])
        if scales:
            scale_axis = lower.twinx() if grad_norms else lower
            scale_axis.semilogy(*_xy(scales), color="tab:orange", drawstyle="steps-post", label="loss scale")
            scale_axis.set_ylabel("loss scale")
            _readable_log_ticks(scale_axis, [value for _, value in scales])
    health = gradient_health(run)  # None exactly when no layer norm was logged
    if layer_norms and health is not None:
        _draw_layer_heat_map(figure, axes[-1], figure.add_subplot(grid[-1, 1]), layer_norms, health)
    for axis in axes[:-1]:
        axis.tick_params(labelbottom=False)
    axes[-1].set_xlabel("step")
    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers (axes share x)
    for axis in axes[: len(axes) - bool(layer_norms)]:
        _panel_legend(figure, axis)
    return figure


def _draw_layer_heat_map(
    figure: Any, axis: Any, colour_axis: Any, series: dict[str, list[tuple[int, float]]], health: GradientHealth
) -> None:
    """Layer x step map of gradient norms on a log colour scale; rows in model order, flagged layers outlined.

    Up to `_NAMED_LAYER_ROWS` layers each get their name; beyond that one label per block (the name up to its
    layer index, e.g. ``bert.encoder.layer.3``), with a line between blocks.
    """
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    layers = list(series)
    steps = sorted({step for points in series.values() for step, _ in points})
    column = {step: index for index, step in enumerate(steps)}
    grid = np.full((len(layers), len(steps)), np.nan)
    for row, layer in enumerate(layers):
        for step, value in series[layer]:
            grid[row, column[step]] = value
    shown = np.ma.masked_where(~(grid > 0), grid)  # a zero norm has no place on a log scale: left blank
    norm = LogNorm(*((shown.min(), shown.max()) if shown.count() else (1e-3, 1.0)))
    mesh = axis.pcolormesh(_edges(steps), np.arange(len(layers) + 1), shown, norm=norm, cmap="viridis")
    axis.set_ylim(len(layers), 0)  # the first layer (the input side) on top
    figure.colorbar(mesh, cax=colour_axis, label="layer grad norm")
    flagged = {outlier.layer: outlier.kind for outlier in health.outliers}
    for row, layer in enumerate(layers):
        if layer in flagged:
            axis.add_patch(Rectangle((steps[0] - 0.5, row), steps[-1] - steps[0] + 1, 1, fill=False, color="red"))
    blocks = [_block_of(layer) for layer in layers]
    starts = [row for row in range(len(layers)) if row == 0 or blocks[row] != blocks[row - 1]]
    for row in starts[1:]:
        axis.axhline(row, color="white", linewidth=0.6)
    if len(layers) <= _NAMED_LAYER_ROWS:
        axis.set_yticks(np.arange(len(layers)) + 0.5, layers, fontsize=6)
        for label, layer in zip(axis.get_yticklabels(), layers, strict=True):
            if layer in flagged:
                label.set_color("red")
    else:
        ends = [*starts[1:], len(layers)]
        axis.set_yticks(
            [(start + end) / 2 for start, end in zip(starts, ends, strict=True)],
            [blocks[row] for row in starts],
            fontsize=6,
        )
    title = f"per-layer gradient norm ({len(layers)} layers"
    if flagged:
        bounds = f"{health.vanishing_ratio:g}x .. {health.exploding_ratio:g}x"
        title += f"; red: {len(flagged)} beyond {bounds} the median layer"
    axis.set_title(title + ")", fontsize="medium")


def _edges(steps: list[int]) -> list[float]:
    """Cell boundaries halfway between logged steps, so that each cell is centred on its step."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    middles = [(left + right) / 2 for left, right in zip(steps[:-1], steps[1:], strict=True)]
    return [2 * steps[0] - middles[0], *middles, 2 * steps[-1] - middles[-1]]


def _block_of(layer: str) -> str:
    """The layer's block: its name up to the first numeric part (``….layer.3``), else its first two parts."""
    parts = layer.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:2])


def _panel_legend(figure: Any, axis: Any) -> None:
    """One legend per panel, gathering the panel's twin axis (same position) and skipping repeated labels."""
    handles, labels = [], []
    for other in figure.axes:
        if other.get_position().bounds != axis.get_position().bounds:
            continue
        for handle, label in zip(*other.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        axis.legend(handles, labels, loc="upper right", fontsize="small", framealpha=0.9)


def _readable_log_ticks(axis: Any, values: list[float]) -> None:
    """Plain-number ticks on a log axis: 1-2-5 steps over decades, finer steps when the data spans less.

    Matplotlib's default labels only powers of ten, so a norm between 0.3 and 0.9 gets no label at all.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [value for value in values if value > 0]
    spread = max(positive) / min(positive) if positive else 10.0
    if spread < 2:
        subs = tuple(step / 2 for step in range(2, 20))  # 1, 1.5, 2, …, 9.5
    elif spread < 10:
        subs = tuple(float(step) for step in range(1, 10))
    else:
        subs = (1.0, 2.0, 5.0)
    axis.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=15))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_formatter(NullFormatter())


def _xy(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [step for step, _ in points], [value for _, value in points]


def _mark_events(axis: Any, run: RunRecord) -> None:
    """A line per skip and rollback (and the span a rollback went back over), or counts per bin when many."""
    steps = run.event_digest.steps
    marks = (("skip", "tab:red", ":", "skipped step"), ("rollback", "black", "--", "rollback"))
    for kind, colour, style, label in marks:
        if len(steps[kind]) > MAX_EVENT_LINES:
            _mark_event_bins(axis, steps[kind], colour, label, from_top=kind == "rollback")
            continue
        for index, step in enumerate(steps[kind]):
            axis.axvline(step, color=colour, linestyle=style, linewidth=1, label=label if index == 0 else None)
    if len(steps["rollback"]) <= MAX_EVENT_LINES:
        pairs = zip(steps["rollback"], steps["restored_step"], strict=True)
        spans = [(restored, step) for step, restored in pairs if restored >= 0]
        for index, (restored, step) in enumerate(spans):
            axis.axvspan(restored, step, color="grey", alpha=0.15, label="rolled back span" if index == 0 else None)


def _mark_event_bins(axis: Any, steps: Any, colour: str, label: str, from_top: bool) -> None:
    """Bars up to a quarter of the panel's height counting the events per bin of steps (`EVENT_BINS` at most),
    from the bottom edge, or hanging from the top edge (``from_top``) so that two kinds do not hide each other."""
    import numpy as np

    values = np.frombuffer(steps, dtype=np.int64)
    low, high = int(values.min()), int(values.max()) + 1
    counts, edges = np.histogram(values, bins=min(EVENT_BINS, high - low), range=(low, high))
    top = counts.max()
    first = True
    for count, left, right in zip(counts, edges[:-1], edges[1:], strict=True):
        if count:
            height = 0.25 * count / top
            axis.axvspan(left, right, ymin=1 - height if from_top else 0, ymax=1 if from_top else height,
                         color=colour, alpha=0.6, linewidth=0,
                         label=f"{label}s per bin ({len(values)} in all, highest bar {top})" if first else None)
            first = False
