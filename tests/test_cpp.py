"""The compiled core directly: dtypes, strides and 64-bit offsets."""

import numpy as np
import pytest
import torch

from helpers import assert_close
from ncfast import _C


def test_block_moments_float16_bits_and_strides():
    g = np.random.default_rng(0)
    x = g.standard_normal((50, 7)).astype(np.float16)
    y = g.integers(0, 3, 50)
    strided = np.asfortranarray(x)  # column-major: row stride 1, column stride 50
    r = _C.block_moments(strided.view(np.uint16), "float16", y, 3, 2)
    x64 = x.astype(np.float64)
    for c in range(3):
        rows = x64[y == c]
        assert r["counts"][c] == len(rows)
        assert_close(r["means"][c], rows.mean(0), rtol=1e-13, atol=1e-15)
        assert_close(r["m2"][c], ((rows - rows.mean(0)) ** 2).sum(), rtol=1e-12)
        units = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        assert_close(r["unit_sums"][c], units.sum(0), rtol=1e-12, atol=1e-13)


def test_block_moments_rejects_bad_labels():
    x = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="labels"):
        _C.block_moments(x, "float32", np.array([0, 1, 5]), 3, 1)
    with pytest.raises(ValueError, match="labels"):
        _C.block_moments(x, "float32", np.array([0, 1]), 3, 1)
    with pytest.raises(ValueError, match="dtype"):
        _C.block_moments(x, "int8", np.array([0, 1, 2]), 3, 1)


def test_offsets_beyond_2_pow_31_elements(tmp_path):
    """Element offsets past 2^31 must be addressed where they are, not wrapped.

    A sparse float16 file of (2^19 + 1) x 4096 elements (4 GiB of zeros that cost no disk) is read
    through a row-strided view, every 2^17-th row, so the last row starts at element 2^31 exactly
    and only five rows are read. A 32-bit offset would wrap negative and read the wrong memory.
    """
    d = 4096
    n = (1 << 19) + 1
    path = tmp_path / "big.f16"
    x = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, d))
    last = (np.arange(d) % 7 - 3).astype(np.float16)
    x[-1] = last
    x.flush()
    view = x[:: 1 << 17]
    assert view.shape[0] == 5 and (view.shape[0] - 1) * view.strides[0] // 2 == 2**31
    y = np.array([0, 0, 0, 0, 1])
    r = _C.block_moments(view.view(np.uint16), "float16", y, 2, torch.get_num_threads())
    assert r["counts"].tolist() == [4, 1]
    assert np.array_equal(r["means"][1], last.astype(np.float64))
    assert r["norm_sums"][1] == pytest.approx(np.linalg.norm(last.astype(np.float64)), rel=1e-14)
    assert not r["means"][0].any()


def _numpy_moments(x64, y, c):
    counts = np.bincount(y, minlength=c)
    means = np.zeros((c, x64.shape[1]))
    m2 = np.zeros(c)
    units = np.zeros((c, x64.shape[1]))
    norms = np.linalg.norm(x64, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    for k in range(c):
        rows = x64[y == k]
        if len(rows):
            means[k] = rows.mean(0)
            m2[k] = ((rows - means[k]) ** 2).sum()
            units[k] = (rows / safe[y == k, None]).sum(0)
    return counts, means, m2, units, np.bincount(y, weights=norms, minlength=c)


@pytest.mark.parametrize(
    "n, d, c", [(1, 1, 1), (5, 1, 3), (7, 3, 1), (1000, 37, 200), (4099, 9, 2), (3001, 300, 5), (130, 4500, 6)]
)  # the last: few wide rows, column chunk by chunk
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("unit_sums", [True, False])
def test_block_moments_awkward_sizes(n, d, c, dtype, threads, unit_sums, tolerance):
    g = np.random.default_rng(n * 31 + d)
    base = torch.from_numpy(g.standard_normal((n, 2 * d)) + 3.0).to(getattr(torch, dtype))[:, ::2]  # strided
    y = g.integers(0, c, n)
    x64 = base.to(torch.float64).numpy()
    names = ("means", "m2", "unit_sums", "norm_sums") if unit_sums else ("means", "m2")
    atol, rtol = tolerance(getattr(torch, dtype))
    for view in (base, base.contiguous()):
        buf = view.view(torch.int16).numpy() if dtype in ("float16", "bfloat16") else view.numpy()
        r = _C.block_moments(buf, dtype, y, c, threads, unit_sums=unit_sums)
        want = _numpy_moments(x64, y, c)
        assert sorted(r) == sorted(("counts", "finite") + names)
        assert r["finite"] is True
        assert r["counts"].tolist() == want[0].tolist()
        for got, exp, what in zip((r[k] for k in names), want[1:], names):
            assert_close(got, exp, rtol=rtol, atol=atol * max(1.0, float(np.abs(exp).max())), what=what)


def test_block_moments_of_few_wide_rows_do_not_depend_on_threads():
    """Few wide rows go column chunk by column chunk (the chunks shared among threads, their M2
    added in chunk order): the same bits on 1 and 2 threads; a NaN in any chunk is reported."""
    g = np.random.default_rng(3)
    x = (g.standard_normal((96, 6000)) + 2.0).astype(np.float32)
    y = g.integers(0, 7, 96)
    one, two = (_C.block_moments(x, "float32", y, 8, t, unit_sums=True) for t in (1, 2))
    for k in ("counts", "means", "m2", "unit_sums", "norm_sums"):
        assert np.array_equal(one[k], two[k]), k
    x[50, 5999] = np.nan
    assert _C.block_moments(x, "float32", y, 8, 2, unit_sums=False)["finite"] is False


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("c", [3, 70])  # memory-order and class-sorted paths
def test_block_moments_names_the_first_bad_label(threads, c):
    """The kernel checks every label (the Python layer leaves it that check on the C++ path) and
    names the first bad one in memory order, wherever the others lie."""
    n, d = 5000, 4
    x = np.ones((n, d), dtype=np.float32)
    y = np.arange(n) % c
    for bad, message in (
        ({4000: -3, 4500: c + 2}, "negative label -3"),
        ({1000: c + 6, 3000: -1}, rf"label {c + 6} out of range \[0, {c}\)"),
        ({2600: c, 2700: -8}, rf"label {c} out of range"),
    ):
        yb = y.copy()
        for i, v in bad.items():
            yb[i] = v
        with pytest.raises(ValueError, match=rf"^labels: {message}"):
            _C.block_moments(x, "float32", yb, c, threads)


@pytest.mark.parametrize("n, d, c", [(6000, 600, 3), (20000, 600, 65)])  # memory-order and class-sorted paths
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("unit_sums", [True, False])
def test_block_moments_collapse_regime_with_an_outlier_first(n, d, c, threads, unit_sums):
    """Within-class spread 1e-4 of the class spacing, all features shifted by 1e3, and each class's
    first row an outlier 1e4 spreads away from its mean: the groups are centred on the running mean,
    so the outlier must not cost precision. Several chunks per class (600 floats per row: 54-row
    chunks when sorted, 109-row chunks in memory order); M2 against numpy in float64 to 1e-9."""
    g = np.random.default_rng(n + c)
    means = g.standard_normal((c, d)) + 1e3
    y = g.integers(0, c, n)
    x = (means[y] + 1e-4 * g.standard_normal((n, d))).astype(np.float32)
    for k in range(c):
        first = np.flatnonzero(y == k)[0]
        x[first] += np.float32(1.0)  # 1e4 spreads
    r = _C.block_moments(x, "float32", y, c, threads, unit_sums=unit_sums)
    want = _numpy_moments(x.astype(np.float64), y, c)
    assert r["counts"].tolist() == want[0].tolist()
    assert_close(r["means"], want[1], rtol=1e-12, atol=0.0, what="means")
    assert_close(r["m2"], want[2], rtol=1e-9, atol=0.0, what="m2")
    if unit_sums:
        assert_close(r["unit_sums"], want[3], rtol=1e-11, atol=1e-11 * float(np.abs(want[3]).max()), what="unit_sums")
        assert_close(r["norm_sums"], want[4], rtol=1e-12, atol=0.0, what="norm_sums")
    else:
        assert "unit_sums" not in r and "norm_sums" not in r


@pytest.mark.parametrize("c", [3, 70])  # memory-order and class-sorted paths
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("unit_sums", [True, False])
def test_block_moments_non_finite_reaches_m2(c, bad, unit_sums):
    """The bad-input check reads only M2: a NaN or Inf element must make its class's M2 non-finite
    and leave the other classes finite."""
    g = np.random.default_rng(c)
    x = g.standard_normal((500, 40)).astype(np.float32)
    y = np.arange(500) % c
    x[123, 7] = bad
    r = _C.block_moments(x, "float32", y, c, 2, unit_sums=unit_sums)
    m2 = r["m2"]
    assert r["finite"] is False  # the flag the Python layer raises on
    assert not np.isfinite(m2[y[123]])
    assert np.isfinite(np.delete(m2, y[123])).all()


def test_block_moments_recycles_output_buffers():
    """Outputs come from a pool: a second call with the same shapes reuses the freed buffers
    (no fresh C x D pages) and results stay independent of the recycled contents."""
    g = np.random.default_rng(3)
    x = g.standard_normal((300, 64)).astype(np.float32)
    y = g.integers(0, 120, 300)
    _C.release_cached_buffers()
    first = _C.block_moments(x, "float32", y, 120, 1)
    want = {k: v.copy() for k, v in first.items() if k != "finite"}
    del first
    held = _C.cached_buffer_bytes()
    assert held >= 2 * 120 * 64 * 8  # the two C x D arrays came back
    again = _C.block_moments(x, "float32", y, 120, 1)
    assert _C.cached_buffer_bytes() < held
    for k in want:
        assert np.array_equal(again[k], want[k]), k
    del again
    assert _C.release_cached_buffers() >= 2 * 120 * 64 * 8
    assert _C.cached_buffer_bytes() == 0


def _buf(t: torch.Tensor):
    return t.view(torch.int16).numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


@pytest.mark.parametrize("n, d, c", [(1, 1, 1), (7, 13, 2), (300, 17, 4), (513, 40, 3), (700, 29, 50)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("layout", ["strided", "contiguous", "padded_rows"])
def test_centred_scatter_awkward_sizes(n, d, c, dtype, layout, tolerance):
    """The packed Gram engine (12 x 16 tiles, 256-row chunks) against float64 numpy, for strided
    columns, contiguous rows (float32 rows widen straight from the input) and rows with a gap
    between them, with and without per-class scales; 1 and 2 threads give identical bits."""
    g = np.random.default_rng(n + 3 * d)
    wide = torch.from_numpy(g.standard_normal((n, 2 * d)) * 2 + 7).to(getattr(torch, dtype))
    base = {"strided": wide[:, ::2], "contiguous": wide[:, ::2].contiguous(), "padded_rows": wide[:, :d]}[layout]
    y = g.integers(0, c, n)
    x64 = base.to(torch.float64).numpy()
    means = g.standard_normal((c, d)) + 7
    scale = g.uniform(0.5, 2.0, c)
    if not _C.gram_available():
        with pytest.raises(RuntimeError, match="AVX-512"):
            _C.centred_scatter(_buf(base), dtype, y, means, None, np.zeros((d, d)), 1)
        return
    for s in (None, scale):
        z = (x64 - means[y]) * (1.0 if s is None else s[y][:, None])
        want = z.T @ z
        outs = []
        for threads in (1, 2):
            out = np.full((d, d), 0.5)  # accumulates into out
            _C.centred_scatter(_buf(base), dtype, y, means, s, out, threads)
            outs.append(out)
        atol, rtol = tolerance(getattr(torch, dtype))
        assert_close(outs[0] - 0.5, want, rtol=rtol, atol=atol * float(np.abs(want).max()), what="scatter")
        assert np.array_equal(outs[0], outs[1])
        assert np.array_equal(outs[0], outs[0].T)


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (13, 17, 5), (40, 33, 300), (100, 3, 513)])
def test_gram_nt_awkward_sizes(m, n, k):
    g = np.random.default_rng(m * n + k)
    a, b = g.standard_normal((m, k)), g.standard_normal((n, k))
    out = np.zeros((m, n))
    if not _C.gram_available():
        with pytest.raises(RuntimeError, match="AVX-512"):
            _C.gram_nt(a, b, out, 1)
        return
    _C.gram_nt(a, b, out, 2)
    assert_close(out, a @ b.T, rtol=1e-12, atol=1e-12 * k, what="A B^T")
    again = np.zeros((m, n))
    _C.gram_nt(a, b, again, 1)
    assert np.array_equal(out, again)


def test_centred_scatter_rejects_bad_labels():
    """Checked in the binding, before any kernel: the same error with or without the Gram engine."""
    with pytest.raises(ValueError, match="labels"):
        _C.centred_scatter(
            np.zeros((3, 2), np.float32), "float32", np.array([0, 2, 0]), np.zeros((2, 2)), None, np.zeros((2, 2)), 1
        )


def test_ncc_sweep_bound_of_its_summation_depth_still_certifies():
    """Without AVX-512 the sweep adds chunks of features, so its bound counts the roundings of that
    tree (_C.ncc_sum_terms), far fewer than D for wide rows. Rows near the midpoint of two centres,
    at gaps from 1e-9 to 1e-2 of the scores' scale: every row the sweep calls certain holds the
    argmin of its float32 inputs (float64 products of them, exact to far below the gaps that are
    certified), and the near ties are flagged."""
    d, n = 9000, 400
    terms = _C.ncc_sum_terms(d)
    assert 1 <= terms <= d and [_C.ncc_sum_terms(k) for k in (1, 7, 512)] == [1, 7, 512]
    g = np.random.default_rng(11)
    centres = g.standard_normal((3, d)).astype(np.float32)
    mid = (centres[0].astype(np.float64) + centres[1]) / 2
    step = (centres[1].astype(np.float64) - centres[0]) / np.linalg.norm(centres[1].astype(np.float64) - centres[0])
    gaps = np.logspace(-9, -2, n) * np.sqrt(d) * np.where(np.arange(n) % 2, 1.0, -1.0)
    x = (mid + gaps[:, None] * step + 1e-3 * g.standard_normal((n, d))).astype(np.float32)
    offsets = (0.5 * (centres.astype(np.float64) ** 2).sum(1)).astype(np.float32)
    c = -centres  # argmin of ||c||^2 / 2 - x . c: the nearest centre
    shift = np.zeros(d, dtype=np.float32)
    cmax = [float(np.linalg.norm(c.astype(np.float64), axis=1).max())]
    omax = [float(np.abs(offsets.astype(np.float64)).max())]
    rel = 1.1 * (1.01 * terms + 4) * 2.0**-24
    best, unsure = _C.ncc_sweep(x, "float32", shift, c, offsets, [0, 3], rel, cmax, omax, 2)
    scores = offsets.astype(np.float64) + x.astype(np.float64) @ c.astype(np.float64).T
    certain = unsure[:, 0] == 0
    assert certain.sum() > n // 4 and (~certain).sum() > n // 4
    assert np.array_equal(best[certain, 0], scores[certain].argmin(1))


def test_reduce_pair_tile_takes_sides_and_params():
    """_C.reduce_pair_tile on an off-diagonal tile: its bound PairSums and in-place updates equal the
    torch reducer's; a bad side, vector or params buffer is refused naming it."""
    from ncfast import backends
    from ncfast.backends import torch as torch_backend

    g = torch.Generator().manual_seed(5)
    c = 12
    mt = torch.randn(c, 4, generator=g, dtype=torch.float64)
    norms = mt.norm(dim=1)

    def context():
        return backends.PairContext(
            sq=norms.square(),
            norms=norms,
            var=torch.linspace(0.5, 1.5, c, dtype=torch.float64),
            sup=torch.arange(c) % 2,
            g=float(torch.linalg.norm(mt @ mt.T)),
            etf_diag=0.3,
            etf_offdiag=-0.02,
            mean_cos=0.01,
            etf_cos=1.0 / (c - 1),
            best=torch.full((c,), float("inf"), dtype=torch.float64),
            best_idx=torch.full((c,), -1, dtype=torch.int64),
            cdnv_exponent=1.5,
        )

    rows, cols = slice(0, 5), slice(5, 12)
    want_ctx, ctx = context(), context()
    want = torch_backend.reduce_tile(mt[rows] @ mt[cols].T, rows, cols, want_ctx)
    tile = backends.tile_vectors(ctx.vectors().map(torch.Tensor.numpy), rows, cols)
    gram = (mt[rows] @ mt[cols].T).numpy()
    params = np.array(ctx.params())
    got = _C.reduce_pair_tile(gram, tile.rows, tile.cols, params, 2)
    assert isinstance(got, _C.PairSums)
    assert got.msdr_n == want.msdr_n == 2 * 17  # same parity: 3 x 3 + 2 x 4 pairs, ordered
    for key in ("resid", "cos_dev", "coh", "dist", "msdr_sum"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-12), key
    for key in ("cdnv", "unif"):
        assert getattr(got, key)[0] == getattr(want, key)[0] == 35
        assert getattr(got, key)[1:] == pytest.approx(getattr(want, key)[1:], rel=1e-12), key
    assert backends.PairSums.of(got).cdnv == got.cdnv
    assert torch.equal(ctx.best_idx, want_ctx.best_idx) and (ctx.best_idx >= 0).all()
    torch.testing.assert_close(ctx.ratio_sum, want_ctx.ratio_sum, rtol=1e-12, atol=0)

    short = tile.rows._replace(var=tile.rows.var[:4])
    with pytest.raises(ValueError, match=r"rows\.var: expected a vector of length 5"):
        _C.reduce_pair_tile(gram, short, tile.cols, params, 1)
    with pytest.raises(ValueError, match=r"cols\.best: expected a C-contiguous float64"):
        _C.reduce_pair_tile(gram, tile.rows, tile.cols._replace(best=tile.cols.best.astype(np.float32)), params, 1)
    with pytest.raises(ValueError, match=r"cols\.best_idx: expected a C-contiguous int64"):
        _C.reduce_pair_tile(gram, tile.rows, tile.cols._replace(best_idx=tile.cols.best_idx[::-1]), params, 1)
    with pytest.raises(ValueError, match=r"^sup: given for one side"):
        _C.reduce_pair_tile(gram, tile.rows._replace(sup=None), tile.cols, params, 1)
    with pytest.raises(ValueError, match=r"^params: expected 7 float64 values"):
        _C.reduce_pair_tile(gram, tile.rows, tile.cols, params[:6], 1)
    with pytest.raises(ValueError, match=r"^params: cdnv_exponent"):
        _C.reduce_pair_tile(gram, tile.rows, tile.cols, np.where(np.arange(7) == 5, 0.0, params), 1)
    with pytest.raises(ValueError, match=r"^gram: expected a 2-D tile"):
        _C.reduce_pair_tile(gram.ravel(), tile.rows, tile.cols, params, 1)
