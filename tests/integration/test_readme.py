"""The documentation's code runs as written: every Python block of the README and docs/ on a CPU, and the W&B
read-back command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The README, then the docs pages in the order the README's sections used to have: later blocks reuse the
# Quickstart's names, as a reader going on from the README does.
PAGES = [REPO / "README.md"] + [
    REPO / "docs" / name
    for name in (
        "recipes.md", "trainer.md", "rollback.md", "remedies.md", "collators.md", "benchmarks.md", "events.md",
        "doctor.md", "architecture.md",
    )
]
# Runs the blocks in order in one namespace, as a reader following the README does (later blocks reuse the
# Quickstart's names), and names the block that failed.
RUNNER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for index, block in enumerate(blocks):
    try:
        exec(compile(block, f"docs python block {index + 1}", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        sys.exit(f"docs python block {index + 1} failed:\\n{block}")
print(f"ran {len(blocks)} blocks")
"""


def blocks(language: str) -> list[str]:
    return [
        block
        for page in PAGES
        for block in re.findall(rf"^```{language}\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    ]


def test_every_docs_page_is_run_and_linked():
    """A page left out of PAGES would never run; a page the README does not link is never read."""
    readme = PAGES[0].read_text(encoding="utf-8")
    assert sorted(p.name for p in PAGES[1:]) == sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert all(f"(docs/{page.name})" in readme for page in PAGES[1:])


def offline_environment() -> dict[str, str]:
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@pytest.mark.slow
def test_every_python_block_runs_on_cpu(tmp_path):
    python_blocks = blocks("python")
    assert len(python_blocks) >= 8
    (tmp_path / "blocks.json").write_text(json.dumps(python_blocks))
    (tmp_path / "runner.py").write_text(RUNNER)
    completed = subprocess.run(
        [sys.executable, "runner.py", "blocks.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=offline_environment(),
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    assert f"ran {len(python_blocks)} blocks" in completed.stdout
    # The Quickstart trained and wrote its card with the stability section.
    assert "## Stability" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_wandb_read_back_command_works_with_two_offline_runs(tmp_path):
    (command,) = [
        line.split("  #")[0].strip()
        for block in blocks("bash")
        for line in block.splitlines()
        if line.startswith("wandb leet inspect")
    ]
    make_runs = (
        "import wandb\n"
        "for name in ('first', 'second'):\n"
        "    run = wandb.init(project='readme', name=name)\n"
        "    run.log({'train/loss': 1.0})\n"
        "    run.finish()\n"
    )
    environment = {**offline_environment(), "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-c", make_runs], cwd=tmp_path, env=environment, check=True, timeout=300)
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    completed = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["name"] == "second" and summary["summary"]["train/loss"] == 1.0
