"""Health reporting of the skip callback: counters, events, warnings and stops from steps read on the host.

:class:`SkipHealth` turns the steps a flush read (`hf_stability.step.skip_queue.ReadStep`) into the
counters `SkipNonFiniteCallback` exports, the ``stability_events.jsonl`` entries (``skip``,
``nonfinite_loss``, ``nonfinite_parameters``, ``underflow``, ``stop``), log warnings, and the consecutive-skip,
underflow and non-finite-weights stops. It reads no tensor: everything it sees is already on the host.
"""

from __future__ import annotations

import warnings
from dataclasses import astuple
from typing import Any

import torch
import torch.distributed as dist

from hf_stability._logging import get_logger, is_main_process
from hf_stability.events import StabilityEventLog
from hf_stability.samples import SampleRecord, event_samples, process_rank, public, record_bad_samples
from hf_stability.step.channel import StepSignals, distributed, for_collective, settle_collective
from hf_stability.step.skip_queue import FLAG_NAMES, ReadStep

logger = get_logger(__name__)

# The counters `SkipNonFiniteCallback` exports with a checkpoint.
COUNTERS = (
    "skipped_steps",
    "consecutive_skips",
    "nonfinite_loss_steps",
    "nonfinite_parameter_steps",
    "underflow_steps",
    "consecutive_underflow_steps",
)

# A loss scale under this is reported (DeepSpeed's and Megatron-LM's default ``min_loss_scale``): the scaled
# loss is smaller than the loss itself, so the scale no longer protects small gradients from flushing to zero.
# GradScaler halves the scale on every overflow but doubles it only after 2,000 clean steps in a row, so
# overflows that are never consecutive (an Inf every other step) drive it down for good.
LOSS_SCALE_FLOOR = 1.0


def underflow_reason(step: ReadStep) -> str | None:
    """Why ``step``'s update carried no signal (loss scale under the floor, all-zero gradients), else None.

    A step with a non-finite loss or gradients is judged by the other checks; all-zero gradients count only
    when the loss is finite (a batch without labels has loss 0/0 and zero gradients: a loss report).
    """
    if step.loss_scale is not None and step.loss_scale < LOSS_SCALE_FLOOR:
        return f"loss scale {step.loss_scale:.3g} under the floor {LOSS_SCALE_FLOOR:g}"
    if step.grad_norm == 0 and not step.reduced.gradients and not step.reduced.loss:
        return "all gradients exactly zero"
    return None


def ranks_flagged(steps: list[ReadStep], local: torch.Tensor | None) -> list[dict[str, list[int]]]:
    """For each read step, the ranks that raised each flag (keys: the `Flags` fields).

    ``local`` is this rank's ``(steps, 3)`` flags on device. A single process needs only the host copy
    already read; several ranks exchange theirs with one all-gather and one read, on flushes that report
    something only (every rank gets there alike: the reduced flags agree).
    """
    if not distributed() or dist.get_world_size() == 1 or local is None:
        table = [[astuple(step.local) for step in steps]]
    else:
        work = for_collective(local)
        gathered = [torch.zeros_like(work) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, work)
        settle_collective(work, *gathered)
        table = torch.stack(gathered).tolist()  # [rank][step][flag]
    return [
        {name: [rank for rank, rows in enumerate(table) if rows[row][flag]] for flag, name in enumerate(FLAG_NAMES)}
        for row in range(len(steps))
    ]


class SkipHealth:
    """Counters and reports of the skip callback; ``max_consecutive_skips`` skips in a row stop the run."""

    def __init__(self, max_consecutive_skips: int, max_underflow_steps: int = 100) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.max_underflow_steps = max_underflow_steps
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.nonfinite_loss_steps = 0
        self.nonfinite_parameter_steps = 0
        self.underflow_steps = 0  # steps whose loss scale was under the floor or whose gradients were all zero
        self.consecutive_underflow_steps = 0
        self.weights_stop = False  # stopped for non-finite weights: no checkpoint may be written
        self._weights_reported: int | None = None
        self._filter_warned = False

    def begin_run(self) -> None:
        self.weights_stop = False
        self._weights_reported = None  # step numbers of an earlier train() recur in this one

    def apply(self, args, state, control, steps: list[ReadStep], local: torch.Tensor | None, now: int,
              record: StepSignals, restoring: bool) -> str | None:
        """Count and report ``steps`` (read by a flush at step ``now``); the skip reason of the last one (or None).

        A step whose weights were already non-finite is no skipped batch: every loss and gradient from then on is
        non-finite whatever the data. It is reported (``"nonfinite_parameters"``) and left to spike rollback when
        one can restore a trusted snapshot (``restoring``: the run's spike stage is active); without one, training
        stops at once, and without a checkpoint. A flush step's own verdict goes into the run's `WeightsLedger`,
        which the spike stage of the same step reads.
        """
        if not steps:
            return None
        if any(any(astuple(step.reduced)) for step in steps):
            ranks = ranks_flagged(steps, local)
        else:
            ranks = [{name: [] for name in FLAG_NAMES}] * len(steps)
        reason = None
        limit_reached = underflow_reached = 0
        weights_step = limit_step = underflow_step = None
        for step, flagged in zip(steps, ranks, strict=True):
            if self._count_underflow(args, state, step) >= self.max_underflow_steps:
                underflow_reached, underflow_step = self.consecutive_underflow_steps, step.step
            if step.reduced.parameters:
                self.report_parameters(args, state, step.step, flagged["parameters"], step.loss, restoring)
                weights_step = step.step
                self.consecutive_skips = 0
                reason = None
                continue
            if step.reduced.loss:
                self._warn_filter_hides_loss(args)
                if not step.reduced.gradients:
                    self._report_loss(args, state, step.step, flagged["loss"], step.loss, record.samples)
            if not step.reduced.gradients:
                self.consecutive_skips = 0
                reason = None
                continue
            reason = "fp16_overflow" if step.loss_scale is not None else "nonfinite_gradients"
            self._report_skip(args, state, step, reason, flagged, record.samples)
            if self.consecutive_skips >= self.max_consecutive_skips:
                limit_reached, limit_step = max(limit_reached, self.consecutive_skips), step.step
        if weights_step is not None:
            if weights_step == now:
                record.guard.weights.judge(now, True)  # the spike stage of this step reads it
            if not restoring:
                self.stop_for_weights(args, state, control, now, weights_step, record.samples)
                return reason
        if limit_step is not None:
            self._stop(args, state, control, now, limit_reached, event_samples(record.samples, limit_step, False))
        elif underflow_step is not None:
            self._stop_for_underflow(args, state, control, now, underflow_reached,
                                     event_samples(record.samples, underflow_step, False))
        return reason

    def _count_underflow(self, args, state, step: ReadStep) -> int:
        """Count ``step`` if its update carried no signal; report the first of a run of them. The run's length."""
        why = underflow_reason(step) if not step.reduced.parameters else None
        if why is None:
            self.consecutive_underflow_steps = 0
            return 0
        self.underflow_steps += 1
        self.consecutive_underflow_steps += 1
        if self.consecutive_underflow_steps == 1:
            logger.warning(
                "Step %d: %s; training stops after %d such steps in a row (max_underflow_steps). An fp16 loss scale "
                "that keeps falling means overflows keep coming back: lower the learning rate or train in bf16.",
                step.step,
                why,
                self.max_underflow_steps,
            )
            if state.is_world_process_zero:
                StabilityEventLog(args.output_dir).append(
                    step.step, "underflow", why, loss=step.loss, grad_norm=step.grad_norm, loss_scale=step.loss_scale
                )
        return self.consecutive_underflow_steps

    def _stop_for_underflow(self, args, state, control, step: int, consecutive: int, samples: dict[str, Any]) -> None:
        message = (
            f"{consecutive} consecutive steps had a loss scale under {LOSS_SCALE_FLOOR:g} or all-zero gradients "
            f"(max_underflow_steps={self.max_underflow_steps}); stopping at step {step} and saving a checkpoint: "
            "the updates carry no signal. Resume from an earlier checkpoint with a lower learning rate, or in bf16."
        )
        _stop_training(args, state, control, step, message, save=True, consecutive_underflow=consecutive,
                       **public(samples))

    def _report_skip(self, args, state, step: ReadStep, reason: str, flagged: dict[str, list[int]],
                     samples: SampleRecord | None) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        # Gradients are averaged across ranks: a rank's own non-finite loss tells where the batch went bad.
        origin = flagged["loss"] or flagged["gradients"]
        fields = event_samples(samples, step.step, process_rank() in origin)  # on every rank
        if state.is_world_process_zero:
            record_bad_samples(args.output_dir, "skip", fields)
            StabilityEventLog(args.output_dir).append(
                step.step,
                "skip",
                reason,
                ranks=flagged["gradients"],
                loss_ranks=flagged["loss"],
                loss=step.loss,
                grad_norm=step.grad_norm,
                loss_scale=step.loss_scale,
                consecutive=self.consecutive_skips,
                **public(fields),
            )
        logger.warning(
            "Step %d skipped (%s on ranks %s): parameters and optimizer state unchanged.",
            step.step,
            reason,
            flagged["gradients"],
        )

    def _warn_filter_hides_loss(self, args) -> None:
        """Once per run, at the first non-finite loss, say where it went if Trainer's filter hid it."""
        if self._filter_warned or not getattr(args, "logging_nan_inf_filter", False):
            return
        self._filter_warned = True
        if not is_main_process():
            return
        warnings.warn(
            "A non-finite training loss was hidden from the logged `loss` by `logging_nan_inf_filter=True` (Trainer "
            "logs the running average instead); it is counted in `stability/skipped_steps` and listed in "
            "stability_events.jsonl. With `logging_nan_inf_filter=False` it would show, but Trainer's running loss "
            "would then stay NaN in every later entry (it resets it by subtracting it from itself).",
            UserWarning,
            stacklevel=2,
        )

    def stop_for_weights(self, args, state, control, now: int, step: int, samples: SampleRecord | None) -> None:
        """Stop at once without a checkpoint: the weights are non-finite and nothing can restore them here."""
        message = (
            f"The weights were non-finite at step {step} (an earlier update blew them up; no batch is to blame) and "
            f"no spike rollback is installed to restore a trusted snapshot: stopping at step {now} without saving a "
            "checkpoint, so the last finite checkpoint stays the newest. Resume from it with a lower learning rate, "
            "or enable spike rollback."
        )
        self.weights_stop = True
        _stop_training(args, state, control, now, message, save=False, nonfinite_weights_step=step,
                       **public(event_samples(samples, step, False)))

    def _stop(self, args, state, control, step: int, consecutive: int, samples: dict[str, Any]) -> None:
        message = (
            f"{consecutive} consecutive steps had non-finite gradients (max_consecutive_skips="
            f"{self.max_consecutive_skips}); stopping at step {step} and saving a checkpoint. Skipped steps change "
            "nothing, so it holds the weights of the last update before them, checked finite; check the data around "
            "these steps, lower the learning rate or resume from an earlier checkpoint."
        )
        _stop_training(args, state, control, step, message, save=True, consecutive=consecutive, **public(samples))

    def _report_loss(self, args, state, step: int, ranks: list[int], loss: float | None,
                     samples: SampleRecord | None) -> None:
        self.nonfinite_loss_steps += 1
        logger.warning("Step %d: non-finite training loss on ranks %s with finite gradients.", step, ranks)
        fields = event_samples(samples, step, process_rank() in ranks)  # on every rank
        if state.is_world_process_zero:
            record_bad_samples(args.output_dir, "nonfinite_loss", fields)
            StabilityEventLog(args.output_dir).append(
                step, "nonfinite_loss", "non-finite training loss, finite gradients", ranks=ranks, loss=loss,
                **public(fields)
            )

    def report_parameters(
        self, args, state, step: int, ranks: list[int] | None, loss: float | None, recovery: bool | None
    ) -> None:
        """Report non-finite weights at ``step`` once; ``recovery`` says whether spike rollback restores them.

        ``ranks`` is ``None`` where only the all-reduced verdict is known (the check before a checkpoint).
        """
        if step == self._weights_reported:
            return
        self._weights_reported = step
        self.nonfinite_parameter_steps += 1
        action = {True: "left to spike rollback", False: "no snapshot to restore", None: "at the end of training"}
        reason = f"non-finite weights at step {step} ({action[recovery]})"
        logger.error("Step %d: non-finite weights on ranks %s (%s).", step, ranks, action[recovery])
        if state.is_world_process_zero:
            StabilityEventLog(args.output_dir).append(step, "nonfinite_parameters", reason, ranks=ranks, loss=loss)


def _stop_training(args, state, control, step: int, message: str, save: bool, **fields: Any) -> None:
    """End training at ``step``: log ``message``, ask Trainer for a checkpoint or none, record a ``stop`` event."""
    logger.error(message)
    control.should_training_stop = True
    control.should_save = save
    if state.is_world_process_zero:
        StabilityEventLog(args.output_dir).append(step, "stop", message, **fields)
