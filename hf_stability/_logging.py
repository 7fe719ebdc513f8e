"""hf-stability's loggers: transformers' logging, with messages from the main process only.

The callbacks run on every rank and reach the same decisions (flags are all-reduced), so each would print
its warning once per process. A filter on each module's logger lets only global rank 0 through; a module
whose messages are about this rank's own state (its snapshot files) takes ``every_rank=True``.
``transformers.logging.set_verbosity_*`` does not reach these loggers (they are not under ``transformers``);
configure ``logging.getLogger("hf_stability")`` instead.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch.distributed as dist
from transformers.utils import logging as hf_logging

if TYPE_CHECKING:
    from hf_stability._compat import TransformersLogger


def is_main_process() -> bool:
    """Whether this process is global rank 0 (`TrainingArguments.process_index` is the same rank)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()


_MAIN_PROCESS_ONLY = _MainProcessOnly()


def get_logger(name: str, *, every_rank: bool = False) -> TransformersLogger:
    """transformers' logger for ``name``; unless ``every_rank``, silent outside the main process."""
    logger = hf_logging.get_logger(name)
    if not every_rank:
        logger.addFilter(_MAIN_PROCESS_ONLY)  # a no-op when already there
    return logger
