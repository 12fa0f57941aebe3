"""Neural-collapse metrics on top of ClassMoments (definitions: docs/metrics.md).

Everything here is float64 linear algebra on the streamed statistics: class means,
per-class variances, the D x D within-class scatter and the unit-vector class sums.
Pseudo-inverses and ranks use symmetric eigendecompositions on the smaller side, with
eigenvalues at or below ``rtol * lambda_max`` counted as zero.
"""
from __future__ import annotations

import math

import torch

from . import _dispatch, _linalg
from ._validation import (
    NAN_POLICIES,
    WEIGHTINGS,
    as_tensor,
    check_bias,
    check_choice,
    check_features,
    check_labels,
    check_same_device,
    finite_rows,
)
from .ncc import ncc_and_decisions, ncc_assign
from .pairwise import class_pair_stats, ieee_ratio
from .stats import ClassMoments

DEFAULT_RTOL = 1e-10
"""Relative eigenvalue threshold for every pseudo-inverse and rank (docs/metrics.md)."""

# Metrics that need the D x D within-class scatter; NaN when ClassMoments was built without it.
SCATTER_METRICS = ("nc1", "fuzziness", "vci", "rank", "effective_rank")

# Metrics that the sample size alone decides once the samples are affinely independent
# (rank(Sigma_T) = N - 1): listed in NCMetrics.degenerate then (docs/metrics.md, "Degenerate values").
DEGENERATE_METRICS = ("vci", "rank", "effective_rank")


class NCMetrics(dict):
    """A dict of metric name -> Python float, with what the numbers rest on.

    Attributes:
        ranks: the ranks actually used: ``sigma_b`` (pseudo-inverse in NC1 and rB in VCI),
            ``sigma_w`` (range kept in VCI) and ``sigma_t`` (the ``rank`` metric); absent when
            the scatter was not kept.
        absent_classes: class indices with no sample, left out of every metric.
        omitted_rows: rows dropped by ``nan_policy="omit"``.
        weighting, rtol: the settings used.
        degenerate: names of the metrics that the sample size forced rather than the geometry
            (``DEGENERATE_METRICS`` when rank(Sigma_T) = N - 1: N samples in general position
            span N - 1 dimensions, so any labels are linearly separable and VCI and rank take
            values fixed by N alone); empty otherwise. The values are still reported.
        per_class: float64 tensors of length num_classes, NaN for absent classes: ``count``,
            ``variance`` (v_c), ``cdnv`` (mean over j != c of the pair CDNV), ``ncc_accuracy``
            (from nc_metrics and LayerProbe, which make the NCC pass) and, with a classifier,
            ``ncc_mismatch`` and ``duality`` (cos(w_c, mu_c - mu_G)).
    """

    def __init__(self, values=(), *, ranks=None, absent_classes=(), omitted_rows=0, weighting=None, rtol=None,
                 degenerate=(), per_class=None):
        # Constructible from a mapping alone: torchmetrics rebuilds compute() outputs that way.
        super().__init__(values)
        self.ranks = ranks or {}
        self.absent_classes = list(absent_classes)
        self.omitted_rows = omitted_rows
        self.weighting = weighting
        self.rtol = rtol
        self.degenerate = tuple(degenerate)
        self.per_class = dict(per_class or {})

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v:.6g}" for k, v in self.items())
        extra = f", degenerate={list(self.degenerate)}" if self.degenerate else ""
        return f"NCMetrics({body}; ranks={self.ranks}, absent_classes={self.absent_classes}{extra})"


def _eigh_kept(sym: torch.Tensor, rtol: float):
    """Eigenpairs of a symmetric PSD matrix with eigenvalue > rtol * lambda_max."""
    lam, vec = _linalg.sym_eigh(sym)
    top = lam.max() if lam.numel() else torch.tensor(0.0, dtype=sym.dtype)
    keep = lam > rtol * top if float(top) > 0 else torch.zeros_like(lam, dtype=torch.bool)
    return lam[keep], vec[:, keep]


def _between_eig(a: torch.Tensor, rtol: float):
    """(s, V) with Sigma_B = A^T A = V diag(s) V^T on its numerical range (V is D x rank).

    Decomposes the C x C Gram A A^T when C <= D, else the D x D matrix.
    """
    c, d = a.shape
    if c <= d:
        s, u = _eigh_kept(a @ a.T, rtol)
        return s, (a.T @ u) / s.sqrt()
    return _eigh_kept(a.T @ a, rtol)


def _whitened_between(sigma_w: torch.Tensor, a: torch.Tensor, rtol: float):
    """A L^{-T} with Sigma_W = L L^T, when a Cholesky factor certifies that the rtol rule keeps every
    eigenvalue of Sigma_W; None otherwise (the caller then decomposes Sigma_W).

    The certificate is lambda_max * (1 / lambda_min) <= ||Sigma_W||_F * Tr(Sigma_W^{-1})
    = ||Sigma_W||_F * ||L^{-1}||_F^2 < 1 / (2 rtol): both factors are upper bounds, so the
    condition number is below 1 / (2 rtol) and no eigenvalue is at or below rtol * lambda_max,
    with a factor 2 to spare for the rounding of L (relative D u cond(Sigma_W) <= 6e-4 there
    at D = 1,024 and the default rtol). The bound is loose by at most D^1.5, so it certifies
    every Sigma_W of condition number below 1 / (2 rtol D^1.5) and, in practice, most of those
    the rank rule keeps whole. A Cholesky factor and one triangular inverse cost about a sixth
    of the symmetric eigendecomposition it replaces (CPU, D = 512: 2 + 2 ms against 19 ms).
    """
    d = sigma_w.shape[0]
    l, info = torch.linalg.cholesky_ex(sigma_w)
    if int(info) != 0:
        return None
    eye = torch.eye(d, dtype=l.dtype, device=l.device)
    l_inv = torch.linalg.solve_triangular(l, eye, upper=False)
    bound = torch.linalg.matrix_norm(sigma_w) * l_inv.square().sum()
    if not float(bound) * rtol < 0.5:  # also rejects NaN and Inf
        return None
    return a @ l_inv.T


def _vci(sigma_w: torch.Tensor, a: torch.Tensor, r_b: int, lam_b_max: float, rtol: float):
    """VCI = ((r - rB) + sum_{k<=rB} mu_k) / r without cancellation (paper 004, docs/metrics.md).

    mu_k = 1 / (1 + kappa_k) are the generalized eigenvalues of (Sigma_W, Sigma_T), with
    kappa_k those of (Sigma_B, Sigma_W). In the eigenbasis P of Sigma_W (eigenvalues
    omega, split into kept P1 and zero P0 by the rtol rule), the directions of range(A P0)
    have Sigma_W = 0 and so mu = 0; the rest are kappa = sigma^2 of
    F = (I - Pi_{A P0}) A P1 diag(omega1)^{-1/2} (the Schur complement of the pencil), a C x d1
    matrix. Sigma_T = Sigma_W + Sigma_B is never formed, so Sigma_B's rounding noise is never
    divided by a tiny Sigma_W. When a Cholesky factor certifies Sigma_W full rank by the rtol
    rule (the usual case), F = A L^{-T} with Sigma_W = L L^T gives the same kappa without the
    eigendecomposition (_whitened_between). Returns (vci, rank of Sigma_W).

    Coordinates j where Sigma_W's row and A's column are exactly zero (dead units: a feature
    that is constant) are first taken out: e_j is in the null space of Sigma_W and of Sigma_B,
    so it adds nothing to either range and an exact zero to Sigma_W's spectrum, which the rtol
    rule never keeps. r keeps the full D.
    """
    c, d = a.shape
    r = min(d, c - 1)
    live = _linalg.live_coordinates(sigma_w, a)
    if live is not None:
        if live.numel() == 0:  # Sigma_T = 0: A = 0 too, so rB = 0 and nothing is explained
            return (r - r_b) / r, 0
        sigma_w, a = sigma_w[live][:, live], a[:, live]
    f = _whitened_between(sigma_w, a, rtol)
    if f is not None:  # Sigma_W certified full rank: P0 is empty and F = A L^{-T}
        kappa = _linalg.svdvals(f).square()
        mu = 1.0 / (1.0 + kappa)
        return ((r - r_b) + float(mu[:r_b].sum())) / r, sigma_w.shape[0]
    omega, p = _linalg.sym_eigh(sigma_w)
    wmax = float(omega.max())
    keep = omega > rtol * wmax if wmax > 0 else torch.zeros_like(omega, dtype=torch.bool)
    f = (a @ p[:, keep]) / omega[keep].sqrt()
    a0 = a @ p[:, ~keep]
    r0 = 0
    if a0.shape[1]:
        u0, s0 = _linalg.svd_left(a0)
        k0 = s0.square() > rtol * lam_b_max
        r0 = int(k0.sum())
        u0 = u0[:, k0]
        f = f - u0 @ (u0.T @ f)
    kappa = _linalg.svdvals(f).square() if f.numel() else f.new_zeros(0)
    mu = torch.cat([f.new_zeros(r0), 1.0 / (1.0 + kappa)])  # ascending: kappa is descending
    return ((r - r_b) + float(mu[:r_b].sum())) / r, int(keep.sum())


def _pair_sq_dist(mt: torch.Tensor) -> torch.Tensor:
    """||mu_i - mu_j||^2 from centred means (centring keeps the expansion well conditioned).

    One C x C matrix, formed by the GEMM itself (sq_j - 2 <mu_i, mu_j>, the row term broadcast into
    addmm) and finished in place: at C = 1,000 the temporaries of the plain expression took as long
    again as the product."""
    sq = torch.linalg.vector_norm(mt, dim=1).square_()
    d2 = torch.addmm(sq.unsqueeze(0), mt, mt.T, alpha=-2.0)
    d2.add_(sq.unsqueeze(1)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2


def _present_pairs(moments: ClassMoments):
    """(||mu_i - mu_j||^2, v) over the present classes."""
    return _pair_sq_dist(moments.centred_means("balanced")), moments.variances[moments.present]


def _embed_present(inner: torch.Tensor, moments: ClassMoments) -> torch.Tensor:
    """A present x present matrix placed in a NaN num_classes x num_classes one."""
    c = moments.num_classes
    if inner.shape[0] == c:
        return inner
    out = torch.full((c, c), float("nan"), dtype=torch.float64, device=inner.device)
    idx = moments.present.nonzero().squeeze(1)
    out[idx.unsqueeze(1), idx.unsqueeze(0)] = inner
    return out


def class_distance_from_moments(moments: ClassMoments) -> torch.Tensor:
    """D_ij = ||mu_i - mu_j||^2 + v_i + v_j (paper 000 eq. 6), float64 (num_classes, num_classes).

    Equals the average of ||h_u - h_v||^2 over all pairs u in class i, v in class j, without
    forming any pair; D_ii = 2 v_i. Rows and columns of absent classes are NaN.
    """
    d2, v = _present_pairs(moments)
    return _embed_present(d2.add_(v.unsqueeze(1)).add_(v.unsqueeze(0)), moments)


def cdnv_matrix(moments: ClassMoments) -> torch.Tensor:
    """CDNV of every class pair, (v_i + v_j) / (2 ||mu_i - mu_j||^2), float64 (num_classes, num_classes).

    The ``cdnv`` metric is the mean of its upper triangle. The diagonal and the rows and columns of
    absent classes are NaN. Meant for small C (it holds the C x C matrix).
    """
    d2, v = _present_pairs(moments)
    inner = (v.unsqueeze(1) + v.unsqueeze(0)) / (2.0 * d2)
    inner.fill_diagonal_(float("nan"))
    return _embed_present(inner, moments)


_NC3_ETF_BLOCK = 1 << 22
"""Entries of W Mt^T held at once by nc3_etf (a 32 MB float64 block of rows)."""


def _nc3_etf(w: torch.Tensor, mt: torch.Tensor) -> float:
    """|| P / ||P||_F - E ||_F with P = W Mt^T and E = (I - 11^T/C) / sqrt(C-1) (Kothapalli 2023).

    P is formed a block of rows at a time (no C x C matrix beyond 2^22 entries) and the residual
    summed entry by entry, not expanded as 2 - 2 <P, E> / ||P||_F, which loses every digit near an
    exact ETF. ||P||_F comes first: from the one block when it holds P whole, else from
    ||P||_F^2 = <W^T W, Mt^T Mt> (D x D products) when D < C, else from a first pass of blocks.
    """
    c, d = mt.shape
    rows = max(1, _NC3_ETF_BLOCK // c)
    blocks = [slice(i, min(c, i + rows)) for i in range(0, c, rows)]
    if len(blocks) == 1:
        p = w @ mt.T
        norm = float(torch.linalg.norm(p))
        parts = [(blocks[0], p)]
    else:
        parts = None
        if d < c:
            norm = math.sqrt(max(float(((w.T @ w) * (mt.T @ mt)).sum()), 0.0))
        else:
            norm = math.sqrt(sum(float((w[b] @ mt.T).square().sum()) for b in blocks))
    inv_sqrt = 1.0 / math.sqrt(c - 1)
    off = -inv_sqrt / c
    resid = 0.0
    for b, p in parts or ((b, w[b] @ mt.T) for b in blocks):
        r = p / norm - off
        idx = torch.arange(b.stop - b.start, device=r.device)
        r[idx, idx + b.start] -= inv_sqrt
        resid += float(r.square().sum())
    return math.sqrt(resid)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cos(a_c, b_c); NaN where a row is zero (no direction)."""
    return (a * b).sum(1) / (torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1))


def _ood_mean(ood, dim: int, device) -> torch.Tensor:
    """mu_G^ood as float64 (D,): the mean of every sample of a ClassMoments, or a given mean vector."""
    if isinstance(ood, ClassMoments):
        if ood.dim != dim:
            raise ValueError(f"ood: has dim {ood.dim}, the in-distribution features have {dim}")
        if ood.device != device:
            raise ValueError(f"ood: on device {ood.device}, but the moments are on {device}")
        return ood.global_mean("sample")
    m = as_tensor(ood, "ood")
    if not m.dtype.is_floating_point:
        raise TypeError(f"ood: expected a ClassMoments or a floating mean vector, got dtype {m.dtype}")
    if m.shape != (dim,):
        raise ValueError(f"ood: expected a ClassMoments or a mean of shape ({dim},), got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"ood: on device {m.device}, but the moments are on {device}")
    return m.to(torch.float64)


def _on_classes(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """A vector over the present classes placed in a NaN vector over all num_classes."""
    out = torch.full(present.shape, float("nan"), dtype=torch.float64, device=present.device)
    out[present] = values.to(torch.float64)
    return out


def class_fractions(hits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """hits_c / n_c for each class as float64, NaN where the class has no sample: the per-class
    rates of ``NCMetrics.per_class`` from integer counts of the samples of each class that hit."""
    counts = counts.to(torch.float64)
    return torch.where(counts > 0, hits.to(torch.float64) / counts.clamp_min(1), torch.full_like(counts, float("nan")))


def _check_superclass(superclass, num_classes: int, device) -> torch.Tensor:
    s = as_tensor(superclass, "superclass")
    if s.dtype.is_floating_point:
        raise TypeError(f"superclass: expected an integer dtype, got {s.dtype}")
    if s.shape != (num_classes,):
        raise ValueError(f"superclass: expected shape ({num_classes},) mapping class -> super-class, got {tuple(s.shape)}")
    return s.to(device=device, dtype=torch.int64)


def _check_per_class(value, name: str, num_classes: int, dim: int, device) -> torch.Tensor:
    """A floating (num_classes, dim) matrix on ``device``, one row per class (a classifier's
    weight, class means); errors name the argument."""
    m = as_tensor(value, name)
    if not m.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {m.dtype}")
    if m.shape != (num_classes, dim):
        raise ValueError(f"{name}: expected shape ({num_classes}, {dim}) (classes x features), got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"{name}: on device {m.device}, but the features are on {device}")
    return m


def metrics_from_moments(moments: ClassMoments, *, weight=None, superclass=None, ood=None,
                         weighting: str = "balanced", rtol: float = DEFAULT_RTOL, cdnv_exponent: float = 1.0,
                         tile: int | None = None) -> NCMetrics:
    """Every metric that the streamed statistics determine (docs/metrics.md), as an NCMetrics.

    Keys: nc1, fuzziness, squared_distance, nc2_etf, equinorm, equiangularity, coherence, cdnv,
    uniformity_mean, uniformity_var, vci, cosine_separation, rank, effective_rank, feature_norm;
    nc3, nc3_etf, duality_mean, duality_std with ``weight``; msdr with ``superclass``; nc5_ood
    with ``ood`` (the out-of-distribution features' ClassMoments, any labels, or their (D,) mean).
    ``NCMetrics.per_class`` holds count, variance, cdnv (and duality with ``weight``);
    ``NCMetrics.degenerate`` the metrics forced by the sample size. The NCC metrics need the final
    class means and a second pass over the features: ``ncc_assign`` / ``ncc_mismatch``
    (``nc_metrics`` does both passes for you). Definitions: docs/metrics.md.
    The pairwise metrics stream over tiles of ``tile`` classes (``class_pair_stats``; by default
    1,008, or 16,384 on the Triton path), so no C x C matrix is held: memory is O(C * D + tile^2).

    Formulas (C present classes, w_c the class weights of ``weighting``, Mt rows mu_c - mu_G):
        nc1 = Tr(Sigma_W Sigma_B^+) / C,  fuzziness = C * nc1
        squared_distance = Tr(Sigma_W) / Tr(Sigma_B)
        nc2_etf = || Mt Mt^T / ||Mt Mt^T||_F - (I - 11^T/C) / sqrt(C-1) ||_F
        equinorm = std ||Mt_c|| / mean ||Mt_c||; equiangularity = std_{i!=j} cos_ij;
        coherence = mean_{i!=j} |cos_ij + 1/(C-1)|
        cdnv = mean_{i<j} (v_i + v_j) / (2 ||mu_i - mu_j||^(2p)),  p = cdnv_exponent (default 1)
        uniformity_mean / _var = mean / variance_{i<j} log(1 / ||u_i - u_j||),  u_c = Mt_c / ||Mt_c||
        nc3 = || W/||W||_F - Mt/||Mt||_F ||_F
        nc3_etf = || W Mt^T / ||W Mt^T||_F - (I - 11^T/C) / sqrt(C-1) ||_F
        duality_mean / _std = mean / std_c cos(w_c, Mt_c)
        nc5_ood = mean_c |cos(mu_c, mu_G^ood)|   (uncentred class means)
        vci = 1 - Tr(Sigma_T^+ Sigma_B) / min(D, C-1)   (stable form, see _vci)
        cosine_separation = 1 - dbar_within / dbar_total   (Kornblith et al. 2021)
            = (1/C) sum_c ||m_c - mean m||^2 / (1 - ||mean m||^2), m_c = S_c / n_c
        rank, effective_rank: numerical rank and exp(entropy) of sqrt-eigenvalues of Sigma_T
            (over the eigenvalues above rtol * lambda_max; 0 when Sigma_T = 0)
        msdr = mean_{i!=j, s(i)=s(j)} D_ij / mean_i D_ii
    """
    check_choice(weighting, WEIGHTINGS, "weighting")
    if not isinstance(moments, ClassMoments):
        raise TypeError(f"moments: expected a ClassMoments, got {type(moments).__name__}")
    p = moments.present
    c = int(p.sum())
    if c < 2:
        raise ValueError(f"labels: these metrics need at least 2 present classes, got {c}")
    if not rtol >= 0:
        raise ValueError(f"rtol: must be >= 0, got {rtol}")
    d = moments.dim
    out: dict[str, float] = {}
    ranks: dict[str, int] = {}

    mt = moments.centred_means(weighting)
    a = moments.between_factor(weighting)

    tr_w = moments.within_trace(weighting)
    out["squared_distance"] = ieee_ratio(tr_w, float(a.square().sum()))

    s_b, v_b = _between_eig(a, rtol)
    ranks["sigma_b"] = int(s_b.numel())
    if moments.has_scatter:
        sigma_w = moments.sigma_w(weighting)
        fuzz = float((((sigma_w @ v_b) * v_b).sum(0) / s_b).sum())
        out["nc1"] = fuzz / c
        out["fuzziness"] = fuzz
        lam_b_max = float(s_b.max()) if s_b.numel() else 0.0  # Sigma_B = 0: equal class means
        out["vci"], ranks["sigma_w"] = _vci(sigma_w, a, ranks["sigma_b"], lam_b_max, rtol)
        lam_t = _linalg.sym_eigvalsh(sigma_w + a.T @ a)
        top_t = float(lam_t.max())
        kept_t = lam_t[lam_t > rtol * top_t] if top_t > 0 else lam_t[:0]
        ranks["sigma_t"] = int(kept_t.numel())
        out["rank"] = float(ranks["sigma_t"])
        # over the kept eigenvalues only: the rank rule's zeros are exact zeros, not the rounding
        # noise whose square roots moved the value by 1e-6 (reference.effective_rank)
        if kept_t.numel():
            sv = kept_t.sqrt()
            prob = sv / sv.sum()
            out["effective_rank"] = math.exp(float(-(prob * prob.log()).sum()))
        else:  # Sigma_T = 0: every feature equal
            out["effective_rank"] = 0.0
    else:
        for k in SCATTER_METRICS:
            out[k] = float("nan")

    norms = mt.norm(dim=1)
    out["equinorm"] = float(norms.std(correction=0) / norms.mean())
    sup = None if superclass is None else _check_superclass(superclass, moments.num_classes, moments.device)
    pairs = class_pair_stats(moments, weighting=weighting, superclass=sup, tile=tile, cdnv_exponent=cdnv_exponent)
    out["nc2_etf"] = pairs.nc2_etf
    out["equiangularity"] = pairs.equiangularity
    out["coherence"] = pairs.coherence
    out["cdnv"] = pairs.cdnv
    out["uniformity_mean"] = pairs.uniformity_mean
    out["uniformity_var"] = pairs.uniformity_var
    per_class = {
        "count": _on_classes(moments.count[p], p),
        "variance": moments.variances,
        "cdnv": pairs.cdnv_per_class,
    }

    if weight is not None:
        w = _check_per_class(weight, "weight", moments.num_classes, d, moments.device)[p].to(torch.float64)
        out["nc3"] = float(torch.linalg.norm(w / torch.linalg.norm(w) - mt / torch.linalg.norm(mt)))
        out["nc3_etf"] = _nc3_etf(w, mt)
        duality = _cosines(w, mt)
        out["duality_mean"] = float(duality.mean())
        out["duality_std"] = float(duality.std(correction=0))
        per_class["duality"] = _on_classes(duality, p)
    if sup is not None:
        out["msdr"] = pairs.msdr
    if ood is not None:
        mu_ood = _ood_mean(ood, d, moments.device)
        out["nc5_ood"] = float(_cosines(moments.mean[p], mu_ood.expand(c, d)).abs().mean())

    if moments.unit_sum is not None:  # kept unless the ClassMoments was built with unit_sums=False
        # 1 - dbar_within / dbar_total as (dbar_total - dbar_within) / dbar_total, the numerator
        # being the spread of the class-mean unit vectors m_c = S_c / n_c about their mean:
        # (1/C) sum_c ||m_c - m||^2, no difference of two dbar (which agree to 1e-6 when every
        # feature points nearly the same way, leaving 5 digits). total = 0 (every unit vector
        # equal) is 0 / 0: a total within the rounding of 1 - ||centre||^2, 4 (D + 4) eps (the
        # unit vectors' own norms are 1 only to about D eps), cannot be told from 0, and a ratio
        # of two rounding errors would be reported otherwise (reference.cosine_separation).
        unit = moments.unit_sum[p] / moments.count[p].unsqueeze(1)
        centre = unit.mean(0)
        total = 1.0 - float(centre.square().sum())
        between = float((unit - centre).square().sum(1).mean())
        indistinct = total <= 4.0 * (d + 4) * 2.0 ** -53
        out["cosine_separation"] = math.nan if indistinct else between / total
        out["feature_norm"] = float(moments.norm_sum.sum()) / moments.num_samples

    degenerate = DEGENERATE_METRICS if ranks.get("sigma_t") == moments.num_samples - 1 else ()
    return NCMetrics(out, ranks=ranks, absent_classes=moments.absent_classes, omitted_rows=moments.omitted_rows,
                     weighting=weighting, rtol=rtol, degenerate=degenerate, per_class=per_class)


def _prepare(features, labels, num_classes, nan_policy, *, kernel_checks_labels: bool = False):
    """Validated (x, y, num_classes) with NaN/Inf rows handled per nan_policy, plus the omitted count.

    ``kernel_checks_labels``: the caller's first use of the labels is the C++ moments kernel, which
    checks every label before it writes anything; the torch pass over them is then skipped when
    num_classes is given and the C++ path will run.
    """
    check_choice(nan_policy, NAN_POLICIES, "nan_policy")
    x = check_features(features)
    defer = (kernel_checks_labels and num_classes is not None and nan_policy == "raise"
             and _dispatch.backend_for(x) == "cpp")
    y, num_classes = check_labels(labels, x.shape[0], x.device, num_classes, values=not defer)
    # Under "raise", ClassMoments rejects NaN/Inf from its own statistics: no extra pass.
    keep = None
    omitted = 0
    if nan_policy == "omit":
        keep = finite_rows(x)
        omitted = int((~keep).sum())
        if omitted:
            x, y = x[keep], y[keep]
            if x.shape[0] == 0:
                raise ValueError("features: every row holds NaN or Inf")
    return x, y, num_classes, omitted, keep


def _moments(x, y, num_classes, weighting, scatter, unit_sums=True, pooled=True) -> ClassMoments:
    """The one-shot ClassMoments of checked (x, y); under balanced weighting on imbalanced labels it
    keeps the exact balanced Sigma_W too (and, with ``pooled=False``, only that one)."""
    return ClassMoments._of_batch(x, y, num_classes, scatter=scatter, unit_sums=unit_sums,
                                  balanced=weighting == "balanced", pooled=pooled)


def class_moments(features, labels, *, num_classes=None, weighting: str = "balanced", scatter: bool = True,
                  unit_sums: bool = True, nan_policy: str = "raise") -> ClassMoments:
    """One-shot ClassMoments of (features, labels).

    With ``weighting="balanced"`` on imbalanced labels the exact balanced Sigma_W is kept too
    (the class counts are known up front here). ``scatter=False`` drops the D x D scatter and
    ``unit_sums=False`` the unit-vector and norm sums (see ClassMoments): counts, means and
    variances are always kept.
    """
    check_choice(weighting, WEIGHTINGS, "weighting")
    x, y, num_classes, omitted, _ = _prepare(features, labels, num_classes, nan_policy, kernel_checks_labels=True)
    m = _moments(x, y, num_classes, weighting, scatter, unit_sums=unit_sums)
    m.omitted_rows = omitted
    return m


def class_distance(features, labels, *, num_classes=None, nan_policy: str = "raise") -> torch.Tensor:
    """Class-distance matrix D (paper 000 eq. 6), float64 (num_classes, num_classes).

    D_ij = (1/(n_i n_j)) sum_{u in i} sum_{v in j} ||h_u - h_v||^2 = ||mu_i - mu_j||^2 + v_i + v_j,
    computed from class means and variances (never from pairs). Absent classes: NaN rows/columns.
    nan_policy: "raise" or "omit" (drop rows with NaN/Inf), as in nc_metrics.
    """
    return class_distance_from_moments(class_moments(features, labels, num_classes=num_classes, scatter=False,
                                                     unit_sums=False, nan_policy=nan_policy))


def nc_metrics(features, labels, *, num_classes=None, weight=None, bias=None, logits=None, superclass=None,
               ood_features=None, class_means=None, weighting: str = "balanced", rtol: float = DEFAULT_RTOL,
               cdnv_exponent: float = 1.0, nan_policy: str = "raise") -> NCMetrics:
    """All Neural-Collapse metrics for one layer's features (docs/metrics.md), as an NCMetrics (a dict
    of floats with ``per_class`` vectors and the ``degenerate`` flags).

    Args:
        features: (N, D) float tensor or array (float16 / bfloat16 / float32 / float64, any device).
        labels: (N,) integer class labels in [0, num_classes).
        num_classes: defaults to labels.max() + 1; classes without samples are absent and left out.
        weight, bias: the classifier (C, D) and (C,); adds nc3 and ncc_mismatch (decision =
            argmax W h + b, computed block-wise without materialising logits).
        logits: (N, C) network outputs; adds logits_norm, and ncc_mismatch with decision
            logits.argmax(1) when no weight is given (with a weight, the classifier's W h + b decides).
        superclass: (num_classes,) class -> super-class map; adds msdr.
        ood_features: (N_ood, D) out-of-distribution features of the same layer; adds nc5_ood.
        class_means: (num_classes, D) class means to score the nearest class centre against, for
            a held-out split: the TRAIN split's means of the same layer (paper 003 def. 6), e.g.
            ``class_moments(train_features, train_labels).means``. Rows holding NaN (classes
            absent from the train split) are no candidates. Default: the means of ``features``.
        weighting: "balanced" (every class counts equally, Papyan et al.) or "sample".
        rtol: eigenvalues <= rtol * lambda_max count as zero in pseudo-inverses and ranks.
        cdnv_exponent: p in CDNV = (v_i + v_j) / (2 ||mu_i - mu_j||^(2p)); default 1.
        nan_policy: "raise" or "omit" (drop rows with NaN/Inf and report ``omitted_rows``).

    Beside the metrics_from_moments keys: ncc_accuracy (fraction whose nearest class mean is their
    label), ncc_mismatch (paper 003 def. 5), logits_norm (mean ||z_i||); ``per_class`` gains
    ncc_accuracy and, with a classifier or logits, ncc_mismatch.
    """
    check_choice(weighting, WEIGHTINGS, "weighting")
    x, y, num_classes, omitted, keep = _prepare(features, labels, num_classes, nan_policy)
    d = x.shape[1]
    w = _check_per_class(weight, "weight", num_classes, d, x.device) if weight is not None else None
    b = None
    if bias is not None:
        if w is None:
            raise ValueError("bias: given without weight")
        b = check_bias(bias, num_classes, x)
    z = None
    if logits is not None:
        z = as_tensor(logits, "logits")
        if not z.dtype.is_floating_point:
            raise TypeError(f"logits: expected a floating dtype, got {z.dtype}")
        n_in = x.shape[0] + omitted
        if z.dim() != 2 or z.shape[0] != n_in:
            raise ValueError(f"logits: expected shape ({n_in}, C), got {tuple(z.shape)}")
        check_same_device(x, z, "logits")
        z = z[keep] if omitted else z
    if superclass is not None:
        _check_superclass(superclass, num_classes, x.device)
    if class_means is not None:
        class_means = _check_per_class(class_means, "class_means", num_classes, d, x.device)
        if not bool(torch.isfinite(class_means).all(dim=1).any()):
            raise ValueError("class_means: every row is NaN or Inf (no class to be nearest to)")
    xo = None
    if ood_features is not None:
        xo = check_features(ood_features, "ood_features")
        if xo.shape[1] != d:
            raise ValueError(f"ood_features: expected {d} columns like features, got {xo.shape[1]}")
        check_same_device(x, xo, "ood_features")
    counts = torch.bincount(y, minlength=num_classes)
    present = int((counts > 0).sum())
    if present < 2:
        raise ValueError(f"labels: nc_metrics needs at least 2 present classes, got {present}")

    # Only `weighting`'s Sigma_W is read here, so imbalanced labels under "balanced" cost one scatter.
    m = _moments(x, y, num_classes, weighting, scatter=True, pooled=False)
    m.omitted_rows = omitted
    ood = None
    if xo is not None:  # only its mean is read: one class, no scatter, no unit sums
        ood = _moments(xo, torch.zeros(xo.shape[0], dtype=torch.int64, device=xo.device), 1, "sample",
                       scatter=False, unit_sums=False)
    out = metrics_from_moments(m, weight=w, superclass=superclass, ood=ood, weighting=weighting, rtol=rtol,
                               cdnv_exponent=cdnv_exponent)
    means = m.means if class_means is None else class_means
    decisions = None
    if w is not None:
        nearest, decisions = ncc_and_decisions(x, means, w, b)
    else:
        nearest = ncc_assign(x, means)
    hits = nearest == y
    out["ncc_accuracy"] = float(hits.to(torch.float64).mean())
    out.per_class["ncc_accuracy"] = class_fractions(torch.bincount(y[hits], minlength=num_classes), counts)
    if z is not None:
        out["logits_norm"] = float(z.to(torch.float64).norm(dim=1).mean())
        if decisions is None:
            decisions = z.argmax(dim=1)
    if decisions is not None:
        mismatch = decisions != nearest
        out["ncc_mismatch"] = float(mismatch.to(torch.float64).mean())
        out.per_class["ncc_mismatch"] = class_fractions(torch.bincount(y[mismatch], minlength=num_classes), counts)
    return out
