"""One tile of class pairs: its block of G = Mt Mt^T computed and reduced in one kernel.

For rows I and columns J of the centred class means Mt (float64), with G_ij = Mt_i . Mt_j,
cos_ij = G_ij / (||Mt_i|| ||Mt_j||), d2_ij = max(||Mt_i||^2 + ||Mt_j||^2 - 2 G_ij, 0) and
v the within-class variances, the tile's sums over unordered pairs i < j (all of I x J off the
diagonal; the strict upper triangle on a diagonal tile, where I = J) are, as in csrc/pairwise.cpp,

    resid    = sum_{i in I} (G_ii / g - etf_diag)^2  [diagonal tile only]  + 2 sum (G_ij / g - etf_offdiag)^2
    cos_dev  = 2 sum (cos_ij - mean_cos)^2          coh = 2 sum |cos_ij + etf_cos|
    dist     = sum (d2_ij + v_i + v_j)              msdr_sum, msdr_n = 2 x (sum, count) over s(i) = s(j)
    cdnv     = (n, mean, M2) of the ratios (v_i + v_j) / (2 d2_ij^p)
    unif     = (n, mean, M2) of log(1 / ||u_i - u_j||) = -log(2 - 2 cos_ij) / 2, +inf where
               2 - 2 cos_ij <= unif_floor (the two directions equal to rounding)

the per-class sums of the ratios (each pair's ratio added to its row's and its column's class),
and the nearest other class of every row and of every column by d2 (on a diagonal tile the
sub-tiles below the diagonal are skipped, their minima given by their mirror images' columns).
For p != 1, d2^p is exp(p log d2): a relative error of about |p log d2| eps beyond the division's.

``_pair_tile_kernel`` gives each (BLOCK_I, BLOCK_J) sub-tile to one program: a K-loop of float64
``tl.dot`` over BLOCK_D features (or, on a GPU whose Triton compiles no float64 dot, broadcast
float64 products; see ``_launch``) builds the sub-tile of G in registers, which is reduced on the
spot to the program's partial sums, its CDNV (n, mean, M2) (two passes over the in-register
ratios), its uniformity (n, mean, M2) likewise, its row and column sums of the ratios, and its row
and column minima (lowest index on ties). The launcher returns the partials for the caller
(``ncfast.backends.triton``) to combine in a fixed order, so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PARAMS = ("g", "etf_diag", "etf_offdiag", "mean_cos", "etf_cos", "cdnv_exponent", "unif_floor")
"""The float64 scalars of the params tensor, in the order the kernel loads them: the order of
``ncfast.backends.base.PAIR_PARAMS`` (``PairContext.params``)."""
COLUMNS = ("resid", "cos_dev", "coh", "dist", "msdr_sum", "cdnv_mean", "cdnv_m2", "unif_mean", "unif_m2")
"""Columns of the per-program float64 partials: PairSums fields, and (name_mean, name_m2) of its
(n, mean, M2) fields (``backends.triton.tile_sums``)."""
COUNTS = ("msdr_n", "pairs")
"""Columns of the per-program int64 partials: PairSums fields, and the program's number of pairs
(the n of every (n, mean, M2) field)."""
INPUTS = ("sq", "norms", "var")
"""The float64 per-class vectors (``PairVectors`` fields) the kernel reads, in its argument order,
each for the rows then the columns; the int64 super-classes follow."""
_SUMS = len(COLUMNS)


@triton.jit
def _pair_tile_kernel(
    sums_ptr,
    stride_sp,
    stride_sq,  # (P, 9) float64 out: resid, cos_dev, coh, dist, msdr_sum, cdnv mean, cdnv M2,
    # uniformity mean, uniformity M2
    counts_ptr,
    stride_cp,
    stride_cq,  # (P, 2) int64 out: msdr_n, pairs (the n of the CDNV and uniformity moments)
    rbest_ptr,
    stride_rb_b,
    stride_rb_i,  # (J blocks, t1) float64 out: row minima of d2 over the program's columns
    ridx_ptr,
    stride_ri_b,
    stride_ri_i,  # (J blocks, t1) int64 out: their column (within the tile)
    cbest_ptr,
    stride_cb_b,
    stride_cb_j,  # (I blocks, t2) float64 out: column minima (off-diagonal tiles)
    cidx_ptr,
    stride_ci_b,
    stride_ci_j,  # (I blocks, t2) int64 out: their row (within the tile)
    rsum_ptr,
    stride_rs_b,
    stride_rs_i,  # (J blocks, t1) float64 out: row sums of the CDNV ratios
    csum_ptr,
    stride_cs_b,
    stride_cs_j,  # (I blocks, t2) float64 out: column sums of the CDNV ratios
    a_ptr,
    stride_am,
    stride_ad,  # (t1, D) float64: Mt rows of I
    b_ptr,
    stride_bm,
    stride_bd,  # (t2, D) float64: Mt rows of J
    sq_r_ptr,
    sq_c_ptr,  # (t1,), (t2,) float64: ||Mt_i||^2
    norm_r_ptr,
    norm_c_ptr,  # ||Mt_i||
    var_r_ptr,
    var_c_ptr,  # v_i
    sup_r_ptr,
    sup_c_ptr,  # (t1,), (t2,) int64 super-classes, read only when HAS_SUP
    params_ptr,  # (7,) float64 in PARAMS order: g, etf_diag, etf_offdiag, mean_cos, etf_cos, p, unif_floor
    # (float64: a Python float would arrive as float32)
    t1,
    t2,
    d,
    DIAGONAL: tl.constexpr,  # I = J: pairs j > i only, G_ii enters resid once
    HAS_SUP: tl.constexpr,
    UNIT_P: tl.constexpr,  # p = 1: the plain division
    F64_DOT: tl.constexpr,  # float64 tl.dot; else broadcast products summed over BLOCK_D (plain FMAs)
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    prog = pid_i.to(tl.int64) * tl.num_programs(1) + pid_j
    ii = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    jj = pid_j.to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    imask = ii < t1
    jmask = jj < t2

    # On a diagonal tile the sub-tiles below the diagonal hold no pair i < j: they form no Gram
    # block (their loop is empty), and every minimum they would give comes from their mirror
    # image's column minima instead.
    if DIAGONAL:
        d_end = tl.where(pid_j < pid_i, 0, d)
    else:
        d_end = d
    gram = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float64)
    for d0 in range(0, d_end, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        cmask = cols < d
        a = tl.load(
            a_ptr + ii[:, None] * stride_am + cols[None, :] * stride_ad, mask=imask[:, None] & cmask[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + jj[None, :] * stride_bm + cols[:, None] * stride_bd, mask=cmask[:, None] & jmask[None, :], other=0.0
        )
        if F64_DOT:
            gram = tl.dot(a, b, gram, input_precision="ieee", out_dtype=tl.float64)
        else:
            gram += tl.sum(a[:, :, None] * b[None, :, :], axis=1)

    g = tl.load(params_ptr + 0)
    etf_diag = tl.load(params_ptr + 1)
    etf_offdiag = tl.load(params_ptr + 2)
    mean_cos = tl.load(params_ptr + 3)
    etf_cos = tl.load(params_ptr + 4)
    p = tl.load(params_ptr + 5)
    unif_floor = tl.load(params_ptr + 6)
    sq_i = tl.load(sq_r_ptr + ii, mask=imask, other=0.0)
    sq_j = tl.load(sq_c_ptr + jj, mask=jmask, other=0.0)
    norm_i = tl.load(norm_r_ptr + ii, mask=imask, other=1.0)
    norm_j = tl.load(norm_c_ptr + jj, mask=jmask, other=1.0)
    var_i = tl.load(var_r_ptr + ii, mask=imask, other=0.0)
    var_j = tl.load(var_c_ptr + jj, mask=jmask, other=0.0)

    inside = imask[:, None] & jmask[None, :]
    if DIAGONAL:
        pair = inside & (jj[None, :] > ii[:, None])
        other = inside & (jj[None, :] != ii[:, None]) & (pid_j >= pid_i)  # candidates for the nearest other class
    else:
        pair = inside
        other = inside

    r = gram / g - etf_offdiag
    resid = 2.0 * tl.sum(tl.sum(tl.where(pair, r * r, 0.0), axis=1), axis=0)
    if DIAGONAL:
        rd = gram / g - etf_diag
        eye = inside & (jj[None, :] == ii[:, None])
        resid += tl.sum(tl.sum(tl.where(eye, rd * rd, 0.0), axis=1), axis=0)
    cs = gram / (norm_i[:, None] * norm_j[None, :])
    cos_dev = 2.0 * tl.sum(tl.sum(tl.where(pair, (cs - mean_cos) * (cs - mean_cos), 0.0), axis=1), axis=0)
    coh = 2.0 * tl.sum(tl.sum(tl.where(pair, tl.abs(cs + etf_cos), 0.0), axis=1), axis=0)
    u2 = 2.0 - 2.0 * cs  # ||u_i - u_j||^2; at or below unif_floor u_i = u_j to rounding: a +inf term
    lg = -0.5 * tl.log(tl.where(u2 <= unif_floor, 0.0, u2))
    d2 = tl.maximum(sq_i[:, None] + sq_j[None, :] - 2.0 * gram, 0.0)
    vs = var_i[:, None] + var_j[None, :]
    dist = tl.sum(tl.sum(tl.where(pair, d2 + vs, 0.0), axis=1), axis=0)

    # CDNV ratios: the program's mean first, then squares about it (no E[r^2] - E[r]^2).
    den = tl.where(pair, d2, 1.0)  # padding lanes stay finite; a real d2 = 0 gives inf, as in C++
    if not UNIT_P:
        den = tl.exp(p * tl.log(den))
    ratio = vs / (2.0 * den)
    cnt = tl.sum(tl.sum(pair.to(tl.int64), axis=1), axis=0)
    pair_ratio = tl.where(pair, ratio, 0.0)
    row_ratio = tl.sum(pair_ratio, axis=1)
    col_ratio = tl.sum(pair_ratio, axis=0)
    rmean = tl.sum(row_ratio, axis=0) / tl.maximum(cnt, 1).to(tl.float64)
    rdev = ratio - rmean
    rm2 = tl.sum(tl.sum(tl.where(pair, rdev * rdev, 0.0), axis=1), axis=0)
    tl.store(rsum_ptr + pid_j * stride_rs_b + ii * stride_rs_i, row_ratio, mask=imask)
    tl.store(csum_ptr + pid_i * stride_cs_b + jj * stride_cs_j, col_ratio, mask=jmask)
    umean = tl.sum(tl.sum(tl.where(pair, lg, 0.0), axis=1), axis=0) / tl.maximum(cnt, 1).to(tl.float64)
    udev = lg - umean
    um2 = tl.sum(tl.sum(tl.where(pair, udev * udev, 0.0), axis=1), axis=0)

    msdr_sum = tl.full([], 0.0, tl.float64)
    msdr_n = tl.full([], 0, tl.int64)
    if HAS_SUP:
        sup_i = tl.load(sup_r_ptr + ii, mask=imask, other=-1)
        sup_j = tl.load(sup_c_ptr + jj, mask=jmask, other=-1)
        same = pair & (sup_i[:, None] == sup_j[None, :])
        msdr_sum = 2.0 * tl.sum(tl.sum(tl.where(same, d2 + vs, 0.0), axis=1), axis=0)
        msdr_n = 2 * tl.sum(tl.sum(same.to(tl.int64), axis=1), axis=0)

    sums = sums_ptr + prog * stride_sp
    tl.store(sums + 0 * stride_sq, resid)
    tl.store(sums + 1 * stride_sq, cos_dev)
    tl.store(sums + 2 * stride_sq, coh)
    tl.store(sums + 3 * stride_sq, dist)
    tl.store(sums + 4 * stride_sq, msdr_sum)
    tl.store(sums + 5 * stride_sq, rmean)
    tl.store(sums + 6 * stride_sq, rm2)
    tl.store(sums + 7 * stride_sq, umean)
    tl.store(sums + 8 * stride_sq, um2)
    tl.store(counts_ptr + prog * stride_cp, msdr_n)
    tl.store(counts_ptr + prog * stride_cp + stride_cq, cnt)

    # Nearest other class: the smallest d2, and among equal ones the lowest index.
    dm = tl.where(other, d2, float("inf"))
    rmin = tl.min(dm, axis=1)
    rarg = tl.min(tl.where(dm == rmin[:, None], jj[None, :], t2), axis=1)
    tl.store(rbest_ptr + pid_j * stride_rb_b + ii * stride_rb_i, rmin, mask=imask)
    tl.store(ridx_ptr + pid_j * stride_ri_b + ii * stride_ri_i, rarg, mask=imask)
    cmin = tl.min(dm, axis=0)
    carg = tl.min(tl.where(dm == cmin[None, :], ii[:, None], t1), axis=0)
    tl.store(cbest_ptr + pid_i * stride_cb_b + jj * stride_cb_j, cmin, mask=jmask)
    tl.store(cidx_ptr + pid_i * stride_ci_b + jj * stride_ci_j, carg, mask=jmask)


def _fold_minima(vals: torch.Tensor, idx: torch.Tensor, offset: int, best: torch.Tensor, best_idx: torch.Tensor):
    """Fold per-program minima (blocks, t) into the running best / best_idx in place: the lowest
    block wins among equal values (torch.min returns the first), then strictly smaller wins
    against the running value, so the lowest index stays on ties."""
    val, which = vals.min(dim=0)
    arg = idx.gather(0, which.unsqueeze(0)).squeeze(0) + offset
    better = val < best
    best.copy_(torch.where(better, val, best))
    best_idx.copy_(torch.where(better, arg, best_idx))


def _launch(grid, args, kwargs, block_d: int, f64_dot: bool):
    """The tile kernel with the Gram block from a float64 tl.dot, or (``f64_dot=False``, for a
    Triton that does not compile one) from broadcast products: the same float64 sums in another
    order, through a (BLOCK_I, BLOCK_D, BLOCK_J) temporary, so a short BLOCK_D. Which one a device
    takes is the backend's choice (``backends.triton``)."""
    if f64_dot:
        _pair_tile_kernel[grid](*args, **kwargs, F64_DOT=True, BLOCK_D=block_d)
    else:
        _pair_tile_kernel[grid](*args, **kwargs, F64_DOT=False, BLOCK_D=min(block_d, 8))


def reduce_pair_tile(
    mt_rows: torch.Tensor,
    mt_cols: torch.Tensor,
    vectors: tuple,
    params: torch.Tensor,
    *,
    block_i: int = 64,
    block_j: int = 64,
    block_d: int = 32,
    f64_dot: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce the tile of pairs (rows of mt_rows) x (rows of mt_cols), both (t, D) float64.

    ``vectors``: the per-class vectors of the tile's rows and columns, a
    ``backends.base.PairTileVectors`` (``tile_vectors``) on the tiles' device; the same start on
    both sides is a diagonal tile (the same classes, t1 = t2). ``params``: the float64 scalars in
    ``PARAMS`` order (``PairContext.params``) as a (7,) host tensor, copied to the device per launch.

    Returns the per-program partials (sums (P, 9) float64, in the columns ``COLUMNS`` names: the
    additive sums, and the program's (mean, M2) of the CDNV ratios and of the uniformity terms;
    counts (P, 2) int64 in the columns ``COUNTS`` names: msdr_n and the program's number of pairs),
    for the caller to combine in program order, and updates in place the running nearest class of
    the rows (best / best_idx of ``vectors.rows``, global column index) and, off the diagonal, of
    the columns (global row index), and adds each pair's CDNV ratio to the ratio_sum of its row's
    and of its column's class. ``f64_dot``: the Gram block from a float64 tl.dot (True) or from
    broadcast products (``_launch``).
    """
    rows, cols = vectors
    t1, d = mt_rows.shape
    t2 = mt_cols.shape[0]
    if mt_cols.shape[1] != d:
        raise ValueError(f"mt_cols: expected {d} columns, got {mt_cols.shape[1]}")
    diagonal = rows.start == cols.start
    if diagonal and t1 != t2:
        raise ValueError(f"diagonal tile: expected t1 == t2, got {t1} and {t2}")
    for side, t in ((rows, t1), (cols, t2)):
        for name, v in zip(side._fields[1:], side[1:]):
            if v is not None and tuple(v.shape) != (t,):
                raise ValueError(
                    f"vectors.{'rows' if side is rows else 'cols'}.{name}: expected shape ({t},), got {tuple(v.shape)}"
                )
    if (rows.sup is None) != (cols.sup is None):
        raise ValueError("vectors: sup given for one side of the tile only")
    if params.dtype != torch.float64 or tuple(params.shape) != (len(PARAMS),) or params.device.type != "cpu":
        raise ValueError(
            f"params: expected a ({len(PARAMS)},) float64 CPU tensor in the order {PARAMS}, got "
            f"{tuple(params.shape)} {params.dtype} on {params.device}"
        )
    dev = mt_rows.device
    f64 = dict(dtype=torch.float64, device=dev)
    a = mt_rows.to(**f64)
    b = mt_cols.to(**f64)
    # the kernel's per-class inputs, rows' then columns' of each (sq_r, sq_c, norm_r, ...)
    vec = [getattr(side, name).to(**f64).contiguous() for name in INPUTS for side in (rows, cols)]
    has_sup = rows.sup is not None
    sups = [s.sup.to(device=dev, dtype=torch.int64).contiguous() for s in (rows, cols)] if has_sup else [vec[0], vec[0]]
    unit_p = float(params[PARAMS.index("cdnv_exponent")]) == 1.0
    params = params.to(dev)
    block_i = max(16, min(block_i, triton.next_power_of_2(max(t1, 1))))
    block_j = max(16, min(block_j, triton.next_power_of_2(max(t2, 1))))
    block_d = max(16, min(block_d, triton.next_power_of_2(max(d, 1))))
    grid = (triton.cdiv(t1, block_i), triton.cdiv(t2, block_j))
    progs = grid[0] * grid[1]
    sums = torch.empty(progs, _SUMS, **f64)
    counts = torch.empty(progs, len(COUNTS), dtype=torch.int64, device=dev)
    rbest = torch.empty(grid[1], t1, **f64)
    ridx = torch.empty(grid[1], t1, dtype=torch.int64, device=dev)
    cbest = torch.empty(grid[0], t2, **f64)
    cidx = torch.empty(grid[0], t2, dtype=torch.int64, device=dev)
    rsum = torch.empty(grid[1], t1, **f64)
    csum = torch.empty(grid[0], t2, **f64)
    if progs:
        args = (
            sums,
            sums.stride(0),
            sums.stride(1),
            counts,
            counts.stride(0),
            counts.stride(1),
            rbest,
            rbest.stride(0),
            rbest.stride(1),
            ridx,
            ridx.stride(0),
            ridx.stride(1),
            cbest,
            cbest.stride(0),
            cbest.stride(1),
            cidx,
            cidx.stride(0),
            cidx.stride(1),
            rsum,
            rsum.stride(0),
            rsum.stride(1),
            csum,
            csum.stride(0),
            csum.stride(1),
            a,
            a.stride(0),
            a.stride(1),
            b,
            b.stride(0),
            b.stride(1),
            *vec,
            *sups,
            params,
            t1,
            t2,
            d,
        )
        kwargs = dict(
            DIAGONAL=diagonal, HAS_SUP=has_sup, UNIT_P=unit_p, BLOCK_I=block_i, BLOCK_J=block_j, num_warps=8
        )  # a 64 x 64 float64 tile and its temporaries: spread over 256 threads
        _launch(grid, args, kwargs, block_d, f64_dot)
    if t1 and t2:
        if diagonal:
            # Column minima first: their candidates include every lower index of the tile, so an
            # equal value among the row minima (candidates from the same block on) keeps the lower.
            _fold_minima(cbest, cidx, rows.start, rows.best, rows.best_idx)
            _fold_minima(rbest, ridx, cols.start, rows.best, rows.best_idx)
        else:
            _fold_minima(rbest, ridx, cols.start, rows.best, rows.best_idx)
            _fold_minima(cbest, cidx, rows.start, cols.best, cols.best_idx)
        # rows, then columns: on a diagonal tile the two views are one tensor's
        rows.ratio_sum.add_(rsum.sum(0))
        cols.ratio_sum.add_(csum.sum(0))

    return sums, counts
