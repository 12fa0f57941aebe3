"""Three-valued verdicts with a stated test: the statistics every paper driver decides its claims by.

A claim's verdict is ``HOLDS``, ``FAILS`` ("does not hold") or ``INCONCLUSIVE``, computed from the data:

- a threshold claim ("CLP within 5 points of LPO", "MSDR >= 1.5") holds when the whole confidence
  interval of its statistic lies on the claimed side of the threshold, fails when the whole interval
  lies on the other side, and is inconclusive when the interval straddles it (``threshold_verdict``);
- a correlation claim ("the final rank falls as the initial logits norm grows") holds when the
  two-sided permutation test rejects "no association" at ``alpha`` with the claimed sign, fails when it
  rejects with the other sign, and is inconclusive otherwise, or with fewer than ``min_n`` points
  (``correlation_verdict``).

Intervals are percentile bootstraps (``bootstrap_interval``): over the test samples, and, where the
samples come from several seeds, over the seeds first and the samples within each drawn seed second,
so that seeds vote through the same statistic rather than by majority. Every function is seeded and
gives the same answer for the same data.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "does not hold", "inconclusive", "not measured"
LEVEL = 0.95  # confidence level of the intervals
ALPHA = 0.05  # significance level of the correlation tests
MIN_N = 5  # fewer points than this: a correlation is inconclusive whatever its p
RESAMPLES = 10_000  # bootstrap resamples and random permutations
EXACT_PERMUTATIONS = 40_320  # up to 8! orderings the permutation test enumerates them all


def bootstrap_interval(
    samples,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    groups: Sequence | None = None,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistic(samples)`` at ``level``.

    samples: one value per test sample (1 = correct, 0 = wrong for an accuracy); groups: the seed of
    each sample, or None for one seed. With groups, each resample draws the seeds with replacement,
    then the samples of each drawn seed with replacement, so the interval carries the spread between
    seeds as well as within one. (nan, nan) for no samples."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    if groups is None:
        parts = [x]
    else:
        g = np.asarray(groups).reshape(-1)
        if g.shape != x.shape:
            raise ValueError(f"groups: expected one group per sample ({x.size}), got {g.size}")
        parts = [x[g == k] for k in np.unique(g)]
    stats = np.empty(resamples)
    for r in range(resamples):
        chosen = rng.integers(0, len(parts), len(parts)) if len(parts) > 1 else [0]
        draw = np.concatenate([parts[k][rng.integers(0, parts[k].size, parts[k].size)] for k in chosen])
        stats[r] = statistic(draw)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return float(low), float(high)


def threshold_verdict(interval: tuple[float, float], threshold: float, side: str = ">=") -> str:
    """HOLDS when the whole interval lies on ``side`` of threshold (">=" or "<="), FAILS when it lies
    wholly on the other side, INCONCLUSIVE when it straddles the threshold or is NaN."""
    if side not in (">=", "<="):
        raise ValueError(f"side: expected '>=' or '<=', got {side!r}")
    low, high = interval
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    above, below = low >= threshold, high <= threshold
    if side == "<=":
        above, below = below, above
    return HOLDS if above else FAILS if below else INCONCLUSIVE


@dataclass(frozen=True)
class Correlation:
    """A correlation with its test: r, the two-sided permutation p-value, n points, the method and
    whether p was exact (every ordering enumerated)."""

    r: float
    p: float
    n: int
    method: str
    exact: bool

    def text(self) -> str:
        """ "Spearman rho = -0.66, p = 0.16 (exact), n = 6"."""
        name = {"spearman": "Spearman rho", "pearson": "Pearson r"}[self.method]
        if math.isnan(self.r):
            return f"{name} undefined, n = {self.n}"
        return f"{name} = {self.r:.2f}, p = {self.p:.2g}{' (exact)' if self.exact else ''}, n = {self.n}"


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc * yc).sum() / math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum())))


def correlation_test(x, y, method: str = "spearman", *, permutations: int = RESAMPLES, seed: int = 0) -> Correlation:
    """Spearman's (average ranks) or Pearson's correlation over the pairs where both values are
    finite, with the two-sided permutation p-value of "no association": the share of orderings of y
    whose |r| is at least the observed |r| (every ordering when n! <= EXACT_PERMUTATIONS, else
    ``permutations`` random ones, counting the observed one). r and p are NaN for fewer than 3 pairs
    or a constant side, where the correlation is undefined."""
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method: expected 'spearman' or 'pearson', got {method!r}")
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x, y: expected the same number of values, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    exact = math.factorial(n) <= EXACT_PERMUTATIONS if n < 13 else False
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(math.nan, math.nan, n, method, exact)
    if method == "spearman":
        x, y = rankdata(x), rankdata(y)  # average ranks for ties
    r = _pearson(x, y)
    tol = 1e-12 * max(1.0, abs(r))  # orderings that tie the observed |r| up to rounding count as reaching it
    if exact:
        count = sum(abs(_pearson(x, y[list(p)])) >= abs(r) - tol for p in itertools.permutations(range(n)))
        p_value = count / math.factorial(n)
    else:
        rng = np.random.default_rng(seed)
        count = sum(abs(_pearson(x, rng.permutation(y))) >= abs(r) - tol for _ in range(permutations))
        p_value = (count + 1) / (permutations + 1)
    return Correlation(r, float(p_value), n, method, exact)


def correlation_verdict(c: Correlation, sign: int, *, alpha: float = ALPHA, min_n: int = MIN_N) -> str:
    """HOLDS when the test rejects "no association" (p < alpha) with r of the claimed ``sign`` (+1 or
    -1), FAILS when it rejects with the other sign, INCONCLUSIVE otherwise or with fewer than ``min_n``
    points."""
    if sign not in (1, -1):
        raise ValueError(f"sign: expected +1 or -1, got {sign!r}")
    if c.n < min_n or math.isnan(c.p) or c.p >= alpha:
        return INCONCLUSIVE
    return HOLDS if (c.r > 0) == (sign > 0) else FAILS
