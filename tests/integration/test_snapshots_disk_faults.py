"""Rollback snapshots on a disk that refuses writes: training goes on, and no snapshot directory is left behind.

The write failure is real: the run is a subprocess whose file-size limit (`RLIMIT_FSIZE`) is smaller than a
snapshot, so the kernel fails the write with EFBIG midway, as a full disk fails it with ENOSPC.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.testing_utils import subprocess_env


def run(tmp_path: Path, limit: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.scripts.snapshot_disk_run", str(tmp_path / "out"), str(limit), *extra],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


def test_snapshot_writes_failing_on_disk_never_abort_training(tmp_path):
    result = run(tmp_path, 100_000)  # a tiny BERT's snapshot is ~1 MB; the events file stays far below
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "global_step 8" in result.stdout
    for step in (0, 2, 4, 6):
        assert f"Could not write the rollback snapshot of step {step}" in output
    assert "File too large" in output
    assert not (tmp_path / "out" / "stability_snapshots").exists()


def test_snapshots_are_removed_when_training_raises(tmp_path):
    result = run(tmp_path, 0, "5")
    assert result.returncode != 0 and "injected failure at step 5" in result.stderr
    assert not (tmp_path / "out" / "stability_snapshots").exists()
