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
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import _C, _dispatch
from .stats import ClassMoments

DEFAULT_TILE = 1008
"""Classes per tile side: an 8 MB float64 tile of G (the torch reducer adds a few temporaries);
a multiple of the C++ Gram engine's 12 x 16 register tile, so it writes the tile in place."""


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
    """Upper-triangle tiles as (rows, cols) slices, cols.start >= rows.start."""
    for i0 in range(0, c, tile):
        for j0 in range(i0, c, tile):
            yield slice(i0, min(c, i0 + tile)), slice(j0, min(c, j0 + tile))


@dataclass
class _Context:
    """Per-class vectors and constants every tile needs; best / best_idx are updated in place."""

    sq: torch.Tensor
    norms: torch.Tensor
    var: torch.Tensor
    sup: torch.Tensor | None
    g: float
    etf_diag: float
    etf_offdiag: float
    mean_cos: float
    etf_cos: float
    best: torch.Tensor
    best_idx: torch.Tensor


def _reduce_tile_cpp(gram: torch.Tensor, rows: slice, cols: slice, k: _Context) -> dict:
    """The fused C++ sweep over one tile (csrc/pairwise.cpp)."""
    sup_r = sup_c = None
    if k.sup is not None:
        sup_r, sup_c = k.sup[rows].numpy(), k.sup[cols].numpy()
    return _C.reduce_pair_tile(
        gram.numpy(), rows.start == cols.start, k.sq[rows].numpy(), k.sq[cols].numpy(), k.norms[rows].numpy(),
        k.norms[cols].numpy(), k.var[rows].numpy(), k.var[cols].numpy(), sup_r, sup_c, k.g, k.etf_diag,
        k.etf_offdiag, k.mean_cos, k.etf_cos, rows.start, cols.start, k.best[rows].numpy(),
        k.best_idx[rows].numpy(), k.best[cols].numpy(), k.best_idx[cols].numpy(), torch.get_num_threads())


def _reduce_tile_triton(mt: torch.Tensor, rows: slice, cols: slice, k: _Context) -> dict:
    """The Triton tile kernel (ncfast.triton.pairwise): Gram block and reductions in one pass."""
    from .triton import pairwise as triton_pairwise

    sup_r = sup_c = None
    if k.sup is not None:
        sup_r, sup_c = k.sup[rows], k.sup[cols]
    best_r, idx_r = k.best[rows], k.best_idx[rows]
    best_c, idx_c = k.best[cols], k.best_idx[cols]
    out = triton_pairwise.reduce_pair_tile(
        mt[rows], mt[cols], rows.start == cols.start, k.sq[rows], k.sq[cols], k.norms[rows], k.norms[cols],
        k.var[rows], k.var[cols], sup_r, sup_c, k.g, k.etf_diag, k.etf_offdiag, k.mean_cos, k.etf_cos,
        rows.start, cols.start, best_r, idx_r, best_c, idx_c)
    # slices of a 1-D tensor are views: the kernel's in-place updates already reached k.best
    return out


def _reduce_tile_torch(gram: torch.Tensor, rows: slice, cols: slice, k: _Context) -> dict:
    """The same sums with torch operations, for devices without the C++ core."""
    diagonal = rows.start == cols.start
    # Pairs i < j: a whole off-diagonal tile, the strict upper triangle of a diagonal one.
    sel = torch.ones_like(gram, dtype=torch.bool).triu_(1) if diagonal else None

    def total(t):
        return float(t[sel].sum()) if diagonal else float(t.sum())

    out = {}
    r = gram / k.g
    out["resid"] = float((r.diagonal() - k.etf_diag).square().sum()) if diagonal else 0.0
    out["resid"] += 2.0 * total(r.sub_(k.etf_offdiag).square_())
    del r
    cos = gram / k.norms[rows].unsqueeze(1)
    cos /= k.norms[cols].unsqueeze(0)
    out["cos_dev"] = 2.0 * total((cos - k.mean_cos).square_())
    out["coh"] = 2.0 * total((cos + k.etf_cos).abs_())
    del cos
    d2 = gram.mul_(-2.0).add_(k.sq[rows].unsqueeze(1)).add_(k.sq[cols].unsqueeze(0)).clamp_min_(0.0)
    vsum = k.var[rows].unsqueeze(1) + k.var[cols].unsqueeze(0)
    ratio = vsum / (2.0 * d2)
    ratio = ratio[sel] if diagonal else ratio.reshape(-1)
    out["cdnv"] = (0, 0.0, 0.0)
    if ratio.numel():
        m = ratio.mean()
        out["cdnv"] = (ratio.numel(), float(m), float((ratio - m).square().sum()))
    dist = vsum.add_(d2)
    out["dist"] = total(dist)
    out["msdr_sum"], out["msdr_n"] = 0.0, 0
    if k.sup is not None:
        same = k.sup[rows].unsqueeze(1) == k.sup[cols].unsqueeze(0)
        if diagonal:
            same &= sel
        out["msdr_sum"] = 2.0 * float(dist[same].sum())
        out["msdr_n"] = 2 * int(same.sum())
    if diagonal:
        d2.fill_diagonal_(float("inf"))
    views = ((d2, rows, cols),) if diagonal else ((d2, rows, cols), (d2.T, cols, rows))
    for dist2, own, other in views:
        val, arg = dist2.min(dim=1)
        better = val < k.best[own]
        k.best[own] = torch.where(better, val, k.best[own])
        k.best_idx[own] = torch.where(better, arg + other.start, k.best_idx[own])
    return out


# (tile side, D, threads) -> whether the C++ Gram engine formed a tile faster than torch.mm (BLAS)
# when this process first timed both: on a Zen 5 the engine won, on a Xeon MKL's dgemm does
# (163 against 131 GFLOP/s at 1008 x 1008 x 512).
_ENGINE_FASTER: dict[tuple[int, int, int], bool] = {}

# Below this many tiles the product is not timed (the engine is used): the probe would cost more
# than it could save.
PROBE_MIN_TILES = 6


def _engine_faster(mt: torch.Tensor, side: int) -> bool:
    """Time one side x side x D tile product through the C++ Gram engine and through torch.mm, once
    per process and shape, and remember which was faster (both give the same float64 products up
    to rounding, and the reducer after them is the same)."""
    key = (side, mt.shape[1], torch.get_num_threads())
    if key not in _ENGINE_FASTER:
        a, b = mt[:side], mt[-side:]
        out = torch.empty(side, side, dtype=torch.float64)
        best = {}
        for name, fn in (("engine", lambda: _C.gram_nt(a.numpy(), b.numpy(), out.numpy(), torch.get_num_threads())),
                         ("blas", lambda: torch.mm(a, b.T, out=out))):
            fn()  # warm: pages, code, BLAS threads
            t0 = time.perf_counter()
            fn()
            best[name] = time.perf_counter() - t0
        _ENGINE_FASTER[key] = best["engine"] <= best["blas"]
    return _ENGINE_FASTER[key]


def _tile_reducer(mt: torch.Tensor, c: int, tile: int, k: _Context):
    """(rows, cols) -> the tile's sums, for mt's backend: Triton forms the Gram block in the kernel;
    the C++ reducer takes it from the C++ Gram engine or from torch.mm (BLAS), whichever formed a
    tile faster on this machine (_engine_faster; BLAS without AVX-512); the torch reducer from
    torch.mm."""
    backend = _dispatch.backend_for(mt)
    if backend == "triton":
        return lambda rows, cols: _reduce_tile_triton(mt, rows, cols, k)
    if backend != "cpp":
        return lambda rows, cols: _reduce_tile_torch(mt[rows] @ mt[cols].T, rows, cols, k)
    mt = mt.contiguous()
    tiles = -(-c // tile) * (-(-c // tile) + 1) // 2
    blas = not _C.gram_available() or (tiles >= PROBE_MIN_TILES and not _engine_faster(mt, min(tile, c)))
    buf = torch.empty(min(tile, c) ** 2, dtype=torch.float64)  # one tile's Gram block, reused

    def reduce(rows, cols):
        gram = buf[: (rows.stop - rows.start) * (cols.stop - cols.start)].view(rows.stop - rows.start, -1)
        if blas:
            torch.mm(mt[rows], mt[cols].T, out=gram)
        else:
            _C.gram_nt(mt[rows].numpy(), mt[cols].numpy(), gram.numpy(), torch.get_num_threads())
        return _reduce_tile_cpp(gram, rows, cols, k)

    return reduce


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
    device = mt.device
    # ||G||_F = ||Mt Mt^T||_F = ||Mt^T Mt||_F: the smaller Gram gives it before the tile pass, so
    # the exact nc2 residual is summed in the same pass.
    small = mt @ mt.T if c <= mt.shape[1] else mt.T @ mt
    g = float(torch.linalg.norm(small))
    del small
    sq = mt.square().sum(1)
    norms = sq.sqrt()
    unit_sum = mt.T @ (1.0 / norms)  # sum_i u_i without a C x D temporary
    inv_sqrt = 1.0 / math.sqrt(c - 1)
    ctx = _Context(
        sq=sq, norms=norms, var=moments.variances[p], sup=None if superclass is None else superclass[p],
        g=g, etf_diag=(1.0 - 1.0 / c) * inv_sqrt, etf_offdiag=-inv_sqrt / c,
        mean_cos=(float(unit_sum.square().sum()) - c) / (c * (c - 1)), etf_cos=1.0 / (c - 1),
        best=torch.full((c,), float("inf"), dtype=torch.float64, device=device),
        best_idx=torch.full((c,), -1, dtype=torch.int64, device=device),
    )
    tile_sums = _tile_reducer(mt, c, tile, ctx)
    cdnv_acc = (0, 0.0, 0.0)
    resid = cos_dev = coh = dist_sum = msdr_sum = 0.0
    msdr_n = 0
    for rows, cols in _tiles(c, tile):
        sums = tile_sums(rows, cols)
        resid += sums["resid"]
        cos_dev += sums["cos_dev"]
        coh += sums["coh"]
        dist_sum += sums["dist"]
        msdr_sum += sums["msdr_sum"]
        msdr_n += sums["msdr_n"]
        cdnv_acc = _chan(cdnv_acc, sums["cdnv"])
    v, best, best_idx, sup = ctx.var, ctx.best, ctx.best_idx, ctx.sup

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
