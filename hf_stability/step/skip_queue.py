"""The skip callback's step queue: each step's flags stay on device until one flush reads them all.

When the optimizer can skip an update on device (the grad scaler in fp16, or a fused optimizer given a
``found_inf`` flag, see `hf_stability.step.skip_decision`), nothing needs a step's flags on the host
at once. They wait here, as named device tensors, and :meth:`StepQueue.drain` reads the whole queue with
one device-to-host copy on the steps where the host needs them (:meth:`StepQueue.due`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from transformers import TrainerState, TrainingArguments

from hf_stability._compat import is_logging_step, is_saving_step

# Positions of the checks in a step's device flag vector (the order of `Flags`).
GRADIENTS, LOSS, PARAMETERS = range(3)


@dataclass(frozen=True)
class Flags:
    """The three non-finite checks of one step: gradients, training loss, the weights the step started from."""

    gradients: bool
    loss: bool
    parameters: bool

    @classmethod
    def from_values(cls, values: list[float]) -> Flags:
        return cls(*(value > 0 for value in values))


@dataclass
class QueuedStep:
    """One step's flags and event values on device. ``local`` and ``reduced`` hold the flags in `Flags` order."""

    step: int
    local: torch.Tensor  # this rank's flags, 3 floats
    reduced: torch.Tensor  # the flags all-reduced (max) over the ranks
    grad_norm: torch.Tensor  # 0-d
    loss: torch.Tensor | None = None  # 0-d; None when the model returned no loss
    loss_scale: torch.Tensor | None = None  # 0-d; the grad scaler's scale, None without one


@dataclass(frozen=True)
class ReadStep:
    """A queued step read back on the host."""

    step: int
    local: Flags
    reduced: Flags
    grad_norm: float
    loss: float | None
    loss_scale: float | None


FLAG_NAMES = tuple(field.name for field in fields(Flags))
FLAG_COUNT = len(FLAG_NAMES)
# The order the host copy packs a step's values in; each name is a field of `QueuedStep`.
_PACKED = ("local", "reduced", "grad_norm", "loss", "loss_scale")


class StepQueue:
    """Steps waiting for their flags to be read, and the rule for when they must be."""

    def __init__(self) -> None:
        self._steps: list[QueuedStep] = []

    def __len__(self) -> int:
        return len(self._steps)

    def append(self, entry: QueuedStep) -> None:
        self._steps.append(entry)

    def due(self, args: TrainingArguments, state: TrainerState, step: int, limit: int, adding: int = 0) -> bool:
        """Flush before logs and checkpoints read the counters, and at least every ``limit`` steps to stop in time.

        ``adding``: steps about to be appended (a step asks before it is measured, to measure what a flush reads).
        """
        return (
            is_logging_step(args, state, step)
            or is_saving_step(args, state, step)
            or (state.max_steps > 0 and step >= state.max_steps)
            or len(self._steps) + adding >= limit
        )

    def drain(self) -> tuple[list[ReadStep], torch.Tensor | None]:
        """Empty the queue: its steps read on the host (one read), and the ``(steps, 3)`` local flags on device.

        The device copy of the local flags is what an all-gather of which rank raised what needs.
        """
        steps, self._steps = self._steps, []
        if not steps:
            return [], None
        device = steps[0].reduced.device
        nan = torch.full((1,), math.nan, device=device)
        columns: dict[str, list[torch.Tensor]] = {name: [] for name in _PACKED}
        for entry in steps:
            for name in _PACKED:
                value = getattr(entry, name)
                columns[name].append(nan if value is None else value.detach().float().reshape(-1).to(device))
        packed = torch.cat([torch.stack(columns[name]) for name in _PACKED], dim=1)
        widths = {"local": FLAG_COUNT, "reduced": FLAG_COUNT}
        table = packed.tolist()  # the flush's one device-to-host read
        read = []
        for entry, row in zip(steps, table, strict=True):
            values, start = {}, 0
            for name in _PACKED:
                width = widths.get(name, 1)
                values[name], start = row[start : start + width], start + width
            read.append(
                ReadStep(
                    step=entry.step,
                    local=Flags.from_values(values["local"]),
                    reduced=Flags.from_values(values["reduced"]),
                    grad_norm=values["grad_norm"][0],
                    loss=values["loss"][0] if entry.loss is not None else None,
                    loss_scale=values["loss_scale"][0] if entry.loss_scale is not None else None,
                )
            )
        return read, torch.stack([entry.local.float() for entry in steps])
