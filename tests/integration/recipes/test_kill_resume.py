"""kill -9 at random moments (checkpoint writes included), then `--resume_from_checkpoint latest`, until done.

A real recipe subprocess (BERT, with Inf gradients at fixed steps) is killed several times after a random
number of logged steps plus a random delay (fixed seed), each time resumed from the newest complete
checkpoint. At the end the run must read as one uninterrupted run: every step logged once, counters equal
to the events, the injected skips recorded exactly once each, ``global_step`` at ``max_steps``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_stability import read_events
from tests.integration.recipes.recipe_utils import BIN, TINY_RUN
from tests.scripts.kill_target import POISONED_STEPS
from tests.testing_utils import subprocess_env

MAX_STEPS = 32
FLAGS = [
    *TINY_RUN,
    "--max_steps",
    str(MAX_STEPS),
    "--save_steps",
    "4",
    "--save_total_limit",
    "2",
    "--disable_tqdm",
    "true",
    "--max_eval_samples",
    "16",
]
KILLS = 3


def launch(output_dir: Path, resume: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.scripts.kill_target", "--output_dir", str(output_dir), *FLAGS]
    if resume:
        command += ["--resume_from_checkpoint", "latest"]
    environment = subprocess_env(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, cwd=output_dir.parent
    )


def kill_after(process: subprocess.Popen, logged_steps: int, delay: float) -> str:
    """SIGKILL ``process`` ``delay`` seconds after it logged ``logged_steps`` more training steps."""
    seen, output = 0, []
    for line in process.stdout:
        output.append(line)
        seen += "'loss'" in line
        if seen >= logged_steps:
            time.sleep(delay)
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return "".join(output)


@pytest.mark.slow
def test_kill_minus_9_at_random_moments_then_resume_leaves_one_consistent_run(tmp_path):
    rng = random.Random(1234)
    output_dir = tmp_path / "run"
    for attempt in range(KILLS):
        # The first run lives past its first checkpoint, so that every restart has one to resume from.
        logged = rng.randint(5, 9) if attempt == 0 else rng.randint(1, 8)
        output = kill_after(launch(output_dir, resume=attempt > 0), logged, rng.uniform(0.0, 0.4))
        assert "Traceback" not in output, output[-3000:]
    final = launch(output_dir, resume=True)
    output, _ = final.communicate(timeout=600)
    assert final.returncode == 0, output[-3000:]

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(1, MAX_STEPS + 1))
    events = read_events(output_dir)
    assert [event["step"] for event in events if event["event"] == "skip"] == [s + 1 for s in POISONED_STEPS]
    stored = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    counters = stored["stateful_callbacks"]
    assert counters["SkipNonFiniteCallback"]["attributes"]["skipped_steps"] == len(POISONED_STEPS)
    assert counters["SpikeRollbackCallback"]["attributes"]["rollbacks"] == sum(e["event"] == "rollback" for e in events)
    card = (output_dir / "README.md").read_text()
    assert f"Skipped steps (non-finite gradients): **{len(POISONED_STEPS)}**" in card
