"""Statistics over all pairs of classes, streamed in tiles: O(C * D + tile^2) memory.

The C x C matrices of class-mean products, distances and cosines are never held whole: the
upper triangle is visited tile by tile (float64 products of centred class means) and reduced on
the fly. With C = 100,000 classes that is the difference between 80 GB and a few MB.

Numerics: the mean cosine over ordered pairs has a closed form, (||sum_i u_i||^2 - C) / (C (C-1))
with u_i the unit centred means, so the tiled pass sums squared deviations from it directly
(no E[x^2] - E[x]^2 cancellation when the cosines are nearly equal, as at collapse). CDNV's mean
and std are merged across tiles with Chan's formula. nc2_etf sums (G_ij / ||G||_F - E_ij)^2 exactly
rather than the expansion 2 - 2 <G, E> / ||G||_F, which loses every digit near an exact ETF; the
norm ||G||_F = ||Mt^T Mt||_F comes first from the smaller Gram, so one pass over the tiles does all.

Known limit: ||mu_i - mu_j||^2 comes from the Gram, as ||Mt_i||^2 + ||Mt_j||^2 - 2 G_ij, so it
carries an absolute error of about D eps (||Mt_i||^2 + ||Mt_j||^2). For two classes whose means
nearly coincide, that is a large relative error in their distance and so in their CDNV ratio
and nearest-class distance. Fuzzing found it where the CDNV mean was dominated by one such pair:
means 2e-8 of their norm apart (d2 = 4.9e-16 against 4.4e-16 from the Gram), the mean 10% off
the reference (C = 130, D = 1). The relative error is at most about
D eps (||Mt_i||^2 + ||Mt_j||^2) / ||mu_i - mu_j||^2: under 1e-6 once two means are apart by more
than sqrt(2 D eps / 1e-6) of their norm (5e-4 at D = 1,024; typically far less, as rounding
errors of a dot product grow like sqrt(D), not D).

Hyperspherical uniformity takes ||u_i - u_j||^2 = 2 - 2 cos_ij from the same Gram entries, so it
has the same limit for two nearly coincident directions: cos_ij carries an absolute error of about
D eps, so 2 - 2 cos_ij one of about 2 D eps (its cancellation when cos_ij is near 1), hence the
term log(1 / ||u_i - u_j||) = -log(2 - 2 cos_ij) / 2 an absolute error of about
D eps / (2 - 2 cos_ij): under 1e-6 while the angle between u_i and u_j (2 - 2 cos_ij ~ angle^2) is
above sqrt(D eps / 1e-6), 5e-4 rad at D = 1,024. Where 2 - 2 cos_ij is at most 4 (D + 4) eps, the
rounding of cos_ij itself, the two directions cannot be told apart and the term is +inf, like a CDNV
ratio over ||mu_i - mu_j|| = 0 (the reference applies the same rule to its ||u_i - u_j||^2): two
centred means on one ray (class means on a line, rank(Sigma_B) = 1) give an infinite uniformity,
not the logarithm of a rounding error.
The C++ backend takes the logarithms from its own AVX-512 log (csrc/pairwise.cpp neg_half_log, at
most about 3e-16 relative error) or, without AVX-512, from glibc's vector library; the torch and
Triton backends from torch.log / tl.log.

The tiles are reduced by the backend (``Backend.pair_reducer``): the C++ core, torch operations, or
a Triton kernel that forms each Gram block in registers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import backends
from ._numerics import coincidence_floor, exponent_of, ieee_ratio, times_power_of_two
from .backends import PairContext, PairSums
from .stats import ClassMoments


@dataclass
class PairStats:
    """Reductions over pairs of present classes (i != j); see ``class_pair_stats``.

    Per-class tensors have num_classes entries; absent classes hold -1 / NaN.
    """

    cdnv: float  # mean over unordered pairs of (v_i + v_j) / (2 ||mu_i - mu_j||^(2p)), p = cdnv_exponent
    cdnv_std: float  # population std of the same values
    nc2_etf: float
    equiangularity: float
    coherence: float
    class_distance_mean: float  # mean over unordered pairs of D_ij = ||mu_i - mu_j||^2 + v_i + v_j
    msdr: float | None  # with a superclass map
    nearest_class: torch.Tensor  # argmin_{j != i} ||mu_i - mu_j||, int64
    nearest_sq_distance: torch.Tensor  # min_{j != i} ||mu_i - mu_j||^2, float64
    uniformity_mean: float  # mean over unordered pairs of log(1 / ||u_i - u_j||), u_c = Mt_c / ||Mt_c||
    uniformity_var: float  # population variance of the same values
    cdnv_per_class: torch.Tensor  # mean over present j != c of the CDNV ratio of (c, j), float64


def _tiles(c: int, tile: int):
    """Upper-triangle tiles as (rows, cols) slices, cols.start >= rows.start."""
    for i0 in range(0, c, tile):
        for j0 in range(i0, c, tile):
            yield slice(i0, min(c, i0 + tile)), slice(j0, min(c, j0 + tile))


def _gram_norm(mt: torch.Tensor, backend: backends.Backend) -> float:
    """||Mt Mt^T||_F = ||Mt^T Mt||_F from whichever Gram is smaller."""
    c, d = mt.shape
    return float(torch.linalg.norm(mt @ mt.T if c <= d else backend.sym_gram(mt)))


def _power_of_two(e: float) -> float:
    """2^e in float64: inf above its range, 0 below (math.pow raises there)."""
    if e == 0.0:
        return 1.0
    return float(torch.exp2(torch.tensor(e, dtype=torch.float64)))


def _check_exponent(p) -> float:
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"cdnv_exponent must be a finite number > 0, got {p!r}") from None
    if isinstance(p, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"cdnv_exponent must be a finite number > 0, got {p!r}")
    return value


def class_pair_stats(
    moments: ClassMoments,
    *,
    weighting: str = "balanced",
    superclass=None,
    tile: int | None = None,
    cdnv_exponent: float = 1.0,
) -> PairStats:
    """CDNV, NC2 cosine statistics, hyperspherical uniformity, nearest other class and MSDR
    without a C x C matrix.

    Mt rows are mu_c - mu_G (mu_G of ``weighting``), G = Mt Mt^T, cos_ij = G_ij / (||Mt_i|| ||Mt_j||),
    u_c = Mt_c / ||Mt_c||, E = (I - 11^T / C) / sqrt(C - 1), v_c the within-class variances:
        nc2_etf = || G / ||G||_F - E ||_F;  equiangularity = std_{i != j} cos_ij;
        coherence = mean_{i != j} |cos_ij + 1/(C-1)|;  msdr = mean_{i != j, s(i)=s(j)} D_ij / mean_i D_ii;
        CDNV ratio of a pair: (v_i + v_j) / (2 ||mu_i - mu_j||^(2p)), p = ``cdnv_exponent`` (default 1;
            a finite number > 0); cdnv / cdnv_std: mean / population std over pairs i < j;
            cdnv_per_class[c] = mean over present j != c of the ratio of (c, j) (NaN if c is absent);
        uniformity_mean / uniformity_var = mean / population variance over pairs i < j of
            log(1 / ||u_i - u_j||), ||u_i - u_j||^2 = 2 - 2 cos_ij.
    Pairs with ||mu_i - mu_j|| = 0 have an infinite CDNV ratio, and pairs with u_i = u_j (to rounding:
    2 - 2 cos_ij <= 4 (D + 4) eps) an infinite uniformity term: the mean is then inf and the variance or std NaN
    (see the module docstring for the accuracy of nearly coincident means and directions).
    ``superclass`` is a (num_classes,) int64 tensor on the moments' device, or None. ``tile``:
    classes per tile side, default the backend's (1,008 for the C++ and torch backends, 16,384 for
    Triton).
    """
    return _class_pair_stats(
        moments,
        backends.for_tensor(moments.mean),
        weighting=weighting,
        superclass=superclass,
        tile=tile,
        cdnv_exponent=cdnv_exponent,
    )


def _class_pair_stats(
    moments: ClassMoments, backend: backends.Backend, *, weighting: str, superclass, tile, cdnv_exponent
) -> PairStats:
    """class_pair_stats with the caller's backend."""
    exponent = _check_exponent(cdnv_exponent)
    p = moments.present
    c = int(p.sum())
    mt, var = moments.centred_means(weighting), moments.variances[p]
    # Mt and the variances times 2^-k and 2^-2k (exact): ||G||_F sums fourth powers of the means, which
    # left float64's range from |Mt| near 2^256 (nc2_etf came out 1.0) or 2^-256 (inf). Every
    # result is scale-free but the distances (times 2^2k after) and a CDNV with p != 1.
    k = exponent_of(mt)
    if k:
        mt, var = times_power_of_two(mt, -k), times_power_of_two(var, -2 * k)
    tile = backend.pair_tile if tile is None else tile
    device = mt.device
    # ||G||_F first, from the smaller Gram, so the exact nc2 residual is summed in the same pass.
    g = _gram_norm(mt, backend)
    norms = torch.linalg.vector_norm(mt, dim=1)  # no C x D temporary (mt.square().sum(1) made one)
    sq = norms.square()
    unit_sum = mt.T @ (1.0 / norms)  # sum_i u_i without a C x D temporary
    inv_sqrt = 1.0 / math.sqrt(c - 1)
    ctx = PairContext(
        sq=sq,
        norms=norms,
        var=var,
        sup=None if superclass is None else superclass[p],
        g=g,
        etf_diag=(1.0 - 1.0 / c) * inv_sqrt,
        etf_offdiag=-inv_sqrt / c,
        mean_cos=(float(unit_sum.square().sum()) - c) / (c * (c - 1)),
        etf_cos=1.0 / (c - 1),
        best=torch.full((c,), float("inf"), dtype=torch.float64, device=device),
        best_idx=torch.full((c,), -1, dtype=torch.int64, device=device),
        cdnv_exponent=exponent,
        unif_floor=coincidence_floor(mt.shape[1]),
    )
    reduce = backend.pair_reducer(mt, tile, ctx)
    sums = PairSums.total(part for rows, cols in _tiles(c, tile) for part in reduce(rows, cols))
    v, best, best_idx, sup = ctx.var, ctx.best, ctx.best_idx, ctx.sup

    pairs = c * (c - 1)
    n_pairs, cdnv_mean, cdnv_m2 = sums.cdnv
    msdr = None
    if sup is not None:
        msdr = ieee_ratio(sums.msdr_sum / sums.msdr_n, float(2.0 * v.mean())) if sums.msdr_n else float("nan")
    full_idx = torch.full((moments.num_classes,), -1, dtype=torch.int64, device=device)
    full_d2 = torch.full((moments.num_classes,), float("nan"), dtype=torch.float64, device=device)
    present_idx = p.nonzero().squeeze(1)
    full_idx[present_idx] = present_idx[best_idx]
    full_d2[present_idx] = best
    per_class = torch.full((moments.num_classes,), float("nan"), dtype=torch.float64, device=device)
    assert ctx.ratio_sum is not None  # PairContext.__post_init__ makes it
    per_class[present_idx] = ctx.ratio_sum / (c - 1)
    n_unif, unif_mean, unif_m2 = sums.unif
    # back to the moments' scale: distances 2^2k, a CDNV ratio 2^(2k (1 - p)) (v / d^2p scaled by 2^-2k / 2^-2kp)
    cdnv_scale = _power_of_two(2.0 * k * (1.0 - exponent))
    return PairStats(
        cdnv=cdnv_mean * cdnv_scale,
        cdnv_std=math.sqrt(cdnv_m2 / n_pairs) * cdnv_scale,
        nc2_etf=math.sqrt(sums.resid),
        equiangularity=math.sqrt(sums.cos_dev / pairs),
        coherence=sums.coh / pairs,
        class_distance_mean=times_power_of_two(sums.dist / (pairs / 2), 2 * k),
        msdr=msdr,
        nearest_class=full_idx,
        nearest_sq_distance=times_power_of_two(full_d2, 2 * k),
        uniformity_mean=unif_mean,
        uniformity_var=unif_m2 / n_unif,
        cdnv_per_class=per_class * cdnv_scale,
    )
