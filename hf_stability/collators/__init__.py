"""Pre-training data objectives: BERT MLM/NSP, BART denoising, T5 span corruption.

Every collator takes a list of feature dicts with ``input_ids`` and returns a dict of torch tensors
with ``labels`` set to -100 where no loss is due. One module per objective.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataCollatorForBertPretraining": "hf_stability.collators.bert",
    # Built before batching (hf_stability.nsp_examples), re-exported here as the BERT data side's API.
    "create_nsp_examples": "hf_stability.nsp_examples",
    "nsp_dataset": "hf_stability.nsp_examples",
    "DataCollatorForBartDenoising": "hf_stability.collators.bart",
    "DataCollatorForT5SpanCorruption": "hf_stability.collators.t5",
    "t5_span_corruption_lengths": "hf_stability.collators.t5",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_stability.collators' has no attribute {name!r}")
