"""Gradient health: with ``log_layer_grad_norms``, the report and the model card name layers whose gradient norm sits
orders of magnitude off the median layer, and the plot gains a layer x step heat map.

Real tiny BERT runs; one run's layers get their gradients scaled by a real gradient hook.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from transformers import TrainerCallback, default_data_collator

from hf_stability import StabilityTrainer
from hf_stability.cli import main as cli_main
from hf_stability.report import draw_training_curves, load_run
from tests.testing_utils import mlm_dataset, tiny_bert, training_args

VANISHING_LAYER = "bert.encoder.layer.0.intermediate.dense"  # weight and bias: 1e-6 of their gradient
EXPLODING_LAYER = "bert.embeddings.position_embeddings"  # 1e6 of its gradient


class ScaleLayerGradients(TrainerCallback):
    """Multiplies the gradients of every parameter of the named modules by a factor, in the backward pass."""

    def __init__(self, factors: dict[str, float]) -> None:
        self.factors = factors

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        modules = dict(model.named_modules())
        for name, factor in self.factors.items():
            for parameter in modules[name].parameters(recurse=False):
                parameter.register_hook(lambda grad, factor=factor: grad * factor)


def _train(output_dir: Path, tokenizer, log_layer_grad_norms: bool, factors: dict[str, float]) -> Path:
    trainer = StabilityTrainer(
        model=tiny_bert(tokenizer),
        args=training_args(output_dir, max_steps=6, log_layer_grad_norms=log_layer_grad_norms),
        train_dataset=mlm_dataset(tokenizer, rows=64),
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[ScaleLayerGradients(factors)],
    )
    trainer.train()
    trainer.save_state()
    trainer.create_model_card()
    return output_dir


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory, bert_tokenizer) -> Path:
    factors = {VANISHING_LAYER: 1e-6, EXPLODING_LAYER: 1e6}
    return _train(tmp_path_factory.mktemp("scaled") / "run", bert_tokenizer, True, factors)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, bert_tokenizer) -> Path:
    return _train(tmp_path_factory.mktemp("clean") / "run", bert_tokenizer, True, {})


@pytest.fixture(scope="module")
def unlogged_run(tmp_path_factory, bert_tokenizer) -> Path:
    return _train(tmp_path_factory.mktemp("unlogged") / "run", bert_tokenizer, False, {})


def _report(output_dir: Path, capsys) -> str:
    assert cli_main(["report", str(output_dir), "--no-plot"]) == 0
    return capsys.readouterr().out


def _stability_section(output_dir: Path) -> str:
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    return card.split("## Stability", 1)[1].split("\n## ", 1)[0]


def test_report_names_the_scaled_layers(scaled_run, capsys):
    text = _report(scaled_run, capsys)
    assert "2 layer(s) outside 0.0001x .. 10000x the median layer" in text
    assert f"vanishing: {VANISHING_LAYER} median norm" in text
    assert f"exploding: {EXPLODING_LAYER} median norm" in text
    assert text.count("vanishing:") == 1 and text.count("exploding:") == 1


def test_model_card_names_the_scaled_layers(scaled_run):
    section = _stability_section(scaled_run)
    assert f"  - vanishing: `{VANISHING_LAYER}` median norm" in section
    assert f"  - exploding: `{EXPLODING_LAYER}` median norm" in section


def test_a_clean_run_names_no_layer(clean_run, capsys):
    expected = "every layer's median norm within 0.0001x .. 10000x the median layer"
    text = _report(clean_run, capsys)
    assert expected in text
    assert "vanishing:" not in text and "exploding:" not in text
    section = _stability_section(clean_run)
    assert expected in section and "vanishing" not in section and "exploding" not in section


def _heat_maps(output_dir: Path) -> list:
    figure = draw_training_curves(load_run(output_dir))
    try:
        return [
            (axis, [label.get_text() for label in axis.get_yticklabels() if label.get_color() == "red"])
            for axis in figure.axes
            if axis.get_title().startswith("per-layer gradient norm")
        ]
    finally:
        plt.close(figure)


def test_plot_has_a_layer_heat_map_only_when_layer_norms_were_logged(scaled_run, clean_run, unlogged_run, capsys):
    ((_, flagged),) = _heat_maps(scaled_run)
    assert sorted(flagged) == sorted([VANISHING_LAYER, EXPLODING_LAYER])  # named in red on the y axis
    ((axis, flagged),) = _heat_maps(clean_run)
    assert flagged == [] and VANISHING_LAYER in [label.get_text() for label in axis.get_yticklabels()]
    assert _heat_maps(unlogged_run) == []
    assert "per-layer gradient norms" not in _report(unlogged_run, capsys)
    assert "per-layer gradient norms" not in _stability_section(unlogged_run).lower()


def test_doctor_names_the_scaled_layers_and_nothing_in_the_clean_run(scaled_run, clean_run):
    from hf_stability.doctor import diagnose

    (finding,) = diagnose(scaled_run)
    assert finding.rule == "layer_gradients" and finding.cause.startswith("Likely vanishing/exploding gradients in 2")
    assert any(fact.startswith(f"{VANISHING_LAYER} (vanishing): median norm") for fact in finding.evidence)
    assert any(fact.startswith(f"{EXPLODING_LAYER} (exploding): median norm") for fact in finding.evidence)
    assert "initialisation" in finding.remedy[0] and "LayerNorm placement" in finding.remedy[1]
    assert "activation" in finding.remedy[2]
    assert "### Diagnosis\n\n1. **Likely vanishing/exploding" in (scaled_run / "README.md").read_text(encoding="utf-8")
    assert diagnose(clean_run) == []
