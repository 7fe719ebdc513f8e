"""`stability_events.jsonl`: one JSON object per skip, rollback or stop, appended as it happens.

Guarantees:

- Append-only and flushed per event, so a crash loses at most the line being written. :func:`read_events`
  accepts such a torn last line, and a corrupt line anywhere, with a warning naming the line: neither
  aborts training nor a report.
- One file, one run: when training begins (`StabilityEventLog.start_run`, called by the callbacks on the
  main process) the file is brought in line with the state the run starts from. Events after a resumed
  checkpoint's step (written by the run that went on past it) are superseded, a fresh run (step 0)
  supersedes every earlier event, and a torn or corrupt line is removed before anything is appended.
  Nothing is deleted: removed lines are moved, verbatim, to a sibling file
  ``stability_events.superseded-<UTC time>.jsonl``, and a warning names it.
- A side file never stops training: when a write fails (full disk, quota, file-size limit) the events are
  kept in this process's memory, a warning says so once per file, and the held events are written, in
  order and before anything newer, at the next append or at the end of training (`StabilityEventLog.flush`).
  Until then :func:`read_events` in the same process returns them after the file's, so the report and the
  model card written at the end of training still see every event. A failed write leaves no torn line: the
  file is cut back to where it was.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

EVENTS_FILENAME = "stability_events.jsonl"
# The samples the events blamed (written by `hf_stability.samples`, read by the doctor and the report); named here,
# in this light module, so that reading a run never imports torch.
BAD_SAMPLES_FILENAME = "stability_bad_samples.json"
SUPERSEDED_PREFIX = "stability_events.superseded-"
REQUIRED_KEYS = ("step", "event", "reason")
# Resolved events file -> callables told of each event appended to it (alerts: `hf_stability.alerts`).
_LISTENERS: dict[Path, list[Callable[[dict[str, Any]], None]]] = {}


def add_listener(output_dir: str | os.PathLike, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
    """Call ``listener(event)`` after each event appended to ``output_dir``'s events file; returns its remover.

    Events are written wherever a callback creates a `StabilityEventLog`, so listening by file is the one seam
    that sees every event. A listener that raises is reported as a warning and never stops training.
    """
    path = (Path(output_dir) / EVENTS_FILENAME).resolve()
    _LISTENERS.setdefault(path, []).append(listener)

    def remove() -> None:
        listeners = _LISTENERS.get(path, [])
        if listener in listeners:
            listeners.remove(listener)
        if not listeners:
            _LISTENERS.pop(path, None)

    return remove

# Per events file (resolved path): the JSON lines this process could not write yet, oldest first.
_HELD: dict[Path, list[str]] = {}
# Events files whose write failure was already warned about (once per file and process).
_WARNED: set[Path] = set()


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/Inf; write them as strings so the file stays valid for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _parse(line: str) -> dict[str, Any] | None:
    """The event on ``line``, or ``None`` when it is not one (bad JSON, not an object, a key missing)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or any(key not in record for key in REQUIRED_KEYS):
        return None
    return record


def _lines(text: str) -> list[tuple[int, str, bool]]:
    """``(number, line, complete)`` of each non-blank line: a last line without its newline was cut off."""
    lines = text.split("\n")
    return [(number, line, number < len(lines)) for number, line in enumerate(lines, start=1) if line.strip()]


class StabilityEventLog:
    """Appends events to ``<output_dir>/stability_events.jsonl``.

    Call :meth:`append` on the process that should write (the main process); the other ranks'
    view of an event travels in its fields (e.g. ``ranks``).
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / EVENTS_FILENAME

    def append(self, step: int, event: str, reason: str, **fields: Any) -> dict[str, Any]:
        """Append one event (after any held ones); a failed write holds it in memory instead of raising."""
        record = {"step": int(step), "event": event, "reason": reason, "time": time.time(), **fields}
        _HELD.setdefault(self.path.resolve(), []).append(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self.flush()
        for listener in list(_LISTENERS.get(self.path.resolve(), ())) if _LISTENERS else ():
            try:
                listener(record)
            except Exception as error:  # an alert hook must not end the run it reports on
                warnings.warn(f"stability event listener {listener!r} failed: {error!r}", UserWarning, stacklevel=2)
        return record

    def flush(self) -> bool:
        """Write the events held after failed writes; True when none is left held (warned once per file if not)."""
        key = self.path.resolve()
        held = _HELD.get(key)
        if not held:
            return True
        data = "".join(held).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _append_whole(self.path, data)
        except OSError as error:
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(
                    f"{self.path}: could not write stability events ({error}); training goes on and the counters "
                    f"are kept. {len(held)} event(s) are held in memory and written at the next event or at the end "
                    "of training once the file can be written.",
                    UserWarning,
                    stacklevel=3,
                )
            return False
        if key in _WARNED:
            _WARNED.discard(key)
            warnings.warn(f"{self.path}: writable again; wrote {len(held)} pending event(s).", UserWarning,
                          stacklevel=3)
        del _HELD[key]
        return True

    def start_run(self, step: int) -> Path | None:
        """Keep only the events of steps up to ``step``, the step training starts from; move the rest aside.

        ``step`` is 0 for a fresh run (every earlier event belonged to another run) and the checkpoint's
        step on resume. Torn and corrupt lines are moved aside too. Returns the file the removed lines went
        to, or ``None`` when the file already agreed (it is then left untouched).
        """
        self.flush()
        if not self.path.is_file():
            return None
        kept: list[str] = []
        moved: list[str] = []
        # surrogateescape: undecodable bytes go aside exactly as they were
        for _, line, complete in _lines(self.path.read_text(encoding="utf-8", errors="surrogateescape")):
            record = _parse(line) if complete else None
            keep = record is not None and isinstance(record["step"], int) and record["step"] <= step
            (kept if keep else moved).append(line)
        if not moved:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{SUPERSEDED_PREFIX}{stamp}.jsonl")
        number = 1
        while aside.exists():
            number += 1
            aside = self.path.with_name(f"{SUPERSEDED_PREFIX}{stamp}-{number}.jsonl")
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            aside.write_text("".join(line + "\n" for line in moved), encoding="utf-8", errors="surrogateescape")
            partial.write_text("".join(line + "\n" for line in kept), encoding="utf-8", errors="surrogateescape")
            os.replace(partial, self.path)
        except OSError as error:  # the file stays as it was: the report then sees the superseded events too
            aside.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
            warnings.warn(
                f"{self.path}: could not move {len(moved)} superseded line(s) aside ({error}); the file is left as "
                "it was and training goes on.",
                UserWarning,
                stacklevel=2,
            )
            return None
        why = (
            "a new run starts in this output directory"
            if step == 0
            else f"training resumes from step {step}; they came after it (or were torn or corrupt)"
        )
        warnings.warn(
            f"{self.path}: moved {len(moved)} earlier line(s) to {aside.name}, as {why}; {len(kept)} event(s) kept.",
            UserWarning,
            stacklevel=2,
        )
        return aside


def _append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` entirely or not at all: a failed write is cut back, leaving no torn line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            os.ftruncate(fd, start)  # shrinking is allowed past a file-size limit and on a full disk
            raise
    finally:
        os.close(fd)


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``stability_events.jsonl`` file, or the one inside a run's output directory.

    A missing file means no events. A torn last line (a crash mid-write) or a corrupt line anywhere
    is skipped with a warning naming the line: a damaged file never aborts training or a report.
    Events this process holds in memory after a failed write come last, as they will be written.
    """
    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILENAME
    held = [record for line in _HELD.get(path.resolve(), []) if (record := _parse(line)) is not None]
    if not path.exists():
        return held
    events = []
    text = path.read_text(encoding="utf-8", errors="replace")  # a binary line is one corrupt line, not an abort
    for number, line, complete in _lines(text):
        record = _parse(line)
        if record is None:
            kind = "corrupt line" if complete else "torn last line (a crash while writing?)"
            warnings.warn(f"{path}: skipping {kind} {number}: {line[:80]!r}", UserWarning, stacklevel=2)
            continue
        events.append(record)
    return events + held
