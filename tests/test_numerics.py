"""ncfast._numerics: Chan's merge (the one implementation every backend and ClassMoments use), IEEE
ratios and the certified score bounds, against hand-computed and float64 brute-force values."""

import math

import numpy as np
import pytest
import torch

from ncfast import _numerics


def _parts(values, cuts):
    """(n, mean (., 1), M2) of consecutive slices of ``values``, as chan_reduce takes them."""
    pieces = np.split(np.asarray(values, dtype=np.float64), cuts)
    n = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
    mean = torch.tensor([[p.mean() if len(p) else 0.0] for p in pieces], dtype=torch.float64)
    m2 = torch.tensor([((p - p.mean()) ** 2).sum() if len(p) else 0.0 for p in pieces], dtype=torch.float64)
    return n, mean, m2


@pytest.mark.parametrize("cuts", [[1], [3, 3, 9], [0, 5, 5, 20], list(range(1, 23))])
def test_chan_reduce_equals_the_two_pass_moments(cuts):
    g = np.random.default_rng(len(cuts))
    values = 1e3 + 0.1 * g.standard_normal(23)  # spread 1e-4 of the mean: no raw second moments
    n, mu, m2 = _numerics.chan_reduce(*_parts(values, cuts))
    assert int(n) == 23
    assert float(mu[0]) == pytest.approx(values.mean(), rel=1e-15)
    assert float(m2) == pytest.approx(((values - values.mean()) ** 2).sum(), rel=1e-9)


def test_chan_merge_per_class_with_empty_parts():
    """Vectors of classes: a class empty in one part keeps the other's statistics exactly; the
    weight and delta give the scatter correction n_a n_b / n delta delta^T."""
    n_a = torch.tensor([3, 0, 2])
    n_b = torch.tensor([1, 4, 0])
    mean_a = torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, -1.0]], dtype=torch.float64)
    mean_b = torch.tensor([[3.0, 2.0], [7.0, 8.0], [0.0, 0.0]], dtype=torch.float64)
    m2_a = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    m2_b = torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    n, mean, m2, delta, weight = _numerics.chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    assert n.tolist() == [4, 4, 2]
    assert mean.tolist() == [[1.5, 2.0], [7.0, 8.0], [5.0, -1.0]]
    assert m2.tolist() == [1.0 + 0.75 * 4.0, 2.0, 0.5]  # n_a n_b / n ||delta||^2 = 3/4 * 4
    assert weight.tolist() == [0.75, 0.0, 0.0]
    assert delta.tolist() == [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_chan_merge_of_an_infinite_mean():
    """A part whose mean is +inf (an infinite CDNV ratio): the merged mean is inf and M2 NaN, never
    a NaN mean; an empty part beside it changes nothing."""
    inf = math.inf
    parts = (
        torch.tensor([2, 3, 0]),
        torch.tensor([[1.0], [inf], [0.0]], dtype=torch.float64),
        torch.tensor([0.5, math.nan, 0.0], dtype=torch.float64),
    )
    n, mean, m2 = _numerics.chan_reduce(*parts)
    assert int(n) == 5 and float(mean[0]) == inf and math.isnan(float(m2))
    assert _numerics.scalar_moments([(2, 1.0, 0.5), (0, 0.0, 0.0), (3, inf, math.nan)])[1] == inf
    assert _numerics.scalar_moments([]) == (0, 0.0, 0.0)


def test_ieee_ratio():
    assert _numerics.ieee_ratio(1.0, 0.0) == math.inf
    assert _numerics.ieee_ratio(-1.0, 0.0) == -math.inf
    assert _numerics.ieee_ratio(1.0, -0.0) == -math.inf
    assert math.isnan(_numerics.ieee_ratio(0.0, 0.0))
    assert _numerics.ieee_ratio(3.0, 2.0) == 1.5


def test_float32_score_bound_covers_worst_rounding():
    """rel_float(U32, d) (||x|| cmax + omax) bounds |float32 score - exact score| for rows and centres
    drawn to make the dot product cancel (its error then is largest next to the score)."""
    g = np.random.default_rng(3)
    d = 257
    x = g.standard_normal((400, d)).astype(np.float32)
    c = g.standard_normal((6, d)).astype(np.float32)
    o = g.standard_normal(6).astype(np.float32)
    exact = o.astype(np.float64) + x.astype(np.float64) @ c.astype(np.float64).T
    got = (o + x @ c.T).astype(np.float64)
    rel = _numerics.rel_float(_numerics.U32, d)
    bound = _numerics.score_bound(
        rel,
        np.linalg.norm(x.astype(np.float64), axis=1)[:, None],
        float(np.linalg.norm(c.astype(np.float64), axis=1).max()),
        float(np.abs(o).max()),
    )
    assert (np.abs(got - exact) <= bound).all()
    assert _numerics.rel_bf16_fma(d) > rel and _numerics.rel_tensor_core("ieee", d) == rel
    with pytest.raises(ValueError, match="dot: expected"):
        _numerics.rel_tensor_core("fp8", d)


def test_top2_and_coincidence_floor():
    best, first, second = _numerics.top2(torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, 6.0]]))
    assert best.tolist() == [1, 0] and first.tolist() == [1.0, 5.0] and second.tolist() == [2.0, 5.0]
    assert _numerics.coincidence_floor(12) == 4.0 * 16 * 2.0**-53


def test_certain_needs_finite_scores_in_range_and_a_gap_over_twice_the_bound():
    """The certificate of every sweep: (best, second, magnitude) rows, rel = 0.1, range 100."""
    inf, nan = float("inf"), float("nan")
    best = torch.tensor([1.0, 1.0, 1.0, -inf, 1.0, nan, 1.0, 1.0], dtype=torch.float64)
    second = torch.tensor([3.0, 2.9, inf, 1.0, nan, 3.0, 3.0, 3.0], dtype=torch.float64)
    magnitude = torch.tensor([9.0, 10.0, 9.0, 9.0, 9.0, 9.0, 100.0, nan], dtype=torch.float64)
    # gap 2 > 2 * 0.9; gap 1.9 not > 2 * 1.0; inf or NaN scores; magnitude at the range; NaN magnitude
    want = [True, False, False, False, False, False, False, False]
    assert _numerics.certain(best, second, magnitude, 0.1, 100.0).tolist() == want
