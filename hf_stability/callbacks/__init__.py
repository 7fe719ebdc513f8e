"""Stability callbacks; each also works with a plain `transformers.Trainer`.

- `SkipNonFiniteCallback` (``skip.py``): drop the update of a step with NaN/Inf gradients on any rank.
- `SpikeRollbackCallback` (``rollback.py``): on a loss/grad-norm spike, restore a healthy in-memory snapshot.
- `AdaptiveClipCallback` (``adaptive_clip.py``): clip gradient norms above mean + z·σ of their EMA (ZClip).
- `LossScaleTelemetryCallback` (``telemetry.py``): loss scale, skip/rollback counts, fp16 pressure via `Trainer.log`.

Each is a facade over a stage in ``hf_stability/step/``: it owns the stage's settings and checkpoint state, registers
the stage with the run's `StepGuard` (``step/guard.py``), which runs a step's stages in code order passing one
`StepRecord`, and hands it Trainer's step events (``guarded.py``: `GuardedStep`).
Their ``priority`` (``order.py``) only keeps them after `DefaultFlowCallback` and ahead of the reporting callbacks.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SkipNonFiniteCallback": "hf_stability.callbacks.skip",
    "SpikeRollbackCallback": "hf_stability.callbacks.rollback",
    "AdaptiveClipCallback": "hf_stability.callbacks.adaptive_clip",
    "LossScaleTelemetryCallback": "hf_stability.callbacks.telemetry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_stability.callbacks' has no attribute {name!r}")
