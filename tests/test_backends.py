"""The backend protocol (ncfast.backends): how a backend is chosen, and every backend's kernels
against float64 brute force, over the list of backends this machine runs (the CPU first; Triton in
its interpreter where no GPU is present, as conftest.py arranges)."""

import numpy as np
import pytest
import torch

from helpers import BACKENDS, DEVICE, assert_close, make_data
from ncfast import backends
from ncfast.backends import torch as torch_backend


@pytest.fixture
def impl(backend_name):
    """Each backend this machine runs (conftest parametrizes backend_name)."""
    return backends.get(backend_name)


def _on(impl, t: torch.Tensor) -> torch.Tensor:
    """t where impl runs: the Triton backend on DEVICE, the others on the CPU."""
    return t.to(DEVICE) if impl.name == "triton" else t


# ----------------------------------------------------------------------------------- selection
def test_for_tensor_follows_the_device_and_ncfast_backend(monkeypatch):
    monkeypatch.delenv("NCFAST_BACKEND", raising=False)
    cpu = torch.zeros(3, 2)
    assert backends.for_tensor(cpu).name == "cpp"
    monkeypatch.setenv("NCFAST_BACKEND", "torch")
    assert backends.for_tensor(cpu).name == "torch"
    assert backends.for_tensor(cpu) is backends.get("torch")  # one instance per process
    monkeypatch.setenv("NCFAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="NCFAST_BACKEND"):
        backends.for_tensor(cpu)
    monkeypatch.setenv("NCFAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backends.for_tensor(cpu)
    with pytest.raises(ValueError, match="backend"):
        backends.get("cuda")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_for_tensor_triton(monkeypatch):
    monkeypatch.setenv("NCFAST_BACKEND", "triton")
    assert backends.for_tensor(torch.zeros(3, 2, device=DEVICE)).name == "triton"


# ------------------------------------------------------------------------------------- moments
def _moments64(x: torch.Tensor, y: torch.Tensor, c: int):
    h, labels = x.double().cpu().numpy(), y.cpu().numpy()
    counts = np.bincount(labels, minlength=c)
    means = np.zeros((c, h.shape[1]))
    m2, units, norms = np.zeros(c), np.zeros_like(means), np.zeros(c)
    for k in range(c):
        rows = h[labels == k]
        if rows.shape[0]:
            means[k] = rows.mean(0)
            m2[k] = ((rows - means[k]) ** 2).sum()
            r = np.linalg.norm(rows, axis=1)
            units[k] = (rows / np.where(r > 0, r, 1.0)[:, None]).sum(0)
            norms[k] = r.sum()
    return counts, means, m2, units, norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("unit_sums", [True, False])
def test_block_moments_match_float64(impl, dtype, unit_sums):
    x, y, c = make_data(n=300, d=11, c=6, absent=(2,), imbalanced=True, seed=4, dtype=dtype)
    got = impl.block_moments(_on(impl, x), _on(impl, y), c, unit_sums=unit_sums, check_finite=True)
    counts, means, m2, units, norms = _moments64(x, y, c)
    assert torch.equal(got.counts.cpu(), torch.from_numpy(counts))
    assert_close(got.means.cpu().numpy(), means, rtol=1e-12, atol=1e-15, what="means")
    assert_close(got.m2.cpu().numpy(), m2, rtol=1e-10, what="m2")
    if unit_sums:
        assert_close(got.unit_sums.cpu().numpy(), units, rtol=1e-10, atol=1e-12, what="unit sums")
        assert_close(got.norm_sums.cpu().numpy(), norms, rtol=1e-12, what="norm sums")
    else:
        assert got.unit_sums is None and got.norm_sums is None


def test_block_moments_reject_non_finite_rows(impl):
    x, y, c = make_data(n=50, d=4, c=3, seed=5)
    x[7, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        impl.block_moments(_on(impl, x), _on(impl, y), c, unit_sums=False, check_finite=True)


def test_block_moments_merge_is_the_whole_batch():
    x, y, c = make_data(n=400, d=9, c=5, seed=6, dtype=torch.float64)
    whole = torch_backend.block_moments_of(x, y, c, True)
    halves = torch_backend.block_moments_of(x[:170], y[:170], c, True).merge(
        torch_backend.block_moments_of(x[170:], y[170:], c, True)
    )
    assert torch.equal(halves.counts, whole.counts)
    for name in ("means", "m2", "unit_sums", "norm_sums"):
        assert_close(getattr(halves, name).numpy(), getattr(whole, name).numpy(), rtol=1e-12, atol=1e-14, what=name)


def _blocks_with_absent_classes():
    """Two CPU BlockMoments of 6 classes: class 1 only in the state, 3 only in the part, 5 in neither."""
    x, y, c = make_data(n=400, d=9, c=6, absent=(5,), imbalanced=True, seed=16, dtype=torch.float64)
    first, second = (y != 3), (y != 1)
    a = torch_backend.block_moments_of(x[first][:150], y[first][:150], c, True)
    b = torch_backend.block_moments_of(x[second][150:], y[second][150:], c, True)
    return a, b


def test_merge_into_is_chans_merge(backend_list):
    """The C++ backend's in-place merge equals the out-of-place one (BlockMoments.combine) to float64
    rounding (the same operations; the C++ may fuse a multiply-add and sums ||delta||^2 in another
    order), delta and weights included; the backends without one write nothing and say so."""
    a, b = _blocks_with_absent_classes()
    want, want_delta, want_weight = a.combine(b)
    state = backends.BlockMoments(*(t.clone() for t in (a.counts, a.means, a.m2, a.unit_sums, a.norm_sums)))
    delta = torch.full_like(a.means, 7.0)
    weight = backends.get("cpp").merge_into(state, b, delta)
    assert torch.equal(state.counts, want.counts)
    for name in ("means", "m2", "unit_sums", "norm_sums"):
        assert_close(getattr(state, name).numpy(), getattr(want, name).numpy(), rtol=1e-15, atol=1e-15, what=name)
    assert torch.equal(weight, want_weight) and torch.equal(delta, want_delta)
    for name in [n for n in backend_list if n != "cpp"]:
        kept = a.means.clone()
        assert backends.get(name).merge_into(a, b, None) is None
        assert torch.equal(a.means, kept)


def test_merge_into_leaves_infinite_means_to_the_caller():
    a, b = _blocks_with_absent_classes()
    b.means[0, 2] = float("inf")
    state = backends.BlockMoments(*(t.clone() for t in (a.counts, a.means, a.m2, a.unit_sums, a.norm_sums)))
    assert backends.get("cpp").merge_into(state, b, None) is None
    for name in ("counts", "means", "m2", "unit_sums", "norm_sums"):
        assert torch.equal(getattr(state, name), getattr(a, name)), name


def test_centred_scatters_match_float64(impl):
    x, y, c = make_data(n=260, d=7, c=4, imbalanced=True, seed=7)
    means = torch.from_numpy(_moments64(x, y, c)[1])
    scale = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64)
    pooled, scaled = impl.centred_scatters(_on(impl, x), _on(impl, y), _on(impl, means), [None, _on(impl, scale)])
    z = x.double().numpy() - means.numpy()[y.numpy()]
    assert_close(pooled.cpu().numpy(), z.T @ z, rtol=1e-12, atol=1e-12, what="pooled")
    zs = z * scale.numpy()[y.numpy()][:, None]
    assert_close(scaled.cpu().numpy(), zs.T @ zs, rtol=1e-12, atol=1e-12, what="scaled")


@pytest.mark.parametrize("syrk_min", [0, 1 << 62])
def test_centred_scatters_through_dsyrk_and_torch_mm(syrk_min, monkeypatch):
    """The CPU Gram's two routes (scipy's dsyrk into one triangle for large blocks, torch.mm for
    small ones): both the float64 scatter, symmetric."""
    monkeypatch.setattr(torch_backend, "SYRK_MIN_FLOPS", syrk_min)
    x, y, c = make_data(n=300, d=9, c=3, seed=12)
    means = torch.from_numpy(_moments64(x, y, c)[1])
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    pooled, scaled = torch_backend.TorchBackend().centred_scatters(x, y, means, [None, scale])
    z = x.double().numpy() - means.numpy()[y.numpy()]
    zs = z * scale.numpy()[y.numpy()][:, None]
    for got, want, what in ((pooled, z.T @ z, "pooled"), (scaled, zs.T @ zs, "scaled")):
        assert_close(got.numpy(), want, rtol=1e-12, atol=1e-12, what=what)
        assert torch.equal(got, got.T)


def test_sym_gram(impl):
    a = torch.randn(30, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    got = impl.sym_gram(_on(impl, a)).cpu().numpy()
    assert_close(got, a.numpy().T @ a.numpy(), rtol=1e-12, atol=1e-12)
    assert np.array_equal(got, got.T)


# ------------------------------------------------------------------------------------ NCC sweep
@pytest.mark.parametrize("d", [13, 2500])  # 2500: the C++ sweep's feature chunks, the last one short
def test_ncc_sweep_certain_rows_are_the_float64_argmin(impl, d):
    """Two groups of classes over the same rows (float32, float64 and column-strided): every row not
    flagged unsure holds the float64 argmin of its group, and rows at a midpoint between two
    centres are flagged."""
    if impl.name == "triton" and d > 13:
        d = 130  # the interpreter's cost grows with the loop steps
    g = torch.Generator().manual_seed(9)
    n, k = 301, 9
    centres = torch.randn(k, d, generator=g, dtype=torch.float64)
    offsets = torch.randn(k, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g)
    # rows equidistant from centres 0 and 1 of the first group: their scores tie exactly
    x[:5] = ((centres[0] + centres[1]) / 2).float()
    offsets[:2] = -(centres[:2].float().double() * x[0].double()).sum(1) - 100.0  # the two best, equal at x[0]
    starts = [0, 4, k]
    c32, o32 = centres.float(), offsets.float()
    cmax = [float(c32[a:b].double().norm(dim=1).max()) for a, b in zip(starts, starts[1:])]
    omax = [float(o32[a:b].double().abs().max()) for a, b in zip(starts, starts[1:])]
    scores = o32.double() + x.double() @ c32.double().T
    strided = torch.zeros(n, 2 * d).index_copy_(1, torch.arange(0, 2 * d, 2), x)[:, ::2]
    for rows in (x, x.double(), strided):
        sweep = impl.ncc_sweep(
            _on(impl, rows), _on(impl, torch.zeros(d)), _on(impl, c32), _on(impl, o32), starts, cmax, omax, "fp32"
        )
        best, unsure = sweep.best.cpu(), sweep.unsure.cpu()
        assert best.shape == unsure.shape == (n, 2)
        for gi, (a, b) in enumerate(zip(starts, starts[1:])):
            want = scores[:, a:b].argmin(1)
            certain = ~unsure[:, gi]
            assert certain.sum() > n // 2
            assert torch.equal(best[certain, gi], want[certain])
        assert unsure[:5, 0].all()


def test_fast_precisions_name_what_the_sweep_accepts(impl):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(10))
    centres, offsets = torch.randn(5, 6), torch.randn(5)
    for precision in impl.fast_precisions(5):
        sweep = impl.ncc_sweep(
            _on(impl, x),
            _on(impl, torch.zeros(6)),
            _on(impl, centres),
            _on(impl, offsets),
            [0, 5],
            [3.0],
            [3.0],
            precision,
        )
        assert sweep.best.shape == (40, 1)


# ----------------------------------------------------------------------------------- pair tiles
def _pair_context(c: int, d: int, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mt = torch.randn(c, d, generator=g, dtype=torch.float64)
    mt -= mt.mean(0)
    norms = mt.norm(dim=1)
    ctx = backends.PairContext(
        sq=norms.square(),
        norms=norms,
        var=torch.rand(c, generator=g, dtype=torch.float64),
        sup=torch.arange(c) % 3,
        g=float(torch.linalg.norm(mt @ mt.T)),
        etf_diag=0.2,
        etf_offdiag=-0.03,
        mean_cos=-0.01,
        etf_cos=1.0 / (c - 1),
        best=torch.full((c,), float("inf"), dtype=torch.float64),
        best_idx=torch.full((c,), -1, dtype=torch.int64),
        cdnv_exponent=0.75,
        unif_floor=1e-13,
    )
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(ctx).items()}
    return mt.to(device), backends.PairContext(**fields)


def test_pair_reducer_equals_the_torch_reducer(impl):
    """Every backend's tiles (a diagonal one and an off-diagonal one, of uneven sizes) give the torch
    reducer's sums, nearest classes and per-class ratio sums."""
    c = 37
    mt, want_ctx = _pair_context(c, 6, seed=11)
    dev = DEVICE if impl.name == "triton" else "cpu"
    mt_dev, ctx = _pair_context(c, 6, seed=11, device=dev)
    tiles = [(slice(0, 20), slice(0, 20)), (slice(0, 20), slice(20, 37)), (slice(20, 37), slice(20, 37))]
    want_reduce = backends.get("torch").pair_reducer(mt, 20, want_ctx)
    reduce = impl.pair_reducer(mt_dev, 20, ctx)
    want = backends.PairSums.total(part for r, q in tiles for part in want_reduce(r, q))
    got = backends.PairSums.total(part for r, q in tiles for part in reduce(r, q))
    for key in ("resid", "cos_dev", "coh", "dist", "msdr_sum"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-10), key
    assert got.msdr_n == want.msdr_n > 0
    for key in ("cdnv", "unif"):
        assert getattr(got, key)[0] == getattr(want, key)[0] == c * (c - 1) // 2
        assert getattr(got, key)[1:] == pytest.approx(getattr(want, key)[1:], rel=1e-10), key
    assert torch.equal(ctx.best_idx.cpu(), want_ctx.best_idx)
    assert_close(ctx.best.cpu().numpy(), want_ctx.best.numpy(), rtol=1e-10, what="nearest distance")
    assert_close(ctx.ratio_sum.cpu().numpy(), want_ctx.ratio_sum.numpy(), rtol=1e-10, what="ratio sums")


def test_pair_context_splits_into_vectors_and_params():
    """Every PairContext field is a per-class vector (PairVectors) or a scalar of the packed params
    (PAIR_PARAMS, in the C++ core's order too); tile_vectors gives views of ctx's vectors with
    the tile's global starts, whose in-place updates reach ctx, also through numpy views."""
    from dataclasses import fields

    from ncfast import _C

    vector_names = backends.PairVectors._fields[1:]
    assert set(vector_names).isdisjoint(backends.PAIR_PARAMS)
    assert {f.name for f in fields(backends.PairContext)} == set(vector_names) | set(backends.PAIR_PARAMS)
    assert _C.PAIR_PARAMS == backends.PAIR_PARAMS
    _, ctx = _pair_context(10, 4, seed=3)
    assert ctx.params() == (ctx.g, 0.2, -0.03, -0.01, 1.0 / 9, 0.75, 1e-13)
    tile = backends.tile_vectors(ctx, slice(2, 5), slice(6, 10))
    assert (tile.rows.start, tile.cols.start) == (2, 6)
    assert torch.equal(tile.cols.var, ctx.var[6:10]) and tile.rows.sup.tolist() == [2, 0, 1]
    tile.cols.best[1] = 4.5
    tile.rows.ratio_sum.add_(1.0)
    assert ctx.best[7] == 4.5 and ctx.ratio_sum.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    host = backends.tile_vectors(ctx.vectors().map(torch.Tensor.numpy), slice(0, 3), slice(7, 10))
    host.cols.best_idx[:] = 5
    assert host.cols.start == 7 and ctx.best_idx.tolist() == [-1] * 7 + [5] * 3
    no_sup = backends.PairContext(**{**vars(ctx), "sup": None})
    assert backends.tile_vectors(no_sup, slice(0, 3), slice(0, 3)).rows.sup is None


def test_pair_sums_total_and_of():
    """PairSums.total adds the additive fields and merges the (n, mean, M2) fields by Chan's formula;
    PairSums.of reads the fields off any object by name."""
    from types import SimpleNamespace

    a = backends.PairSums(
        resid=1.0, cos_dev=2.0, coh=3.0, dist=4.0, msdr_sum=5.0, msdr_n=2, cdnv=(2, 1.0, 2.0), unif=(1, -1.0, 0.0)
    )
    b = backends.PairSums(resid=0.5, dist=1.0, msdr_n=4, cdnv=(2, 3.0, 2.0))
    assert backends.PairSums.triples() == ("cdnv", "unif")
    total = backends.PairSums.total([a, b])
    # values {0, 2} and {2, 4}: mean 2, M2 = 4 + 0 + 0 + 4 = 8
    assert total == backends.PairSums(
        resid=1.5, cos_dev=2.0, coh=3.0, dist=5.0, msdr_sum=5.0, msdr_n=6, cdnv=(4, 2.0, 8.0), unif=(1, -1.0, 0.0)
    )
    assert backends.PairSums.of(SimpleNamespace(**vars(a))) == a
