"""A bounded summary of ``stability_events.jsonl`` for reports, read as a stream.

A run can write millions of events (a skip on every step of a long run), so the report neither keeps every event
nor draws one line per event: it streams the file once and keeps counts per event type and reason, the first and
last step, the `RECENT_EVENTS` most recent events in full, and the steps of the events it plots (8 bytes each,
drawn as counts per bin of steps). A million events read in seconds and a few MB. Reasons are counted by their
text with the numbers left out (``loss # above threshold # at step #``), as a rollback's reason names its own
values; at most `MAX_REASON_GROUPS` groups are kept, further ones are counted as ``other reasons``.

Every line is checked on the way, beyond being JSON (as `hf_stability.events.read_events` checks): ``step`` (and
a rollback's ``restored_step``) must be a non-negative integer, ``event`` and ``reason`` strings. A line that is
not is skipped with a warning naming it, so one damaged line never aborts a report; the first `WARNED_LINES` get
a warning each, the rest one warning with their count.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from array import array
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_stability.events import EVENTS_FILENAME

RECENT_EVENTS = 10
WARNED_LINES = 5
MAX_REASON_GROUPS = 100
OTHER_REASONS = "other reasons"
# A number standing on its own (not part of a name such as ``fp16_overflow``).
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")
# Events whose steps the plot marks; their steps are kept (as int64) for it.
PLOTTED_EVENTS = ("skip", "rollback")


def reason_group(reason: str) -> str:
    """``reason`` with each number replaced by ``#``: the reasons of one kind of intervention read the same."""
    return _NUMBER.sub("#", reason)


def event_problem(record: Any) -> str | None:
    """Why a parsed line is not an event a report can use, or ``None`` when it is one."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key in ("step", "restored_step"):
        value = record.get(key)
        if (key == "step" or value is not None) and (type(value) is not int or value < 0):
            return f"`{key}` is {value!r}, not a non-negative integer"
    for key in ("event", "reason"):
        if not isinstance(record.get(key), str):
            return f"`{key}` is {record.get(key)!r}, not a string"
    return None


@dataclass
class EventDigest:
    """What a report needs of a run's events, in memory bounded by the count of plotted events' steps."""

    total: int = 0
    # (event, reason group) -> number of events, in order of first appearance (see `reason_group`).
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    first_step: int | None = None
    last_step: int | None = None
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    # event kind (of PLOTTED_EVENTS) -> the steps of its events; "restored_step" -> each rollback's (-1: none).
    steps: dict[str, array] = field(
        default_factory=lambda: {kind: array("q") for kind in (*PLOTTED_EVENTS, "restored_step")}
    )
    last_stop: dict[str, Any] | None = None
    damaged_lines: int = 0
    # reason -> its group, for the reasons seen first (most runs repeat a handful of reasons millions of times).
    _groups: dict[str, str] = field(default_factory=dict, repr=False)

    def add(self, event: dict[str, Any]) -> None:
        """Count one valid event (see `event_problem`)."""
        step, kind = event["step"], event["event"]
        self.total += 1
        reason = event["reason"]
        group = self._groups.get(reason)
        if group is None:
            group = reason_group(reason)
            if len(self._groups) < MAX_REASON_GROUPS:
                self._groups[reason] = group
        key = (kind, group)
        if key not in self.counts and len(self.counts) >= MAX_REASON_GROUPS:
            key = (kind, OTHER_REASONS)
        self.counts[key] += 1
        if self.first_step is None or step < self.first_step:
            self.first_step = step
        if self.last_step is None or step > self.last_step:
            self.last_step = step
        self.recent.append(event)
        if kind in PLOTTED_EVENTS:
            self.steps[kind].append(step)
            if kind == "rollback":
                self.steps["restored_step"].append(event.get("restored_step", -1))
        elif kind == "stop":
            self.last_stop = event

    def count(self, kind: str) -> int:
        """Number of events of type ``kind``."""
        return sum(count for (event, _), count in self.counts.items() if event == kind)

    @classmethod
    def of(cls, events: Iterable[dict[str, Any]]) -> EventDigest:
        """The digest of events already in memory (those `read_events` returned); unusable ones are left out."""
        digest = cls()
        for event in events:
            if event_problem(event) is None:
                digest.add(event)
            else:
                digest.damaged_lines += 1
        return digest


def read_event_digest(path: str | os.PathLike) -> EventDigest:
    """Stream a ``stability_events.jsonl`` file (or the one in a run's output directory) into an `EventDigest`.

    A missing file means no events. A line that is not valid JSON, is torn (a crash mid-write) or fails
    `event_problem` is skipped with a warning naming it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILENAME
    digest = EventDigest()
    if not path.exists():
        return digest
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            problem: str | None
            try:
                record = json.loads(raw)  # bytes: a line that is not UTF-8 raises a ValueError too
            except ValueError:
                problem = "not valid JSON" if raw.endswith(b"\n") else "a torn last line (a crash while writing?)"
            else:
                problem = event_problem(record)
                if problem is None:
                    digest.add(record)
                    continue
            digest.damaged_lines += 1
            if digest.damaged_lines <= WARNED_LINES:
                line = raw.decode("utf-8", errors="replace")[:80]  # a binary line is one damaged line, not an abort
                warnings.warn(f"{path}: skipping line {number} ({problem}): {line!r}", UserWarning, stacklevel=2)
    if digest.damaged_lines > WARNED_LINES:
        warnings.warn(
            f"{path}: skipped {digest.damaged_lines - WARNED_LINES} more damaged line(s), "
            f"{digest.damaged_lines} in all.",
            UserWarning,
            stacklevel=2,
        )
    return digest
