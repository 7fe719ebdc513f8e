"""The skip stage (`hf_stability.step.skip.SkipStage`) driven by hand through the run's `StepGuard`: no Trainer.

A real tiny model and a real optimizer take real steps; one step's real gradients are poisoned with NaN. The
stage must leave that step's weights and optimizer state bit for bit as they were, and let the clean steps
around it update them.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from benchmarks.host_reads import counting_host_reads
from hf_stability import read_events
from hf_stability.settings import SkipSettings
from hf_stability.step.channel import StepSignals
from hf_stability.step.guard import StepRecord
from hf_stability.step.skip import SkipStage

POISONED = 2


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        tensors += [value.detach().clone() for value in state.values() if isinstance(value, torch.Tensor)]
    return tensors


def _same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(
    ("make_optimizer", "on_device"),
    [
        pytest.param(lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True), True, id="fused-adamw-device-skip"),
        pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1), False, id="sgd-host-skip"),
    ],
)
def test_a_poisoned_step_leaves_weights_and_optimizer_bit_for_bit_and_clean_steps_update_them(
    tmp_path, make_optimizer, on_device
):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = make_optimizer(model.parameters())
    args = TrainingArguments(str(tmp_path), logging_steps=10, save_strategy="no", report_to=[], use_cpu=True)
    state, control = TrainerState(max_steps=10, logging_steps=10), TrainerControl()
    signals = StepSignals()  # fed by hand as StabilityTrainer feeds it: the step's loss and pre-clip norm
    signals.attach(model)
    signals.open(state)
    stage = SkipStage(SkipSettings())
    signals.guard.register("skip", stage)
    stage.begin_run(SkipSettings(), signals, state)
    batches = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(1))
    try:
        for step, batch in enumerate(batches, start=1):
            loss = model(batch).pow(2).mean()
            loss.backward()
            if step == POISONED:
                with torch.no_grad():
                    model.weight.grad[0, 0] = math.nan  # a real gradient, one entry NaN
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)  # Trainer's pre-clip norm
            signals.add_loss(step, loss)
            signals.record_grad_norm(step, norm)
            before = _snapshot(model, optimizer)
            record = StepRecord(step, args, state, control, model, optimizer, inputs=signals)
            with counting_host_reads() as reads:
                signals.guard.before_update(record)
                gradients_dropped = all(p.grad is None for p in model.parameters())
                optimizer.step()
                signals.guard.update_applied(record)
            optimizer.zero_grad(set_to_none=True)
            state.global_step = step
            signals.guard.after_update(record, control)
            after = _snapshot(model, optimizer)

            assert not hasattr(optimizer, "found_inf"), "the flag is taken back after the step"
            if step == POISONED:
                assert _same(before, after), "the poisoned step changed weights or optimizer state"
                assert record.reason == "nonfinite_gradients" and bool(record.skip)
            else:
                assert not _same(before, after) and not bool(record.skip), f"clean step {step} did not update"
            if on_device:  # decided on device, queued: no read per step, nothing counted yet
                assert isinstance(record.skip, torch.Tensor) and sum(reads.values()) == 0
                assert stage.health.skipped_steps == 0
            else:  # decided on the host (every gradient set to None), counted at once
                assert record.skip is (step == POISONED) and gradients_dropped is (step == POISONED)
                assert stage.health.skipped_steps == (step >= POISONED)
        stage.flush(args, state, control, model)  # as after an evaluation: the queued steps are read and counted
    finally:
        signals.close()
        signals.detach(model)
    assert (stage.health.skipped_steps, stage.health.consecutive_skips) == (1, 0)
    assert [(event["step"], event["event"]) for event in read_events(tmp_path)] == [(POISONED, "skip")]
    assert not control.should_training_stop
