"""Tiled pairwise class reductions: any tile size gives the reference's numbers."""

import math

import numpy as np
import pytest
import torch

import ncfast
from helpers import make_data
from ncfast import reference as ref
from ncfast.pairwise import class_pair_stats


@pytest.fixture(params=["cpp", "torch"], autouse=True)
def backend(request, monkeypatch):
    """Every test runs with the fused C++ tile reducer and with the torch one."""
    monkeypatch.setenv("NCFAST_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("tile", [1, 3, 4, 1024])
@pytest.mark.parametrize("weighting", ["balanced", "sample"])
def test_tiles_match_reference(tile, weighting):
    x, y, c = make_data(n=700, d=6, c=11, absent=(4,), imbalanced=True, seed=5)
    superclass = torch.arange(c) % 3
    m = ncfast.class_moments(x, y, weighting=weighting)
    got = ncfast.metrics_from_moments(m, superclass=superclass, weighting=weighting, tile=tile)
    for k in ("cdnv", "nc2_etf", "equiangularity", "coherence", "msdr"):
        want = (
            getattr(ref, k)(x, y, superclass)
            if k == "msdr"
            else (ref.cdnv(x, y) if k == "cdnv" else getattr(ref, k)(x, y, weighting=weighting))
        )
        assert got[k] == pytest.approx(want, rel=1e-9), k


@pytest.mark.parametrize("tile", [2, 3, 1024])
def test_cdnv_is_inf_where_two_classes_share_a_mean(tile, backend):
    """Classes 1, 4 and 5 hold the same rows: their three ratios are (v + v) / 0 = inf, so the mean
    over pairs is inf (as the reference's) and its std NaN, whichever tiles and rows they fall in;
    merging two parts that both held inf had made the mean NaN (inf - inf)."""
    x, y, c = make_data(n=300, d=4, c=6, seed=8, dtype=torch.float64)
    twin = x[y == 1]
    keep = (y != 1) & (y != 4) & (y != 5)
    x = torch.cat([x[keep], twin, twin, twin])
    y = torch.cat([y[keep]] + [torch.full((len(twin),), k) for k in (1, 4, 5)])
    stats = class_pair_stats(ncfast.class_moments(x, y, num_classes=c), tile=tile)
    with np.errstate(divide="ignore"):
        want = ref.cdnv(x, y)
    assert want == np.inf
    if backend == "cpp" or stats.cdnv == np.inf:
        assert stats.cdnv == np.inf and np.isnan(stats.cdnv_std)
    else:  # torch's tiles take ||mu_i - mu_j||^2 = sq_i + sq_j - 2 G_ij: rounding, not 0, may remain
        assert stats.cdnv > 1e12


@pytest.mark.parametrize("tile", [2, 5, 64])
def test_nearest_class_std_and_mean_distance(tile):
    x, y, c = make_data(n=900, d=5, c=13, absent=(0, 7), seed=6)
    m = ncfast.class_moments(x, y)
    stats = class_pair_stats(m, tile=tile)
    means = ref.class_means(x, y)
    v = ref.class_variances(x, y)
    present = [k for k in range(c) if k not in (0, 7)]
    d2 = ((means[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    for i in range(c):
        if i in (0, 7):
            assert stats.nearest_class[i] == -1 and torch.isnan(stats.nearest_sq_distance[i])
            continue
        others = [j for j in present if j != i]
        j = others[int(np.argmin(d2[i, others]))]
        assert stats.nearest_class[i] == j
        assert float(stats.nearest_sq_distance[i]) == pytest.approx(d2[i, j], rel=1e-9)
    iu = [(i, j) for a, i in enumerate(present) for j in present[a + 1 :]]
    ratios = np.array([(v[i] + v[j]) / (2 * d2[i, j]) for i, j in iu])
    assert stats.cdnv_std == pytest.approx(ratios.std(), rel=1e-9)
    dist = ref.class_distance(x, y)
    assert stats.class_distance_mean == pytest.approx(np.mean([dist[i, j] for i, j in iu]), rel=1e-9)


def test_near_etf_keeps_digits():
    """An ETF with tiny within-class spread: nc2_etf and equiangularity near 1e-6 stay accurate."""
    c, d = 6, 8
    etf = np.eye(c, d) - np.hstack([np.full((c, c), 1.0 / c), np.zeros((c, d - c))])
    g = np.random.default_rng(0)
    y = np.repeat(np.arange(c), 50)
    x = torch.from_numpy(etf[y] * 3.0 + 1e-5 * g.standard_normal((len(y), d)))
    yt = torch.from_numpy(y)
    got = ncfast.metrics_from_moments(ncfast.class_moments(x, yt), tile=4)
    for k in ("nc2_etf", "equiangularity", "coherence"):
        want = getattr(ref, k)(x, yt)
        assert 0 < want < 1e-4
        assert got[k] == pytest.approx(want, rel=1e-6), k


@pytest.fixture
def narrow_strips(monkeypatch):
    """The C++ backend's diagonal blocks as row strips of any height (not whole register tiles), so
    small tests reach strips that start inside a block."""
    from ncfast.backends import cpp

    def use(strips):
        monkeypatch.setattr(cpp, "DIAGONAL_STRIPS", strips)
        monkeypatch.setattr(cpp, "STRIP_ALIGN", 1)

    return use


@pytest.mark.parametrize("strips", [1, 2, 3, 7])
@pytest.mark.parametrize("tile", [1, 2, 3, 8])
def test_nearest_class_ties_go_to_the_lowest_index(tile, strips, narrow_strips):
    """Means on a line at 0, 1, 2, ...: every inner class has two nearest neighbours at distance 1,
    one seen from its row and one from its column (of the same strip, or of another)."""
    narrow_strips(strips)
    c = 7
    y = torch.arange(c).repeat(3)
    x = torch.zeros(len(y), 3, dtype=torch.float64)
    x[:, 0] = y.double()
    x[:, 1] = torch.tensor([-1e-3, 0.0, 1e-3]).repeat_interleave(c)
    stats = class_pair_stats(ncfast.class_moments(x, y), tile=tile)
    assert stats.nearest_class.tolist() == [1, 0, 1, 2, 3, 4, 5]


def test_thread_count_changes_pair_stats_only_by_rounding(backend):
    x, y, c = make_data(n=900, d=6, c=40, seed=13)
    m = ncfast.class_moments(x, y)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = class_pair_stats(m, superclass=torch.arange(c) % 4, tile=16)
        torch.set_num_threads(2)
        two = class_pair_stats(m, superclass=torch.arange(c) % 4, tile=16)
    finally:
        torch.set_num_threads(old)
    for k in ("cdnv", "cdnv_std", "nc2_etf", "equiangularity", "coherence", "class_distance_mean", "msdr"):
        assert getattr(two, k) == pytest.approx(getattr(one, k), rel=1e-12), k
    assert torch.equal(one.nearest_class, two.nearest_class)


@pytest.mark.parametrize("strips", [2, 3, 5])
@pytest.mark.parametrize("tile", [13, 130])
def test_diagonal_blocks_as_row_strips(tile, strips, narrow_strips):
    """C++ path: diagonal blocks reduced as row strips that start at the diagonal (their lower
    parts never formed) give the reference's statistics and nearest classes."""
    narrow_strips(strips)
    x, y, c = make_data(n=2600, d=7, c=130, absent=(3, 77), seed=21)
    superclass = torch.arange(c) % 5
    m = ncfast.class_moments(x, y)
    got = ncfast.metrics_from_moments(m, superclass=superclass, tile=tile)
    for k in ("cdnv", "nc2_etf", "equiangularity", "coherence"):
        want = ref.cdnv(x, y) if k == "cdnv" else getattr(ref, k)(x, y)
        assert got[k] == pytest.approx(want, rel=1e-9), k
    assert got["msdr"] == pytest.approx(ref.msdr(x, y, superclass), rel=1e-9)
    stats = class_pair_stats(m, tile=tile)
    means = ref.class_means(x, y)
    d2 = ((means[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    present = np.array([k for k in range(c) if k not in (3, 77)])
    sub = d2[np.ix_(present, present)]
    np.fill_diagonal(sub, np.inf)
    assert stats.nearest_class[present].tolist() == present[sub.argmin(1)].tolist()
    np.testing.assert_allclose(stats.nearest_sq_distance[present].numpy(), sub.min(1), rtol=1e-9)


def test_tile_reducer_takes_any_row_strip():
    """The C++ backend's pair_reducer on a diagonal block cut into strips of uneven heights, each
    from the diagonal rightwards, sums to what the torch backend's reducer gives for the whole block."""
    from ncfast import backends

    x, y, c = make_data(n=1500, d=9, c=61, seed=22)
    m = ncfast.class_moments(x, y)
    mt = m.centred_means("balanced")
    sq = mt.square().sum(1)

    def context():
        return backends.PairContext(
            sq=sq,
            norms=sq.sqrt(),
            var=m.variances.clone(),
            sup=torch.arange(c) % 3,
            g=float(torch.linalg.norm(mt @ mt.T)),
            etf_diag=0.11,
            etf_offdiag=-0.02,
            mean_cos=0.01,
            etf_cos=1.0 / (c - 1),
            best=torch.full((c,), float("inf"), dtype=torch.float64),
            best_idx=torch.full((c,), -1, dtype=torch.int64),
        )

    whole = slice(0, c)
    k_ref = context()
    want = backends.PairSums.total(backends.get("torch").pair_reducer(mt, c, k_ref)(whole, whole))
    k = context()
    reduce = backends.get("cpp").pair_reducer(mt, c, k)
    got = backends.PairSums.total(
        part
        for lo, hi in [(0, 1), (1, 17), (17, 18), (18, 50), (50, 61)]
        for part in reduce(slice(lo, hi), slice(lo, c))
    )
    for key in ("resid", "cos_dev", "coh", "dist", "msdr_sum"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-12), key
    assert got.msdr_n == want.msdr_n
    for key in ("cdnv", "unif"):
        assert getattr(got, key)[0] == getattr(want, key)[0]
        assert getattr(got, key)[1:] == pytest.approx(getattr(want, key)[1:], rel=1e-12)
    assert torch.equal(k.best_idx, k_ref.best_idx)
    torch.testing.assert_close(k.best, k_ref.best, rtol=1e-12, atol=0)
    torch.testing.assert_close(k.ratio_sum, k_ref.ratio_sum, rtol=1e-12, atol=0)


@pytest.mark.parametrize("tile", [48, 50])
def test_many_classes_whole_and_ragged_gram_tiles(tile):
    """C = 130 classes: tiles of 48 are whole 12 x 16 register tiles (the C++ Gram engine writes them
    in place) except the last, tiles of 50 never are; both must give the reference's numbers."""
    x, y, c = make_data(n=2600, d=19, c=130, seed=8)
    superclass = torch.arange(c) % 4
    got = ncfast.metrics_from_moments(ncfast.class_moments(x, y), superclass=superclass, tile=tile)
    for k in ("cdnv", "nc2_etf", "equiangularity", "coherence"):
        want = ref.cdnv(x, y) if k == "cdnv" else getattr(ref, k)(x, y)
        assert got[k] == pytest.approx(want, rel=1e-9), k
    assert got["msdr"] == pytest.approx(ref.msdr(x, y, superclass), rel=1e-9)


@pytest.mark.parametrize("engine_faster", [True, False, None])
def test_tile_products_from_the_engine_or_blas_agree(monkeypatch, backend, engine_faster):
    """On the C++ path the tile products come from the Gram engine or from torch.mm, whichever a
    timing of the pass's first full tiles found faster (backends.cpp._TileProducts): both choices,
    and the pass that times them, give the reference's numbers and the same nearest classes. The
    verdict is forced here (None: no verdict yet, the pass times both)."""
    from ncfast.backends import cpp

    x, y, c = make_data(n=2600, d=19, c=130, seed=9)
    m = ncfast.class_moments(x, y)
    key = (40, 19, torch.get_num_threads())
    monkeypatch.setattr(cpp, "_ENGINE_FASTER", {} if engine_faster is None else {key: engine_faster})
    got = class_pair_stats(m, tile=40)  # 4 x 4 tiles: 10 of the upper triangle, above PROBE_MIN_TILES
    if backend == "cpp" and ncfast._C.gram_available():
        assert key in cpp._ENGINE_FASTER  # a verdict now, timed or forced
    for k in ("cdnv", "nc2_etf", "equiangularity", "coherence"):
        want = ref.cdnv(x, y) if k == "cdnv" else getattr(ref, k)(x, y)
        assert getattr(got, k) == pytest.approx(want, rel=1e-9), k
    means = m.means.numpy()
    d2 = ((means[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    assert got.nearest_class.tolist() == d2.argmin(1).tolist()


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)  # the torch reducer times nothing
def test_product_timing_uses_the_pass_tiles_and_is_remembered(monkeypatch, backend):
    """Without a verdict the pass times the engine (twice, the first its warm-up) and torch.mm
    (once) on its own full tiles, forms every product exactly once, and keeps the verdict for
    (side, D, threads): the next pass times nothing."""
    from ncfast.backends import cpp

    if not ncfast._C.gram_available():
        pytest.skip("this build has no Gram engine: BLAS forms every tile, nothing to time")
    monkeypatch.setattr(cpp, "_ENGINE_FASTER", {})
    monkeypatch.setattr(cpp, "DIAGONAL_STRIPS", 1)  # whole blocks: every product a full tile
    calls = []
    gram_nt, mm = cpp._C.gram_nt, torch.mm
    monkeypatch.setattr(cpp._C, "gram_nt", lambda *a: calls.append("engine") or gram_nt(*a))
    monkeypatch.setattr(cpp.torch, "mm", lambda *a, **kw: calls.append("blas") or mm(*a, **kw))
    x, y, c = make_data(n=2600, d=19, c=130, seed=9)
    m = ncfast.class_moments(x, y)
    class_pair_stats(m, tile=40)
    key = (40, 19, torch.get_num_threads())
    verdict = cpp._ENGINE_FASTER[key]
    assert len(calls) == 10  # the 10 tiles of the upper triangle (4 x 4 tiles), none twice
    assert calls[:3] == ["engine", "engine", "blas"]
    assert set(calls[3:]) == {"engine" if verdict else "blas"}
    calls.clear()
    class_pair_stats(m, tile=40)
    assert calls == ["engine" if verdict else "blas"] * 10


# ------------------------------------------- hyperspherical uniformity, per-class CDNV, exponent
def _check_new_stats(stats, x, y, p, rel, weighting="balanced"):
    from helpers import assert_close

    want_mean, want_var = ref.uniformity(x, y, weighting=weighting)
    assert stats.uniformity_mean == pytest.approx(want_mean, rel=rel)
    assert stats.uniformity_var == pytest.approx(want_var, rel=rel)
    assert stats.cdnv == pytest.approx(ref.cdnv(x, y, cdnv_exponent=p), rel=rel)
    per_class = ref.cdnv_per_class(x, y, num_classes=len(stats.cdnv_per_class), cdnv_exponent=p)
    assert stats.cdnv_per_class.dtype == torch.float64
    assert_close(stats.cdnv_per_class.cpu().numpy(), per_class, rtol=rel, what="cdnv_per_class")


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-6), (torch.float64, 1e-9)])
@pytest.mark.parametrize("tile", [1, 3, 5, 1024])
def test_uniformity_and_per_class_cdnv_match_reference(tile, dtype, rel, p):
    """Tiles smaller than C (ragged last tiles), absent classes (NaN per class), every exponent."""
    x, y, c = make_data(n=700, d=6, c=11, absent=(4, 9), imbalanced=True, seed=31, dtype=dtype)
    for weighting in ("balanced", "sample"):
        m = ncfast.class_moments(x, y, num_classes=c, weighting=weighting)
        stats = class_pair_stats(m, weighting=weighting, tile=tile, cdnv_exponent=p)
        _check_new_stats(stats, x, y, p, rel, weighting)
        assert torch.isnan(stats.cdnv_per_class[[4, 9]]).all()


def test_cdnv_exponent_changes_only_the_cdnv_statistics():
    x, y, c = make_data(n=500, d=5, c=9, seed=32, dtype=torch.float64)
    m = ncfast.class_moments(x, y)
    one, two = class_pair_stats(m, tile=4), class_pair_stats(m, tile=4, cdnv_exponent=2)
    assert one.cdnv != pytest.approx(two.cdnv, rel=1e-3)
    assert one.cdnv == pytest.approx(class_pair_stats(m, tile=4, cdnv_exponent=1.0).cdnv, rel=1e-15)
    for k in ("uniformity_mean", "uniformity_var", "nc2_etf", "equiangularity", "class_distance_mean"):
        assert getattr(one, k) == getattr(two, k), k


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "two", None])
def test_cdnv_exponent_is_validated(bad):
    x, y, c = make_data(n=100, d=3, c=4, seed=33)
    with pytest.raises(ValueError, match="cdnv_exponent"):
        class_pair_stats(ncfast.class_moments(x, y), cdnv_exponent=bad)
    if isinstance(bad, (int, float)):
        for fn in (ref.cdnv, ref.cdnv_per_class):
            with pytest.raises(ValueError, match="cdnv_exponent"):
                fn(x, y, cdnv_exponent=bad)


@pytest.mark.parametrize("tile", [1, 2, 4, 1024])
def test_equal_directions_give_infinite_uniformity(tile):
    """Centred means (3, 4, 0), (3, 4, 0), (-12, -16, 0), (0, 0, 5), (0, 0, -5), (6, 8, 0) and an absent
    class: classes 0, 1 and 5 share a direction (exactly, in float64: cos = 1, 2 - 2 cos = 0), so the
    uniformity mean is inf and its variance NaN, as the reference's; classes 0 and 1 share a mean, so
    their per-class CDNV is inf; the absent class's is NaN."""
    means = torch.tensor([[3, 4, 0], [3, 4, 0], [-12, -16, 0], [0, 0, 5], [0, 0, -5], [6, 8, 0]], dtype=torch.float32)
    y = torch.arange(6).repeat_interleave(2)
    x = means[y] + torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]).repeat(6, 1)
    stats = class_pair_stats(ncfast.class_moments(x, y, num_classes=7), tile=tile)
    with np.errstate(divide="ignore"):
        want = ref.uniformity(x, y, num_classes=7)
        per_class = ref.cdnv_per_class(x, y, num_classes=7)
    assert want[0] == np.inf and np.isnan(want[1])
    assert stats.uniformity_mean == np.inf and np.isnan(stats.uniformity_var)
    assert stats.cdnv == np.inf and np.isnan(stats.cdnv_std)
    got = stats.cdnv_per_class.numpy()
    assert got[0] == got[1] == np.inf and np.isnan(got[6])
    np.testing.assert_allclose(got[2:6], per_class[2:6], rtol=1e-12)


@pytest.mark.parametrize("strips", [2, 3, 5])
def test_new_stats_over_diagonal_row_strips(strips, narrow_strips):
    """C++ path: diagonal blocks as row strips of any height (ragged tiles of 13 over 130 classes)."""
    narrow_strips(strips)
    x, y, c = make_data(n=2600, d=7, c=130, absent=(3, 77), seed=34, dtype=torch.float64)
    m = ncfast.class_moments(x, y)
    for p in (1.0, 0.5):
        _check_new_stats(class_pair_stats(m, tile=13, cdnv_exponent=p), x, y, p, 1e-9)


def test_thread_count_changes_new_stats_only_by_rounding(backend):
    x, y, c = make_data(n=900, d=6, c=40, seed=35)
    m = ncfast.class_moments(x, y)
    old = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(class_pair_stats(m, tile=16, cdnv_exponent=0.5))
    finally:
        torch.set_num_threads(old)
    one, two = got
    for k in ("uniformity_mean", "uniformity_var", "cdnv", "cdnv_std"):
        assert getattr(two, k) == pytest.approx(getattr(one, k), rel=1e-12), k
    torch.testing.assert_close(two.cdnv_per_class, one.cdnv_per_class, rtol=1e-12, atol=0)


def test_many_classes_need_no_c_by_c_matrix(monkeypatch, backend):
    """C = 3,000 classes in tiles of 256: the backend's tile reducer only ever sees blocks of at most
    256 x 256 (12 x 12 tiles of the upper triangle), and the new statistics match the dense float64
    computation."""
    from ncfast import backends

    c, d = 3000, 8
    g = torch.Generator().manual_seed(36)
    y = torch.arange(c).repeat(2)
    x = torch.randn(c, d, generator=g, dtype=torch.float64)[y] + 0.1 * torch.randn(
        2 * c, d, generator=g, dtype=torch.float64
    )
    shapes = []
    impl = backends.get(backend)
    make = impl.pair_reducer

    def recording(mt, tile, ctx):
        reduce = make(mt, tile, ctx)
        return lambda rows, cols: shapes.append((rows.stop - rows.start, cols.stop - cols.start)) or reduce(rows, cols)

    monkeypatch.setattr(impl, "pair_reducer", recording)
    old = torch.get_num_threads()
    # One thread: the torch reducer's ~1,000 small operations each wait at a thread barrier
    # otherwise, which on a loaded machine took seconds instead of 0.1 s.
    torch.set_num_threads(1)
    try:
        stats = class_pair_stats(ncfast.class_moments(x, y), tile=256)
    finally:
        torch.set_num_threads(old)
    assert len(shapes) >= 12 * 13 // 2 and max(max(s) for s in shapes) <= 256
    means = ref.class_means(x, y)
    v = ref.class_variances(x, y)
    mt = means - means.mean(0)
    u = mt / np.linalg.norm(mt, axis=1, keepdims=True)
    per_class, terms = np.empty(c), []
    for i0 in range(0, c, 250):  # the dense check in row blocks, without C x C x D temporaries
        rows = slice(i0, i0 + 250)
        d2 = ((means[rows, None] - means[None]) ** 2).sum(-1)
        own = np.arange(i0, min(c, i0 + 250))
        d2[own - i0, own] = np.inf
        per_class[rows] = ((v[rows, None] + v[None]) / (2 * d2)).sum(1) / (c - 1)
        du = np.sqrt(((u[rows, None] - u[None]) ** 2).sum(-1))
        terms.append(-np.log(du[np.arange(c)[None] > own[:, None]]))
    terms = np.concatenate(terms)
    np.testing.assert_allclose(stats.cdnv_per_class.numpy(), per_class, rtol=1e-9)
    assert stats.uniformity_mean == pytest.approx(terms.mean(), rel=1e-9)
    assert stats.uniformity_var == pytest.approx(terms.var(), rel=1e-9)


def test_uniformity_of_means_on_a_line_is_inf_like_the_reference(backend):
    """Every feature a multiple of one vector (float64): two of the three centred means point the
    same way, so their unit vectors are equal up to rounding and log(1 / ||u_i - u_j||) would be the
    logarithm of a rounding error. Within 4 (D + 4) eps both count the directions as equal: the
    mean is +inf and the variance NaN."""
    g = torch.Generator().manual_seed(8)
    y = torch.arange(120) % 3
    t = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)[y] + 0.3 * torch.randn(
        120, generator=g, dtype=torch.float64
    )
    x = t.unsqueeze(1) * torch.randn(16, generator=g, dtype=torch.float64)
    stats = class_pair_stats(ncfast.class_moments(x, y))
    want = ref.uniformity(x, y)
    assert stats.uniformity_mean == want[0] == math.inf
    assert math.isnan(stats.uniformity_var) and math.isnan(want[1])
