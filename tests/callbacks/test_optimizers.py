"""Skip, rollback snapshots and telemetry with optimizers other than AdamW: Adafactor, SGD, plain AdamW.

The skip and snapshot mechanisms are optimizer-agnostic by design (gradients ``None`` → torch optimizers
leave their state alone; snapshots copy whatever ``state_dict`` holds). These tests hold them to it with
each optimizer's own state: Adafactor's factored second moments (``exp_avg_sq_row``/``_col``), its
``RMS`` and its ``step`` (a Python int), SGD's momentum buffer, AdamW's moments and step tensor.
"""

from __future__ import annotations

import copy

import pytest
from transformers import TrainerCallback
from transformers.optimization import Adafactor, AdafactorSchedule

from hf_stability import SkipNonFiniteCallback, StabilityTrainer, read_events
from hf_stability.callbacks.order import find_callback
from hf_stability.snapshots import SnapshotStore, restore_training_state
from tests.rollback_faults import ThrowWeights
from tests.testing_utils import (
    PoisonGradient,
    StepSnapshots,
    assert_same_state,
    changed_parameters,
    mlm_dataset,
    tiny_bert,
)
from tests.testing_utils import training_args as base_training_args

POISONED = 2  # global_step when the poisoned step begins; it completes as step 3

# name -> StabilityConfig overrides; "adafactor_relative_step" builds the optimizer itself (Trainer's
# `optim="adafactor"` fixes relative_step=False and scale_parameter=False).
OPTIMIZERS = {
    "adafactor": {"optim": "adafactor"},
    "adafactor_relative_step": {},
    "sgd_momentum": {"optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": 1e-2},
    "adamw_torch": {"optim": "adamw_torch"},
}


@pytest.fixture(scope="module")
def dataset(bert_tokenizer):
    return mlm_dataset(bert_tokenizer, rows=64)


def make_trainer(name: str, output_dir, tokenizer, dataset, **overrides) -> StabilityTrainer:
    """A StabilityTrainer on a tiny BERT with the named optimizer."""
    model = tiny_bert(tokenizer)
    optimizers = (None, None)
    if name == "adafactor_relative_step":
        # The Adafactor of the paper: lr from the step count (min(1e-2, 1/sqrt(step))), scaled by the parameter RMS.
        optimizer = Adafactor(model.parameters(), lr=None, relative_step=True, scale_parameter=True)
        optimizers = (optimizer, AdafactorSchedule(optimizer))
    args = base_training_args(output_dir, **{**OPTIMIZERS[name], **overrides})
    return StabilityTrainer(model, args, train_dataset=dataset, optimizers=optimizers)


def optimizer_state_keys(trainer: StabilityTrainer) -> set[str]:
    return {key for state in trainer.optimizer.state_dict()["state"].values() for key in state}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_poisoned_step_changes_no_parameter_or_optimizer_state_and_telemetry_logs(
    tmp_path, bert_tokenizer, dataset, name
):
    trainer = make_trainer(name, tmp_path, bert_tokenizer, dataset, log_layer_grad_norms=True)
    watch = StepSnapshots([POISONED, POISONED + 1])
    trainer.add_callback(PoisonGradient([POISONED]))
    trainer.add_callback(watch)
    trainer.train()

    if name.startswith("adafactor"):
        assert {"exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "RMS", "step"} <= optimizer_state_keys(trainer)
        assert trainer.optimizer.state_dict()["state"][0]["step"] == trainer.state.global_step - 1  # one skip
    elif name == "sgd_momentum":
        assert optimizer_state_keys(trainer) == {"momentum_buffer"}
    assert_same_state(watch.before[POISONED], watch.after[POISONED])
    assert changed_parameters(watch.before[POISONED + 1], watch.after[POISONED + 1]), "training did not go on"
    skip = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback)
    assert skip.skipped_steps == 1
    assert [(e["step"], e["event"]) for e in read_events(tmp_path)] == [(POISONED + 1, "skip")]
    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stability/skipped_steps"] for entry in entries] == [0, 0, 1, 1, 1, 1]
    for entry in entries:
        assert entry["stability/rollbacks"] == 0
        if entry["step"] == POISONED + 1:
            continue  # a skipped step has no gradients to measure
        assert entry["stability/fp16_headroom_log2"] == entry["stability/fp16_headroom_log2"]  # measured, not NaN
        assert "stability/grad_norm/bert.embeddings.word_embeddings.weight" in entry


class SnapshotThenRestore(TrainerCallback):
    """Takes a rollback snapshot at the end of step ``capture_at``, restores it at the end of ``restore_at``.

    ``expected`` is the state right after the capture, ``restored`` right after the restore, ``moved`` just
    before it (proof that training changed something in between).
    """

    def __init__(self, capture_at: int, restore_at: int) -> None:
        self.capture_at, self.restore_at = capture_at, restore_at
        self.store = SnapshotStore(keep=1)
        self.snapshot = None
        self.expected = self.moved = self.restored = None

    @staticmethod
    def _state(model, optimizer, lr_scheduler) -> tuple[dict, dict, list[float]]:
        parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
        return parameters, copy.deepcopy(optimizer.state_dict()["state"]), list(lr_scheduler.get_last_lr())

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == self.capture_at:
            self.snapshot = self.store.capture(state.global_step, model, optimizer, lr_scheduler, 1.0, trusted=True)
            self.expected = self._state(model, optimizer, lr_scheduler)
        elif state.global_step == self.restore_at:
            self.moved = self._state(model, optimizer, lr_scheduler)
            restore_training_state(self.snapshot, model, optimizer, lr_scheduler)
            self.restored = self._state(model, optimizer, lr_scheduler)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_snapshot_restores_the_optimizer_state_bit_exactly(tmp_path, bert_tokenizer, dataset, name):
    trainer = make_trainer(name, tmp_path, bert_tokenizer, dataset, spike_rollback=False)
    probe = SnapshotThenRestore(capture_at=3, restore_at=6)
    trainer.add_callback(probe)
    trainer.train()
    assert changed_parameters(probe.expected, probe.moved), "training should have moved the weights"
    assert_same_state(probe.restored[:2], probe.expected[:2])
    assert probe.restored[2] == probe.expected[2], "learning rate"


class EveryStepState(StepSnapshots):
    """Parameters and optimizer state at the end of every step (after any rollback of that step)."""

    def __init__(self) -> None:
        super().__init__([])
        self.states: dict[int, tuple[dict, dict]] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.states[state.global_step] = self._capture(model, optimizer)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_thrown_update_rolls_back_to_the_snapshot_bit_exactly(tmp_path, bert_tokenizer, dataset, name):
    thrown = 11
    trainer = make_trainer(name, tmp_path, bert_tokenizer, dataset, max_steps=14, max_grad_norm=0.0, spike_window=8,
                           spike_warmup=4, spike_check_interval=1, snapshot_interval=4)
    recorder = EveryStepState()
    trainer.add_callback(ThrowWeights([thrown], scale=2.0))
    trainer.add_callback(recorder)
    trainer.train()
    (event,) = read_events(tmp_path)
    assert event["event"] == "rollback" and event["restored_step"] == 8
    assert_same_state(recorder.states[event["step"]], recorder.states[8])
