"""`AdaptiveClipCallback`: z-score gradient clipping in the style of ZClip (arXiv 2504.02507), as a `TrainerCallback`.

The work is its stage's (`hf_stability.step.clip.AdaptiveClipStage`); the callback owns it: the settings (constructor
keywords, their older names, the `StabilityConfig` fields), the statistics exported with checkpoints, and the
hand-off of Trainer's events to the run's `StepGuard`.
"""

from __future__ import annotations

from hf_stability.callbacks.guarded import GuardedStep
from hf_stability.callbacks.resume import ResumableCallback, stored_count, stored_number
from hf_stability.engines import refuse_for_callback
from hf_stability.settings import AdaptiveClipSettings
from hf_stability.step.clip import AdaptiveClipStage


class _Statistic:
    """One of the stage's statistics, under the name checkpoints store it (Trainer restores it with ``setattr``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, callback: AdaptiveClipCallback | None, owner: type | None = None):
        return self if callback is None else getattr(callback.stage, self.name)

    def __set__(self, callback: AdaptiveClipCallback, value: float | int) -> None:
        callback.stage.set_statistic(self.name, value)


class AdaptiveClipCallback(GuardedStep, ResumableCallback):
    """Clip each step's gradient norm to ``mean + z·σ`` of an EMA of the recent (healthy) norms.

    Its stage (:attr:`stage`, `AdaptiveClipStage`) runs before the update (`StepGuard.before_update`), after the
    skip stage has decided (gradients already unscaled in fp16, already clipped by Trainer's ``max_grad_norm``):

    - The statistics follow the pre-clip norm (Trainer's own, shared by `StabilityTrainer`; with a plain
      `Trainer`, the norm of the gradients as they arrive). The first ``adaptive_clip_warmup`` healthy steps only
      build them; afterwards each step updates them with weight ``1 - alpha``, feeding in the norm *after* the
      adaptive clip so that a burst does not inflate its own bound.
    - After the warm-up, gradients whose norm (after ``max_grad_norm``) exceeds the bound are rescaled to
      it. Both clips apply; the tighter one wins: ``max_grad_norm`` first (Trainer), then the bound.
    - A skipped step (non-finite norm, or skipped by `SkipNonFiniteCallback`, decided on the host or still
      pending on device in fp16) changes neither the statistics nor the gradients.

    Under DDP the gradients are already all-reduced, so every rank computes the same bound and decision.
    Statistics and the clipped-step count are exported with checkpoints (`ResumableCallback`). They are not
    part of rollback snapshots: after a rollback they keep describing the norms seen so far.

    Logged (the stage's metrics, read with the other stages' by `StepGuard.metrics`; merged by
    `StabilityTrainer.log`, or by ``on_log`` under a plain `Trainer`): ``stability/zclip_bound`` (the bound the
    next step is judged against, applied only after the warm-up) and ``stability/zclip_clipped_steps``
    (cumulative number of steps rescaled).

    Settings (`AdaptiveClipSettings`) left ``None`` are read from the `StabilityConfig` field of the same name
    when the trainer's ``args`` is one, else take its default; the ones given for a resumed run win over the
    checkpoint's.

    Args:
        adaptive_clip_z: z-score threshold; a norm above ``mean + z·σ`` is clipped [2.5].
        adaptive_clip_alpha: EMA decay of mean and variance (the weight of the past) [0.97].
        adaptive_clip_warmup: healthy steps that only build the statistics before clipping starts [25].
        z, alpha, warmup: their older names, still accepted (checkpoints of earlier versions store them).

    Example:
        ```python
        trainer = Trainer(model, args, train_dataset=data, callbacks=[AdaptiveClipCallback(adaptive_clip_z=2.5)])
        ```
    """

    settings_class = AdaptiveClipSettings
    settings: AdaptiveClipSettings
    aliases = {"z": "adaptive_clip_z", "alpha": "adaptive_clip_alpha", "warmup": "adaptive_clip_warmup"}
    priority = 300  # list position only (hf_stability.callbacks.order); the step's order is `StepGuard`'s
    stored_attributes = {
        "mean": stored_number, "var": stored_number, "healthy_steps": stored_count, "clipped_steps": stored_count
    }
    mean = _Statistic()
    var = _Statistic()
    healthy_steps = _Statistic()
    clipped_steps = _Statistic()

    def __init__(
        self,
        adaptive_clip_z: float | None = None,
        adaptive_clip_alpha: float | None = None,
        adaptive_clip_warmup: int | None = None,
        *,
        z: float | None = None,
        alpha: float | None = None,
        warmup: int | None = None,
    ) -> None:
        super().__init__(adaptive_clip_z=adaptive_clip_z, adaptive_clip_alpha=adaptive_clip_alpha,
                         adaptive_clip_warmup=adaptive_clip_warmup, z=z, alpha=alpha, warmup=warmup)
        self.stage = AdaptiveClipStage(self.settings)

    @property
    def z(self) -> float:
        return self.settings.adaptive_clip_z

    @property
    def alpha(self) -> float:
        return self.settings.adaptive_clip_alpha

    @property
    def warmup(self) -> int:
        return self.settings.adaptive_clip_warmup

    def attributes(self) -> dict:
        return self.stage.host_statistics()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_for_callback(self, args, model)
        self.begin_run(args, state, model)
        self.stage.begin_run(self.settings)
        self.register_stage("clip", state, model, self.stage)

    def on_train_end(self, args, state, control, **kwargs):
        self.stage.host_statistics()
        super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        """Plain-Trainer path: the run's metrics into the training log entry (`GuardedStep.log_step_metrics`)."""
        self.log_step_metrics(state, logs, model)
