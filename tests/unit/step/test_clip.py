"""`AdaptiveClipStage` driven by hand, without Trainer: real gradients on a tiny layer, a hand-built `StepRecord`."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_stability import metric_names as names
from hf_stability.settings import AdaptiveClipSettings
from hf_stability.step.clip import AdaptiveClipStage
from hf_stability.step.guard import StepRecord, read_metrics

WARMUP, Z, ALPHA = 3, 1.0, 0.9


def set_gradients(model: torch.nn.Module, norm: float) -> list[torch.Tensor]:
    """Give ``model`` gradients of global norm ``norm`` (one fixed direction); clones of them."""
    generator = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
    length = torch.linalg.vector_norm(torch.stack([d.norm() for d in direction]))
    for p, d in zip(model.parameters(), direction, strict=True):
        p.grad = d * (norm / length)
    return [p.grad.clone() for p in model.parameters()]


def applied_norm(model: torch.nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def test_the_clip_stage_learns_warms_up_clips_a_burst_and_ignores_skipped_steps(tmp_path):
    model = torch.nn.Linear(4, 3)
    args = TrainingArguments(str(tmp_path), max_grad_norm=0.0, report_to=[])
    state, control = TrainerState(), TrainerControl()
    stage = AdaptiveClipStage(AdaptiveClipSettings(adaptive_clip_z=Z, adaptive_clip_alpha=ALPHA,
                                                   adaptive_clip_warmup=WARMUP))

    def step(number: int, norm: float, skip: torch.Tensor | bool = False) -> list[torch.Tensor]:
        given = set_gradients(model, norm)
        record = StepRecord(number, args, state, control, model)
        record.decide(skip, None if skip is False else "test")
        stage.before_update(record)
        return given

    warmup_norms = [1.0, 3.0, 2.0]  # the second is far above the first, but the warm-up only learns
    for number, norm in enumerate(warmup_norms, start=1):
        given = step(number, norm)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), given, strict=True)), number
    learned = torch.tensor(warmup_norms, dtype=torch.float64)
    mean, var = learned.mean().item(), learned.var(unbiased=False).item()
    assert stage.host_statistics() == pytest.approx({"mean": mean, "var": var, "healthy_steps": 3, "clipped_steps": 0})

    # A skip decided on the host, then one pending on device: neither the statistics nor the gradients move.
    before = stage.stats.clone()
    step(4, 50.0, skip=True)
    given = step(5, 50.0, skip=torch.tensor(True))
    assert torch.equal(stage.stats, before)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), given, strict=True))

    bound = mean + Z * var**0.5
    step(6, 10.0)  # a burst above the bound: rescaled to it, and the statistics learn the bound, not the burst
    assert applied_norm(model) == pytest.approx(bound, rel=1e-5)
    assert stage.host_statistics() == pytest.approx({"mean": mean + (1 - ALPHA) * (bound - mean),
                                                     "var": ALPHA * (var + (1 - ALPHA) * (bound - mean) ** 2),
                                                     "healthy_steps": 4, "clipped_steps": 1})
    metrics = read_metrics(stage.metrics())
    assert metrics == {names.ZCLIP_BOUND: pytest.approx(stage.bound().item()), names.ZCLIP_CLIPPED_STEPS: 1}
    assert isinstance(metrics[names.ZCLIP_CLIPPED_STEPS], int)

    # A restored value (Trainer's setattr through the callback) is where the next step starts.
    stage.set_statistic("clipped_steps", 7)
    assert stage.stats is None and read_metrics(stage.metrics())[names.ZCLIP_CLIPPED_STEPS] == 7
    step(7, 2.0)
    assert stage.host_statistics()["clipped_steps"] == 7 and stage.healthy_steps == 5
