"""`AdaptiveClipCallback`: z-score gradient clipping in the style of ZClip (arXiv 2504.02507).

A fixed ``max_grad_norm`` is blind to a burst that stays below it: a step whose gradient norm is ten
times the usual is applied in full as long as it is under the threshold. ZClip judges each step against
the run's own recent norms instead: an exponential moving average of the norm's mean and variance gives
``bound = mean + z·σ``, and a step above the bound is rescaled to it (clipped, not skipped).

Everything happens on the device: the statistics, the bound, the rescale factor (exactly 1.0 when the
step is below the bound, so such steps are bit-for-bit untouched) and the clipped-step counter are
tensors, and no value is read to the host per step. Metrics are read once per log entry.
"""

from __future__ import annotations

import math

import torch

from hf_stability import metric_names as names
from hf_stability._compat import foreach_mul_
from hf_stability._logging import get_logger
from hf_stability.callbacks.guarded import GuardedStep
from hf_stability.callbacks.resume import ResumableCallback, stored_count, stored_number
from hf_stability.engines import refuse_for_callback
from hf_stability.settings import AdaptiveClipSettings
from hf_stability.step.channel import global_grad_norm, gradients
from hf_stability.step.guard import StepRecord

logger = get_logger(__name__)


class AdaptiveClipCallback(GuardedStep, ResumableCallback):
    """Clip each step's gradient norm to ``mean + z·σ`` of an EMA of the recent (healthy) norms.

    Its stage runs before the update (`StepGuard.before_update`), after the skip stage has decided (gradients
    already unscaled in fp16, already clipped by Trainer's ``max_grad_norm``):

    - The statistics follow the pre-clip norm (Trainer's own, shared by `StabilityTrainer`; with a plain
      `Trainer`, the norm of the gradients as they arrive). The first ``adaptive_clip_warmup`` healthy steps only
      build them (plain mean and variance); afterwards each step updates them with weight ``1 - alpha`` (mean
      ``m += w·(x - m)``, variance ``v = (1 - w)·(v + w·(x - m_old)²)``), feeding in the norm *after* the
      adaptive clip so that a burst does not inflate its own bound.
    - After the warm-up, gradients whose norm (after ``max_grad_norm``) exceeds the bound are rescaled to
      it. Both clips apply; the tighter one wins: ``max_grad_norm`` first (Trainer), then the bound.
    - A skipped step (non-finite norm, or skipped by `SkipNonFiniteCallback`, decided on the host or still
      pending on device in fp16) changes neither the statistics nor the gradients.

    Under DDP the gradients are already all-reduced, so every rank computes the same bound and decision.
    Statistics and the clipped-step count are exported with checkpoints (`ResumableCallback`). They are not
    part of rollback snapshots: after a rollback they keep describing the norms seen so far.

    Logged (``metrics()``, merged by `StabilityTrainer.log`): ``stability/zclip_bound`` (the bound the next
    step is judged against, applied only after the warm-up) and ``stability/zclip_clipped_steps``
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
        # Host copies, exported with checkpoints; the live values are the device tensors below.
        self.mean, self.var, self.healthy_steps, self.clipped_steps = 0.0, 0.0, 0, 0
        self._stats: torch.Tensor | None = None  # [mean, var, healthy_steps, clipped_steps] on the gradients' device
        self._clipped_norm_warned = False
        self._merged = False  # `StabilityTrainer.log` merged the metrics into the entry being logged

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
        self._sync_to_host()
        return {
            "mean": self.mean,
            "var": self.var,
            "healthy_steps": self.healthy_steps,
            "clipped_steps": self.clipped_steps,
        }

    def _sync_to_host(self) -> None:
        if self._stats is not None:
            mean, var, healthy, clipped = self._stats.tolist()  # checkpoint/train end only
            self.mean, self.var, self.healthy_steps, self.clipped_steps = mean, var, int(healthy), int(clipped)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_for_callback(self, args, model)
        self.begin_run(args, state, model)
        self.register_stage("clip", state, model)
        self._stats = None  # rebuilt from the host values (restored from a checkpoint, or 0) at the first step

    def on_train_end(self, args, state, control, **kwargs):
        self._sync_to_host()
        super().on_train_end(args, state, control, **kwargs)

    def bound(self, stats: torch.Tensor | None = None) -> torch.Tensor:
        """``mean + z·σ`` of the current statistics (a 0-d tensor)."""
        stats = self._stats if stats is None else stats
        if stats is None:
            return torch.tensor(self.mean + self.z * math.sqrt(self.var))
        return stats[0] + self.z * stats[1].clamp_min(0).sqrt()

    def before_update(self, record: StepRecord) -> None:
        """Rescale the gradients of a real update above the bound; learn from the step's pre-clip norm."""
        grads = gradients(record.model.parameters())
        skipped = record.skip
        if not grads or skipped is True:
            return  # a skip decided on the host: nothing to clip, nothing to learn from
        norm = global_grad_norm(grads)  # what the optimizer is about to apply (after max_grad_norm)
        device = norm.device
        if self._stats is None:
            host = [self.mean, self.var, float(self.healthy_steps), float(self.clipped_steps)]
            self._stats = torch.tensor(host, dtype=torch.float32, device=device)
        mean, var, healthy_steps, clipped_steps = self._stats.unbind()
        pre_clip = record.pre_clip_norm()
        if pre_clip is None:
            self._warn_clipped_norm(record.args)
        raw = norm if pre_clip is None else pre_clip.detach().float().reshape(()).to(device)
        healthy = torch.isfinite(raw) & torch.isfinite(norm)
        if isinstance(skipped, torch.Tensor):  # fp16 decision still on device
            healthy = healthy & ~skipped.to(device)
        bound = self.bound(self._stats)
        active = healthy & (healthy_steps >= self.warmup)
        clip = active & (norm > bound)
        factor = torch.where(clip, bound / norm.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(norm))
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        for (grad_device, dtype), group in by_kind.items():  # x * 1.0 == x exactly: unclipped steps untouched
            foreach_mul_(group, factor.to(grad_device, dtype))
        value = torch.where(active, torch.minimum(raw, bound), raw)
        weight = torch.where(healthy_steps < self.warmup, 1.0 / (healthy_steps + 1), 1.0 - self.alpha)
        delta = torch.where(healthy, value - mean, torch.zeros_like(mean))
        new_mean = mean + weight * delta
        new_var = (1 - weight) * (var + weight * delta * delta)
        self._stats = torch.stack(
            [
                torch.where(healthy, new_mean, mean),
                torch.where(healthy, new_var, var),
                healthy_steps + healthy.float(),
                clipped_steps + clip.float(),
            ]
        )

    def _warn_clipped_norm(self, args) -> None:
        """Once: without the pre-clip norm the statistics follow norms `max_grad_norm` already capped."""
        if self._clipped_norm_warned or not getattr(args, "max_grad_norm", 0) > 0:
            return
        self._clipped_norm_warned = True
        logger.warning(
            f"AdaptiveClipCallback under a trainer that does not share the pre-clip gradient norm, with "
            f"max_grad_norm={args.max_grad_norm}: its statistics follow the clipped norms, which sit at the clip and "
            "leave it nothing to learn. Use StabilityTrainer, or max_grad_norm=0 to let the adaptive bound clip alone."
        )

    def metrics(self) -> dict[str, float]:
        """The bound and the clipped-step count for a log entry (one device-to-host read)."""
        if self._stats is None:
            bound, clipped = self.bound().item(), float(self.clipped_steps)
        else:
            bound, clipped = torch.stack([self.bound(), self._stats[3]]).tolist()
        return {names.ZCLIP_BOUND: bound, names.ZCLIP_CLIPPED_STEPS: int(clipped)}

    def merge_into(self, logs: dict[str, float]) -> None:
        """Add the metrics to a training log entry before the loggers see it (`StabilityTrainer.log`)."""
        logs.update(self.metrics())
        self._merged = True  # this entry's on_log adds nothing

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Plain-Trainer path: add the metrics to the training log entry (StabilityTrainer merges them in ``log``)."""
        if logs is None or "loss" not in logs:
            return
        if self._merged:
            self._merged = False
            return
        metrics = self.metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
