"""Per-class moments of a block of rows, and the centred rows of the within-class scatter.

For every class c of a block (x, y), in float64:

    counts[c]    = n_c
    means[c]     = mu_c = (1/n_c) sum_{y_i=c} h_i
    m2[c]        = sum_{y_i=c} ||h_i - mu_c||^2          (about the block's own class mean)
    unit_sums[c] = sum_{y_i=c} h_i / ||h_i||             (a zero row adds 0)
    norm_sums[c] = sum_{y_i=c} ||h_i||

Rows are sorted by label (a stable argsort of the labels as int32), and each class segment is
cut into chunks of at most BLOCK_R rows. ``_chunk_moments_kernel`` gives every chunk to one
program, which sweeps its rows' columns in blocks of BLOCK_D: each (BLOCK_R, BLOCK_D) tile is
loaded once, widened to float64 on load, and reduced in registers to the chunk's column means,
its M2 about those means (a two-pass form over the in-register tile, so nothing cancels however
far the data sit from the origin) and, when asked, its unit sums. Unit sums need each row's
norm first, so with ``unit_sums`` the program takes the norms in a first sweep of its rows; the
second sweep then finds them in L2 (at most 128 KiB of rows per chunk, ``_chunk_rows``), so the
features are read from device memory once either way. ``_merge_chunks_kernel`` then folds the
chunks of each class, in chunk order, with Chan's formula

    mu = mu_a + delta * n_b / n,   M2 = M2_a + M2_b + |delta|^2 n_a n_b / n,

so the result is deterministic (no floating-point atomics) and exact to float64 rounding when the
within-class spread is tiny next to the means.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def load_wide(ptrs, mask, BF16_BITS: tl.constexpr):
    """A masked load, bfloat16 given as its int16 bits (BF16_BITS) widened to float32 by moving them
    to the top half of a float32 word: exact for every value, subnormals included. The interpreter's
    own bfloat16 -> float32 conversion rounds subnormals wrongly (1.5 x 2^-128 became 2^-127);
    on hardware both are one instruction. Other dtypes load as they are (0 where masked)."""
    if BF16_BITS:
        bits = tl.load(ptrs, mask=mask, other=0)
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


def as_loadable(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x or its int16 view, BF16_BITS) for kernels that read x through ``load_wide``."""
    return (x.view(torch.int16), True) if x.dtype == torch.bfloat16 else (x, False)


@triton.jit
def _chunk_moments_kernel(
    mean_ptr,
    stride_mean_k,
    stride_mean_d,  # (chunks, D) float64 out: the chunk's column means
    unit_ptr,
    stride_unit_k,
    stride_unit_d,  # (chunks, D) float64 out: sum of h_i / ||h_i|| (UNITS)
    m2_ptr,
    stride_m2_k,
    stride_m2_b,  # (chunks, column blocks) float64 out: centred squares of each block
    norm_sum_ptr,  # (chunks,) float64 out: sum of ||h_i|| (UNITS)
    x_ptr,
    stride_xm,
    stride_xd,  # (N, D) features, any float dtype and strides
    order_ptr,  # (N,) int64: row indices sorted by label
    start_ptr,  # (chunks,) int64: the chunk's first position in order
    count_ptr,  # (chunks,) int64: its number of rows (1 .. BLOCK_R)
    d,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNITS: tl.constexpr,  # also the unit sums and norm sums
    BF16_BITS: tl.constexpr,  # x holds bfloat16 as int16 bits (load_wide)
):
    chunk = tl.program_id(0).to(tl.int64)
    start = tl.load(start_ptr + chunk)
    count = tl.load(count_ptr + chunk)
    r = tl.arange(0, BLOCK_R)
    rmask = r < count
    rows = tl.load(order_ptr + start + r, mask=rmask, other=0)
    base = x_ptr + rows[:, None] * stride_xm
    if UNITS:
        sq = tl.zeros((BLOCK_R,), dtype=tl.float64)
        for d0 in range(0, d, BLOCK_D):
            cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            mask = rmask[:, None] & (cols < d)[None, :]
            # widen on load: half and bfloat16 arithmetic would round (and is wrong in the interpreter)
            h = load_wide(base + cols[None, :] * stride_xd, mask, BF16_BITS).to(tl.float64)
            sq += tl.sum(h * h, axis=1)
        # tl.sqrt is approximate only for float32; on float64 it is the correctly rounded sqrt.rn.f64
        norms = tl.sqrt(sq)
        inv = tl.where(norms > 0.0, 1.0 / tl.where(norms > 0.0, norms, 1.0), 0.0)
        tl.store(norm_sum_ptr + chunk, tl.sum(norms, axis=0))
    for d0 in range(0, d, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        cmask = cols < d
        mask = rmask[:, None] & cmask[None, :]
        h = load_wide(base + cols[None, :] * stride_xd, mask, BF16_BITS).to(tl.float64)
        mean = tl.sum(h, axis=0) / count.to(tl.float64)
        # second pass over the tile in registers: squares about the chunk's own mean, no cancellation
        dev = tl.where(mask, h - mean[None, :], 0.0)
        tl.store(mean_ptr + chunk * stride_mean_k + cols * stride_mean_d, mean, mask=cmask)
        tl.store(
            m2_ptr + chunk * stride_m2_k + (d0 // BLOCK_D) * stride_m2_b, tl.sum(tl.sum(dev * dev, axis=1), axis=0)
        )
        if UNITS:
            tl.store(
                unit_ptr + chunk * stride_unit_k + cols * stride_unit_d, tl.sum(h * inv[:, None], axis=0), mask=cmask
            )


@triton.jit
def _merge_chunks_kernel(
    mean_ptr,
    stride_mean_c,
    stride_mean_d,  # (C, D) float64 out: class means (0 for an absent class)
    unit_ptr,
    stride_unit_c,
    stride_unit_d,  # (C, D) float64 out: unit sums
    m2_ptr,
    stride_m2_c,
    stride_m2_b,  # (C, column blocks) float64 out: M2 restricted to the block
    norm_sum_ptr,  # (C,) float64 out
    cmean_ptr,
    stride_cmean_k,
    stride_cmean_d,  # the chunk partials of _chunk_moments_kernel
    cunit_ptr,
    stride_cunit_k,
    stride_cunit_d,
    cm2_ptr,
    stride_cm2_k,
    stride_cm2_b,
    cnorm_sum_ptr,
    count_ptr,  # (chunks,) int64 rows per chunk
    first_ptr,  # (S + 1,) int64: segment s (a class, or a run of one class's partials) owns first[s] .. first[s + 1]
    d,
    BLOCK_D: tl.constexpr,
    UNITS: tl.constexpr,  # also the unit sums and norm sums
):
    c = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    k0 = tl.load(first_ptr + c)
    k1 = tl.load(first_ptr + c + 1)
    n = tl.full([], 0.0, tl.float64)
    m2 = tl.full([], 0.0, tl.float64)
    norm_sum = tl.full([], 0.0, tl.float64)
    mean = tl.zeros((BLOCK_D,), dtype=tl.float64)
    unit = tl.zeros((BLOCK_D,), dtype=tl.float64)
    # Chunks in order, so the result does not depend on scheduling. M2 splits over columns
    # (|delta|^2 is a sum over them), so each column block merges its own share.
    for k in range(k0, k1):
        nb = tl.load(count_ptr + k).to(tl.float64)
        mb = tl.load(cmean_ptr + k * stride_cmean_k + cols * stride_cmean_d, mask=cmask, other=0.0)
        tot = n + nb
        delta = mb - mean
        # nb / tot is exactly 1 for the first chunk and n * nb / tot exactly 0: it is copied
        mean += delta * (nb / tot)
        m2 += tl.load(cm2_ptr + k * stride_cm2_k + blk * stride_cm2_b) + tl.sum(delta * delta, axis=0) * (n * nb / tot)
        n = tot
        if UNITS:
            unit += tl.load(cunit_ptr + k * stride_cunit_k + cols * stride_cunit_d, mask=cmask, other=0.0)
            norm_sum += tl.load(cnorm_sum_ptr + k)
    tl.store(mean_ptr + c * stride_mean_c + cols * stride_mean_d, mean, mask=cmask)
    tl.store(m2_ptr + c * stride_m2_c + blk * stride_m2_b, m2)
    if UNITS:
        tl.store(unit_ptr + c * stride_unit_c + cols * stride_unit_d, unit, mask=cmask)
        if blk == 0:
            tl.store(norm_sum_ptr + c, norm_sum)


@triton.jit
def _centre_rows_kernel(
    out_ptr,
    stride_om,
    stride_od,  # (N, D) float64 out: h_i - mu_{y_i}
    x_ptr,
    stride_xm,
    stride_xd,  # (N, D) features, any float dtype and strides
    y_ptr,  # (N,) int64 labels
    means_ptr,
    stride_mc,
    stride_md,  # (C, D) float64
    n,
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_BITS: tl.constexpr,  # x holds bfloat16 as int16 bits (load_wide)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < n
    mask = rmask[:, None] & (cols < d)[None, :]
    labels = tl.load(y_ptr + rows, mask=rmask, other=0)
    h = load_wide(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask, BF16_BITS).to(tl.float64)
    mu = tl.load(means_ptr + labels[:, None] * stride_mc + cols[None, :] * stride_md, mask=mask, other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_od, h - mu, mask=mask)


def _check_features(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"features: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"features: expected one of {_FLOAT_DTYPES}, got {x.dtype}")


def _block_d(d: int, block_d: int | None) -> int:
    return block_d if block_d is not None else min(64, triton.next_power_of_2(max(d, 1)))


def _chunk_rows(d: int, itemsize: int, unit_sums: bool) -> int:
    """Rows per chunk. Each chunk writes float64 partials of D values (two with unit sums) that the
    merges read again: 8 / (rows * itemsize) of the input each way. Without unit sums, 128 rows
    (1.6% of float32 input, written and read). With them the chunk's rows are read twice, the
    second time from cache: at most 128 KiB of them (32 rows at D = 1,024 in float32), so that
    two programs on each of 132 multiprocessors keep 34 MB in a 50-60 MB L2."""
    if not unit_sums:
        return 128
    return max(16, min(64, triton.next_power_of_2((128 << 10) // max(1, d * itemsize) + 1) // 2))


def block_moments(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    unit_sums: bool = True,
    block_rows: int | None = None,
    block_d: int | None = None,
    fanin: int = 64,
    num_warps: int = 8,
):
    """(counts int64 (C,), means (C, D), m2 (C,), unit_sums (C, D), norm_sums (C,)), float64, of
    the rows x (N, D; float16, bfloat16, float32 or float64, any strides) with labels y (N,) in
    [0, num_classes). The same values as ``ncfast.backends.torch.block_moments_of``, deterministic.
    With ``unit_sums=False`` the last two are None and no row norm is taken.

    block_rows / block_d (powers of two) set the chunk tile; the defaults suit a GPU
    (``_chunk_rows``). fanin: the most partials one merge program folds (a tree of merges above
    it). num_warps: of the chunk kernel (8: a 64 x 64 float64 tile is 16 values per thread).
    """
    _check_features(x)
    n, d = x.shape
    dev = x.device
    y = y.to(device=dev, dtype=torch.int64).contiguous()
    counts = torch.bincount(y, minlength=num_classes)
    if counts.numel() > num_classes:
        raise ValueError("labels: value out of range [0, num_classes)")
    f64 = dict(dtype=torch.float64, device=dev)
    means = torch.zeros(num_classes, d, **f64)
    units = (torch.zeros(num_classes, d, **f64), torch.zeros(num_classes, **f64)) if unit_sums else (None, None)
    if n == 0 or d == 0:
        return counts, means, torch.zeros(num_classes, **f64), *units
    block_d = _block_d(d, block_d)
    col_blocks = triton.cdiv(d, block_d)
    block_rows = block_rows or _chunk_rows(d, x.element_size(), unit_sums)

    # Chunk table: class c's sorted rows start at class_start[c]; it is cut into
    # ceil(n_c / block_rows) chunks, numbered first[c] .. first[c + 1] in class order. Labels sort
    # as int32 (fewer radix passes on a GPU than int64).
    key = y.to(torch.int32) if num_classes < 2**31 else y
    order = torch.argsort(key, stable=True)
    class_start = torch.cumsum(counts, 0) - counts
    per_class = (counts + block_rows - 1) // block_rows
    first = torch.cat([per_class.new_zeros(1), torch.cumsum(per_class, 0)])
    chunks = int(first[-1])
    chunk_class = torch.repeat_interleave(torch.arange(num_classes, device=dev), per_class, output_size=chunks)
    chunk_start = class_start[chunk_class] + (torch.arange(chunks, device=dev) - first[chunk_class]) * block_rows
    chunk_count = torch.clamp(class_start[chunk_class] + counts[chunk_class] - chunk_start, max=block_rows)

    cmean = torch.empty(chunks, d, **f64)
    cm2 = torch.empty(chunks, col_blocks, **f64)
    # without unit sums the kernel writes neither: a (1, 1) stand-in keeps the arguments
    cunit = torch.empty(chunks, d, **f64) if unit_sums else cm2[:1, :1]
    cnorm = torch.empty(chunks, **f64) if unit_sums else cm2[:1, 0]
    xk, bits = as_loadable(x)
    _chunk_moments_kernel[(chunks,)](
        cmean,
        cmean.stride(0),
        cmean.stride(1),
        cunit,
        cunit.stride(0),
        cunit.stride(1),
        cm2,
        cm2.stride(0),
        cm2.stride(1),
        cnorm,
        xk,
        xk.stride(0),
        xk.stride(1),
        order,
        chunk_start,
        chunk_count,
        d,
        BLOCK_R=block_rows,
        BLOCK_D=block_d,
        UNITS=unit_sums,
        BF16_BITS=bits,
        num_warps=num_warps,
    )
    # A tree of merges: while some class has more than `fanin` partials, runs of `fanin`
    # consecutive partials of one class are merged in parallel (one program per run and column
    # block); then one program per class folds what is left. Fixed order at every level, so the
    # result stays deterministic, and a class of 10^7 rows is no longer one serial loop.
    parts = (cmean, cunit, cm2, cnorm, chunk_count)
    while int(per_class.max()) > fanin:
        groups = (per_class + fanin - 1) // fanin
        gfirst = torch.cat([groups.new_zeros(1), torch.cumsum(groups, 0)])
        ngroups = int(gfirst[-1])
        gclass = torch.repeat_interleave(torch.arange(num_classes, device=dev), groups, output_size=ngroups)
        gstart = first[gclass] + (torch.arange(ngroups, device=dev) - gfirst[gclass]) * fanin
        bounds = torch.cat([gstart, first[-1:]])  # group g owns partials bounds[g] .. bounds[g + 1]
        parts = _merge(parts, bounds, ngroups, d, block_d, col_blocks, unit_sums)
        first, per_class = gfirst, groups
    out = (means, *units) if unit_sums else (means, cm2[:1, :1], cm2[:1, 0])
    m2_blocks = _merge(parts, first, num_classes, d, block_d, col_blocks, unit_sums, out=out)[2]
    return counts, means, m2_blocks.sum(1), *units


def _merge(parts, bounds, segments, d, block_d, col_blocks, unit_sums, out=None):
    """Chan-merge partials bounds[s] .. bounds[s + 1] into segment s, for every segment: the
    (means, unit sums, M2 per column block, norm sums, counts) of the segments (without
    ``unit_sums``, stand-ins that are neither read nor written for the unit and norm sums)."""
    cmean, cunit, cm2, cnorm, count = parts
    dev = cmean.device
    f64 = dict(dtype=torch.float64, device=dev)
    m2 = torch.empty(segments, col_blocks, **f64)
    if out is None:
        means = torch.empty(segments, d, **f64)
        unit, norm = (torch.empty(segments, d, **f64), torch.empty(segments, **f64)) if unit_sums else (cunit, cnorm)
    else:
        means, unit, norm = out
    _merge_chunks_kernel[(segments, col_blocks)](
        means,
        means.stride(0),
        means.stride(1),
        unit,
        unit.stride(0),
        unit.stride(1),
        m2,
        m2.stride(0),
        m2.stride(1),
        norm,
        cmean,
        cmean.stride(0),
        cmean.stride(1),
        cunit,
        cunit.stride(0),
        cunit.stride(1),
        cm2,
        cm2.stride(0),
        cm2.stride(1),
        cnorm,
        count,
        bounds,
        d,
        BLOCK_D=block_d,
        UNITS=unit_sums,
    )
    totals = torch.zeros(segments, dtype=torch.int64, device=dev)
    owner = torch.repeat_interleave(
        torch.arange(segments, device=dev), bounds[1:] - bounds[:-1], output_size=count.numel()
    )
    totals.index_add_(0, owner, count)
    return means, unit, m2, norm, totals


def centre_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    means: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_rows: int = 32,
    block_d: int | None = None,
) -> torch.Tensor:
    """x_i - means[y_i] in float64, (N, D), written into ``out`` when given (any strides): the
    rows whose Gram matrix is the within-class scatter (the product itself stays a matmul)."""
    _check_features(x)
    n, d = x.shape
    y = y.to(device=x.device, dtype=torch.int64).contiguous()
    means = means.to(device=x.device, dtype=torch.float64)
    if out is None:
        out = torch.empty(n, d, dtype=torch.float64, device=x.device)
    elif out.shape != (n, d) or out.dtype != torch.float64:
        raise ValueError(f"out: expected a float64 tensor of shape {(n, d)}, got {out.dtype} {tuple(out.shape)}")
    if n == 0 or d == 0:
        return out
    block_d = _block_d(d, block_d)
    grid = (triton.cdiv(n, block_rows), triton.cdiv(d, block_d))
    xk, bits = as_loadable(x)
    _centre_rows_kernel[grid](
        out,
        out.stride(0),
        out.stride(1),
        xk,
        xk.stride(0),
        xk.stride(1),
        y,
        means,
        means.stride(0),
        means.stride(1),
        n,
        d,
        BLOCK_M=block_rows,
        BLOCK_D=block_d,
        BF16_BITS=bits,
    )
    return out
