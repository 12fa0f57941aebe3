"""Valid input never raises from inside a solver (docs/metrics.md §14.4): dead ReLU units (many
all-zero columns), duplicated columns, rank 1 and rank far below D, clustered eigenvalues, and the
fallbacks of ncfast._linalg when torch's solvers fail. Every metric is held to the float64
reference (ncfast.reference) at relative 1e-6 or tighter."""

import math
import weakref

import numpy as np
import pytest
import scipy.linalg
import torch

import ncfast
from helpers import assert_close
from ncfast import _linalg
from ncfast import reference as ref

RTOL = 1e-8  # tighter than the documented 1e-6: nothing here is in the collapse regime
ATOL = 1e-12


def _assert_matches(got, want, rtol=RTOL, atol=ATOL):
    assert set(want) <= set(got), set(want) - set(got)
    for k in want:
        assert math.isfinite(want[k]), k  # every case here has finite metrics
        assert_close(got[k], want[k], rtol=rtol, atol=atol, what=k)


def _relu_layer(n, d, live, c, seed, dup=0, dtype=torch.float32):
    """An (n, d) ReLU layer with ``live`` working units at random positions (the others all zero,
    dead), plus ``dup`` more columns that copy live ones (exactly, times 1, 2 or -0.5). Labels
    cycle over c classes. Returns (x, y, indices of the non-zero columns)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    means = torch.randn(c, live, generator=g, dtype=torch.float64)
    z = torch.relu(means[y] + torch.randn(n, live, generator=g, dtype=torch.float64)).to(dtype)
    cols = torch.randperm(d, generator=g)[: live + dup]
    x = torch.zeros(n, d, dtype=dtype)
    x[:, cols[:live]] = z
    if dup:
        src = torch.randint(0, live, (dup,), generator=g)
        scale = torch.tensor([1.0, 2.0, -0.5], dtype=dtype)[torch.randint(0, 3, (dup,), generator=g)]
        x[:, cols[live:]] = z[:, src] * scale
    return x, y, cols.sort().values


def _dead_unit_sigma_w_fails_torch(x, y):
    """Whether torch.linalg.eigh raises on this layer's balanced Sigma_W (MKL's syevd does on the
    seeds below; another LAPACK may converge, and then the test still checks the values)."""
    sw = ncfast.class_moments(x, y).sigma_w("balanced")
    try:
        torch.linalg.eigh(sw)
    except torch.linalg.LinAlgError:
        return True
    return False


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
def test_dead_units_nc_metrics_equal_reference(weighting):
    """The issue's layer, synthetic: 360 x 512, 492 dead units, N < D. torch.linalg.eigh of Sigma_W
    raised LinAlgError inside nc_metrics' VCI and killed the training run."""
    x, y, _ = _relu_layer(360, 512, 20, 10, seed=11)
    assert int((x != 0).any(0).sum()) == 20
    got = ncfast.nc_metrics(x, y, weighting=weighting)
    want = ref.nc_metrics(x, y, weighting=weighting)
    _assert_matches(got, want)
    assert got.ranks["sigma_t"] == 20 and got.ranks["sigma_w"] == 20 and got.ranks["sigma_b"] == 9
    assert 0.0 < got["vci"] < 1.0


def test_dead_units_reproducer_fails_plain_torch_eigh_here():
    """Documents the root cause on this build: plain torch.linalg.eigh of the dead-unit Sigma_W
    fails on these seeds (MKL's divide and conquer in the torch 2.13 CPU wheel; 9 of seeds 10-29
    in float64), and _linalg.sym_eigh does not and agrees with numpy's eigenvalues. Skipped where
    torch's LAPACK converges on both."""
    failing = []
    for seed in (11, 25):
        x, y, _ = _relu_layer(360, 512, 20, 10, seed=seed, dtype=torch.float64)
        if _dead_unit_sigma_w_fails_torch(x, y):
            failing.append((x, y))
    if not failing:
        pytest.skip("torch.linalg.eigh converged on every seed with this LAPACK")
    for x, y in failing:
        sw = ncfast.class_moments(x, y).sigma_w("balanced")
        w, v = _linalg.sym_eigh(sw)
        assert v.shape == (512, 512)
        assert torch.allclose(v.T @ v, torch.eye(512, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(sw @ v, v * w, atol=1e-12 * float(w.max()))
        np.testing.assert_allclose(w.numpy(), np.linalg.eigvalsh(sw.numpy()), rtol=0, atol=1e-13 * float(w.max()))
        assert int((w == 0).sum()) >= 492  # the dead units' exact zeros are put back


def test_dead_units_streamed_moments_equal_reference():
    """metrics_from_moments on a ClassMoments fed in batches, dead units and duplicated live units
    (Sigma_W singular on the live block too: the reference's 50-digit range form)."""
    x, y, _ = _relu_layer(300, 256, 14, 6, seed=3, dup=8, dtype=torch.float64)
    m = ncfast.ClassMoments(6, 256)
    for lo in range(0, 300, 64):
        m.update(x[lo : lo + 64], y[lo : lo + 64])
    got = ncfast.metrics_from_moments(m)
    want = ref.nc_metrics(x, y)
    want.pop("ncc_accuracy")  # nc_metrics only (a second pass over the features)
    _assert_matches(got, want)
    assert got.ranks["sigma_t"] == 14 and got.ranks["sigma_w"] == 14


def test_duplicated_columns():
    """Every column a copy of one of 5 (times 1, 2 or -0.5): Sigma_W and Sigma_T of rank 5 in D = 30,
    no zero row to deflate, so torch's solvers see the repeated zero eigenvalues themselves."""
    g = torch.Generator().manual_seed(5)
    y = torch.arange(200) % 4
    z = torch.randn(4, 5, generator=g, dtype=torch.float64)[y] + 0.5 * torch.randn(
        200, 5, generator=g, dtype=torch.float64
    )
    src = torch.cat([torch.arange(5), torch.randint(0, 5, (25,), generator=g)])
    scale = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)[torch.randint(0, 3, (30,), generator=g)]
    x = z[:, src] * scale
    assert bool((x != 0).all())
    for weighting in ("balanced", "sample"):
        got = ncfast.nc_metrics(x, y, weighting=weighting)
        _assert_matches(got, ref.nc_metrics(x, y, weighting=weighting))
        assert got.ranks["sigma_t"] == 5 and got.ranks["sigma_w"] == 5


def test_rank_one_features():
    """Features on one line through a shifted origin: rank(Sigma_T) = rank(Sigma_W) = rank(Sigma_B) = 1."""
    g = torch.Generator().manual_seed(8)
    y = torch.arange(120) % 3
    t = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)[y] + 0.3 * torch.randn(
        120, generator=g, dtype=torch.float64
    )
    v = torch.randn(16, generator=g, dtype=torch.float64)
    x = (t.unsqueeze(1) * v + 7.0).to(torch.float32)
    got = ncfast.nc_metrics(x, y)
    want = ref.nc_metrics(x, y)
    # Two of the three centred means point nearly the same way along the line (3.7e-6 rad apart,
    # set by the float32 rounding of the features): uniformity from the Gram's 2 - 2 cos_ij is then
    # good to D eps / (2 - 2 cos_ij) absolute (class_pair_stats' documented limit), not to 1e-6.
    u = ref.class_means(x, y)
    u = u - u.mean(0)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    closest = min(float(np.sum((u[i] - u[j]) ** 2)) for i in range(3) for j in range(i + 1, 3))
    assert 1e-12 < closest < 1e-10
    assert abs(got.pop("uniformity_mean") - want.pop("uniformity_mean")) <= 4 * 16 * 2.0**-53 / closest
    want.pop("uniformity_var")
    got.pop("uniformity_var")
    _assert_matches(got, want, rtol=1e-7)
    assert got.ranks == {"sigma_b": 1, "sigma_w": 1, "sigma_t": 1}
    assert got["rank"] == 1.0 and got["effective_rank"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
def test_rank_far_below_d_dead_and_mixed_units(weighting):
    """Rank 3 in D = 1,024: 1,000 dead units, and 24 live ones that are dense mixtures of 3 latent
    features (Sigma_W singular on the live block; no exact zero besides the dead rows)."""
    g = torch.Generator().manual_seed(11)
    y = torch.arange(150) % 5
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)[y] + 0.7 * torch.randn(
        150, 3, generator=g, dtype=torch.float64
    )
    cols = torch.randperm(1024, generator=g)[:24]
    x = torch.zeros(150, 1024, dtype=torch.float64)
    x[:, cols] = z @ torch.randn(3, 24, generator=g, dtype=torch.float64)
    got = ncfast.nc_metrics(x, y, weighting=weighting)
    _assert_matches(got, ref.nc_metrics(x, y, weighting=weighting), rtol=1e-7)
    assert got.ranks["sigma_t"] == 3 and got.ranks["sigma_w"] == 3 and got.ranks["sigma_b"] == 3


def test_rank_far_below_d_dense_rotation():
    """Rank 4 in D = 256 with every column dense (4 latent features rotated by a random isometry).
    The reference's 50-digit range form would take minutes at D = 256, so VCI is held to the
    reference on the latent features (VCI is invariant under the isometry, and nothing here is
    near collapse: the rounding of the rotation moves it by ~1e-15); every other metric against
    the reference on the features themselves."""
    g = torch.Generator().manual_seed(13)
    y = torch.arange(240) % 5  # r = min(D, C - 1) = 4 for the latent features too
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)[y] + torch.randn(240, 4, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(256, 4, generator=g, dtype=torch.float64))
    x = z @ q.T
    got = ncfast.nc_metrics(x, y)
    per_feature = (
        ref.nc1,
        ref.fuzziness,
        ref.squared_distance,
        ref.nc2_etf,
        ref.equinorm,
        ref.equiangularity,
        ref.coherence,
        ref.cdnv,
        ref.cosine_separation,
        ref.rank,
        ref.effective_rank,
        ref.ncc_accuracy,
    )
    want = {fn.__name__: float(fn(x, y)) for fn in per_feature}
    want["feature_norm"] = ref.feature_norm(x)
    want["vci"] = ref.vci(z, y)
    want["uniformity_mean"], want["uniformity_var"] = ref.uniformity(x, y)
    assert len(want) == len(ref.nc_metrics(z, y))  # every metric of nc_metrics is checked
    _assert_matches(got, want, rtol=1e-7)
    assert got.ranks["sigma_t"] == 4 and got.ranks["sigma_w"] == 4


def test_clustered_eigenvalues():
    """Sigma_T's spectrum in tight clusters (scales 1, 1, 1, 1 + 1e-9, 1e-3 x 3, plus exact
    repeats), rotated so that no coordinate is special: D = 24, rank 7."""
    g = torch.Generator().manual_seed(17)
    y = torch.arange(400) % 5
    scales = torch.tensor([1.0, 1.0, 1.0, 1.0 + 1e-9, 1e-3, 1e-3, 1e-3], dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    z = (
        torch.randn(400, 7, generator=g, dtype=torch.float64)
        + 0.2 * torch.randn(5, 7, generator=g, dtype=torch.float64)[y]
    )
    z = (z @ basis) * scales
    q, _ = torch.linalg.qr(torch.randn(24, 7, generator=g, dtype=torch.float64))
    x = z @ q.T
    got = ncfast.nc_metrics(x, y)
    _assert_matches(got, ref.nc_metrics(x, y), rtol=1e-7)
    assert got.ranks["sigma_t"] == 7


def test_d_4096_dead_units():
    """D = 4,096 with 4,016 dead units and 80 live ones. The dense reference sums O(N D^2) outer
    products per covariance (~8 s each at D = 4,096 on 2 cores, a dozen of them), so it runs on
    the live columns: the dead ones add exact zero rows and columns to every covariance and
    nothing to any metric (r = min(D, C - 1) = C - 1 in both). VCI is also checked against ref.vci
    on all 4,096 columns (it drops constant columns itself). No copied columns here: they would
    send the reference to its 50-digit form at D = 96 (30 s); test_duplicated_columns has them."""
    x, y, cols = _relu_layer(300, 4096, 80, 10, seed=21)
    got = ncfast.nc_metrics(x, y)
    want = ref.nc_metrics(x[:, cols], y)
    _assert_matches(got, want, rtol=1e-7)
    assert got["vci"] == pytest.approx(ref.vci(x, y), rel=1e-7)
    assert got.ranks["sigma_t"] == 80 and got.ranks["sigma_w"] == 80


# ------------------------------------------------------------------------------------------------
# The fallbacks: torch's solvers made to fail
# ------------------------------------------------------------------------------------------------


def _raise(*a, **k):
    raise torch.linalg.LinAlgError("forced failure (test)")


def _break_torch(monkeypatch):
    for name in ("eigh", "eigvalsh", "svd", "svdvals"):
        monkeypatch.setattr(torch.linalg, name, _raise)


def _count_scipy(monkeypatch, fail_drivers=()):
    """Counts scipy.linalg.eigh / svd calls by driver; the drivers in fail_drivers raise."""
    seen = []
    real_eigh, real_svd = scipy.linalg.eigh, scipy.linalg.svd

    def eigh(*a, driver=None, **k):
        seen.append(driver)
        if driver in fail_drivers:
            raise np.linalg.LinAlgError(f"forced failure of {driver} (test)")
        return real_eigh(*a, driver=driver, **k)

    def svd(*a, lapack_driver="gesdd", **k):
        seen.append(lapack_driver)
        if lapack_driver in fail_drivers:
            raise np.linalg.LinAlgError(f"forced failure of {lapack_driver} (test)")
        return real_svd(*a, lapack_driver=lapack_driver, **k)

    monkeypatch.setattr(scipy.linalg, "eigh", eigh)
    monkeypatch.setattr(scipy.linalg, "svd", svd)
    return seen


FALLBACK_CASES = {
    "full_rank": lambda: (
        torch.randn(500, 12, generator=torch.Generator().manual_seed(1))
        + 3 * torch.randn(7, 12, generator=torch.Generator().manual_seed(2))[torch.arange(500) % 7],
        torch.arange(500) % 7,
    ),
    "dead_units": lambda: _relu_layer(360, 512, 20, 10, seed=11)[:2],
    "singular_live": lambda: _relu_layer(200, 64, 10, 5, seed=4, dup=6, dtype=torch.float64)[:2],
}


@pytest.mark.parametrize(
    "fail",
    [(), ("evr",), ("evr", "ev"), ("gesdd",), ("gesdd", "gesvd")],
    ids=["scipy_evr", "scipy_ev", "eig_by_svd", "svd_gesvd", "svd_by_gram"],
)
@pytest.mark.parametrize("case", sorted(FALLBACK_CASES))
def test_fallbacks_equal_reference(case, fail, monkeypatch):
    """torch.linalg.eigh / eigvalsh / svd / svdvals raise LinAlgError; each rung of the fallback
    (scipy's MRRR, then QR iteration, then gesvd, then the Gram matrix) still gives the reference's
    metrics, and the rung was actually used."""
    x, y = FALLBACK_CASES[case]()
    want = ref.nc_metrics(x, y)
    _break_torch(monkeypatch)
    seen = _count_scipy(monkeypatch, fail)
    got = ncfast.nc_metrics(x, y)
    rtol = 1e-6 if "gesvd" in fail else RTOL  # the Gram rung squares: eps * ||a||^2 absolute
    _assert_matches(got, want, rtol=rtol, atol=1e-10)
    assert seen, "no fallback ran"
    if not fail:
        assert "evr" in seen and set(seen) <= {"evr", "gesdd"}
    if fail == ("evr",):
        assert "ev" in seen
    if fail == ("evr", "ev"):
        assert "gesvd" in seen  # the symmetric eigenproblem by an SVD
    if fail == ("gesdd",):
        assert "gesvd" in seen
    if fail == ("gesdd", "gesvd"):
        assert "evr" in seen  # svdvals by the Gram matrix's eigenvalues


def test_sym_eigh_deflation_and_fallbacks_unit(monkeypatch):
    """_linalg on a matrix with scattered zero rows: eigenpairs exact for every rung, eigenvalue
    count and order as torch's."""
    g = torch.Generator().manual_seed(9)
    f = torch.randn(6, 40, generator=g, dtype=torch.float64)
    f[:, torch.randperm(40, generator=g)[:30]] = 0  # 30 scattered zero rows and columns of a
    a = f.T @ f
    want = np.linalg.eigvalsh(a.numpy())
    for fail in ((), ("evr",), ("evr", "ev")):
        monkeypatch.undo()
        _break_torch(monkeypatch)
        _count_scipy(monkeypatch, fail)
        w, v = _linalg.sym_eigh(a)
        np.testing.assert_allclose(w.numpy(), want, rtol=0, atol=1e-12 * want[-1])
        np.testing.assert_allclose(_linalg.sym_eigvalsh(a).numpy(), want, rtol=0, atol=1e-12 * want[-1])
        assert torch.allclose(v.T @ v, torch.eye(40, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(a @ v, v * w, atol=1e-11 * want[-1])
    f = f[:, (f != 0).any(0)]  # 6 x 10: full rank, so every left singular vector is determined
    s = np.linalg.svd(f.numpy(), compute_uv=False)
    for fail in ((), ("gesdd",), ("gesdd", "gesvd")):
        monkeypatch.undo()
        _break_torch(monkeypatch)
        _count_scipy(monkeypatch, fail)
        np.testing.assert_allclose(_linalg.svdvals(f).numpy(), s, rtol=0, atol=1e-7 * s[0])
        u, s2 = _linalg.svd_left(f)
        np.testing.assert_allclose(s2.numpy(), s, rtol=0, atol=1e-7 * s[0])
        assert torch.allclose(u.T @ u, torch.eye(6, dtype=torch.float64), atol=1e-10)
        assert torch.allclose((u.T @ f).square().sum(1).sqrt(), s2, rtol=1e-8)  # u_k^T f = s_k v_k^T
    monkeypatch.undo()
    assert _linalg.live_coordinates(a) is not None and _linalg.live_coordinates(a + torch.eye(40)) is None


def test_digits_mlp_with_dead_units_trains_through(tmp_path, monkeypatch):
    """The issue's run: `python -m ncfast.train --dataset digits --arch mlp --logit-scale 100
    --epochs 5` raised LinAlgError on the 360-sample test split (453 of 512 units dead). It now
    finishes, and the layer with the most dead units gets the reference's metrics."""
    from ncfast import passes
    from ncfast.stats import ClassMoments
    from ncfast.train.__main__ import main

    feats, checked = weakref.WeakKeyDictionary(), []  # each ClassMoments -> the rows it was fed
    real_update, real_metrics = ClassMoments.update, passes._metrics_from_moments

    def update(self, features, labels, **k):
        feats.setdefault(self, []).append((features.detach().clone(), labels.detach().clone()))
        return real_update(self, features, labels, **k)

    def metrics(moments, backend, **k):
        out = real_metrics(moments, backend, **k)
        parts = feats.get(moments)
        if parts is not None and moments.has_scatter and moments.num_samples == 360:
            x = torch.cat([p[0] for p in parts])
            dead = int((x == 0).all(0).sum())
            if dead >= 400 and not checked:
                checked.append(dead)
                want = ref.nc_metrics(
                    x,
                    torch.cat([p[1] for p in parts]),
                    num_classes=moments.num_classes,
                    weighting=k.get("weighting", "balanced"),
                )
                want.pop("ncc_accuracy")
                _assert_matches(out, want, rtol=1e-7, atol=1e-10)
        return out

    monkeypatch.setattr(ClassMoments, "update", update)
    monkeypatch.setattr(passes, "_metrics_from_moments", metrics)
    assert (
        main(
            [
                "--dataset",
                "digits",
                "--arch",
                "mlp",
                "--logit-scale",
                "100",
                "--epochs",
                "5",
                "--out",
                str(tmp_path / "dead"),
                "--no-progress",
                "--metrics-every",
                "5",
                "--clp-embed",
                "none",
            ]
        )
        == 0
    )
    assert checked, "no measured layer had 400 dead units: the reproducer no longer reproduces"


def _low_rank_psd(n, k, seed, scale_tail=0.0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.logspace(0, -3, k, dtype=torch.float64)
    return f @ f.T


@pytest.mark.parametrize("k", [0, 1, 7, 40])
def test_pivoted_cholesky_finds_the_rank_and_reproduces_the_matrix(k):
    """LAPACK's dpstrf (the CPU route) and the left-looking loop (other devices) both stop at the
    rank, reproduce the matrix to rounding, and bound what they leave out."""
    a = _low_rank_psd(60, k, seed=k) if k else torch.zeros(60, 60, dtype=torch.float64)
    m, rest = _linalg.pivoted_cholesky(a)
    top = float(a.diagonal().max()) if k else 1.0
    tol = 60 * np.finfo(np.float64).eps * top
    loop = _linalg._pivoted_cholesky_loop(a, tol, 60)
    assert m.shape == (60, k) and loop.shape == (60, k)
    for f in (m, loop):
        assert_close((f @ f.T).numpy(), a.numpy(), rtol=0, atol=1e-13 * top, what="M M^T")
    assert 0 <= rest <= 1e-12 * top
    if k:  # the same pivots: equal factors up to rounding
        assert_close(loop.numpy(), m.numpy(), rtol=0, atol=1e-10 * math.sqrt(top), what="loop vs dpstrf")
    capped = _linalg._pivoted_cholesky_loop(a, tol, 3)
    assert capped.shape[1] == min(3, k)
    short, short_rest = _linalg.pivoted_cholesky(a, max_rank=3)  # the columns past 3 are left out
    assert short.shape[1] == min(3, k) and (short_rest > 1e-6 * top if k > 3 else short_rest <= 1e-12 * top)
    nan = a.clone()
    nan[3, 3] = math.nan
    assert math.isnan(_linalg.pivoted_cholesky(nan)[1])


def _eigen_sizes(monkeypatch):
    """The sizes of every symmetric eigenproblem metrics solves: [(n, with vectors)]."""
    from ncfast import metrics as metrics_mod

    seen = []
    for name, vectors in (("sym_eigh", True), ("sym_eigvalsh", False)):
        inner = getattr(_linalg, name)
        monkeypatch.setattr(
            metrics_mod._linalg,
            name,
            lambda a, inner=inner, vectors=vectors: seen.append((a.shape[0], vectors)) or inner(a),
        )
    return seen


@pytest.mark.parametrize("n", [40, 100])
@pytest.mark.parametrize("weighting", ["balanced", "sample"])
def test_fewer_samples_than_dimensions_take_no_problem_of_size_d(n, weighting, monkeypatch):
    """N - C < D: Sigma_W has rank <= N - C, so every D x D metric comes from its pivoted Cholesky
    factor and problems of size <= N (no eigenproblem of size D). Equal to the reference, and to the
    eigendecomposition route."""
    from ncfast import metrics as metrics_mod

    x, y, cols = _relu_layer(n, 200, live=120, c=5, seed=n, dtype=torch.float64)
    if weighting == "sample":
        y = torch.where(torch.arange(n) < n // 3, torch.zeros_like(y), y)
    seen = _eigen_sizes(monkeypatch)
    got = ncfast.nc_metrics(x, y, weighting=weighting)
    assert seen and max(size for size, _ in seen) <= n
    live = x[:, cols]
    for k, f in (("rank", ref.rank), ("effective_rank", ref.effective_rank), ("nc1", ref.nc1)):
        assert_close(got[k], f(live, y, weighting=weighting), rtol=1e-9, what=k)
    monkeypatch.setattr(metrics_mod, "_low_rank", lambda *a, **k: None)
    by_eigh = ncfast.nc_metrics(x, y, weighting=weighting)
    assert any(size == 120 and vectors for size, vectors in seen)  # the eigh route took Sigma_W whole
    for k in ("vci", "rank", "effective_rank", "nc1"):
        assert_close(got[k], by_eigh[k], rtol=1e-9, atol=1e-15, what=k)
    assert got.ranks == by_eigh.ranks
    assert got.degenerate == by_eigh.degenerate


def test_full_rank_scatter_takes_one_eigenvalue_problem_of_size_d(monkeypatch):
    """N >= D with Sigma_W certified full rank: one eigvalsh of size D (Sigma_T) and none with
    vectors."""
    x, y, c = _relu_layer(600, 30, live=30, c=6, seed=3, dtype=torch.float64)
    seen = _eigen_sizes(monkeypatch)
    got = ncfast.nc_metrics(x, y)
    assert [s for s in seen if s[0] == 30] == [(30, False)]
    _assert_matches(got, {"vci": ref.vci(x, y), "rank": ref.rank(x, y), "effective_rank": ref.effective_rank(x, y)})
