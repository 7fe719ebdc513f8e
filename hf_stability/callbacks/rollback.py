"""`SpikeRollbackCallback`: on a loss/grad-norm spike, restore a healthy snapshot and keep training.

The public face of the spike stage (`hf_stability.step.rollback.SpikeStage`, which says how the step's metric is
buffered, judged and rolled back): constructor keywords, settings, the state checkpoints carry, and Trainer's events
handed to the stage.
"""

from __future__ import annotations

import weakref

from transformers import TrainerControl, TrainerState

from hf_stability._compat import unwrap_optimizer
from hf_stability.callbacks.guarded import GuardedStep
from hf_stability.callbacks.resume import ResumableCallback, stored_count, stored_numbers, stored_scale
from hf_stability.callbacks.save_guard import CheckpointJudge
from hf_stability.engines import refuse_for_callback
from hf_stability.settings import RollbackSettings
from hf_stability.step.channel import StepSignals
from hf_stability.step.guard import StepRecord
from hf_stability.step.rollback import SNAPSHOT_DIRNAME as SNAPSHOT_DIRNAME  # importable from here, as before
from hf_stability.step.rollback import SpikeStage
from hf_stability.user_optimizer import scale_learning_rate


class _OfStage:
    """A counter of the callback kept by its `SpikeStage`: Trainer restores counters by name with ``setattr``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, callback: SpikeRollbackCallback | None, owner: type | None = None):
        return self if callback is None else getattr(callback.stage, self.name)

    def __set__(self, callback: SpikeRollbackCallback, value: float) -> None:
        setattr(callback.stage, self.name, value)


class SpikeRollbackCallback(GuardedStep, ResumableCallback, CheckpointJudge):
    """Detects loss (or grad-norm) spikes and rolls every rank back to the newest trusted snapshot.

    Works with `StabilityTrainer` and with a plain `transformers.Trainer`. Every argument left ``None`` is
    read from the `StabilityConfig` field of the same name when ``args`` is one, else its default
    (`RollbackSettings`). The resolved values are ``settings``.

    Args:
        spike_metric: ``"loss"`` or ``"grad_norm"``. Under `StabilityTrainer`, ``grad_norm`` is
            the pre-clip norm Trainer logs; under a plain `Trainer` a callback only sees the gradients after
            clipping, so with ``max_grad_norm > 0`` prefer ``loss`` there (a warning says so). fp16 overflow
            steps, which the grad scaler skips itself, are not judged.
        spike_window, spike_warmup, spike_sigma: detector window, warm-up and threshold.
        snapshot_interval, snapshot_keep, snapshot_storage: when snapshots are taken, how many, where.
        rollback_lr_factor: LR multiplier per rollback.
        max_rollbacks: rollbacks allowed; the next spike stops training.
        spike_check_interval: judge the buffered values at least every this many steps (one device-to-host
            copy and one all-reduce of a single int per check).
        metric, window, warmup, sigma, lr_factor, check_interval: the older names of ``spike_metric``,
            ``spike_window``, ``spike_warmup``, ``spike_sigma``, ``rollback_lr_factor`` and
            ``spike_check_interval``, still accepted (checkpoints of earlier versions store them).

    ``rollbacks`` (the cumulative count, read by `LossScaleTelemetryCallback`), ``lr_scale`` and the
    detector's window of healthy values (``detector_window``) survive ``resume_from_checkpoint`` through
    `ExportableState`, so a resumed run is guarded from its first step; the settings given for the resumed run
    win over the stored ones. Trainer saves the state of the main process only: after a resume every rank
    judges its own values against rank 0's window.

    Example:
        ```python
        trainer = Trainer(model, args, train_dataset=ds, callbacks=[SpikeRollbackCallback(rollback_lr_factor=0.5)])
        ```
    """

    settings_class = RollbackSettings
    settings: RollbackSettings
    aliases = {
        "metric": "spike_metric",
        "window": "spike_window",
        "warmup": "spike_warmup",
        "sigma": "spike_sigma",
        "lr_factor": "rollback_lr_factor",
        "check_interval": "spike_check_interval",
    }
    priority = 200  # list position only (hf_stability.callbacks.order); the step's order is `StepGuard`'s
    stored_attributes = {"rollbacks": stored_count, "lr_scale": stored_scale, "detector_window": stored_numbers}
    rollbacks = _OfStage()
    lr_scale = _OfStage()

    def __init__(
        self,
        spike_metric: str | None = None,
        spike_window: int | None = None,
        spike_warmup: int | None = None,
        spike_sigma: float | None = None,
        snapshot_interval: int | None = None,
        snapshot_keep: int | None = None,
        snapshot_storage: str | None = None,
        rollback_lr_factor: float | None = None,
        max_rollbacks: int | None = None,
        spike_check_interval: int | None = None,
        *,
        metric: str | None = None,
        window: int | None = None,
        warmup: int | None = None,
        sigma: float | None = None,
        lr_factor: float | None = None,
        check_interval: int | None = None,
    ) -> None:
        super().__init__(
            spike_metric=spike_metric,
            spike_window=spike_window,
            spike_warmup=spike_warmup,
            spike_sigma=spike_sigma,
            snapshot_interval=snapshot_interval,
            snapshot_keep=snapshot_keep,
            snapshot_storage=snapshot_storage,
            rollback_lr_factor=rollback_lr_factor,
            max_rollbacks=max_rollbacks,
            spike_check_interval=spike_check_interval,
            metric=metric,
            window=window,
            warmup=warmup,
            sigma=sigma,
            lr_factor=lr_factor,
            check_interval=check_interval,
        )
        self.stage = SpikeStage(self.settings)  # the step's work; registered with the run's guard
        # Healthy values restored from a checkpoint, handed to the detector at the start of training.
        self.detector_window: list[float] = []
        self._cut_optimizer: weakref.ref | None = None  # the optimizer whose LR carries lr_scale

    # ---- configuration -------------------------------------------------------------------------

    def attributes(self) -> dict:
        window = self.stage.window()
        return {
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "detector_window": self.detector_window if window is None else window,
        }

    # ---- trainer events ------------------------------------------------------------------------

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, model=None, optimizer=None,
                       lr_scheduler=None, **kwargs):
        refuse_for_callback(self, args, model)
        carried_scale = self.lr_scale
        self.begin_run(args, state, model)  # a second train() of this object starts fresh: lr_scale 1 again
        inner = unwrap_optimizer(optimizer)
        if self.lr_scale != carried_scale and self._cut_optimizer is not None and self._cut_optimizer() is inner:
            scale_learning_rate(optimizer, lr_scheduler, self.lr_scale / carried_scale)  # Trainer kept it: undo
        self._cut_optimizer = None if inner is None else weakref.ref(inner)  # carries lr_scale from here on
        self.guard_checkpoint_writes()
        self.stage.settings = self.settings  # this run's, resolved by begin_run
        self.stage.begin(args, state, model, optimizer, lr_scheduler, self.detector_window)
        self.detector_window = []
        self.register_stage("spike", state, model, self.stage)

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        """Judge what is still buffered before an epoch-strategy checkpoint."""
        self.stage.check_at_epoch_end(StepRecord(state.global_step, args, state, control, model, optimizer,
                                                 lr_scheduler))
        return control

    def on_save(self, args, state, control, **kwargs):
        self.stage.checkpoint_saved(args, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.stage.end()
        if model is not None:
            StepSignals.for_model(model).close()
        super().on_train_end(args, state, control, model=model, **kwargs)

    def judge_nonfinite_checkpoint(self, args, state, control, model, optimizer, lr_scheduler) -> None:
        self.stage.judge_nonfinite_checkpoint(StepRecord(state.global_step, args, state, control, model, optimizer,
                                                         lr_scheduler))
