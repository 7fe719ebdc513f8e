"""hf-stability: keep `transformers` pre-training alive, and the pre-training objectives it lacks.

Names are imported lazily so that ``import hf_stability`` stays cheap for data workers that only
need a collator.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "StabilityConfig": "hf_stability.config",
    "StabilityTrainer": "hf_stability.trainer",
    "SkipNonFiniteCallback": "hf_stability.callbacks",
    "SpikeRollbackCallback": "hf_stability.callbacks",
    "AdaptiveClipCallback": "hf_stability.callbacks",
    "LossScaleTelemetryCallback": "hf_stability.callbacks",
    "StabilityEventLog": "hf_stability.events",
    "read_events": "hf_stability.events",
    "DataCollatorForBertPretraining": "hf_stability.collators",
    "DataCollatorForBartDenoising": "hf_stability.collators",
    "DataCollatorForT5SpanCorruption": "hf_stability.collators",
    "create_nsp_examples": "hf_stability.collators",
    "t5_span_corruption_lengths": "hf_stability.collators",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_stability' has no attribute {name!r}")
