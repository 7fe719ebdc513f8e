"""Resume is a first-class path: plain-Trainer checkpoints, settings vs stored state, one events file per run.

Every run is real (tiny BERT, real `Trainer`, real checkpoints on disk); faults are real Inf gradients.
"""

from __future__ import annotations

import json

import pytest
from transformers import Trainer, TrainingArguments

from hf_stability import SkipNonFiniteCallback, SpikeRollbackCallback, StabilityTrainer, read_events
from hf_stability.callbacks.order import find_callback
from hf_stability.events import EVENTS_FILENAME, SUPERSEDED_PREFIX
from tests.testing_utils import PoisonGradient, mlm_dataset, tiny_bert, training_args

pytestmark = pytest.mark.filterwarnings("ignore:.*moved.*earlier line:UserWarning")


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=64)


def checkpoint_args(output_dir, args_class=None, **overrides):
    return training_args(output_dir, args_class, save_strategy="steps", save_steps=2, **overrides)


def stored_callbacks(checkpoint) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]


def plain_trainer(model, args, dataset, callbacks):
    return Trainer(model, args, train_dataset=dataset, callbacks=callbacks)


@pytest.mark.parametrize("resume_with", ["StabilityTrainer", "Trainer"])
def test_plain_trainer_checkpoint_resumes_with_the_callbacks_added(tmp_path, bert_tokenizer, dataset, resume_with):
    Trainer(
        tiny_bert(bert_tokenizer), checkpoint_args(tmp_path, TrainingArguments, max_steps=4), train_dataset=dataset
    ).train()
    assert "SkipNonFiniteCallback" not in stored_callbacks(tmp_path / "checkpoint-4")
    model = tiny_bert(bert_tokenizer)
    if resume_with == "StabilityTrainer":
        trainer = StabilityTrainer(
            model, checkpoint_args(tmp_path, max_steps=8), train_dataset=dataset, callbacks=[PoisonGradient([5])]
        )
    else:
        args = checkpoint_args(tmp_path, TrainingArguments, max_steps=8, restore_callback_states_from_checkpoint=True)
        trainer = plain_trainer(
            model, args, dataset, [SkipNonFiniteCallback(), SpikeRollbackCallback(), PoisonGradient([5])]
        )
    trainer.train(resume_from_checkpoint=True)
    for step in (6, 8):  # every checkpoint after the resume is complete and carries the counters
        stored = stored_callbacks(tmp_path / f"checkpoint-{step}")
        assert stored["SkipNonFiniteCallback"]["attributes"]["skipped_steps"] == 1
        assert "SpikeRollbackCallback" in stored
    assert [event["step"] for event in read_events(tmp_path)] == [6]


def test_settings_given_for_the_resumed_run_win_and_counters_come_back(tmp_path, bert_tokenizer, dataset):
    first = StabilityTrainer(
        tiny_bert(bert_tokenizer),
        checkpoint_args(tmp_path, max_steps=4, spike_sigma=6.0),
        train_dataset=dataset,
        callbacks=[PoisonGradient([1])],
    )
    first.train()
    stored = stored_callbacks(tmp_path / "checkpoint-4")
    assert stored["SkipNonFiniteCallback"]["args"] == {"max_consecutive_skips": 50, "max_underflow_steps": 100}
    window = stored["SpikeRollbackCallback"]["attributes"]["detector_window"]
    assert len(window) == 3  # four steps, one skipped

    args = checkpoint_args(tmp_path, max_steps=6, max_consecutive_skips=7, spike_sigma=4.0)
    resumed = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    callbacks = resumed.callback_handler.callbacks
    skip, rollback = find_callback(callbacks, SkipNonFiniteCallback), find_callback(callbacks, SpikeRollbackCallback)
    assert skip.max_consecutive_skips == 7 and skip.skipped_steps == 1
    assert rollback.settings.spike_sigma == 4.0
    assert rollback.state()["attributes"]["detector_window"][:3] == window
    stored_args = stored_callbacks(tmp_path / "checkpoint-6")["SkipNonFiniteCallback"]["args"]
    assert stored_args == {"max_consecutive_skips": 7, "max_underflow_steps": 100}


def test_plain_trainer_callback_arguments_win_over_the_checkpoint(tmp_path, bert_tokenizer, dataset):
    def run(max_steps, skips, window, resume):
        args = checkpoint_args(
            tmp_path, TrainingArguments, max_steps=max_steps, restore_callback_states_from_checkpoint=True
        )
        callbacks = [
            SkipNonFiniteCallback(max_consecutive_skips=skips),
            SpikeRollbackCallback(window=window, warmup=2),
            PoisonGradient([1]),
        ]
        trainer = plain_trainer(tiny_bert(bert_tokenizer), args, dataset, callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.callback_handler.callbacks

    run(4, 50, 16, None)
    callbacks = run(6, 3, 8, True)
    skip, rollback = find_callback(callbacks, SkipNonFiniteCallback), find_callback(callbacks, SpikeRollbackCallback)
    assert skip.max_consecutive_skips == 3 and skip.skipped_steps == 1
    assert rollback.settings.spike_window == 8


def test_resume_supersedes_later_events_and_keeps_them_aside(tmp_path, bert_tokenizer, dataset):
    """A run went on past checkpoint-4 (skips at steps 2 and 6); resuming from 4 replays steps 5-8 once."""
    StabilityTrainer(
        tiny_bert(bert_tokenizer),
        checkpoint_args(tmp_path, max_steps=8),
        train_dataset=dataset,
        callbacks=[PoisonGradient([1, 5])],
    ).train()
    assert [event["step"] for event in read_events(tmp_path)] == [2, 6]
    resumed = StabilityTrainer(
        tiny_bert(bert_tokenizer),
        checkpoint_args(tmp_path, max_steps=8),
        train_dataset=dataset,
        callbacks=[PoisonGradient([5])],
    )
    with pytest.warns(
        UserWarning,
        match=r"moved 1 earlier line\(s\) to stability_events.superseded-.*resumes from "
        r"step 4",
    ):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    skip = find_callback(resumed.callback_handler.callbacks, SkipNonFiniteCallback)
    events = read_events(tmp_path)
    assert [event["step"] for event in events] == [2, 6] and skip.skipped_steps == len(events) == 2
    (aside,) = tmp_path.glob(f"{SUPERSEDED_PREFIX}*.jsonl")
    assert [event["step"] for event in read_events(aside)] == [6]


def test_a_fresh_run_into_the_same_output_dir_moves_the_previous_runs_events_aside(tmp_path, bert_tokenizer, dataset):
    for poisoned in ([1, 3], [2]):
        StabilityTrainer(
            tiny_bert(bert_tokenizer),
            training_args(tmp_path, max_steps=4),
            train_dataset=dataset,
            callbacks=[PoisonGradient(poisoned)],
        ).train()
    assert [event["step"] for event in read_events(tmp_path)] == [3]
    (aside,) = tmp_path.glob(f"{SUPERSEDED_PREFIX}*.jsonl")
    assert [event["step"] for event in read_events(aside)] == [2, 4]


def test_torn_last_line_is_repaired_before_the_next_append(tmp_path, bert_tokenizer, dataset):
    path = tmp_path / EVENTS_FILENAME
    StabilityTrainer(
        tiny_bert(bert_tokenizer),
        checkpoint_args(tmp_path, max_steps=4),
        train_dataset=dataset,
        callbacks=[PoisonGradient([1])],
    ).train()
    with path.open("a") as handle:
        handle.write('{"step": 5, "event": "sk')  # killed mid-write
    StabilityTrainer(
        tiny_bert(bert_tokenizer),
        checkpoint_args(tmp_path, max_steps=6),
        train_dataset=dataset,
        callbacks=[PoisonGradient([4])],
    ).train(resume_from_checkpoint=True)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 5]  # every line valid JSON, nothing torn
