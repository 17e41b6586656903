"""Estimates over seeds: mean, median, standard deviation and Student-t intervals (one sample, and
Welch's for a difference of two means), in plain Python (no SciPy).

The t quantile inverts the t distribution's CDF by bisection; the CDF integrates the density with
Simpson's rule (quantiles agree with tables to 4 decimals).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def t_pdf(x: float, df: float) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: float, n: int = 400) -> float:
    """P(T ≤ x) for Student's t with `df` degrees of freedom."""
    if x < 0:
        return 1.0 - t_cdf(-x, df, n)
    h = x / n
    s = t_pdf(0.0, df) + t_pdf(x, df)
    s += sum((4 if i % 2 else 2) * t_pdf(i * h, df) for i in range(1, n))
    return 0.5 + s * h / 3


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (0.5 < p < 1), e.g. t_quantile(0.975, 2) = 4.303."""
    if not 0.5 < p < 1:
        raise ValueError(f"p={p}: need 0.5 < p < 1")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def sd(xs: Sequence[float]) -> float:
    """Sample standard deviation (n − 1); 0 for one value."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def median(xs: Sequence[float]) -> float:
    s, n = sorted(xs), len(xs)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


@dataclass(frozen=True)
class Estimate:
    n: int
    mean: float
    median: float
    sd: float
    low: float | None  # the interval; None with fewer than 2 values
    high: float | None

    def separated_from(self, value: float) -> bool:
        return self.low is not None and not self.low <= value <= self.high


def estimate(xs: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean, median, sd and the `level` t-interval of the mean of `xs` (at least one value)."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("no values to estimate from")
    m, s = mean(xs), sd(xs)
    if len(xs) < 2:
        return Estimate(1, m, m, 0.0, None, None)
    half = t_quantile(0.5 + level / 2, len(xs) - 1) * s / math.sqrt(len(xs))
    return Estimate(len(xs), m, median(xs), s, m - half, m + half)


@dataclass(frozen=True)
class Difference:
    diff: float  # mean(a) − mean(b)
    low: float
    high: float
    df: float

    @property
    def separated(self) -> bool:
        """Whether the interval excludes 0."""
        return not self.low <= 0.0 <= self.high


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference | None:
    """Welch's t-interval for mean(a) − mean(b); None unless both have 2 or more values."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = sd(a) ** 2 / len(a), sd(b) ** 2 / len(b)
    d = mean(a) - mean(b)
    if va + vb == 0:
        return Difference(d, d, d, float("inf"))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(va + vb)
    return Difference(d, d - half, d + half, df)
