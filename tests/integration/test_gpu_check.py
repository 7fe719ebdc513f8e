"""benchmarks/gpu_check.py: its CPU mode runs here; the full table needs one CUDA GPU (``gpu`` marker).

On a CPU-only machine the CUDA rows also give real faults: a CUDA row run in-process raises, and the FSDP2
child dies (or is killed by its timeout); the table must keep every other row and hold the traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.testing_utils import training_args

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_check.py"
ROWS = (
    "device",
    "fp16",
    "bf16 autocast",
    "rollback restore through pinned host buffers",
    "snapshot time vs device<->host floor",
    "Trainer + FSDP2",
    "CPU tensor into the NCCL all-reduce",
    "synchronising CUDA calls per ordinary step",
    "StabilityTrainer vs Trainer steps/s",
    "Trainer + DeepSpeed ZeRO-2",
    "DeepSpeed ZeRO-2: synchronising calls",
)
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the fault is a CUDA row on a machine without CUDA")


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def run_gpu_check(tmp_path: Path, *options: str) -> list[dict]:
    output = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *options, "--json", str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(output.read_text())
    assert [row["check"].startswith(name) for row, name in zip(rows, ROWS, strict=True)] == [True] * len(ROWS)
    assert rows[1]["check"] in result.stdout  # the table is printed
    assert rows[0]["data"]["name"] in result.stdout  # with the device's name
    return rows


@pytest.mark.slow
def test_cpu_mode_checks_what_cpu_can_and_marks_the_rest(tmp_path):
    rows = run_gpu_check(tmp_path, "--device", "cpu", "--small")
    statuses = [row["status"] for row in rows]
    assert statuses[:4] == ["INFO", "PASS", "PASS", "PASS (CPU, no pinning; needs CUDA)"], statuses
    assert statuses[5:7] == ["needs CUDA"] * 2, statuses
    assert statuses[7] == "PASS (CPU host reads; needs CUDA for syncs)", rows[7]
    assert all("needs CUDA" in status for status in (statuses[4], statuses[8])), statuses
    # The read counts behind the sync row: StabilityTrainer adds none on ordinary steps, and does read on the
    # periodic steps the window leaves out (spike checks at 10 and 20, the last step's flush): the window is what
    # separates them, not a count that sees nothing.
    data = rows[7]["data"]
    ordinary = data["ordinary_steps"]
    assert ordinary == [*range(11, 20), *range(21, 30)], ordinary
    for regime in ("fp32", "bf16", "fp16"):
        plain, stable = data["per_step"][f"{regime} Trainer"], data["per_step"][f"{regime} StabilityTrainer"]
        added = {step: stable[step - 1] - plain[step - 1] for step in range(1, len(plain) + 1)}
        assert [added[step] for step in ordinary] == [0] * len(ordinary), (regime, added)
        assert added[20] > 0 and added[30] > 0, (regime, added)
    # DeepSpeed ZeRO-2 (world size 1, DeepSpeed's CPU accelerator): its skip and a rollback, bit-exact, and no host
    # read added on ordinary steps while the spike checks (steps 10 and 20) do read.
    assert statuses[9:] == ["PASS", "PASS (CPU host reads; needs CUDA for syncs)"], rows[9:]
    data = rows[10]["data"]
    assert data["ordinary_steps"] == ordinary
    plain, stable = data["per_step"]["Trainer"], data["per_step"]["StabilityTrainer"]
    added = {step: stable[step - 1] - plain[step - 1] for step in range(1, len(plain) + 1)}
    assert [added[step] for step in ordinary] == [0] * len(ordinary) and added[10] > 0 and added[20] > 0, added


def test_ordinary_steps_leave_out_every_periodic_step(tmp_path, gpu_check):
    args = training_args(
        tmp_path, max_steps=40, logging_steps=7, save_strategy="steps", save_steps=9, max_consecutive_skips=11,
        spike_check_interval=13, snapshot_interval=26,
    )
    ordinary = gpu_check.ordinary_steps(args, steps_per_epoch=17, warmup=3)
    periodic = {7, 14, 21, 28, 35, 9, 18, 27, 36, 11, 22, 33, 13, 26, 39, 17, 34}
    assert ordinary == [step for step in range(4, 40) if step not in periodic]


@cpu_only
def test_a_check_that_raises_costs_only_its_own_rows(tmp_path, gpu_check):
    """The sync row on a machine without CUDA raises in ``set_sync_debug_mode``; the next checks still run."""
    checks = [
        gpu_check.Check((gpu_check.SYNCS,), lambda: [gpu_check.check_syncs("cuda")]),
        gpu_check.Check((gpu_check.DEVICE,), lambda: [gpu_check.device_row("cpu")]),
        gpu_check.Check(
            (gpu_check.RESTORE, gpu_check.SNAPSHOT_TIME), lambda: gpu_check.check_snapshots("cpu", small=True)
        ),
    ]
    rows = gpu_check.collect(checks, str(tmp_path / "rows.json"))
    written = json.loads((tmp_path / "rows.json").read_text())
    assert [row["check"] for row in written] == [row.check for row in rows]
    statuses = [row["status"] for row in written]
    assert statuses == ["FAIL", "INFO", "PASS (CPU, no pinning; needs CUDA)", "INFO (host copies; needs CUDA)"]
    failure = written[0]
    assert failure["check"] == gpu_check.SYNCS.check
    assert "Traceback" in failure["error"] and "in check_syncs" in failure["error"], failure["error"]
    assert "Torch not compiled with CUDA enabled" in failure["result"], failure
    assert all(row["error"] == "" for row in written[1:])


@pytest.mark.slow
@cpu_only
def test_a_failed_fsdp2_child_gives_its_traceback(gpu_check):
    """The child runs Trainer + FSDP2 on CUDA; without CUDA it raises, and its own traceback reaches both rows."""
    rows = gpu_check.check_fsdp2("cuda")
    assert [row.check for row in rows] == [gpu_check.FSDP2.check, gpu_check.NCCL.check]
    assert [row.status for row in rows] == ["FAIL", "FAIL"]
    for row in rows:
        assert "Traceback" in row.error and "in fsdp2_result" in row.error, row.error
        assert row.result == row.error.strip().splitlines()[-1].strip()[:200]


@cpu_only
def test_a_hung_fsdp2_child_is_killed_and_reported(gpu_check):
    """A child that cannot even import torch within the limit stands in for one hung in NCCL's init."""
    rows = gpu_check.check_fsdp2("cuda", timeout_s=0.5)
    assert [row.status for row in rows] == ["FAIL", "FAIL"]
    assert all(row.result == "the FSDP2 child timed out after 0.5 s and was killed" for row in rows), rows


def test_a_hung_deepspeed_child_is_killed_and_reported(gpu_check):
    rows = gpu_check.check_deepspeed("cpu", timeout_s=0.5)
    assert [row.check for row in rows] == [gpu_check.DEEPSPEED.check, gpu_check.DEEPSPEED_COST.check]
    assert all(row.status == "FAIL" and row.result == "the DeepSpeed child timed out after 0.5 s and was killed"
               for row in rows), rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_table_passes_on_one_gpu(tmp_path):
    rows = run_gpu_check(tmp_path)
    assert all(row["status"] in ("PASS", "INFO") for row in rows), rows
