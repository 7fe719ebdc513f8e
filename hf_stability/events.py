"""`stability_events.jsonl`: one JSON object per skip or rollback, appended as it happens.

The file is append-only and flushed per event, so a crash loses at most the line being written;
:func:`read_events` accepts such a torn last line with a warning.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EVENTS_FILENAME = "stability_events.jsonl"
REQUIRED_KEYS = ("step", "event", "reason")


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/Inf; write them as strings so the file stays valid for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class StabilityEventLog:
    """Appends events to ``<output_dir>/stability_events.jsonl``.

    Call :meth:`append` on the process that should write (the main process); the other ranks'
    view of an event travels in its fields (e.g. ``ranks``).
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / EVENTS_FILENAME

    def append(self, step: int, event: str, reason: str, **fields: Any) -> dict[str, Any]:
        record = {"step": int(step), "event": event, "reason": reason, "time": time.time(), **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
            handle.flush()
        return record


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``stability_events.jsonl`` file, or the one inside a run's output directory.

    A missing file means no events. A torn last line (a crash mid-write) is dropped with a
    warning; a corrupt line anywhere else raises ``ValueError`` naming the line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILENAME
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    # Every complete event ends with a newline; a last line without one was cut off mid-write.
    torn_tail = bool(text) and not text.endswith("\n")
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or any(key not in record for key in REQUIRED_KEYS):
                raise ValueError(f"expected an object with keys {REQUIRED_KEYS}")
        except ValueError as error:
            if number == len(lines) and torn_tail:
                warnings.warn(f"{path}: ignoring a torn last line {number} (a crash while writing?)", stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not a valid stability event: {error}") from error
        events.append(record)
    return events
