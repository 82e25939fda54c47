"""Intervals for the averages the report quotes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, samples: int = 1000, seed: int = 0
) -> list[float] | None:
    """Percentile bootstrap 95% interval of `stat`; None for fewer than two values or no resamples."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2 or samples == 0:
        return None
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, len(x), size=(samples, len(x)))]
    stats = np.apply_along_axis(stat, 1, draws)
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def wilson_ci(successes: int, n: int, z: float = 1.959964) -> list[float] | None:
    """Wilson score 95% interval of a rate; sensible at 0/n and n/n, unlike the normal approximation."""
    if n == 0:
        return None
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]
