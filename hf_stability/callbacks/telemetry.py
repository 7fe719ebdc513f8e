"""`LossScaleTelemetryCallback`: loss scale, skip/rollback counts and fp16 pressure in the training logs.

The measuring is its stage's (`hf_stability.step.telemetry.TelemetryStage`); the callback owns it: the settings,
the hand-off of Trainer's events to the run's `StepGuard`, and how the metrics reach the loggers under a plain
`Trainer` (``attach``).
"""

from __future__ import annotations

from transformers import Trainer

from hf_stability._logging import get_logger
from hf_stability.callbacks.guarded import GuardedStep
from hf_stability.callbacks.order import find_callback, keep_in_priority_order
from hf_stability.callbacks.resume import ConfiguredCallback
from hf_stability.engines import refuse_for_callback
from hf_stability.settings import TelemetrySettings
from hf_stability.step.telemetry import TelemetryStage

logger = get_logger(__name__)


class LossScaleTelemetryCallback(GuardedStep, ConfiguredCallback):
    """Adds ``stability/*`` metrics to every training log entry.

    Logged keys: ``stability/skipped_steps``, ``stability/nonfinite_loss_steps`` and
    ``stability/underflow_steps`` (steps with an fp16 loss scale under 1 or all-zero gradients; when a
    `SkipNonFiniteCallback` runs), ``stability/rollbacks`` (cumulative, 0 without a
    `SpikeRollbackCallback`), ``stability/loss_scale`` (when a grad scaler is active), and on
    logging steps with ``log_fp16_pressure``: ``stability/fp16_underflow_fraction`` (share of nonzero
    gradient elements with ``|g * scale| < 2**-24``, lost if the backward ran in fp16; a gradient tensor that is
    all exactly zero counts as flushed, all its elements underflowed) and
    ``stability/fp16_headroom_log2`` (``log2(65504 / max|g * scale|)``; below 0 means overflow). Without
    a scaler the scale is 1, which tells how fp16 would fare. With ``log_layer_grad_norms``:
    ``stability/grad_norm/<parameter name>`` per parameter tensor.

    What is measured is its stage's (:attr:`stage`, `TelemetryStage`); the counts are the skip and spike stages'
    own, all read together from the run's `StepGuard` (`StepGuard.metrics`, one device-to-host read per entry).

    How the metrics reach the loggers: `StabilityTrainer` merges them in its ``log()`` override, so
    ``log_history``, W&B, TensorBoard and the console all get them. With a plain `Trainer`, call
    ``LossScaleTelemetryCallback.attach(trainer)``: it keeps the stability callbacks in priority order ahead of the
    reporting callbacks (`hf_stability.callbacks.order`), and the first of their ``on_log`` adds the metrics to
    ``logs`` (which W&B/TensorBoard receive next) and to ``state.log_history[-1]``. A callback passed as
    ``Trainer(callbacks=[...])`` without ``attach`` sits behind the reporting callbacks: it still fills
    ``log_history`` and the console (``stability/rollbacks`` only with a `SpikeRollbackCallback`), and warns once.

    The callback keeps no state of its own across steps (counts live in the skip and rollback stages), so it is
    not an `ExportableState` and survives Trainer's callback restore unchanged.

    Args (``None``: the `StabilityConfig` field of the same name in the trainer's ``args``, else the default):
        log_fp16_pressure: log fp16 underflow fraction and overflow headroom on logging steps (default True).
        log_layer_grad_norms: log the gradient norm of every parameter tensor on logging steps (default False).

    Example:
        ```python
        trainer = Trainer(model, args, train_dataset=data, callbacks=[SkipNonFiniteCallback()])
        LossScaleTelemetryCallback.attach(trainer)
        ```
    """

    settings_class = TelemetrySettings
    settings: TelemetrySettings
    priority = 100  # list position only (hf_stability.callbacks.order); the step's order is `StepGuard`'s

    def __init__(self, log_fp16_pressure: bool | None = None, log_layer_grad_norms: bool | None = None) -> None:
        super().__init__(log_fp16_pressure=log_fp16_pressure, log_layer_grad_norms=log_layer_grad_norms)
        self.stage = TelemetryStage(self.settings)
        self._unbound_warned = False

    @classmethod
    def attach(cls, trainer: Trainer, **kwargs: bool) -> LossScaleTelemetryCallback:
        """Bind to ``trainer`` and keep its stability callbacks in priority order, ahead of the loggers.

        Reuses a `LossScaleTelemetryCallback` already in the trainer (``kwargs`` then must be empty). The order
        also holds after Trainer's callback restore on ``resume_from_checkpoint``.
        """
        callback = find_callback(trainer.callback_handler.callbacks, cls)
        if callback is None:
            callback = cls(**kwargs)
            trainer.callback_handler.callbacks.append(callback)
        elif kwargs:
            raise TypeError(f"`attach`: the trainer already has a {cls.__name__}; got options {sorted(kwargs)}")
        keep_in_priority_order(trainer)
        callback.bind()
        return callback

    @property
    def log_fp16_pressure(self) -> bool:
        return self.settings.log_fp16_pressure

    @property
    def log_layer_grad_norms(self) -> bool:
        return self.settings.log_layer_grad_norms

    def bind(self) -> None:
        """The trainer keeps the stability callbacks ahead of its loggers (``attach``, `StabilityTrainer`): log
        the run's counts too (``stability/rollbacks`` 0 without a `SpikeRollbackCallback`)."""
        self.stage.logs_run_counts = True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_for_callback(self, args, model)
        self.configure(args)
        self.stage.begin_run(self.settings, optimizer)
        self.register_stage("telemetry", state, model, self.stage)
        if not self.stage.logs_run_counts and not self._unbound_warned:
            self._unbound_warned = True
            logger.warning(
                "LossScaleTelemetryCallback is not attached to its Trainer: W&B/TensorBoard do not receive stability "
                "metrics and no rollback count is logged without a SpikeRollbackCallback. Use "
                "LossScaleTelemetryCallback.attach(trainer)."
            )

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        """Plain-Trainer path: the run's metrics into the training log entry (`GuardedStep.log_step_metrics`)."""
        self.log_step_metrics(state, logs, model)
