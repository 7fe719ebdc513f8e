"""Read a finished (or crashed) run back from its output directory: summary and training curves.

Works for any run that used the stability callbacks — `StabilityTrainer`, a recipe, or a plain
`Trainer` with callbacks: the logged history comes from ``trainer_state.json`` (in the output directory,
else in its newest ``checkpoint-*``) and the events from ``stability_events.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_stability._extras import require
from hf_stability.events import EVENTS_FILENAME, read_events

STATE_FILENAME = "trainer_state.json"
PLOT_FILENAME = "training_curves.png"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class RunRecord:
    """What a run left on disk: the Trainer's logged history and the stability events."""

    output_dir: Path
    log_history: list[dict[str, Any]]
    events: list[dict[str, Any]]
    state_path: Path | None

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every finite logged value of ``key``."""
        points = []
        for entry in self.log_history:
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value) and "step" in entry:
                points.append((int(entry["step"]), float(value)))
        return points

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("event") == kind]

    def counter(self, key: str, kind: str) -> int:
        """Final value of a cumulative ``stability/...`` counter; the event count when it was never logged."""
        logged = self.series(key)
        return int(logged[-1][1]) if logged else len(self.events_of(kind))

    def summary(self) -> dict[str, Any]:
        """The run's figures as plain values (used by the model card and the ``report`` command)."""
        losses = self.series("loss")
        scales = [value for _, value in self.series("stability/loss_scale")]
        grad_norms = [value for _, value in self.series("grad_norm")]
        eval_losses = self.series("eval_loss")
        last_step = max((int(entry.get("step", 0)) for entry in self.log_history), default=0)
        return {
            "steps": last_step,
            "first_loss": losses[0][1] if losses else None,
            "last_loss": losses[-1][1] if losses else None,
            "min_loss": min((value for _, value in losses), default=None),
            "last_eval_loss": eval_losses[-1][1] if eval_losses else None,
            "max_grad_norm": max(grad_norms, default=None),
            "skipped_steps": self.counter("stability/skipped_steps", "skip"),
            "rollbacks": self.counter("stability/rollbacks", "rollback"),
            "loss_scale_min": min(scales, default=None),
            "loss_scale_max": max(scales, default=None),
            "events": self.events,
        }


def load_run(output_dir: str | os.PathLike) -> RunRecord:
    """Load a run directory; raises ``ValueError`` when it holds neither a trainer state nor events."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"`output_dir` {str(output_dir)!r} is not a directory.")
    state_path = _find_state(output_dir)
    events = read_events(output_dir)
    if state_path is None and not (output_dir / EVENTS_FILENAME).exists():
        raise ValueError(
            f"`output_dir` {str(output_dir)!r} holds no {STATE_FILENAME} (nor a checkpoint with one) and no "
            f"{EVENTS_FILENAME}: is it a training output directory?"
        )
    log_history: list[dict[str, Any]] = []
    if state_path is not None:
        try:
            log_history = json.loads(state_path.read_text(encoding="utf-8")).get("log_history", [])
        except (json.JSONDecodeError, AttributeError) as error:
            raise ValueError(f"{state_path} is not a valid trainer state: {error}") from error
    return RunRecord(output_dir=output_dir, log_history=log_history, events=events, state_path=state_path)


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
    lines.append(f"  steps logged: {figures['steps']}")
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
    if figures["loss_scale_min"] is not None:
        lines.append(f"  loss scale: {figures['loss_scale_min']:g} .. {figures['loss_scale_max']:g}")
    lines.append(f"  events ({len(run.events)}):")
    for event in run.events:
        detail = f" -> restored step {event['restored_step']}" if "restored_step" in event else ""
        lines.append(f"    step {event['step']}: {event['event']} ({event['reason']}){detail}")
    if not run.events:
        lines.append("    none")
    return "\n".join(lines)


def plot_training_curves(run: RunRecord, path: str | os.PathLike | None = None) -> Path:
    """Draw loss (and grad norm / loss scale when logged) with skip and rollback markers; return the PNG path."""
    matplotlib = require("matplotlib", "plot", "Plotting training curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path) if path is not None else run.output_dir / PLOT_FILENAME
    losses, eval_losses = run.series("loss"), run.series("eval_loss")
    grad_norms, scales = run.series("grad_norm"), run.series("stability/loss_scale")
    panels = 2 if grad_norms or scales else 1
    figure, axes = plt.subplots(panels, 1, figsize=(9, 3.2 * panels), sharex=True, squeeze=False)
    loss_axis = axes[0][0]
    if losses:
        loss_axis.plot(*_xy(losses), label="training loss", color="tab:blue")
    if eval_losses:
        loss_axis.plot(*_xy(eval_losses), "o", label="eval loss", color="tab:green")
    loss_axis.set_ylabel("loss")
    loss_axis.set_title(f"{run.output_dir.name}: loss with stability events")
    for row in axes:
        _mark_events(row[0], run)
    if panels == 2:
        lower = axes[1][0]
        if grad_norms:
            lower.semilogy(*_xy(grad_norms), color="tab:purple", label="grad norm")
            lower.set_ylabel("grad norm")
        if scales:
            scale_axis = lower.twinx() if grad_norms else lower
            scale_axis.semilogy(*_xy(scales), color="tab:orange", drawstyle="steps-post", label="loss scale")
            scale_axis.set_ylabel("loss scale")
        lower.set_xlabel("step")
    else:
        loss_axis.set_xlabel("step")
    handles, labels = [], []
    for axis in figure.axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    loss_axis.legend(handles, labels, loc="upper right", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _xy(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [step for step, _ in points], [value for _, value in points]


def _mark_events(axis: Any, run: RunRecord) -> None:
    for index, event in enumerate(run.events_of("skip")):
        axis.axvline(
            event["step"], color="tab:red", linestyle=":", linewidth=1, label="skipped step" if index == 0 else None
        )
    for index, event in enumerate(run.events_of("rollback")):
        axis.axvline(
            event["step"], color="black", linestyle="--", linewidth=1, label="rollback" if index == 0 else None
        )
        if "restored_step" in event:
            axis.axvspan(
                event["restored_step"],
                event["step"],
                color="grey",
                alpha=0.15,
                label="rolled back span" if index == 0 else None,
            )
