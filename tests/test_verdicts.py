"""ncfast.experiments._verdicts: three-valued verdicts from bootstrap intervals and permutation tests,
against hand-counted orderings, numpy / scipy's correlations and the binomial spread."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from ncfast.experiments import _verdicts as v


def test_exact_permutation_p_values_are_counted_orderings():
    # n = 4, perfectly monotone: only the identity and the reversal reach |rho| = 1 among 4! = 24
    c = v.correlation_test([1, 2, 3, 4], [10, 20, 30, 40])
    assert (c.r, c.p, c.n, c.exact) == (1.0, 2 / 24, 4, True)
    assert v.correlation_verdict(c, +1) == v.INCONCLUSIVE  # n < MIN_N, and p = 0.083 anyway
    # n = 5: 2 of 120 orderings, p = 1/60 < 0.05: holds with the claimed sign, fails with the other
    c = v.correlation_test([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert c.r == -1.0 and c.p == pytest.approx(2 / 120, abs=1e-15)
    assert v.correlation_verdict(c, -1) == v.HOLDS and v.correlation_verdict(c, +1) == v.FAILS
    assert c.text() == "Spearman rho = -1.00, p = 0.017 (exact), n = 5"


def test_correlations_equal_scipys_and_ties_take_average_ranks():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=7), rng.normal(size=7)
    y[2] = y[5]  # a tie
    x[1] = x[4]
    assert v.correlation_test(x, y).r == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-14)
    assert v.correlation_test(x, y, "pearson").r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-14)
    # the exact two-sided p at n = 7: the share of the 5,040 orderings of y with |r| >= the observed
    r0 = abs(np.corrcoef(x, y)[0, 1])
    reach = [abs(np.corrcoef(x, y[list(o)])[0, 1]) >= r0 - 1e-12 for o in itertools.permutations(range(7))]
    assert v.correlation_test(x, y, "pearson").p == pytest.approx(sum(reach) / 5040, abs=1e-15)


def test_random_permutations_beyond_eight_points_and_undefined_cases():
    c = v.correlation_test(np.arange(12.0), np.arange(12.0) ** 3, permutations=2000, seed=1)
    assert c.exact is False and c.r == 1.0 and c.p == 1 / 2001  # no random ordering of 12 reaches rho = 1
    assert v.correlation_verdict(c, +1) == v.HOLDS
    weak = v.correlation_test([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5])  # rho = 0.83, p = 0.058 exactly
    assert weak.r == pytest.approx(29 / 35) and weak.p == pytest.approx(42 / 720)
    assert v.correlation_verdict(weak, +1) == v.INCONCLUSIVE
    flat = v.correlation_test([1, 2, 3, 4, 5], [7, 7, 7, 7, 7])
    assert math.isnan(flat.r) and v.correlation_verdict(flat, +1) == v.INCONCLUSIVE
    assert v.correlation_test([1, np.nan, 3, 4, 5, None], [1, 2, 3, 4, 5, 6]).n == 4  # NaN / None pairs left out
    with pytest.raises(ValueError, match="method"):
        v.correlation_test([1, 2, 3], [1, 2, 3], "kendall")


def test_bootstrap_interval_of_an_accuracy_has_the_binomial_width():
    correct = np.array([1.0] * 200 + [0.0] * 200)  # 50% of 400 test samples
    low, high = v.bootstrap_interval(correct, resamples=4000, seed=0)
    half = 1.96 * math.sqrt(0.25 / 400)  # 0.049
    assert low == pytest.approx(0.5 - half, abs=0.006) and high == pytest.approx(0.5 + half, abs=0.006)
    assert v.bootstrap_interval(correct, resamples=4000, seed=0) == (low, high)  # seeded
    assert v.bootstrap_interval(np.ones(50)) == (1.0, 1.0)
    assert all(math.isnan(b) for b in v.bootstrap_interval([]))


def test_seeds_widen_the_interval_they_disagree_on():
    """Two seeds at 20% and 80%: resampling the seeds first spreads the interval over both, where
    pooling the samples as one seed gives a narrow one around 50%."""
    acc = np.array([1.0] * 40 + [0.0] * 160 + [1.0] * 160 + [0.0] * 40)
    seeds = np.repeat([0, 1], 200)
    pooled = v.bootstrap_interval(acc, resamples=2000)
    by_seed = v.bootstrap_interval(acc, groups=seeds, resamples=2000)
    assert pooled[1] - pooled[0] < 0.11
    assert by_seed[0] < 0.25 and by_seed[1] > 0.75
    with pytest.raises(ValueError, match="groups"):
        v.bootstrap_interval(acc, groups=seeds[:10])


@pytest.mark.parametrize(
    ("interval", "side", "want"),
    [
        ((0.52, 0.60), ">=", v.HOLDS),
        ((0.40, 0.49), ">=", v.FAILS),
        ((0.45, 0.55), ">=", v.INCONCLUSIVE),
        ((0.40, 0.49), "<=", v.HOLDS),
        ((0.52, 0.60), "<=", v.FAILS),
        ((math.nan, math.nan), ">=", v.INCONCLUSIVE),
    ],
)
def test_threshold_verdict_needs_the_whole_interval_on_one_side(interval, side, want):
    assert v.threshold_verdict(interval, 0.5, side) == want
