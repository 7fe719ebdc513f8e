"""Helpers for recipe tests: import a recipe script as a module, launch one as a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[3]
RECIPES = REPO / "recipes"
BIN = Path(sys.executable).parent
# Small enough for a handful of steps in seconds on 2 CPU cores; real data, tokenizer and model all the same.
TINY_RUN = [
    "--max_seq_length",
    "64",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "16",
    "--max_eval_samples",
    "32",
    "--tokenizer_vocab_size",
    "800",
    "--logging_steps",
    "1",
]


def load_recipe(name: str) -> ModuleType:
    """Import ``recipes/<name>_pretrain.py`` as a module (the scripts are not part of the package)."""
    path = RECIPES / f"{name}_pretrain.py"
    spec = importlib.util.spec_from_file_location(f"{name}_pretrain", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_recipe(
    launcher: list[str], name: str, output_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Launch a recipe as a user would, in a subprocess; fail with its output when it exits non-zero."""
    command = [*launcher, str(RECIPES / f"{name}_pretrain.py"), "--output_dir", str(output_dir), *args]
    environment = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=environment, cwd=output_dir.parent
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def logged_losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def results(output_dir: Path, split: str) -> dict:
    return json.loads((output_dir / f"{split}_results.json").read_text())
