"""Counts the aten ops dispatched while a block runs: what a step costs in ops, independent of the machine's speed.

Every op that reaches the dispatcher (forward, backward, the optimizer's fused kernels, Trainer's and
hf-stability's own) is counted once under its aten name (say ``aten.stack.default``); an op that another op
runs inside its kernel is not. Shared by the tests and the benchmarks, like `benchmarks.host_reads`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from torch.utils._python_dispatch import TorchDispatchMode


class _OpCounter(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_ops() -> Iterator[Counter]:
    """Count the aten ops dispatched while the block runs, by name."""
    counts: Counter = Counter()
    with _OpCounter(counts):
        yield counts
