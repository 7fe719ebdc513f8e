"""`StabilityTrainer.create_model_card`: the `Trainer` hook (what ``push_to_hub`` calls) writes the stability card."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import default_data_collator

from hf_stability import SpikeRollbackCallback, StabilityTrainer
from tests.testing_utils import emulate_fp16_scaler, mlm_dataset, tiny_bert, training_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bert_tokenizer):
    output_dir = tmp_path_factory.mktemp("card") / "tiny-bert"
    rows = mlm_dataset(bert_tokenizer, rows=64)
    trainer = StabilityTrainer(
        model=tiny_bert(bert_tokenizer),
        args=training_args(output_dir, max_steps=4, eval_strategy="no", fp16=True),
        train_dataset=rows,
        eval_dataset=rows.select(range(16)),
        data_collator=default_data_collator,
        processing_class=bert_tokenizer,
    )
    emulate_fp16_scaler(trainer)  # a real GradScaler, as on a GPU
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    return trainer


def test_create_model_card_maps_trainer_arguments_to_hub_metadata(trained):
    trained.create_model_card(
        license="mit",
        language="en",
        tags="demo",
        model_name="tiny-bert-demo",
        finetuned_from="google-bert/bert-base-uncased",
        dataset="wikitext",
        dataset_args="wikitext-2-raw-v1",
        tasks="fill-mask",
    )
    card = ModelCard.load(trained.args.output_dir + "/README.md")
    data = card.data
    assert data.license == "mit" and data.library_name == "transformers" and data.language == "en"
    assert data.tags == ["hf-stability", "demo"]
    assert data.base_model == "google-bert/bert-base-uncased" and data.datasets == ["wikitext"]
    assert data.pipeline_tag == "fill-mask"
    # The model-index, parsed back by huggingface_hub, carries the held-out metrics of the last evaluation.
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "tiny-bert-demo"
    evaluation = [entry for entry in trained.state.log_history if "eval_loss" in entry][-1]
    (loss,) = [result for result in results if result.metric_type == "loss"]
    assert loss.metric_value == pytest.approx(evaluation["eval_loss"], abs=1e-4)
    assert loss.dataset_type == "wikitext" and loss.dataset_config == "wikitext-2-raw-v1"
    assert "# tiny-bert-demo" in card.text


def test_create_model_card_has_the_stability_section_and_the_real_precision(trained):
    trained.create_model_card()
    card = ModelCard.load(trained.args.output_dir + "/README.md")
    assert "## Stability" in card.text and "Skipped steps (non-finite gradients): **0**" in card.text
    assert "| precision | fp16 mixed precision (fp32 weights, dynamic loss scaling) |" in card.text
    assert "Loss-scale range: 1024 to 1024" in card.text
    assert "![training curves](training_curves.png)" in card.text
    assert (Path(trained.args.output_dir) / "training_curves.png").is_file() and card.data.pipeline_tag is None
    (snippet,) = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    assert "BertForMaskedLM.from_pretrained" in snippet
    completed = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.parametrize("spike_rollback", [True, False])
def test_the_card_states_the_settings_of_the_callbacks_that_ran(tmp_path, bert_tokenizer, spike_rollback):
    """A callback passed explicitly runs with its own keywords, and runs whatever ``spike_rollback`` says."""
    trainer = StabilityTrainer(
        model=tiny_bert(bert_tokenizer),
        args=training_args(tmp_path, max_steps=2, spike_rollback=spike_rollback, spike_window=32, spike_warmup=8),
        train_dataset=mlm_dataset(bert_tokenizer, rows=16),
        callbacks=[SpikeRollbackCallback(sigma=4.0, snapshot_interval=50)],
    )
    trainer.train()
    (rollback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, SpikeRollbackCallback)]
    assert rollback.settings.spike_sigma == 4.0  # what ran
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "README.md").text
    for row in ("spike_rollback | True", "spike_sigma | 4.0", "snapshot_interval | 50", "spike_window | 32"):
        assert f"| {row} |" in text, text


def test_without_matplotlib_the_card_leaves_the_picture_out_and_says_why(monkeypatch, trained):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    (Path(trained.args.output_dir) / "training_curves.png").unlink(missing_ok=True)
    trained.create_model_card()
    card = ModelCard.load(trained.args.output_dir + "/README.md")
    assert "![training curves]" not in card.text
    assert "picture is left out: Plotting training curves needs `matplotlib`" in card.text, card.text
    assert "pip install 'hf-stability[plot]'" in card.text
    assert not (Path(trained.args.output_dir) / "training_curves.png").exists()
