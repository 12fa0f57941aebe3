"""Triton kernels (ncfast.triton) against float64 references, the C++ core and the torch reducer.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: TRITON_INTERPRET must be
set before the kernel modules are imported (triton.jit reads it when a kernel is defined). Sizes
stay small, with blocks large next to the data, because the interpreter's cost grows with
programs x loop steps; explicit small blocks exercise the multi-block paths.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

import ncfast  # noqa: E402
from ncfast import _C, _dispatch  # noqa: E402
from ncfast.pairwise import _Context, _reduce_tile_torch  # noqa: E402
from ncfast.triton import moments as tmoments  # noqa: E402
from ncfast.triton import ncc as tncc  # noqa: E402
from ncfast.triton import pairwise as tpairwise  # noqa: E402
from conftest import assert_close, make_data  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# ----------------------------------------------------------------------------------- dispatch
def test_backend_for_triton(monkeypatch):
    x = torch.zeros(3, 2, device=DEVICE)
    monkeypatch.setenv("NCFAST_BACKEND", "triton")
    assert _dispatch.backend_for(x) == "triton"
    cpu = torch.zeros(3, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _dispatch.backend_for(cpu)
    monkeypatch.delenv("NCFAST_BACKEND")
    assert _dispatch.backend_for(cpu) == "cpp"


# ------------------------------------------------------------------------------ block moments
def _moments64(x: torch.Tensor, y: torch.Tensor, c: int):
    """Brute-force float64 block moments of the values x holds (two-pass, per class)."""
    h = x.double().cpu().numpy()
    labels = y.cpu().numpy()
    d = h.shape[1]
    counts = np.zeros(c, dtype=np.int64)
    means, unit = np.zeros((c, d)), np.zeros((c, d))
    m2, norm_sums = np.zeros(c), np.zeros(c)
    for k in range(c):
        rows = h[labels == k]
        counts[k] = rows.shape[0]
        if not rows.shape[0]:
            continue
        means[k] = rows.mean(0)
        m2[k] = ((rows - means[k]) ** 2).sum()
        norms = np.sqrt((rows ** 2).sum(1))
        unit[k] = (rows / np.where(norms > 0, norms, 1.0)[:, None]).sum(0)
        norm_sums[k] = norms.sum()
    return counts, means, m2, unit, norm_sums


def _check_moments(got, want, rtol):
    """got against want; got without unit sums (None, None) is checked on the first three."""
    names = ("counts", "means", "m2", "unit_sums", "norm_sums")
    assert np.array_equal(got[0].cpu().numpy(), want[0]), "counts"
    if got[3] is None:
        assert got[4] is None
        got, want = got[:3], want[:3]
    for name, a, b in zip(names[1:], got[1:], want[1:]):
        a = a.cpu().numpy()
        assert a.dtype == np.float64, name
        assert_close(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-300), what=name)


# (n, d, c, absent, block_rows, block_d): one and several column blocks, chunks cut inside classes
SHAPES = [
    (300, 70, 7, (2,), 64, None),
    (257, 33, 5, (), 16, 16),
    (1, 1, 1, (), 64, None),
    (40, 5, 1, (), 16, None),
    (90, 17, 40, (0, 13, 39), 16, 16),
]


@pytest.mark.parametrize("unit_sums", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,c,absent,block_rows,block_d", SHAPES)
def test_block_moments_match_float64(dtype, n, d, c, absent, block_rows, block_d, unit_sums):
    g = torch.Generator().manual_seed(n + d + c)
    y = torch.randint(0, c, (n,), generator=g)
    keep = min(set(range(c)) - set(absent))
    for a in absent:
        y[y == a] = keep
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    x[0] = 0  # a zero row: its unit vector stays zero
    x = x.to(DEVICE)
    got = tmoments.block_moments(x, y.to(DEVICE), c, block_rows=block_rows, block_d=block_d, unit_sums=unit_sums)
    want = _moments64(x, y, c)
    assert (got[3] is None) == (not unit_sums)
    assert (want[0][list(absent)] == 0).all()
    _check_moments(got, want, rtol=1e-10)


@pytest.mark.parametrize("fanin,unit_sums", [(2, True), (3, True), (2, False)])
def test_block_moments_tree_of_merges(fanin, unit_sums):
    """Small fan-in: 257 rows of one dominant class in 16-row chunks need three or more levels of
    merges (runs of 2 or 3 partials, then the classes); still the float64 statistics, and
    the collapse regime (spread 1e-4 of the means) keeps its M2."""
    g = torch.Generator().manual_seed(17)
    y = torch.zeros(300, dtype=torch.int64)
    y[257:] = torch.randint(1, 4, (43,), generator=g)
    x = (1e3 + 0.1 * torch.randn(300, 33, generator=g, dtype=torch.float64))
    got = tmoments.block_moments(x.to(DEVICE), y.to(DEVICE), 4, block_rows=16, block_d=16, fanin=fanin,
                                 unit_sums=unit_sums)
    _check_moments(got, _moments64(x, y, 4), rtol=1e-9)


def test_block_moments_strided_and_torch_reference():
    x, y, c = make_data(n=210, d=40, c=6, absent=(4,), seed=3)
    wide = torch.randn(210, 80, dtype=torch.float32)
    wide[:, ::2] = x
    strided = wide[:, ::2].to(DEVICE)  # column stride 2
    assert not strided.is_contiguous()
    got = tmoments.block_moments(strided, y.to(DEVICE), c, block_rows=32, block_d=16)
    want = _dispatch._torch_block_moments(x, y, c)
    assert torch.equal(got[0].cpu(), want[0])
    for a, b in zip(got[1:], want[1:]):
        b = b.numpy()
        assert_close(a.cpu().numpy(), b, rtol=1e-10, atol=1e-10 * np.abs(b).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_moments_collapse_regime(dtype):
    """Means ~1e3, within-class spread 1e-4 of them: M2 still to 1e-6 (no raw second moments)."""
    x, y, c = make_data(n=280, d=24, c=4, spread=0.1, shift=1e3, seed=5, dtype=dtype)
    got = tmoments.block_moments(x.to(DEVICE), y.to(DEVICE), c, block_rows=32)
    want = _moments64(x, y, c)
    assert_close(got[2].cpu().numpy(), want[2], rtol=1e-6, what="m2")
    assert_close(got[1].cpu().numpy(), want[1], rtol=1e-12, what="means")


def test_centre_rows():
    x, y, c = make_data(n=130, d=21, c=5, seed=7, dtype=torch.bfloat16)
    means = torch.randn(c, 21, dtype=torch.float64)
    xt = x.T.contiguous().T.to(DEVICE)  # column-major
    out = torch.full((130, 21), float("nan"), dtype=torch.float64, device=DEVICE)
    got = tmoments.centre_rows(xt, y.to(DEVICE), means.to(DEVICE), out=out, block_rows=32, block_d=16)
    assert got.data_ptr() == out.data_ptr()
    # both sides widen exactly and subtract once in float64: bit-equal
    assert torch.equal(got.cpu(), x.double() - means[y])


# ---------------------------------------------------------------------------------- NCC sweep
def _ncc_case(n, d, sizes, dtype, seed, near_ties=False, offset=10.0):
    """Rows, a float32 shift, and groups of float64 (centres, offsets): the nearest class mean
    (centres -2 (mu - t), offsets ||mu - t||^2) first, then random affine problems. ``offset``
    is added to every feature (the shift takes it out again)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(sizes[0], d, generator=g, dtype=torch.float64) * 2 + offset
    if near_ties:
        # rows on the bisector of two means (up to 1e-7): their top-2 gap is within any float32 bound
        pick = torch.randint(0, sizes[0] - 1, (n,), generator=g)
        pick[1:60:3] = 15  # pairs 15 / 16 straddle a 16-class tile: the best can come after the second
        pick[0], pick[3] = 2, 7  # rows near the means of classes 2 and 7 (duplicated in a test)
        mid = 0.5 * (mu[pick] + mu[pick + 1])
        x64 = mid + 1e-7 * torch.randn(n, d, generator=g, dtype=torch.float64)
        x64[::3] = mu[pick[::3]] + 0.3 * torch.randn((n + 2) // 3, d, generator=g, dtype=torch.float64)
    else:
        x64 = mu[torch.randint(0, sizes[0], (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x64.to(dtype)
    shift = mu.mean(0).to(torch.float32)
    mc = mu - shift.double()
    centres, offsets = [-2.0 * mc], [mc.square().sum(1)]
    for k in sizes[1:]:
        centres.append(torch.randn(k, d, generator=g, dtype=torch.float64))
        offsets.append(torch.randn(k, generator=g, dtype=torch.float64))
    return x, shift, centres, offsets


def _float64_argmins(x, shift, centres, offsets):
    """Exact scores of the float32-stored problem, in float64 numpy: (argmins (N, G), gaps (N, G))."""
    xs = x.double().cpu().numpy() - shift.double().numpy()
    best, gaps = [], []
    for c, o in zip(centres, offsets):
        s = xs @ c.float().double().numpy().T + o.float().double().numpy()
        best.append(np.argmin(s, axis=1))
        part = np.sort(s, axis=1)
        gaps.append(part[:, 1] - part[:, 0] if s.shape[1] > 1 else np.full(s.shape[0], np.inf))
    return np.stack(best, 1), np.stack(gaps, 1)


def _sweep(x, shift, centres, offsets, precision, **blocks):
    d = x.shape[1]
    starts = np.cumsum([0] + [c.shape[0] for c in centres]).tolist()
    cmax = [float(c.float().double().norm(dim=1).max()) for c in centres]
    omax = [float(o.float().double().abs().max()) for o in offsets]
    rel = tncc.relative_bound(precision, d)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    best, unsure = tncc.ncc_sweep(dev(x), dev(shift), dev(torch.cat(centres).float()),
                                  dev(torch.cat(offsets).float()), starts, rel, cmax, omax, precision, **blocks)
    buf, dtype_name = _dispatch._buffer(x)
    cbest, cunsure = _C.ncc_sweep(buf, dtype_name, shift.numpy(), torch.cat(centres).float().numpy(),
                                  torch.cat(offsets).float().numpy(), starts, rel, cmax, omax, 1, "fp32")
    xs = x.double() - shift.double()
    bound = rel * (xs.norm(dim=1, keepdim=True).numpy() * np.array(cmax) + np.array(omax))
    return best.cpu().numpy(), unsure.cpu().numpy(), cbest, cunsure.astype(bool), bound


@pytest.mark.parametrize("precision", tncc.PRECISIONS)
@pytest.mark.parametrize("n,d,sizes,dtype,blocks", [
    (300, 70, [40, 13, 1], torch.float32, {}),
    (300, 70, [40, 13], torch.float64, {}),
    (97, 17, [35, 20], torch.bfloat16, dict(block_m=32, block_n=16, block_d=16)),
    (61, 33, [23], torch.float16, dict(block_m=16, block_n=16, block_d=16)),
    (1, 1, [3, 2], torch.float32, {}),
])
def test_ncc_sweep_certified(precision, n, d, sizes, dtype, blocks):
    x, shift, centres, offsets = _ncc_case(n, d, sizes, dtype, seed=n + d)
    best, unsure, cbest, cunsure, bound = _sweep(x, shift, centres, offsets, precision, **blocks)
    want, gaps = _float64_argmins(x, shift, centres, offsets)
    assert best.shape == unsure.shape == (n, len(sizes))
    certain = ~unsure
    assert np.array_equal(best[certain], want[certain])
    both = certain & ~cunsure
    assert np.array_equal(best[both], cbest[both])
    # sound: a true gap well inside the bound is always flagged; complete: one beyond twice the
    # flagging threshold is always certified
    assert unsure[gaps < 0.1 * bound].all()
    assert not (unsure & (gaps > 4.0 * bound)).any()
    if sizes[-1] == 1:
        assert (best[:, -1] == 0).all() and not unsure[:, -1].any()
    if n > 50 and precision == "ieee":
        assert certain[:, 0].mean() > 0.9  # ties-free data: the bound is not vacuous


@pytest.mark.parametrize("precision", tncc.PRECISIONS)
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 10.0), (torch.float64, 1e4)])
def test_ncc_sweep_near_ties(precision, dtype, offset):
    """Rows on bisectors; with float64 input far from the origin, x - shift must be rounded once
    (rounding x to float32 first would err far beyond the bound)."""
    x, shift, centres, offsets = _ncc_case(240, 40, [30], dtype, seed=11, near_ties=True, offset=offset)
    # exact ties inside a class tile (classes 2 and 5 identical) and across tiles (7 and 23)
    for lo, hi in ((2, 5), (7, 23)):
        centres[0][hi], offsets[0][hi] = centres[0][lo], offsets[0][lo]
    best, unsure, cbest, cunsure, bound = _sweep(x, shift, centres, offsets, precision, block_n=16, block_d=16)
    want, gaps = _float64_argmins(x, shift, centres, offsets)
    assert unsure[1::3].mean() > 0.5  # the bisector rows are flagged
    assert np.array_equal(best[~unsure], want[~unsure])
    both = ~unsure & ~cunsure
    assert np.array_equal(best[both], cbest[both])
    assert unsure[gaps < 0.1 * bound].all()
    assert not (unsure & (gaps > 4.0 * bound)).any()
    # the lower of two equal scores wins
    assert (best[:, 0] == 2).any() and (best[:, 0] == 7).any() and not np.isin(best, (5, 23)).any()


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_ncc_sweep_flags_at_the_threshold(precision):
    """True top-2 gaps spread over [0, 4 bound]: rows are flagged exactly around 2 * bound (the
    actual rounding is far below the bound), so the bound uses the whole row norm (D spans three
    feature blocks here) and the running second best across class tiles. (Only the float32-level
    precisions: on a GPU one tf32 or bf16 rounding is a sizeable part of its bound.)"""
    n, d, k = 200, 40, 20
    g = torch.Generator().manual_seed(17)
    mu = torch.randn(k, d, generator=g, dtype=torch.float64) * 2 + 10
    shift = mu.mean(0).to(torch.float32)
    mc = mu - shift.double()
    centres, offsets = [-2.0 * mc], [mc.square().sum(1)]
    w, o = centres[0].float().double(), offsets[0].float().double()
    a = torch.randint(0, k - 1, (n,), generator=g)
    b = a + 1
    xs = 0.5 * (mc[a] + mc[b])  # the bisector of a and b, then moved along w_b - w_a to the target gap
    bound = tncc.relative_bound(precision, d) * (xs.norm(dim=1) * w.norm(dim=1).max() + o.abs().max())
    target = 4.0 * torch.rand(n, generator=g, dtype=torch.float64) * bound
    dw = w[b] - w[a]
    xs += ((target - (o[b] - o[a]) - (xs * dw).sum(1)) / dw.square().sum(1)).unsqueeze(1) * dw
    x = (xs + shift.double()).to(torch.float32)
    best, unsure, cbest, cunsure, bound = _sweep(x, shift, centres, offsets, precision, block_n=16, block_d=16)
    want, gaps = _float64_argmins(x, shift, centres, offsets)
    ratio = gaps / bound
    assert (ratio < 1.8).sum() > 40 and (ratio > 2.2).sum() > 40
    assert unsure[ratio < 1.8].all()
    assert not unsure[ratio > 2.2].any()
    assert np.array_equal(best[~unsure], want[~unsure])


def test_ncc_sweep_bf16_rows_rounded_block_by_block(monkeypatch):
    """The "bf16" sweep rounds x - shift to bfloat16 a block of rows at a time before its launches:
    blocks of 7 rows (15 launches, the last one short) give the answers of one launch, and those
    are the float64 argmins wherever the sweep is sure."""
    x, shift, centres, offsets = _ncc_case(100, 40, [30, 9], torch.float32, seed=23)
    whole = _sweep(x, shift, centres, offsets, "bf16", block_n=16, block_d=16)
    monkeypatch.setattr(tncc, "_ROUNDED_BLOCK", 7 * 40)
    blocks = _sweep(x, shift, centres, offsets, "bf16", block_n=16, block_d=16)
    assert np.array_equal(whole[0], blocks[0]) and np.array_equal(whole[1], blocks[1])
    want, _ = _float64_argmins(x, shift, centres, offsets)
    sure = ~blocks[1]
    assert sure.mean() > 0.5 and np.array_equal(blocks[0][sure], want[sure])


def _toward_zero(s: np.ndarray) -> np.ndarray:
    """float64 values rounded to float32 toward zero (the worst a truncating adder does)."""
    r = s.astype(np.float32)
    over = np.abs(r.astype(np.float64)) > np.abs(s)
    r[over] = np.nextafter(r[over], np.float32(0))
    return r


def _tf32_truncated(a: np.ndarray) -> np.ndarray:
    """The tf32 value a tensor core may read from float32 a: the low 13 mantissa bits dropped."""
    return (a.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _mma_step(acc: np.ndarray, prods: np.ndarray) -> np.ndarray:
    """acc + the sum of prods (..., k) as a tensor core adds them (Fasi et al. 2021): every addend
    aligned to the largest one's exponent and truncated to 24 bits there, summed, the sum
    truncated to float32."""
    terms = np.concatenate([acc[..., None].astype(np.float64), prods], axis=-1)
    big = np.abs(terms).max(axis=-1, keepdims=True)
    ulp = np.exp2(np.floor(np.log2(np.where(big > 0, big, 1.0))) - 23)
    return _toward_zero(np.sum(np.trunc(terms / ulp) * ulp, axis=-1))


def _emulated_scores(xs: np.ndarray, w: np.ndarray, o: np.ndarray, precision: str) -> np.ndarray:
    """o + xs @ w.T with the worst roundings relative_bound allows for: "ieee" as rounded float32
    products summed one at a time with truncating adds; the tensor-core precisions with operands
    truncated to tf32 (tf32x3 split into truncated high and low parts) or rounded to bfloat16,
    exact products, and each instruction's k = 8 (tf32) or 16 (bf16) products added to the
    accumulator as _mma_step does."""
    if precision == "ieee":
        pairs, k = [(xs, w)], 1
    elif precision == "tf32":
        pairs, k = [(_tf32_truncated(xs), _tf32_truncated(w))], 8
    elif precision == "tf32x3":
        xh, wh = _tf32_truncated(xs), _tf32_truncated(w)
        xl, wl = _tf32_truncated(xs - xh), _tf32_truncated(w - wh)
        pairs, k = [(xh, wl), (xl, wh), (xh, wh)], 8
    else:
        pairs, k = [tuple(torch.from_numpy(a).bfloat16().float().numpy() for a in (xs, w))], 16
    acc = np.broadcast_to(o, (xs.shape[0], w.shape[0])).astype(np.float32)
    for a, b in pairs:
        for k0 in range(0, xs.shape[1], k):
            if precision == "ieee":
                prod = np.outer(a[:, k0], b[:, k0]).astype(np.float32)
                acc = _toward_zero(acc.astype(np.float64) + prod)
            else:
                a64, b64 = a[:, k0:k0 + k].astype(np.float64), b[:, k0:k0 + k].astype(np.float64)
                acc = _mma_step(acc, a64[:, None, :] * b64[None, :, :])
    return acc


@pytest.mark.parametrize("precision", tncc.PRECISIONS)
def test_relative_bound_covers_worst_roundings(precision):
    """relative_bound against an emulation of each precision's worst rounding (the interpreter
    multiplies in float32 whatever the precision, so this is where the tensor-core bounds meet
    their roundings): positive, aligned rows and centres, so no error cancels. The error stays
    under the bound, and above a fiftieth of it (the bound is not vacuous)."""
    n, k, d = 24, 16, 300
    g = np.random.default_rng(3)
    xs = g.uniform(0.5, 2.0, (n, d)).astype(np.float32)
    w = g.uniform(0.5, 2.0, (k, d)).astype(np.float32)
    o = g.uniform(0.0, 10.0, k).astype(np.float32)
    exact = o.astype(np.float64) + xs.astype(np.float64) @ w.astype(np.float64).T
    err = np.abs(_emulated_scores(xs, w, o, precision).astype(np.float64) - exact)
    bound = tncc.relative_bound(precision, d) * (np.linalg.norm(xs.astype(np.float64), axis=1)[:, None]
                                                 * np.linalg.norm(w.astype(np.float64), axis=1).max()
                                                 + np.abs(o).max())
    ratio = err / bound
    assert ratio.max() <= 1.0
    assert ratio.max() > 0.02


# ---------------------------------------------------------------------------------- pair tiles
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
        return _Context(sq=sq, norms=norms, var=var, sup=sup if with_sup else None,
                        g=float(torch.linalg.norm(mt @ mt.T)), etf_diag=(1.0 - 1.0 / c) * inv,
                        etf_offdiag=-inv / c, mean_cos=(float(unit_sum.square().sum()) - c) / (c * (c - 1)),
                        etf_cos=1.0 / (c - 1), best=torch.full((c,), float("inf"), dtype=torch.float64),
                        best_idx=torch.full((c,), -1, dtype=torch.int64))
    return mt, ctx


@pytest.mark.parametrize("f64_dot", [True, False])  # False: the FMA fallback for a Triton without float64 dots
@pytest.mark.parametrize("with_sup", [False, True])
@pytest.mark.parametrize("rows,cols,block", [
    (slice(0, 25), slice(0, 25), 64),
    (slice(0, 25), slice(0, 25), 16),
    (slice(0, 25), slice(25, 40), 64),
    (slice(0, 25), slice(25, 40), 16),
])
def test_reduce_pair_tile_matches_torch(with_sup, rows, cols, block, f64_dot, monkeypatch):
    where = torch.zeros(1, device=DEVICE).device  # cuda:0, not cuda
    monkeypatch.setitem(tpairwise._F64_DOT, (where.type, where.index), f64_dot)
    mt, make_ctx = _pair_context(40, 23, seed=1)
    want_ctx, got_ctx = make_ctx(with_sup), make_ctx(with_sup)
    # a previous tile's running minima, so the in-place merge keeps or replaces them
    for k in (want_ctx, got_ctx):
        k.best[rows] = torch.linspace(20.0, 60.0, rows.stop - rows.start, dtype=torch.float64)
        k.best_idx[rows] = 99
    want = _reduce_tile_torch(mt[rows] @ mt[cols].T, rows, cols, want_ctx)
    k = got_ctx
    sup_r = sup_c = None
    if with_sup:
        sup_r, sup_c = k.sup[rows].to(DEVICE), k.sup[cols].to(DEVICE)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    best, best_idx = dev(k.best), dev(k.best_idx)
    got = tpairwise.reduce_pair_tile(
        dev(mt[rows]), dev(mt[cols]), rows.start == cols.start, dev(k.sq[rows]), dev(k.sq[cols]),
        dev(k.norms[rows]), dev(k.norms[cols]), dev(k.var[rows]), dev(k.var[cols]), sup_r, sup_c, k.g,
        k.etf_diag, k.etf_offdiag, k.mean_cos, k.etf_cos, rows.start, cols.start, best[rows], best_idx[rows],
        best[cols], best_idx[cols], block_i=block, block_j=block, block_d=16)
    assert set(got) == set(want)
    for key in ("resid", "cos_dev", "coh", "dist", "msdr_sum"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-300), key
    assert got["msdr_n"] == want["msdr_n"]
    assert (got["msdr_n"] > 0) == with_sup
    assert got["cdnv"][0] == want["cdnv"][0] > 0
    assert got["cdnv"][1:] == pytest.approx(want["cdnv"][1:], rel=1e-9)
    assert torch.equal(best_idx.cpu(), want_ctx.best_idx)
    np.testing.assert_allclose(best.cpu().numpy(), want_ctx.best.numpy(), rtol=1e-12)  # inf where untouched
    assert (want_ctx.best_idx[rows] != 99).any() and (want_ctx.best_idx[rows] == 99).any()


def test_pair_tile_falls_back_when_float64_dot_does_not_compile(monkeypatch):
    """On a GPU whose Triton refuses a float64 tl.dot, the first launch warns once, relaunches with
    the FMA form, and later launches go straight to it; a failure after a successful compile, or on
    the CPU interpreter, is not swallowed."""
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, F64_DOT, BLOCK_D, **kwargs):
                calls.append((F64_DOT, BLOCK_D))
                if F64_DOT:
                    raise RuntimeError("float64 dot not supported")
            return run

    monkeypatch.setattr(tpairwise, "_pair_tile_kernel", Kernel())
    monkeypatch.setattr(tpairwise, "_F64_DOT", {})
    gpu = torch.device("cuda", 3)
    with pytest.warns(RuntimeWarning, match="float64 tl.dot"):
        tpairwise._launch((1, 1), (), {}, gpu, 32)
    assert calls == [(True, 32), (False, 8)] and tpairwise._F64_DOT == {("cuda", 3): False}
    tpairwise._launch((1, 1), (), {}, gpu, 32)
    assert calls[-1] == (False, 8) and len(calls) == 3
    with pytest.raises(RuntimeError):  # the interpreter: no fallback
        tpairwise._launch((1, 1), (), {}, torch.device("cpu"), 32)
    tpairwise._F64_DOT[("cuda", 4)] = True  # compiled before on that GPU: a later failure is real
    with pytest.raises(RuntimeError):
        tpairwise._launch((1, 1), (), {}, torch.device("cuda", 4), 32)


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
    want_ctx = _Context(**{**k.__dict__, "best": k.best.clone(), "best_idx": k.best_idx.clone()})
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    best, best_idx = dev(k.best), dev(k.best_idx)
    rows = slice(0, 25)
    for cols in (slice(25, 33), slice(33, 40)):
        want = _reduce_tile_torch(mt[rows] @ mt[cols].T, rows, cols, want_ctx)
        got = tpairwise.reduce_pair_tile(
            dev(mt[rows]), dev(mt[cols]), False, dev(k.sq[rows]), dev(k.sq[cols]), dev(k.norms[rows]),
            dev(k.norms[cols]), dev(k.var[rows]), dev(k.var[cols]), None, None, k.g, k.etf_diag, k.etf_offdiag,
            k.mean_cos, k.etf_cos, rows.start, cols.start, best[rows], best_idx[rows], best[cols], best_idx[cols],
            block_i=block, block_j=block, block_d=16)
        assert got["dist"] == pytest.approx(want["dist"], rel=1e-9)
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
    want_ctx = _Context(**{**k.__dict__, "best": k.best.clone(), "best_idx": k.best_idx.clone()})
    rows = slice(0, 40)
    want = _reduce_tile_torch(mt @ mt.T, rows, rows, want_ctx)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    best, best_idx = dev(k.best), dev(k.best_idx)
    got = tpairwise.reduce_pair_tile(
        dev(mt), dev(mt), True, dev(k.sq), dev(k.sq), dev(k.norms), dev(k.norms), dev(k.var), dev(k.var), None,
        None, k.g, k.etf_diag, k.etf_offdiag, k.mean_cos, k.etf_cos, 0, 0, best, best_idx, best, best_idx,
        block_i=block, block_j=block, block_d=16)
    for key in ("resid", "cos_dev", "coh", "dist"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert got["cdnv"][0] == want["cdnv"][0] == 40 * 39 // 2
    assert torch.equal(best_idx.cpu(), want_ctx.best_idx)
    assert (best_idx[5], best_idx[21], best_idx[37]) == (21, 5, 5)
    np.testing.assert_allclose(best.cpu().numpy(), want_ctx.best.numpy(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------- end to end
def test_class_moments_triton_equals_cpp(monkeypatch):
    x, y, c = make_data(n=260, d=20, c=6, imbalanced=True, absent=(3,), seed=13)
    calls = []
    for name in ("block_moments", "centre_rows"):
        fn = getattr(tmoments, name)
        monkeypatch.setattr(tmoments, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    monkeypatch.setenv("NCFAST_BACKEND", "cpp")
    want = ncfast.class_moments(x, y, num_classes=c)
    streamed_want = ncfast.ClassMoments(c, 20).update(x[:100], y[:100]).update(x[100:], y[100:])
    monkeypatch.setenv("NCFAST_BACKEND", "triton")
    xd, yd = x.to(DEVICE), y.to(DEVICE)
    assert _dispatch.backend_for(xd) == "triton"
    got = ncfast.class_moments(xd, yd, num_classes=c)
    streamed = ncfast.ClassMoments(c, 20, device=DEVICE).update(xd[:100], yd[:100]).update(xd[100:], yd[100:])
    assert "block_moments" in calls and "centre_rows" in calls
    for a, b in ((got, want), (streamed, streamed_want)):
        assert torch.equal(a.count.cpu(), b.count)
        for key in ("mean", "m2", "unit_sum", "norm_sum", "scatter", "wscatter"):
            ref_k = getattr(b, key)
            if ref_k is None:
                assert getattr(a, key) is None, key
                continue
            ref_k = ref_k.numpy()
            assert_close(getattr(a, key).cpu().numpy(), ref_k, rtol=1e-10, atol=1e-10 * np.abs(ref_k).max(), what=key)
    assert want.wscatter is not None  # imbalanced one-shot: the balanced scatter is exercised too


# --------------------------------------------------------------------------- end to end, wired
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_ncc_entry_points_on_triton_backend(mode, monkeypatch):
    """ncc_assign / classifier_decisions / ncc_and_decisions through the Triton sweep: the float64
    argmin on every row, near-ties included, in both modes (fast = tf32 first)."""
    from ncfast import reference as ref

    monkeypatch.setenv("NCFAST_BACKEND", "triton")
    x, y, c = make_data(n=150, d=21, c=9, spread=2.0, shift=50.0, seed=4)
    means = torch.from_numpy(ref.class_means(x, y))
    mid = ((means[0] + means[1]) / 2).to(x.dtype)
    x = torch.cat([x, mid.unsqueeze(0)]).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(c, 21, generator=g), torch.randn(c, generator=g)
    xs = x.cpu()
    got = ncfast.ncc_assign(x, means.to(DEVICE), mode=mode).cpu()
    assert torch.equal(got, torch.from_numpy(ref.ncc_assign(xs, means)))
    nearest, decisions = ncfast.ncc_and_decisions(x, means.to(DEVICE), w.to(DEVICE), b.to(DEVICE), mode=mode)
    assert torch.equal(nearest.cpu(), torch.from_numpy(ref.ncc_assign(xs, means)))
    assert torch.equal(decisions.cpu(), torch.from_numpy(ref.decisions(xs, w, b)))


@pytest.mark.parametrize("pick", ["tf32", "bf16", None])
def test_fast_mode_probe_picks_among_tensor_core_precisions(pick, monkeypatch):
    """On the Triton path the fast mode's probe weighs tf32 and bf16 against the float32-level
    sweep and takes the cheapest (forced here: one low precision made free, or none): the rest
    of the rows go that way, its unsure rows get the float32 sweep, and every answer is the
    float64 argmin."""
    import ncfast.ncc as ncc_mod
    from ncfast import reference as ref

    monkeypatch.setenv("NCFAST_BACKEND", "triton")
    monkeypatch.setattr(ncc_mod, "_FAST_PROBE_ROWS", 64)
    seen = []
    real_sweep = ncc_mod._sweep

    def sweep(x, shift, problems, precision, backend):
        seen.append((x.shape[0], precision))
        return real_sweep(x, shift, problems, precision, backend)

    monkeypatch.setattr(ncc_mod, "_sweep", sweep)
    costs = iter([0.0 if low == pick else math.inf for low in ("tf32", "bf16")])
    monkeypatch.setattr(ncc_mod, "_low_cost", lambda *a: next(costs))
    g = torch.Generator().manual_seed(8)
    k, d, n = 12, 20, 400
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    x = (means[torch.randint(0, k, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64))
    x = x.float()
    got = ncfast.ncc_assign(x.to(DEVICE), means.to(DEVICE), mode="fast").cpu()
    assert torch.equal(got, torch.from_numpy(ref.ncc_assign(x, means)))
    assert {p for rows, p in seen if rows == 64} == {"fp32", "tf32", "bf16"}  # the probe, every way
    rest = [p for rows, p in seen if rows == n - 64]
    assert rest == [pick or "fp32"]


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
    got = ncfast.nc_metrics(x.to(DEVICE), y.to(DEVICE), num_classes=c, weight=w.to(DEVICE), bias=b.to(DEVICE),
                            superclass=superclass.to(DEVICE), ood_features=ood.to(DEVICE),
                            class_means=train_means.to(DEVICE))
    want = ref.nc_metrics(x, y, num_classes=c, weight=w, bias=b, superclass=superclass, ood_features=ood,
                          class_means=train_means)
    assert set(got) == set(want)
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
    want_ctx.cdnv_exponent = p
    want = _reduce_tile_torch(mt[rows] @ mt[cols].T, rows, cols, want_ctx)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    best, best_idx, ratio = dev(k.best), dev(k.best_idx), dev(k.ratio_sum)
    got = tpairwise.reduce_pair_tile(
        dev(mt[rows]), dev(mt[cols]), rows.start == cols.start, dev(k.sq[rows]), dev(k.sq[cols]),
        dev(k.norms[rows]), dev(k.norms[cols]), dev(k.var[rows]), dev(k.var[cols]), None, None, k.g,
        k.etf_diag, k.etf_offdiag, k.mean_cos, k.etf_cos, rows.start, cols.start, best[rows], best_idx[rows],
        best[cols], best_idx[cols], cdnv_exponent=p, ratio_r=ratio[rows], ratio_c=ratio[cols],
        block_i=16, block_j=16, block_d=16)
    for key in ("cdnv", "unif"):
        assert got[key][0] == want[key][0] > 0, key
        assert got[key][1:] == pytest.approx(want[key][1:], rel=1e-9), key
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
    stats = class_pair_stats(ncfast.class_moments(x.to(DEVICE), y.to(DEVICE), num_classes=c, scatter=False),
                             tile=4, cdnv_exponent=p)
    mean, var = ref.uniformity(x, y, num_classes=c)
    assert stats.uniformity_mean == pytest.approx(mean, rel=1e-6)
    assert stats.uniformity_var == pytest.approx(var, rel=1e-6)
    assert stats.cdnv == pytest.approx(ref.cdnv(x, y, num_classes=c, cdnv_exponent=p), rel=1e-6)
    assert_close(stats.cdnv_per_class.cpu().numpy(), ref.cdnv_per_class(x, y, num_classes=c, cdnv_exponent=p),
                 rtol=1e-6, what="cdnv_per_class")
    if p != 1.0:
        return
    means = torch.tensor([[3, 4, 0], [3, 4, 0], [-12, -16, 0], [0, 0, 5], [0, 0, -5], [6, 8, 0]], dtype=torch.float32)
    y = torch.arange(6).repeat_interleave(2)
    x = means[y] + torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]).repeat(6, 1)
    stats = class_pair_stats(ncfast.class_moments(x.to(DEVICE), y.to(DEVICE), num_classes=7, scatter=False), tile=4)
    assert stats.uniformity_mean == np.inf and np.isnan(stats.uniformity_var)
    got = stats.cdnv_per_class.cpu().numpy()
    assert got[0] == got[1] == np.inf and np.isnan(got[6]) and np.isfinite(got[2:6]).all()
