"""`DeepSpeedSkipTelemetryCallback`: under DeepSpeed, report the steps the engine's own overflow check skipped.

accelerate runs ``engine.step()`` inside ``backward`` (SPEC §5), so no callback can skip a DeepSpeed step; the
engine skips non-finite steps itself where its check exists (`hf_stability.deepspeed.overflow_skip`, measured
bit-exact on every rank for ZeRO-1/2/3 in fp32 and bf16) but says nothing a run's logs keep (DeepSpeed issue
8415). This callback makes those skips visible: a ``skip`` event per skipped step in
``stability_events.jsonl`` (the file ``hf-stability report`` and the model card read) and
``stability/skipped_steps`` in each training log entry (``log_history``; Trainer itself logs the engine's global
``grad_norm``, inf on a skipped step). Where DeepSpeed would not skip or that is not measured — fp16 included
(not runnable on the CPU accelerator, so no loss scale is reported yet) — it warns in one line naming the
setting, or refuses with ``require_skip=True`` (`StabilityTrainer` sets it from ``skip_nonfinite``). The work is its
stage's (`hf_stability.step.deepspeed_skip.DeepSpeedSkipStage`, the run's ``skip`` stage).
"""

from __future__ import annotations

from transformers import TrainerCallback

from hf_stability._logging import get_logger
from hf_stability.callbacks.guarded import GuardedStep
from hf_stability.deepspeed import active_deepspeed_config, overflow_skip
from hf_stability.engines import UnsupportedEngineError, deepspeed_enabled
from hf_stability.events import StabilityEventLog
from hf_stability.step.deepspeed_skip import DeepSpeedSkipStage

logger = get_logger(__name__)

MEASURED = "DeepSpeed's own overflow skip"


class DeepSpeedSkipTelemetryCallback(GuardedStep, TrainerCallback):
    """Counts and logs the steps DeepSpeed skipped (``optimizer.step_was_skipped``: the engine's overflow flag,
    the same on every rank, read from a host attribute: no device sync). Use with a plain `Trainer` under
    DeepSpeed (`StabilityTrainer` installs it there); of the other hf-stability callbacks only spike rollback runs
    under DeepSpeed."""

    priority = 400  # where SkipNonFiniteCallback sits (list position only); the engine's decision is the skip stage

    def __init__(self, require_skip: bool = False) -> None:
        self.require_skip = require_skip
        self.stage = DeepSpeedSkipStage()

    @property
    def skipped_steps(self) -> int:
        return self.stage.skipped_steps

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        config = active_deepspeed_config(args) if deepspeed_enabled(args) else None
        if config is None:
            raise UnsupportedEngineError(
                "`deepspeed`: DeepSpeedSkipTelemetryCallback reports DeepSpeed's own skips and needs a DeepSpeed run; "
                "use SkipNonFiniteCallback and LossScaleTelemetryCallback elsewhere."
            )
        verdict = overflow_skip(config, args)
        if not verdict.startswith(MEASURED):
            if self.require_skip:
                raise UnsupportedEngineError(f"`deepspeed`: `skip_nonfinite` cannot be honoured: {verdict}.")
            logger.warning(f"DeepSpeed: non-finite steps are not skipped: {verdict}.")
        self.stage.begin_run(optimizer, StabilityEventLog(args.output_dir) if state.is_world_process_zero else None)
        if kwargs.get("model") is not None:
            self.register_stage("skip", state, kwargs["model"], self.stage)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        """Report the engine's skip, then hand the event to the guard (the spike check comes after the report)."""
        self.stage.report(state.global_step)
        super().on_step_end(args, state, control, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        """With a plain `Trainer`: the run's metrics into ``logs`` and ``log_history`` (`StabilityTrainer.log` merges
        them before; `GuardedStep.log_step_metrics`)."""
        self.log_step_metrics(state, logs, model)
