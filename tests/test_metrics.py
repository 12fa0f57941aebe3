"""The public metric functions against the float64 reference (ncfast.reference)."""

import math

import numpy as np
import pytest
import torch

import ncfast
from helpers import assert_close, make_data
from ncfast import reference as ref

CASES = {
    "random": dict(),
    "imbalanced": dict(imbalanced=True),
    "absent": dict(absent=(2,), c=6),
    "d_lt_c": dict(d=4, c=9, n=900),
    "two_classes": dict(c=2),
    "float16": dict(dtype=torch.float16),
    "bfloat16": dict(dtype=torch.bfloat16),
    "float64": dict(dtype=torch.float64),
}


def _inputs(case, seed=0):
    x, y, c = make_data(seed=seed, **CASES[case])
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(c, x.shape[1], generator=g)
    b = torch.randn(c, generator=g)
    return x, y, c, w, b


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
@pytest.mark.parametrize("case", list(CASES))
def test_nc_metrics_matches_reference(case, weighting):
    x, y, c, w, b = _inputs(case)
    superclass = torch.arange(c) % 2
    got = ncfast.nc_metrics(x, y, num_classes=c, weight=w, bias=b, superclass=superclass, weighting=weighting)
    want = ref.nc_metrics(x, y, num_classes=c, weight=w, bias=b, superclass=superclass, weighting=weighting)
    assert set(got) == set(want)
    for k in want:
        assert_close(got[k], want[k], rtol=1e-6, atol=1e-12, what=k)
    assert got.absent_classes == list(CASES[case].get("absent", ()))
    assert got.ranks["sigma_b"] == min(c - len(got.absent_classes) - 1, x.shape[1])


@pytest.mark.parametrize("case", list(CASES))
def test_class_functions_match_reference(case):
    x, y, c, w, b = _inputs(case)
    m = ncfast.class_moments(x, y, num_classes=c)
    assert_close(m.means.numpy(), ref.class_means(x, y, c), rtol=1e-12, atol=1e-14, what="means")
    assert_close(m.variances.numpy(), ref.class_variances(x, y, c), rtol=1e-10, what="variances")
    assert_close(
        ncfast.class_distance(x, y, num_classes=c).numpy(),
        ref.class_distance(x, y, c),
        rtol=1e-9,
        what="class_distance",
    )
    assert torch.equal(ncfast.ncc_assign(x, m.means), torch.from_numpy(ref.ncc_assign(x, ref.class_means(x, y, c))))
    assert torch.equal(ncfast.classifier_decisions(x, w, b), torch.from_numpy(ref.decisions(x, w, b)))
    cdnv = ncfast.cdnv_matrix(m)
    iu = np.triu_indices(c, 1)
    assert np.nanmean(cdnv.numpy()[iu]) == pytest.approx(ref.cdnv(x, y, c), rel=1e-9)


def test_nc_metrics_non_contiguous_equals_contiguous():
    x, y, c, w, b = _inputs("random")
    wide = torch.zeros(x.shape[0], 2 * x.shape[1])
    wide[:, ::2] = x
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    got = ncfast.nc_metrics(strided, y, weight=w, bias=b)
    want = ref.nc_metrics(x, y, weight=w, bias=b)
    for k in want:
        assert_close(got[k], want[k], rtol=1e-6, atol=1e-12, what=k)
    # a transposed (column-major) view too
    xt = x.T.contiguous().T
    assert not xt.is_contiguous()
    got_t = ncfast.nc_metrics(xt, y, weight=w, bias=b)
    for k in want:
        assert_close(got_t[k], want[k], rtol=1e-6, atol=1e-12, what=k)


def test_logits_route():
    x, y, c, w, b = _inputs("random")
    logits = x @ w.T + b
    got = ncfast.nc_metrics(x, y, logits=logits)
    want = ref.nc_metrics(x, y, logits=logits)
    assert set(got) == set(want) and "logits_norm" in got and "nc3" not in got
    for k in want:
        assert_close(got[k], want[k], rtol=1e-6, atol=1e-12, what=k)


def test_numpy_inputs_accepted():
    x, y, c, w, b = _inputs("random")
    got = ncfast.nc_metrics(x.numpy(), y.numpy(), weight=w.numpy())
    want = ref.nc_metrics(x, y, weight=w)
    for k in want:
        assert_close(got[k], want[k], rtol=1e-6, atol=1e-12, what=k)


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
def test_collapse_regime_float32(weighting):
    """Within-class std 1e-4 of the spacing of the means, every feature shifted by 1e3."""
    x, y, c = make_data(
        n=2000, d=16, c=8, spread=1e-4, shift=1e3, imbalanced=(weighting == "sample"), dtype=torch.float32, seed=3
    )
    superclass = torch.arange(c) % 2
    w = torch.randn(c, 16, generator=torch.Generator().manual_seed(1))
    got = ncfast.nc_metrics(x, y, weight=w, superclass=superclass, weighting=weighting)
    want = ref.nc_metrics(x, y, weight=w, superclass=superclass, weighting=weighting)
    for k in want:
        assert_close(got[k], want[k], rtol=1e-6, what=k)
    assert 0 < got["vci"] < 1e-6 and 0 < got["nc1"] < 1e-6
    assert got["ncc_accuracy"] == 1.0


def test_class_distance_matches_pairwise_reference():
    x, y, c = make_data(n=300, c=6, absent=(4,), imbalanced=True)
    got = ncfast.class_distance(x, y, num_classes=7)
    want = ref.class_distance(x, y, num_classes=7)
    assert got.dtype == torch.float64 and got.shape == (7, 7)
    assert_close(got.numpy(), want, rtol=1e-9, what="class_distance")
    assert torch.isnan(got[4]).all() and torch.isnan(got[:, 6]).all()


def test_class_distance_collapse_regime():
    x, y, c = make_data(n=800, d=8, c=5, spread=1e-4, shift=1e3, seed=5)
    assert_close(ncfast.class_distance(x, y).numpy(), ref.class_distance(x, y), rtol=1e-6, what="D")


def test_etf_with_no_spread_is_fully_collapsed():
    c, d = 5, 8
    etf = torch.eye(c, d, dtype=torch.float64) - torch.cat(
        [torch.full((c, c), 1.0 / c, dtype=torch.float64), torch.zeros(c, d - c)], 1
    )
    y = torch.arange(c).repeat(4)
    x = etf[y] * 3.0
    m = ncfast.nc_metrics(x, y, weight=etf)
    for k in ("nc1", "nc2_etf", "vci", "equinorm", "equiangularity", "coherence", "nc3", "ncc_mismatch"):
        assert abs(m[k]) < 1e-12, (k, m[k])
    assert m["ncc_accuracy"] == 1.0 and m["cdnv"] == 0.0


def test_vci_invariant_to_invertible_linear_map():
    x, y, c = make_data(n=800, d=10, c=6, dtype=torch.float64, seed=11)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(10, 10, generator=g, dtype=torch.float64) + 3 * torch.eye(10, dtype=torch.float64)
    v1 = ncfast.nc_metrics(x, y)["vci"]
    v2 = ncfast.nc_metrics(x @ a.T, y)["vci"]
    assert v2 == pytest.approx(v1, rel=1e-8)
    assert v1 == pytest.approx(ref.vci(x, y), rel=1e-9)


def test_vci_with_singular_within_class_scatter():
    """Features on a subspace Sigma_W does not reach: the Schur-complement branch of the stable form."""
    x, y, c = make_data(n=400, d=6, c=4, dtype=torch.float64, seed=4)
    means = torch.from_numpy(ref.class_means(x, y))
    x = torch.cat([x, 5.0 * means[y, :2]], dim=1)  # two extra dims that only vary between classes
    x[:, 6:] = means[y, :2] * 5.0
    got = ncfast.nc_metrics(x, y)
    assert got.ranks["sigma_w"] == 6
    assert got["vci"] == pytest.approx(ref.vci(x, y), rel=1e-9, abs=1e-15)
    assert got["vci"] == pytest.approx(ref.vci_literal(x, y), rel=1e-7, abs=1e-12)  # no tiny spread here


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
@pytest.mark.parametrize("n", [9, 14])
def test_vci_fewer_samples_than_dimensions_in_the_collapse_regime(n, weighting):
    """N - C < D: Sigma_W is singular and tiny (spread 1e-4, shift 1e3). Where the class means
    differ along directions with no within-class spread, mu = 0 there: VCI = 0 at N = 9 (7 such
    directions for rB = 3), 2.5e-11 and 4.6e-11 at N = 14 (2 of them).
    The float64 literal formula loses every digit here; the reference
    evaluates it at 50 digits on the ranges (reference._vci_on_ranges)."""
    c, g = 4, torch.Generator().manual_seed(n)
    y = (
        torch.arange(n) % c
        if weighting == "balanced"
        else torch.cat([torch.arange(c), torch.zeros(n - c, dtype=torch.int64)])
    )
    means = 3.0 * torch.randn(c, 12, generator=g, dtype=torch.float64)
    x = means[y] + 1e-4 * torch.randn(n, 12, generator=g, dtype=torch.float64) + 1e3
    got = ncfast.nc_metrics(x, y, num_classes=c, weighting=weighting)
    want = ref.vci(x, y, c, weighting)
    assert got.ranks["sigma_w"] == n - c
    assert got["vci"] == pytest.approx(want, rel=1e-8, abs=1e-20)
    literal = ref.vci_literal(x, y, c, weighting)
    assert abs(literal - want) > 1e-3 * abs(want) + 1e-12  # what the float64 literal form gets


@pytest.mark.parametrize("case", ["all_equal", "equal_means", "one_signed_axis", "one_sample_each"])
def test_degenerate_features_give_the_references_values_not_an_error(case):
    """Valid inputs whose metrics are 0 / 0 or x / 0: every feature equal (a network whose units
    are all dead), classes with the same mean, D = 1 with features of one sign (every unit vector
    equal), one sample per class (no within-class spread: MSDR's denominator is 0). nc_metrics
    had raised ZeroDivisionError on each; now NaN and inf as in float64."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(40) % 2
    if case == "one_sample_each":
        x, y = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.arange(4)
    elif case == "all_equal":
        x = torch.ones(40, 5, dtype=torch.float64)
    elif case == "equal_means":
        base = torch.randn(20, 5, generator=g, dtype=torch.float64)
        x, y = torch.cat([base, base]), torch.cat([torch.zeros(20), torch.ones(20)]).long()
    else:
        x = torch.rand(40, 1, generator=g, dtype=torch.float64) + 1.0
    c = int(y.max()) + 1
    w, sup = torch.randn(c, x.shape[1], generator=g), torch.arange(c) % 2
    got = ncfast.nc_metrics(x, y, weight=w, superclass=sup)
    with np.errstate(all="ignore"):
        want = ref.nc_metrics(x, y, weight=w, superclass=sup)
    for k in want:
        if math.isnan(want[k]) or math.isinf(want[k]):
            assert got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])), k
        else:
            assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, what=k)
    if case == "all_equal":
        assert got["rank"] == 0 and got["effective_rank"] == 0 and got["vci"] == 1.0
        assert math.isnan(got["squared_distance"])  # cosine_separation: 0 / (rounding of 1 - ||m||^2)
    if case == "equal_means":
        assert got["squared_distance"] == math.inf and got.ranks["sigma_b"] == 0 and got["vci"] == 1.0
    if case == "one_signed_axis":
        assert math.isnan(got["cosine_separation"])
    if case == "one_sample_each":
        assert got["msdr"] == math.inf and got["cdnv"] == 0.0


def test_effective_rank_unchanged_by_an_isometric_embedding():
    """As in test_reference: 294 exact zeros added to Sigma_T's spectrum leave the effective rank."""
    g = torch.Generator().manual_seed(12)
    y = torch.arange(95) % 3
    h = torch.randn(95, 6, generator=g, dtype=torch.float64) * torch.tensor(
        [3.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64
    )
    q, _ = torch.linalg.qr(torch.randn(300, 6, generator=g, dtype=torch.float64))
    small, big = ncfast.nc_metrics(h, y), ncfast.nc_metrics(h @ q.T, y)
    assert big["effective_rank"] == pytest.approx(small["effective_rank"], rel=1e-12)
    assert big["effective_rank"] == pytest.approx(ref.effective_rank(h @ q.T, y), rel=1e-12)
    assert big["rank"] == 6


def test_cosine_separation_when_every_feature_points_the_same_way():
    """A common shift of 1e3 over a spread of 1 and barely separated classes: both dbar are 1e-6
    and agree to 1e-6 of that. Against the value at 50 digits (mpmath), from its definition."""
    import mpmath

    g = torch.Generator().manual_seed(116)
    y = torch.randint(0, 2, (50,), generator=g)
    x = (
        3 * torch.randn(2, 2, generator=g, dtype=torch.float64)[y]
        + torch.randn(50, 2, generator=g, dtype=torch.float64)
        + 1e3
    )
    with mpmath.workdps(50):
        rows = [[mpmath.mpf(v) for v in r] for r in x.tolist()]
        units = [[v / mpmath.sqrt(mpmath.fsum(w * w for w in r)) for v in r] for r in rows]
        m = [
            [mpmath.fsum(u[j] for u, c in zip(units, y.tolist()) if c == k) / int((y == k).sum()) for j in range(2)]
            for k in range(2)
        ]
        within = mpmath.fsum(1 - mpmath.fsum(v * v for v in mc) for mc in m) / 2
        centre = [mpmath.fsum(mc[j] for mc in m) / 2 for j in range(2)]
        total = 1 - mpmath.fsum(v * v for v in centre)
        want = float(1 - within / total)
    assert 1e-7 < want < 1e-5  # 1.747e-6: 1 - within / total taken directly kept 5 digits (2.6e-5, 3.4e-5)
    assert ncfast.nc_metrics(x, y)["cosine_separation"] == pytest.approx(want, rel=1e-8)
    assert ref.cosine_separation(x, y) == pytest.approx(want, rel=1e-8)


def _whitening_calls(monkeypatch):
    """Records whether metrics._whitened_between certified Sigma_W (True) or declined (False)."""
    from ncfast import metrics as metrics_mod

    seen = []
    inner = metrics_mod._whitened_between
    monkeypatch.setattr(
        metrics_mod, "_whitened_between", lambda *a: (lambda f: seen.append(f is not None) or f)(inner(*a))
    )
    return seen


@pytest.mark.parametrize("case", ["collapse", "ill_conditioned", "singular"])
def test_vci_cholesky_certificate_and_eigh_fallback_agree(case, monkeypatch):
    """VCI by the Cholesky factor (Sigma_W certified full rank) equals VCI by the eigendecomposition
    and the reference; the certificate declines Sigma_W that the rtol rule cuts, or nearly cuts."""
    from ncfast import metrics as metrics_mod

    x, y, c = make_data(
        n=1500,
        d=12,
        c=7,
        spread=1e-4 if case == "collapse" else 1.0,
        shift=1e3 if case == "collapse" else 0.0,
        dtype=torch.float64,
        seed=21,
    )
    if case != "collapse":
        # Sigma_W's spread along the first axis scaled by 2e-5 (eigenvalue ratio 3.2e-10: the rule
        # keeps it, but the certificate's bound, 8.9e9, exceeds 1 / (2 rtol)) or by 0
        means = torch.from_numpy(ref.class_means(x, y))
        x[:, 0] = means[y, 0] + (x[:, 0] - means[y, 0]) * (2e-5 if case == "ill_conditioned" else 0.0)
    seen = _whitening_calls(monkeypatch)
    got = ncfast.nc_metrics(x, y)
    assert seen == [case == "collapse"]
    if case != "singular":
        assert got["vci"] == pytest.approx(ref.vci(x, y), rel=1e-7, abs=1e-13)
        assert got.ranks["sigma_w"] == 12
    else:
        assert got.ranks["sigma_w"] == 11
        assert got["vci"] == pytest.approx(ref.vci(x, y), rel=1e-9, abs=1e-15)
    monkeypatch.setattr(metrics_mod, "_whitened_between", lambda *a: None)
    by_eigh = ncfast.nc_metrics(x, y)
    assert got["vci"] == pytest.approx(by_eigh["vci"], rel=1e-9, abs=1e-15)
    assert got.ranks == by_eigh.ranks


def test_scatter_free_moments_leave_dxd_metrics_nan():
    x, y, c = make_data()
    m = ncfast.class_moments(x, y, scatter=False)
    out = ncfast.metrics_from_moments(m)
    assert all(math.isnan(out[k]) for k in ("nc1", "vci", "rank", "effective_rank", "fuzziness"))
    assert out["cdnv"] == pytest.approx(ref.cdnv(x, y), rel=1e-9)
    assert out["nc2_etf"] == pytest.approx(ref.nc2_etf(x, y), rel=1e-9)


def test_nan_policy_omit_drops_rows():
    x, y, c, w, b = _inputs("random")
    bad = x.clone()
    bad[[3, 10], 0] = float("nan")
    bad[17, 2] = float("inf")
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[[3, 10, 17]] = False
    got = ncfast.nc_metrics(bad, y, weight=w, nan_policy="omit")
    want = ref.nc_metrics(x[keep], y[keep], weight=w)
    assert got.omitted_rows == 3
    for k in want:
        assert_close(got[k], want[k], rtol=1e-6, atol=1e-12, what=k)


@pytest.mark.parametrize("case", ["imbalanced", "absent", "bfloat16"])
def test_torch_backend_end_to_end(case, monkeypatch):
    """The pure-PyTorch path (what CUDA tensors take until the Triton kernels land), on CPU."""
    monkeypatch.setenv("NCFAST_BACKEND", "torch")
    x, y, c, w, b = _inputs(case)
    superclass = torch.arange(c) % 2
    ood = torch.randn(30, x.shape[1], generator=torch.Generator().manual_seed(4)) + 0.5
    train_means = torch.from_numpy(ref.class_means(*_inputs("random", seed=3)[:2], c))
    got = ncfast.nc_metrics(
        x, y, num_classes=c, weight=w, bias=b, superclass=superclass, ood_features=ood, class_means=train_means
    )
    want = ref.nc_metrics(
        x, y, num_classes=c, weight=w, bias=b, superclass=superclass, ood_features=ood, class_means=train_means
    )
    assert set(got) == set(want)
    for k in want:
        assert_close(got[k], want[k], rtol=1e-6, atol=1e-12, what=k)
    assert_close(got.per_class["cdnv"].numpy(), ref.cdnv_per_class(x, y, c), rtol=1e-6, what="per-class cdnv")
    assert_close(
        got.per_class["ncc_mismatch"].numpy(),
        ref.ncc_mismatch_per_class(x, y, c, weight=w, bias=b, class_means=train_means),
        rtol=0,
        what="per-class ncc_mismatch",
    )


# ------------------------------------------------------------------ the peer library's metrics


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
@pytest.mark.parametrize("case", ["random", "imbalanced", "absent", "d_lt_c", "two_classes", "bfloat16"])
def test_duality_and_ood_metrics_match_reference(case, weighting):
    x, y, c, w, b = _inputs(case)
    ood = torch.randn(37, x.shape[1], generator=torch.Generator().manual_seed(5)) + 0.3
    got = ncfast.nc_metrics(x, y, num_classes=c, weight=w, bias=b, ood_features=ood, weighting=weighting)
    assert_close(got["nc3_etf"], ref.nc3_etf(x, y, w, c, weighting), rtol=1e-6, what="nc3_etf")
    mean, std = ref.duality(x, y, w, c, weighting)
    assert_close(got["duality_mean"], mean, rtol=1e-6, what="duality_mean")
    assert_close(got["duality_std"], std, rtol=1e-6, what="duality_std")
    assert_close(got["nc5_ood"], ref.nc5_ood(x, y, ood, c), rtol=1e-6, what="nc5_ood")
    pc = got.per_class
    assert_close(pc["duality"].numpy(), ref.duality_per_class(x, y, w, c, weighting), rtol=1e-6, what="duality_c")
    assert_close(
        pc["count"].numpy(), np.where(ref.class_counts(y, c) > 0, ref.class_counts(y, c), np.nan), rtol=0, what="count"
    )
    assert_close(pc["variance"].numpy(), ref.class_variances(x, y, c), rtol=1e-6, what="variance")
    assert_close(pc["cdnv"].numpy(), ref.cdnv_per_class(x, y, c), rtol=1e-6, what="cdnv_c")
    assert_close(pc["ncc_accuracy"].numpy(), ref.ncc_accuracy_per_class(x, y, c), rtol=1e-12, what="ncc_acc_c")
    assert_close(
        pc["ncc_mismatch"].numpy(),
        ref.ncc_mismatch_per_class(x, y, c, weight=w, bias=b),
        rtol=1e-12,
        what="ncc_mismatch_c",
    )
    for k in ("count", "variance", "cdnv", "ncc_accuracy", "ncc_mismatch", "duality"):
        assert pc[k].dtype == torch.float64 and pc[k].shape == (c,)


def test_nc3_etf_in_row_blocks_equals_one_block(monkeypatch):
    """nc3_etf forms W Mt^T a block of rows at a time past 2^22 entries: with tiny blocks, both ways
    of taking ||P||_F first (D x D products when D < C, a first pass when not) give the reference."""
    for d, c in ((5, 40), (60, 40)):
        x, y, _ = make_data(n=400, d=d, c=c, seed=d)
        w = torch.randn(c, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        want = ref.nc3_etf(x, y, w, c)
        one = ncfast.nc_metrics(x, y, num_classes=c, weight=w)["nc3_etf"]
        monkeypatch.setattr(ncfast.metrics, "_NC3_ETF_BLOCK", 3 * c)  # 3 rows per block, the last ragged
        blocked = ncfast.nc_metrics(x, y, num_classes=c, weight=w)["nc3_etf"]
        monkeypatch.undo()
        assert_close(one, want, rtol=1e-9, what=f"one block d={d}")
        assert_close(blocked, want, rtol=1e-9, what=f"blocks d={d}")


def test_nc3_etf_is_zero_for_a_classifier_dual_to_an_etf():
    """W = Mt (self-dual) on simplex-ETF means with no spread: W Mt^T is a multiple of the ETF Gram."""
    c = 5
    etf = torch.eye(c, dtype=torch.float64) - 1.0 / c
    y = torch.arange(c).repeat(3)
    got = ncfast.nc_metrics(etf[y], y, weight=etf)
    assert got["nc3_etf"] == pytest.approx(0.0, abs=1e-7)
    assert got["duality_mean"] == pytest.approx(1.0, rel=1e-12)
    assert got["duality_std"] == pytest.approx(0.0, abs=1e-7)


def test_ood_from_a_second_moments_or_a_mean():
    """metrics_from_moments takes the OOD data as a ClassMoments (any labels) or as its mean."""
    x, y, c, w, _ = _inputs("imbalanced")
    ood = torch.randn(50, x.shape[1], generator=torch.Generator().manual_seed(9)) - 0.2
    m = ncfast.class_moments(x, y, num_classes=c)
    ood_stats = ncfast.class_moments(ood, torch.arange(50) % 3)
    want = ref.nc5_ood(x, y, ood, c)
    assert_close(ncfast.metrics_from_moments(m, ood=ood_stats)["nc5_ood"], want, rtol=1e-9, what="moments")
    assert_close(ncfast.metrics_from_moments(m, ood=ood.double().mean(0))["nc5_ood"], want, rtol=1e-9, what="mean")
    with pytest.raises(ValueError, match="ood"):
        ncfast.metrics_from_moments(m, ood=torch.zeros(x.shape[1] + 1))
    with pytest.raises(ValueError, match="ood_features"):
        ncfast.nc_metrics(x, y, ood_features=torch.zeros(4, x.shape[1] + 1))


def test_held_out_ncc_uses_the_given_train_means():
    """A test split scored against the train split's class means (paper 003 def. 6) gives the
    reference's value with those centres, and differs from scoring against its own means on data
    built so that the two disagree. A class absent from the train means is never the nearest."""
    g = torch.Generator().manual_seed(3)
    c, d = 4, 6
    centres = torch.randn(c, d, generator=g, dtype=torch.float64) * 2
    y_tr = torch.arange(400) % c
    y_te = torch.arange(160) % c
    x_tr = (centres[y_tr] + torch.randn(400, d, generator=g, dtype=torch.float64)).float()
    # the test split's classes drift towards each other: its own means sit elsewhere
    x_te = (0.4 * centres[y_te] + torch.randn(160, d, generator=g, dtype=torch.float64)).float()
    w = torch.randn(c, d, generator=g)
    train_means = ncfast.class_moments(x_tr, y_tr).means
    got = ncfast.nc_metrics(x_te, y_te, weight=w, class_means=train_means)
    own = ncfast.nc_metrics(x_te, y_te, weight=w)
    want_acc = ref.ncc_accuracy(x_te, y_te, c, class_means=train_means)
    want_mis = ref.ncc_mismatch(x_te, y_te, c, weight=w, class_means=train_means)
    assert got["ncc_accuracy"] == want_acc and got["ncc_mismatch"] == want_mis
    assert_close(
        got.per_class["ncc_accuracy"].numpy(),
        ref.ncc_accuracy_per_class(x_te, y_te, c, train_means),
        rtol=0,
        what="per class",
    )
    assert (got["ncc_accuracy"], got["ncc_mismatch"]) != (own["ncc_accuracy"], own["ncc_mismatch"])
    assert got["nc1"] == own["nc1"]  # the other metrics describe the test features themselves
    # class 1 absent from the train split: its NaN row is no candidate
    keep = y_tr != 1
    partial = ncfast.class_moments(x_tr[keep], y_tr[keep], num_classes=c).means
    nearest = ncfast.ncc_assign(x_te, partial)
    assert not bool((nearest == 1).any())
    got = ncfast.nc_metrics(x_te, y_te, class_means=partial)
    assert got["ncc_accuracy"] == ref.ncc_accuracy(x_te, y_te, c, class_means=partial)
    assert got.per_class["ncc_accuracy"][1] == 0.0
    with pytest.raises(ValueError, match="class_means"):
        ncfast.nc_metrics(x_te, y_te, class_means=train_means[:, :3])
    with pytest.raises(ValueError, match="class_means"):
        ncfast.nc_metrics(x_te, y_te, class_means=torch.full((c, d), float("nan")))


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
def test_degenerate_flag_both_ways(weighting):
    """rank(Sigma_T) = N - 1 (N - 1 <= D samples in general position) flags vci, rank and
    effective_rank, whose values the sample size forced (VCI = 1 - rank(Sigma_B) / r = 0 here);
    with N - 1 > D nothing is flagged. Both as the reference decides."""
    x, y, c = make_data(n=9, d=12, c=3, seed=4)
    got = ncfast.nc_metrics(x, y, weighting=weighting)
    assert got.degenerate == ("vci", "rank", "effective_rank") == ref.degenerate(x, y, c, weighting)
    assert got["rank"] == 8.0
    assert got["vci"] == pytest.approx(0.0, abs=1e-9)
    x, y, c = make_data(n=60, d=12, c=3, seed=4)
    got = ncfast.nc_metrics(x, y, weighting=weighting)
    assert got.degenerate == () == ref.degenerate(x, y, c, weighting)
    # N - 1 <= D but the samples on a 3-dimensional subspace: rank 3 < N - 1, not degenerate
    x3, y3, _ = make_data(n=9, d=3, c=3, seed=2)
    low = x3 @ torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    got = ncfast.nc_metrics(low, y3)
    assert got["rank"] == 3.0 and got.degenerate == ()


@pytest.mark.parametrize("p", [0.5, 2.0])
def test_cdnv_exponent_reaches_nc_metrics(p):
    x, y, c, _, _ = _inputs("absent")
    got = ncfast.nc_metrics(x, y, num_classes=c, cdnv_exponent=p)
    assert_close(got["cdnv"], ref.cdnv(x, y, c, cdnv_exponent=p), rtol=1e-6, what="cdnv")
    assert_close(got.per_class["cdnv"].numpy(), ref.cdnv_per_class(x, y, c, cdnv_exponent=p), rtol=1e-6, what="cdnv_c")
    want = ref.nc_metrics(x, y, num_classes=c, cdnv_exponent=p)
    assert_close(got["uniformity_mean"], want["uniformity_mean"], rtol=1e-6, what="uniformity_mean")
    with pytest.raises(ValueError, match="cdnv_exponent"):
        ncfast.nc_metrics(x, y, num_classes=c, cdnv_exponent=0.0)


@pytest.mark.parametrize("seed", range(6))
def test_cosine_separation_of_collinear_features_is_nan(seed):
    """Every sample a positive multiple of one vector: every unit vector is the same, so both dbar
    are 0 and the ratio 0 / 0. Computed, both are a few eps; without the rounding rule ncfast and
    the reference each reported a different ratio of rounding errors (0.005 against 0.012)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(360, 1, generator=g) * 5 + 0.1) * torch.randn(7, generator=g)
    y = torch.arange(360) % 4
    assert math.isnan(ncfast.nc_metrics(x, y)["cosine_separation"])
    assert math.isnan(ref.cosine_separation(x, y))
