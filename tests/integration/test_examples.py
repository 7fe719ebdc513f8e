"""The scripts in ``examples/`` run end to end, as a user runs them, and show what their docstrings promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bad_samples_example_names_the_poisoned_rows_diagnoses_them_and_reruns_without_skips(tmp_path):
    """48 rows (6 steps an epoch), rows 5 and 30 poisoned, 2 epochs: the report lists exactly those rows, each at
    two steps; the doctor's recurring_samples finding names them; the rerun that excludes them skips nothing."""
    output_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bad_samples.py"), "--output_dir", str(output_dir),
         "--rows", "48", "--poisoned", "5,30"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    bad = json.loads((output_dir / "stability_bad_samples.json").read_text())
    assert set(bad) == {"5", "30"}
    for named in bad.values():
        assert len({event["step"] for event in named}) == 2 and {event["event"] for event in named} == {"skip"}
    report = out[out.index(f"$ hf-stability report {output_dir} --bad-samples"):out.index("$ hf-stability doctor")]
    assert "  sample 5:" in report and "  sample 30:" in report and report.count("  sample ") == 2
    assert report.count("text: '[poison]") == 2
    doctor = out[out.index(f"$ hf-stability doctor {output_dir}"):]
    assert "[recurring_samples] Likely bad data: 2 sample(s)" in doctor
    assert "evidence: sample 5: events at steps" in doctor and "evidence: sample 30: events at steps" in doctor
    assert f"rerun with --exclude_samples {output_dir / 'stability_bad_samples.json'}: 0 skipped step(s)" in out
    assert not (output_dir / "rerun" / "stability_bad_samples.json").exists()
