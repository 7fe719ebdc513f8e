"""Timing of the library's own code inside a training run, shared by the benchmarks.

Wall-clock steps/s on a shared machine drift by more than the overheads being measured, so the benchmarks
also sum the time spent inside hf-stability's functions directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback


class Stopwatch:
    """Sums the wall time spent inside every function wrapped with :meth:`timed`."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper

    def time_events(self, callback: TrainerCallback) -> None:
        """Time every ``on_*`` event method of this callback instance."""
        for event in dir(TrainerCallback):
            if event.startswith("on_"):
                setattr(callback, event, self.timed(getattr(callback, event)))
