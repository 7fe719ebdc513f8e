"""benchmarks/gpu_check.py: its CPU mode runs here; the full table needs one CUDA GPU (``gpu`` marker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
ROWS = (
    "fp16",
    "bf16 autocast",
    "rollback restore through pinned host buffers",
    "snapshot time vs device<->host floor",
    "Trainer + FSDP2",
    "CPU tensor into the NCCL all-reduce",
    "synchronising CUDA calls per ordinary step",
    "StabilityTrainer vs Trainer steps/s",
)


def run_gpu_check(tmp_path: Path, *options: str) -> list[dict]:
    output = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *options, "--json", str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(output.read_text())
    assert [row["check"].startswith(name) for row, name in zip(rows, ROWS, strict=True)] == [True] * len(ROWS)
    assert rows[0]["check"] in result.stdout  # the table is printed
    return rows


@pytest.mark.slow
def test_cpu_mode_checks_what_cpu_can_and_marks_the_rest(tmp_path):
    statuses = [row["status"] for row in run_gpu_check(tmp_path, "--device", "cpu", "--small")]
    assert statuses[:3] == ["PASS", "PASS", "PASS (CPU, no pinning; needs CUDA)"], statuses
    assert statuses[4:7] == ["needs CUDA"] * 3, statuses
    assert all("needs CUDA" in status for status in (statuses[3], statuses[7])), statuses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_table_passes_on_one_gpu(tmp_path):
    rows = run_gpu_check(tmp_path)
    assert all(row["status"] in ("PASS", "INFO") for row in rows), rows
