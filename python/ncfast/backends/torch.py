"""The PyTorch backend: every kernel as torch operations, for any device.

It is also the toolbox the other backends share: block-wise float64 centring with a Gram
accumulator (``blockwise_scatters``, ``Gram``) and the GEMM-block NCC sweep (``gemm_sweep``, which
the C++ backend uses without AVX-512 for many classes).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from scipy.linalg import blas as scipy_blas

from .. import _numerics
from .._linalg import blas_threads
from .._validation import NON_FINITE
from .base import BlockMoments, PairContext, PairSums, Sweep, ncc_block_rows

BLOCK_BYTES = 64 << 20
"""Bytes of one float64 block of centred rows (the D x D scatter and the torch moments go block
by block)."""
DEFAULT_TILE = 1008
"""Classes per tile side of the pairwise pass: an 8 MB float64 tile of G (the torch reducer adds
a few temporaries); a multiple of the C++ Gram engine's 12 x 16 register tile, so it writes the
tile in place."""


def rows_per_block(d: int) -> int:
    """Rows of a BLOCK_BYTES float64 block of d features."""
    return max(1, BLOCK_BYTES // (8 * d))


def row_blocks(x: torch.Tensor, y: torch.Tensor, rows: int):
    """(x, y) in consecutive blocks of ``rows`` rows."""
    return ((x[lo : lo + rows], y[lo : lo + rows]) for lo in range(0, x.shape[0], rows))


SYRK_MIN_FLOPS = 1 << 27
"""Smallest block product (rows x D^2) that the CPU Gram sends to scipy's dsyrk; smaller ones go
through torch.mm. dsyrk does half a GEMM's flops, but scipy's OpenBLAS keeps its threads spinning
for milliseconds after a call, and on 2 cores the torch operations that follow (in a LayerProbe,
the next batch's small ones) ran 10-50x slower meanwhile (a 128 x 128 triu took 3-8 ms, not 0.01)."""


def _mirror_upper(g: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix of g's upper triangle (what a Gram accumulator keeps exact)."""
    return g.triu() + g.triu(1).T


class Gram:
    """Accumulates sum of a^T a (D x D) over float64 blocks a.

    On CPU the larger blocks go through BLAS dsyrk into one triangle of a Fortran-ordered
    accumulator (half the flops of a GEMM), mirrored once at the end; the small ones through
    torch.mm (``SYRK_MIN_FLOPS``).
    """

    def __init__(self, d: int, device: torch.device):
        self.cpu = device.type == "cpu"
        self.acc = np.zeros((d, d), order="F") if self.cpu else torch.zeros(d, d, dtype=torch.float64, device=device)

    def add(self, a: torch.Tensor) -> None:
        if not self.cpu:
            self.acc += a.T @ a
        elif a.shape[0] * a.shape[1] ** 2 >= SYRK_MIN_FLOPS:
            with blas_threads(torch.get_num_threads()):
                self.acc = scipy_blas.dsyrk(1.0, a.numpy().T, beta=1.0, c=self.acc, trans=0, lower=0, overwrite_c=1)
        else:
            self.acc += (a.T @ a).numpy()  # the full product: total() reads its upper triangle

    def total(self) -> torch.Tensor:
        if isinstance(self.acc, torch.Tensor):  # on a GPU
            return self.acc
        return _mirror_upper(torch.from_numpy(np.ascontiguousarray(self.acc)))


def blockwise_scatters(x: torch.Tensor, y: torch.Tensor, means: torch.Tensor, scales: list, centre) -> list:
    """``Backend.centred_scatters`` a block of rows at a time: ``centre(xb, yb, out)`` writes the
    float64 rows xb - means[yb] into ``out`` (a reused buffer) and returns them; each scatter adds
    their scaled Gram matrix."""
    d = x.shape[1]
    rows = rows_per_block(d)
    if means.device.type == "cpu" and x.shape[0] <= rows and x.shape[0] * d * d < SYRK_MIN_FLOPS:
        # one small block (a LayerProbe batch of a narrow layer): what Gram forms from it, the
        # product's upper triangle mirrored, without its accumulators
        centred = centre(x, y, torch.empty(x.shape[0], d, dtype=torch.float64, device=means.device))
        out = []
        for s in scales:
            a = centred if s is None else centred * s[y].unsqueeze(1)
            out.append(_mirror_upper(a.T @ a))
        return out
    grams = [Gram(d, means.device) for _ in scales]
    buf = torch.empty(min(rows, x.shape[0]), d, dtype=torch.float64, device=means.device)
    for xb, yb in row_blocks(x, y, rows):
        centred = centre(xb, yb, buf[: xb.shape[0]])
        # the unscaled scatters first, so that the last scaled one may scale the rows in place
        order = sorted(range(len(scales)), key=lambda i: scales[i] is not None)
        for pos, i in enumerate(order):
            s = scales[i]
            if s is None:
                grams[i].add(centred)
            elif pos == len(order) - 1:
                grams[i].add(centred.mul_(s[yb].unsqueeze(1)))
            else:
                grams[i].add(centred * s[yb].unsqueeze(1))
    return [g.total() for g in grams]


@contextlib.contextmanager
def full_fp32():
    """Keep TF32 off on CUDA: the sweep's error bound is for true float32 products."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def gemm_sweep(
    x: torch.Tensor, shift: torch.Tensor, centres: torch.Tensor, offsets: torch.Tensor, starts, cmax, omax
) -> Sweep:
    """``Backend.ncc_sweep`` in float32 from GEMM blocks: each group's scores for a block of rows as
    one addmm, never the whole N x K matrix. The rows are shifted with one rounding of the exact
    difference (also for float64 input), as the bound assumes."""
    n, d = x.shape
    groups = len(starts) - 1
    best = torch.zeros(n, groups, dtype=torch.int64, device=x.device)
    unsure = torch.zeros(n, groups, dtype=torch.bool, device=x.device)
    rel = _numerics.rel_float(_numerics.U32, d)
    rows = ncc_block_rows(x, max(b - a for a, b in zip(starts, starts[1:])))
    shift64 = shift.to(torch.float64)
    for g in range(groups):
        lo_c, hi_c = starts[g], starts[g + 1]
        if hi_c - lo_c == 1:  # one class: always the argmin
            continue
        c32, o32 = centres[lo_c:hi_c], offsets[lo_c:hi_c]
        for lo in range(0, n, rows):
            block = x[lo : lo + rows]
            xb = (block - shift64).to(torch.float32) if x.dtype == torch.float64 else block.to(torch.float32) - shift
            with full_fp32():
                scores = torch.addmm(o32, xb, c32.T)
            top, b1, b2 = _numerics.top2(scores)
            best[lo : lo + rows, g] = top
            # a float64 row beyond float32's range has an inf norm (unsure); the underflow floor
            # covers its elements below the normal range
            omax_g = omax[g] + _numerics.underflow_floor(_numerics.TINY32, d, cmax[g]) / rel
            magnitude = torch.linalg.vector_norm(xb, dim=1, dtype=torch.float64) * cmax[g] + omax_g
            unsure[lo : lo + rows, g] = ~_numerics.certain(
                b1.double(), b2.double(), magnitude, rel, _numerics.SCORE_RANGE32
            )
    return Sweep(best, unsure)


def block_moments_of(x: torch.Tensor, y: torch.Tensor, num_classes: int, unit_sums: bool) -> BlockMoments:
    """Per-class moments of one block in float64 torch operations (two passes: means, then M2)."""
    x = x.to(torch.float64)
    d = x.shape[1]
    counts = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=x.device).index_add_(0, y, x)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    centred = x - means[y]
    m2 = torch.zeros(num_classes, dtype=torch.float64, device=x.device).index_add_(0, y, centred.square().sum(1))
    if not unit_sums:
        return BlockMoments(counts, means, m2, None, None)
    norms = x.norm(dim=1)
    unit = x / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(1)
    return BlockMoments(
        counts, means, m2, torch.zeros_like(sums).index_add_(0, y, unit), torch.zeros_like(m2).index_add_(0, y, norms)
    )


def _n_mean_m2(values: torch.Tensor, sel: torch.Tensor | None) -> tuple:
    """(n, mean, M2) of the tile's pair values: those under sel, or all where sel is None."""
    values = values[sel] if sel is not None else values.reshape(-1)
    if not values.numel():
        return 0, 0.0, 0.0
    m = values.mean()
    return values.numel(), float(m), float((values - m).square().sum())


def reduce_tile(gram: torch.Tensor, rows: slice, cols: slice, k: PairContext) -> PairSums:
    """The PairSums of one tile from its Gram block G[rows, cols] (overwritten), in torch operations."""
    diagonal = rows.start == cols.start
    # Pairs i < j: a whole off-diagonal tile, the strict upper triangle of a diagonal one.
    sel = torch.ones_like(gram, dtype=torch.bool).triu_(1) if diagonal else None

    def total(t):
        return float(t[sel].sum()) if diagonal else float(t.sum())

    out = PairSums()
    r = gram / k.g
    out.resid = float((r.diagonal() - k.etf_diag).square().sum()) if diagonal else 0.0
    out.resid += 2.0 * total(r.sub_(k.etf_offdiag).square_())
    del r
    cos = gram / k.norms[rows].unsqueeze(1)
    cos /= k.norms[cols].unsqueeze(0)
    out.cos_dev = 2.0 * total((cos - k.mean_cos).square_())
    out.coh = 2.0 * total((cos + k.etf_cos).abs_())
    # log(1 / ||u_i - u_j||) with ||u_i - u_j||^2 = 2 - 2 cos_ij (+inf at or below unif_floor)
    u2 = cos.mul_(-2.0).add_(2.0)
    out.unif = _n_mean_m2(u2.masked_fill_(u2 <= k.unif_floor, 0.0).log_().mul_(-0.5), sel)
    del cos
    d2 = gram.mul_(-2.0).add_(k.sq[rows].unsqueeze(1)).add_(k.sq[cols].unsqueeze(0)).clamp_min_(0.0)
    vsum = k.var[rows].unsqueeze(1) + k.var[cols].unsqueeze(0)
    p = k.cdnv_exponent
    ratio = vsum / (2.0 * (d2 if p == 1.0 else d2.pow(p)))
    out.cdnv = _n_mean_m2(ratio, sel)
    # each pair's ratio counts for both its classes
    pair_ratio = torch.where(sel, ratio, 0.0) if sel is not None else ratio
    assert k.ratio_sum is not None  # PairContext.__post_init__ makes it
    k.ratio_sum[rows] += pair_ratio.sum(1)
    k.ratio_sum[cols] += pair_ratio.sum(0)
    del ratio, pair_ratio
    dist = vsum.add_(d2)
    out.dist = total(dist)
    if k.sup is not None:
        same = k.sup[rows].unsqueeze(1) == k.sup[cols].unsqueeze(0)
        if sel is not None:
            same &= sel
        out.msdr_sum = 2.0 * float(dist[same].sum())
        out.msdr_n = 2 * int(same.sum())
    if diagonal:
        d2.fill_diagonal_(float("inf"))
    views = ((d2, rows, cols),) if diagonal else ((d2, rows, cols), (d2.T, cols, rows))
    for dist2, own, other in views:
        val, arg = dist2.min(dim=1)
        better = val < k.best[own]
        k.best[own] = torch.where(better, val, k.best[own])
        k.best_idx[own] = torch.where(better, arg + other.start, k.best_idx[own])
    return out


class TorchBackend:
    """Every kernel as torch operations (float64 where the definitions are evaluated)."""

    name = "torch"
    checks_labels = False
    pair_tile = DEFAULT_TILE

    def block_moments(self, x, y, num_classes, *, unit_sums, check_finite):
        # the rows are widened to float64, so a block at a time, merged by Chan's formula
        part = None
        for xb, yb in row_blocks(x, y, rows_per_block(x.shape[1])):
            block = block_moments_of(xb, yb, num_classes, unit_sums)
            part = block if part is None else part.merge(block)
        if part is None:
            part = block_moments_of(x, y, num_classes, unit_sums)
        if check_finite and not bool(torch.isfinite(part.m2).all()):
            raise ValueError(NON_FINITE)
        return part

    def merge_into(self, state, part, delta):
        return None  # the caller merges out of place

    def centred_scatters(self, x, y, means, scales):
        return blockwise_scatters(
            x, y, means, scales, lambda xb, yb, out: torch.sub(xb.to(torch.float64), means[yb], out=out)
        )

    def sym_gram(self, a):
        return a.T @ a

    def ncc_sweep(self, x, shift, centres, offsets, starts, cmax, omax, precision):
        if precision != "fp32":
            raise ValueError(f"precision: the torch backend sweeps in 'fp32' only, got {precision!r}")
        return gemm_sweep(x, shift, centres, offsets, starts, cmax, omax)

    def fast_precisions(self, classes):
        return ()

    def probe_rows(self):
        return 0

    def warm_up(self, x, sweep):
        pass

    def synchronize(self, x):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    def pair_reducer(self, mt, tile, ctx):
        return lambda rows, cols: [reduce_tile(mt[rows] @ mt[cols].T, rows, cols, ctx)]
