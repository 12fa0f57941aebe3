"""Float64 brute-force definitions of every quantity in docs/metrics.md.

This module is the ground truth that the fast paths of ncfast are tested against. Each function
follows its docs/metrics.md formula as literally as is practical: pair averages are averaged over pairs of
samples, covariances are sums of per-sample outer products, pseudo-inverses and ranks come from an
explicit symmetric eigendecomposition. Everything is computed in float64 with numpy and scipy only,
and nothing is imported from the rest of ncfast, so that the reference stays an independent check.
It is written for clarity, not speed: some functions take O(N^2 D) time or O(N K D) memory, so use it
on small inputs.

Conventions shared by all functions:

- ``features`` is (N, D) and ``labels`` is (N,); numpy arrays or torch tensors of any dtype
  (features are converted to float64, labels to int64; float labels are a TypeError).
  ``num_classes=None`` means ``labels.max() + 1``.
- A class with n_c = 0 is *absent* and is left out of every metric; C is the number of present
  classes. Per-class outputs of length num_classes hold NaN for absent classes.
- ``weighting="balanced"`` (default, Papyan et al.): every class counts equally.
  ``weighting="sample"``: every sample counts equally. Both as defined in docs/metrics.md "Notation".
- Rank rule: eigenvalues of a symmetric matrix that are <= rtol * lambda_max count as zero
  (``DEFAULT_RTOL = 1e-10``). Every pseudo-inverse and rank below uses it.
- Ties in argmin / argmax go to the lowest class index.
"""

from fractions import Fraction

import numpy as np
import scipy.linalg

DEFAULT_RTOL = 1e-10

_WEIGHTINGS = ("balanced", "sample")


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def _np64(x):
    """Float64 numpy copy of a numpy array or torch tensor.

    Torch tensors are detached and moved to the CPU; float16 / bfloat16 go through float32 first
    because numpy has no bfloat16 (the float32 value is exact, so nothing is lost).
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()
        x = x.numpy()
    return np.array(x, dtype=np.float64)


def _labels64(labels):
    """Int64 numpy copy of a 1-D label array or tensor; rejects float and negative labels."""
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must have an integer dtype, got {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size and y.min() < 0:
        raise ValueError("labels must be non-negative")
    return y.astype(np.int64)


def _num_classes(y, num_classes):
    """num_classes, defaulting to labels.max() + 1, checked against the labels."""
    if num_classes is None:
        return int(y.max()) + 1 if y.size else 0
    num_classes = int(num_classes)
    if y.size and y.max() >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}, got {int(y.max())}")
    return num_classes


def _prepare(features, labels, num_classes):
    """Validated (h, y, K): float64 (N, D) features, int64 (N,) labels and the class count K."""
    h = _np64(features)
    y = _labels64(labels)
    if h.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {h.shape}")
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"features has {h.shape[0]} rows but labels has {y.shape[0]} entries")
    if h.shape[0] == 0:
        raise ValueError("features is empty (N = 0)")
    if h.shape[1] == 0:
        raise ValueError("features has D = 0 columns")
    if not np.isfinite(h).all():
        raise ValueError("features contains NaN or Inf")
    return h, y, _num_classes(y, num_classes)


def _check_weighting(weighting):
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")


def _present(y, K):
    """Indices of the classes with at least one sample, ascending."""
    return np.flatnonzero(np.bincount(y, minlength=K) > 0)


def _require_two_classes(present):
    if len(present) < 2:
        raise ValueError(f"this metric needs at least 2 present classes in labels, got {len(present)}")


# ----------------------------------------------------------------------------------------------
# Linear algebra under the rank rule
# ----------------------------------------------------------------------------------------------


def _dense_eigh(a, vectors):
    """Ascending eigenvalues (and eigenvectors) of symmetric a by numpy's eigh; if it does not
    converge, by scipy's MRRR driver (syevr), then by the QR iteration (syev)."""
    try:
        return np.linalg.eigh(a) if vectors else np.linalg.eigvalsh(a)
    except np.linalg.LinAlgError as e:
        failures = [f"numpy: {e}"]
    for driver in ("evr", "ev"):
        try:
            return scipy.linalg.eigh(a, eigvals_only=not vectors, driver=driver)
        except np.linalg.LinAlgError as e:
            failures.append(f"scipy {driver}: {e}")
    raise np.linalg.LinAlgError("no symmetric eigensolver converged: " + "; ".join(failures))


def _sym_eig(a, vectors):
    """Eigenvalues (and eigenvectors) of the symmetric part of a, ascending. A row and column of
    it that are exactly zero (a dead unit: a feature that is constant) make e_j an eigenvector
    with eigenvalue 0, so those are set aside and the rest decomposed: exact, and it spares the
    solver the hundreds of exact zeros on which LAPACK's divide and conquer has failed to
    converge."""
    a = (a + a.T) / 2
    n = a.shape[0]
    live = np.flatnonzero((a != 0).any(axis=0))
    if len(live) == n:
        return _dense_eigh(a, vectors)
    dead = np.setdiff1d(np.arange(n), live)
    if len(live):
        parts = _dense_eigh(a[np.ix_(live, live)], vectors)
    else:
        parts = (np.zeros(0), np.zeros((0, 0))) if vectors else np.zeros(0)
    w_live = parts[0] if vectors else parts
    w = np.concatenate([w_live, np.zeros(len(dead))])
    order = np.argsort(w, kind="stable")
    if not vectors:
        return w[order]
    v = np.zeros((n, n))
    v[np.ix_(live, np.arange(len(live)))] = parts[1]
    v[dead, len(live) + np.arange(len(dead))] = 1.0
    return w[order], v[:, order]


def _sym_eigh(a):
    """Eigendecomposition (w ascending, V) of the symmetric part of a (outer-product sums are
    symmetric only up to rounding, and eigh reads a single triangle); see _sym_eig."""
    return _sym_eig(a, True)


def _sym_eigvalsh(a):
    """Ascending eigenvalues of the symmetric part of a; see _sym_eig."""
    return _sym_eig(a, False)


def _sym_rank(a, rtol):
    """Number of eigenvalues of symmetric a above rtol * lambda_max."""
    w = _sym_eigvalsh(a)
    return int(np.sum(w > rtol * max(w.max(), 0.0)))


def _sym_pinv(a, rtol):
    """Pseudo-inverse of symmetric a: V diag(1/lambda) V^T over the eigenvalues above
    rtol * lambda_max."""
    w, v = _sym_eigh(a)
    keep = w > rtol * max(w.max(), 0.0)
    return (v[:, keep] / w[keep]) @ v[:, keep].T


# ----------------------------------------------------------------------------------------------
# Class statistics
# ----------------------------------------------------------------------------------------------


def class_counts(labels, num_classes=None):
    """n_c = number of samples with label c, for c = 0..num_classes-1 (int64)."""
    y = _labels64(labels)
    K = _num_classes(y, num_classes)
    return np.bincount(y, minlength=K).astype(np.int64)


def class_means(features, labels, num_classes=None):
    """mu_c = (1/n_c) sum_{y_i=c} h_i (docs/metrics.md "Notation"), shape (num_classes, D); NaN rows for absent
    classes."""
    h, y, K = _prepare(features, labels, num_classes)
    means = np.full((K, h.shape[1]), np.nan)
    for c in _present(y, K):
        means[c] = h[y == c].mean(axis=0)
    return means


def class_variances(features, labels, num_classes=None):
    """v_c = (1/n_c) sum_{y_i=c} ||h_i - mu_c||^2 (docs/metrics.md "Notation"; biased, the trace of the class
    covariance), shape (num_classes,); NaN for absent classes."""
    h, y, K = _prepare(features, labels, num_classes)
    variances = np.full(K, np.nan)
    for c in _present(y, K):
        hc = h[y == c]
        variances[c] = ((hc - hc.mean(axis=0)) ** 2).sum(axis=1).mean()
    return variances


def global_mean(features, labels, num_classes=None, weighting="balanced"):
    """mu_G (docs/metrics.md "Notation").

    balanced: mu_G = (1/C) sum_c mu_c over present classes.
    sample:   mu_G = (1/N) sum_i h_i.
    """
    _check_weighting(weighting)
    h, y, K = _prepare(features, labels, num_classes)
    if weighting == "sample":
        return h.mean(axis=0)
    return class_means(h, y, K)[_present(y, K)].mean(axis=0)


def _mt(h, y, K, weighting):
    """(Mt, present): Mt is the C x D matrix with rows mu_c - mu_G over the present classes."""
    present = _present(y, K)
    mt = class_means(h, y, K)[present] - global_mean(h, y, K, weighting)
    return mt, present


def within_class_covariance(features, labels, num_classes=None, weighting="balanced"):
    """Sigma_W (docs/metrics.md "Notation"), summed literally from per-sample outer products.

    balanced: Sigma_W = (1/C) sum_c (1/n_c) sum_{y_i=c} (h_i - mu_c)(h_i - mu_c)^T
              (the mean of the biased class covariances).
    sample:   Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T.
    """
    _check_weighting(weighting)
    h, y, K = _prepare(features, labels, num_classes)
    d = h - class_means(h, y, K)[y]
    if weighting == "sample":
        w = np.full(len(y), 1.0 / len(y))
    else:
        w = 1.0 / (len(_present(y, K)) * class_counts(y, K)[y])
    return np.einsum("i,ij,ik->jk", w, d, d)


def between_class_covariance(features, labels, num_classes=None, weighting="balanced"):
    """Sigma_B (docs/metrics.md "Notation"), summed from per-class outer products.

    balanced: Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T.
    sample:   Sigma_B = sum_c (n_c/N) (mu_c - mu_G)(mu_c - mu_G)^T.
    """
    _check_weighting(weighting)
    h, y, K = _prepare(features, labels, num_classes)
    mt, present = _mt(h, y, K, weighting)
    if weighting == "sample":
        p = class_counts(y, K)[present] / len(y)
    else:
        p = np.full(len(present), 1.0 / len(present))
    return np.einsum("c,cj,ck->jk", p, mt, mt)


def total_covariance(features, labels, num_classes=None, weighting="balanced"):
    """Sigma_T (docs/metrics.md "Notation").

    balanced: Sigma_T = Sigma_W + Sigma_B.
    sample:   Sigma_T = (1/N) sum_i (h_i - mu_G)(h_i - mu_G)^T, summed literally (it equals
              Sigma_W + Sigma_B, which the tests check).
    """
    _check_weighting(weighting)
    h, y, K = _prepare(features, labels, num_classes)
    if weighting == "sample":
        d = h - h.mean(axis=0)
        return np.einsum("ij,ik->jk", d, d) / len(y)
    return within_class_covariance(h, y, K, weighting) + between_class_covariance(h, y, K, weighting)


def class_distance(features, labels, num_classes=None):
    """Class-distance matrix, paper 000 eq. (6) / docs/metrics.md "Class statistics".

    D_ij = (1/(n_i n_j)) sum_{u in i} sum_{v in j} ||h_u - h_v||^2, computed literally as the average
    over all pairs of samples (the fast paths use the identity D_ij = ||mu_i - mu_j||^2 + v_i + v_j,
    which the tests check against this). Shape (num_classes, num_classes); rows and columns of
    absent classes are NaN.
    """
    h, y, K = _prepare(features, labels, num_classes)
    dist = np.full((K, K), np.nan)
    present = _present(y, K)
    for i in present:
        hi = h[y == i]
        for j in present:
            hj = h[y == j]
            dist[i, j] = ((hi[:, None, :] - hj[None, :, :]) ** 2).sum(axis=-1).mean()
    return dist


def cdnv(features, labels, num_classes=None, cdnv_exponent=1.0):
    """Class-distance normalized variance (Galanti et al.; docs/metrics.md "Class statistics").

    CDNV_ij = (v_i + v_j) / (2 ||mu_i - mu_j||^(2p)) with p = cdnv_exponent (default 1), reported as
    the mean over the unordered pairs i < j of present classes.
    """
    h, y, K = _prepare(features, labels, num_classes)
    present = _present(y, K)
    _require_two_classes(present)
    ratio = _cdnv_matrix(h, y, K, cdnv_exponent)
    return float(np.mean([ratio[i, j] for a, i in enumerate(present) for j in present[a + 1 :]]))


def msdr(features, labels, superclass, num_classes=None):
    """Mean squared distance ratio, paper 000 appendix B / docs/metrics.md "Class statistics".

    MSDR = mean_{i != j present, s(i) = s(j)} D_ij / mean_{i present} D_ii, with D the class-distance
    matrix and s = superclass, an array (num_classes,) mapping class -> super-class. The numerator
    averages over ordered pairs (D is symmetric, so this equals the unordered average). NaN if no
    super-class holds two present classes.
    """
    h, y, K = _prepare(features, labels, num_classes)
    s = superclass.detach().cpu().numpy() if hasattr(superclass, "detach") else np.asarray(superclass)
    if s.shape != (K,):
        raise ValueError(f"superclass must have shape ({K},) (one entry per class), got {s.shape}")
    dist = class_distance(h, y, K)
    present = _present(y, K)
    same = [dist[i, j] for i in present for j in present if i != j and s[i] == s[j]]
    if not same:
        return float("nan")
    return float(np.mean(same) / np.mean(np.diag(dist)[present]))


def _cdnv_matrix(h, y, K, cdnv_exponent):
    """(K, K) CDNV ratios (v_i + v_j) / (2 ||mu_i - mu_j||^(2p)), each pair summed literally."""
    p = float(cdnv_exponent)
    if not (np.isfinite(p) and p > 0):
        raise ValueError(f"cdnv_exponent must be a finite number > 0, got {cdnv_exponent!r}")
    means = class_means(h, y, K)
    variances = class_variances(h, y, K)
    ratio = np.full((K, K), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in _present(y, K):
            for j in _present(y, K):
                ratio[i, j] = (variances[i] + variances[j]) / (2 * np.sum((means[i] - means[j]) ** 2) ** p)
    return ratio


def cdnv_per_class(features, labels, num_classes=None, cdnv_exponent=1.0):
    """Per-class CDNV (docs/metrics.md "Per-class vectors"): cdnv_c = mean over present j != c of
    (v_c + v_j) / (2 ||mu_c - mu_j||^(2p)), p = cdnv_exponent. Shape (num_classes,), NaN for absent
    classes; inf where another class has the same mean."""
    h, y, K = _prepare(features, labels, num_classes)
    present = _present(y, K)
    _require_two_classes(present)
    ratio = _cdnv_matrix(h, y, K, cdnv_exponent)
    out = np.full(K, np.nan)
    for c in present:
        out[c] = np.mean([ratio[c, j] for j in present if j != c])
    return out


def uniformity(features, labels, num_classes=None, weighting="balanced"):
    """Hyperspherical uniformity, log kernel (Liu et al. 2023; GNC2 of Wu & Papyan 2024; docs/metrics.md
    "Neural-collapse metrics"): with u_c = Mt_c / ||Mt_c||, the (mean, population variance) over the
    unordered pairs i < j of present classes of log(1 / ||u_i - u_j||), the distance taken literally
    from the difference of the unit vectors. A pair with u_i = u_j gives +inf: the mean is then inf
    and the variance NaN. Equal to rounding counts as equal: ||u_i - u_j||^2 <= 4 (D + 4) eps (the
    unit vectors of two means on one ray differ by rounding alone, and their log would report it)."""
    h, y, K = _prepare(features, labels, num_classes)
    _check_weighting(weighting)
    mt, present = _mt(h, y, K, weighting)
    _require_two_classes(present)
    floor = 4.0 * (h.shape[1] + 4) * 2.0**-53
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = mt / np.linalg.norm(mt, axis=1, keepdims=True)
        sq = np.array(
            [np.sum((unit[a] - unit[b]) ** 2) for a in range(len(present)) for b in range(a + 1, len(present))]
        )
        values = -0.5 * np.log(np.where(sq <= floor, 0.0, sq))
        if np.isinf(values).any():
            return float(values.mean()), float("nan")
        return float(values.mean()), float(values.var())


# ----------------------------------------------------------------------------------------------
# Neural-collapse metrics
# ----------------------------------------------------------------------------------------------


def fuzziness(features, labels, num_classes=None, weighting="balanced", rtol=DEFAULT_RTOL):
    """Separation fuzziness = Tr(Sigma_W Sigma_B^+) (docs/metrics.md "Neural-collapse metrics"; paper 004).

    Sigma_B^+ by the rank rule with rtol.
    """
    h, y, K = _prepare(features, labels, num_classes)
    _require_two_classes(_present(y, K))
    sigma_w = within_class_covariance(h, y, K, weighting)
    sigma_b = between_class_covariance(h, y, K, weighting)
    return float(np.trace(sigma_w @ _sym_pinv(sigma_b, rtol)))


def nc1(features, labels, num_classes=None, weighting="balanced", rtol=DEFAULT_RTOL):
    """NC1 = (1/C) Tr(Sigma_W Sigma_B^+) (Papyan et al.; docs/metrics.md "Neural-collapse metrics")."""
    h, y, K = _prepare(features, labels, num_classes)
    return fuzziness(h, y, K, weighting, rtol) / len(_present(y, K))


def squared_distance(features, labels, num_classes=None, weighting="balanced"):
    """Squared distance (Hui et al.; docs/metrics.md) = Tr(Sigma_W) / Tr(Sigma_B)."""
    h, y, K = _prepare(features, labels, num_classes)
    _require_two_classes(_present(y, K))
    sigma_w = within_class_covariance(h, y, K, weighting)
    sigma_b = between_class_covariance(h, y, K, weighting)
    return float(np.trace(sigma_w) / np.trace(sigma_b))


def nc2_etf(features, labels, num_classes=None, weighting="balanced"):
    """NC2 distance to a simplex ETF, paper 000 eq. (3) / docs/metrics.md.

    nc2_etf = || Mt Mt^T / ||Mt Mt^T||_F - (I - 11^T/C) / sqrt(C-1) ||_F, Mt the C x D matrix of
    centred class means of the present classes.
    """
    h, y, K = _prepare(features, labels, num_classes)
    mt, present = _mt(h, y, K, weighting)
    _require_two_classes(present)
    C = len(present)
    gram = mt @ mt.T
    etf = (np.eye(C) - np.ones((C, C)) / C) / np.sqrt(C - 1)
    return float(np.linalg.norm(gram / np.linalg.norm(gram) - etf))


def equinorm(features, labels, num_classes=None, weighting="balanced"):
    """Equinorm (Papyan et al.; docs/metrics.md) = std_c ||Mt_c|| / mean_c ||Mt_c|| (population std)."""
    h, y, K = _prepare(features, labels, num_classes)
    mt, present = _mt(h, y, K, weighting)
    _require_two_classes(present)
    norms = np.linalg.norm(mt, axis=1)
    return float(norms.std() / norms.mean())


def _offdiag_cosines(h, y, K, weighting):
    """(cos_ij for i != j of present classes, C), cos_ij = cos(Mt_i, Mt_j).

    A centred mean of zero length has no direction, so its cosines (and the metrics built on them)
    are NaN.
    """
    mt, present = _mt(h, y, K, weighting)
    _require_two_classes(present)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = mt / np.linalg.norm(mt, axis=1, keepdims=True)
    C = len(present)
    cos = unit @ unit.T
    return cos[~np.eye(C, dtype=bool)], C


def equiangularity(features, labels, num_classes=None, weighting="balanced"):
    """Equiangularity (Papyan et al.; docs/metrics.md) = std_{i != j} cos(Mt_i, Mt_j) (population std)."""
    h, y, K = _prepare(features, labels, num_classes)
    cos, _ = _offdiag_cosines(h, y, K, weighting)
    return float(cos.std())


def coherence(features, labels, num_classes=None, weighting="balanced"):
    """Coherence, as docs/metrics.md defines it: mean_{i != j} |cos(Mt_i, Mt_j) + 1/(C-1)| (0 for a simplex
    ETF, whose cosines are all -1/(C-1))."""
    h, y, K = _prepare(features, labels, num_classes)
    cos, C = _offdiag_cosines(h, y, K, weighting)
    return float(np.abs(cos + 1.0 / (C - 1)).mean())


def _check_weight(weight, K, d):
    w = _np64(weight)
    if w.shape != (K, d):
        raise ValueError(f"weight must have shape ({K}, {d}), got {w.shape}")
    return w


def nc3(features, labels, weight, num_classes=None, weighting="balanced"):
    """NC3 self-duality (docs/metrics.md; unsquared) = || W/||W||_F - Mt/||Mt||_F ||_F.

    weight is the (num_classes, D) classifier, rows are classes; only the rows of present classes
    enter, matching the rows of Mt.
    """
    h, y, K = _prepare(features, labels, num_classes)
    mt, present = _mt(h, y, K, weighting)
    _require_two_classes(present)
    w = _check_weight(weight, K, h.shape[1])[present]
    return float(np.linalg.norm(w / np.linalg.norm(w) - mt / np.linalg.norm(mt)))


def nc3_etf(features, labels, weight, num_classes=None, weighting="balanced"):
    """Self-duality against the simplex ETF (Kothapalli 2023; docs/metrics.md):
    || P / ||P||_F - (I - 11^T/C) / sqrt(C-1) ||_F with P = W Mt^T over the present classes'
    rows of W. Forms the C x C matrix P literally."""
    h, y, K = _prepare(features, labels, num_classes)
    mt, present = _mt(h, y, K, weighting)
    _require_two_classes(present)
    w = _check_weight(weight, K, h.shape[1])[present]
    C = len(present)
    p = w @ mt.T
    etf = (np.eye(C) - np.ones((C, C)) / C) / np.sqrt(C - 1)
    return float(np.linalg.norm(p / np.linalg.norm(p) - etf))


def duality_per_class(features, labels, weight, num_classes=None, weighting="balanced"):
    """cos(w_c, mu_c - mu_G) for each class (uniform duality, Wu & Papyan 2024; docs/metrics.md), float64
    (num_classes,), NaN for absent classes."""
    h, y, K = _prepare(features, labels, num_classes)
    mt, present = _mt(h, y, K, weighting)
    w = _check_weight(weight, K, h.shape[1])
    out = np.full(K, np.nan)
    for row, c in enumerate(present):
        out[c] = np.dot(w[c], mt[row]) / (np.linalg.norm(w[c]) * np.linalg.norm(mt[row]))
    return out


def duality(features, labels, weight, num_classes=None, weighting="balanced"):
    """(duality_mean, duality_std): mean and population std over the present classes of
    cos(w_c, mu_c - mu_G)."""
    cos = duality_per_class(features, labels, weight, num_classes, weighting)
    cos = cos[~np.isnan(cos)]
    return float(cos.mean()), float(cos.std())


def nc5_ood(features, labels, ood_features, num_classes=None):
    """ID/OOD orthogonality (Ben Ammar et al. 2024, NECO; docs/metrics.md): mean over the present classes of
    |cos(mu_c, mu_G^ood)|, with the uncentred class means mu_c and the mean of the OOD features."""
    h, y, K = _prepare(features, labels, num_classes)
    o = _np64(ood_features)
    if o.ndim != 2 or o.shape[1] != h.shape[1] or o.shape[0] == 0:
        raise ValueError(f"ood_features must be (N_ood >= 1, {h.shape[1]}), got {o.shape}")
    mu_ood = o.mean(axis=0)
    means = class_means(h, y, K)[_present(y, K)]
    cos = [abs(np.dot(m, mu_ood)) / (np.linalg.norm(m) * np.linalg.norm(mu_ood)) for m in means]
    return float(np.mean(cos))


def degenerate(features, labels, num_classes=None, weighting="balanced", rtol=DEFAULT_RTOL):
    """The metrics forced by the sample size (docs/metrics.md "Degenerate values"): ("vci", "rank",
    "effective_rank") when rank(Sigma_T) = N - 1 by the rank rule, else ()."""
    h, y, K = _prepare(features, labels, num_classes)
    return ("vci", "rank", "effective_rank") if rank(h, y, K, weighting, rtol) == h.shape[0] - 1 else ()


def _settle_near_ties(scores, bound, exact_score):
    """argmin of each row of float64 ``scores`` (N, K), exact: where another class's score is
    within bound[i] (N,) of the row's best plus its own bound, the candidates are compared by
    ``exact_score(i, c)`` (Fractions). Ties go to the lowest index."""
    best = np.argmin(scores, axis=1)
    low = scores[np.arange(len(best)), best]
    near = scores <= (low + 2.0 * bound)[:, None]
    for i in np.flatnonzero(near.sum(axis=1) > 1):
        cands = np.flatnonzero(near[i])
        best[i] = min((exact_score(i, c), c) for c in cands)[1]
    return best


def _gamma(d):
    """A relative bound on a float64 sum of d rounded terms (each from <= 3 roundings)."""
    return 1.1 * (d + 3) * 2.0**-53


def ncc_assign(features, means):
    """Nearest class centre: argmin_c ||h_i - mu_c||^2 (docs/metrics.md NC4), exact for the given values:
    summed as ((h - mu)**2).sum in float64, and where two classes come within that sum's rounding
    bound, compared again in rational arithmetic (Fractions). A float64 sum alone cannot settle
    such rows: at midpoints between class means its summation order decided them (exact gaps of
    2e-22 at D = 64). means is (K, D); rows containing NaN (absent classes) never win. Ties go to
    the lowest index. Returns int64 (N,)."""
    h = _np64(features)
    m = _np64(means)
    if h.ndim != 2 or m.ndim != 2 or h.shape[1] != m.shape[1]:
        raise ValueError(f"features (N, D) and means (K, D) must agree in D, got {h.shape} and {m.shape}")
    usable = ~np.isnan(m).any(axis=1)
    if not usable.any():
        raise ValueError("means has no row without NaN")
    dist = ((h[:, None, :] - m[None, :, :]) ** 2).sum(axis=-1)
    dist[:, ~usable] = np.inf
    bound = _gamma(h.shape[1]) * np.where(np.isfinite(dist), dist, 0.0).max(axis=1, initial=0.0)

    def exact(i, c):
        return sum((Fraction(float(a)) - Fraction(float(b))) ** 2 for a, b in zip(h[i], m[c]))

    return _settle_near_ties(dist, bound, exact).astype(np.int64)


def decisions(features, weight, bias=None):
    """Network decision argmax_c (W h_i + b)_c (docs/metrics.md NC4), exact for the given values: float64,
    then Fractions where two logits come within its rounding bound; ties to the lowest index.
    weight (K, D), bias (K,) or None. Returns int64 (N,)."""
    h = _np64(features)
    w = _np64(weight)
    if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"features (N, D) and weight (K, D) must agree in D, got {h.shape} and {w.shape}")
    scores = h @ w.T
    if bias is not None:
        b = _np64(bias)
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {b.shape}")
        scores = scores + b
    b = np.zeros(w.shape[0]) if bias is None else _np64(bias)
    bound = _gamma(h.shape[1] + 1) * (np.abs(h) @ np.abs(w).T + np.abs(b)).max(axis=1, initial=0.0)

    def exact(i, c):
        return -(sum(Fraction(float(a)) * Fraction(float(v)) for a, v in zip(h[i], w[c])) + Fraction(float(b[c])))

    return _settle_near_ties(-scores, bound, exact).astype(np.int64)


def _decisions_of(h, y, weight, bias, logits):
    """The network decision of each row: from weight (and bias), else from the logits."""
    if weight is not None:
        return decisions(h, weight, bias)
    if bias is not None:
        raise ValueError("bias was given without weight")
    if logits is not None:
        z = _np64(logits)
        if z.ndim != 2 or z.shape[0] != len(y):
            raise ValueError(f"logits must have shape ({len(y)}, num_classes), got {z.shape}")
        return np.argmax(z, axis=1)
    raise ValueError("ncc_mismatch needs weight or logits")


def _centres(h, y, K, given):
    """The class means NCC scores against: the given ones (a held-out split scored against the
    train means, docs/metrics.md NC4) or those of (h, y)."""
    if given is None:
        return class_means(h, y, K)
    m = _np64(given)
    if m.shape != (K, h.shape[1]):
        raise ValueError(f"class_means must have shape ({K}, {h.shape[1]}), got {m.shape}")
    return m


def _per_class(values, y, K):
    """Mean of values over each class's samples; NaN for classes without samples."""
    out = np.full(K, np.nan)
    for c in range(K):
        if np.any(y == c):
            out[c] = float(np.mean(values[y == c]))
    return out


def ncc_mismatch_per_class(features, labels, num_classes=None, weight=None, bias=None, logits=None, class_means=None):
    """For each class c, the NCC mismatch over the samples labelled c; NaN where none is."""
    h, y, K = _prepare(features, labels, num_classes)
    nearest = ncc_assign(h, _centres(h, y, K, class_means))
    return _per_class(_decisions_of(h, y, weight, bias, logits) != nearest, y, K)


def ncc_accuracy_per_class(features, labels, num_classes=None, class_means=None):
    """For each class c, the fraction of its samples whose nearest class centre is c; NaN for
    absent classes."""
    h, y, K = _prepare(features, labels, num_classes)
    return _per_class(ncc_assign(h, _centres(h, y, K, class_means)) == y, y, K)


def ncc_mismatch(features, labels, num_classes=None, weight=None, bias=None, logits=None, class_means=None):
    """NCC mismatch, paper 003 def. 5 / docs/metrics.md NC4: the fraction of samples whose network decision
    differs from the nearest class centre among the present classes' means (as class indices).

    The decision is argmax_c (W h_i + b)_c when weight is given (bias optional), otherwise
    argmax_c z_ic of the given logits (N, num_classes). When both weight and logits are given the
    weight is used. Ties go to the lowest class index on both sides. ``class_means`` (K, D): the
    centres for a held-out split (the train split's means; NaN rows never win); default the
    means of these features.
    """
    h, y, K = _prepare(features, labels, num_classes)
    nearest = ncc_assign(h, _centres(h, y, K, class_means))
    return float(np.mean(_decisions_of(h, y, weight, bias, logits) != nearest))


def ncc_accuracy(features, labels, num_classes=None, class_means=None):
    """Fraction of samples whose nearest class centre (present classes only, or the given
    ``class_means`` of the train split for a held-out one) is their label."""
    h, y, K = _prepare(features, labels, num_classes)
    return float(np.mean(ncc_assign(h, _centres(h, y, K, class_means)) == y))


def vci_literal(features, labels, num_classes=None, weighting="balanced", rtol=DEFAULT_RTOL):
    """VCI exactly as paper 004 writes it: 1 - Tr(Sigma_T^+ Sigma_B) / r, r = min(D, C-1),
    Sigma_T^+ by the rank rule.

    Kept to show the cancellation docs/metrics.md describes: with a within-class spread about 1e-4 of the
    class spacing, rounding noise of size eps * ||Sigma_B|| in the null space of Sigma_B is divided
    by the tiny eigenvalues of Sigma_T there, and the result loses every digit or turns negative.
    Use vci for the value.
    """
    h, y, K = _prepare(features, labels, num_classes)
    present = _present(y, K)
    _require_two_classes(present)
    r = min(h.shape[1], len(present) - 1)
    sigma_t = total_covariance(h, y, K, weighting)
    sigma_b = between_class_covariance(h, y, K, weighting)
    return float(1.0 - np.trace(_sym_pinv(sigma_t, rtol) @ sigma_b) / r)


def _vci_on_ranges(h, y, K, weighting, sigma_w, r, rtol, digits=50):
    """1 - Tr(Sigma_T^+ Sigma_B) / r in ``digits``-digit arithmetic (mpmath) on Q^T Sigma Q, where Q
    spans P1 (Sigma_W's eigenvectors kept by the rank rule against its largest eigenvalue) and
    P0 R (the directions of the null space P0 whose Sigma_B energy, eigenvalues of
    P0^T Sigma_B P0, is kept against Sigma_B's largest eigenvalue). Q is orthonormal and
    Q^T Sigma_T Q invertible.

    Sigma_B is formed here from class means taken at ``digits`` digits, not from its float64
    value: float64 rounding of Sigma_B, 1e-16 of its entries, lies partly in the directions where
    Sigma_W is tiny, and the trace divides it by Sigma_W there (the cancellation docs/metrics.md describes). The float64
    Sigma_W is accurate to its own rounding. Slow: meant for the small test sizes of the
    singular case."""
    import mpmath

    def eig(m):
        e, q = mpmath.eigsy(m)
        return [e[k] for k in range(m.rows)], q

    present = _present(y, K)
    counts = class_counts(y, K)
    with mpmath.workdps(digits):
        d = h.shape[1]
        means = []
        for c in present:
            rows = h[y == c]
            means.append([mpmath.fsum(rows[:, j].tolist()) / rows.shape[0] for j in range(d)])
        if weighting == "sample":
            weights = [mpmath.mpf(int(counts[c])) / len(y) for c in present]
        else:
            weights = [mpmath.mpf(1) / len(present)] * len(present)
        centre = [mpmath.fsum(w * m[j] for w, m in zip(weights, means)) for j in range(d)]
        a = mpmath.matrix(len(present), d)
        for i, (w, m) in enumerate(zip(weights, means)):
            for j in range(d):
                a[i, j] = mpmath.sqrt(w) * (m[j] - centre[j])
        sb = a.T * a
        sw = mpmath.matrix(((sigma_w + sigma_w.T) / 2).tolist())
        e_w, p = eig(sw)
        top_w = max(e_w)
        kept = [k for k in range(d) if top_w > 0 and e_w[k] > rtol * top_w]
        null = [k for k in range(d) if k not in kept]
        cols = [p[:, k] for k in kept]
        e_b, _ = eig(sb)
        top_b = max(e_b)
        if null and top_b > 0:
            p0 = mpmath.matrix(d, len(null))
            for j, k in enumerate(null):
                p0[:, j] = p[:, k]
            e0, rot = eig(p0.T * sb * p0)
            cols += [p0 * rot[:, k] for k in range(len(null)) if e0[k] > rtol * top_b]
        if not cols:
            return 1.0  # Sigma_T = 0: nothing is explained, and rB = 0
        q = mpmath.matrix(d, len(cols))
        for j, col in enumerate(cols):
            q[:, j] = col
        inner = mpmath.inverse(q.T * (sw + sb) * q) * (q.T * sb * q)
        return float(1 - mpmath.fsum(inner[k, k] for k in range(len(cols))) / r)


def vci(features, labels, num_classes=None, weighting="balanced", rtol=DEFAULT_RTOL):
    """Variability Collapse Index (paper 004; docs/metrics.md), VCI = 1 - Tr(Sigma_T^+ Sigma_B) / r with
    r = min(D, C-1), evaluated without cancellation. 0 means full collapse.

    Stable form: let kappa_k be the generalized eigenvalues of the pencil (Sigma_B, Sigma_W), i.e.
    Sigma_B x = kappa Sigma_W x. Then mu_k = 1/(1 + kappa_k) are the generalized eigenvalues of
    (Sigma_W, Sigma_T), and since Tr(Sigma_T^{-1} Sigma_B) = sum_k kappa_k/(1 + kappa_k)
    = sum_k (1 - mu_k),

        VCI = ((r - rB) + sum_{k <= rB} mu_k) / r,

    where rB = rank(Sigma_B) by the rank rule and the sum runs over the rB largest kappa (the rB
    smallest mu). The other D - rB kappa are zero up to rounding; leaving them out is what removes
    the cancellation, and each small mu_k = 1/(1 + kappa_k) is computed to full relative accuracy.
    Sigma_T is never formed.

    This needs Sigma_W positive definite (smallest eigenvalue > rtol * largest). Otherwise (e.g. an
    exact ETF with zero within-class spread, or fewer samples than dimensions) the literal formula
    is evaluated in 50-digit arithmetic (mpmath) on range(Sigma_T), taken as range(Sigma_W) plus
    the part of range(Sigma_B) outside it, each by the rank rule against its own matrix's largest
    eigenvalue (_vci_on_ranges). The rule is there to cut rounding noise; applied to Sigma_T
    itself it would also cut genuine within-class directions once they are 1e-10 below the
    between-class scale, as in the collapse regime. Directions where the within-class spread is
    exactly zero but the class means differ then give mu = 0, as they must. (The float64 literal
    formula, vci_literal, lost every digit there: 4.7e-8 or -3.8e-10 where the 80-digit value is
    0 or 3.03e-10.)

    Both are evaluated on the non-constant feature columns only (r keeps the full D): a constant
    column (a dead ReLU unit) is an exact zero row and column of Sigma_W, Sigma_B and Sigma_T, so
    it lies outside every range used above, and with it Sigma_W would never be positive definite.
    """
    h, y, K = _prepare(features, labels, num_classes)
    present = _present(y, K)
    _require_two_classes(present)
    r = min(h.shape[1], len(present) - 1)
    # A constant feature (a dead unit) is an exact zero row and column of Sigma_W, Sigma_B and
    # Sigma_T: outside every range the formula reads. Its column is dropped, r keeps the full D.
    h = h[:, (h != h[0]).any(axis=0)]
    D = h.shape[1]
    if D == 0:
        return 1.0  # Sigma_T = 0: nothing is explained, and rB = 0
    sigma_w = within_class_covariance(h, y, K, weighting)
    sigma_b = between_class_covariance(h, y, K, weighting)
    w_eigs = _sym_eigvalsh(sigma_w)
    if not w_eigs[0] > rtol * w_eigs[-1]:
        return _vci_on_ranges(h, y, K, weighting, sigma_w, r, rtol)
    r_b = _sym_rank(sigma_b, rtol)
    kappa = _generalized_eigvalsh((sigma_b + sigma_b.T) / 2, (sigma_w + sigma_w.T) / 2)
    mu = 1.0 / (1.0 + kappa[D - r_b :])
    return float(((r - r_b) + mu.sum()) / r)


def _generalized_eigvalsh(a, b):
    """Ascending eigenvalues of a x = kappa b x, b positive definite: scipy's drivers (divide and
    conquer, then QR iteration, then bisection), and if none converges the same eigenvalues as
    those of P^T a P with P = V diag(omega)^{-1/2} from b = V diag(omega) V^T."""
    for driver in ("gvd", "gv", "gvx"):
        try:
            return scipy.linalg.eigh(a, b, eigvals_only=True, driver=driver)
        except np.linalg.LinAlgError:
            continue
    omega, v = _sym_eigh(b)
    p = v / np.sqrt(omega)
    return _sym_eigvalsh(p.T @ a @ p)


def cosine_separation(features, labels, num_classes=None):
    """Class separation R^2 of Kornblith et al. (2021) with cosine distance (docs/metrics.md), balanced over
    classes.

    With unit vectors u_i = h_i/||h_i|| (a zero vector stays zero) and the pair average
    dbar_ij = 1 - (1/(n_i n_j)) sum_{u in i} sum_{v in j} u_u . u_v (self-pairs included),
    R^2 = 1 - dbar_within / dbar_total with dbar_within = (1/C) sum_c dbar_cc and
    dbar_total = (1/C^2) sum_{i,j} dbar_ij. Computed here literally from the pairs; with
    S_c = sum_{y_i=c} u_i this is dbar_within = (1/C) sum_c (1 - ||S_c||^2 / n_c^2) (docs/metrics.md),
    dbar_total = 1 - ||(1/C) sum_c S_c/n_c||^2.

    The numerator dbar_total - dbar_within is not taken as a difference: with m_c = S_c / n_c,
    dbar_ij = 1 - m_i . m_j gives dbar_total - dbar_within = (1 / (2 C^2)) sum_{i,j} ||m_i - m_j||^2,
    summed here from the differences of the class-mean unit vectors. Where every feature points
    nearly the same way (a common shift of 1e3 over a spread of 1: 1 - cos ~ 1e-6) and the
    classes barely separate, both dbar are 1e-6 and agree to 1e-6 of that, so the difference
    would keep only 5 digits (measured: 2.6e-5 relative error against 50-digit arithmetic).
    """
    h, y, K = _prepare(features, labels, num_classes)
    present = _present(y, K)
    _require_two_classes(present)
    norms = np.linalg.norm(h, axis=1, keepdims=True)
    u = np.divide(h, norms, out=np.zeros_like(h), where=norms > 0)
    gram = u @ u.T
    dbar = np.array([[1.0 - gram[np.ix_(y == i, y == j)].mean() for j in present] for i in present])
    m = np.stack([u[y == c].mean(axis=0) for c in present])
    between = ((m[:, None, :] - m[None, :, :]) ** 2).sum(axis=2).sum() / (2 * len(present) ** 2)
    total = np.mean(dbar)
    # every unit vector the same (to rounding: the norms of the u_i are 1 only to about D eps, so
    # a dbar_total within 4 (D + 4) eps cannot be told from 0): 0 / 0
    if total <= 4.0 * (h.shape[1] + 4) * 2.0**-53:
        return float("nan")
    return float(between / total)


def rank(features, labels, num_classes=None, weighting="balanced", rtol=DEFAULT_RTOL):
    """Numerical rank of Sigma_T (paper 002; docs/metrics.md): the number of eigenvalues above
    rtol * lambda_max."""
    return _sym_rank(total_covariance(features, labels, num_classes, weighting), rtol)


def effective_rank(features, labels, num_classes=None, weighting="balanced", rtol=DEFAULT_RTOL):
    """Effective rank (paper 002; docs/metrics.md) = exp(H(p)), H(p) = -sum_k p_k log p_k, p_k = s_k / sum s,
    s_k = sqrt(max(lambda_k, 0)) over the eigenvalues lambda_k of Sigma_T; terms with p_k = 0
    contribute 0. If Sigma_T = 0 (all features equal) there is no spectrum to spread and the
    result is 0, matching rank = 0.

    Eigenvalues at or below rtol * lambda_max count as zero, as in ``rank``. The textbook definition sums
    over every eigenvalue, but where Sigma_T is singular (N <= D, or features on a subspace) the exact
    zeros come out of eigvalsh as rounding noise of about 1e-16 lambda_max, whose square roots,
    1e-8 s_max each, moved the value by 1e-6 relative (measured: N = 200, D = 2,048 and
    N = 1,000, D = 4,096, 2.5e-6 and 1.8e-6) and made two correct implementations disagree
    by more than the 1e-6 ncfast promises. The rule restores the exact zeros; eigenvalues that are real but
    below the cut (condition number above 1 / rtol) would each move the value by less than
    sqrt(rtol) = 1e-5 of the largest s_k's share.
    """
    lam = _sym_eigvalsh(total_covariance(features, labels, num_classes, weighting))
    lam = np.where(lam > rtol * lam[-1], lam, 0.0) if lam[-1] > 0 else np.zeros_like(lam)
    s = np.sqrt(np.maximum(lam, 0.0))
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def feature_norm(features):
    """mean_i ||h_i||_2 (docs/metrics.md); each sample is flattened to a vector."""
    h = _np64(features)
    return float(np.linalg.norm(h.reshape(h.shape[0], -1), axis=1).mean())


def logits_norm(logits):
    """mean_i ||z_i||_2 over the logits z (paper 002; docs/metrics.md)."""
    z = _np64(logits)
    return float(np.linalg.norm(z.reshape(z.shape[0], -1), axis=1).mean())


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def svsl_loss(layer_features, labels, *, alpha, num_classes, reduction="mean"):
    """Stochastic Variability-Simplification Loss term, paper 003 def. 10 / docs/metrics.md "Losses".

    Per sample i of the batch with label c and the layers j = 1..L passed (the paper's gamma..k):

        eta_c sum_j ||g_j(x_i) - mu_c^(j)||^2,   eta_c = alpha / (C L n_c),

    C = num_classes, n_c = batch count of class c, mu_c^(j) = batch mean of class c at layer j (each
    layer flattened to (N, D_j)). Summed over the batch (reduction="sum") or summed and divided by N
    (reduction="mean"). Explicit loops over samples and layers, in float64.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes: must be an int >= 1, got {num_classes}")
    if not alpha >= 0:
        raise ValueError(f"alpha: must be >= 0, got {alpha}")
    y = _labels64(labels)
    if y.size == 0:
        raise ValueError("labels is empty (N = 0)")
    if y.max() >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}, got {int(y.max())}")
    layers = [_np64(f) for f in layer_features]
    if not layers:
        raise ValueError("layer_features is empty")
    for j, g in enumerate(layers):
        if g.ndim < 1 or g.shape[0] != len(y):
            raise ValueError(f"layer_features[{j}] has shape {g.shape}, expected first dim {len(y)}")
    layers = [g.reshape(len(y), -1) for g in layers]
    total = 0.0
    for i in range(len(y)):
        members = np.flatnonzero(y == y[i])
        eta = alpha / (num_classes * len(layers) * len(members))
        for g in layers:
            total += eta * np.sum((g[i] - g[members].mean(axis=0)) ** 2)
    return float(total / len(y) if reduction == "mean" else total)


# ----------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------


def nc_metrics(
    features,
    labels,
    *,
    num_classes=None,
    weight=None,
    bias=None,
    logits=None,
    superclass=None,
    ood_features=None,
    class_means=None,
    weighting="balanced",
    rtol=DEFAULT_RTOL,
    cdnv_exponent=1.0,
):
    """All metrics of docs/metrics.md for one feature set, as a dict of Python floats (rank too).

    Always: nc1, fuzziness, squared_distance, nc2_etf, equinorm, equiangularity, coherence, cdnv,
    uniformity_mean, uniformity_var, vci, cosine_separation, rank, effective_rank, ncc_accuracy,
    feature_norm.
    With weight: nc3, nc3_etf, duality_mean, duality_std and ncc_mismatch (decision from
    weight/bias). With logits: logits_norm, and ncc_mismatch from the logits when no weight is
    given. With superclass: msdr. With ood_features: nc5_ood. ``class_means``: the NCC centres
    (the train split's means, for a held-out split).
    """
    h, y, K = _prepare(features, labels, num_classes)
    out = {
        "nc1": nc1(h, y, K, weighting, rtol),
        "fuzziness": fuzziness(h, y, K, weighting, rtol),
        "squared_distance": squared_distance(h, y, K, weighting),
        "nc2_etf": nc2_etf(h, y, K, weighting),
        "equinorm": equinorm(h, y, K, weighting),
        "equiangularity": equiangularity(h, y, K, weighting),
        "coherence": coherence(h, y, K, weighting),
        "cdnv": cdnv(h, y, K, cdnv_exponent),
        "vci": vci(h, y, K, weighting, rtol),
        "cosine_separation": cosine_separation(h, y, K),
        "rank": float(rank(h, y, K, weighting, rtol)),
        "effective_rank": effective_rank(h, y, K, weighting, rtol),
        "ncc_accuracy": ncc_accuracy(h, y, K, class_means),
        "feature_norm": feature_norm(h),
    }
    out["uniformity_mean"], out["uniformity_var"] = uniformity(h, y, K, weighting)
    if weight is not None:
        out["nc3"] = nc3(h, y, weight, K, weighting)
        out["nc3_etf"] = nc3_etf(h, y, weight, K, weighting)
        out["duality_mean"], out["duality_std"] = duality(h, y, weight, K, weighting)
    if weight is not None or logits is not None:
        out["ncc_mismatch"] = ncc_mismatch(h, y, K, weight=weight, bias=bias, logits=logits, class_means=class_means)
    if logits is not None:
        out["logits_norm"] = logits_norm(logits)
    if superclass is not None:
        out["msdr"] = msdr(h, y, superclass, K)
    if ood_features is not None:
        out["nc5_ood"] = nc5_ood(h, y, ood_features, K)
    return out
