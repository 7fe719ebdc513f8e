"""`StepGuard`: one optimizer step's stability work, in code order, passing one `StepRecord` from stage to stage.

Trainer announces an optimizer step to every callback three times (``on_pre_optimizer_step``,
``on_optimizer_step``, ``on_step_end``). The stability callbacks do not act on those events themselves: each
registers its stage (skip, clip, spike, telemetry) with the one guard of the model's run
(``StepSignals.for_model(model).guard``); on each event the callback that registered first (:meth:`StepGuard.claim`),
which is the first of them to receive every event, hands it to the guard, which runs every stage of that event.
The others return at once (one that calls anyway finds the event done for this step). Where a callback sits in
the callback list therefore changes nothing, and the order of the stages is the order of the lines below.

The stages are plain objects in ``hf_stability.step`` (skip, clip, spike, telemetry, DeepSpeed's skip report); a
public callback owns its stage and exports its state with checkpoints.
They are seen here through the :class:`Stage` protocol; this module imports no callback. :meth:`StepGuard.metrics`
gathers the stages' log metrics with one device-to-host read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import torch
from transformers import TrainerControl, TrainerState

from hf_stability import metric_names as names
from hf_stability.step.weights import WeightsLedger

Metric: TypeAlias = torch.Tensor | float | int
"""A ``stability/`` metric a stage offers: a 0-d device tensor (read with the others at once) or a host number."""


class StepInputs(Protocol):
    """Where the step's loss and Trainer's pre-clip gradient norm come from (`StepSignals`)."""

    def loss(self, step: int) -> torch.Tensor | None: ...

    def grad_norm(self, step: int) -> torch.Tensor | None: ...


@dataclass
class StepRecord:
    """What one optimizer step carries from stage to stage.

    ``skip`` is the skip decision: ``False`` (update goes ahead), ``True`` (decided on the host: every gradient
    is ``None``), or a 0-d device tensor, nonzero where the update is dropped (decided on device, read with the
    queue at the next flush);
    ``reason`` names it. The loss and the pre-clip norm are asked for once, when a stage first needs them.
    """

    step: int
    args: Any
    state: TrainerState
    control: TrainerControl
    model: torch.nn.Module
    optimizer: Any = None
    lr_scheduler: Any = None
    inputs: StepInputs | None = None
    skip: torch.Tensor | bool = False
    reason: str | None = None
    _values: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)

    def loss(self) -> torch.Tensor | None:
        """The step's training loss (0-d, on device), or ``None`` where the model returned none."""
        if "loss" not in self._values:
            self._values["loss"] = None if self.inputs is None else self.inputs.loss(self.step)
        return self._values["loss"]

    def pre_clip_norm(self) -> torch.Tensor | None:
        """Trainer's gradient norm before clipping (0-d), or ``None`` under a trainer that does not share it."""
        if "norm" not in self._values:
            self._values["norm"] = None if self.inputs is None else self.inputs.grad_norm(self.step)
        return self._values["norm"]

    def decide(self, skip: torch.Tensor | bool, reason: str | None) -> None:
        """Record the skip decision (``reason`` is ``None`` when the update goes ahead on the host)."""
        self.skip, self.reason = skip, reason


class Stage(Protocol):
    """A stage's part in the step; each hook a stage has no use for does nothing.

    A stage may also offer its ``stability/`` metrics for the log entry, ``metrics(self) -> dict[str, Metric]``
    (device values are not read there: :meth:`StepGuard.metrics` reads every stage's at once).
    """

    def before_update(self, record: StepRecord) -> None: ...

    def update_applied(self, record: StepRecord) -> None: ...

    def after_update(self, record: StepRecord) -> None: ...


class StageHooks:
    """The step's three hooks, doing nothing: a stage overrides those it works in."""

    def before_update(self, record: StepRecord) -> None:
        """This stage's work before ``optimizer.step()`` (none by default)."""

    def update_applied(self, record: StepRecord) -> None:
        """This stage's work right after ``optimizer.step()`` (none by default)."""

    def after_update(self, record: StepRecord) -> None:
        """This stage's work at the end of the step (none by default)."""


ROLES = ("skip", "clip", "spike", "telemetry")


class StepGuard:
    """Runs the registered stages of one run, once per Trainer event and step, in the order written below."""

    def __init__(self, inputs: StepInputs | None = None) -> None:
        self.inputs = inputs
        self.stages: dict[str, Stage] = {}
        self._roles: tuple[Stage | None, ...] = (None,) * len(ROLES)  # the stages in `ROLES` order
        self.record: StepRecord | None = None  # the step being taken (or the last one taken)
        self._done: dict[str, int] = {}  # event -> the step it last ran for
        self.weights = WeightsLedger()  # the run's verdicts on its weights, shared by the skip and spike stages
        self.driver: object = None  # the callback that hands the guard Trainer's step events (`claim`)

    def reset(self) -> None:
        """A new run: no stage, no step, no verdict, no driver."""
        self.stages, self.record, self._done, self.weights, self.driver = {}, None, {}, WeightsLedger(), None
        self._roles = (None,) * len(ROLES)

    def claim(self, callback: object) -> bool:
        """Whether ``callback`` hands this run's step events to the guard: the first callback to register does.

        It registered first in ``on_train_begin``, so it is the first of the registered callbacks to receive every
        event: the others need not call at all (one call per event instead of one per callback). One that calls
        anyway finds the event done for the step.
        """
        if self.driver is None:
            self.driver = callback
        return self.driver is callback

    def restores_weights(self) -> bool:
        """Whether the run's spike stage can answer non-finite weights by restoring a trusted snapshot now."""
        spike = self.stages.get("spike")
        return spike is not None and bool(getattr(spike, "restoring", False))

    def register(self, role: str, stage: Stage) -> None:
        """Make ``stage`` the run's ``role`` (one of :data:`ROLES`); a later registration replaces it."""
        if role not in ROLES:
            raise ValueError(f"`role`: one of {ROLES}, got {role!r}")
        self.stages[role] = stage
        self._roles = tuple(self.stages.get(name) for name in ROLES)

    def _first(self, event: str, step: int) -> bool:
        """Whether ``event`` has not run for ``step`` yet (and mark it run)."""
        if self._done.get(event) == step:
            return False
        self._done[event] = step
        return True

    # ---- the step --------------------------------------------------------------------------------

    def before_update(self, record: StepRecord) -> None:
        """Gradients are final (unscaled, clipped by ``max_grad_norm``); the optimizer has not stepped."""
        if not self._first("before_update", record.step):
            return
        self.record = record
        skip, clip, spike, telemetry = self._roles
        if skip is not None:
            skip.before_update(record)  # flags (gradients, loss, weights on flush steps), one all-reduce, drop
        if clip is not None:
            clip.before_update(record)  # adaptive clipping of the gradients of a real update
        if spike is not None:
            spike.before_update(record)  # the spike metric of the step (pre-clip norm; fp16 overflow flag)
        if telemetry is not None:
            telemetry.before_update(record)  # fp16 pressure and per-layer norms of the update, on logging steps

    def update_applied(self, record: StepRecord) -> None:
        """``optimizer.step()`` has run (or was dropped)."""
        if not self._first("update_applied", record.step):
            return
        self.record = record
        skip, _, spike, _ = self._roles
        if skip is not None:
            skip.update_applied(record)  # found_inf and a held step taken back; an engine's own skip recorded
        if spike is not None:
            spike.update_applied(record)  # the step's value buffered on device, with its skip flag

    def after_update(self, record: StepRecord, control: TrainerControl) -> None:
        """The scheduler has stepped and ``global_step`` counts the step; Trainer has decided log/save/stop."""
        if not self._first("after_update", record.step):
            return
        self.record, record.control = record, control
        spike = self._roles[2]
        if spike is not None:
            spike.after_update(record)  # on check steps: one read, then rollback, or a snapshot on snapshot steps

    # ---- the log entry ----------------------------------------------------------------------------

    def metrics(self) -> dict[str, float | int]:
        """Every stage's ``stability/`` metrics, in the stages' order, their device values read at once (one read).

        ``stability/rollbacks`` is the spike stage's count; a telemetry stage that logs the run's counts
        (``logs_run_counts``) makes it 0 where no spike stage runs.
        """
        offered: dict[str, Metric] = {}
        for role in ROLES:
            offer = getattr(self.stages.get(role), "metrics", None)
            if offer is not None:
                offered.update(offer())
        if "spike" not in self.stages and getattr(self.stages.get("telemetry"), "logs_run_counts", False):
            offered[names.ROLLBACKS] = 0
        return read_metrics(offered)

    def log_metrics(self, step: int) -> dict[str, float | int]:
        """:meth:`metrics` for the training log entry of ``step``, the first time it is asked for; ``{}`` after.

        `StabilityTrainer.log` asks before the entry is recorded; under a plain `Trainer` the first stability
        callback's ``on_log`` asks. Either way the entry gets the metrics once, whoever asks second.
        """
        return self.metrics() if self._first("log", step) else {}

    def skip_flag(self, step: int) -> torch.Tensor | bool:
        """Whether ``step`` is skipped: a host bool, or the pending 0-d bool device flag (no host read)."""
        record = self.record
        if record is None or record.step != step:
            return False
        return record.skip != 0 if isinstance(record.skip, torch.Tensor) else record.skip


def read_metrics(offered: Mapping[str, Metric]) -> dict[str, float | int]:
    """``offered`` with its device values read to the host in one read (an integer tensor gives an int)."""
    values: dict[str, float | int] = {k: v for k, v in offered.items() if not isinstance(v, torch.Tensor)}
    device_values = {k: v for k, v in offered.items() if isinstance(v, torch.Tensor)}
    if device_values:  # read on an accelerator where any value is on one: moving to it reads nothing
        devices = [v.device for v in device_values.values()]
        target = next((d for d in devices if d.type != "cpu"), devices[0])
        stacked = torch.stack([v.detach().float().reshape(()).to(target) for v in device_values.values()])
        for (key, value), number in zip(device_values.items(), stacked.tolist(), strict=True):
            values[key] = number if value.is_floating_point() else int(number)
    return {key: values[key] for key in offered}
