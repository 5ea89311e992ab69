"""Medians, their bootstrap confidence intervals and paired ratios for benchmark rounds.

Pure numpy/scipy, no framework import. A benchmark runs every cell once per round; these
functions turn the per-round figures into a median with a 95% CI, and a Keras-over-framework
ratio whose CI comes from the pairs of the same round (as asv compare does): the drift that
both members of a pair share cancels in their ratio, where a ratio of two medians keeps it.

The CI is scipy.stats.bootstrap's percentile interval, seeded so that a report rebuilt from
the same JSON prints the same numbers. With few rounds it is coarse: at n values the
interval can only end on values the sample holds, and its coverage of the true median is
1 - 2 * 0.5**n at most when it spans the whole sample (0.94 at n = 5, 0.75 at n = 3, 0.5
at n = 2), so two rounds (--quick) give a range, not a 95% interval.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

N_RESAMPLES = 9999


def _finite_array(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty: give at least one value (one per round).")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds a value that is not finite: {array.tolist()}; drop failed rounds first.")
    return array


def median_ci(values, confidence: float = 0.95, seed: int = 0) -> tuple[float, float | None, float | None]:
    """(median, low, high) of `values`; low and high are None when there are fewer than 2."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie between 0 and 1, got {confidence!r}; e.g. 0.95.")
    array = _finite_array(values, "values")
    median = float(np.median(array))
    if array.size < 2:
        return median, None, None
    if np.all(array == array[0]):
        # Every resample is the same value: the interval is that point (scipy would warn).
        return median, median, median
    result = stats.bootstrap(
        (array,), np.median, confidence_level=confidence, n_resamples=N_RESAMPLES,
        method="percentile", vectorized=True, axis=-1, rng=np.random.default_rng(seed),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    # The percentile interval of the median always holds the sample median; clip float noise.
    return median, min(low, median), max(high, median)


def paired_ratio_ci(numerators, denominators, confidence: float = 0.95,
                    seed: int = 0) -> tuple[float, float | None, float | None]:
    """Median and CI of numerators[i] / denominators[i], each pair measured in the same round."""
    top = _finite_array(numerators, "numerators")
    bottom = _finite_array(denominators, "denominators")
    if top.size != bottom.size:
        raise ValueError(f"numerators has {top.size} values and denominators {bottom.size}: "
                         "pair them by round (same length).")
    if np.any(bottom <= 0):
        raise ValueError(f"denominators must be positive times, got {bottom.tolist()}.")
    return median_ci(top / bottom, confidence=confidence, seed=seed)


def ratio_of_medians_ci(old, new, confidence: float = 0.95,
                        seed: int = 0) -> tuple[float, float | None, float | None]:
    """median(new) / median(old) and its CI, each side's values resampled on their own
    (unpaired: for two code versions run in different processes, as benchmarks/ab.py's)."""
    before, after = _finite_array(old, "old"), _finite_array(new, "new")
    middle = float(np.median(after) / np.median(before))
    if min(before.size, after.size) < 2:
        return middle, None, None
    if np.all(before == before[0]) and np.all(after == after[0]):
        return middle, middle, middle  # every resample gives the same ratio (scipy would warn)
    result = stats.bootstrap(
        (before, after), lambda a, b, axis=-1: np.median(b, axis=axis) / np.median(a, axis=axis),
        confidence_level=confidence, n_resamples=N_RESAMPLES, method="percentile", vectorized=True,
        paired=False, rng=np.random.default_rng(seed),
    )
    return middle, float(result.confidence_interval.low), float(result.confidence_interval.high)


def is_significant(low: float | None, high: float | None, null: float = 1.0) -> bool:
    """True when the CI [low, high] excludes `null`; False when it holds it or is missing."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return False
    return not low <= null <= high


def significance_label(low: float | None, high: float | None, null: float = 1.0) -> str:
    """'n.s.' (not significant) when the CI holds `null` or is missing, else ''."""
    return "" if is_significant(low, high, null) else "n.s."
