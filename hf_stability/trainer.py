"""`StabilityTrainer`: a `Trainer` that installs the stability callbacks its config asks for and logs their metrics."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_stability._compat import check_trainer_hooks, output_dir, warn_untested_versions
from hf_stability._logging import get_logger
from hf_stability.alerts import AlertHook, StabilityAlerts, publish_diagnosis, uses_wandb
from hf_stability.batch_ramp import BatchRampMixin
from hf_stability.callbacks.adaptive_clip import AdaptiveClipCallback
from hf_stability.callbacks.deepspeed_telemetry import DeepSpeedSkipTelemetryCallback
from hf_stability.callbacks.order import find_callback, keep_in_priority_order
from hf_stability.callbacks.resume import check_stored_state, end_run, resume_checkpoint
from hf_stability.callbacks.rollback import SpikeRollbackCallback
from hf_stability.callbacks.save_guard import guard_checkpoint_writes
from hf_stability.callbacks.skip import SkipNonFiniteCallback
from hf_stability.callbacks.telemetry import LossScaleTelemetryCallback
from hf_stability.config import StabilityConfig
from hf_stability.engines import deepspeed_enabled, refuse_protections
from hf_stability.events import add_listener
from hf_stability.exclude import ExcludeSamplesMixin
from hf_stability.samples import (
    DATASET_INDEX,
    LossFunction,
    ReplayFunction,
    SampleRecord,
    per_sample_losses,
    pop_sample_indices,
    replay_step,
)
from hf_stability.settings import AlertSettings, ForensicsSettings
from hf_stability.step.channel import StepSignals, completing_step

logger = get_logger(__name__)

_TRAINING_ARGUMENT_NAMES = {f.name for f in dataclasses.fields(TrainingArguments)}
_STABILITY_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(StabilityConfig) if f.name not in _TRAINING_ARGUMENT_NAMES
}


def stability_option(args: TrainingArguments, name: str) -> Any:
    """A stability field of ``args``; a plain `TrainingArguments` gets the `StabilityConfig` default."""
    if name not in _STABILITY_DEFAULTS:
        raise ValueError(f"`name`: {name!r} is not a StabilityConfig field")
    return getattr(args, name, _STABILITY_DEFAULTS[name])


def stability_callbacks(args: TrainingArguments) -> list[TrainerCallback]:
    """The stability callbacks ``args`` asks for (they run in ``priority`` order: `hf_stability.callbacks.order`).

    Each callback reads its own settings from ``args`` (`hf_stability.settings`), so only the on/off
    switches are looked at here.
    """
    switches = [
        ("skip_nonfinite", SkipNonFiniteCallback),
        ("adaptive_clip", AdaptiveClipCallback),
        ("spike_rollback", SpikeRollbackCallback),
    ]
    callbacks: list[TrainerCallback] = [callback() for name, callback in switches if stability_option(args, name)]
    if deepspeed_enabled(args):  # the engine skips non-finite steps itself (hf_stability.deepspeed): report those
        skip = stability_option(args, "skip_nonfinite")
        kept = [callback for callback in callbacks if not isinstance(callback, SkipNonFiniteCallback)]
        return [*kept, DeepSpeedSkipTelemetryCallback(require_skip=skip)]
    return [*callbacks, LossScaleTelemetryCallback()]


def _upstream_trainer(cls: type, stability_trainer: type) -> type:
    """The class whose methods `StabilityTrainer`'s overrides extend: the first `Trainer` after ``stability_trainer``
    (the class itself, not the module's name for it, which a script may rebind to a subclass) in ``cls``'s MRO
    (transformers' own, unless a subclass mixes another `Trainer` subclass in)."""
    mro = cls.__mro__
    return next(base for base in mro[mro.index(stability_trainer) + 1 :] if issubclass(base, Trainer))


class StabilityTrainer(ExcludeSamplesMixin, BatchRampMixin, Trainer):
    """`Trainer` plus non-finite step skipping, spike rollback and stability telemetry, configured by `args`.

    Pass ``args=StabilityConfig(...)``; everything else is `Trainer`'s. A plain `TrainingArguments`
    works too and gets the `StabilityConfig` defaults for the stability fields (it keeps its own
    ``restore_callback_states_from_checkpoint=False``, so counters then do not survive a resume — a
    warning says so). The stability callbacks go right after `DefaultFlowCallback`, ahead of the
    reporting and user callbacks, in the order of their ``priority`` (`hf_stability.callbacks.order`; it also
    holds after ``resume_from_checkpoint``, where Trainer re-creates the stateful callbacks and appends them at
    the end); a type the caller already passed in ``callbacks`` is not added again.

    The callbacks read the step's loss, pre-clip gradient norm and skip decision from one `StepSignals`
    (``self.step_signals``, theirs while this trainer trains, even when another trainer shares the model), which
    this trainer feeds: the loss Trainer optimises (the return of the ``training_step`` Trainer calls, also a
    subclass's override that does not call ``super()``, with ``label_smoothing_factor`` or ``compute_loss_func``)
    and Trainer's own gradient norm before clipping.

    Every checkpoint write (the ``_save_checkpoint`` Trainer calls, whoever set ``should_save`` or overrides it) is
    judged first, and ``save_model`` refuses non-finite weights (`hf_stability.callbacks.save_guard`). A second
    ``train()`` without ``resume_from_checkpoint`` is a fresh run, as Trainer's state is: counters, rollback budget
    and LR cut restart.

    With ``batch_ramp_start > 0`` the global batch grows step by step (`hf_stability.batch_ramp`); with
    ``exclude_samples`` the train dataloader leaves the listed samples out (`hf_stability.exclude`).

    ``log()`` merges the ``stability/*`` metrics of the run's stages (`StepGuard.metrics`, one device-to-host read)
    into every training log entry before `Trainer` records it, so ``log_history``, W&B and TensorBoard receive
    them (keys in `hf_stability.metric_names`).

    Construction raises `hf_stability._compat.UpstreamChangedError` (naming the supported transformers range)
    when a `Trainer` hook it overrides is gone or no longer called by Trainer's training loop.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_trainer_hooks(_upstream_trainer(type(self), __class__))  # type: ignore[name-defined]  # the cell super() uses
        warn_untested_versions()
        super().__init__(*args, **kwargs)
        self._build_batch_ramp()
        # Registered for the model the callbacks receive while this trainer trains (`train`).
        self.step_signals = StepSignals()
        # The samples of the recent steps, named by the stability events (`hf_stability.samples`).
        loss_fn, replay_fn = self._forensics_functions()
        self.step_signals.samples = self.sample_record = SampleRecord(DATASET_INDEX, loss_fn, replay_fn)
        self.step_signals.engine = lambda: self.model_wrapped  # the DeepSpeed engine, once `train()` created it
        # The loss fed is the return of the `training_step` Trainer calls: a subclass's override, with or without
        # super(), cannot bypass it (it would leave loss-based rollback judging nothing).
        self.training_step = self._feeding_loss(self.training_step)  # type: ignore[method-assign]
        guard_checkpoint_writes(self)  # likewise every checkpoint write, whoever overrides `_save_checkpoint`
        self.alert_hooks: list[AlertHook] = []
        keep_in_priority_order(self)
        callbacks = self.callback_handler.callbacks
        for callback in stability_callbacks(self.args):
            if find_callback(callbacks, type(callback)) is None:
                callbacks.append(callback)
                # Trainer's on_init_end has run already; it records the settings a resume must keep.
                callback.on_init_end(self.args, self.state, self.control, model=self.model)
        telemetry = find_callback(callbacks, LossScaleTelemetryCallback)
        if telemetry is not None:  # stability_callbacks adds one (not under DeepSpeed) unless the caller passed it
            telemetry.bind()
        stability_types = (
            SkipNonFiniteCallback,
            AdaptiveClipCallback,
            SpikeRollbackCallback,
            LossScaleTelemetryCallback,
        )
        protections = [type(callback).__name__ for callback in callbacks if isinstance(callback, stability_types)]
        if self.batch_ramp is not None:  # placeholder micro-batches would break the engine's accumulation count
            protections.append("batch_ramp")
        refuse_protections(protections, self.args, self.model)
        if not isinstance(self.args, StabilityConfig) and not self.args.restore_callback_states_from_checkpoint:
            logger.warning(
                "StabilityTrainer got TrainingArguments with restore_callback_states_from_checkpoint=False: skip and "
                "rollback counters restart from 0 after resume_from_checkpoint. Use StabilityConfig or set it True."
            )

    def on_stability_event(self, hook: AlertHook) -> None:
        """Call ``hook(alert)`` (a `hf_stability.alerts.StabilityAlert`) on the events named in ``stability_alerts``,
        on the main process, rate-limited: a Slack or PagerDuty notifier needs no fork."""
        if not AlertSettings.resolve({}, self.args).event_names:
            raise ValueError("`on_stability_event`: `stability_alerts` is empty; name the events that alert, e.g. "
                             "'stop,rollback,skip_burst'.")
        self.alert_hooks.append(hook)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, after checking the stability state stored in the checkpoint resumed from.

        When it raises, the rollback snapshots (up to GBs on disk) are removed first, held events are written and
        the output directory's run lock is released. On the main process it raises the alerts ``stability_alerts``
        asks for while training, and puts the doctor's diagnosis into the W&B run summary when training ends
        (`hf_stability.alerts`).
        """
        checkpoint = resume_checkpoint(resume_from_checkpoint, output_dir(self.args))
        if checkpoint is not None and self.args.restore_callback_states_from_checkpoint:
            check_stored_state(checkpoint, self.callback_handler.callbacks)
        model = self.callback_handler.model
        self.step_signals.attach(model)
        self.sample_record.clear()
        stop_listening = self._listen_for_alerts()
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
            if self.is_world_process_zero():
                publish_diagnosis(self)
            return output
        except BaseException:
            rollback = find_callback(self.callback_handler.callbacks, SpikeRollbackCallback)
            if rollback is not None:
                rollback.on_train_end(self.args, self.state, self.control)  # clears its snapshot store
            end_run(self.args, self.state)
            raise
        finally:
            self.step_signals.detach(model)
            stop_listening()

    def _listen_for_alerts(self) -> Callable[[], None]:
        """Alert on this run's events (main process, the events ``stability_alerts`` names); returns the stop."""
        settings = AlertSettings.resolve({}, self.args)
        if not settings.event_names or not self.is_world_process_zero():
            return lambda: None
        alerts = StabilityAlerts(settings, output_dir(self.args), self.alert_hooks,
                                 lambda: self.state.log_history, uses_wandb(self.args))
        return add_listener(output_dir(self.args), alerts)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training-step entry (evaluation and the final summary have other keys)
            logs.update(self.step_signals.guard.log_metrics(self.state.global_step))  # every stage's, one read
            logs.update(self.batch_ramp_metrics())
        super().log(logs, start_time)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        **details: Any,
    ) -> None:
        """Write ``<output_dir>/README.md``: `Trainer`'s hook (``push_to_hub`` calls it), with the stability section.

        `Trainer`'s arguments map to the Hub front matter (``finetuned_from`` → ``base_model``, ``dataset`` and
        ``dataset_tags`` → ``datasets``, the first of ``tasks`` → ``pipeline_tag``, instead of the objective's);
        ``details`` are `hf_stability.model_card.build_model_card` keywords (``objective``,
        ``objective_args``, ``data``, ``command``, …), which ``push_to_hub(**details)`` passes through.
        """
        if not self.is_world_process_zero():
            return
        from hf_stability.model_card import write_model_card

        def as_list(value: str | list[str] | None) -> list[str]:
            return [value] if isinstance(value, str) else list(value or [])

        dataset_config, task = as_list(dataset_args), as_list(tasks)
        write_model_card(
            self,
            model_name=model_name,
            language=language,
            license=license,
            tags=as_list(tags),
            base_model=finetuned_from,
            datasets=list(dict.fromkeys(as_list(dataset) + as_list(dataset_tags))),
            dataset_config=dataset_config[0] if dataset_config else None,
            pipeline_tag=task[0] if task else None,
            **details,
        )

    def get_train_dataloader(self) -> DataLoader:
        """Trainer's train dataloader, each item tagged with its dataset index (`hf_stability.samples`).

        Trainer builds it (sampler, workers, accelerate) from the tagged dataset and collator; its own column
        removal, which would drop the tags, is done beforehand by `tagged_training_data` instead.
        """
        if self.batch_ramp is not None or self.train_dataset is None:  # the ramp's own loader tags its items
            loader = super().get_train_dataloader()
            self.sample_record.index_kind = DATASET_INDEX
            return loader
        dataset, collator = self.tagged_training_data()
        self.sample_record.index_kind = dataset.index_kind
        kept = self.train_dataset, self.data_collator, self.args.remove_unused_columns
        self.train_dataset, self.data_collator, self.args.remove_unused_columns = dataset, collator, False
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator, self.args.remove_unused_columns = kept

    def _forensics_functions(self) -> tuple[LossFunction | None, ReplayFunction | None]:
        """The per-sample losses and the spike replay of the sample record, with the loss Trainer computes; each
        ``None`` when off (``stability_sample_losses``, ``spike_replay``) or the weights are sharded (FSDP,
        DeepSpeed: a forward needs every rank)."""
        settings = ForensicsSettings.resolve({}, self.args)
        if self.is_fsdp_enabled or deepspeed_enabled(self.args):
            return None, None

        def loss_of(inputs: dict[str, Any]) -> torch.Tensor:
            with self.compute_loss_context_manager():
                return cast(torch.Tensor, self.compute_loss(self.model, inputs))  # type: ignore[arg-type]

        def model() -> torch.nn.Module:  # the one training now (`model_init` replaces it in `train`)
            return cast(torch.nn.Module, self.model)

        def losses(inputs: Mapping[str, Any], count: int) -> torch.Tensor:
            return per_sample_losses(model(), loss_of, inputs, count)

        def replay(batches: list[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
            return replay_step(model(), loss_of, batches)

        return (losses if settings.stability_sample_losses else None,
                replay if settings.spike_replay else None)

    def _feeding_loss(self, training_step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``training_step`` whose return (the loss backpropagated and logged, per micro-batch) feeds `step_signals`.

        The model's own output has no loss when Trainer computes it (label smoothing, ``compute_loss_func``).
        The batch's sample tags are taken out first and recorded with the loss (`hf_stability.samples`).
        """

        @functools.wraps(training_step)
        def step(model, inputs, num_items_in_batch=None):
            indices = pop_sample_indices(inputs)  # the model must not see the tags
            loss = training_step(model, inputs, num_items_in_batch)
            self.step_signals.add_loss(completing_step(self.state), loss)
            if indices is not None:
                self.sample_record.add(completing_step(self.state), indices, loss, inputs)
            return loss

        return step

    # The private Trainer hooks overridden here are checked at construction (`_compat.TRAINER_HOOKS`).

    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer's gradient norm (before clipping), also shared with the callbacks through `step_signals`.

        Callbacks run after clipping and could only measure the clipped norm, blind to spikes above the clip.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None:
            self.step_signals.record_grad_norm(completing_step(self.state), grad_norm)
        return grad_norm
