"""`make train` as a user runs it: one process through the shipped accelerate config, no guessed-defaults warning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.integration.recipes.recipe_utils import REPO, TINY_RUN, logged_losses


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_runs_one_process_without_accelerate_warnings(tmp_path):
    # A stand-in for the Makefile's .venv: this interpreter's bin directory, marked installed.
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "bin").symlink_to(os.path.dirname(sys.executable))
    (venv / ".installed").touch()
    output_dir = tmp_path / "bart"
    args = " ".join(["--output_dir", str(output_dir), *TINY_RUN, "--max_steps", "2", "--max_eval_samples", "16"])
    completed = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "train", f"VENV={venv}", f"ARGS={args}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "--config_file recipes/accelerate_configs/default.yaml" in completed.stdout
    assert "had defaults used instead" not in output and "was set to a value of" not in output
    assert "world size 1" in output and len(logged_losses(output_dir)) == 2
