"""Fault injection for the rollback tests: bad updates that throw the weights far, or make them NaN, at known steps."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import TrainerCallback

from tests.testing_utils import rank


class ThrowWeights(TrainerCallback):
    """Adds N(0, ``scale``²) noise to every parameter right after the update of the given optimizer steps.

    This is what a diverging update does: the loss of the *next* step (measured before its own update)
    jumps by an order of magnitude. Under ``torch.distributed`` only the processes in ``ranks`` (all when
    ``None``) are hit, so their replicas drift apart from the others.
    """

    def __init__(self, steps: Iterable[int], scale: float = 2.0, ranks: Iterable[int] | None = None) -> None:
        self.steps = set(steps)
        self.scale = scale
        self.ranks = None if ranks is None else set(ranks)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        if step in self.steps and (self.ranks is None or rank() in self.ranks):
            generator = torch.Generator().manual_seed(step)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * self.scale)


class NanWeights(TrainerCallback):
    """Turns one parameter tensor NaN right after the update of the given optimizer steps (an overflowing update).

    From then on every loss and gradient is NaN whatever the batch, until something restores the weights.
    The default tensor feeds every token (the embeddings' LayerNorm weight). Under ``torch.distributed`` only
    the processes in ``ranks`` (all when ``None``) are hit.
    """

    def __init__(
        self,
        steps: Iterable[int],
        parameter_name: str = "bert.embeddings.LayerNorm.weight",
        ranks: Iterable[int] | None = None,
    ) -> None:
        self.steps = set(steps)
        self.parameter_name = parameter_name
        self.ranks = None if ranks is None else set(ranks)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps and (self.ranks is None or rank() in self.ranks):
            with torch.no_grad():
                dict(model.named_parameters())[self.parameter_name].fill_(float("nan"))


class SaveAt(TrainerCallback):
    """A user's time-budget or preemption saver: sets ``control.should_save`` in ``on_step_end`` of the given steps,
    after the stability callbacks ran (callbacks passed by the user come after them)."""

    def __init__(self, steps: Iterable[int]) -> None:
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True
