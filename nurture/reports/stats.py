"""The statistics of an experiment: published methods, closed forms, no dependencies.

Every function takes counts, never rows, so the report's SQL does the counting and this module
only does the arithmetic. The formulas, with their sources, are in ``docs/results.md``:

- :func:`two_proportion_z_test`: the pooled two-proportion z-test, two-sided;
- :func:`difference_interval`: the Wald interval of the difference of two proportions;
- :func:`ratio_interval`: the Katz log interval of the ratio of two proportions (relative lift);
- :func:`msprt_lambda`, :func:`always_valid_p_value`: the mixture sequential probability ratio
  test with a normal mixture (Johari, Koomen, Pekelis and Walsh, "Peeking at A/B tests", KDD 2017),
  whose running p-value may be looked at after every observation without inflating the false
  positive rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

Z_95 = 1.959963984540054
"""The 97.5th percentile of the standard normal distribution: a 95% two-sided interval."""

MIXING_SD = 0.01
"""The normal mixture's standard deviation tau, in absolute conversion rate (one percentage point).

The mSPRT is most sensitive to effects of about this size; smaller ones take longer to detect and
larger ones are detected quickly anyway. One point suits the 1 to 20% conversion rates of
marketing journeys. It is fixed before any data is seen, as the test requires."""


@dataclass(frozen=True, slots=True)
class Interval:
    """A two-sided 95% confidence interval."""

    low: float
    high: float


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def two_proportion_z_test(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float] | None:
    """``(z, two-sided p)`` of H0: p1 = p2 with the pooled variance; ``None`` when undefined.

    z = (p2 - p1) / sqrt(p (1 - p) (1/n1 + 1/n2)), p = (x1 + x2) / (n1 + n2).
    """
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if variance <= 0.0:
        return None  # no conversions at all, or all converted: nothing to compare
    z = (x2 / n2 - x1 / n1) / math.sqrt(variance)
    return z, min(1.0, 2.0 * normal_sf(abs(z)))


def difference_interval(x1: int, n1: int, x2: int, n2: int, z: float = Z_95) -> Interval | None:
    """The Wald interval of p2 - p1: d +/- z sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2)."""
    if n1 <= 0 or n2 <= 0:
        return None
    p1, p2 = x1 / n1, x2 / n2
    half = z * math.sqrt(p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2)
    return Interval(p2 - p1 - half, p2 - p1 + half)


def ratio_interval(x1: int, n1: int, x2: int, n2: int, z: float = Z_95) -> Interval | None:
    """The Katz interval of the relative lift p2 / p1 - 1; ``None`` without conversions in both.

    exp(ln(p2 / p1) +/- z sqrt(1/x2 - 1/n2 + 1/x1 - 1/n1)) - 1.
    """
    if x1 <= 0 or x2 <= 0 or n1 <= 0 or n2 <= 0:
        return None
    log_ratio = math.log((x2 / n2) / (x1 / n1))
    half = z * math.sqrt(1.0 / x2 - 1.0 / n2 + 1.0 / x1 - 1.0 / n1)
    return Interval(math.exp(log_ratio - half) - 1.0, math.exp(log_ratio + half) - 1.0)


def msprt_lambda(x1: int, n1: int, x2: int, n2: int, tau: float = MIXING_SD) -> float | None:
    """The normal-mixture likelihood ratio of H1: p2 - p1 = theta, theta ~ N(0, tau^2), against H0.

    Lambda = sqrt(V / (V + tau^2)) exp(tau^2 d^2 / (2 V (V + tau^2))), where d = p2 - p1 is the
    observed difference and V = p1 (1 - p1) / n1 + p2 (1 - p2) / n2 its estimated variance.
    ``None`` while V is zero (no data to weigh).
    """
    if n1 <= 0 or n2 <= 0:
        return None
    p1, p2 = x1 / n1, x2 / n2
    variance = p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2
    if variance <= 0.0:
        return None
    mix = tau * tau
    exponent = mix * (p2 - p1) ** 2 / (2.0 * variance * (variance + mix))
    # Past ~700 exp() overflows; the p-value (1 / Lambda) is zero to double precision well before.
    return math.sqrt(variance / (variance + mix)) * math.exp(min(exponent, 700.0))


def always_valid_p_value(looks: Iterable[tuple[int, int, int, int]], tau: float = MIXING_SD) -> float:
    """The running minimum of min(1, 1 / Lambda) over ``looks`` of cumulative (x1, n1, x2, n2).

    Valid at any stopping time: a marketer may look after every look and stop when it falls
    below 0.05 without raising the false positive rate above 5%. Looking at fewer instants than
    every observation only makes it larger, never smaller, so daily looks stay valid.
    """
    p = 1.0
    for x1, n1, x2, n2 in looks:
        ratio = msprt_lambda(x1, n1, x2, n2, tau)
        if ratio is not None and ratio > 0.0:
            p = min(p, 1.0 / ratio)
    return p


def median(values: list[float]) -> float | None:
    """The middle value (the mean of the middle two for an even count); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2.0
