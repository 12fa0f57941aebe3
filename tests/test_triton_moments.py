"""Triton block-moment and centring kernels (ncfast.triton.moments) against float64 references,
the C++ core and the torch backend.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before any kernel module is imported: triton.jit reads it when a kernel is
defined). Sizes stay small, with blocks large next to the data, because the interpreter's cost grows
with programs x loop steps; explicit small blocks exercise the multi-block paths.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import ncfast  # noqa: E402
from helpers import DEVICE, assert_close, make_data  # noqa: E402
from ncfast import backends  # noqa: E402
from ncfast.backends import torch as torch_backend  # noqa: E402
from ncfast.triton import moments as tmoments  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


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
        norms = np.sqrt((rows**2).sum(1))
        unit[k] = (rows / np.where(norms > 0, norms, 1.0)[:, None]).sum(0)
        norm_sums[k] = norms.sum()
    return counts, means, m2, unit, norm_sums


def _check_moments(got, want, rtol, atol=None):
    """got against want; got without unit sums (None, None) is checked on the first three. atol is
    relative to each statistic's largest magnitude (rtol where not given)."""
    atol = rtol if atol is None else atol
    names = ("counts", "means", "m2", "unit_sums", "norm_sums")
    assert np.array_equal(got[0].cpu().numpy(), want[0]), "counts"
    if got[3] is None:
        assert got[4] is None
        got, want = got[:3], want[:3]
    for name, a, b in zip(names[1:], got[1:], want[1:]):
        a = a.cpu().numpy()
        assert a.dtype == np.float64, name
        assert_close(a, b, rtol=rtol, atol=atol * max(np.abs(b).max(), 1e-300), what=name)


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
def test_block_moments_match_float64(dtype, n, d, c, absent, block_rows, block_d, unit_sums, tolerance):
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
    atol, rtol = tolerance(dtype)
    _check_moments(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fanin,unit_sums", [(2, True), (3, True), (2, False)])
def test_block_moments_tree_of_merges(fanin, unit_sums):
    """Small fan-in: 257 rows of one dominant class in 16-row chunks need three or more levels of
    merges (runs of 2 or 3 partials, then the classes); still the float64 statistics, and
    the collapse regime (spread 1e-4 of the means) keeps its M2."""
    g = torch.Generator().manual_seed(17)
    y = torch.zeros(300, dtype=torch.int64)
    y[257:] = torch.randint(1, 4, (43,), generator=g)
    x = 1e3 + 0.1 * torch.randn(300, 33, generator=g, dtype=torch.float64)
    got = tmoments.block_moments(
        x.to(DEVICE), y.to(DEVICE), 4, block_rows=16, block_d=16, fanin=fanin, unit_sums=unit_sums
    )
    _check_moments(got, _moments64(x, y, 4), rtol=1e-9)


def test_block_moments_strided_and_torch_reference():
    x, y, c = make_data(n=210, d=40, c=6, absent=(4,), seed=3)
    wide = torch.randn(210, 80, dtype=torch.float32)
    wide[:, ::2] = x
    strided = wide[:, ::2].to(DEVICE)  # column stride 2
    assert not strided.is_contiguous()
    got = tmoments.block_moments(strided, y.to(DEVICE), c, block_rows=32, block_d=16)
    b = torch_backend.block_moments_of(x, y, c, True)
    want = (b.counts, b.means, b.m2, b.unit_sums, b.norm_sums)
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
    assert backends.for_tensor(xd).name == "triton"
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


def test_subnormal_bfloat16_is_widened_exactly(monkeypatch):
    """bfloat16 features at 2^-126..2^-133 (bfloat16's subnormals): the moments equal float64 ones.
    Triton's interpreter rounds subnormal bfloat16 -> float32 wrongly (1.5 x 2^-128 became 2^-127;
    class means were off by 15% at 2^-126); the kernels widen the int16 bits themselves."""
    g = torch.Generator().manual_seed(8)
    y = torch.arange(40) % 4
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)[y] + 0.3 * torch.randn(
        40, 8, generator=g, dtype=torch.float64
    )
    for e in (-126, -130):
        xb = (x * 2.0**e).to(torch.bfloat16).to(DEVICE)
        assert bool((xb.double().abs() < 2.0**-126).any())  # some values are subnormal
        got = tmoments.block_moments(xb, y.to(DEVICE), 4, unit_sums=True)
        _check_moments(got, _moments64(xb, y, 4), rtol=1e-12)
        centred = tmoments.centre_rows(xb, y.to(DEVICE), got[1])
        assert torch.equal(centred.cpu(), xb.double().cpu() - got[1].cpu()[y])
        want = ncfast.reference.ncc_assign(xb.cpu(), got[1].cpu())
        monkeypatch.setenv("NCFAST_BACKEND", "triton")
        assert torch.equal(ncfast.ncc_assign(xb, got[1]).cpu(), torch.from_numpy(want))
        monkeypatch.delenv("NCFAST_BACKEND")
