"""`SpikeStage` on its own: no Trainer, no callback, no guard. A real `nn.Linear` trained by a real AdamW with a
real warm-up schedule, `StepRecord`s built by hand from real `TrainingArguments`/`TrainerState`/`TrainerControl`,
the step's loss fed through `StepSignals` as `StabilityTrainer` feeds it, snapshots in memory.
"""

from __future__ import annotations

import copy
import json

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments, get_linear_schedule_with_warmup

from hf_stability import metric_names as names
from hf_stability.settings import RollbackSettings
from hf_stability.step.channel import StepSignals
from hf_stability.step.guard import StepRecord
from hf_stability.step.rollback import SpikeStage

INTERVAL = 5  # snapshot_interval and spike_check_interval
SPIKE_STEP = 12  # its batch is 1000x the others: the loss spikes and its update throws the weights far off


def test_a_spike_restores_the_trusted_snapshot_bit_for_bit_and_cuts_the_learning_rate(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=100)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", logging_strategy="no", save_strategy="no")
    state, control = TrainerState(max_steps=100), TrainerControl()
    signals = StepSignals.for_model(model).open(state)
    settings = RollbackSettings(spike_window=8, spike_warmup=4, spike_sigma=6.0, snapshot_interval=INTERVAL,
                                spike_check_interval=INTERVAL, snapshot_keep=2, rollback_lr_factor=0.5)
    stage = SpikeStage(settings)
    stage.begin(args, state, model, optimizer, scheduler, window=[])
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    trusted = None
    for step in range(1, 3 * INTERVAL + 1):
        record = StepRecord(step, args, state, control, model, optimizer, scheduler, inputs=signals)
        batch = x * 1000 if step == SPIKE_STEP else x
        loss = torch.nn.functional.mse_loss(model(batch), y)
        loss.backward()
        signals.add_loss(step, loss)
        stage.before_update(record)
        optimizer.step()
        stage.update_applied(record)
        scheduler.step()
        optimizer.zero_grad()
        state.global_step = step
        stage.after_update(record)
        if step == INTERVAL:  # the snapshot taken here is trusted by the healthy check of steps 6-10
            trusted = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
                       scheduler.get_last_lr()[0])
        if step == SPIKE_STEP:
            assert stage.rollbacks == 0, "judged at the next check step, not at once"

    assert trusted is not None
    weights, optimizer_state, lr = trusted
    assert stage.rollbacks == 1 and stage.lr_scale == 0.5 and stage.metrics() == {names.ROLLBACKS: 1}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), f"{name} restored to the snapshot of step {INTERVAL}, bit for bit"
    restored = optimizer.state_dict()["state"]
    for index, moments in optimizer_state["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(restored[index][key], tensor), f"AdamW {key} of parameter {index} restored"
    assert scheduler.get_last_lr()[0] == lr * 0.5, "the scheduler's position restored, then cut by the LR factor"
    assert state.global_step == 3 * INTERVAL and not control.should_training_stop
    events = [json.loads(line) for line in (tmp_path / "stability_events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"], e["spike_step"], e["restored_step"]) for e in events] == [
        ("rollback", 3 * INTERVAL, SPIKE_STEP, INTERVAL)
    ]
    assert events[0]["value"] > events[0]["threshold"] and events[0]["nonfinite_weights"] is False
    stage.end()
    assert not stage.restoring and stage._store is not None and stage._store.snapshots == []
