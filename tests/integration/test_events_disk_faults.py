"""The events file on a disk that refuses writes: training goes on, counters and events are kept.

The write failure is real: the run is a subprocess whose file-size limit (`RLIMIT_FSIZE`) is 1 byte, so the kernel
fails every write of ``stability_events.jsonl`` with EFBIG, as a full disk fails it with ENOSPC.
"""

from __future__ import annotations

import json

import pytest

from tests.testing_utils import run_module


@pytest.mark.parametrize(
    "lift_at, on_disk",
    [
        (0, []),  # never writable: the events stay in memory, where read_events (report, card) finds them
        (4, [["skip", 3], ["skip", 6]]),  # writable again before the next event: written with it, in order
        (7, [["skip", 3], ["skip", 6]]),  # writable again after the last event: written at the end of training
    ],
)
def test_a_failing_events_file_never_stops_training_and_loses_no_event(tmp_path, lift_at, on_disk):
    result = run_module("tests.scripts.events_disk_run", tmp_path / "out", lift_at)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ")[0] in {
        "global_step", "skipped_steps", "read_events", "on_disk"})
    assert lines["global_step"] == "8" and lines["skipped_steps"] == "2"
    assert json.loads(lines["read_events"]) == [["skip", 3], ["skip", 6]]
    assert json.loads(lines["on_disk"]) == on_disk
    assert output.count("could not write stability events ([Errno 27] File too large)") == 1
    assert ("writable again" in output) == bool(on_disk)
