"""Tiled pairwise class reductions: any tile size gives the reference's numbers."""
import numpy as np
import pytest
import torch

import ncfast
from ncfast import reference as ref
from ncfast.pairwise import class_pair_stats
from conftest import make_data


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
        want = getattr(ref, k)(x, y, superclass) if k == "msdr" else (
            ref.cdnv(x, y) if k == "cdnv" else getattr(ref, k)(x, y, weighting=weighting))
        assert got[k] == pytest.approx(want, rel=1e-9), k


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


@pytest.mark.parametrize("tile", [1, 2, 3, 8])
def test_nearest_class_ties_go_to_the_lowest_index(tile):
    """Means on a line at 0, 1, 2, ...: every inner class has two nearest neighbours at distance 1."""
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


@pytest.mark.parametrize("engine_faster", [True, False])
def test_tile_products_from_the_engine_or_blas_agree(monkeypatch, backend, engine_faster):
    """On the C++ path the tile products come from the Gram engine or from torch.mm, whichever a
    one-off timing found faster (pairwise._engine_faster): both choices give the reference's
    numbers and the same nearest classes. The timing's verdict is forced here."""
    from ncfast import pairwise

    x, y, c = make_data(n=2600, d=19, c=130, seed=9)
    m = ncfast.class_moments(x, y)
    timed = []
    monkeypatch.setattr(pairwise, "_engine_faster", lambda mt, side: timed.append(side) or engine_faster)
    got = pairwise.class_pair_stats(m, tile=40)  # 4 x 4 tiles: 10 of the upper triangle, above PROBE_MIN_TILES
    assert timed == ([40] if backend == "cpp" and ncfast._C.gram_available() else [])
    for k in ("cdnv", "nc2_etf", "equiangularity", "coherence"):
        want = ref.cdnv(x, y) if k == "cdnv" else getattr(ref, k)(x, y)
        assert getattr(got, k) == pytest.approx(want, rel=1e-9), k
    means = m.means.numpy()
    d2 = ((means[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    assert got.nearest_class.tolist() == d2.argmin(1).tolist()


def test_engine_probe_remembers_its_verdict(monkeypatch):
    """_engine_faster times both products once per (side, D, threads) and keeps the answer."""
    from ncfast import pairwise

    monkeypatch.setattr(pairwise, "_ENGINE_FASTER", {})
    mt = torch.randn(64, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if not ncfast._C.gram_available():
        pytest.skip("this build has no Gram engine: BLAS forms every tile, nothing to probe")
    first = pairwise._engine_faster(mt, 32)
    assert pairwise._ENGINE_FASTER == {(32, 24, torch.get_num_threads()): first}
    monkeypatch.setattr(pairwise._C, "gram_nt", lambda *a: pytest.fail("timed twice"))
    assert pairwise._engine_faster(mt, 32) == first
