"""The skip callback's step queue and health reporting, with hand-built TrainerState/TrainerControl: no Trainer run."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from benchmarks.host_reads import counting_host_reads
from hf_stability import read_events
from hf_stability.step.channel import StepSignals
from hf_stability.step.skip_decision import TrainedParameters, judge_flagged_weights
from hf_stability.step.skip_health import SkipHealth
from hf_stability.step.skip_queue import PARAMETERS, Flags, QueuedStep, StepQueue

HEALTHY, BAD_GRADIENTS, BAD_LOSS, BAD_WEIGHTS = (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 1)


def queued(step: int, flags: tuple[int, int, int], loss: float | None = 2.0, scale: float | None = None) -> QueuedStep:
    vector = torch.tensor(flags, dtype=torch.float32)
    return QueuedStep(
        step=step,
        local=vector,
        reduced=vector.clone(),
        grad_norm=torch.tensor(math.inf if flags[0] else 1.5),
        loss=None if loss is None else torch.tensor(loss),
        loss_scale=None if scale is None else torch.tensor(scale),
    )


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = {"logging_steps": 5, "save_strategy": "steps", "save_steps": 4, "report_to": [], "use_cpu": True}
    return TrainingArguments(str(tmp_path), **{**settings, **overrides})


def state_for(args: TrainingArguments, max_steps: int = 100) -> TrainerState:
    return TrainerState(max_steps=max_steps, logging_steps=args.logging_steps, save_steps=args.save_steps)


def drain_into(health: SkipHealth, tmp_path, rows: list[QueuedStep], now: int, recovery: bool = False):
    args = arguments(tmp_path)
    queue, control, record = StepQueue(), TrainerControl(), StepSignals()
    for row in rows:
        queue.append(row)
    steps, local = queue.drain()
    reason = health.apply(args, state_for(args), control, steps, local, now, record, restoring=recovery)
    return reason, control, record


@pytest.mark.parametrize(
    ("step", "queued_steps", "due"),
    [
        (5, 1, True),  # logging step
        (8, 1, True),  # save step
        (100, 1, True),  # last step
        (7, 3, True),  # the queue holds max_consecutive_skips steps
        (7, 2, False),  # none of the above
        (1, 1, False),
    ],
)
def test_flush_rules(tmp_path, step, queued_steps, due):
    args = arguments(tmp_path)
    queue = StepQueue()
    for index in range(queued_steps):
        queue.append(queued(step - index, HEALTHY))
    assert queue.due(args, state_for(args), step, limit=3) is due


def test_logging_first_step_and_no_save_strategy(tmp_path):
    args = arguments(tmp_path, logging_first_step=True, save_strategy="no")
    queue = StepQueue()
    queue.append(queued(1, HEALTHY))
    assert queue.due(args, state_for(args), 1, limit=50)
    assert not queue.due(args, state_for(args), 8, limit=50), "no save strategy: step 8 saves nothing"


def test_drain_reads_every_queued_step_at_once_into_named_fields():
    queue = StepQueue()
    queue.append(queued(3, BAD_GRADIENTS, loss=None, scale=1024.0))
    queue.append(queued(4, BAD_LOSS, loss=math.nan))
    with counting_host_reads() as counts:
        steps, local = queue.drain()
    assert sum(counts.values()) == 1, counts
    assert len(queue) == 0 and local.shape == (2, 3)
    first, second = steps
    assert (first.step, first.reduced, first.local) == (3, Flags(True, False, False), Flags(True, False, False))
    assert (first.loss, first.loss_scale, first.grad_norm) == (None, 1024.0, math.inf)
    assert (second.step, second.reduced, second.loss_scale) == (4, Flags(False, True, False), None)
    assert second.grad_norm == 1.5
    assert math.isnan(second.loss)
    assert queue.drain() == ([], None)


def test_counters_and_events_come_from_the_queued_rows(tmp_path):
    health = SkipHealth(max_consecutive_skips=50)
    rows = [queued(1, HEALTHY), queued(2, BAD_GRADIENTS, scale=512.0), queued(3, BAD_LOSS), queued(4, BAD_GRADIENTS)]
    with pytest.warns(UserWarning, match="hidden from the logged `loss` by `logging_nan_inf_filter=True`"):
        reason, control, _ = drain_into(health, tmp_path, rows, now=4)
    assert reason == "nonfinite_gradients"  # the last step's
    assert (health.skipped_steps, health.consecutive_skips, health.nonfinite_loss_steps) == (2, 1, 1)
    assert not control.should_training_stop
    events = read_events(tmp_path)
    assert [(e["step"], e["event"], e.get("reason")) for e in events] == [
        (2, "skip", "fp16_overflow"),
        (3, "nonfinite_loss", "non-finite training loss, finite gradients"),
        (4, "skip", "nonfinite_gradients"),
    ]
    assert (events[0]["loss_scale"], events[0]["consecutive"], events[2]["consecutive"]) == (512.0, 1, 1)


def test_consecutive_skips_stop_with_a_checkpoint_at_the_flush_step(tmp_path):
    health = SkipHealth(max_consecutive_skips=3)
    rows = [queued(step, BAD_GRADIENTS) for step in (2, 3, 4, 5)]
    reason, control, _ = drain_into(health, tmp_path, rows, now=5)
    assert reason == "nonfinite_gradients" and health.consecutive_skips == 4
    assert control.should_training_stop and control.should_save
    stop = read_events(tmp_path)[-1]
    assert (stop["event"], stop["step"], stop["consecutive"]) == ("stop", 5, 4)
    assert "max_consecutive_skips=3" in stop["reason"]


def test_a_healthy_step_resets_the_consecutive_count(tmp_path):
    health = SkipHealth(max_consecutive_skips=3)
    rows = [queued(2, BAD_GRADIENTS), queued(3, BAD_GRADIENTS), queued(4, HEALTHY), queued(5, BAD_GRADIENTS)]
    reason, control, _ = drain_into(health, tmp_path, rows, now=5)
    assert (health.skipped_steps, health.consecutive_skips) == (3, 1)
    assert not control.should_training_stop


@pytest.mark.parametrize("recovery", [False, True])
def test_nonfinite_weights_are_no_skip_and_stop_without_a_checkpoint_unless_rollback_recovers(tmp_path, recovery):
    health = SkipHealth(max_consecutive_skips=50)
    reason, control, record = drain_into(health, tmp_path, [queued(6, BAD_WEIGHTS)], now=6, recovery=recovery)
    assert reason is None and (health.skipped_steps, health.nonfinite_parameter_steps) == (0, 1)
    assert record.guard.weights.nonfinite_after(6), "the spike stage of this step reads the verdict"
    assert control.should_training_stop is not recovery and not control.should_save
    assert [e["event"] for e in read_events(tmp_path)] == ["nonfinite_parameters"] + ([] if recovery else ["stop"])


def test_all_zero_gradients_with_a_finite_loss_are_reported_once_and_stop_after_the_limit(tmp_path):
    health = SkipHealth(max_consecutive_skips=50, max_underflow_steps=3)

    def zero_gradients(step: int, loss: float = 2.0) -> QueuedStep:
        row = queued(step, HEALTHY if loss == loss else BAD_LOSS, loss=loss)
        row.grad_norm = torch.tensor(0.0)
        return row

    # A batch without labels (loss 0/0, zero gradients) is a loss report, no underflow; a healthy step resets.
    rows = [zero_gradients(1, math.nan), zero_gradients(2), queued(3, HEALTHY), *map(zero_gradients, (4, 5, 6))]
    _, control, _ = drain_into(health, tmp_path, rows, now=6)
    assert (health.underflow_steps, health.consecutive_underflow_steps) == (4, 3)
    assert control.should_training_stop and control.should_save
    events = [(e["step"], e["event"], e["reason"]) for e in read_events(tmp_path) if e["event"] != "nonfinite_loss"]
    zero = "all gradients exactly zero"
    assert events[:2] == [(2, "underflow", zero), (4, "underflow", zero)]
    assert events[2][:2] == (6, "stop") and "max_underflow_steps=3" in events[2][2]


def _model_with(weight: float) -> torch.nn.Module:
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = weight
    return model


@pytest.mark.parametrize("weight", [math.nan, 1.0], ids=["nonfinite-weights", "finite-weights"])
def test_a_flush_judges_the_weights_once_and_only_when_a_step_is_flagged(weight):
    # Steps 3 and 4 have NaN gradients. Weights NaN now: they started from them (the trailing run of flagged
    # steps; step 1's bad gradients, before a healthy step, were a bad batch). Weights finite: both bad batches.
    parameters = TrainedParameters(_model_with(weight))
    queue = StepQueue()
    for step, flags in [(1, BAD_GRADIENTS), (2, HEALTHY), (3, BAD_GRADIENTS), (4, BAD_GRADIENTS)]:
        queue.append(queued(step, flags))
    steps, local = queue.drain()
    known: dict[int, bool] = {}
    with counting_host_reads() as reads:
        marked, marked_local = judge_flagged_weights(steps, local, parameters, known)
    assert sum(reads.values()) == 1, "one read for the weights' verdict"
    expected = [False, False, True, True] if math.isnan(weight) else [False] * 4
    assert [step.reduced.parameters for step in marked] == expected
    assert [step.local.parameters for step in marked] == expected
    assert marked_local is not None and marked_local[:, PARAMETERS].tolist() == [float(e) for e in expected]
    assert known == ({3: True, 4: True} if math.isnan(weight) else {})


def test_a_flush_without_a_flagged_step_reads_nothing_and_takes_the_steps_a_rollback_found():
    parameters = TrainedParameters(_model_with(math.nan))  # never looked at: no flag is set
    queue = StepQueue()
    for step in (1, 2):
        queue.append(queued(step, HEALTHY))
    steps, local = queue.drain()
    with counting_host_reads() as reads:
        same, _ = judge_flagged_weights(steps, local, parameters, {})
    assert sum(reads.values()) == 0 and same == steps
    # Steps a spike rollback judged to start from non-finite weights (and restored) are reported as such.
    queue.append(queued(5, BAD_GRADIENTS))
    queue.append(queued(6, HEALTHY))
    steps, local = queue.drain()
    marked, _ = judge_flagged_weights(steps, local, TrainedParameters(_model_with(1.0)), {5: True})
    assert [(step.step, step.reduced.parameters) for step in marked] == [(5, True), (6, False)]
