"""Batch-wide operations on ragged rows kept as one flat array plus per-row lengths.

The span collators (BART, T5) rewrite every row differently; doing it row by row in Python costs more
than the whole objective. These helpers let them draw, for all rows at once, what the originals draw
per example, with one numpy pass per step.
"""

from __future__ import annotations

import numpy as np


def exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    """Offsets of consecutive segments of the given sizes: ``[0, v0, v0+v1, …]`` without the total."""
    out = np.zeros(len(values), dtype=np.int64)
    np.cumsum(values[:-1], out=out[1:])
    return out


def choose_distinct(rng: np.random.Generator, population: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """For every segment ``s`` pick ``counts[s]`` distinct indices from ``range(population[s])``.

    Returns one flat array: segment ``s``'s picks sit at ``exclusive_cumsum(counts)[s]:…+counts[s]``, in
    random order (so the first ``m`` of them are a uniform ``m``-subset, as ``randperm(n)[:k]`` gives).
    Every ``counts[s]``-subset and every order is equally likely: both strategies below only ever compare
    draws for equality, so they commute with any relabelling of the population.
    """
    population = np.asarray(population, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if np.any(counts > population) or np.any(counts < 0):
        raise ValueError("cannot pick more distinct items than a segment holds")
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    segment = np.repeat(np.arange(len(counts)), counts)
    if np.all(2 * counts <= population):
        return _choose_by_rejection(rng, population, segment)
    return _choose_by_sorting(rng, population, counts, segment)


def _choose_by_rejection(rng: np.random.Generator, population: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Draw with replacement and redraw later duplicates; cheap when picks are at most half the population."""
    offsets = exclusive_cumsum(population)
    sizes = population[segment]
    picks = (rng.random(len(segment)) * sizes).astype(np.int64)
    while True:
        keys = offsets[segment] + picks
        order = np.argsort(keys, kind="stable")
        repeated = order[1:][keys[order[1:]] == keys[order[:-1]]]
        if len(repeated) == 0:
            return picks
        picks[repeated] = (rng.random(len(repeated)) * sizes[repeated]).astype(np.int64)


def _choose_by_sorting(
    rng: np.random.Generator, population: np.ndarray, counts: np.ndarray, segment: np.ndarray
) -> np.ndarray:
    """Shuffle each whole segment with one argsort of random keys and keep its first ``counts[s]`` items."""
    offsets = exclusive_cumsum(population)
    owner = np.repeat(np.arange(len(population)), population)
    shuffled = np.argsort(owner + rng.random(len(owner)), kind="stable")
    rank = np.arange(len(owner)) - offsets[owner]
    kept = shuffled[rank < counts[owner]]
    return kept - offsets[segment]

