"""Fault injection for the rollback tests: a bad update that throws the weights far, at known steps."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from helpers import rank
from transformers import TrainerCallback


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
