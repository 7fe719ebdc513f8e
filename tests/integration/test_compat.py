"""The seam to upstream internals: StabilityTrainer refuses a Trainer whose hooks changed; the rules re-derived
from DefaultFlowCallback match it; the verified range starts at pyproject's floor."""

from __future__ import annotations

import ast
import itertools
import re
import sys
from pathlib import Path

import accelerate
import pytest
import transformers
from transformers import Trainer, TrainerControl, TrainerState
from transformers.trainer_callback import DefaultFlowCallback

from hf_stability import StabilityTrainer
from hf_stability import _compat as compat
from hf_stability._compat import (
    ACCELERATE_VERIFIED,
    TRANSFORMERS_VERIFIED,
    UpstreamChangedError,
    is_logging_step,
    is_saving_step,
    untested_versions,
)
from tests.testing_utils import mlm_dataset, run_two_ranks, tiny_bert, training_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=32)


class UpstreamWithoutGradNormCall(Trainer):
    """A future Trainer whose training loop no longer calls `_get_grad_norm` (the pre-clip norm would vanish)."""

    def _run_epoch(self, *args, **kwargs):
        raise NotImplementedError("never reached: construction must refuse first")


class UpstreamWithoutTrainingStep(Trainer):
    """A future Trainer that dropped `training_step` (the callbacks would lose the loss Trainer optimises)."""

    training_step = None


class NoPreClipNorm(StabilityTrainer):
    """A subclass that bypasses StabilityTrainer's `_get_grad_norm`, as a Trainer that stopped calling it would."""

    def _get_grad_norm(self, model, grad_norm=None):
        return Trainer._get_grad_norm(self, model, grad_norm=grad_norm)


class UpstreamWithoutTrainSampler(Trainer):
    """A future Trainer whose train dataloader no longer takes its sampler from `_get_train_sampler` (the
    exclude list would leave nothing out)."""

    def get_train_dataloader(self):
        raise NotImplementedError("never reached: construction must refuse first")


SUPPORTED = re.escape(f"supports transformers {TRANSFORMERS_VERIFIED[0]} to {TRANSFORMERS_VERIFIED[1]}")


@pytest.mark.parametrize(
    ("upstream", "problem"),
    [
        (UpstreamWithoutGradNormCall, "no longer calls `_get_grad_norm`"),
        (UpstreamWithoutTrainingStep, "`UpstreamWithoutTrainingStep.training_step` is gone"),
        (UpstreamWithoutTrainSampler, "`UpstreamWithoutTrainSampler.get_train_dataloader` no longer calls "
                                      "`_get_train_sampler`"),
    ],
)
def test_construction_refuses_a_trainer_whose_hooks_changed(upstream, problem, tmp_path, bert_tokenizer, dataset):
    future = type("Future", (StabilityTrainer, upstream), {})
    with pytest.raises(UpstreamChangedError, match=f"{re.escape(problem)}.*{SUPPORTED}"):
        future(tiny_bert(bert_tokenizer), training_args(tmp_path), train_dataset=dataset)


def test_the_installed_trainer_passes_the_check(tmp_path, bert_tokenizer, dataset):
    StabilityTrainer(tiny_bert(bert_tokenizer), training_args(tmp_path), train_dataset=dataset)


@pytest.mark.parametrize(
    "settings",
    [
        dict(spike_metric="grad_norm", max_grad_norm=1.0),
        dict(spike_rollback=False, adaptive_clip=True, max_grad_norm=1.0),
    ],
    ids=["rollback", "adaptive_clip"],
)
def test_a_missing_pre_clip_norm_is_an_error_under_stability_trainer(settings, tmp_path, bert_tokenizer, dataset):
    # A plain Trainer only warns (tests/integration/callbacks); here the user was promised the pre-clip norm.
    trainer = NoPreClipNorm(tiny_bert(bert_tokenizer), training_args(tmp_path, **settings), train_dataset=dataset)
    with pytest.raises(UpstreamChangedError, match=f"no pre-clip gradient norm for step 1.*{SUPPORTED}"):
        trainer.train()


def test_logging_and_saving_steps_match_default_flow_callback(tmp_path):
    flow = DefaultFlowCallback()
    for first, log_strategy, logging_steps, save_strategy, save_steps in itertools.product(
        (False, True), ("steps", "epoch", "no"), (1, 3), ("steps", "epoch", "no"), (0, 4)
    ):
        args = training_args(
            tmp_path,
            logging_first_step=first,
            logging_strategy=log_strategy,
            logging_steps=logging_steps,
            save_strategy=save_strategy,
            save_steps=max(save_steps, 1),
        )
        state = TrainerState(logging_steps=logging_steps, save_steps=save_steps, max_steps=10)
        for step in range(1, 11):
            state.global_step = step
            control = flow.on_step_end(args, state, TrainerControl())
            case = (first, log_strategy, logging_steps, save_strategy, save_steps, step)
            assert is_logging_step(args, state, step) == control.should_log, case
            assert is_saving_step(args, state, step) == control.should_save, case


def test_the_verified_range_starts_at_the_pyproject_floor():
    floors = dict(re.findall(r'^ *"([\w-]+)>=([\d.]+)",$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE))
    assert floors["transformers"] == TRANSFORMERS_VERIFIED[0]
    assert floors["accelerate"] == ACCELERATE_VERIFIED[0]


@pytest.mark.parametrize(
    ("transformers_version", "accelerate_version", "named"),
    [
        ("5.26.0", ACCELERATE_VERIFIED[1], ["transformers 5.26.0"]),
        ("5.18.2", ACCELERATE_VERIFIED[0], ["transformers 5.18.2"]),
        ("5.26.0.dev0", "1.17.0", ["transformers 5.26.0.dev0", "accelerate 1.17.0"]),
    ],
)
def test_a_version_outside_the_tested_range_is_named_in_one_line(transformers_version, accelerate_version, named):
    message = untested_versions(transformers_version, accelerate_version)
    assert message is not None and "\n" not in message
    assert all(name in message for name in named)
    assert f"transformers {TRANSFORMERS_VERIFIED[0]} to {TRANSFORMERS_VERIFIED[1]}" in message


def test_the_installed_versions_are_tested_and_construction_warns_nothing(tmp_path, bert_tokenizer, dataset, caplog):
    """CI installs the latest releases (`make install`): the range's top must be what it runs, or this fails."""
    assert untested_versions(transformers.__version__, accelerate.__version__) is None
    compat._untested_warned = False  # a process warns once: let this trainer be the first
    with caplog.at_level("WARNING", logger="hf_stability"):
        StabilityTrainer(tiny_bert(bert_tokenizer), training_args(tmp_path), train_dataset=dataset)
    assert compat._untested_warned and "outside the range CI tests" not in caplog.text


def test_an_untested_transformers_is_warned_once_per_process(tmp_path, bert_tokenizer, dataset, caplog, monkeypatch):
    # The release after the tested range, on the module a fresh `import transformers` returns (as `_compat` does).
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.26.0")
    monkeypatch.setattr(compat, "_untested_warned", False)
    with caplog.at_level("WARNING", logger="hf_stability"):
        for _ in range(2):
            StabilityTrainer(tiny_bert(bert_tokenizer), training_args(tmp_path), train_dataset=dataset)
    assert caplog.text.count("running with transformers 5.26.0, outside the range CI tests") == 1


def test_readme_and_docs_cite_the_one_tested_range():
    """The range lives in `_compat`; the docs state it, and no other transformers/accelerate version."""
    for document in ("README.md", "docs/trainer.md"):
        text = (ROOT / document).read_text()
        assert f"`transformers` {TRANSFORMERS_VERIFIED[0]}" in text and TRANSFORMERS_VERIFIED[1] in text, document
        assert f"`accelerate` {ACCELERATE_VERIFIED[0]} to {ACCELERATE_VERIFIED[1]}" in text, document
        assert "TRANSFORMERS_VERIFIED" in text, document
        assert set(re.findall(r"\b5\.\d+\.\d+\b", text)) <= set(TRANSFORMERS_VERIFIED), document
        assert set(re.findall(r"`accelerate` (1\.\d+\.\d+)", text)) <= set(ACCELERATE_VERIFIED), document


@pytest.mark.distributed
def test_two_ranks_print_each_warning_once(tmp_path):
    output = run_two_ranks("tests.scripts.warnings_two_ranks", tmp_path, timeout=300)
    for warning in (
        "restore_callback_states_from_checkpoint=False",  # StabilityTrainer's construction (a logger warning)
        "Step 2 skipped (",  # SkipNonFiniteCallback's decision, the same on both ranks
        "hidden from the logged `loss` by `logging_nan_inf_filter=True`",  # a UserWarning
    ):
        assert output.count(warning) == 1, (warning, output[-3000:])


UPSTREAM_PACKAGES = ("torch", "transformers", "accelerate", "datasets")
OWN_PRIVATE_ATTRIBUTES = {"_fields"}  # namedtuple's public protocol, despite the underscore


def _upstream_private_names() -> set[str]:
    """The private upstream names `_compat` wraps: its ``x._name`` attributes and ``"_name"`` string constants."""
    tree = ast.parse((ROOT / "hf_stability" / "_compat.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            names.add(node.attr)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"_[a-z]\w*", node.value):
            names.add(node.value)
    return names - OWN_PRIVATE_ATTRIBUTES


def test_every_private_upstream_name_goes_through_compat():
    # The seam's promise: a module other than _compat imports no private upstream name, reads no private attribute
    # of an upstream package or one `_compat` wraps, and asks getattr/hasattr for no private upstream attribute.
    wrapped = _upstream_private_names()
    found = []
    for path in sorted((ROOT / "hf_stability").rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UPSTREAM_PACKAGES:
                module_private = any(part.startswith("_") for part in (node.module or "").split("."))
                found += [f"{where} imports {node.module}.{alias.name}" for alias in node.names
                          if module_private or alias.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                upstream_module = isinstance(node.value, ast.Name) and node.value.id in UPSTREAM_PACKAGES
                if upstream_module or (node.attr in wrapped and not _is_self(node.value)):
                    found.append(f"{where} reads .{node.attr}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                  and re.fullmatch(r"_[a-z]\w*", node.args[1].value)
                  and not node.args[1].value.startswith("_hf_stability")
                  and node.args[1].value not in OWN_PRIVATE_ATTRIBUTES):
                found.append(f"{where} {node.func.id}(..., {node.args[1].value!r})")
    assert not found, "private upstream names outside hf_stability/_compat.py:\n" + "\n".join(found)


def _is_self(node: ast.expr) -> bool:
    """``self``/``cls``, or ``super()``: a Trainer hook overridden here, which `_compat.TRAINER_HOOKS` checks."""
    is_super = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
    return is_super or (isinstance(node, ast.Name) and node.id in ("self", "cls"))
