"""`DeepSpeedSkipStage`: under DeepSpeed, the guard's ``skip`` stage is the engine's own overflow skip, recorded.

accelerate runs ``engine.step()`` inside ``backward`` (SPEC §5), so nothing can skip a DeepSpeed step; the engine
skips non-finite steps itself where its check exists (`hf_stability.deepspeed.overflow_skip`). This stage puts the
engine's decision (``optimizer.step_was_skipped``: the same on every rank, a host attribute, no device sync) into
the step's record, counts and reports it (a ``skip`` event) and offers ``stability/skipped_steps`` to the log
entry. `hf_stability.callbacks.deepspeed_telemetry.DeepSpeedSkipTelemetryCallback` is its facade.
"""

from __future__ import annotations

from typing import Any

from hf_stability import metric_names as names
from hf_stability.events import StabilityEventLog
from hf_stability.step.guard import Metric, StageHooks, StepRecord

REASON = "deepspeed_overflow"


class DeepSpeedSkipStage(StageHooks):
    """Counts the steps DeepSpeed skipped (``skipped_steps``, across the runs of this object) and reports each."""

    def __init__(self) -> None:
        self.skipped_steps = 0
        self._optimizer: Any = None
        self._events: StabilityEventLog | None = None

    def begin_run(self, optimizer: Any, events: StabilityEventLog | None) -> None:
        """The run's (DeepSpeed-wrapped) optimizer, and its events file (``None`` off the main process)."""
        self._optimizer, self._events = optimizer, events

    def skipped(self) -> bool:
        """Whether the engine skipped the step just taken."""
        return bool(getattr(self._optimizer, "step_was_skipped", False))

    def update_applied(self, record: StepRecord) -> None:
        """Put the engine's decision in the step's record: spike rollback judges no loss of a step DeepSpeed skipped."""
        if self.skipped():
            record.decide(True, REASON)

    def report(self, step: int) -> None:
        """At the step's end, before the spike check: count the engine's skip of ``step`` and write its event."""
        if not self.skipped():
            return
        self.skipped_steps += 1
        if self._events is not None:
            self._events.append(step, "skip", REASON, engine="deepspeed", skipped_steps=self.skipped_steps)

    def metrics(self) -> dict[str, Metric]:
        return {names.SKIPPED_STEPS: self.skipped_steps}
