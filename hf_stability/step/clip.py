"""`AdaptiveClipStage`: z-score gradient clipping in the style of ZClip (arXiv 2504.02507), the guard's ``clip`` stage.

A fixed ``max_grad_norm`` is blind to a burst that stays below it: a step whose gradient norm is ten
times the usual is applied in full as long as it is under the threshold. ZClip judges each step against
the run's own recent norms instead: an exponential moving average of the norm's mean and variance gives
``bound = mean + z·σ``, and a step above the bound is rescaled to it (clipped, not skipped).

Everything happens on the device: the statistics, the bound, the rescale factor (exactly 1.0 when the
step is below the bound, so such steps are bit-for-bit untouched) and the clipped-step counter are
tensors, and no value is read to the host per step. Its metrics are device values, read with the other
stages' in one read (`StepGuard.metrics`). `hf_stability.callbacks.AdaptiveClipCallback` is its facade.
"""

from __future__ import annotations

import math

import torch

from hf_stability import metric_names as names
from hf_stability._compat import foreach_mul_
from hf_stability._logging import get_logger
from hf_stability.settings import AdaptiveClipSettings
from hf_stability.step.channel import global_grad_norm, gradients
from hf_stability.step.guard import Metric, StageHooks, StepRecord

logger = get_logger(__name__)

STATISTICS = ("mean", "var", "healthy_steps", "clipped_steps")


class AdaptiveClipStage(StageHooks):
    """Clip each step's gradient norm to ``mean + z·σ`` of an EMA of the recent (healthy) norms.

    It runs before the update (`StepGuard.before_update`), after the skip stage has decided (gradients
    already unscaled in fp16, already clipped by Trainer's ``max_grad_norm``):

    - The statistics follow the pre-clip norm (``record.pre_clip_norm()``: Trainer's own under `StabilityTrainer`;
      otherwise the norm of the gradients as they arrive). The first ``adaptive_clip_warmup`` healthy steps only
      build them (plain mean and variance); afterwards each step updates them with weight ``1 - alpha`` (mean
      ``m += w·(x - m)``, variance ``v = (1 - w)·(v + w·(x - m_old)²)``), feeding in the norm *after* the
      adaptive clip so that a burst does not inflate its own bound.
    - After the warm-up, gradients whose norm (after ``max_grad_norm``) exceeds the bound are rescaled to
      it. Both clips apply; the tighter one wins: ``max_grad_norm`` first (Trainer), then the bound.
    - A skipped step (``record.skip``: decided on the host, or still pending on device in fp16) changes
      neither the statistics nor the gradients.

    The live statistics are one device tensor; :attr:`mean`, :attr:`var`, :attr:`healthy_steps` and
    :attr:`clipped_steps` are their host copies (what checkpoints store): :meth:`host_statistics` reads them
    back, and :meth:`set_statistic` (a restore) makes the next step start from the host values.
    """

    def __init__(self, settings: AdaptiveClipSettings) -> None:
        self.settings = settings
        self.mean, self.var, self.healthy_steps, self.clipped_steps = 0.0, 0.0, 0, 0
        self.stats: torch.Tensor | None = None  # [mean, var, healthy_steps, clipped_steps] on the gradients' device
        self._clipped_norm_warned = False

    def begin_run(self, settings: AdaptiveClipSettings) -> None:
        """This run's settings; the statistics restart from the host values (restored from a checkpoint, or 0)."""
        self.host_statistics()
        self.settings, self.stats = settings, None

    def host_statistics(self) -> dict[str, float | int]:
        """The statistics as host numbers (one read when the device copy is live): checkpoint and train end only."""
        if self.stats is not None:
            mean, var, healthy, clipped = self.stats.tolist()
            self.mean, self.var, self.healthy_steps, self.clipped_steps = mean, var, int(healthy), int(clipped)
        return {name: getattr(self, name) for name in STATISTICS}

    def set_statistic(self, name: str, value: float | int) -> None:
        """Set one host value (a restore, a new run): the next step rebuilds the device copy from the host values."""
        if name not in STATISTICS:
            raise AttributeError(f"`{name}`: not one of the statistics {STATISTICS}")
        self.host_statistics()
        setattr(self, name, value)
        self.stats = None

    def bound(self, stats: torch.Tensor | None = None) -> torch.Tensor:
        """``mean + z·σ`` of the current statistics (a 0-d tensor)."""
        stats = self.stats if stats is None else stats
        if stats is None:
            return torch.tensor(self.mean + self.settings.adaptive_clip_z * math.sqrt(self.var))
        return stats[0] + self.settings.adaptive_clip_z * stats[1].clamp_min(0).sqrt()

    def before_update(self, record: StepRecord) -> None:
        """Rescale the gradients of a real update above the bound; learn from the step's pre-clip norm."""
        grads = gradients(record.model.parameters())
        skipped = record.skip
        if not grads or skipped is True:
            return  # a skip decided on the host: nothing to clip, nothing to learn from
        warmup, alpha = self.settings.adaptive_clip_warmup, self.settings.adaptive_clip_alpha
        norm = global_grad_norm(grads)  # what the optimizer is about to apply (after max_grad_norm)
        device = norm.device
        if self.stats is None:
            host = [self.mean, self.var, float(self.healthy_steps), float(self.clipped_steps)]
            self.stats = torch.tensor(host, dtype=torch.float32, device=device)
        mean, var, healthy_steps, clipped_steps = self.stats.unbind()
        pre_clip = record.pre_clip_norm()
        if pre_clip is None:
            self._warn_clipped_norm(record.args)
        raw = norm if pre_clip is None else pre_clip.detach().float().reshape(()).to(device)
        healthy = torch.isfinite(raw) & torch.isfinite(norm)
        if isinstance(skipped, torch.Tensor):  # a decision still on device (nonzero: the update is dropped)
            healthy = healthy & (skipped.to(device) == 0)
        bound = self.bound(self.stats)
        active = healthy & (healthy_steps >= warmup)
        clip = active & (norm > bound)
        factor = torch.where(clip, bound / norm.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(norm))
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        for (grad_device, dtype), group in by_kind.items():  # x * 1.0 == x exactly: unclipped steps untouched
            foreach_mul_(group, factor.to(grad_device, dtype))
        value = torch.where(active, torch.minimum(raw, bound), raw)
        weight = torch.where(healthy_steps < warmup, 1.0 / (healthy_steps + 1), 1.0 - alpha)
        delta = torch.where(healthy, value - mean, torch.zeros_like(mean))
        new_mean = mean + weight * delta
        new_var = (1 - weight) * (var + weight * delta * delta)
        self.stats = torch.stack(
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

    def metrics(self) -> dict[str, Metric]:
        """``stability/zclip_bound`` (the bound the next step is judged against), the clipped-step count; on device."""
        clipped: Metric = self.clipped_steps if self.stats is None else self.stats[3].long()
        return {names.ZCLIP_BOUND: self.bound(), names.ZCLIP_CLIPPED_STEPS: clipped}
