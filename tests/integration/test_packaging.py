"""The core (`pip install hf-stability`) imports none of the extras; a missing extra is named when needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_stability.collators import nsp_dataset
from hf_stability.report import plot_training_curves

CORE_NAMES = [
    "StabilityTrainer",
    "StabilityConfig",
    "SkipNonFiniteCallback",
    "SpikeRollbackCallback",
    "LossScaleTelemetryCallback",
    "DataCollatorForBertPretraining",
    "DataCollatorForBartDenoising",
    "DataCollatorForT5SpanCorruption",
    "create_nsp_examples",
    "read_events",
]
COLLATOR_NAMES = [name for name in CORE_NAMES if name.startswith(("DataCollator", "create_nsp"))]
# Only in the `recipes`, `wandb` and `plot` extras. `transformers` itself imports `yaml` (its own
# dependency), and its `Trainer` imports `datasets` whenever it is installed, so `datasets` is only
# checked for the collators.
EXTRAS = ["wandb", "matplotlib", "evaluate", "datasets"]


def test_core_imports_no_extra():
    """In a fresh interpreter: the collators pull in no extra, and the trainer and callbacks none but `datasets`."""
    code = (
        "import json, sys, hf_stability\n"
        "def extras(names):\n"
        "    for name in names: getattr(hf_stability, name)\n"
        f"    return [m for m in {EXTRAS!r} if m in sys.modules]\n"
        f"print(json.dumps([extras({COLLATOR_NAMES!r}), extras({CORE_NAMES!r})]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    after_collators, after_core = json.loads(result.stdout.splitlines()[-1])
    assert after_collators == []
    assert set(after_core) <= {"datasets"}


@pytest.mark.parametrize(
    ("module", "extra", "call"),
    [
        ("datasets", "recipes", lambda: nsp_dataset(None, None)),
        ("matplotlib", "plot", lambda: plot_training_curves(None)),
    ],
)
def test_missing_extra_is_named(monkeypatch, module, extra, call):
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` sees when it is not installed
    with pytest.raises(ImportError, match=rf"needs `{module}`.*pip install 'hf-stability\[{extra}\]'"):
        call()
