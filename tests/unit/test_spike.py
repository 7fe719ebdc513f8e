"""`SpikeDetector`: threshold arithmetic, warm-up, non-finite values, and no pollution by spikes."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from hf_stability.spike import MIN_RELATIVE_STD, SpikeDetector


def test_threshold_is_mean_plus_sigma_sample_std_of_the_window():
    detector = SpikeDetector(window=4, warmup=4, sigma=6.0)
    detector.accept([9.0, 1.0, 2.0, 3.0, 4.0])  # the window keeps the last 4: the 9.0 has left it
    expected = statistics.mean([1, 2, 3, 4]) + 6.0 * statistics.stdev([1, 2, 3, 4])
    assert detector.threshold() == pytest.approx(expected, rel=1e-12)
    index, verdicts = detector.scan([expected - 1e-9, expected + 1e-9])
    # The first value is healthy and joins the (trial) window before the second is judged.
    assert not verdicts[0].spike
    assert verdicts[0].threshold == pytest.approx(expected, rel=1e-12)
    trial_threshold = statistics.mean([2, 3, 4, expected - 1e-9]) + 6.0 * statistics.stdev([2, 3, 4, expected - 1e-9])
    assert verdicts[1].threshold == pytest.approx(trial_threshold, rel=1e-12)
    assert index == 2  # expected + 1e-9 is below the raised trial threshold


def test_scan_does_not_record_and_accept_does():
    detector = SpikeDetector(window=8, warmup=2, sigma=3.0)
    detector.accept([1.0, 1.1, 0.9])
    before = detector.threshold()
    detector.scan([1.0, 1.05, 0.95])
    assert detector.threshold() == before and len(detector) == 3
    detector.accept([1.0])
    assert len(detector) == 4


def test_no_finite_value_is_a_spike_during_warmup():
    detector = SpikeDetector(window=10, warmup=5, sigma=6.0)
    detector.accept([1.0, 1.0, 1.0, 1.0])
    assert detector.threshold() is None
    index, verdicts = detector.scan([1e9])
    assert index == 1 and not verdicts[0].spike and verdicts[0].threshold is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_spikes_even_during_warmup(value):
    detector = SpikeDetector(window=10, warmup=5, sigma=6.0)
    index, verdicts = detector.scan([1.0, value, 1.0])
    assert index == 1 and verdicts[1].spike
    with pytest.raises(ValueError, match="values"):
        detector.accept([value])


def test_a_spike_does_not_enter_the_window():
    rng = np.random.default_rng(0)
    detector = SpikeDetector(window=64, warmup=32, sigma=6.0)
    detector.accept(list(2.0 + 0.01 * rng.standard_normal(64)))
    threshold = detector.threshold()
    index, _ = detector.scan([50.0])
    assert index == 0
    detector.accept([])  # what the callback does after a spike at index 0: nothing joins the window
    assert detector.threshold() == threshold
    # The same spike again is still caught: had 50.0 joined the window, the σ would have exploded.
    assert detector.scan([50.0])[0] == 0


def test_gaussian_noise_gives_no_false_alarm_at_six_sigma():
    # One-sided P(z > 6) ≈ 1e-9 per value, so 5,000 Gaussian values raise an alarm with probability ≈ 5e-6;
    # the seed is fixed, so this is deterministic.
    rng = np.random.default_rng(1)
    detector = SpikeDetector(window=128, warmup=64, sigma=6.0)
    values = list(3.0 + 0.2 * rng.standard_normal(5000))
    index, _ = detector.scan(values)
    assert index == len(values)


def test_flat_signal_uses_the_relative_deviation_floor():
    detector = SpikeDetector(window=8, warmup=4, sigma=6.0)
    detector.accept([2.0] * 8)
    assert detector.threshold() == pytest.approx(2.0 + 6.0 * MIN_RELATIVE_STD * 2.0)
    assert detector.scan([2.0 * (1 + 1e-6)])[0] == 1  # last-digit noise is no spike
    assert detector.scan([2.1])[0] == 0  # a 5 % jump on a flat signal is


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"window": 1}, "window"), ({"warmup": 0}, "warmup"), ({"warmup": 200}, "warmup"), ({"sigma": 0.0}, "sigma")],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SpikeDetector(**kwargs)


def test_a_huge_finite_outlier_during_warmup_does_not_hide_a_later_spike():
    """Warm-up cannot call a finite value a spike, so a 1e29 loss joins the window; it must not lift the bar."""
    rng = np.random.default_rng(2)
    detector = SpikeDetector(window=64, warmup=16, sigma=6.0)
    healthy = list(7.0 + 0.05 * rng.standard_normal(32))
    index, _ = detector.scan(healthy[:4] + [1e29] + healthy[4:])
    assert index == 33  # warm-up: the outlier is accepted, as no finite value can be a spike yet
    detector.accept(healthy[:4] + [1e29] + healthy[4:])
    assert 1e29 in detector.values
    # Without leaving the outlier out of the mean/std the threshold is ~4e29 (mean 3e27 + 6 x 1.2e28).
    assert detector.threshold() == pytest.approx(statistics.mean(healthy) + 6.0 * statistics.stdev(healthy))
    index, verdicts = detector.scan([7.0, 140.0])  # a 20x spike
    assert index == 1 and verdicts[1].spike
