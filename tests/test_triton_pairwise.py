"""The Triton pair-tile kernel (ncfast.triton.pairwise) against the torch backend's tile reducer,
and class_pair_stats / nc_metrics on the Triton backend.

In the interpreter without a GPU (see test_triton_moments.py).
"""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import ncfast  # noqa: E402
from helpers import DEVICE, assert_close, make_data  # noqa: E402
from ncfast import backends  # noqa: E402
from ncfast.backends import torch as torch_backend  # noqa: E402
from ncfast.backends import triton as triton_backend  # noqa: E402
from ncfast.triton import pairwise as tpairwise  # noqa: E402


# ---------------------------------------------------------------------------------- pair tiles
def _on_device(k: backends.PairContext) -> backends.PairContext:
    """k with its tensors on DEVICE (on the CPU, k's own tensors)."""
    return backends.PairContext(**{n: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for n, v in vars(k).items()})


def _triton_tile(mt, k: backends.PairContext, rows: slice, cols: slice, **kwargs) -> backends.PairSums:
    """tpairwise.reduce_pair_tile on the tile (rows, cols) of mt with k's vectors (on DEVICE, updated
    in place) and scalars, its per-program partials combined as the Triton backend does."""
    params = torch.tensor(k.params(), dtype=torch.float64)
    sums, counts = tpairwise.reduce_pair_tile(
        mt[rows].to(DEVICE), mt[cols].to(DEVICE), backends.tile_vectors(k, rows, cols), params, **kwargs
    )
    return triton_backend.tile_sums(sums, counts)


def _pair_context(c, d, seed):
    g = torch.Generator().manual_seed(seed)
    mt = torch.randn(c, d, generator=g, dtype=torch.float64)
    mt -= mt.mean(0)
    sq = mt.square().sum(1)
    norms = sq.sqrt()
    unit_sum = mt.T @ (1.0 / norms)
    inv = 1.0 / math.sqrt(c - 1)
    sup = torch.randint(0, 4, (c,), generator=g)
    var = torch.rand(c, generator=g, dtype=torch.float64)

    def ctx(with_sup):
        return backends.PairContext(
            sq=sq,
            norms=norms,
            var=var,
            sup=sup if with_sup else None,
            g=float(torch.linalg.norm(mt @ mt.T)),
            etf_diag=(1.0 - 1.0 / c) * inv,
            etf_offdiag=-inv / c,
            mean_cos=(float(unit_sum.square().sum()) - c) / (c * (c - 1)),
            etf_cos=1.0 / (c - 1),
            best=torch.full((c,), float("inf"), dtype=torch.float64),
            best_idx=torch.full((c,), -1, dtype=torch.int64),
        )

    return mt, ctx


@pytest.mark.parametrize("f64_dot", [True, False])  # False: the FMA fallback for a Triton without float64 dots
@pytest.mark.parametrize("with_sup", [False, True])
@pytest.mark.parametrize(
    "rows,cols,block",
    [
        (slice(0, 25), slice(0, 25), 64),
        (slice(0, 25), slice(0, 25), 16),
        (slice(0, 25), slice(25, 40), 64),
        (slice(0, 25), slice(25, 40), 16),
    ],
)
def test_reduce_pair_tile_matches_torch(with_sup, rows, cols, block, f64_dot):
    mt, make_ctx = _pair_context(40, 23, seed=1)
    want_ctx, got_ctx = make_ctx(with_sup), make_ctx(with_sup)
    # a previous tile's running minima, so the in-place merge keeps or replaces them
    for k in (want_ctx, got_ctx):
        k.best[rows] = torch.linspace(20.0, 60.0, rows.stop - rows.start, dtype=torch.float64)
        k.best_idx[rows] = 99
    want = torch_backend.reduce_tile(mt[rows] @ mt[cols].T, rows, cols, want_ctx)
    k = _on_device(got_ctx)
    got = _triton_tile(mt, k, rows, cols, block_i=block, block_j=block, block_d=16, f64_dot=f64_dot)
    best, best_idx = k.best, k.best_idx
    for key in ("resid", "cos_dev", "coh", "dist", "msdr_sum"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-9, abs=1e-300), key
    assert got.msdr_n == want.msdr_n
    assert (got.msdr_n > 0) == with_sup
    assert got.cdnv[0] == want.cdnv[0] > 0
    assert got.cdnv[1:] == pytest.approx(want.cdnv[1:], rel=1e-9)
    assert torch.equal(best_idx.cpu(), want_ctx.best_idx)
    np.testing.assert_allclose(best.cpu().numpy(), want_ctx.best.numpy(), rtol=1e-12)  # inf where untouched
    assert (want_ctx.best_idx[rows] != 99).any() and (want_ctx.best_idx[rows] == 99).any()
    np.testing.assert_allclose(k.ratio_sum.cpu().numpy(), want_ctx.ratio_sum.numpy(), rtol=1e-9)
    assert (want_ctx.ratio_sum[cols] > 0).all()


def test_pair_tile_falls_back_when_float64_dot_does_not_compile(monkeypatch):
    """On a GPU whose Triton refuses a float64 tl.dot, the first launch warns once, relaunches with
    the FMA form, and later launches go straight to it; a failure after a successful compile, or on
    the CPU interpreter, is not swallowed."""
    calls = []

    def launch(f64_dot):
        calls.append(f64_dot)
        if f64_dot:
            raise RuntimeError("float64 dot not supported")
        return "fma"

    monkeypatch.setattr(triton_backend, "F64_DOT", {})
    gpu = torch.device("cuda", 3)
    with pytest.warns(RuntimeWarning, match="float64 tl.dot"):
        assert triton_backend.with_f64_dot(launch, gpu) == "fma"
    assert calls == [True, False] and triton_backend.F64_DOT == {("cuda", 3): False}
    assert triton_backend.with_f64_dot(launch, gpu) == "fma"
    assert calls[-1] is False and len(calls) == 3
    with pytest.raises(RuntimeError):  # the interpreter: no fallback
        triton_backend.with_f64_dot(launch, torch.device("cpu"))
    triton_backend.F64_DOT[("cuda", 4)] = True  # compiled before on that GPU: a later failure is real
    with pytest.raises(RuntimeError):
        triton_backend.with_f64_dot(launch, torch.device("cuda", 4))
    # the kernel module holds no cache: the mode is the argument
    kernel_calls = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, F64_DOT, BLOCK_D, **kwargs):
                kernel_calls.append((F64_DOT, BLOCK_D))

            return run

    monkeypatch.setattr(tpairwise, "_pair_tile_kernel", Kernel())
    tpairwise._launch((1, 1), (), {}, 32, True)
    tpairwise._launch((1, 1), (), {}, 32, False)
    assert kernel_calls == [(True, 32), (False, 8)] and not hasattr(tpairwise, "_F64_DOT")


@pytest.mark.parametrize("block", [64, 16])
def test_reduce_pair_tile_ties(block):
    """Equal distances: rows 3 / 20 duplicated (different row blocks when block = 16), columns
    27 / 31 (one tile) and 36 (the next tile) duplicated. The lowest index wins inside a
    program, across programs and against the running minimum of an earlier tile."""
    mt, make_ctx = _pair_context(40, 23, seed=2)
    mt[31] = mt[36] = mt[27]
    mt[3] = mt[20] = 0.9 * mt[27]
    k = make_ctx(False)
    k.sq, k.norms = mt.square().sum(1), mt.norm(dim=1)
    want_ctx = backends.PairContext(
        **{**k.__dict__, "best": k.best.clone(), "best_idx": k.best_idx.clone(), "ratio_sum": k.ratio_sum.clone()}
    )
    k = _on_device(k)
    best_idx = k.best_idx
    rows = slice(0, 25)
    for cols in (slice(25, 33), slice(33, 40)):
        want = torch_backend.reduce_tile(mt[rows] @ mt[cols].T, rows, cols, want_ctx)
        got = _triton_tile(mt, k, rows, cols, block_i=block, block_j=block, block_d=16)
        assert got.dist == pytest.approx(want.dist, rel=1e-9)
    assert torch.equal(best_idx.cpu(), want_ctx.best_idx)
    assert best_idx[3] == best_idx[20] == 27
    assert best_idx[27] == best_idx[31] == best_idx[36] == 3


@pytest.mark.parametrize("block", [64, 16])
def test_reduce_pair_tile_diagonal_ties(block):
    """A diagonal tile whose sub-tiles below the diagonal are skipped (block 16: three row blocks):
    classes 5, 21 and 37 identical (one per row block). Every class's nearest other class is the
    lowest index among the equal ones, whether it comes from a row or from the mirror image's
    column minima."""
    mt, make_ctx = _pair_context(40, 23, seed=4)
    mt[21] = mt[37] = mt[5]
    k = make_ctx(False)
    k.sq, k.norms = mt.square().sum(1), mt.norm(dim=1)
    want_ctx = backends.PairContext(
        **{**k.__dict__, "best": k.best.clone(), "best_idx": k.best_idx.clone(), "ratio_sum": k.ratio_sum.clone()}
    )
    rows = slice(0, 40)
    # the Gram matrix entry by entry: BLAS's GEMM (MKL on an AMD EPYC) rounded the three equal rows'
    # products differently by position, which broke the ties the test is about
    want = torch_backend.reduce_tile((mt[:, None, :] * mt[None, :, :]).sum(-1), rows, rows, want_ctx)
    k = _on_device(k)
    got = _triton_tile(mt, k, rows, rows, block_i=block, block_j=block, block_d=16)
    best, best_idx = k.best, k.best_idx
    for key in ("resid", "cos_dev", "coh", "dist"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-9), key
    assert got.cdnv[0] == want.cdnv[0] == 40 * 39 // 2
    assert torch.equal(best_idx.cpu(), want_ctx.best_idx)
    assert (best_idx[5], best_idx[21], best_idx[37]) == (21, 5, 5)
    np.testing.assert_allclose(best.cpu().numpy(), want_ctx.best.numpy(), rtol=1e-12, atol=1e-12)


def test_nc_metrics_on_triton_backend(monkeypatch):
    """nc_metrics end to end with every kernel on the Triton path (moments, NCC, pairwise tiles)."""
    from ncfast import reference as ref

    monkeypatch.setenv("NCFAST_BACKEND", "triton")
    x, y, c = make_data(n=180, d=10, c=6, imbalanced=True, seed=9)
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(c, 10, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    superclass = torch.arange(c) % 2
    ood = torch.randn(30, 10, generator=g) + 0.5
    train_means = torch.from_numpy(ref.class_means(*make_data(n=120, d=10, c=6, seed=10)[:2]))
    got = ncfast.nc_metrics(
        x.to(DEVICE),
        y.to(DEVICE),
        num_classes=c,
        weight=w.to(DEVICE),
        bias=b.to(DEVICE),
        superclass=superclass.to(DEVICE),
        ood_features=ood.to(DEVICE),
        class_means=train_means.to(DEVICE),
    )
    want = ref.nc_metrics(
        x, y, num_classes=c, weight=w, bias=b, superclass=superclass, ood_features=ood, class_means=train_means
    )
    for k in want:
        assert_close(got[k], want[k], rtol=1e-6, atol=1e-12, what=k)
    per_class = {
        "cdnv": ref.cdnv_per_class(x, y, c),
        "duality": ref.duality_per_class(x, y, w, c),
        "ncc_accuracy": ref.ncc_accuracy_per_class(x, y, c, class_means=train_means),
        "ncc_mismatch": ref.ncc_mismatch_per_class(x, y, c, weight=w, bias=b, class_means=train_means),
    }
    for k, v in per_class.items():
        assert_close(got.per_class[k].cpu().numpy(), v, rtol=1e-6, what=f"per_class {k}")
    from ncfast.pairwise import class_pair_stats

    stats = class_pair_stats(ncfast.class_moments(x.to(DEVICE), y.to(DEVICE), scatter=False), tile=4)
    means = ref.class_means(x, y)
    d2 = ((means[:, None] - means[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    assert stats.nearest_class.cpu().tolist() == d2.argmin(1).tolist()


# ------------------------------------- pair tiles: uniformity, per-class CDNV sums, CDNV exponent
@pytest.mark.parametrize("p", [1.0, 0.5])
@pytest.mark.parametrize("rows,cols", [(slice(0, 25), slice(0, 25)), (slice(0, 25), slice(25, 40))])
def test_reduce_pair_tile_uniformity_and_ratio_sums(rows, cols, p):
    """Multi-block tiles (block 16): the uniformity (n, mean, M2), the CDNV (n, mean, M2) with exponent
    p and the per-class ratio sums of rows and columns equal the torch reducer's."""
    mt, make_ctx = _pair_context(40, 23, seed=5)
    want_ctx, k = make_ctx(False), make_ctx(False)
    want_ctx.cdnv_exponent = k.cdnv_exponent = p
    want = torch_backend.reduce_tile(mt[rows] @ mt[cols].T, rows, cols, want_ctx)
    k = _on_device(k)
    got = _triton_tile(mt, k, rows, cols, block_i=16, block_j=16, block_d=16)
    ratio = k.ratio_sum
    for key in ("cdnv", "unif"):
        assert getattr(got, key)[0] == getattr(want, key)[0] > 0, key
        assert getattr(got, key)[1:] == pytest.approx(getattr(want, key)[1:], rel=1e-9), key
    np.testing.assert_allclose(ratio.cpu().numpy(), want_ctx.ratio_sum.numpy(), rtol=1e-9)
    assert (want_ctx.ratio_sum[cols] > 0).all()


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_class_pair_stats_new_stats_on_triton(monkeypatch, p):
    """End to end on the Triton path, ragged tiles of 4 over 7 classes (one absent), against the
    reference; then classes sharing a direction and a mean: uniformity and per-class CDNV inf."""
    from ncfast import reference as ref
    from ncfast.pairwise import class_pair_stats

    monkeypatch.setenv("NCFAST_BACKEND", "triton")
    x, y, c = make_data(n=200, d=5, c=8, absent=(6,), seed=14)
    stats = class_pair_stats(
        ncfast.class_moments(x.to(DEVICE), y.to(DEVICE), num_classes=c, scatter=False), tile=4, cdnv_exponent=p
    )
    mean, var = ref.uniformity(x, y, num_classes=c)
    assert stats.uniformity_mean == pytest.approx(mean, rel=1e-6)
    assert stats.uniformity_var == pytest.approx(var, rel=1e-6)
    assert stats.cdnv == pytest.approx(ref.cdnv(x, y, num_classes=c, cdnv_exponent=p), rel=1e-6)
    assert_close(
        stats.cdnv_per_class.cpu().numpy(),
        ref.cdnv_per_class(x, y, num_classes=c, cdnv_exponent=p),
        rtol=1e-6,
        what="cdnv_per_class",
    )
    if p != 1.0:
        return
    means = torch.tensor([[3, 4, 0], [3, 4, 0], [-12, -16, 0], [0, 0, 5], [0, 0, -5], [6, 8, 0]], dtype=torch.float32)
    y = torch.arange(6).repeat_interleave(2)
    x = means[y] + torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]).repeat(6, 1)
    stats = class_pair_stats(ncfast.class_moments(x.to(DEVICE), y.to(DEVICE), num_classes=7, scatter=False), tile=4)
    assert stats.uniformity_mean == np.inf and np.isnan(stats.uniformity_var)
    got = stats.cdnv_per_class.cpu().numpy()
    assert got[0] == got[1] == np.inf and np.isnan(got[6]) and np.isfinite(got[2:6]).all()


def test_reduce_pair_tile_checks_its_arguments():
    """The launcher refuses, naming it, a side vector of the wrong length, a super-class map on one
    side only, a params tensor that is not the (7,) float64 host buffer, and a diagonal tile (sides
    with the same start) of unequal sides; nothing is updated."""
    assert tpairwise.PARAMS == backends.PAIR_PARAMS  # the kernel's loads in PairContext.params order
    mt, make_ctx = _pair_context(40, 23, seed=6)
    k = _on_device(make_ctx(True))
    tile = backends.tile_vectors(k, slice(0, 10), slice(10, 20))
    params = torch.tensor(k.params(), dtype=torch.float64)
    rows, cols = mt[:10].to(DEVICE), mt[10:20].to(DEVICE)
    bad = tile._replace(cols=tile.cols._replace(norms=tile.cols.norms[:9]))
    with pytest.raises(ValueError, match=r"vectors\.cols\.norms: expected shape \(10,\)"):
        tpairwise.reduce_pair_tile(rows, cols, bad, params)
    with pytest.raises(ValueError, match="sup given for one side"):
        tpairwise.reduce_pair_tile(rows, cols, tile._replace(rows=tile.rows._replace(sup=None)), params)
    for wrong in (params[:6], params.float(), params.to("meta")):
        with pytest.raises(ValueError, match=r"^params: expected a \(7,\) float64 CPU tensor"):
            tpairwise.reduce_pair_tile(rows, cols, tile, wrong)
    diagonal = backends.tile_vectors(k, slice(0, 10), slice(0, 12))
    with pytest.raises(ValueError, match="diagonal tile: expected t1 == t2"):
        tpairwise.reduce_pair_tile(rows, mt[:12].to(DEVICE), diagonal, params)
    assert (k.best_idx == -1).all() and (k.ratio_sum == 0).all()
