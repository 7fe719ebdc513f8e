"""`StepGuard.metrics`: every registered stage's log metrics, their device values read to the host at once."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from benchmarks.host_reads import counting_host_reads
from hf_stability import metric_names as names
from hf_stability.settings import AdaptiveClipSettings, TelemetrySettings
from hf_stability.step.clip import AdaptiveClipStage
from hf_stability.step.guard import StepGuard, StepRecord, read_metrics
from hf_stability.step.telemetry import TelemetryStage


def test_metrics_reads_every_stage_at_once_and_a_log_entry_gets_them_once(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = TrainingArguments(str(tmp_path), logging_steps=1, max_grad_norm=0.0, report_to=[])
    state, control = TrainerState(logging_steps=1), TrainerControl()
    clip = AdaptiveClipStage(AdaptiveClipSettings())
    telemetry = TelemetryStage(TelemetrySettings())
    telemetry.begin_run(TelemetrySettings(log_layer_grad_norms=True), optimizer)
    guard = StepGuard()
    guard.register("clip", clip)
    guard.register("telemetry", telemetry)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    guard.before_update(StepRecord(1, args, state, control, model, optimizer))  # clip, then telemetry

    offered = {**clip.metrics(), **telemetry.metrics()}
    device_values = [key for key, value in offered.items() if isinstance(value, torch.Tensor)]
    assert len(device_values) == 2 + 2 + len(list(model.parameters()))  # bound, count, fp16 pair, layer norms
    expected = read_metrics(offered)
    telemetry.before_update(StepRecord(1, args, state, control, model, optimizer))  # measured again for the guard
    with counting_host_reads() as reads:
        metrics = guard.metrics()
    assert sum(reads.values()) == 1, reads
    # The telemetry's count of rollbacks: absent (a callback not attached), 0 where it logs the run's counts.
    assert metrics == {key: pytest.approx(value) for key, value in expected.items()}
    telemetry.logs_run_counts = True
    assert guard.metrics() == {names.ZCLIP_BOUND: expected[names.ZCLIP_BOUND], names.ZCLIP_CLIPPED_STEPS: 0,
                               names.ROLLBACKS: 0}

    assert guard.log_metrics(1).keys() == {names.ZCLIP_BOUND, names.ZCLIP_CLIPPED_STEPS, names.ROLLBACKS}
    assert guard.log_metrics(1) == {}  # the trainer's log() asked first: the callbacks' on_log get nothing
