"""The Triton certified NCC sweep (ncfast.triton.ncc) against float64 argmins and the worst
roundings its bounds allow, and the NCC entry points on the Triton backend.

In the interpreter without a GPU (see test_triton_moments.py).
"""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import ncfast  # noqa: E402
from helpers import DEVICE, make_data  # noqa: E402
from ncfast import _C, _numerics, backends  # noqa: E402
from ncfast.backends import cpp as cpp_backend  # noqa: E402
from ncfast.triton import ncc as tncc  # noqa: E402


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
    rel = _numerics.rel_tensor_core(precision, d)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    best, unsure = tncc.ncc_sweep(
        dev(x),
        dev(shift),
        dev(torch.cat(centres).float()),
        dev(torch.cat(offsets).float()),
        starts,
        rel,
        cmax,
        omax,
        precision,
        **blocks,
    )
    buf, dtype_name = cpp_backend.buffer(x)
    cbest, cunsure = _C.ncc_sweep(
        buf,
        dtype_name,
        shift.numpy(),
        torch.cat(centres).float().numpy(),
        torch.cat(offsets).float().numpy(),
        starts,
        rel,
        cmax,
        omax,
        1,
        "fp32",
    )
    xs = x.double() - shift.double()
    bound = rel * (xs.norm(dim=1, keepdim=True).numpy() * np.array(cmax) + np.array(omax))
    return best.cpu().numpy(), unsure.cpu().numpy(), cbest, cunsure.astype(bool), bound


@pytest.mark.parametrize("precision", tncc.DOTS)
@pytest.mark.parametrize(
    "n,d,sizes,dtype,blocks",
    [
        (300, 70, [40, 13, 1], torch.float32, {}),
        (300, 70, [40, 13], torch.float64, {}),
        (97, 17, [35, 20], torch.bfloat16, dict(block_m=32, block_n=16, block_d=16)),
        (61, 33, [23], torch.float16, dict(block_m=16, block_n=16, block_d=16)),
        (1, 1, [3, 2], torch.float32, {}),
    ],
)
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


@pytest.mark.parametrize("precision", tncc.DOTS)
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
    bound = _numerics.rel_tensor_core(precision, d) * (xs.norm(dim=1) * w.norm(dim=1).max() + o.abs().max())
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
    """o + xs @ w.T with the worst roundings the score bound allows for: "ieee" as rounded float32
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
                a64, b64 = a[:, k0 : k0 + k].astype(np.float64), b[:, k0 : k0 + k].astype(np.float64)
                acc = _mma_step(acc, a64[:, None, :] * b64[None, :, :])
    return acc


@pytest.mark.parametrize("precision", tncc.DOTS)
def test_score_bound_covers_worst_roundings(precision):
    """_numerics.rel_tensor_core against an emulation of each precision's worst rounding (the interpreter
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
    bound = _numerics.rel_tensor_core(precision, d) * (
        np.linalg.norm(xs.astype(np.float64), axis=1)[:, None] * np.linalg.norm(w.astype(np.float64), axis=1).max()
        + np.abs(o).max()
    )
    ratio = err / bound
    assert ratio.max() <= 1.0
    assert ratio.max() > 0.02


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
    monkeypatch.setattr(backends.get("triton"), "probe_rows", lambda: 64)
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
    x = means[torch.randint(0, k, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x.float()
    got = ncfast.ncc_assign(x.to(DEVICE), means.to(DEVICE), mode="fast").cpu()
    assert torch.equal(got, torch.from_numpy(ref.ncc_assign(x, means)))
    assert {p for rows, p in seen if rows == 64} == {"fp32", "tf32", "bf16"}  # the probe, every way
    rest = [p for rows, p in seen if rows == n - 64]
    assert rest == [pick or "fp32"]


def test_dot_of_maps_the_backend_precisions():
    """One precision vocabulary (backends.base.PRECISIONS); the Triton dot is how a precision is formed."""
    from ncfast.backends.base import PRECISIONS

    assert {p: tncc.dot_of(p) for p in PRECISIONS} == {"fp32": "tf32x3", "tf32": "tf32", "bf16": "bf16"}
    assert set(map(tncc.dot_of, PRECISIONS)) <= set(tncc.DOTS)
    for bad in ("ieee", "tf32x3", "fp64"):
        with pytest.raises(ValueError, match=r"precision: expected one of \('fp32', 'tf32', 'bf16'\)"):
            tncc.dot_of(bad)
