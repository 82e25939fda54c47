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


# Student t quantiles t(0.975, df) for df = 1..30; beyond, the normal 1.96 is within 2% of the truth.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_t_ci(x: np.ndarray) -> dict[str, list]:
    """Mean over the first axis and its 95% t-interval, per remaining entry (e.g. over templates, per layer).
    NaN values (an undefined cosine) are left out; an entry with fewer than two values gets no interval."""
    x = np.asarray(x, dtype=float)
    n = np.sum(~np.isnan(x), axis=0)
    total = np.where(np.isnan(x), 0.0, x).sum(0)
    mean = np.divide(total, n, out=np.full(n.shape, np.nan), where=n > 0)
    squares = np.where(np.isnan(x), 0.0, (x - mean) ** 2).sum(0)
    sd = np.sqrt(np.divide(squares, n - 1, out=np.full(n.shape, np.nan), where=n > 1))
    t = np.array([_T975[k - 1] if 1 <= k <= 30 else 1.96 for k in (n - 1).ravel()]).reshape(n.shape)
    half = t * sd / np.sqrt(np.maximum(n, 1))

    def json_list(a):  # JSON has no NaN
        return [None if np.isnan(v) else float(v) for v in a.ravel()]

    lows, highs = json_list(mean - half), json_list(mean + half)
    return {"mean": json_list(mean), "ci95": [None if lo is None else [lo, hi] for lo, hi in zip(lows, highs)]}
