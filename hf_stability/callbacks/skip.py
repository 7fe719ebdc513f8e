"""`SkipNonFiniteCallback`: drop the update of a step whose gradients are NaN/Inf on any rank.

The check runs in ``on_pre_optimizer_step``, when Trainer has already unscaled (fp16) and clipped
the gradients. Clipping does not hide a non-finite gradient (a NaN turns every gradient NaN, an Inf
becomes NaN), so one fused norm over the gradients tells whether the step is sane. A skip sets every
gradient to ``None``: torch optimizers then leave parameters, moments and their ``step`` count alone
(zeroing to 0 would not — Adam still decays its moments and counts the step).

Per step this costs two fused norms (gradients, parameters), one all-reduce of a 3-element flag vector
(gradients, loss, parameters) and, in fp32/bf16, one device-to-host read: the skip must be decided on the host before
``optimizer.step()``. In fp16 the grad scaler's found-inf flag is the gradient check and the scaler
skips the update itself, so no read is needed per step: the step's flags stay on device in a queue
that is read at once (one read) on logging, save and last steps, every ``max_consecutive_skips``
steps and at epoch/train end. Counters, events and the consecutive-skip stop of a queued step are
therefore applied at the next flush, at most ``max_consecutive_skips - 1`` steps later. Log entries and
checkpoints see current counters (a flush also runs after every evaluation, where
``save_strategy="best"`` decides to save); only a checkpoint requested by a user callback can export
counters that miss the steps still queued.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hf_stability.callbacks.resume import ResumableCallback
from hf_stability.callbacks.signals import (
    StepSignals,
    active_grad_scaler,
    completing_step,
    distributed,
    for_collective,
    global_grad_norm,
    gradients,
    is_logging_step,
    reduce_across_ranks,
)
from hf_stability.config import checked_number
from hf_stability.engines import refuse_for_callback
from hf_stability.events import StabilityEventLog

logger = logging.getLogger(__name__)

GRADIENTS, LOSS, PARAMETERS = range(3)
# Columns of a queued step's row: local flags, reduced flags, then loss, grad norm and loss scale.
_LOCAL, _REDUCED, _LOSS_VALUE, _GRAD_NORM, _SCALE = 0, 3, 6, 7, 8


@dataclass
class _QueuedStep:
    """One step's flags and event values, on device until the next flush reads the whole queue."""

    step: int  # the PARAMETERS flag checked the weights this step started from
    row: torch.Tensor  # 9 floats, columns above
    has_loss: bool
    has_scale: bool


def _innermost(optimizer: object) -> torch.optim.Optimizer:
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: object) -> list[torch.Tensor]:
    """The scaler's per-device found-inf tensors for this step, unscaling first if Trainer has not.

    Trainer unscales through ``accelerator.clip_grad_norm_`` before ``on_pre_optimizer_step`` even
    with ``max_grad_norm=0``; the explicit ``unscale_`` only covers custom training loops.
    """
    inner = _innermost(optimizer)
    found = scaler._per_optimizer_states[id(inner)]["found_inf_per_device"]
    if not found:
        scaler.unscale_(inner)
        found = scaler._per_optimizer_states[id(inner)]["found_inf_per_device"]
    return list(found.values())


def parameters_nonfinite(model: torch.nn.Module) -> torch.Tensor:
    """A 0-d device bool: some parameter of this rank holds NaN/Inf (one fused norm, no host read)."""
    return ~torch.isfinite(global_grad_norm([p.detach() for p in model.parameters()]))


def weights_nonfinite(model: torch.nn.Module, step: int) -> bool:
    """Whether any rank's weights are non-finite at the end of ``step``: one all-reduce and one host read.

    Run before a checkpoint is written (rarely enough to afford the read). The verdict is kept in
    `StepSignals`, so a second callback asking about the same step gets it without another read; a verdict
    already set for ``step`` by the per-step flags is reused as is.
    """
    record = StepSignals.for_model(model)
    if record.weights_verdict is None or record.weights_verdict[0] != step:
        bad = reduce_across_ranks(parameters_nonfinite(model).float(), "max").item() > 0
        record.weights_verdict = (step, bad)
    return record.weights_verdict[1]


def _ranks_flagged(local_flags: torch.Tensor, local_table: list[list[float]]) -> list[list[list[int]]]:
    """For each row of ``(steps, 3)`` local flags and each flag, the ranks that raised it.

    ``local_table`` is this rank's rows already on the host, all a single process needs. Several ranks
    exchange theirs with one all-gather and one read, on flushes that report something only (every rank
    gets there alike, the reduced flags agree).
    """
    if not distributed() or dist.get_world_size() == 1:
        table = [local_table]
    else:
        work = for_collective(local_flags)
        gathered = [torch.zeros_like(work) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, work)
        table = torch.stack(gathered).tolist()  # [rank][row][flag]
    return [
        [[rank for rank, rows in enumerate(table) if rows[row][flag] > 0] for flag in range(len(local_table[row]))]
        for row in range(len(local_table))
    ]


class SkipNonFiniteCallback(ResumableCallback):
    """Skip the optimizer update of any step with a NaN/Inf gradient on any rank; report NaN losses and weights.

    On a skip, every gradient is set to ``None``, the decision is written to
    :class:`~hf_stability.callbacks.signals.StepSignals` (``StepSignals.for_model(model).skipped(step)``),
    the counters below move once, and the main process appends a ``"skip"`` event to
    ``<output_dir>/stability_events.jsonl``. ``global_step`` still counts the batch and training goes on.
    After ``max_consecutive_skips`` skips in a row the run stops with a checkpoint (event ``"stop"``).

    Also reported (event, counter and warning; no skip): a non-finite training loss with finite gradients
    (``"nonfinite_loss"``, e.g. a batch without a single label: 0/0).

    Non-finite weights are no bad batch: the third flag checks the parameters each step starts from (one
    fused norm, read with the other flags). Such a step is not counted as skipped (``"nonfinite_parameters"``,
    ``nonfinite_parameter_steps``) and its update is dropped; `SpikeRollbackCallback`, when installed, treats
    it as a spike and restores a trusted snapshot. Alone, this callback stops training at once without a
    checkpoint. Before every checkpoint the weights are checked once more (one read), covering the update of
    the checkpoint step itself: a checkpoint with non-finite weights is never written.

    fp16: the grad scaler's found-inf flag is the gradient check; the reduced flag is written back into
    the scaler so every rank halves its scale alike. The scaler already skips the update (with the fused
    AdamW kernel the skip happens on device and ``accelerator.optimizer_step_was_skipped`` stays False);
    the counters here see the overflow exactly once either way. Because the scaler skips, the flags are
    not read per step but queued on device and read together at the next flush (logging, save, evaluation
    and last steps, every ``max_consecutive_skips`` steps, epoch and train end): events, counters and the stop of
    a queued overflow step come at most ``max_consecutive_skips - 1`` steps late, and its gradients are
    left in place (the scaler ignores them). On a flush step the current step is decided on the host as
    in fp32. `StepSignals` then holds a device flag for the step (``StepSignals.skip_flag``).

    LR scheduler: Trainer steps it on skipped steps too (it only checks accelerate's flag, which the
    fused optimizer never sets), so the schedule follows ``global_step``, not the number of updates.
    This is deliberate: the schedule stays aligned with the data position and with resumed runs.

    Counters (``skipped_steps``, ``consecutive_skips``, ``nonfinite_loss_steps``,
    ``nonfinite_parameter_steps``) are exported with the checkpoint and come back on
    ``resume_from_checkpoint`` when ``restore_callback_states_from_checkpoint=True``; the
    ``max_consecutive_skips`` given for the resumed run wins over the stored one.

    With ``logging_nan_inf_filter=True`` (Trainer's default) the first non-finite loss also raises a
    one-time warning, since Trainer's logged ``loss`` hides it.

    Args:
        max_consecutive_skips: stop training after this many skipped steps in a row.

    Example:
        ```python
        trainer = Trainer(model, args, train_dataset=data, callbacks=[SkipNonFiniteCallback(max_consecutive_skips=20)])
        ```
    """

    priority = 400  # runs first: the others see the decision (hf_stability.callbacks.order)

    def __init__(self, max_consecutive_skips: int = 50) -> None:
        self.max_consecutive_skips = checked_number("max_consecutive_skips", max_consecutive_skips, int, minimum=1)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.nonfinite_loss_steps = 0
        self.nonfinite_parameter_steps = 0
        self._filter_warned = False
        self._queue: list[_QueuedStep] = []
        self._weights_stop = False  # stopped for non-finite weights: no checkpoint may be written
        self._weights_reported: int | None = None

    def state(self) -> dict:
        return {
            "args": {"max_consecutive_skips": self.max_consecutive_skips},
            "attributes": {
                "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips,
                "nonfinite_loss_steps": self.nonfinite_loss_steps,
                "nonfinite_parameter_steps": self.nonfinite_parameter_steps,
            },
        }

    def apply_settings(self, settings: dict) -> None:
        self.max_consecutive_skips = settings["max_consecutive_skips"]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_for_callback(self, args)
        self.begin_run(args, state, model)
        StepSignals.for_model(model).open(state)
        self._queue = []
        self._weights_stop = False

    def _warn_filter_hides_loss(self, args) -> None:
        """Once per run, at the first non-finite loss, say where it went if Trainer's filter hid it."""
        if self._filter_warned or not getattr(args, "logging_nan_inf_filter", False):
            return
        self._filter_warned = True
        warnings.warn(
            "A non-finite training loss was hidden from the logged `loss` by `logging_nan_inf_filter=True` (Trainer "
            "logs the running average instead); it is counted in `stability/skipped_steps` and listed in "
            "stability_events.jsonl. With `logging_nan_inf_filter=False` it would show, but Trainer's running loss "
            "would then stay NaN in every later entry (it resets it by subtracting it from itself).",
            UserWarning,
            stacklevel=2,
        )

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = completing_step(state)
        scaler = active_grad_scaler(optimizer)
        found_inf = scaler_found_inf(scaler, optimizer) if scaler is not None else None
        grad_norm = global_grad_norm(gradients(model.parameters()))
        if found_inf is not None:
            grads_bad = torch.stack([f.float().sum() for f in found_inf]).sum() > 0
        else:
            grads_bad = ~torch.isfinite(grad_norm)
        device = grads_bad.device
        record = StepSignals.for_model(model)
        loss = record.loss(step)
        no_flag = torch.zeros((), dtype=torch.bool, device=device)
        loss_bad = ~torch.isfinite(loss).to(device) if loss is not None else no_flag
        # The weights this step's forward used: after an update that blew them up, every later loss and gradient
        # is non-finite, which is no bad batch (see `_flush`).
        params_bad = parameters_nonfinite(model).to(device)
        local = torch.stack([grads_bad, loss_bad, params_bad]).float()
        reduced = reduce_across_ranks(local, "max")
        if found_inf is not None:
            for flag in found_inf:
                flag.copy_(reduced[GRADIENTS])
        nan = torch.full((), float("nan"), device=device)
        extras = [
            nan if loss is None else loss.float().reshape(()).to(device),
            grad_norm.float().reshape(()).to(device),
            nan if scaler is None else scaler._get_scale_async().float().reshape(()).to(device),
        ]
        self._queue.append(
            _QueuedStep(
                step,
                torch.cat([local, reduced, torch.stack(extras)]),
                loss is not None,
                scaler is not None,
            )
        )
        if scaler is not None and not self._flush_due(args, state, step):
            # The scaler skips an overflowed update on its own: nothing needs the flags on the host yet.
            # Non-finite weights are no overflow to leave out: the rollback must see their loss.
            record.mark_pending(step, (reduced[GRADIENTS] > 0) & (reduced[PARAMETERS] == 0), "fp16_overflow")
            return control
        reason = self._flush(args, state, control, step, record)
        if reason is not None or record.weights_verdict == (step, True):
            model.zero_grad(set_to_none=True)  # no update: neither a bad batch's nor one made from NaN weights
        record.mark(step, reason)
        return control

    def _flush_due(self, args, state, step: int) -> bool:
        """Flush before logs and checkpoints read the counters, and often enough to stop in time."""
        saving = getattr(args, "save_strategy", None) == "steps" and state.save_steps > 0
        return (
            is_logging_step(args, state, step)
            or (saving and step % state.save_steps == 0)
            or (state.max_steps > 0 and step >= state.max_steps)
            or len(self._queue) >= self.max_consecutive_skips
        )

    def _flush(self, args, state, control, now: int, record: StepSignals) -> str | None:
        """Read the queued steps at once, count and report them; the skip reason of the last one (or None).

        ``now`` is the step training is at (a stop happens there). A step whose weights were already
        non-finite is no skipped batch: every loss and gradient from then on is non-finite whatever the data.
        It is reported (``"nonfinite_parameters"``) and left to spike rollback when one is installed
        (``record.recovery``), which restores a trusted snapshot; without one, training stops at once, and
        without a checkpoint.
        """
        queue, self._queue = self._queue, []
        if not queue:
            return None
        rows = torch.stack([entry.row for entry in queue])
        table = rows.tolist()  # the flush's one device-to-host read
        reported = any(value > 0 for row in table for value in row[_REDUCED:_LOSS_VALUE])
        if reported:
            ranks = _ranks_flagged(rows[:, _LOCAL:_REDUCED], [row[_LOCAL:_REDUCED] for row in table])
        else:
            ranks = [([], [], [])] * len(queue)
        reason = None
        limit_reached = 0
        weights_step = None
        for entry, row, (grad_ranks, loss_ranks, parameter_ranks) in zip(queue, table, ranks, strict=True):
            loss = row[_LOSS_VALUE] if entry.has_loss else None
            flags = [value > 0 for value in row[_REDUCED:_LOSS_VALUE]]
            if flags[PARAMETERS]:
                self._report_parameters(args, state, entry.step, parameter_ranks, loss, record.recovery)
                weights_step = entry.step
                self.consecutive_skips = 0
                reason = None
                continue
            if flags[LOSS]:
                self._warn_filter_hides_loss(args)
            if flags[LOSS] and not flags[GRADIENTS]:
                self._report_loss(args, state, entry.step, loss_ranks, loss)
            if not flags[GRADIENTS]:
                self.consecutive_skips = 0
                reason = None
                continue
            reason = "fp16_overflow" if entry.has_scale else "nonfinite_gradients"
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.max_consecutive_skips:
                limit_reached = max(limit_reached, self.consecutive_skips)
            fields = {
                "ranks": grad_ranks,
                "loss_ranks": loss_ranks,
                "loss": loss,
                "grad_norm": row[_GRAD_NORM],
                "loss_scale": row[_SCALE] if entry.has_scale else None,
                "consecutive": self.consecutive_skips,
            }
            if state.is_world_process_zero:
                StabilityEventLog(args.output_dir).append(entry.step, "skip", reason, **fields)
            logger.warning(
                "Step %d skipped (%s on ranks %s): parameters and optimizer state unchanged.",
                entry.step,
                reason,
                grad_ranks,
            )
        if weights_step is not None:
            if weights_step == now:
                record.weights_verdict = (now, True)  # the rollback of this step reads it
            if not record.recovery:
                self._stop_for_weights(args, state, control, now, weights_step)
                return reason
        if limit_reached:
            self._stop(args, state, control, now, limit_reached)
        return reason

    def _stop_for_weights(self, args, state, control, now: int, step: int) -> None:
        """Stop at once without a checkpoint: the weights are non-finite and nothing can restore them here."""
        message = (
            f"The weights were non-finite at step {step} (an earlier update blew them up; no batch is to blame) and "
            f"no spike rollback is installed to restore a trusted snapshot: stopping at step {now} without saving a "
            "checkpoint, so the last finite checkpoint stays the newest. Resume from it with a lower learning rate, "
            "or enable spike rollback."
        )
        logger.error(message)
        control.should_training_stop = True
        control.should_save = False
        self._weights_stop = True
        if state.is_world_process_zero:
            StabilityEventLog(args.output_dir).append(now, "stop", message, nonfinite_weights_step=step)

    def _stop(self, args, state, control, step: int, consecutive: int) -> None:
        message = (
            f"{consecutive} consecutive steps had non-finite gradients (max_consecutive_skips="
            f"{self.max_consecutive_skips}); stopping at step {step} and saving a checkpoint. Skipped steps change "
            "nothing, so it holds the weights of the last update before them, checked finite; check the data around "
            "these steps, lower the learning rate or resume from an earlier checkpoint."
        )
        logger.error(message)
        control.should_training_stop = True
        control.should_save = True
        if state.is_world_process_zero:
            StabilityEventLog(args.output_dir).append(step, "stop", message, consecutive=consecutive)

    def _report_loss(self, args, state, step: int, ranks: list[int], loss: float | None) -> None:
        self.nonfinite_loss_steps += 1
        logger.warning("Step %d: non-finite training loss on ranks %s with finite gradients.", step, ranks)
        if state.is_world_process_zero:
            StabilityEventLog(args.output_dir).append(
                step, "nonfinite_loss", "non-finite training loss, finite gradients", ranks=ranks, loss=loss
            )

    def _report_parameters(
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

    def _guard_checkpoint(self, args, state, control, model) -> None:
        """Before a checkpoint is written, judge its weights: a non-finite checkpoint is never written.

        The per-step flags check the weights a step *starts* from; this read (once per checkpoint) covers
        the update of the checkpoint step itself. With spike rollback installed it restores a trusted
        snapshot before the save (it reads the same verdict); without, training stops and nothing is saved.
        """
        if self._weights_stop:
            control.should_save = False
            return
        if not control.should_save or not weights_nonfinite(model, state.global_step):
            return
        record = StepSignals.for_model(model)
        self._report_parameters(args, state, state.global_step, None, None, record.recovery)
        if not record.recovery:
            self._stop_for_weights(args, state, control, state.global_step, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._guard_checkpoint(args, state, control, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        """Flush queued fp16 steps: ``save_strategy="best"`` may save right after an evaluation."""
        self._flush(args, state, control, state.global_step, StepSignals.for_model(model))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        """Flush queued fp16 steps, so an epoch-end checkpoint exports current counters (one read per epoch)."""
        self._flush(args, state, control, state.global_step, StepSignals.for_model(model))
        self._guard_checkpoint(args, state, control, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Flush queued fp16 steps, then report weights the last update left non-finite."""
        record = StepSignals.for_model(model)
        self._flush(args, state, control, state.global_step, record)
        if not self._weights_stop and weights_nonfinite(model, state.global_step):
            self._report_parameters(args, state, state.global_step, None, None, None)
        record.close()
