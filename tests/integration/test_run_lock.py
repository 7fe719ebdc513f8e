"""One run per output directory: two real training processes, and a holder killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from hf_stability.run_lock import LOCK_FILENAME
from tests.testing_utils import run_module, subprocess_env


def start_holder(output: Path, release: Path) -> subprocess.Popen:
    """A training run paused at step 3, holding ``output``; returns once it says so."""
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.scripts.lock_run", str(output), "3", str(release)],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    for line in holder.stdout:
        if line.strip() == "holding":
            return holder
    raise AssertionError(f"the holder ended without holding: {holder.wait()} {holder.stderr.read()[-3000:]}")


def test_a_second_run_into_a_held_output_directory_is_refused(tmp_path):
    output, release = tmp_path / "out", tmp_path / "release"
    holder = start_holder(output, release)
    try:
        second = run_module("tests.scripts.lock_run", output)
        assert second.returncode != 0
        assert f"is in use by another training run (host {socket.gethostname()}, pid {holder.pid}" in second.stderr
        assert "global_step" not in second.stdout
        release.touch()
        stdout, stderr = holder.communicate(timeout=300)
    finally:
        holder.kill()
    assert holder.returncode == 0, stderr[-3000:]
    assert "global_step 6" in stdout
    assert not (output / LOCK_FILENAME).exists()  # released at the end of training
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_a_lock_left_by_a_killed_run_does_not_block_its_resume(tmp_path):
    output, release = tmp_path / "out", tmp_path / "release"
    holder = start_holder(output, release)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    assert (output / LOCK_FILENAME).exists() and (output / "checkpoint-2").is_dir()
    resumed = run_module("tests.scripts.lock_run", output)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Taking over the run lock of host {socket.gethostname()}, pid {holder.pid}" in resumed.stderr
    assert "global_step 6" in resumed.stdout
    assert not (output / LOCK_FILENAME).exists()
