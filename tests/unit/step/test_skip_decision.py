"""`measure_step`: a step's flags are the non-finite places of its value vector, computed with no host read."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.host_reads import counting_host_reads
from hf_stability.step.skip_decision import TrainedParameters, measure_step
from hf_stability.step.skip_queue import GRADIENTS, PARAMETERS


def _parameters(weight: float) -> TrainedParameters:
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = weight
    return TrainedParameters(model)


@pytest.mark.parametrize(
    ("grad_norm", "loss", "weight", "judge_weights", "expected"),
    [
        (1.5, 2.0, 1.0, True, [0.0, 0.0, 0.0]),
        (math.nan, 2.0, 1.0, False, [1.0, 0.0, 0.0]),
        (math.inf, 2.0, 1.0, False, [1.0, 0.0, 0.0]),
        (1.5, -math.inf, 1.0, False, [0.0, 1.0, 0.0]),
        (1.5, math.nan, 1.0, False, [0.0, 1.0, 0.0]),
        (1.5, 2.0, math.inf, True, [0.0, 0.0, 1.0]),
        (1.5, 2.0, math.nan, True, [0.0, 0.0, 1.0]),
        (1.5, 2.0, math.nan, False, [0.0, 0.0, 0.0]),  # an ordinary step does not judge the weights
        (3.4e38, 3.4e38, 1.0, True, [0.0, 0.0, 0.0]),  # a large but finite norm or loss raises nothing
    ],
)
def test_the_flags_are_the_nonfinite_values(grad_norm, loss, weight, judge_weights, expected):
    parameters = _parameters(weight)
    with counting_host_reads() as reads:
        entry = measure_step(7, parameters, torch.tensor(loss), torch.tensor(grad_norm), None, None, judge_weights)
    assert sum(reads.values()) == 0
    assert entry.local.dtype == torch.float32 and entry.local.tolist() == expected
    assert entry.reduced.tolist() == expected  # one process: the all-reduce is the identity
    assert entry.step == 7 and entry.loss_scale is None


def test_a_missing_loss_raises_no_flag_and_a_missing_norm_is_measured():
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    model.bias.grad[0] = math.nan
    entry = measure_step(1, TrainedParameters(model), None, None, None, None)
    assert entry.local.tolist() == [1.0, 0.0, 0.0] and entry.loss is None
    assert math.isnan(entry.grad_norm.item())


@pytest.mark.parametrize("optimizer_outside_model", [False, True], ids=["model-optimizer", "extra-parameter"])
def test_an_fp16_overflow_raises_the_gradient_flag_and_the_reduced_flag_goes_back_to_the_scaler(
    optimizer_outside_model,
):
    # Trainer's norm is measured over the model's (unscaled) gradients, which keep the scaler's Inf: it raises the
    # flag. An optimizer that also steps a tensor outside the model can overflow where that norm stays finite:
    # the scaler's own flag raises it then. A subnormal scale's NaN gradients with the scaler's flag clear raise
    # it either way, and the reduced flag goes back into the scaler.
    model = torch.nn.Linear(2, 2)
    extra = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([*model.parameters(), *([extra] if optimizer_outside_model else [])])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    parameters = TrainedParameters(model)
    cases = [("overflow", math.inf, 1.0), ("nan", math.nan, 1.0), ("healthy", 1.5, 0.0)]
    if optimizer_outside_model:
        cases.append(("overflow outside the model", 1.5, 1.0))
    for case, grad_norm, expected in cases:
        optimizer.zero_grad()
        scaler.scale(model(torch.ones(1, 2)).sum() + extra.sum()).backward()
        if case == "overflow":
            model.weight.grad[0, 0] = math.inf
        elif case == "overflow outside the model":
            extra.grad[0] = math.inf
        entry = measure_step(1, parameters, torch.tensor(2.0), torch.tensor(grad_norm), scaler, optimizer)
        assert entry.local[GRADIENTS].item() == expected and entry.local[PARAMETERS].item() == 0.0, case
        found_inf = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        assert [flag.item() for flag in found_inf.values()] == [expected], case
        assert entry.loss_scale is not None and entry.loss_scale.item() == 2.0**4
        scaler.update(2.0**4)
