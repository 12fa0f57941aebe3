"""Statistics over all pairs of classes, streamed in tiles: O(C * D + tile^2) memory.

The C x C matrices of class-mean products, distances and cosines are never held whole: the
upper triangle is visited tile by tile (float64 products of centred class means) and reduced on
the fly. With C = 100,000 classes that is the difference between 80 GB and a few MB.

Numerics: the mean cosine over ordered pairs has a closed form, (||sum_i u_i||^2 - C) / (C (C-1))
with u_i the unit centred means, so the tiled pass sums squared deviations from it directly
(no E[x^2] - E[x]^2 cancellation when the cosines are nearly equal, as at collapse). CDNV's mean
and std are merged across tiles with Chan's formula. nc2_etf needs ||G||_F before its residual, so
it takes a second pass that sums (G_ij / ||G||_F - E_ij)^2 exactly rather than the expansion
2 - 2 <G, E> / ||G||_F, which loses every digit near an exact ETF.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .stats import ClassMoments

DEFAULT_TILE = 1024
"""Classes per tile side: a few float64 tile-sized temporaries stay near 40 MB."""


@dataclass
class PairStats:
    """Reductions over pairs of present classes (i != j); see ``class_pair_stats``.

    Per-class tensors have num_classes entries; absent classes hold -1 / NaN.
    """

    cdnv: float  # mean over unordered pairs of (v_i + v_j) / (2 ||mu_i - mu_j||^2)
    cdnv_std: float  # population std of the same values
    nc2_etf: float
    equiangularity: float
    coherence: float
    class_distance_mean: float  # mean over unordered pairs of D_ij = ||mu_i - mu_j||^2 + v_i + v_j
    msdr: float | None  # with a superclass map
    nearest_class: torch.Tensor  # argmin_{j != i} ||mu_i - mu_j||, int64
    nearest_sq_distance: torch.Tensor  # min_{j != i} ||mu_i - mu_j||^2, float64


def _chan(a: tuple, b: tuple) -> tuple:
    """Combine (n, mean, M2) of two sets of scalars."""
    na, ma, qa = a
    nb, mb, qb = b
    if nb == 0:
        return a
    if na == 0:
        return b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * nb / n, qa + qb + delta * delta * na * nb / n


def _tiles(c: int, tile: int):
    """Upper-triangle tile pairs (i0, j0, rows, cols) with j0 >= i0."""
    for i0 in range(0, c, tile):
        for j0 in range(i0, c, tile):
            rows = slice(i0, min(c, i0 + tile))
            cols = slice(j0, min(c, j0 + tile))
            yield i0, j0, rows, cols


def class_pair_stats(moments: ClassMoments, *, weighting: str = "balanced", superclass=None,
                     tile: int = DEFAULT_TILE) -> PairStats:
    """CDNV, NC2 cosine statistics, nearest other class and MSDR without a C x C matrix.

    Mt rows are mu_c - mu_G (mu_G of ``weighting``), G = Mt Mt^T, cos_ij = G_ij / (||Mt_i|| ||Mt_j||),
    E = (I - 11^T / C) / sqrt(C - 1):
        nc2_etf = || G / ||G||_F - E ||_F;  equiangularity = std_{i != j} cos_ij;
        coherence = mean_{i != j} |cos_ij + 1/(C-1)|;  msdr = mean_{i != j, s(i)=s(j)} D_ij / mean_i D_ii.
    ``superclass`` is a (num_classes,) int64 tensor on the moments' device, or None.
    """
    p = moments.present
    c = int(p.sum())
    mt = moments.centred_means(weighting)
    v = moments.variances[p]
    sq = mt.square().sum(1)
    norms = sq.sqrt()
    unit_sum = mt.T @ (1.0 / norms)  # sum_i u_i without a C x D temporary
    mean_cos = (float(unit_sum.square().sum()) - c) / (c * (c - 1))
    etf_off = 1.0 / (c - 1)
    sup = None if superclass is None else superclass[p]
    device = mt.device

    cdnv_acc = (0, 0.0, 0.0)
    g_sq = cos_dev = coh = dist_sum = 0.0
    msdr_sum, msdr_n = 0.0, 0
    best = torch.full((c,), float("inf"), dtype=torch.float64, device=device)
    best_idx = torch.full((c,), -1, dtype=torch.int64, device=device)

    def nearest(d2, offset, other):
        val, arg = d2.min(dim=1)
        idx = slice(offset, offset + d2.shape[0])
        better = val < best[idx]
        best[idx] = torch.where(better, val, best[idx])
        best_idx[idx] = torch.where(better, arg + other, best_idx[idx])

    for i0, j0, rows, cols in _tiles(c, tile):
        diagonal = i0 == j0
        gram = mt[rows] @ mt[cols].T
        # Pairs i < j: a whole off-diagonal tile, the strict upper triangle of a diagonal one.
        sel = torch.ones_like(gram, dtype=torch.bool).triu_(1) if diagonal else None

        def total(t):
            return float(t[sel].sum()) if diagonal else float(t.sum())

        g_sq += 2.0 * total(gram.square())
        if diagonal:
            g_sq += float(gram.diagonal().square().sum())
        cos = gram / norms[rows].unsqueeze(1)
        cos /= norms[cols].unsqueeze(0)
        cos_dev += 2.0 * total((cos - mean_cos).square_())
        coh += 2.0 * total((cos + etf_off).abs_())
        del cos
        d2 = gram.mul_(-2.0).add_(sq[rows].unsqueeze(1)).add_(sq[cols].unsqueeze(0)).clamp_min_(0.0)
        vsum = v[rows].unsqueeze(1) + v[cols].unsqueeze(0)
        ratio = vsum / (2.0 * d2)
        ratio = ratio[sel] if diagonal else ratio.reshape(-1)
        if ratio.numel():
            m = ratio.mean()
            cdnv_acc = _chan(cdnv_acc, (ratio.numel(), float(m), float((ratio - m).square().sum())))
        dist = vsum.add_(d2)
        dist_sum += total(dist)
        if sup is not None:
            same = sup[rows].unsqueeze(1) == sup[cols].unsqueeze(0)
            if diagonal:
                same &= sel
            msdr_sum += 2.0 * float(dist[same].sum())
            msdr_n += 2 * int(same.sum())
        if diagonal:
            d2.fill_diagonal_(float("inf"))
            nearest(d2, i0, j0)
        else:
            nearest(d2, i0, j0)
            nearest(d2.T, j0, i0)

    g = math.sqrt(g_sq)
    inv_sqrt = 1.0 / math.sqrt(c - 1)
    resid = 0.0
    for i0, j0, rows, cols in _tiles(c, tile):
        # E_ij = -1/(C sqrt(C-1)) off the diagonal, (1 - 1/C)/sqrt(C-1) on it
        r = (mt[rows] @ mt[cols].T).div_(g).add_(inv_sqrt / c)
        if i0 == j0:
            r.diagonal().sub_(inv_sqrt)
            r.square_()
            resid += 2.0 * float(r.triu(1).sum()) + float(r.diagonal().sum())
        else:
            resid += 2.0 * float(r.square_().sum())

    pairs = c * (c - 1)
    n_pairs, cdnv_mean, cdnv_m2 = cdnv_acc
    msdr = None
    if sup is not None:
        msdr = (msdr_sum / msdr_n) / float(2.0 * v.mean()) if msdr_n else float("nan")
    full_idx = torch.full((moments.num_classes,), -1, dtype=torch.int64, device=device)
    full_d2 = torch.full((moments.num_classes,), float("nan"), dtype=torch.float64, device=device)
    present_idx = p.nonzero().squeeze(1)
    full_idx[present_idx] = present_idx[best_idx]
    full_d2[present_idx] = best
    return PairStats(
        cdnv=cdnv_mean,
        cdnv_std=math.sqrt(cdnv_m2 / n_pairs),
        nc2_etf=math.sqrt(resid),
        equiangularity=math.sqrt(cos_dev / pairs),
        coherence=coh / pairs,
        class_distance_mean=dist_sum / (pairs / 2),
        msdr=msdr,
        nearest_class=full_idx,
        nearest_sq_distance=full_d2,
    )
