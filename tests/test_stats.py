"""The experiment statistics against values computed independently with SciPy.

Each closed form in :mod:`nurture.reports.stats` is checked against another route to the same
number: the pooled z-test against Pearson's chi-square test of the 2x2 table (z^2 = chi^2), the
Katz interval against SciPy's relative risk, the mSPRT's closed form against numerical
integration of the likelihood ratio over the normal mixture, and its validity by simulation.
"""

from __future__ import annotations

import math
import random

import pytest
from scipy import integrate, stats
from scipy.stats.contingency import relative_risk

from nurture.reports.stats import (
    MIXING_SD,
    always_valid_p_value,
    difference_interval,
    median,
    msprt_lambda,
    ratio_interval,
    two_proportion_z_test,
)

TABLES = [
    (120, 1000, 150, 1000),
    (45, 480, 61, 512),
    (3, 90, 11, 95),
    (800, 10_000, 745, 10_200),
    (1, 2, 2, 3),
]


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), TABLES)
def test_the_pooled_z_test_equals_pearsons_chi_square_without_correction(x1: int, n1: int, x2: int, n2: int) -> None:
    result = two_proportion_z_test(x1, n1, x2, n2)
    assert result is not None
    z, p = result
    chi2, p_chi2, _, _ = stats.chi2_contingency([[x1, n1 - x1], [x2, n2 - x2]], correction=False)
    assert z * z == pytest.approx(chi2, rel=1e-9)
    assert p == pytest.approx(p_chi2, rel=1e-9, abs=1e-15)
    assert math.copysign(1, z) == math.copysign(1, x2 / n2 - x1 / n1)


def test_a_worked_example_of_the_pooled_z_test() -> None:
    # 120 of 1000 against 150 of 1000: p = 0.135, SE = sqrt(0.135 * 0.865 * 0.002) = 0.0152823,
    # z = 0.03 / 0.0152823 = 1.96305, p = 2 (1 - Phi(1.96305)) = 0.049640 (just significant at 5%)
    z, p = two_proportion_z_test(120, 1000, 150, 1000) or (0.0, 0.0)
    assert z == pytest.approx(0.03 / math.sqrt(0.135 * 0.865 * 0.002), rel=1e-12)
    assert z == pytest.approx(1.96305, abs=1e-5)
    assert p == pytest.approx(0.049640, abs=1e-6)


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), TABLES)
def test_the_difference_interval_is_the_wald_interval(x1: int, n1: int, x2: int, n2: int) -> None:
    interval = difference_interval(x1, n1, x2, n2)
    assert interval is not None
    p1, p2 = x1 / n1, x2 / n2
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    low, high = stats.norm.interval(0.95, loc=p2 - p1, scale=se)
    assert (interval.low, interval.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), TABLES)
def test_the_relative_lift_interval_is_scipys_katz_interval(x1: int, n1: int, x2: int, n2: int) -> None:
    interval = ratio_interval(x1, n1, x2, n2)
    assert interval is not None
    expected = relative_risk(x2, n2, x1, n1).confidence_interval(confidence_level=0.95)
    assert interval.low == pytest.approx(expected.low - 1, rel=1e-9)
    assert interval.high == pytest.approx(expected.high - 1, rel=1e-9)


def test_undefined_statistics_say_so_instead_of_dividing_by_zero() -> None:
    assert two_proportion_z_test(0, 100, 0, 100) is None
    assert two_proportion_z_test(0, 0, 3, 10) is None
    assert ratio_interval(0, 100, 5, 100) is None
    assert msprt_lambda(0, 50, 0, 50) is None
    assert always_valid_p_value([(0, 50, 0, 50)]) == 1.0


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), TABLES)
@pytest.mark.parametrize("tau", [MIXING_SD, 0.05])
def test_the_msprt_closed_form_equals_the_integral_over_the_mixture(
    x1: int, n1: int, x2: int, n2: int, tau: float
) -> None:
    p1, p2 = x1 / n1, x2 / n2
    variance = p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2
    d, sd = p2 - p1, math.sqrt(variance)

    def ratio_at(theta: float) -> float:
        return float(stats.norm.pdf(d, theta, sd) / stats.norm.pdf(d, 0.0, sd) * stats.norm.pdf(theta, 0.0, tau))

    integral, _ = integrate.quad(ratio_at, -12 * tau, 12 * tau, points=[0.0, d], limit=200)
    assert msprt_lambda(x1, n1, x2, n2, tau) == pytest.approx(integral, rel=1e-6)


def test_the_always_valid_p_value_is_the_running_minimum_of_one_over_lambda() -> None:
    looks = [(10, 100, 18, 100), (30, 300, 52, 300), (61, 600, 80, 600)]
    lambdas = [msprt_lambda(*look) or 0.0 for look in looks]
    assert always_valid_p_value(looks) == pytest.approx(min(1.0, *(1 / value for value in lambdas)))
    # A later look with weaker evidence never raises it again.
    assert always_valid_p_value([*looks, (100, 1000, 101, 1000)]) == always_valid_p_value(looks)


def test_peeking_every_day_keeps_false_positives_under_five_percent() -> None:
    """A/A experiments looked at 30 times: the mSPRT stays valid where the z-test does not."""
    rng = random.Random(20261206)
    experiments, rate, per_day, days = 400, 0.1, 100, 30
    msprt_rejections = z_rejections = 0
    for _ in range(experiments):
        x1 = x2 = n = 0
        looks = []
        z_rejected = False
        for _ in range(days):
            n += per_day
            x1 += sum(rng.random() < rate for _ in range(per_day))
            x2 += sum(rng.random() < rate for _ in range(per_day))
            looks.append((x1, n, x2, n))
            test = two_proportion_z_test(x1, n, x2, n)
            z_rejected = z_rejected or (test is not None and test[1] < 0.05)
        msprt_rejections += always_valid_p_value(looks) < 0.05
        z_rejections += z_rejected
    assert msprt_rejections / experiments <= 0.05
    assert z_rejections / experiments > 0.10  # peeking at a fixed-horizon test inflates errors


def test_the_msprt_detects_a_real_difference() -> None:
    looks = [(100 * k, 1000 * k, 130 * k, 1000 * k) for k in range(1, 11)]
    assert always_valid_p_value(looks) < 0.001


def test_median() -> None:
    assert median([]) is None
    assert median([3.0]) == 3.0
    assert median([5.0, 1.0, 3.0]) == 3.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
