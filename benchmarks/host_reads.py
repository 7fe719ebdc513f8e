"""The one host-read instrument, shared by the benchmarks and the tests: counts device-to-host reads.

A read is a call of a tensor method that copies a value to the host, a sync on an accelerator: ``item``,
``tolist``, ``numpy``, ``cpu`` (counted on CPU too, where it copies nothing: on a GPU it would), and the
conversions ``bool()``, ``float()``, ``int()`` and indexing with a tensor. Every such call made from Python
while the block runs is counted, Trainer's own included; reads inside a C++ op are not seen.

It lives here rather than in ``tests/`` so that a benchmark does not import the test suite; the tests import it
from here (the repository root is on their path).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Hashable, Iterator

import torch

READ_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counting_host_reads(attribute_to: Callable[[], Hashable | None] | None = None) -> Iterator[Counter]:
    """Count the host reads made while the block runs, by method name.

    With ``attribute_to``, a read is counted under what it returns instead (say, the step whose callback hook is
    running), and left out when it returns ``None``.
    """
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READ_METHODS}

    def counted(name: str) -> Callable:
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            key = name if attribute_to is None else attribute_to()
            if key is not None:
                counts[key] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in READ_METHODS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
