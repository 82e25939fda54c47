"""Intervals for the averages the report quotes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

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


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict[str, Any] | None:
    """Mean of a - b over paired units (option orders, question wordings) with its 95% t-interval and the
    one-sided p-value that it is above zero from flipping the sign of whole units (max_t_sign_flip with one
    test: exact for up to 12 units). A percentile bootstrap's p-value was measured too lenient at 8 units
    (0.06 where 0.025 was asked). None for fewer than two units."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return None
    ci = mean_t_ci(d[:, None])["ci95"][0]
    return {"mean": float(d.mean()), "ci95": ci or [float(d.mean())] * 2, "p_value": float(max_t_sign_flip(d[:, None], seed=seed)[0]),
            "n": len(d)}


def max_t_sign_flip(differences: np.ndarray, samples: int = 4096, seed: int = 0) -> np.ndarray:
    """differences [units, tests], paired by unit (templates x layers): per test, the one-sided p-value that
    its mean is above zero, corrected for testing all of them. The null distribution is that of the largest
    t-statistic over the tests when whole units flip sign (every pattern for up to 12 units, else `samples`
    seeded ones), so the correction keeps the tests' correlation (neighbouring layers move together) instead of
    treating them as independent. A test whose differences are all zero, or hold a NaN, gets 1 and is left out
    of the maximum."""
    d = np.asarray(differences, dtype=float)
    n = d.shape[0]
    valid = ~np.isnan(d).any(0) & (np.abs(d).max(0, initial=0) > 0)
    p = np.ones(d.shape[1])
    if n < 2 or not valid.any():
        return p
    d = d[:, valid]
    if n <= 12:
        flips = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)  # row 0: no flip
    else:
        flips = np.vstack([np.ones(n), np.random.default_rng(seed).choice([-1.0, 1.0], size=(samples, n))])
    means = flips @ d / n  # [patterns, tests]
    var = np.maximum((np.sum(d**2, 0) - n * means**2) / (n - 1), 0)  # a flip keeps every d^2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(var > 0, means / np.sqrt(var / n), np.sign(means) * np.inf)
    maxima = t.max(1)
    p[valid] = (maxima[:, None] >= t[0][None, :]).mean(0)
    return p


def rank_among(gains: np.ndarray, target: int = 0, prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """gains [candidates, tests]: how much each candidate (a city, a country) gained per test (layer), the target
    among them. Per test: (p, corrected p) that the target's gain stands out this far by chance, where chance is the
    target being any of the candidates (a permutation test over their labels, exact if they are exchangeable under
    the null). With a `prior` [candidates, tests] (each one's standing before the change), the gains are first
    replaced by their residuals from a straight line in it, per test: a change in spread moves candidates in
    proportion to where they stood, which would otherwise make a target that already stood out look special.
    Each test's gains are standardized across the candidates; p is the share of candidates at or above the target,
    the corrected p the share whose largest standardized gain over all tests reaches the target's at this test
    (the maximum keeps the tests' correlation). It needs no second control: two single adapters always differ
    consistently across templates or wordings, and only the target standing out among all candidates shows that
    the difference is about it. A test where every gain is equal gets 1."""
    g = np.asarray(gains, dtype=float)
    if prior is not None:
        x = np.asarray(prior, dtype=float) - np.mean(prior, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where((x**2).sum(0) > 0, (x * (g - g.mean(0))).sum(0) / (x**2).sum(0), 0.0)
        g = g - slope * x
    spread = g.std(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(spread > 1e-12, (g - g.mean(0)) / spread, -np.inf)
    p = np.where(spread > 1e-12, (z >= z[target]).mean(0), 1.0)
    corrected = np.where(spread > 1e-12, (z.max(1)[:, None] >= z[target][None, :]).mean(0), 1.0)
    return p, corrected
