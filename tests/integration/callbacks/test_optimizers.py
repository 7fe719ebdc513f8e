"""Skip, rollback snapshots and telemetry with optimizers other than AdamW: Adafactor, SGD, plain AdamW.

The skip and snapshot mechanisms are optimizer-agnostic by design (gradients ``None`` → torch optimizers
leave their state alone; snapshots copy whatever ``state_dict`` holds). These tests hold them to it with
each optimizer's own state: Adafactor's factored second moments (``exp_avg_sq_row``/``_col``), its
``RMS`` and its ``step`` (a Python int), SGD's momentum buffer, AdamW's moments and step tensor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback
from transformers.optimization import Adafactor, AdafactorSchedule, GreedyLR

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


# ---- optimizers and schedulers users bring ---------------------------------------------------------------------

# The rollback runs below: a thrown update at step 11 spikes the loss of step 12, which restores the trusted
# snapshot of step 8 and cuts the LR by LR_FACTOR; the schedule then goes on from the snapshot's position.
ROLLBACK_RUN = dict(max_grad_norm=0.0, spike_window=8, spike_warmup=4, spike_check_interval=1, snapshot_interval=4)
THROWN, RESTORED, LR_FACTOR = 11, 8, 0.5


def _lambda(step: int) -> float:
    return 1.0 / (1.0 + step)


def _ninety_percent(step: int) -> float:
    return 0.9


lr_scheduler = torch.optim.lr_scheduler
# Every torch LR scheduler, each set to change its LR over the steps after the rollback (positions 9-16),
# composite ones with a child switch in that range, floors (eta_min, min_lr) that are not zero.
SCHEDULERS = {
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, _lambda),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, _ninety_percent),
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[5, 10, 13], gamma=0.5),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=10),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=15),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5), lr_scheduler.ExponentialLR(o, gamma=0.9),
         lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-5)],
        milestones=[5, 12],
    ),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=20, power=2.0),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-4),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=10), lr_scheduler.CosineAnnealingLR(o, T_max=6)]
    ),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=100, min_lr=1e-5),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=1e-4, max_lr=1e-3, step_size_up=4),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5, eta_min=1e-4),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=1e-3, total_steps=20),
    "SWALR": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=1e-4, anneal_epochs=10),
    "GreedyLR": lambda o: GreedyLR(o, min_lr=1e-5, max_lr=1e-2),  # transformers' lr_scheduler_type="greedy"
}


def test_every_torch_scheduler_is_covered():
    from hf_stability._compat import LR_SCHEDULER_CLASSES

    public = {getattr(lr_scheduler, name) for name in lr_scheduler.__all__} - {lr_scheduler.LRScheduler}
    assert public | {torch.optim.swa_utils.SWALR, GreedyLR} == set(LR_SCHEDULER_CLASSES)
    assert {cls.__name__ for cls in LR_SCHEDULER_CLASSES} == set(SCHEDULERS)


def logged_learning_rates(trainer) -> dict[int, float]:
    return {entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a_rollback_lr_cut_holds_under_every_torch_scheduler(tmp_path, bert_tokenizer, dataset, name):
    """The cut LR stays cut on every following step: the logged LR is the uncut run's at the same schedule
    position times ``rollback_lr_factor`` (a composite scheduler restarting a child, OneCycleLR reading its param
    groups, CyclicLR's bounds or a cosine floor undid it on the next step)."""
    runs = {}
    for run in ("uncut", "rollback"):
        model = tiny_bert(bert_tokenizer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        args = base_training_args(tmp_path / run, max_steps=20, rollback_lr_factor=LR_FACTOR, **ROLLBACK_RUN)
        optimizers = (optimizer, SCHEDULERS[name](optimizer))
        trainer = StabilityTrainer(model, args, train_dataset=dataset, optimizers=optimizers)
        if run == "rollback":
            trainer.add_callback(ThrowWeights([THROWN], scale=2.0))
        trainer.train()
        runs[run] = logged_learning_rates(trainer)
    (event,) = read_events(tmp_path / "rollback")
    assert (event["event"], event["restored_step"], event["lr_scale"]) == ("rollback", RESTORED, LR_FACTOR)
    uncut, cut = runs["uncut"], runs["rollback"]
    # Trainer logs the LR a step's update used; the steps after the rollback follow the snapshot's position.
    lag = event["step"] - RESTORED
    for step in range(1, event["step"] + 1):
        assert cut[step] == uncut[step], step
    for step in range(event["step"] + 1, 21):
        assert cut[step] == pytest.approx(LR_FACTOR * uncut[step - lag], rel=1e-12, abs=0), f"step {step}"
    if name not in ("ReduceLROnPlateau", "GreedyLR"):  # those two step on evaluation metrics only
        assert len({uncut[step] for step in range(RESTORED + 1, 21 - lag)}) > 1, "the schedule should move"


class FixedScheduler(lr_scheduler.LRScheduler):
    """A scheduler of the user's own, not derived from torch's: hf-stability cannot know what it computes from."""

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]


def test_an_lr_cut_that_cannot_hold_is_refused_in_one_line(tmp_path, bert_tokenizer, dataset):
    model = tiny_bert(bert_tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = base_training_args(tmp_path, rollback_lr_factor=LR_FACTOR)
    trainer = StabilityTrainer(model, args, train_dataset=dataset, optimizers=(optimizer, FixedScheduler(optimizer)))
    with pytest.raises(ValueError, match=r"^rollback_lr_factor=0.5 needs an LR scheduler .*FixedScheduler is not"):
        trainer.train()
    # Adafactor's relative step ignores the learning rate: a cut would be recorded but never applied.
    trainer = make_trainer("adafactor_relative_step", tmp_path, bert_tokenizer, dataset, rollback_lr_factor=LR_FACTOR)
    with pytest.raises(ValueError, match=r"^rollback_lr_factor=0.5 cannot lower the step size of Adafactor"):
        trainer.train()


class ParamGroupRecorder(EveryStepState):
    """Also the param groups (their values, tensors cloned) at the end of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: dict[int, list[dict]] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_step_end(args, state, control, model=model, optimizer=optimizer)
        self.groups[state.global_step] = [
            {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
             for k, v in group.items() if k != "params"}
            for group in optimizer.param_groups
        ]


@pytest.mark.parametrize("storage", ["cpu", "disk"])
@pytest.mark.parametrize("name", ["adamw_tensor_lr_fused", "adafactor_relative_step"])
def test_tensors_in_param_groups_come_back_as_tensors_after_a_rollback(tmp_path, bert_tokenizer, dataset, name,
                                                                         storage):
    """A tensor LR (AdamW's ``lr=torch.tensor(...)``; AdafactorSchedule writes Adafactor's RMS-scaled LR as a
    tensor) was restored as the snapshot's internal placeholder: the next step crashed (cut LR) or a checkpoint
    pickled the placeholder."""
    factor = LR_FACTOR if name == "adamw_tensor_lr_fused" else 1.0  # Adafactor's relative step refuses a cut
    overrides = dict(max_steps=14, rollback_lr_factor=factor, snapshot_storage=storage, **ROLLBACK_RUN)
    if name == "adafactor_relative_step":
        trainer = make_trainer(name, tmp_path, bert_tokenizer, dataset, **overrides)
    else:
        model = tiny_bert(bert_tokenizer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), fused=True)
        args = base_training_args(tmp_path, **overrides)
        trainer = StabilityTrainer(model, args, train_dataset=dataset, optimizers=(optimizer, None))
    recorder = ParamGroupRecorder()
    trainer.add_callback(ThrowWeights([THROWN], scale=2.0))
    trainer.add_callback(recorder)
    trainer.train()
    (event,) = read_events(tmp_path)
    assert event["event"] == "rollback" and event["restored_step"] == RESTORED
    assert_same_state(recorder.states[event["step"]], recorder.states[RESTORED])
    for restored, saved in zip(recorder.groups[event["step"]], recorder.groups[RESTORED], strict=True):
        assert restored.keys() == saved.keys()
        assert isinstance(restored["lr"], torch.Tensor)
        expected = saved["lr"] * factor
        assert torch.equal(restored["lr"], expected), (restored["lr"], expected)
    assert trainer.state.global_step == 14  # training went on after the rollback


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al., 2019) around an inner optimizer at ``.optimizer``: every ``k`` steps the weights
    move ``alpha`` of the way back to slow weights, which then take their value. Its own state (slow weights,
    step counter) is in its ``state_dict``; param groups are the inner optimizer's, so schedulers drive both."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 3, alpha: float = 0.5) -> None:
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.lookahead_steps = 0
        self.slow = [p.detach().clone() for group in self.param_groups for p in group["params"]]

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.lookahead_steps += 1
        if self.lookahead_steps % self.k == 0:
            for slow, fast in zip(self.slow, self._parameters(), strict=True):
                slow.add_(fast - slow, alpha=self.alpha)
                fast.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"inner": self.optimizer.state_dict(), "slow": list(self.slow), "lookahead_steps": self.lookahead_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["inner"])
        self.slow = [slow.detach().clone() for slow in state_dict["slow"]]
        self.lookahead_steps = state_dict["lookahead_steps"]


class LookaheadState(TrainerCallback):
    """Parameters and the user's whole optimizer state (inner moments, slow weights, counter), every step."""

    def __init__(self, lookahead: Lookahead) -> None:
        self.lookahead = lookahead
        self.states: dict[int, tuple[dict, dict]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = self._capture(model)

    def _capture(self, model) -> tuple[dict, dict]:
        whole = copy.deepcopy(self.lookahead.state_dict())
        optimizer_state = {**{f"inner.{i}": s for i, s in whole["inner"]["state"].items()},
                           "lookahead": {"steps": whole["lookahead_steps"], **dict(enumerate(whole["slow"]))}}
        return {name: p.detach().clone() for name, p in model.named_parameters()}, optimizer_state


def lookahead_trainer(tmp_path, bert_tokenizer, dataset, fused: bool, **overrides
                      ) -> tuple[StabilityTrainer, Lookahead]:
    model = tiny_bert(bert_tokenizer)
    lookahead = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused))
    schedule = torch.optim.lr_scheduler.LambdaLR(lookahead, _lambda)
    args = base_training_args(tmp_path, **overrides)
    return StabilityTrainer(model, args, train_dataset=dataset, optimizers=(lookahead, schedule)), lookahead


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw_fused"])
def test_a_skipped_step_leaves_a_wrapper_optimizer_and_its_own_state_alone(tmp_path, bert_tokenizer, dataset, fused):
    """The poisoned step is the Lookahead's 3rd: its interpolation ran on ``None`` gradients (host skip), or the
    found_inf flag went to the inner fused AdamW only (device skip), and moved the weights of a skipped step."""
    trainer, lookahead = lookahead_trainer(tmp_path, bert_tokenizer, dataset, fused)
    recorder = LookaheadState(lookahead)
    trainer.add_callback(PoisonGradient([POISONED]))
    trainer.add_callback(recorder)
    trainer.train()
    assert [(e["step"], e["event"]) for e in read_events(tmp_path)] == [(POISONED + 1, "skip")]
    assert_same_state(recorder.states[POISONED], recorder.states[POISONED + 1])
    assert recorder.states[POISONED + 1][1]["lookahead"]["steps"] == POISONED
    assert changed_parameters(recorder.states[POISONED + 1], recorder.states[POISONED + 2]), "training went on"
    assert lookahead.lookahead_steps == trainer.state.global_step - 1 == 5  # one interpolation at its 3rd step
    assert "step" not in vars(lookahead) or not hasattr(vars(lookahead)["step"], "_hf_stability_held")


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_a_rollback_restores_a_wrapper_optimizer_whole(tmp_path, bert_tokenizer, dataset, storage):
    """Only the inner AdamW was snapshotted: the slow weights and the step counter kept their post-spike values,
    and the next interpolation pulled the weights towards them (5.6x the normal norm in the report)."""
    trainer, lookahead = lookahead_trainer(tmp_path, bert_tokenizer, dataset, fused=False, max_steps=14,
                                           snapshot_storage=storage, **ROLLBACK_RUN)
    recorder = LookaheadState(lookahead)
    trainer.add_callback(ThrowWeights([THROWN], scale=2.0))
    trainer.add_callback(recorder)
    trainer.train()
    (event,) = read_events(tmp_path)
    assert event["event"] == "rollback" and event["restored_step"] == RESTORED
    assert_same_state(recorder.states[event["step"]], recorder.states[RESTORED])
    assert recorder.states[event["step"]][1]["lookahead"]["steps"] == RESTORED
