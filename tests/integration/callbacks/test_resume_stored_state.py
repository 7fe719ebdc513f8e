"""Checkpoint state from another hf-stability version: a real checkpoint's ``trainer_state.json``, edited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import Trainer, TrainingArguments

from hf_stability import AdaptiveClipCallback, SkipNonFiniteCallback, SpikeRollbackCallback, StabilityTrainer
from tests.testing_utils import mlm_dataset, tiny_bert, training_args


@pytest.fixture(scope="module")
def checkpoint(bert_tokenizer, tmp_path_factory) -> Path:
    """A real checkpoint (step 4) of a StabilityTrainer run."""
    output = tmp_path_factory.mktemp("run")
    args = training_args(output, max_steps=4, save_strategy="steps", save_steps=4, adaptive_clip=True)
    StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=mlm_dataset(bert_tokenizer, rows=64)).train()
    return output / "checkpoint-4"


EDITS = {
    "unknown setting": ("SpikeRollbackCallback", "args", "spike_budget", 3,
                        "args.spike_budget is not a setting of this hf-stability version"),
    "zero lr_scale": ("SpikeRollbackCallback", "attributes", "lr_scale", 0,
                      r"attributes.lr_scale must be a number in \(0, 1\], got 0"),
    "non-integer count": ("SkipNonFiniteCallback", "attributes", "skipped_steps", 1.5,
                          "attributes.skipped_steps must be an integer >= 0, got 1.5"),
    "setting out of range": ("SkipNonFiniteCallback", "args", "max_consecutive_skips", 0,
                             "args: `max_consecutive_skips` must be >= 1, got 0 \\(written"),
}


def edited_copy(checkpoint: Path, tmp_path: Path, edit: str) -> Path:
    callback, part, key, value, _ = EDITS[edit]
    copy = tmp_path / "out" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    state = json.loads((copy / "trainer_state.json").read_text())
    state["stateful_callbacks"][callback][part][key] = value
    (copy / "trainer_state.json").write_text(json.dumps(state))
    return copy


@pytest.mark.parametrize("edit", EDITS)
def test_stored_state_from_another_version_is_refused_naming_checkpoint_and_field(
    bert_tokenizer, tmp_path, checkpoint, edit
):
    copy = edited_copy(checkpoint, tmp_path, edit)
    callback = EDITS[edit][0]
    args = training_args(tmp_path / "out", max_steps=8)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=mlm_dataset(bert_tokenizer, rows=64))
    expected = rf"{copy}/trainer_state.json: stateful_callbacks.{callback}: {EDITS[edit][4]}"
    with pytest.raises(ValueError, match=expected):
        trainer.train(resume_from_checkpoint=str(copy))
    assert trainer.state.global_step == 0  # refused before anything was loaded


@pytest.mark.parametrize("edit", ["zero lr_scale", "non-integer count"])
def test_plain_trainer_refuses_restored_state_from_another_version_at_train_begin(
    bert_tokenizer, tmp_path, checkpoint, edit
):
    copy = edited_copy(checkpoint, tmp_path, edit)
    args = training_args(tmp_path / "out", TrainingArguments, max_steps=8, restore_callback_states_from_checkpoint=True)
    trainer = Trainer(tiny_bert(bert_tokenizer), args, train_dataset=mlm_dataset(bert_tokenizer, rows=64),
                      callbacks=[SkipNonFiniteCallback(), SpikeRollbackCallback()])
    field = EDITS[edit][4].split(" must")[0]
    with pytest.raises(ValueError, match=rf"the checkpoint of step 4: stored state of {EDITS[edit][0]}: {field}"):
        trainer.train(resume_from_checkpoint=str(copy))


# The setting names checkpoints of hf-stability before one name per knob stored (`state()["args"]`): old -> flat.
OLDER_NAMES = {
    "SpikeRollbackCallback": {"spike_metric": "metric", "spike_window": "window", "spike_warmup": "warmup",
                              "spike_sigma": "sigma", "spike_check_interval": "check_interval",
                              "rollback_lr_factor": "lr_factor"},
    "AdaptiveClipCallback": {"adaptive_clip_z": "z", "adaptive_clip_alpha": "alpha", "adaptive_clip_warmup": "warmup"},
}


@pytest.mark.parametrize("trainer_class", [StabilityTrainer, Trainer])
def test_a_checkpoint_storing_the_older_setting_names_resumes(bert_tokenizer, tmp_path, checkpoint, trainer_class):
    copy = tmp_path / "out" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    state = json.loads((copy / "trainer_state.json").read_text())
    for callback, older in OLDER_NAMES.items():
        stored = state["stateful_callbacks"][callback]
        assert set(older) <= set(stored["args"])  # what this version writes
        stored["args"] = {older.get(name, name): value for name, value in stored["args"].items()}
    (copy / "trainer_state.json").write_text(json.dumps(state))
    args = training_args(tmp_path / "out", max_steps=6, adaptive_clip=True, spike_sigma=5.0)
    callbacks = None
    if trainer_class is Trainer:
        callbacks = [SkipNonFiniteCallback(), SpikeRollbackCallback(), AdaptiveClipCallback()]
    trainer = trainer_class(tiny_bert(bert_tokenizer), args, train_dataset=mlm_dataset(bert_tokenizer, rows=64),
                            callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(copy))
    assert trainer.state.global_step == 6
    rollback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SpikeRollbackCallback))
    assert rollback.settings.spike_sigma == 5.0  # the resumed run's knob, not the stored 6.0
