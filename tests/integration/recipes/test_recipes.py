"""The recipes end to end, launched as a user launches them: python, torchrun, accelerate launch.

Each run is real (embedded corpus, tokenizer trained on the fly, tiny transformers model, the project's
collators and StabilityTrainer) and kept to a handful of steps.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import yaml

from hf_stability.doctor import diagnose
from tests.integration.recipes.recipe_utils import BIN, REPO, TINY_RUN, logged_losses, results, run_recipe
from tests.testing_utils import offline_wandb_history, offline_wandb_records

PYTHON = [sys.executable]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_run_artifacts(output_dir, title: str, world_size: int, eval_loss_has_nsp: bool = False) -> str:
    """The files every run leaves, and a model card that carries this run's own figures."""
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "eval_results.json"):
        assert (output_dir / name).is_file(), name
    plot = output_dir / "training_curves.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size > 5_000
    card = (output_dir / "README.md").read_text()
    assert title in card
    assert f"on {world_size} process(es)" in card and f"| world_size | {world_size} |" in card
    evaluation = results(output_dir, "eval")
    for key in ("eval_loss", "eval_masked_token_accuracy", "eval_perplexity"):
        assert f"| {key} | {evaluation[key]:.4f} |" in card
    assert 0 <= evaluation["eval_masked_token_accuracy"] <= 1
    if eval_loss_has_nsp:
        # BERT's eval loss is MLM + NSP; perplexity covers the masked tokens only, so it is below exp(loss).
        assert evaluation["eval_perplexity"] < math.exp(evaluation["eval_loss"])
    else:
        # Perplexity is exp(mean token loss) over the same positions as the eval loss (which averages
        # per batch instead of per token, hence the tolerance).
        assert evaluation["eval_perplexity"] == pytest.approx(math.exp(evaluation["eval_loss"]), rel=0.05)
    assert f"| train_loss | {results(output_dir, 'train')['train_loss']:.4f} |" in card
    assert "Skipped steps (non-finite gradients): **0**" in card and "Rollbacks after loss spikes: **0**" in card
    # Zero false alarms: the doctor finds nothing in a clean recipe run, in the card and from the directory.
    assert "### Diagnosis\n\nNo findings: the record shows no symptom of instability." in card
    assert diagnose(output_dir) == []
    return card


@pytest.mark.slow
def test_bart_recipe_lowers_the_loss_on_the_default_corpus(tmp_path):
    output_dir = tmp_path / "bart"
    run_recipe(PYTHON, "bart", output_dir, *TINY_RUN, "--max_steps", "40", "--learning_rate", "3e-3")
    losses = logged_losses(output_dir)
    assert len(losses) == 40
    # A freshly initialised model starts near ln(vocab) = 6.7 nats. With seed 42 the mean of the last 5
    # steps is 1.0 nat below the first 5 (6.65 -> 5.66); half of that is still 5x the step-to-step
    # spread of the logged loss on this data (~0.1 nat), so only a run that does not learn fails.
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, losses
    assert_run_artifacts(output_dir, "BART denoising", world_size=1)


def test_bert_recipe_from_yaml_config_logs_stability_metrics_to_wandb_offline(tmp_path):
    output_dir, wandb_dir = tmp_path / "bert", tmp_path / "wandb_runs"
    wandb_dir.mkdir()
    config = tmp_path / "bert.yaml"
    config.write_text(
        yaml.safe_dump({"max_steps": 3, "report_to": "wandb", "run_name": "bert-test", "nsp_probability": 0.5})
    )
    run_recipe(PYTHON, "bert", output_dir, "--config", str(config), *TINY_RUN, env={"WANDB_DIR": str(wandb_dir)})
    card = assert_run_artifacts(output_dir, "next-sentence prediction", world_size=1, eval_loss_has_nsp=True)
    assert "eval_nsp_accuracy" in results(output_dir, "eval") and "| eval_nsp_accuracy |" in card
    # Read the offline run back from disk, as `wandb sync` would upload it.
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    history = offline_wandb_history(run_dir)
    train_rows = [row for row in history if "train/loss" in row]
    assert len(train_rows) == 3
    assert all(
        row["train/stability/skipped_steps"] == 0 and row["train/stability/rollbacks"] == 0 for row in train_rows
    )
    assert any("eval/masked_token_accuracy" in row for row in history)
    summary: dict = {}
    for record in offline_wandb_records(run_dir, "summary"):
        summary.update(record["update"])
    assert summary["stability/findings"] == 0
    assert summary["stability/diagnosis"] == "No findings: the record shows no symptom of instability."


def test_t5_recipe_trains_on_a_local_jsonl_file(tmp_path, corpus):
    data = tmp_path / "my_corpus.jsonl"
    data.write_text("".join(json.dumps({"body": document}) + "\n" for document in corpus[:40]))
    output_dir = tmp_path / "t5"
    run_recipe(
        PYTHON, "t5", output_dir, "--train_file", str(data), "--text_column_name", "body", *TINY_RUN, "--max_steps", "3"
    )
    card = assert_run_artifacts(output_dir, "T5 span corruption", world_size=1)
    assert "Training text: my_corpus.jsonl" in card


# Recipe -> (card title, whether its eval loss includes NSP).
CARDS = {
    "bart": ("BART denoising", False),
    "bert": ("next-sentence prediction", True),
    "t5": ("T5 span corruption", False),
}
TWO_PROCESS_LAUNCHERS = {
    "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2"],
    "accelerate": [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"),
    ],
}


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", sorted(TWO_PROCESS_LAUNCHERS))
@pytest.mark.parametrize("recipe", sorted(CARDS))
def test_recipe_runs_on_two_processes(tmp_path, recipe, launcher):
    output_dir = tmp_path / f"{recipe}_{launcher}"
    completed = run_recipe(TWO_PROCESS_LAUNCHERS[launcher], recipe, output_dir, *TINY_RUN, "--max_steps", "3")
    title, eval_loss_has_nsp = CARDS[recipe]
    assert_run_artifacts(output_dir, title, world_size=2, eval_loss_has_nsp=eval_loss_has_nsp)
    assert "world size 2" in completed.stdout
    # Trainer would multiply an already averaged loss by the world size; a fresh model sits near
    # ln(vocab) = 6.7 nats (+ ln 2 for BERT's NSP head), so a doubled loss (~13) cannot pass this bound.
    assert logged_losses(output_dir)[0] < 1.5 * math.log(800)
