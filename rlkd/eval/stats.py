"""Bootstrap confidence intervals over rows, and paired differences between students on the same rows.

Every metric is a ratio of per-row sums, ``sum_r num[r] / sum_r den[r]``: a row mean has ``den = 1`` per row (ROUGE-L,
exact match, ...), a per-position rate has the row's hits over its eligible positions (CR@k, ...), so rows are the
resampled unit in both cases and a long row weighs as much as its positions.

The bootstrap draws ``B`` resamples of the ``n`` rows with replacement from ``numpy.random.default_rng(seed)``; the
same seed and ``n`` give the same resamples, and they are applied to every student and metric alike. So the
difference between two students is computed resample by resample on the same rows (a *paired* bootstrap), which
removes the row-to-row variation both share. Intervals are percentile intervals (2.5th and 97.5th percentiles of the
resampled statistic for 95%); the point value is the statistic on all rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 100
"""Resamples drawn and applied together: bounds the (CHUNK, n) count matrix."""


@dataclass(frozen=True)
class Interval:
    """A statistic and its bootstrap interval (``low``/``high`` None without a bootstrap)."""

    value: float | None
    low: float | None = None
    high: float | None = None

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``sum(num) / sum(den)`` over rows for each series: (n, S) -> (S,), NaN where the denominators sum to 0."""
    d = den.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(d > 0, num.sum(axis=0) / np.where(d > 0, d, 1), np.nan)


def resample_ratios(num: np.ndarray, den: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(B, S) ratios over ``resamples`` bootstrap resamples of the rows of ``num``/``den`` (n, S)."""
    n = num.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, num.shape[1]), dtype=np.float64)
    for a in range(0, resamples, CHUNK):
        b = min(CHUNK, resamples - a)
        idx = rng.integers(0, n, size=(b, n))  # (b, n) rows drawn with replacement
        flat = idx + (np.arange(b)[:, None] * n)
        counts = np.bincount(flat.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)  # (b, n) multiplicity
        sn, sd = counts @ num, counts @ den  # (b, S)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a: a + b] = np.where(sd > 0, sn / np.where(sd > 0, sd, 1), np.nan)
    return out


def _interval(value: float, draws: np.ndarray | None, level: float) -> Interval:
    if not np.isfinite(value):
        return Interval(None)
    if draws is None:
        return Interval(float(value))
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return Interval(float(value))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def intervals(num: np.ndarray, den: np.ndarray, *, resamples: int, seed: int, level: float = 0.95
              ) -> tuple[list[Interval], np.ndarray | None]:
    """Each series' value and percentile interval, plus the (B, S) resampled ratios (None when ``resamples`` is
    0) for :func:`paired_difference`."""
    value = ratio(num, den)  # (S,)
    draws = resample_ratios(num, den, resamples, seed) if resamples > 0 and num.shape[0] > 0 else None
    return [_interval(value[s], None if draws is None else draws[:, s], level) for s in range(num.shape[1])], draws


def paired_difference(value_a: float | None, value_b: float | None, draws_a: np.ndarray | None,
                      draws_b: np.ndarray | None, level: float = 0.95) -> Interval:
    """``b - a`` and its interval from the two series' ratios on the same resamples ((B,) each)."""
    if value_a is None or value_b is None:
        return Interval(None)
    diff = None if draws_a is None or draws_b is None else draws_b - draws_a
    return _interval(value_b - value_a, diff, level)
