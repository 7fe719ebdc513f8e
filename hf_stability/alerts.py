"""Alerts on stability events: ``wandb.alert`` when W&B is active, and any callable registered on the trainer.

`StabilityTrainer` listens to its events file (`hf_stability.events.add_listener`) on the main process only,
for the events named in ``stability_alerts``. A ``skip_burst`` alert fires when ``stability_alert_skip_burst``
skips fall within ``stability_alert_skip_window`` steps. Alerts of one event are rate-limited: within
``stability_alert_interval`` seconds of the last one they are held back and counted in the next. Each alert
carries the step, the event's reason and the doctor's top finding at that moment, so a Slack or PagerDuty
hook is a plain function (``trainer.on_stability_event(post_to_slack)``). W&B offline just records the alert.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_stability._logging import get_logger
from hf_stability.settings import AlertSettings

logger = get_logger(__name__)


@dataclass(frozen=True)
class StabilityAlert:
    """What a hook receives: the alerting event (``kind`` is the event, or ``skip_burst``) and the doctor's view."""

    kind: str
    step: int
    title: str
    text: str
    event: dict[str, Any]
    top_finding: str | None
    held_back: int  # alerts of this kind held back by the rate limit since the previous one


AlertHook = Callable[[StabilityAlert], None]


class StabilityAlerts:
    """The events-file listener that decides which events alert and sends them (see the module docstring).

    ``history`` returns the run's log history so far (for the doctor's top finding); ``clock`` is the time source
    of the rate limit.
    """

    def __init__(self, settings: AlertSettings, output_dir: str, hooks: list[AlertHook],
                 history: Callable[[], list[dict[str, Any]]], use_wandb: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.output_dir = Path(output_dir)
        self.hooks = hooks
        self.history = history
        self.use_wandb = use_wandb
        self.clock = clock
        self._skip_steps: deque[int] = deque()
        self._last_sent: dict[str, float] = {}
        self._held_back: dict[str, int] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        kind = self._alert_kind(event)
        if kind is None:
            return
        now = self.clock()
        last = self._last_sent.get(kind)
        if last is not None and now - last < self.settings.stability_alert_interval:
            self._held_back[kind] = self._held_back.get(kind, 0) + 1
            return
        self._last_sent[kind] = now
        self._send(self._build(kind, event, self._held_back.pop(kind, 0)))

    def _alert_kind(self, event: dict[str, Any]) -> str | None:
        names, step = self.settings.event_names, event["step"]
        if event["event"] == "skip" and "skip_burst" in names:
            self._skip_steps.append(step)
            while self._skip_steps and self._skip_steps[0] <= step - self.settings.stability_alert_skip_window:
                self._skip_steps.popleft()
            if len(self._skip_steps) >= self.settings.stability_alert_skip_burst:
                self._skip_steps.clear()  # the next burst counts afresh
                return "skip_burst"
        return event["event"] if event["event"] in names else None

    def _build(self, kind: str, event: dict[str, Any], held_back: int) -> StabilityAlert:
        from hf_stability.doctor import diagnose
        from hf_stability.report import RunRecord

        step = event["step"]
        burst, window = self.settings.stability_alert_skip_burst, self.settings.stability_alert_skip_window
        what = f"{burst} skipped steps within {window} steps" if kind == "skip_burst" else event["event"]
        try:
            run = RunRecord(self.output_dir, list(self.history()), [], None, has_events_file=True)
            findings = diagnose(run)
        except Exception as error:  # an alert goes out even when the record cannot be diagnosed
            logger.warning("Stability alert: the doctor failed (%r); alerting without a finding.", error)
            findings = []
        top = findings[0].headline() if findings else None
        text = f"Step {step}: {what}. Cause recorded: {event['reason']}"
        text += f"\nDoctor's top finding: {top}" if top else "\nDoctor: no finding yet."
        if held_back:
            text += f"\n({held_back} earlier {kind} alert(s) held back by the rate limit.)"
        title = f"hf-stability: {what} at step {step} ({self.output_dir.name})"
        return StabilityAlert(kind, step, title, text, event, top, held_back)

    def _send(self, alert: StabilityAlert) -> None:
        """To W&B (titles must be under 64 characters there) and to every hook; a failure of one spares the rest."""
        wandb = sys.modules.get("wandb")  # imported by Trainer's WandbCallback when W&B is active
        if self.use_wandb and wandb is not None and getattr(wandb, "run", None) is not None:
            level = "ERROR" if alert.kind == "stop" else "WARN"
            try:
                wandb.alert(title=alert.title[:63], text=alert.text, level=level)
            except Exception as error:  # no network, a closed run: the callables still get it
                logger.warning("wandb.alert failed: %r", error)
        for hook in self.hooks:
            try:
                hook(alert)
            except Exception as error:  # a broken hook must not stop training or the other hooks
                logger.warning("Stability alert hook %r failed: %r", hook, error)


def uses_wandb(args: Any) -> bool:
    """Whether Trainer reports to W&B with these arguments (``report_to`` holds ``wandb`` or ``all``)."""
    report_to = getattr(args, "report_to", None) or []
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)
    return "wandb" in report_to or "all" in report_to


def training_settings(args: Any) -> dict[str, Any]:
    """The arguments the doctor's remedies can speak to (an output directory alone does not record them)."""
    names = ("learning_rate", "adam_beta2", "adam_epsilon", "max_grad_norm", "warmup_steps", "fp16", "bf16")
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def publish_diagnosis(trainer: Any) -> None:
    """Put the doctor's findings on the active W&B run's summary (``stability/diagnosis``, ``stability/findings``).

    Called by `StabilityTrainer.train` at the end of training on the main process; nothing without W&B.
    """
    wandb = sys.modules.get("wandb")
    if not uses_wandb(trainer.args) or wandb is None or getattr(wandb, "run", None) is None:
        return
    from hf_stability._compat import output_dir
    from hf_stability.doctor import diagnose, format_findings
    from hf_stability.report import RunRecord

    run = RunRecord(Path(output_dir(trainer.args)), list(trainer.state.log_history), [], None, has_events_file=True)
    findings = diagnose(run, training_settings(trainer.args))
    wandb.run.summary["stability/findings"] = len(findings)
    wandb.run.summary["stability/diagnosis"] = "\n".join(format_findings(findings))
