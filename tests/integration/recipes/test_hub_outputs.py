"""What a recipe run hands to the Hub: a card that states what ran, Hub metadata, a model usable as the card says.

Each recipe runs once for real (a few steps, non-default objective flags); the card is then checked against
the run's own arguments and files, parsed with `huggingface_hub`'s own parser, and its usage snippet executed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

from hf_stability import report
from tests.integration.recipes.recipe_utils import TINY_RUN, results, run_recipe

PYTHON = [sys.executable]
# Every objective flag away from its default; the card must state these values.
BART_FLAGS = {
    "mask_ratio": "0.2",
    "random_ratio": "0.25",
    "poisson_lambda": "2.5",
    "permute_sentence_ratio": "0.5",
    "rotate_ratio": "0.2",
}  # insert_ratio stays 0: insertions lengthen rows past the tiny model's 64 positions
BERT_FLAGS = {
    "mlm_probability": "0.2",
    "mask_replace_prob": "0.7",
    "random_replace_prob": "0.2",
    "whole_word_mask": "true",
    "short_seq_prob": "0.3",
    "nsp_probability": "0.4",
}
T5_FLAGS = {"noise_density": "0.3", "mean_noise_span_length": "2.0"}
FLAGS = {"bart": BART_FLAGS, "bert": BERT_FLAGS, "t5": T5_FLAGS}


def flags(values: dict[str, str]) -> list[str]:
    return [item for name, value in values.items() for item in (f"--{name}", value)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One real run per recipe: 4 steps, logging every 2nd, warm-up as a ratio, BART with --fp16 on this CPU."""
    root = tmp_path_factory.mktemp("hub")
    extra = {"bart": ["--fp16"], "bert": [], "t5": []}
    outputs = {}
    for name in ("bart", "bert", "t5"):
        output_dir = root / name
        completed = run_recipe(
            PYTHON,
            name,
            output_dir,
            *TINY_RUN,
            "--max_steps",
            "4",
            "--logging_steps",
            "2",
            "--warmup_steps",
            "0.5",
            *flags(FLAGS[name]),
            *extra[name],
        )
        outputs[name] = (output_dir, completed.stdout + completed.stderr)
    return outputs


def card_text(output_dir) -> str:
    return (output_dir / "README.md").read_text(encoding="utf-8")


def description(card: str) -> str:
    """The card's opening paragraph (between the title and the first section), on one line."""
    return " ".join(card.split("\n# ", 1)[1].split("\n## ", 1)[0].split())


@pytest.mark.slow
def test_cards_describe_the_objective_settings_that_ran(runs):
    bart = description(card_text(runs["bart"][0]))
    assert "Poisson(2.5)" in bart and "over 20% of the words" in bart and "25% of the masks" in bart
    assert "50% of each row's sentences permuted" in bart and "no token insertion" in bart
    assert "rotated with probability 0.2" in bart and "30%" not in bart
    bert = description(card_text(runs["bert"][0]))
    assert "round(20%)" in bert and "as whole words" in bert
    assert "70% become `[MASK]`" in bert and "20% a random non-special token and 10% stay" in bert
    assert "random segment with probability 0.4" in bert and "shorter random length with probability 0.3" in bert
    t5 = description(card_text(runs["t5"][0]))
    assert "30% of each row's tokens, in spans of mean length 2" in t5 and "15%" not in t5
    for name, values in FLAGS.items():
        card = card_text(runs[name][0])
        for flag, value in values.items():
            assert re.search(rf"\| {flag} \| \*\*{re.escape(value.capitalize() if value == 'true' else value)}", card)


@pytest.mark.slow
def test_card_records_precision_warmup_and_last_loss_as_they_ran(runs):
    output_dir, log = runs["bart"]
    card = card_text(output_dir)
    # --fp16 on a CPU: accelerate applies neither autocast nor a grad scaler, so the run is fp32.
    assert "| precision | fp32 (fp16 was requested but has no effect on cpu) |" in card
    assert "PRECISION: fp32 (fp16 was requested" in log
    assert "| warmup | 50% of the training steps (2 steps) |" in card
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    last = [entry for entry in history if "loss" in entry][-1]
    assert last["step"] == 4
    assert f"| last logged training loss (step 4) | {last['loss']:.4f} |" in card
    assert f"| train_loss | {results(output_dir, 'train')['train_loss']:.4f} |" in card
    assert "| precision | fp32 |" in card_text(runs["t5"][0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bart", "bert", "t5"])
def test_card_metadata_parses_back_with_huggingface_hub(runs, name):
    output_dir = runs[name][0]
    card = ModelCard.load(output_dir / "README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.library_name == "transformers" and data.language == "en"
    assert {"hf-stability", "pretraining", name} <= set(data.tags)
    evaluation = results(output_dir, "eval")
    parsed = {result.metric_name: result for result in data.eval_results}
    assert parsed["masked token accuracy"].metric_value == pytest.approx(
        evaluation["eval_masked_token_accuracy"], abs=1e-4
    )
    assert parsed["perplexity"].metric_value == pytest.approx(evaluation["eval_perplexity"], abs=1e-4)
    assert ("next sentence prediction accuracy" in parsed) == (name == "bert")
    assert all(result.dataset_split == "held-out" for result in data.eval_results)
    assert data.model_name == output_dir.name
    assert "pypi.org" not in card.text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bart", "bert", "t5"])
def test_saved_model_runs_the_cards_own_snippet(runs, name):
    output_dir = runs[name][0]
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    # The tiny models have 64 positions (T5: relative positions, trained on 64-token inputs).
    assert tokenizer.model_max_length == 64
    assert len(tokenizer("word " * 300, truncation=True)["input_ids"]) == 64
    card = ModelCard.load(output_dir / "README.md")
    pipeline_tag = card.data.pipeline_tag
    if pipeline_tag is not None:
        from transformers.pipelines import SUPPORTED_TASKS

        assert pipeline_tag in SUPPORTED_TASKS
    (snippet,) = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    if pipeline_tag is not None:
        assert f'pipeline("{pipeline_tag}"' in snippet
    completed = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, cwd=output_dir.parent
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip()


@pytest.mark.slow
def test_report_counts_logged_entries_and_gives_each_panel_its_legend(runs):
    run = report.load_run(runs["bart"][0])
    assert "last step: 4 (2 training loss entries logged)" in report.format_summary(run)
    figure = report.draw_training_curves(run)
    figure.canvas.draw()  # tick labels are only known once drawn
    loss_axis, grad_axis = figure.axes[:2]
    legend_texts = [[text.get_text() for text in axis.get_legend().get_texts()] for axis in (loss_axis, grad_axis)]
    assert legend_texts == [["training loss", "eval loss"], ["grad norm (before clipping)"]]
    low, high = grad_axis.get_ylim()
    labels = [
        label.get_text()
        for tick, label in zip(grad_axis.get_yticks(), grad_axis.get_yticklabels(), strict=True)
        if low <= tick <= high
    ]
    # At least two plain-number labels inside the visible range (matplotlib's default labels decades only).
    assert len(labels) >= 2 and all(float(label) > 0 for label in labels)
