"""Wheel contents: the model-card templates have one copy, at the top level, every subpackage is listed, and the
wheel carries them; a core-only install (no extra) runs everything the core offers."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from hf_stability import model_card

REPO = Path(__file__).resolve().parents[2]
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


# A batch-ramp run and its model card with only the core dependencies importable (no `datasets`, no matplotlib).
RUN_ON_CORE_ONLY = textwrap.dedent(
    """
    import importlib.util, sys
    target, output_dir = sys.argv[1:]
    for extra in ("datasets", "matplotlib", "evaluate", "pyarrow", "wandb"):
        assert importlib.util.find_spec(extra) is None, f"{extra} is importable: not a core-only install"
    import torch
    from transformers import BertConfig, BertForMaskedLM, default_data_collator
    import hf_stability
    from hf_stability import StabilityConfig, StabilityTrainer
    from hf_stability.corpus import default_corpus, train_tokenizer

    assert hf_stability.__file__.startswith(target), hf_stability.__file__
    tokenizer = train_tokenizer(default_corpus()[:20], "bert", vocab_size=200)
    ids = tokenizer(default_corpus()[:2], max_length=16, truncation=True, padding="max_length")["input_ids"]
    rows = [{"input_ids": torch.tensor(ids[i % 2]), "labels": torch.tensor(ids[i % 2])} for i in range(64)]
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    )
    args = StabilityConfig(
        output_dir, use_cpu=True, report_to=[], max_steps=4, logging_steps=1, save_strategy="no",
        per_device_train_batch_size=2, gradient_accumulation_steps=2, batch_ramp_start=2, batch_ramp_increment=2,
        batch_ramp_length=4, batch_ramp_unit="steps",
    )
    trainer = StabilityTrainer(
        model=BertForMaskedLM(config), args=args, train_dataset=rows, data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    assert trainer.batch_ramp is not None
    trainer.train()
    trainer.create_model_card()
    print(open(output_dir + "/README.md").read())
    """
)


def core_dependencies(wheel_site: Path) -> list[importlib.metadata.Distribution]:
    """The installed distributions a core install of the wheel in ``wheel_site`` pulls in: its requirements
    without extras, and theirs (with the extras each was asked for), found in this environment."""

    def requirements(distribution: importlib.metadata.Distribution, extras: set[str]) -> list[Requirement]:
        listed = [Requirement(line) for line in distribution.requires or []]
        return [r for r in listed if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in {"", *extras})]

    (ours,) = importlib.metadata.distributions(path=[str(wheel_site)])
    wanted, seen = requirements(ours, set()), set()
    found: dict[str, importlib.metadata.Distribution] = {}
    while wanted:
        requirement = wanted.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        found[name] = importlib.metadata.distribution(name)
        wanted += requirements(found[name], set(requirement.extras))
    return list(found.values())


def core_only_python(venv: Path, wheel_site: Path) -> Path:
    """A virtual environment (no system site-packages) in which exactly the core dependencies of the wheel are
    importable: links to this environment's copies of them, so no download is needed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    for distribution in core_dependencies(wheel_site):
        root = Path(distribution.locate_file(""))
        for file in distribution.files or []:
            top = file.parts[0]
            link = site / top
            if top in ("..", "__pycache__") or top.endswith(".pth") or link.exists():
                continue
            link.symlink_to(root / top)
    return venv / "bin" / "python"


def test_templates_have_one_copy_at_the_top_level():
    assert model_card.TEMPLATES_DIR == REPO / "model_cards"
    assert {"bart.md", "bert.md", "card.md", "t5.md"} <= {path.name for path in (REPO / "model_cards").iterdir()}
    assert not (REPO / "hf_stability" / "model_cards").exists()


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The package installed from a freshly built wheel alone (``--no-deps``), with the source tree gone."""
    tmp_path = tmp_path_factory.mktemp("wheel")
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
    return target


@pytest.mark.slow
def test_a_built_wheel_renders_model_cards_from_its_own_templates(tmp_path, wheel_site):
    target = wheel_site
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


@pytest.mark.slow
def test_a_core_only_install_runs_a_batch_ramp_and_writes_the_card(tmp_path, wheel_site):
    """`pip install hf-stability` without extras: no `datasets` for the ramp, no matplotlib for the card."""
    python = core_only_python(tmp_path / "venv", wheel_site)
    environment = {**os.environ, "PYTHONPATH": str(wheel_site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(python), "-c", RUN_ON_CORE_ONLY, str(wheel_site), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "## Stability" in result.stdout, result.stdout[-3000:]
    assert "| training steps | 4 of max_steps 4 |" in result.stdout
    assert "![training curves]" not in result.stdout
    assert "picture is left out: Plotting training curves needs `matplotlib`" in result.stdout
