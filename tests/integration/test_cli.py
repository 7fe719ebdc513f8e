"""The ``hf-stability`` console command, run as an installed user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import hf_stability
from tests.integration.plain_trainer_run import POISONED_STEP, train_plain_run


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # The console script installed next to this interpreter (pip's entry point), as a user calls it.
    script = Path(sys.executable).parent / "hf-stability"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"hf-stability {hf_stability.__version__}"


def test_report_prints_the_summary_and_writes_the_plot(tmp_path, bert_tokenizer):
    output_dir = train_plain_run(tmp_path / "run", bert_tokenizer)
    result = run_cli("report", str(output_dir))
    assert result.returncode == 0, result.stderr
    assert "skipped steps: 1" in result.stdout
    assert f"step {POISONED_STEP + 1}: skip (nonfinite_gradients)" in result.stdout
    assert (output_dir / "training_curves.png").is_file()
    assert f"plot: {output_dir / 'training_curves.png'}" in result.stdout


def test_report_on_a_directory_that_is_not_a_run_fails_with_a_message(tmp_path):
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2
    assert "trainer_state.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["report"], ["nonsense"]])
def test_bad_usage_exits_with_argparse_error(args):
    assert run_cli(*args).returncode == 2
