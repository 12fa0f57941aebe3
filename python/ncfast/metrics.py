"""Neural-collapse metrics on top of ClassMoments (definitions: docs/metrics.md).

Everything here is float64 linear algebra on the streamed statistics: class means,
per-class variances, the D x D within-class scatter and the unit-vector class sums.
Pseudo-inverses and ranks use symmetric eigendecompositions on the smaller side, with
eigenvalues at or below ``rtol * lambda_max`` counted as zero.
"""

from __future__ import annotations

import math

import torch

from . import _linalg, backends
from ._numerics import coincidence_floor, exponent_of, ieee_ratio, times_power_of_two
from ._validation import WEIGHTINGS, as_tensor, check_choice, check_finite, check_per_class, check_superclass
from .pairwise import PairStats, _class_pair_stats, class_pair_stats
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

    def __init__(
        self,
        values=(),
        *,
        ranks=None,
        absent_classes=(),
        omitted_rows=0,
        weighting=None,
        rtol=None,
        degenerate=(),
        per_class=None,
    ):
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
    the rank rule keeps whole. A Cholesky factor and one triangular inverse cost a fraction of
    the symmetric eigendecomposition it replaces.
    """
    chol, info = torch.linalg.cholesky_ex(sigma_w)
    if int(info) != 0:
        return None
    l_inv = _linalg.triangular_inverse(chol, upper=False)
    bound = torch.linalg.matrix_norm(sigma_w) * l_inv.square().sum()
    if not float(bound) * rtol < 0.5:  # also rejects NaN and Inf
        return None
    return a @ l_inv.T


def _kappa_to_vci(f: torch.Tensor, a0: torch.Tensor, r: int, r_b: int, lam_b_max: float, rtol: float) -> float:
    """VCI from the whitened class means F (C x d1) and the part A0 of A outside the kept range of
    Sigma_W: directions of range(A0) (by the rank rule against Sigma_B's largest eigenvalue) have
    mu = 0; the rest kappa = sigma^2 of (I - Pi_{A0}) F, mu = 1 / (1 + kappa)."""
    r0 = 0
    if a0.numel() and bool(a0.ne(0).any()):
        u0, s0 = _linalg.svd_left(a0)
        k0 = s0.square() > rtol * lam_b_max
        r0 = int(k0.sum())
        u0 = u0[:, k0]
        f = f - u0 @ (u0.T @ f)
    kappa = _linalg.svdvals(f).square() if f.numel() else f.new_zeros(0)
    mu = torch.cat([f.new_zeros(r0), 1.0 / (1.0 + kappa)])  # ascending: kappa is descending
    return ((r - r_b) + float(mu[:r_b].sum())) / r


def _kept_eigenvalues(lam: torch.Tensor, rtol: float) -> torch.Tensor:
    """The eigenvalues the rank rule keeps: above rtol * lambda_max (none when lambda_max <= 0)."""
    top = float(lam.max()) if lam.numel() else 0.0
    return lam[lam > rtol * top] if top > 0 else lam[:0]


def _spectra(
    sigma_w: torch.Tensor, a: torch.Tensor, r_b: int, lam_b_max: float, rtol: float, rank_bound: int
) -> tuple[float, int, torch.Tensor]:
    """(vci, rank of Sigma_W, the eigenvalues of Sigma_T = Sigma_W + A^T A that the rank rule keeps):
    every D x D quantity of a layer, from at most one symmetric eigenproblem of size D.

    VCI = ((r - rB) + sum_{k<=rB} mu_k) / r without cancellation (paper 004, docs/metrics.md):
    mu_k = 1 / (1 + kappa_k) are the generalized eigenvalues of (Sigma_W, Sigma_T), with kappa_k
    those of (Sigma_B, Sigma_W). On the kept range P1 of Sigma_W (eigenvalues omega by the rank
    rule against Sigma_W's largest), the directions of range(A P0) have Sigma_W = 0 and so mu = 0;
    the rest are kappa = sigma^2 of F = (I - Pi_{A P0}) A P1 diag(omega1)^{-1/2} (the Schur
    complement of the pencil), a C x d1 matrix. Sigma_T is never formed for VCI, so Sigma_B's
    rounding noise is never divided by a tiny Sigma_W.

    Three routes, by what Sigma_W allows (``rank_bound`` = N - C bounds its rank):

    - low rank (rank_bound < D, as whenever N <= D): Sigma_W = M M^T + S by a pivoted Cholesky
      factorisation (M is D x k, k = rank(Sigma_W) <= N - C, S rounding noise whose trace is
      checked against the rank rule's cut), then M = Q R. Every quantity lives in the span of
      [M, A^T], of dimension at most k + C: omega and P1 from the k x k factor R (no
      decomposition at all when a bound certifies that the rule keeps every omega), and the
      spectrum of Sigma_T = [M, A^T] [M, A^T]^T from its (k + C) x (k + C) Gram matrix. No
      problem of size D.
    - full rank (a Cholesky factor L of Sigma_W certifies that the rule keeps every omega,
      _whitened_between): F = A L^{-T}, and one eigvalsh of the D x D Sigma_T for rank and
      effective rank.
    - otherwise (Sigma_W ill-conditioned or singular at N > D): P1 from one eigendecomposition of
      Sigma_W, unless a pivoted Cholesky factor shows it of rank below D - C (then the low-rank
      route), and one eigvalsh of Sigma_T.

    Coordinates j where Sigma_W's row and A's column are exactly zero (dead units: a feature
    that is constant) are first taken out: e_j is in the null space of Sigma_W and of Sigma_B,
    so it adds nothing to either range and an exact zero to both spectra, which the rtol rule
    never keeps. r keeps the full D.
    """
    c, d = a.shape
    r = min(d, c - 1)
    live = _linalg.live_coordinates(sigma_w, a)
    if live is not None:
        if live.numel() == 0:  # Sigma_T = 0: A = 0 too, so rB = 0 and nothing is explained
            return (r - r_b) / r, 0, a.new_zeros(0)
        sigma_w, a = sigma_w[live][:, live], a[:, live]
    d = sigma_w.shape[0]
    tried_low_rank = False
    if rank_bound < d:
        tried_low_rank = True
        low = _low_rank(sigma_w, a, r, r_b, lam_b_max, rtol, max_size=rank_bound)
        if low is not None:
            return low
    f = _whitened_between(sigma_w, a, rtol)
    if f is not None:  # Sigma_W certified full rank: P0 is empty and F = A L^{-T}
        vci = _kappa_to_vci(f, a[:, :0], r, r_b, lam_b_max, rtol)
        return vci, d, _kept_eigenvalues(_linalg.sym_eigvalsh(sigma_w + a.T @ a), rtol)
    if not tried_low_rank:
        low = _low_rank(sigma_w, a, r, r_b, lam_b_max, rtol, max_size=d - c)
        if low is not None:
            return low
    omega, p = _linalg.sym_eigh(sigma_w)
    wmax = float(omega.max())
    keep = omega > rtol * wmax if wmax > 0 else torch.zeros_like(omega, dtype=torch.bool)
    f = (a @ p[:, keep]) / omega[keep].sqrt()
    vci = _kappa_to_vci(f, a @ p[:, ~keep], r, r_b, lam_b_max, rtol)
    return vci, int(keep.sum()), _kept_eigenvalues(_linalg.sym_eigvalsh(sigma_w + a.T @ a), rtol)


def _low_rank(
    sigma_w: torch.Tensor, a: torch.Tensor, r: int, r_b: int, lam_b_max: float, rtol: float, max_size: int | None = None
):
    """_spectra's low-rank route, or None when Sigma_W is not of low rank: the pivoted Cholesky
    factor, of at most ``max_size`` columns, leaves out more than the rank rule would cut (a
    remainder whose trace exceeds rtol / 2 of Sigma_W's largest diagonal entry).

    With Sigma_W = M M^T (the remainder's eigenvalues are all below the rule's cut, which drops
    them from the range too) and M = Q R: omega = sigma^2(R) and P1 = Q U1 from R = U S V^T;
    A's part outside P1 is A0 = A - (A P1) P1^T, and F = A P1 diag(omega1)^{-1/2}. When
    _whitened_between certifies R R^T (Sigma_W in the basis Q) every omega is kept and F is
    (A Q) L^{-T} with L L^T = R R^T, with no SVD of R.
    """
    m, rest = _linalg.pivoted_cholesky(sigma_w, max_rank=max_size)
    top = float(sigma_w.diagonal().max())
    k = m.shape[1]
    if not rest <= 0.5 * rtol * top:  # also NaN: a non-finite Sigma_W
        return None
    if k == 0:  # Sigma_W = 0 (to the rule): every direction of A has mu = 0
        f = a[:, :0]
        vci = _kappa_to_vci(f, a, r, r_b, lam_b_max, rtol)
        lam_t = _linalg.sym_eigvalsh(a @ a.T)
        return vci, 0, _kept_eigenvalues(lam_t, rtol)
    q, rr = torch.linalg.qr(m)
    aq = a @ q
    f = _whitened_between(rr @ rr.T, aq, rtol)  # Sigma_W in the basis Q: R R^T (k x k)
    if f is not None:  # every omega kept: P1 = Q
        p1, k1 = q, k
    else:
        u, s, _ = torch.linalg.svd(rr)
        omega = s.square()
        keep = omega > rtol * float(omega.max())
        u1 = u[:, keep]
        f = (aq @ u1) / s[keep]
        p1, k1 = q @ u1, int(keep.sum())
    a0 = a - (a @ p1) @ p1.T
    vci = _kappa_to_vci(f, a0, r, r_b, lam_b_max, rtol)
    b = torch.cat([m, a.T], dim=1)  # Sigma_T = B B^T: its non-zero eigenvalues are those of B^T B
    return vci, k1, _kept_eigenvalues(_linalg.sym_eigvalsh(b.T @ b), rtol)


def _pair_sq_dist(mt: torch.Tensor) -> torch.Tensor:
    """||mu_i - mu_j||^2 from centred means (centring keeps the expansion well conditioned).

    One C x C matrix, formed by the GEMM itself (sq_j - 2 <mu_i, mu_j>, the row term broadcast into
    addmm) and finished in place, without the temporaries of the plain expression."""
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


def msdr_from_moments(moments: ClassMoments, superclass) -> float:
    """Mean super-class distance ratio over the present classes (paper 000; docs/metrics.md):
    mean_{i != j, s(i) = s(j)} D_ij / mean_i D_ii, with D the class-distance matrix and s(c) =
    ``superclass[c]`` ((num_classes,) integers; entries of absent classes are ignored). NaN when no
    two present classes share a super-class. From the pairwise pass (``class_pair_stats``), so no
    C x C matrix is held."""
    if int(moments.present.sum()) < 2:
        return math.nan
    sup = check_superclass(superclass, moments.num_classes, moments.device)
    msdr = class_pair_stats(moments, superclass=sup).msdr
    assert msdr is not None  # a superclass map was given
    return msdr


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
    return check_finite(m, "ood").to(torch.float64)


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


def metrics_from_moments(
    moments: ClassMoments,
    *,
    weight=None,
    superclass=None,
    ood=None,
    weighting: str = "balanced",
    rtol: float = DEFAULT_RTOL,
    cdnv_exponent: float = 1.0,
    tile: int | None = None,
) -> NCMetrics:
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
    1,008, or 16,384 with the Triton backend), so no C x C matrix is held: memory is O(C * D + tile^2).

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
        vci = 1 - Tr(Sigma_T^+ Sigma_B) / min(D, C-1)   (stable form, see _spectra)
        cosine_separation = 1 - dbar_within / dbar_total   (Kornblith et al. 2021)
            = (1/C) sum_c ||m_c - mean m||^2 / (1 - ||mean m||^2), m_c = S_c / n_c
        rank, effective_rank: numerical rank and exp(entropy) of sqrt-eigenvalues of Sigma_T
            (over the eigenvalues above rtol * lambda_max; 0 when Sigma_T = 0)
        msdr = mean_{i!=j, s(i)=s(j)} D_ij / mean_i D_ii
    """
    return _metrics_from_moments(
        moments,
        backends.for_tensor(moments.mean),
        weight=weight,
        superclass=superclass,
        ood=ood,
        weighting=weighting,
        rtol=rtol,
        cdnv_exponent=cdnv_exponent,
        tile=tile,
    )


def _metrics_from_moments(
    moments: ClassMoments,
    backend: backends.Backend,
    *,
    weight,
    superclass,
    ood,
    weighting: str,
    rtol: float,
    cdnv_exponent: float,
    tile,
) -> NCMetrics:
    """metrics_from_moments with the caller's backend."""
    check_choice(weighting, WEIGHTINGS, "weighting")
    if not isinstance(moments, ClassMoments):
        raise TypeError(f"moments: expected a ClassMoments, got {type(moments).__name__}")
    p = moments.present
    c = int(p.sum())
    if c < 2:
        raise ValueError(f"labels: these metrics need at least 2 present classes, got {c}")
    if not rtol >= 0:
        raise ValueError(f"rtol: must be >= 0, got {rtol}")
    moments._require_in_range()
    sup = None if superclass is None else check_superclass(superclass, moments.num_classes, moments.device)
    w = None
    if weight is not None:
        w = check_per_class(weight, "weight", moments.num_classes, moments.dim, moments.device, finite=True)[p].to(
            torch.float64
        )
    mt = moments.centred_means(weighting)
    out, ranks = _within_between(moments, weighting, rtol)
    pairs = _class_pair_stats(
        moments, backend, weighting=weighting, superclass=sup, tile=tile, cdnv_exponent=cdnv_exponent
    )
    out.update(_geometry(mt, pairs))
    per_class = {"count": _on_classes(moments.count[p], p), "variance": moments.variances, "cdnv": pairs.cdnv_per_class}
    if w is not None:
        values, duality = _classifier(w, mt)
        out.update(values)
        per_class["duality"] = _on_classes(duality, p)
    if sup is not None:
        out["msdr"] = pairs.msdr
    if ood is not None:
        out["nc5_ood"] = _nc5_ood(moments, ood)
    if moments.unit_sum is not None:  # kept unless the ClassMoments was built with unit_sums=False
        out.update(_directions(moments))
    return NCMetrics(
        out,
        ranks=ranks,
        absent_classes=moments.absent_classes,
        omitted_rows=moments.omitted_rows,
        weighting=weighting,
        rtol=rtol,
        degenerate=_degenerate(moments, ranks),
        per_class=per_class,
    )


def _degenerate(moments: ClassMoments, ranks: dict) -> tuple:
    """The metrics that lose their meaning when Sigma_T has full rank N - 1 (no within-class
    direction outside the span of the data)."""
    return DEGENERATE_METRICS if ranks.get("sigma_t") == moments.num_samples - 1 else ()


def _scatter_metrics(moments: ClassMoments, weighting: str, rtol: float) -> tuple[dict, dict, tuple]:
    """(values, ranks, degenerate) of the D x D metrics alone (``SCATTER_METRICS`` and
    squared_distance), as metrics_from_moments computes them: for a LayerProbe's channel-pooled
    features, whose other metrics are not reported."""
    moments._require_in_range()
    values, ranks = _within_between(moments, weighting, rtol)
    return values, ranks, _degenerate(moments, ranks)


def _within_between(moments: ClassMoments, weighting: str, rtol: float) -> tuple[dict, dict]:
    """squared_distance, and with the D x D scatter nc1, fuzziness, vci, rank and effective_rank (NaN
    without it); with the ranks they rest on."""
    out: dict[str, float] = {}
    ranks: dict[str, int] = {}
    c = int(moments.present.sum())
    a = moments.between_factor(weighting)
    out["squared_distance"] = ieee_ratio(moments.within_trace(weighting), float(a.square().sum()))
    s_b, v_b = _between_eig(a, rtol)
    ranks["sigma_b"] = int(s_b.numel())
    if not moments.has_scatter:
        out.update((k, float("nan")) for k in SCATTER_METRICS)
        return out, ranks
    sigma_w = moments.sigma_w(weighting)
    fuzz = float((((sigma_w @ v_b) * v_b).sum(0) / s_b).sum())
    out["nc1"] = fuzz / c
    out["fuzziness"] = fuzz
    lam_b_max = float(s_b.max()) if s_b.numel() else 0.0  # Sigma_B = 0: equal class means
    out["vci"], ranks["sigma_w"], kept_t = _spectra(
        sigma_w, a, ranks["sigma_b"], lam_b_max, rtol, rank_bound=moments.num_samples - c
    )
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
    return out, ranks


def _geometry(mt: torch.Tensor, pairs: PairStats) -> dict:
    """The shape of the centred class means: equinorm, and the pairwise metrics of ``pairs``."""
    norms = mt.norm(dim=1)
    return {
        "equinorm": float(norms.std(correction=0) / norms.mean()),
        "nc2_etf": pairs.nc2_etf,
        "equiangularity": pairs.equiangularity,
        "coherence": pairs.coherence,
        "cdnv": pairs.cdnv,
        "uniformity_mean": pairs.uniformity_mean,
        "uniformity_var": pairs.uniformity_var,
    }


def _classifier(w: torch.Tensor, mt: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """nc3, nc3_etf and duality_mean / _std of the classifier rows w (present classes, float64),
    and the per-class duality cos(w_c, Mt_c). All are scale-free: w and Mt are first scaled by powers
    of two (exact), so ||W||_F and ||W Mt^T||_F stay inside float64 at any magnitude of either (a
    weight near 2^500 gave nc3_etf 1.0, one near 2^-500 inf)."""
    w = times_power_of_two(w, -exponent_of(w))
    mt = times_power_of_two(mt, -exponent_of(mt))
    duality = _cosines(w, mt)
    return {
        "nc3": float(torch.linalg.norm(w / torch.linalg.norm(w) - mt / torch.linalg.norm(mt))),
        "nc3_etf": _nc3_etf(w, mt),
        "duality_mean": float(duality.mean()),
        "duality_std": float(duality.std(correction=0)),
    }, duality


def _nc5_ood(moments: ClassMoments, ood) -> float:
    """mean_c |cos(mu_c, mu_G^ood)| over the present classes' uncentred means."""
    p = moments.present
    mu_ood = _ood_mean(ood, moments.dim, moments.device)
    mu = moments.mean[p]
    mu, mu_ood = times_power_of_two(mu, -exponent_of(mu)), times_power_of_two(mu_ood, -exponent_of(mu_ood))
    return float(_cosines(mu, mu_ood.expand(int(p.sum()), moments.dim)).abs().mean())


def _directions(moments: ClassMoments) -> dict:
    """cosine_separation and feature_norm from the unit-vector and norm sums.

    1 - dbar_within / dbar_total as (dbar_total - dbar_within) / dbar_total, the numerator being
    the spread of the class-mean unit vectors m_c = S_c / n_c about their mean:
    (1/C) sum_c ||m_c - m||^2, no difference of two dbar (which agree to 1e-6 when every feature
    points nearly the same way, leaving 5 digits). total = 0 (every unit vector equal) is 0 / 0:
    a total within ``coincidence_floor`` (the unit vectors' own norms are 1 only to about D eps)
    cannot be told from 0, and a ratio of two rounding errors would be reported otherwise
    (reference.cosine_separation).
    """
    p = moments.present
    # the callers ask for these metrics only where the unit and norm sums are kept
    assert moments.unit_sum is not None and moments.norm_sum is not None
    unit = moments.unit_sum[p] / moments.count[p].unsqueeze(1)
    centre = unit.mean(0)
    total = 1.0 - float(centre.square().sum())
    between = float((unit - centre).square().sum(1).mean())
    indistinct = total <= coincidence_floor(moments.dim)
    return {
        "cosine_separation": math.nan if indistinct else between / total,
        "feature_norm": float(moments.norm_sum.sum()) / moments.num_samples,
    }
