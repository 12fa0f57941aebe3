"""Nearest class centre and classifier decisions (ncfast.ncc): the certified sweep of every backend
against the float64 argmin, near-ties settled exactly, and the fast mode's choice of precision."""

import math

import numpy as np
import pytest
import torch

import ncfast
from helpers import DEVICE, make_data
from ncfast import reference as ref


def _exact_argmin(rows, approx, score):
    """argmin over classes of score(row, c), a Fraction, lowest index on ties; only the classes
    whose float64 score ``approx`` (N, K) is within 1e-9 of the row's best can win."""
    out = []
    for i, r in enumerate(rows.tolist()):
        cands = (approx[i] <= approx[i].min() + 1e-9).nonzero().squeeze(1).tolist()
        out.append(min(cands, key=lambda c: (score(r, c), c)))
    return torch.tensor(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ncc_assign_equals_float64_argmin(dtype):
    x, y, c = make_data(n=2000, d=24, c=40, spread=2.0, dtype=dtype, seed=7)
    means = torch.from_numpy(ref.class_means(x, y))
    got = ncfast.ncc_assign(x, means)
    assert torch.equal(got, torch.from_numpy(ref.ncc_assign(x, means)))


def test_ncc_assign_near_ties_and_shift():
    """Rows placed almost exactly between two means must still get the float64 answer."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(6, 10, generator=g, dtype=torch.float64) + 1e3
    mid = (means[0] + means[1]) / 2
    direction = means[1] - means[0]
    eps = torch.tensor([-1e-7, -1e-9, 0.0, 1e-9, 1e-7], dtype=torch.float64)
    rows = (mid + eps.unsqueeze(1) * direction).to(torch.float32)
    got = ncfast.ncc_assign(rows, means)
    assert torch.equal(got, torch.from_numpy(ref.ncc_assign(rows, means)))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_float64_midpoints_are_settled_exactly(mode):
    """float64 rows at midpoints between class means (D = 64, C = 200, one duplicated mean): exact
    gaps of 1e-22, below any float64 evaluation's rounding, where the summation order had decided.
    ncc_assign, classifier_decisions and the reference all give the exact rational argmin."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(276)
    means = torch.randn(200, 64, generator=g, dtype=torch.float64)
    means[1] = means[0]
    i = torch.randint(0, 200, (40,), generator=g)
    x = torch.cat([(means[i] + means[(i + 1) % 200]) / 2, means[:2]])

    def dist(r, c):
        return sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(r, means[c].tolist()))

    want = _exact_argmin(x, torch.cdist(x, means).square(), dist)
    assert torch.equal(ncfast.ncc_assign(x, means, mode=mode), want)
    assert torch.equal(torch.from_numpy(ref.ncc_assign(x, means)), want)
    # the classifier: logits b_c + h . w_c with w = means, b_c = -||mu_c||^2 / 2 rounded, so the
    # midpoint rows tie up to that rounding
    b = -(means.square().sum(1) / 2)

    def neg_logit(r, c):
        return -(sum(Fraction(a) * Fraction(v) for a, v in zip(r, means[c].tolist())) + Fraction(float(b[c])))

    want = _exact_argmin(x, -(x @ means.T + b), neg_logit)
    assert torch.equal(ncfast.classifier_decisions(x, means, b, mode=mode), want)
    assert torch.equal(torch.from_numpy(ref.decisions(x, means, b)), want)


def test_ncc_assign_when_every_mean_is_equal():
    """A network whose features are all equal has equal class means: every row ties every class,
    and gets the lowest one without an exact comparison per class."""
    x = torch.ones(20000, 64)
    means = torch.ones(10, 64, dtype=torch.float64)
    assert torch.equal(ncfast.ncc_assign(x, means), torch.zeros(20000, dtype=torch.int64))
    out = ncfast.nc_metrics(x, torch.arange(20000) % 10)
    assert out["ncc_accuracy"] == pytest.approx(0.1)


def test_ncc_assign_skips_nan_rows_and_ties_go_low():
    means = torch.tensor([[float("nan"), 0.0], [1.0, 0.0], [-1.0, 0.0]])
    x = torch.tensor([[0.0, 0.0], [0.9, 0.0], [-3.0, 1.0]])
    assert ncfast.ncc_assign(x, means).tolist() == [1, 1, 2]


@pytest.mark.parametrize("k", [12, 40, 100])
def test_ncc_assign_exact_ties_inside_a_panel(k):
    """Every class mean appears twice, side by side, so a row's best two scores can be equal and in
    one panel (the sweep folds a panel's many candidates by vector reductions): the tie must be
    seen (second best = best) and the lower class win, here and in rows that sit on a mean."""
    g = torch.Generator().manual_seed(k)
    base = torch.randint(-3, 4, (k // 2, 16), generator=g).to(torch.float64)
    means = base.repeat_interleave(2, dim=0)  # classes 2i and 2i + 1 share a mean
    x = torch.cat([torch.randint(-3, 4, (300, 16), generator=g).to(torch.float32), means[::2].to(torch.float32)])
    got = ncfast.ncc_assign(x, means)
    assert torch.equal(got, torch.from_numpy(ref.ncc_assign(x, means)))
    assert bool((got % 2 == 0).all())  # the lower of each equal pair


@pytest.mark.parametrize("k, groups", [(12, 1), (40, 1), (100, 1), (100, 3), (300, 2)])
@pytest.mark.parametrize("threads", [1, 2])
def test_ncc_sweep_running_top_two_is_exact(k, groups, threads):
    """The sweep's own (best, second best) on scores that float32 holds exactly (small integers):
    with a zero error bound a row is unsure exactly when its two best scores tie, and its best is
    the lowest class at the minimum. Duplicated centres put ties inside one panel, where many
    candidates are folded by vector reductions, and across panels."""
    from ncfast import _C

    g = np.random.default_rng(k + groups)
    d = 8
    means = g.integers(-2, 3, (k, d)).astype(np.float64)
    means[1::3] = means[0::3][: len(means[1::3])]  # class 3i + 1 repeats class 3i
    means[-1] = means[0]  # and the last class the first, panels apart
    x = np.concatenate([g.integers(-2, 3, (500, d)), means[:5]]).astype(np.float32)
    starts = np.linspace(0, k, groups + 1).round().astype(np.int64)
    scores = -2.0 * x.astype(np.float64) @ means.T + (means**2).sum(1)  # exact in float64 and float32
    best, unsure = _C.ncc_sweep(
        x,
        "float32",
        np.zeros(d, np.float32),
        (-2.0 * means).astype(np.float32),
        (means**2).sum(1).astype(np.float32),
        starts,
        0.0,
        [1.0] * groups,
        [1.0] * groups,
        threads,
        "fp32",
    )
    for gi in range(groups):
        part = scores[:, starts[gi] : starts[gi + 1]]
        two = np.sort(part, axis=1)[:, :2]
        assert (best[:, gi] == part.argmin(1)).all()
        if part.shape[1] > 1:
            assert (unsure[:, gi] == (two[:, 0] == two[:, 1])).all()
    assert unsure.any() and not unsure.all()


def test_classifier_decisions_and_ncc_mismatch():
    x, y, c = make_data()
    g = torch.Generator().manual_seed(100)
    w, b = torch.randn(c, x.shape[1], generator=g), torch.randn(c, generator=g)
    dec = ncfast.classifier_decisions(x, w, b)
    assert torch.equal(dec, torch.from_numpy(ref.decisions(x, w, b)))
    means = torch.from_numpy(ref.class_means(x, y))
    got = ncfast.ncc_mismatch(x, means, dec)
    assert got == pytest.approx(ref.ncc_mismatch(x, y, weight=w, bias=b), abs=0)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_certified_sweep_exact_on_both_backends(backend, dtype, mode, monkeypatch):
    """The fused C++ sweep and the torch one both return the float64 argmin, shifted data included."""
    monkeypatch.setenv("NCFAST_BACKEND", backend)
    x, y, c = make_data(n=1500, d=21, c=37, spread=3.0, shift=1e3, dtype=dtype, seed=12)
    means = torch.from_numpy(ref.class_means(x, y))
    mid = ((means[0] + means[1]) / 2).to(dtype)  # a row on the midpoint of two means
    x = torch.cat([x, mid.unsqueeze(0)])
    assert torch.equal(ncfast.ncc_assign(x, means, mode=mode), torch.from_numpy(ref.ncc_assign(x, means)))
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(c, 21, generator=g), torch.randn(c, generator=g)
    assert torch.equal(ncfast.classifier_decisions(x, w, b, mode=mode), torch.from_numpy(ref.decisions(x, w, b)))
    nearest, decisions = ncfast.ncc_and_decisions(x, means, w, b, mode=mode)  # one shared sweep
    assert torch.equal(nearest, torch.from_numpy(ref.ncc_assign(x, means)))
    assert torch.equal(decisions, torch.from_numpy(ref.decisions(x, w, b)))


@pytest.mark.parametrize(
    "n, d, k",
    [
        (1, 1, 2),
        (3, 1, 5),
        (33, 7, 1),
        (65, 3, 9),
        (100, 300, 13),
        (209, 5, 33),
        (97, 16, 70),
        (801, 5, 33),
        (130, 3001, 40),
        (801, 5, 20),
        (1000, 64, 3),
        (801, 64, 128),
        (500, 64, 129),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_ncc_sweep_awkward_sizes(n, d, k, dtype, threads, mode):
    """Sizes off every tile of the C++ sweeps (32-row blocks and 2 x 4 tiles without AVX-512; with
    it 12 x 32 tiles, or 12 x 16 where no argmin has more than 16 classes, in blocks of 384 rows,
    or of 60 at d = 3001; with at most four panels the tiles prefetch the next block, of 192 rows:
    k = 20, 3 and 128 over several blocks, k = 129 just past it), odd d for the bfloat16 pairs, all
    dtypes, 1 and 2 threads, both modes."""
    g = torch.Generator().manual_seed(n + 7 * d + k)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 5).to(dtype)
    means = torch.randn(k, d, generator=g, dtype=torch.float64) + 5
    w, b = torch.randn(k, d, generator=g), torch.randn(k, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        nearest, decisions = ncfast.ncc_and_decisions(x, means, w, b, mode=mode)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(nearest, torch.from_numpy(ref.ncc_assign(x, means)))
    assert torch.equal(decisions, torch.from_numpy(ref.decisions(x, w, b)))


def test_bf16_sweep_is_certified_or_refused():
    """Where the build has AVX512-BF16, the bfloat16 sweep's certain rows are the float64 argmin and
    near-ties are flagged; elsewhere asking for it is an error, never a silent float32 sweep."""
    from ncfast import _C, backends

    g = torch.Generator().manual_seed(11)
    n, d, k = 400, 45, 70
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    x = means[torch.randint(0, k, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:40] = (means[0] + means[1]) / 2 + 1e-4 * torch.randn(40, d, generator=g, dtype=torch.float64)
    x = x.to(torch.float32)
    centres = (-2.0 * means).to(torch.float32)
    offsets = means.square().sum(1).to(torch.float32)
    args = (
        x,
        torch.zeros(d),
        centres,
        offsets,
        [0, k],
        [float(centres.double().norm(dim=1).max())],
        [float(offsets.double().abs().max())],
    )
    cpp = backends.get("cpp")
    if not _C.ncc_has_precision("bf16"):
        with pytest.raises(ValueError, match="precision"):
            cpp.ncc_sweep(*args, "bf16")
        return
    sweep = cpp.ncc_sweep(*args, "bf16")
    best, unsure = sweep.best.numpy(), sweep.unsure.numpy()
    want = ref.ncc_assign(x, means)
    certain = unsure[:, 0] == 0
    assert (best[certain, 0] == want[certain]).all()
    assert unsure[:40, 0].all()  # the midpoint rows cannot be certified at bfloat16 precision
    assert certain.mean() > 0.5  # well-separated rows are


@pytest.mark.parametrize("separation", [5.0, 0.05])
@pytest.mark.parametrize("low_pays", [True, False])
def test_fast_mode_probe_then_rest(separation, low_pays, monkeypatch):
    """The fast mode sweeps its first rows in both precisions, then the rest in bfloat16 (with a
    float32 recheck of its unsure rows) or in float32, as the timing decides (forced both ways here):
    with separated classes (most rows certain in bf16) or close ones, the answers are the float64
    argmin."""
    import ncfast.ncc as ncc_mod
    from ncfast import backends

    monkeypatch.setenv("NCFAST_BACKEND", "cpp")  # the C++ backend's probe (its bf16 where the build has it)
    monkeypatch.setattr(backends.get("cpp"), "probe_rows", lambda: 64)
    decided = []
    monkeypatch.setattr(ncc_mod, "_low_cost", lambda *a: decided.append(a) or (0.0 if low_pays else math.inf))
    g = torch.Generator().manual_seed(21)
    k, d, n = 45, 33, 1500
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * separation
    x = (means[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=torch.float64)).float()
    assert torch.equal(ncfast.ncc_assign(x, means, mode="fast"), torch.from_numpy(ref.ncc_assign(x, means)))
    assert len(decided) == (1 if ncfast._C.ncc_has_precision("bf16") else 0)


def test_fast_mode_low_precision_pays_only_when_faster():
    """A low precision is chosen when its cost (its time plus the float32 recheck of its unsure
    share) is under float32's time."""
    from ncfast.ncc import _low_cost

    assert _low_cost(1.0, 3.0, 0.5) == 2.5 < 3.0  # 1 + 1.5
    assert _low_cost(1.0, 3.0, 0.7) > 3.0  # 1 + 2.1
    assert _low_cost(3.0, 2.9, 0.0) > 2.9  # bf16 no faster than float32


def _scaled_problem(seed=31):
    """Features (float32-exact values, so any float32 copy at a power-of-two scale is exact), their
    float64 class means, labels, a classifier, and rows exactly at or next to the midpoint of the
    first two means."""
    x, y, c = make_data(n=300, d=24, c=5, seed=seed, spread=0.8, dtype=torch.float32)
    x = x.double()
    means = torch.stack([x[y == k].mean(0) for k in range(c)]).float().double()
    mid = ((means[0] + means[1]) / 2).float().double()
    x[:3] = mid
    x[3:6] = (mid + 1e-3 * (means[1] - means[0])).float().double()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, 24, generator=g, dtype=torch.float64).float().double()
    b = torch.randn(c, generator=g, dtype=torch.float64).float().double()
    return x, y, means, w, b


_TRITON = ["triton"] if ncfast.backends.triton_runs_on(torch.zeros(1, device=DEVICE)) else []


@pytest.mark.parametrize("backend", ["cpp", "torch"] + _TRITON)
@pytest.mark.parametrize(
    "dtype, exponents",
    [(torch.float32, (-100, -60, 63, 70, 100, 120)), (torch.float64, (-1000, -300, 63, 100, 300, 1000))],
)
def test_nearest_centre_and_decision_at_any_magnitude(backend, dtype, exponents, monkeypatch):
    """Scaling features and means by s = 2^e is exact and changes no nearest centre; the decision
    argmax (W h + b) does not change either with h -> s h and (W, b) -> (W / s, b) or (W, s b). At
    e = 63 (features near 1e19) the float32 scores of the unscaled problem overflowed and every row
    went to class 0; at 2^-1000 float64 rows vanish in float32. Every finite magnitude gives the
    exact argmin (ties to the lowest index: the midpoint rows go to class 0)."""
    monkeypatch.setenv("NCFAST_BACKEND", backend)
    x, y, means, w, b = _scaled_problem()
    if backend == "triton":  # the tensors on the device of the Triton kernels
        x, y, means, w, b = (t.to(DEVICE) for t in (x, y, means, w, b))
    want = ncfast.ncc_assign(x, means)
    want_dec = ncfast.classifier_decisions(x, w, b)
    assert torch.equal(want, torch.from_numpy(ref.ncc_assign(x, means)))
    assert (want[:3] == 0).all() and (want != 0).any()
    for e in exponents:
        s = 2.0**e
        xs = (x * s).to(dtype)
        assert torch.equal(xs.double(), x * s), e  # the scaled problem is the same problem
        for mode in ("exact", "fast"):
            assert torch.equal(ncfast.ncc_assign(xs, means * s, mode=mode), want), (e, mode)
            for ws, bs in ((w / s, b), (w, b * s)):
                assert torch.equal(ncfast.classifier_decisions(xs, ws, bs, mode=mode), want_dec), (e, mode)
        nearest, dec = ncfast.ncc_and_decisions(xs, means * s, w / s, b)
        assert torch.equal(nearest, want) and torch.equal(dec, want_dec), e


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nc_metrics_ncc_accuracy_does_not_move_with_magnitude(dtype):
    """The issue's case: features around 1e19 reported ncc_accuracy 0.20 for 0.925. Scaled by
    2^63 or 2^-100 (class means, moments and sweep all scale exactly), ncc_accuracy and the NCC
    mismatch are the same numbers."""
    x, y, means, w, b = _scaled_problem(seed=32)
    base = ncfast.nc_metrics(x.to(dtype), y, weight=w, bias=b)
    assert 0.3 < base["ncc_accuracy"] < 1.0
    for e in (63, -100):
        s = 2.0**e
        m = ncfast.nc_metrics((x * s).to(dtype), y, weight=w / s, bias=b)
        assert m["ncc_accuracy"] == base["ncc_accuracy"], e
        assert m["ncc_mismatch"] == base["ncc_mismatch"], e


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("e", [-470, -300, -260, 260, 300, 500])
def test_every_metric_is_scale_free_across_float64s_range(backend, e, monkeypatch):
    """float64 features scaled by 2^e (exact): every metric but feature_norm (times 2^e) is the
    unscaled one, streamed or one-shot. ||G||_F of nc2_etf sums fourth powers of the class means:
    unscaled they left float64's range near 2^±256 (nc2_etf came out 1.0 or inf)."""
    monkeypatch.setenv("NCFAST_BACKEND", backend)
    x, y, means, w, b = _scaled_problem(seed=33)
    sup = torch.arange(5) % 2
    base = ncfast.nc_metrics(x, y, weight=w, bias=b, superclass=sup)
    s = 2.0**e
    got = ncfast.nc_metrics(x * s, y, weight=w / s, bias=b, superclass=sup)
    m = ncfast.ClassMoments(5, x.shape[1], class_counts=torch.bincount(y, minlength=5))
    for i in range(0, len(y), 64):
        m.update(x[i : i + 64] * s, y[i : i + 64])
    streamed = ncfast.metrics_from_moments(m, weight=w, superclass=sup)
    assert set(got) == set(base)
    for key in base:
        want = base[key] * (s if key == "feature_norm" else 1.0)
        assert got[key] == pytest.approx(want, rel=1e-12, abs=1e-15), key
        if key in streamed:
            assert streamed[key] == pytest.approx(want, rel=1e-9, abs=1e-12), key
    # the distances carry the scale twice, a CDNV of exponent p the factor 2^(2e (1 - p))
    d0 = ncfast.class_distance(x, y)
    assert torch.allclose(ncfast.class_distance(x * s, y) / (s * s), d0, rtol=1e-12)
    p = 1.5
    want = ncfast.nc_metrics(x, y, cdnv_exponent=p)["cdnv"] * 2.0 ** (2 * e * (1 - p))
    assert ncfast.nc_metrics(x * s, y, cdnv_exponent=p)["cdnv"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("e, side", [(520, "large"), (1000, "large"), (-500, "small"), (-1060, "small")])
@pytest.mark.parametrize("nan_policy", ["raise", "omit"])
def test_float64_outside_the_statistics_range_is_refused_by_name(backend, e, side, nan_policy, monkeypatch):
    """Finite float64 features whose class statistics leave float64's range are a ValueError that
    says so (before: "contains NaN or Inf" for finite input at 2^520, and silently wrong metrics
    at 2^-500, whose squared deviations are subnormal). float32 input at its own limits fits."""
    monkeypatch.setenv("NCFAST_BACKEND", backend)
    x, y, means, w, b = _scaled_problem(seed=34)
    xs = x * 2.0**e
    assert bool(torch.isfinite(xs).all())
    with pytest.raises(ValueError, match=f"features: finite, but too {side} in magnitude"):
        ncfast.nc_metrics(xs, y, nan_policy=nan_policy)
    m = ncfast.ClassMoments(5, x.shape[1])
    with pytest.raises(ValueError, match=f"too {side} in magnitude"):
        m.update(xs, y, nan_policy=nan_policy)
    assert int(m.counts.sum()) == 0
    for e32 in (
        120,
        -100,
    ):  # float32 near its limits (-100: no element subnormal): float64 statistics hold their squares
        base = ncfast.nc_metrics(x.float(), y)
        got = ncfast.nc_metrics((x * 2.0**e32).float(), y)
        assert got["nc1"] == pytest.approx(base["nc1"], rel=1e-12) and got["nc2_etf"] == pytest.approx(
            base["nc2_etf"], rel=1e-12
        )


def test_batches_in_range_whose_sum_overflows_are_refused_at_the_metrics():
    """Each batch of features near 2^506 fits float64's sums of squares, the merged state does not:
    metrics_from_moments says so (before: eigh's "failed to converge" traceback on the inf scatter)."""
    g = torch.Generator().manual_seed(35)
    y = torch.arange(4000) % 4
    x = 8.0 * torch.randn(4, 8, dtype=torch.float64, generator=g)[y] + torch.randn(
        4000, 8, dtype=torch.float64, generator=g
    )
    s = 2.0**506
    m = ncfast.ClassMoments(4, 8)
    for i in range(0, len(y), 500):
        m.update(x[i : i + 500] * s, y[i : i + 500])  # every batch is accepted
    with pytest.raises(ValueError, match="too large in magnitude for the float64 class statistics"):
        ncfast.metrics_from_moments(m)


@pytest.mark.parametrize("e", [-600, -300, 300, 600])
def test_classifier_and_logits_metrics_are_scale_free(e):
    """nc3, nc3_etf and duality are scale-free in W (||W||_F, ||W Mt^T||_F: squares of its
    entries, which left float64's range from |W| near 2^±500: nc3_etf came out 1.0 or inf), and
    logits_norm carries the logits' scale once (torch's norm squared 2^600 into inf and 2^-600 into 0)."""
    x, y, means, w, b = _scaled_problem(seed=36)
    g = torch.Generator().manual_seed(36)
    z = torch.randn(len(y), 5, generator=g, dtype=torch.float64)
    base = ncfast.nc_metrics(x, y, weight=w, bias=b, logits=z)
    s = 2.0**e
    got = ncfast.nc_metrics(x, y, weight=w * s, bias=b * s, logits=z * s)
    for key in ("nc3", "nc3_etf", "duality_mean", "duality_std", "ncc_mismatch"):
        assert got[key] == pytest.approx(base[key], rel=1e-12, abs=1e-15), key
    assert got["logits_norm"] == pytest.approx(base["logits_norm"] * s, rel=1e-12)


def test_inf_in_the_means_is_refused_nan_marks_an_absent_class():
    """A NaN row of means is an absent class (never wins); an Inf is no class mean: it was taken as
    a row that never wins too, silently."""
    x, y, means, w, b = _scaled_problem(seed=37)
    for bad in (float("inf"), -float("inf")):
        m = means.clone()
        m[2, 3] = bad
        with pytest.raises(ValueError, match="means: contains Inf"):
            ncfast.ncc_assign(x, m)
        with pytest.raises(ValueError, match="class_means: contains Inf"):
            ncfast.nc_metrics(x, y, class_means=m)
    m = means.clone()
    m[2] = float("nan")
    assert not bool((ncfast.ncc_assign(x, m) == 2).any())
