"""StabilityTrainer: callbacks from the config, in order, without duplicates; plain TrainingArguments work."""

from __future__ import annotations

import logging

import pytest
from transformers import Trainer, TrainingArguments

from hf_stability import LossScaleTelemetryCallback, SkipNonFiniteCallback, StabilityConfig, StabilityTrainer
from hf_stability.callbacks.order import find_callback
from hf_stability.trainer import stability_callbacks, stability_option
from tests.testing_utils import PoisonGradient, mlm_dataset, tiny_bert, training_args


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=32)


def callback_names(trainer: Trainer) -> list[str]:
    return [type(callback).__name__ for callback in trainer.callback_handler.callbacks]


def test_callbacks_follow_the_config_and_sit_ahead_of_reporting_and_user_callbacks(tmp_path, bert_tokenizer):
    args = training_args(tmp_path, report_to=["wandb"], max_consecutive_skips=7, log_layer_grad_norms=True)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, callbacks=[PoisonGradient([])])
    names = callback_names(trainer)
    assert names[:4] == [
        "DefaultFlowCallback",
        "SkipNonFiniteCallback",
        "SpikeRollbackCallback",
        "LossScaleTelemetryCallback",
    ]
    assert names.index("LossScaleTelemetryCallback") < names.index("WandbCallback") < names.index("PoisonGradient")
    callbacks = trainer.callback_handler.callbacks
    assert find_callback(callbacks, SkipNonFiniteCallback).max_consecutive_skips == 7
    assert find_callback(callbacks, LossScaleTelemetryCallback).log_layer_grad_norms

    without_skip = StabilityTrainer(tiny_bert(bert_tokenizer), training_args(tmp_path, skip_nonfinite=False))
    assert "SkipNonFiniteCallback" not in callback_names(without_skip)


def test_callbacks_passed_by_the_user_are_not_duplicated(tmp_path, bert_tokenizer):
    mine = SkipNonFiniteCallback(max_consecutive_skips=3)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), training_args(tmp_path), callbacks=[mine])
    skips = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SkipNonFiniteCallback)]
    assert skips == [mine]


def test_plain_training_arguments_get_stability_defaults_and_a_resume_warning(
    tmp_path, bert_tokenizer, dataset, caplog
):
    args = TrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[], logging_steps=1, use_cpu=True
    )
    assert stability_option(args, "max_consecutive_skips") == StabilityConfig.max_consecutive_skips
    with caplog.at_level(logging.WARNING, logger="hf_stability.trainer"):
        trainer = StabilityTrainer(
            tiny_bert(bert_tokenizer), args, train_dataset=dataset, callbacks=[PoisonGradient([1])]
        )
    assert "restore_callback_states_from_checkpoint=False" in caplog.text
    trainer.train()
    logged = [entry["stability/skipped_steps"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [0, 1, 1]


def test_stability_callbacks_order_and_unknown_option(tmp_path):
    names = [type(cb).__name__ for cb in stability_callbacks(training_args(tmp_path))]
    assert names == ["SkipNonFiniteCallback", "SpikeRollbackCallback", "LossScaleTelemetryCallback"]
    only_telemetry = stability_callbacks(training_args(tmp_path, skip_nonfinite=False, spike_rollback=False))
    assert [type(cb).__name__ for cb in only_telemetry] == ["LossScaleTelemetryCallback"]
    with pytest.raises(ValueError, match="name"):
        stability_option(training_args(tmp_path), "learning_rate")


def test_behaves_like_trainer_without_faults(tmp_path, bert_tokenizer, dataset):
    """Same seed, same data: StabilityTrainer's losses equal Trainer's bit for bit (the checks change nothing)."""
    losses = []
    for trainer_class in (Trainer, StabilityTrainer):
        args = training_args(tmp_path / trainer_class.__name__, max_steps=4)
        trainer = trainer_class(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert losses[0] == losses[1]
