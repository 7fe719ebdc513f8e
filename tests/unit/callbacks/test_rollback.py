"""Snapshot trust in `SpikeRollbackCallback`, driven by hand: a hand-built `TrainerState`/`TrainerControl`, a
real `nn.Linear` with a real optimizer, and losses fed through `StepSignals` as `StabilityTrainer` feeds them.

No Trainer run: each "step" is the callback's three step events, with the weights moved by a real SGD step.
"""

from __future__ import annotations

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_stability import SpikeRollbackCallback
from hf_stability.step.channel import StepSignals

INTERVAL = 5  # snapshot_interval and check_interval


def run_steps(callback, args, state, control, model, optimizer, losses):
    """One optimizer step per loss: update the weights, feed the loss, fire the step events."""
    signals = StepSignals.for_model(model)
    for loss in losses:
        step = state.global_step + 1
        signals.add_loss(step, torch.tensor(loss))
        callback.on_pre_optimizer_step(args, state, control, model=model, optimizer=optimizer)
        model.weight.grad = torch.ones_like(model.weight)
        optimizer.step()
        callback.on_optimizer_step(args, state, control, model=model, optimizer=optimizer)
        state.global_step = step
        callback.on_step_end(args, state, control, model=model, optimizer=optimizer, lr_scheduler=None)


def setup(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", logging_strategy="no", save_strategy="no")
    state, control = TrainerState(max_steps=100), TrainerControl()
    callback = SpikeRollbackCallback(
        window=8, warmup=4, sigma=6.0, snapshot_interval=INTERVAL, check_interval=INTERVAL, snapshot_keep=2
    )
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer, lr_scheduler=None)
    return callback, args, state, control, model, optimizer


def test_a_snapshot_is_trusted_only_after_a_check_of_the_steps_after_it(tmp_path):
    callback, args, state, control, model, optimizer = setup(tmp_path)
    store = callback.stage._store
    assert [(s.step, s.trusted) for s in store.snapshots] == [(0, True)]  # the starting state
    run_steps(callback, args, state, control, model, optimizer, [1.0, 1.1, 0.9, 1.0, 1.05])
    assert [(s.step, s.trusted) for s in store.snapshots] == [(0, True), (5, False)]
    run_steps(callback, args, state, control, model, optimizer, [1.0, 0.95, 1.02, 0.98, 1.01])
    # Steps 6-10 were judged healthy: the snapshot of step 5 is vouched for, the one of step 10 awaits its check.
    assert [(s.step, s.trusted) for s in store.snapshots] == [(0, True), (5, True), (10, False)]


def test_a_spike_discards_untrusted_snapshots_and_restores_the_newest_trusted_one(tmp_path):
    callback, args, state, control, model, optimizer = setup(tmp_path)
    run_steps(callback, args, state, control, model, optimizer, [1.0, 1.1, 0.9, 1.0, 1.05])
    weights_at_5 = model.weight.detach().clone()
    run_steps(callback, args, state, control, model, optimizer, [1.0, 0.95, 1.02, 0.98, 1.01])
    assert callback.stage._store.newest_trusted().step == 5
    # A bad update made at step 10 (held by the untrusted snapshot of step 10) shows in the loss of step 12.
    run_steps(callback, args, state, control, model, optimizer, [1.0, 50.0, 1.0, 1.0, 1.0])
    assert callback.rollbacks == 1
    assert [(s.step, s.trusted) for s in callback.stage._store.snapshots] == [(0, True), (5, True)]
    assert torch.equal(model.weight, weights_at_5), "restored to the trusted snapshot of step 5, bit for bit"
    assert state.global_step == 15  # the data stream goes on; only the training state went back
