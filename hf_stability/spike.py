"""Loss/grad-norm spike detector: mean + `sigma` standard deviations over a window of healthy values.

This is the rule OLMo-core and Levanter use (mean + 6σ over the last 128 steps), made robust in four
ways: a spike never enters the window (so one spike cannot raise the bar for the next), non-finite
values are always spikes (except on steps the caller marks as skipped), the deviation has a small
floor relative to the mean so a near-constant signal does not turn noise in the last digits into alarms,
and the mean and σ leave out window values far above the window's median (`OUTLIER_SIGMA_FACTOR`). The
last one matters during warm-up, where no value can be a spike: one finite outlier (a loss of 1e29) would
otherwise join the window and lift the threshold to ~4e29 for the next ``window`` steps, so that a later
20x spike went unnoticed. Median and MAD do not move with one outlier; on a healthy signal nothing is that
far out, so the threshold is the plain mean + σ·std.

The detector is plain host-side arithmetic on Python floats; the spike stage buffers the per-step values on
device and hands them over in batches (see `hf_stability.step.rollback`), so judging costs no extra
host synchronisation per step.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from hf_stability.settings import RollbackSettings, checked_number

# A deviation below this fraction of |mean| is treated as this fraction: float noise on a flat signal
# is not a spike, while any real spike (orders of magnitude above 6 x 0.1 % of the mean) still is.
MIN_RELATIVE_STD = 1e-3
# Window values above median + OUTLIER_SIGMA_FACTOR x sigma robust deviations (1.4826 x MAD, the std of a
# Gaussian) stay out of the mean and std: 12 robust σ at the default 6σ, far beyond any healthy value.
OUTLIER_SIGMA_FACTOR = 2.0
MAD_TO_STD = 1.4826


@dataclass(frozen=True)
class Verdict:
    """The detector's judgement of one value: ``threshold`` is ``None`` while warming up."""

    spike: bool
    value: float
    threshold: float | None


class SpikeDetector:
    """Judges values in order against the statistics of the last ``window`` healthy values.

    Args:
        window: number of recent healthy values the mean and standard deviation cover.
        warmup: healthy values needed before a finite value can be called a spike (non-finite values
            are spikes from the first step).
        sigma: a value above ``mean + sigma * std`` is a spike.
    """

    def __init__(self, window: int = 128, warmup: int = 64, sigma: float = 6.0) -> None:
        window = checked_number("window", window, int, minimum=2)
        self._setup(window, checked_number("warmup", warmup, int, minimum=1, maximum=window),
                    checked_number("sigma", sigma, float, minimum=0, open_minimum=True))

    @classmethod
    def from_settings(cls, settings: RollbackSettings) -> SpikeDetector:
        """The detector of `SpikeRollbackCallback`: its knobs were checked when they were set, not again here."""
        detector = cls.__new__(cls)
        detector._setup(settings.spike_window, settings.spike_warmup, settings.spike_sigma)
        return detector

    def _setup(self, window: int, warmup: int, sigma: float) -> None:
        self.window, self.warmup, self.sigma = window, warmup, sigma
        self._values: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def values(self) -> list[float]:
        """The healthy values in the window, oldest first (what a checkpoint saves)."""
        return list(self._values)

    def threshold(self) -> float | None:
        """The current spike threshold, or ``None`` before ``warmup`` healthy values were seen."""
        count = len(self._values)
        if count < max(self.warmup, 2):
            return None
        values = self._without_outliers()
        count = len(values)
        mean = math.fsum(values) / count
        variance = math.fsum((v - mean) ** 2 for v in values) / (count - 1)
        std = max(math.sqrt(variance), MIN_RELATIVE_STD * abs(mean))
        return mean + self.sigma * std

    def _without_outliers(self) -> list[float]:
        """The window without values far above its median (see the module docstring); at least half remain."""
        values = sorted(self._values)
        median = statistics.median(values)
        mad = statistics.median(abs(v - median) for v in values)
        scale = max(MAD_TO_STD * mad, MIN_RELATIVE_STD * abs(median))
        if scale == 0:  # an all-zero window has no scale to judge by
            return values
        bound = median + OUTLIER_SIGMA_FACTOR * self.sigma * scale
        kept = [v for v in values if v <= bound]
        return kept if len(kept) >= 2 else values

    def scan(self, values: list[float]) -> tuple[int, list[Verdict]]:
        """Judge ``values`` in order, as if each healthy one joined the window, without recording any.

        Returns the index of the first spike (``len(values)`` when there is none) and the verdicts up to
        and including it. Ranks scan first, agree on the earliest spike, then :meth:`accept` the values
        before it, so every rank's window holds exactly the steps the run kept.
        """
        trial = SpikeDetector.__new__(SpikeDetector)
        trial._setup(self.window, self.warmup, self.sigma)
        trial._values.extend(self._values)
        verdicts = []
        for index, value in enumerate(values):
            value = float(value)
            threshold = trial.threshold()
            spike = not math.isfinite(value) or (threshold is not None and value > threshold)
            verdicts.append(Verdict(spike, value, threshold))
            if spike:
                return index, verdicts
            trial._values.append(value)
        return len(values), verdicts

    def accept(self, values: list[float]) -> None:
        """Add healthy values (as judged by :meth:`scan`) to the window."""
        for value in values:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"`values` must be finite healthy values, got {value}.")
            self._values.append(value)
