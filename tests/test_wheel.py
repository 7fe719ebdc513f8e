"""Wheel contents: the model-card templates have one copy, at the top level, every subpackage is listed, and the
wheel carries them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_stability import model_card

REPO = Path(__file__).resolve().parents[1]
# Render a card with the recipe's own BERT settings, importing hf_stability from the installed wheel only.
RENDER_FROM_WHEEL = textwrap.dedent(
    """
    import importlib.util, sys
    from transformers import BertConfig, BertForMaskedLM
    import hf_stability
    from hf_stability import StabilityConfig, StabilityTrainer
    from hf_stability.corpus import default_corpus, train_tokenizer
    from hf_stability.model_card import TEMPLATES_DIR, build_model_card

    target, recipe, output_dir = sys.argv[1:]
    assert hf_stability.__file__.startswith(target), hf_stability.__file__
    assert str(TEMPLATES_DIR).startswith(target), TEMPLATES_DIR
    spec = importlib.util.spec_from_file_location("bert_pretrain", recipe)
    bert = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bert
    spec.loader.exec_module(bert)
    tokenizer = train_tokenizer(default_corpus()[:20], "bert", vocab_size=200)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    )
    model = BertForMaskedLM(config)
    args = StabilityConfig(output_dir, use_cpu=True, report_to=[])
    trainer = StabilityTrainer(model=model, args=args, processing_class=tokenizer)
    card = build_model_card(trainer, objective="bert", objective_args=bert.BertPretrainingArguments())
    print(card.text)
    """
)


def test_templates_have_one_copy_at_the_top_level():
    assert model_card.TEMPLATES_DIR == REPO / "model_cards"
    assert {"bart.md", "bert.md", "card.md", "t5.md"} <= {path.name for path in (REPO / "model_cards").iterdir()}
    assert not (REPO / "hf_stability" / "model_cards").exists()


@pytest.mark.slow
def test_a_built_wheel_renders_model_cards_from_its_own_templates(tmp_path):
    # Build from a copy: setuptools reuses a stale build/ directory, which could hide a missing file.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "outputs", "wandb"
        ),
    )
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True)
    (wheel,) = wheels.glob("hf_stability-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    shutil.rmtree(source)  # nothing may resolve back to the source tree
    environment = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-c", RENDER_FROM_WHEEL, str(target), str(REPO / "recipes" / "bert_pretrain.py"), "out"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "BERT masked language" in result.stdout, result.stdout[-3000:]
    for name in ("card.md", "bert.md", "bart.md", "t5.md"):
        assert (target / "hf_stability" / "model_cards" / name).is_file(), name


def test_every_subpackage_is_listed_for_setuptools():
    """pyproject lists the packages (the templates live outside `hf_stability/`): a new subpackage must be added."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "hf_stability").rglob("__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
