"""Golden loss traces: each recipe's deterministic CPU run logs the per-step training loss recorded in
``tests/assets/losses/<recipe>.json``.

The run is the pipeline a user runs (embedded corpus, row building, collator draws, model init, optimizer,
`StabilityTrainer`), so any change that moves a recipe's loss shows up here step by step. That includes
the tokenizer the recipe trains on the fly, which ``hf_stability.corpus`` makes the same in every process.

After an intended change, regenerate the traces with one command and review the diff of ``tests/assets/``:

    HF_STABILITY_UPDATE_GOLDENS=1 python -m pytest tests/integration/recipes/test_golden_losses.py
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version

import numpy as np
import pytest

from tests.integration.recipes.recipe_utils import REPO, TINY_RUN, logged_losses, run_recipe

ASSETS = REPO / "tests" / "assets"
GOLDEN_RUN = [*TINY_RUN, "--max_steps", "20", "--seed", "42"]
UPDATE = os.environ.get("HF_STABILITY_UPDATE_GOLDENS") == "1"
# Three repeats of each run give bit-identical traces on one machine; one thread instead of two (another
# summation order in the float32 kernels) moved BART's trace by at most 7e-8 relative over the 20 steps.
# 1e-4 leaves three orders of magnitude for other CPUs' kernels, while a change as small as renumbering 46
# of BERT's 800 token ids moved its trace by up to 3e-3 relative (30x the tolerance).
RTOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "bart", "t5"])
def test_recipe_loss_trace_matches_its_golden(tmp_path, name):
    golden_path, output_dir = ASSETS / "losses" / f"{name}.json", tmp_path / name
    run_recipe([sys.executable], name, output_dir, *GOLDEN_RUN)
    losses = logged_losses(output_dir)
    if UPDATE:
        versions = {package: version(package) for package in ("torch", "transformers", "datasets", "tokenizers")}
        record = {"args": GOLDEN_RUN, "recorded_with": versions, "losses": losses}
        golden_path.write_text(json.dumps(record, indent=1) + "\n")
    golden = json.loads(golden_path.read_text())
    assert golden["args"] == GOLDEN_RUN, f"{golden_path.name} is from other settings: regenerate it (module docstring)"
    assert len(losses) == len(golden["losses"]) == 20
    np.testing.assert_allclose(losses, golden["losses"], rtol=RTOL, atol=0, err_msg=f"{name}: loss per step")
