"""`TelemetryStage` driven by hand, without Trainer: a real backward through a tiny model, a hand-built record."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_stability import metric_names as names
from hf_stability.settings import TelemetrySettings
from hf_stability.step.guard import StepRecord, read_metrics
from hf_stability.step.telemetry import TelemetryStage


def test_the_telemetry_stage_measures_logging_steps_only_and_offers_each_measure_once(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no grad scaler: no loss scale, scale 1 for fp16
    args = TrainingArguments(str(tmp_path), logging_steps=2, report_to=[])
    state, control = TrainerState(logging_steps=2), TrainerControl()
    stage = TelemetryStage(TelemetrySettings())
    stage.begin_run(TelemetrySettings(log_fp16_pressure=True, log_layer_grad_norms=True), optimizer)
    model(torch.randn(16, 8)).pow(2).mean().mul(1e-6).backward()  # small gradients: some fall below 2**-24

    stage.before_update(StepRecord(1, args, state, control, model, optimizer))  # not a logging step
    assert stage.metrics() == {}
    stage.before_update(StepRecord(2, args, state, control, model, optimizer))
    metrics = read_metrics(stage.metrics())
    grads = {name: p.grad for name, p in model.named_parameters()}
    magnitudes = torch.cat([g.flatten().double().abs() for g in grads.values()])
    nonzero = magnitudes[magnitudes > 0]
    expected_fraction = (nonzero < 2.0**-24).sum().item() / nonzero.numel()
    assert 0 < expected_fraction < 1
    assert metrics.pop(names.FP16_UNDERFLOW_FRACTION) == pytest.approx(expected_fraction, rel=1e-6)
    assert metrics.pop(names.FP16_HEADROOM_LOG2) == pytest.approx(math.log2(65504.0 / nonzero.max().item()), rel=1e-6)
    assert metrics == {names.layer_grad_norm(name): pytest.approx(g.double().norm().item(), rel=1e-6)
                       for name, g in grads.items()}
    assert stage.metrics() == {}  # offered to one log entry only

    model.zero_grad(set_to_none=True)  # a skipped step: nothing to measure
    stage.before_update(StepRecord(4, args, state, control, model, optimizer))
    assert stage.metrics() == {}
