"""The per-step channel and the callback order: real tiny runs, real checkpoints, real resumes.

- `StepSignals`: under `StabilityTrainer` the loss Trainer optimises reaches the callbacks even when the model
  returns none (label smoothing); under a plain `Trainer` that case warns once; the forward hook exists only
  under a plain `Trainer` and is removed at train end.
- Priority order: the stability callbacks run skip, adaptive clip, rollback, telemetry, right after
  `DefaultFlowCallback` and ahead of the other callbacks, also after Trainer's callback restore on resume.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback

from hf_stability import (
    AdaptiveClipCallback,
    LossScaleTelemetryCallback,
    SkipNonFiniteCallback,
    SpikeRollbackCallback,
    StabilityTrainer,
    read_events,
)
from hf_stability.callbacks.order import find_callback
from tests.rollback_faults import ThrowWeights
from tests.testing_utils import mlm_dataset, tiny_bert, training_args

MISSING_LOSS = "The model returned no loss in training"


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=256)


class ParameterRecorder(TrainerCallback):
    """The parameters at the end of the given steps, and right after the first rollback of ``trainer``."""

    def __init__(self, trainer: Trainer, steps: set[int]) -> None:
        self.trainer = trainer
        self.steps = steps
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.after_rollback: tuple[int, dict[str, torch.Tensor]] | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        rollback = find_callback(self.trainer.callback_handler.callbacks, SpikeRollbackCallback)
        parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
        if rollback.rollbacks and self.after_rollback is None:
            self.after_rollback = (state.global_step, parameters)
        elif state.global_step in self.steps:
            self.saved[state.global_step] = parameters


def test_label_smoothing_loss_is_judged_and_a_thrown_update_rolled_back_under_stability_trainer(
    bert_tokenizer, dataset, tmp_path
):
    # Trainer pops the labels for label smoothing: the model returns no loss, only Trainer's loss exists.
    args = training_args(tmp_path, max_steps=50, logging_steps=25, max_grad_norm=0.0, label_smoothing_factor=0.1,
                         spike_window=16, spike_warmup=8, snapshot_interval=10)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset, callbacks=[ThrowWeights([30])])
    recorder = ParameterRecorder(trainer, {20})
    trainer.add_callback(recorder)
    trainer.train()

    (event,) = read_events(tmp_path)
    assert (event["event"], event["metric"], event["spike_step"]) == ("rollback", "loss", 31)
    assert event["value"] > event["threshold"] and event["restored_step"] == 20  # step 30's snapshot is untrusted
    rollback_step, restored = recorder.after_rollback
    assert rollback_step == event["step"]
    for name, value in recorder.saved[20].items():
        assert torch.equal(restored[name], value), name


def test_plain_trainer_warns_once_when_the_model_returns_no_loss(bert_tokenizer, dataset, tmp_path, caplog):
    args = training_args(tmp_path, TrainingArguments, max_steps=4, label_smoothing_factor=0.1)
    trainer = Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset, callbacks=[SpikeRollbackCallback()])
    trainer.train()
    assert caplog.text.count(MISSING_LOSS) == 1

    caplog.clear()  # the model's own loss: no warning
    args = training_args(tmp_path / "plain", TrainingArguments, max_steps=4)
    Trainer(tiny_bert(bert_tokenizer), args, train_dataset=dataset, callbacks=[SpikeRollbackCallback()]).train()
    assert MISSING_LOSS not in caplog.text


class HookCount(TrainerCallback):
    """The number of forward hooks on the model at each step end."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.counts.append(len(model._forward_hooks))


@pytest.mark.parametrize("trainer_class", [StabilityTrainer, Trainer])
def test_the_forward_hook_exists_only_under_a_plain_trainer_and_only_while_it_trains(
    bert_tokenizer, dataset, tmp_path, trainer_class
):
    model = tiny_bert(bert_tokenizer)
    hooks = HookCount()
    stability = [] if trainer_class is StabilityTrainer else [SkipNonFiniteCallback(), SpikeRollbackCallback()]
    trainer = trainer_class(model, training_args(tmp_path, max_steps=3), train_dataset=dataset,
                            callbacks=[*stability, hooks])
    trainer.train()
    assert hooks.counts == [0 if trainer_class is StabilityTrainer else 1] * 3
    assert len(model._forward_hooks) == 0


PRIORITY_ORDER = [SkipNonFiniteCallback, AdaptiveClipCallback, SpikeRollbackCallback, LossScaleTelemetryCallback]


class UserCallback(TrainerCallback):
    """A callback of the user's: it must stay behind the stability callbacks."""


def assert_priority_order(trainer) -> None:
    kinds = [type(callback) for callback in trainer.callback_handler.callbacks]
    assert kinds[: len(PRIORITY_ORDER) + 1] == [DefaultFlowCallback, *PRIORITY_ORDER], kinds
    assert kinds.index(UserCallback) > len(PRIORITY_ORDER)


def build(trainer_class, model, output_dir, dataset, max_steps):
    if trainer_class is StabilityTrainer:
        args = training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2, adaptive_clip=True)
        return StabilityTrainer(model, args, train_dataset=dataset, callbacks=[UserCallback()])
    args = training_args(output_dir, TrainingArguments, max_steps=max_steps, save_strategy="steps", save_steps=2,
                         restore_callback_states_from_checkpoint=True)
    callbacks = [UserCallback(), SpikeRollbackCallback(), AdaptiveClipCallback(), SkipNonFiniteCallback()]
    trainer = Trainer(model, args, train_dataset=dataset, callbacks=callbacks)
    LossScaleTelemetryCallback.attach(trainer)
    return trainer


@pytest.mark.parametrize("trainer_class", [StabilityTrainer, Trainer])
def test_callbacks_run_in_priority_order_also_after_a_resume(bert_tokenizer, dataset, tmp_path, trainer_class):
    first = build(trainer_class, tiny_bert(bert_tokenizer), tmp_path, dataset, max_steps=2)
    assert_priority_order(first)
    first.train()

    resumed = build(trainer_class, tiny_bert(bert_tokenizer), tmp_path, dataset, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert_priority_order(resumed)
    restored = find_callback(resumed.callback_handler.callbacks, AdaptiveClipCallback)
    assert restored.healthy_steps == 4  # the restored copy (2 steps from the checkpoint), not the one passed in
