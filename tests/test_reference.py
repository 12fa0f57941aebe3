"""Tests of ncfast.reference against hand-computed cases and identities (svsl_loss: test_losses.py)."""

import math

import numpy as np
import pytest
import torch

from ncfast import reference as ref


def _blobs(rng, counts, dim, spread=1.0, spacing=3.0):
    """Gaussian blobs: class c has counts[c] samples around a random mean (absent if 0)."""
    means = rng.normal(scale=spacing, size=(len(counts), dim))
    labels = np.repeat(np.arange(len(counts)), counts)
    features = means[labels] + rng.normal(scale=spread, size=(len(labels), dim))
    return features, labels


# ----------------------------------------------------------------------------------------------
# Hand-computed 1-D case
#   class 0: {0, 2}     mu = 1,  v = 1
#   class 1: {3, 5, 7}  mu = 5,  v = 8/3
#   class 2: {10}       mu = 10, v = 0
# ----------------------------------------------------------------------------------------------

H1 = np.array([[0.0], [2.0], [3.0], [5.0], [7.0], [10.0]])
Y1 = np.array([0, 0, 1, 1, 1, 2])


def test_hand_class_statistics():
    np.testing.assert_array_equal(ref.class_counts(Y1), [2, 3, 1])
    np.testing.assert_allclose(ref.class_means(H1, Y1), [[1.0], [5.0], [10.0]], rtol=1e-15)
    np.testing.assert_allclose(ref.class_variances(H1, Y1), [1.0, 8 / 3, 0.0], rtol=1e-15)
    # D_ij = ||mu_i - mu_j||^2 + v_i + v_j; D_01 checked from its 6 pairs: (9+25+49+1+9+25)/6.
    expected = np.array(
        [
            [2.0, 118 / 6, 81 + 1.0],
            [118 / 6, 16 / 3, 25 + 8 / 3],
            [82.0, 25 + 8 / 3, 0.0],
        ]
    )
    np.testing.assert_allclose(ref.class_distance(H1, Y1), expected, rtol=1e-14)


def test_hand_cdnv_msdr_cosine():
    # pairs: (0,1): (1 + 8/3)/(2*16), (0,2): 1/(2*81), (1,2): (8/3)/(2*25)
    expected_cdnv = (11 / 96 + 1 / 162 + 4 / 75) / 3
    assert ref.cdnv(H1, Y1) == pytest.approx(expected_cdnv, rel=1e-14)
    # super-classes {0, 1}, {2}: numerator D_01 = 59/3, denominator mean(2, 16/3, 0) = 22/9
    assert ref.msdr(H1, Y1, np.array([0, 0, 1])) == pytest.approx(177 / 22, rel=1e-14)
    assert math.isnan(ref.msdr(H1, Y1, np.array([0, 1, 2])))
    # unit vectors in 1-D are +1, and the zero sample stays 0: S = (1, 3, 1), n = (2, 3, 1)
    # within = (3/4 + 0 + 0)/3 = 1/4, total = 1 - ((1/2 + 1 + 1)/3)^2 = 11/36
    assert ref.cosine_separation(H1, Y1) == pytest.approx(1 - (1 / 4) / (11 / 36), rel=1e-14)


def test_hand_covariance_metrics():
    # balanced: mu_G = 16/3, Sigma_W = (1 + 8/3 + 0)/3 = 11/9,
    # Sigma_B = ((13/3)^2 + (1/3)^2 + (14/3)^2)/3 = 122/9 (a 1x1 matrix of rank 1)
    assert ref.global_mean(H1, Y1)[0] == pytest.approx(16 / 3, rel=1e-15)
    assert ref.within_class_covariance(H1, Y1)[0, 0] == pytest.approx(11 / 9, rel=1e-14)
    assert ref.between_class_covariance(H1, Y1)[0, 0] == pytest.approx(122 / 9, rel=1e-14)
    assert ref.squared_distance(H1, Y1) == pytest.approx(11 / 122, rel=1e-14)
    assert ref.fuzziness(H1, Y1) == pytest.approx(11 / 122, rel=1e-14)
    assert ref.nc1(H1, Y1) == pytest.approx(11 / 366, rel=1e-14)
    # sample: mu_G = 4.5, Sigma_W = 10/6, Sigma_B = (2*3.5^2 + 3*0.5^2 + 5.5^2)/6 = 9.25
    assert ref.within_class_covariance(H1, Y1, weighting="sample")[0, 0] == pytest.approx(5 / 3)
    assert ref.between_class_covariance(H1, Y1, weighting="sample")[0, 0] == pytest.approx(9.25)
    assert ref.squared_distance(H1, Y1, weighting="sample") == pytest.approx((5 / 3) / 9.25, rel=1e-14)
    # r = min(D, C-1) = 1 = rB; kappa = (122/9)/(11/9), vci = 1/(1 + kappa) = 11/133
    assert ref.vci(H1, Y1) == pytest.approx(11 / 133, rel=1e-13)
    assert ref.vci_literal(H1, Y1) == pytest.approx(11 / 133, rel=1e-13)


def test_hand_rank_and_effective_rank():
    h = np.array([[2.0, 0, 0], [-2.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    y = np.zeros(4, dtype=np.int64)
    # Sigma_T = diag(2, 1/2, 0): s = (sqrt 2, sqrt(1/2)), p = (2/3, 1/3)
    assert ref.rank(h, y, weighting="sample") == 2
    expected = math.exp(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert ref.effective_rank(h, y, weighting="sample") == pytest.approx(expected, rel=1e-14)


# ----------------------------------------------------------------------------------------------
# Identities on random data
# ----------------------------------------------------------------------------------------------


def test_class_distance_identity_and_absent_class():
    rng = np.random.default_rng(0)
    h, y = _blobs(rng, [5, 0, 9, 2, 13], dim=4)
    dist = ref.class_distance(h, y, num_classes=6)
    means = ref.class_means(h, y, num_classes=6)
    var = ref.class_variances(h, y, num_classes=6)
    expected = ((means[:, None, :] - means[None, :, :]) ** 2).sum(-1) + var[:, None] + var[None, :]
    absent = [1, 5]
    assert np.isnan(dist[absent, :]).all() and np.isnan(dist[:, absent]).all()
    assert np.isnan(means[absent]).all() and np.isnan(var[absent]).all()
    present = np.ix_([0, 2, 3, 4], [0, 2, 3, 4])
    np.testing.assert_allclose(dist[present], expected[present], rtol=1e-12)
    np.testing.assert_array_equal(ref.class_counts(y, 6), [5, 0, 9, 2, 13, 0])


def test_absent_class_is_left_out():
    rng = np.random.default_rng(1)
    h, y = _blobs(rng, [6, 8, 7], dim=5)
    y_gap = np.where(y == 2, 3, y)  # same data with class 2 absent, class 3 in its place
    weight = rng.normal(size=(3, 5))
    weight_gap = np.vstack([weight[:2], rng.normal(size=(1, 5)), weight[2:], rng.normal(size=(1, 5))])
    # the network decision ranges over all classes, so the bias keeps it off the absent ones
    bias_gap = np.array([0.0, 0.0, -1e9, 0.0, -1e9])
    a = ref.nc_metrics(h, y, weight=weight, bias=np.zeros(3))
    b = ref.nc_metrics(h, y_gap, num_classes=5, weight=weight_gap, bias=bias_gap)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-15), key


def test_cosine_separation_closed_form():
    rng = np.random.default_rng(2)
    h, y = _blobs(rng, [4, 7, 5], dim=3, spacing=1.0)
    h[0] = 0.0  # the zero vector must stay zero
    norms = np.linalg.norm(h, axis=1, keepdims=True)
    u = np.divide(h, norms, out=np.zeros_like(h), where=norms > 0)
    sums = np.stack([u[y == c].sum(0) for c in range(3)])
    n = np.bincount(y)
    within = np.mean(1 - (sums**2).sum(1) / n**2)
    total = 1 - np.sum((sums / n[:, None]).mean(0) ** 2)
    assert ref.cosine_separation(h, y) == pytest.approx(1 - within / total, rel=1e-12)


def test_fuzziness_is_c_times_nc1():
    rng = np.random.default_rng(3)
    h, y = _blobs(rng, [5, 6, 7, 8], dim=6)
    assert ref.fuzziness(h, y) == pytest.approx(4 * ref.nc1(h, y), rel=1e-14)


def test_simplex_etf_with_zero_spread():
    C, D, copies = 4, 6, 4
    rng = np.random.default_rng(4)
    rotation, _ = np.linalg.qr(rng.normal(size=(D, D)))
    etf = np.zeros((C, D))
    etf[:, :C] = 5.0 * (np.eye(C) - np.ones((C, C)) / C)
    shift = rng.normal(size=D)
    means = etf @ rotation.T + shift
    y = np.repeat(np.arange(C), copies)
    h = means[y]
    mt = ref.class_means(h, y) - ref.global_mean(h, y)
    assert ref.nc1(h, y) == pytest.approx(0.0, abs=1e-12)
    assert ref.nc2_etf(h, y) == pytest.approx(0.0, abs=1e-12)
    assert ref.equinorm(h, y) == pytest.approx(0.0, abs=1e-12)
    assert ref.equiangularity(h, y) == pytest.approx(0.0, abs=1e-12)
    assert ref.coherence(h, y) == pytest.approx(0.0, abs=1e-12)
    assert ref.vci(h, y) == pytest.approx(0.0, abs=1e-12)
    assert ref.nc3(h, y, mt) == pytest.approx(0.0, abs=1e-12)
    assert ref.ncc_accuracy(h, y) == 1.0
    assert ref.rank(h, y) == C - 1


def test_non_etf_geometry_is_detected():
    # three means in a bent line: unequal norms and angles, checked against the cosines by hand
    h = np.array([[-1.0, 0], [0.0, 0.5], [1.0, 0]])
    y = np.array([0, 1, 2])
    # balanced mu_G = (0, 1/6): Mt = (-1, -1/6), (0, 1/3), (1, -1/6)
    assert ref.nc2_etf(h, y) > 0.1
    assert ref.equinorm(h, y) > 0.1
    mt = np.array([[-1.0, -1 / 6], [0.0, 1 / 3], [1.0, -1 / 6]])
    unit = mt / np.linalg.norm(mt, axis=1, keepdims=True)
    cos = (unit @ unit.T)[~np.eye(3, dtype=bool)]
    assert ref.equiangularity(h, y) == pytest.approx(cos.std(), rel=1e-13)
    assert ref.coherence(h, y) == pytest.approx(np.abs(cos + 0.5).mean(), rel=1e-13)


# ----------------------------------------------------------------------------------------------
# Weighting
# ----------------------------------------------------------------------------------------------


def test_sample_weighting_total_is_within_plus_between():
    rng = np.random.default_rng(5)
    h, y = _blobs(rng, [3, 11, 6, 20], dim=5)
    kw = dict(weighting="sample")
    total = ref.total_covariance(h, y, **kw)
    split = ref.within_class_covariance(h, y, **kw) + ref.between_class_covariance(h, y, **kw)
    np.testing.assert_allclose(total, split, rtol=0, atol=1e-12 * np.abs(total).max())


def test_weightings_agree_on_balanced_data_and_differ_otherwise():
    rng = np.random.default_rng(6)
    h, y = _blobs(rng, [7, 7, 7], dim=4)
    covariances = (ref.within_class_covariance, ref.between_class_covariance, ref.total_covariance)
    for fn in (ref.global_mean, *covariances):
        np.testing.assert_allclose(fn(h, y, weighting="sample"), fn(h, y), rtol=1e-12, atol=1e-12)
    for fn in (ref.nc1, ref.vci, ref.nc2_etf, ref.squared_distance):
        assert fn(h, y, weighting="sample") == pytest.approx(fn(h, y), rel=1e-12)

    h, y = _blobs(rng, [2, 15, 6], dim=4)
    assert not np.allclose(ref.global_mean(h, y, weighting="sample"), ref.global_mean(h, y))
    assert ref.nc1(h, y, weighting="sample") != pytest.approx(ref.nc1(h, y), rel=1e-3)
    assert ref.vci(h, y, weighting="sample") != pytest.approx(ref.vci(h, y), rel=1e-3)


def test_unknown_weighting_rejected():
    with pytest.raises(ValueError, match="weighting"):
        ref.nc1(H1, Y1, weighting="classes")


# ----------------------------------------------------------------------------------------------
# VCI
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
def test_vci_stable_matches_literal_and_is_invariant(weighting):
    rng = np.random.default_rng(7)
    h, y = _blobs(rng, [12, 9, 15, 10, 11], dim=6)
    value = ref.vci(h, y, weighting=weighting)
    assert 0 < value < 1
    assert ref.vci_literal(h, y, weighting=weighting) == pytest.approx(value, rel=1e-10)
    transform = rng.normal(size=(6, 6)) + 3 * np.eye(6)
    assert ref.vci(h @ transform.T, y, weighting=weighting) == pytest.approx(value, rel=1e-8)


def test_vci_in_the_collapse_regime():
    rng = np.random.default_rng(8)
    C, D, n = 5, 8, 20
    means = rng.normal(size=(C, D))
    y = np.repeat(np.arange(C), n)
    h = means[y] + 1e-4 * rng.normal(size=(C * n, D))
    unshifted = ref.vci(h, y)
    shifted = ref.vci(h + 1e3, y)
    assert unshifted > 0
    assert shifted > 0
    assert shifted == pytest.approx(unshifted, rel=1e-6)
    literal = ref.vci_literal(h + 1e3, y)
    print(f"collapse regime: vci = {shifted:.6e}, vci_literal = {literal:.6e}")
    assert literal < 0 or abs(literal - shifted) > 1e-3 * shifted


# ----------------------------------------------------------------------------------------------
# NCC
# ----------------------------------------------------------------------------------------------

# Class 0 = {(0,0), (2,0)}, mean (1,0); class "1" = {(2.5,1), (3.5,-1)}, mean (3,0).
# (2,0) is equidistant from both means, so the NCC tie must go to class 0.
H_NCC = np.array([[0.0, 0.0], [2.0, 0.0], [2.5, 1.0], [3.5, -1.0]])


def test_ncc_assign_and_decisions_ties_go_low():
    means = np.array([[1.0, 0.0], [np.nan, np.nan], [3.0, 0.0]])
    np.testing.assert_array_equal(ref.ncc_assign(H_NCC, means), [0, 0, 2, 2])
    # scores h . w = (0, 0) for the origin: tie goes to class 0
    np.testing.assert_array_equal(ref.decisions(H_NCC, np.array([[1.0, 0.0], [3.0, 0.0]])), [0, 1, 1, 1])


def test_ncc_mismatch_hand_case():
    y = np.array([0, 0, 1, 1])
    w = np.array([[1.0, 0.0], [3.0, 0.0]])  # the class means, so decisions are dot products
    # decisions 0, 1, 1, 1 vs NCC 0, 0, 1, 1: only (2,0) differs
    assert ref.ncc_mismatch(H_NCC, y, weight=w) == 0.25
    # with b = (5, 0) class 1 wins iff 3x > x + 5; x = 2.5 ties and goes to 0: decisions 0, 0, 0, 1
    assert ref.ncc_mismatch(H_NCC, y, weight=w, bias=np.array([5.0, 0.0])) == 0.25
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert ref.ncc_mismatch(H_NCC, y, logits=logits) == 0.5
    assert ref.ncc_accuracy(H_NCC, y) == 1.0
    # means (1.25, 0.5) and (2.75, -0.5): (2,0) is again equidistant, goes to 0 but is labelled 1
    assert ref.ncc_accuracy(H_NCC, np.array([0, 1, 0, 1])) == 0.75


def test_ncc_mismatch_maps_present_classes_back():
    y = np.array([0, 0, 2, 2])  # class 1 absent
    w = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    # decisions 0 (three-way tie), 2, 2, 2 vs NCC 0, 0, 2, 2
    assert ref.ncc_mismatch(H_NCC, y, weight=w) == 0.25
    assert ref.ncc_accuracy(H_NCC, y) == 1.0


# ----------------------------------------------------------------------------------------------
# Rank, norms, nc_metrics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
def test_rank_of_low_dimensional_features(weighting):
    rng = np.random.default_rng(9)
    y = np.repeat(np.arange(4), [10, 12, 8, 15])
    h = rng.normal(size=(len(y), 3)) @ rng.normal(size=(3, 10)) + rng.normal(size=10)
    assert ref.rank(h, y, weighting=weighting) == 3
    assert ref.effective_rank(h, y, weighting=weighting) < 3


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
def test_effective_rank_unchanged_by_an_isometric_embedding(weighting):
    """Features of 6 dimensions embedded isometrically in 300: Sigma_T's spectrum gains 294 zeros,
    which eigvalsh returns as rounding noise (1e-16 lambda_max). Counted as zeros by the rank
    rule they leave the effective rank as it was; their square roots had moved it by 1e-6."""
    rng = np.random.default_rng(12)
    y = np.repeat(np.arange(3), [30, 25, 40])
    h = rng.normal(size=(len(y), 6)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1]) + rng.normal(size=6)
    q, _ = np.linalg.qr(rng.normal(size=(300, 6)))
    small = ref.effective_rank(h, y, weighting=weighting)
    assert ref.effective_rank(h @ q.T, y, weighting=weighting) == pytest.approx(small, rel=1e-12)
    assert ref.rank(h @ q.T, y, weighting=weighting) == 6


def test_effective_rank_of_isotropic_data():
    rng = np.random.default_rng(10)
    y = np.repeat(np.arange(2), 2000)
    h = rng.normal(size=(len(y), 5))
    assert ref.rank(h, y) == 5
    assert ref.effective_rank(h, y) == pytest.approx(5.0, abs=0.05)


def test_norms():
    h = np.array([[3.0, 4.0], [0.0, 1.0]])
    assert ref.feature_norm(h) == 3.0
    assert ref.logits_norm(torch.tensor([[6.0, 8.0], [0.0, 0.0]])) == 5.0


def test_nc_metrics_keys_and_values():
    rng = np.random.default_rng(11)
    h, y = _blobs(rng, [6, 9, 7], dim=4)
    w = rng.normal(size=(3, 4))
    logits = h @ w.T
    base = {
        "nc1",
        "fuzziness",
        "squared_distance",
        "nc2_etf",
        "equinorm",
        "equiangularity",
        "coherence",
        "cdnv",
        "vci",
        "cosine_separation",
        "rank",
        "effective_rank",
        "ncc_accuracy",
        "feature_norm",
        "uniformity_mean",
        "uniformity_var",
    }
    dual = {"nc3", "nc3_etf", "duality_mean", "duality_std", "ncc_mismatch"}
    assert set(ref.nc_metrics(h, y)) == base
    assert set(ref.nc_metrics(h, y, weight=w)) == base | dual
    assert set(ref.nc_metrics(h, y, logits=logits)) == base | {"ncc_mismatch", "logits_norm"}
    assert set(ref.nc_metrics(h, y, ood_features=h[:3] + 1)) == base | {"nc5_ood"}
    full = ref.nc_metrics(h, y, weight=w, logits=logits, superclass=[0, 0, 1])
    assert set(full) == base | dual | {"logits_norm", "msdr"}
    assert all(type(v) is float for v in full.values())
    assert full["rank"] == 4.0
    assert full["nc1"] == ref.nc1(h, y)
    assert full["vci"] == ref.vci(h, y)
    assert full["msdr"] == ref.msdr(h, y, np.array([0, 0, 1]))
    assert full["ncc_mismatch"] == ref.ncc_mismatch(h, y, weight=w)


def test_torch_and_low_precision_inputs():
    rng = np.random.default_rng(12)
    h, y = _blobs(rng, [5, 6, 7], dim=3)
    h16 = torch.tensor(h, dtype=torch.bfloat16)
    as_float = h16.float().numpy().astype(np.float64)
    assert ref.nc1(h16, torch.tensor(y)) == ref.nc1(as_float, y)
    assert ref.nc1(torch.tensor(h, requires_grad=True), torch.tensor(y)) == ref.nc1(h, y)


def test_bad_input():
    with pytest.raises(TypeError, match="labels"):
        ref.nc1(H1, Y1.astype(float))
    with pytest.raises(ValueError, match="labels"):
        ref.nc1(H1, Y1 - 1)
    with pytest.raises(ValueError, match="num_classes"):
        ref.class_means(H1, Y1, num_classes=2)
    with pytest.raises(ValueError, match="features"):
        ref.nc1(H1[:5], Y1)
    with pytest.raises(ValueError, match="2 present classes"):
        ref.nc1(H1[:2], Y1[:2])
