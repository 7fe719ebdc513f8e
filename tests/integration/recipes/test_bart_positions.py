"""BART insertion noise lengthens rows: the recipe gives the model the positions for it, and any batch wider than
the model's positions is a clear error naming the setting, not an `IndexError` from the position embedding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.recipes.recipe_utils import BIN, RECIPES, TINY_RUN, run_recipe


@pytest.mark.slow
def test_bart_recipe_with_insertions_sizes_the_positions_and_trains(tmp_path):
    output_dir = tmp_path / "bart"
    run_recipe([sys.executable], "bart", output_dir, *TINY_RUN, "--insert_ratio", "0.1", "--max_steps", "2")
    config = json.loads((output_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 64 + 7  # ceil(64 * 0.1) inserted tokens at most
    assert (output_dir / "eval_results.json").exists()


def _failed_run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RECIPES / "bart_pretrain.py"), "--output_dir", str(tmp_path / "bart"), *TINY_RUN]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [*command, "--max_steps", "2", *args], capture_output=True, text=True, timeout=600, env=environment
    )
    assert result.returncode != 0
    assert "IndexError" not in result.stderr
    return result


@pytest.mark.slow
def test_a_model_without_room_for_the_insertions_is_refused_before_training(tmp_path):
    result = _failed_run(tmp_path, "--insert_ratio", "0.1", "--config_overrides", "max_position_embeddings=64")
    assert result.returncode == 2
    assert (
        "`max_seq_length` 64 (rows of 64 tokens grow to 71 with the objective's noise) exceeds the model's "
        "max_position_embeddings 64" in result.stderr
    )


@pytest.mark.slow
def test_a_batch_wider_than_the_positions_names_the_setting(tmp_path):
    # Nearly every span of Poisson(0.05) is empty and inserts a <mask>: rows grow past their 64 positions.
    result = _failed_run(tmp_path, "--poisson_lambda", "0.05")
    assert "The bart collator made `input_ids`" in result.stderr
    assert "over the model's max_position_embeddings 64" in result.stderr
