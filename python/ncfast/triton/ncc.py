"""Certified argmin sweep: the nearest class centre (and classifier decision) without an N x K matrix.

For rows x_i (N, D), a float32 shift t (D,), centres w_c (K, D) and offsets o_c (K,) in float32,
split into G consecutive groups of classes (starts[g] .. starts[g + 1]), each group its own
problem over the same rows:

    best[i, g]   = argmin_{c in g} o_c + (x_i - t) . w_c         (index within the group; lowest on ties)
    unsure[i, g] = the two best scores of the group are within 2 * rel * (||x_i - t|| cmax[g] + omax[g])

with rel * (...) the caller's bound on the error of one computed score, so every row not flagged
is the exact argmin and the caller recomputes only the flagged ones (see ncfast.ncc). The same
contract as the C++ ``_C.ncc_sweep`` (csrc/ncc.h).

``_ncc_sweep_kernel`` is row-stationary: a program owns BLOCK_M rows, and for every group sweeps
its classes in tiles of BLOCK_N, each score tile a K-loop of ``tl.dot`` over BLOCK_D features.
A tile is folded at once into a running (best, second best, best index) per row kept in
registers, so only one index and one flag per row and group are written. When D <= BLOCK_D the
rows' features stay in registers for the whole sweep.

How ``tl.dot`` forms the products (``DOTS``), each with its own bound (``ncfast._numerics.rel_tensor_core``).
A sweep's precision is one of the backends' ``PRECISIONS`` ("fp32", "tf32", "bf16"); ``dot_of`` says
which dot delivers it here:

- "ieee":   float32 FMAs (tl.dot's input_precision="ieee");
- "tf32x3": three TF32 tensor-core products (a_hi b_hi + a_hi b_lo + a_lo b_hi), float32-like
            accuracy: the "fp32" precision of ncfast.ncc's exact mode on a GPU (``FP32_DOT``);
- "tf32":   one TF32 tensor-core product; "bf16": both tiles rounded to bfloat16, one
            bfloat16 tensor-core product (the launcher rounds x - shift and the centres to
            bfloat16 before the sweep, so it reads half the bytes). The fast mode's first passes.

Each dot has its own tile shape (``CONFIGS``), chosen from the sm_90 compile of
``bench/sm90_compile.py`` (Triton 3.6): the largest tiles that keep every value in registers
(no local-memory spills; "ieee" 24 bytes) and the pipeline within the 227 KiB of shared memory.
128 x 256 tiles spill with every dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .moments import as_loadable, load_wide

DOTS = ("ieee", "tf32x3", "tf32", "bf16")
FP32_DOT = "tf32x3"  # the dot of the "fp32" precision (ncfast.ncc's exact mode) on a GPU
TENSOR_CORES = ("tf32x3", "tf32", "bf16")

# (block_m, block_n, block_d, num_warps, num_stages) per dot: see the module docstring.
CONFIGS = {
    "ieee": (128, 128, 32, 8, 3),
    "tf32x3": (128, 128, 32, 8, 3),
    "tf32": (128, 128, 64, 8, 3),
    "bf16": (128, 128, 64, 8, 3),
}

_ROUNDED_BLOCK = 1 << 28  # elements of bfloat16 rows made at a time for a "bf16" sweep (512 MiB)


def dot_of(precision: str) -> str:
    """The dot (one of DOTS) that sweeps at a backend precision ("fp32", "tf32" or "bf16"); ValueError
    naming the argument."""
    dots = {"fp32": FP32_DOT, "tf32": "tf32", "bf16": "bf16"}
    if precision not in dots:
        raise ValueError(f"precision: expected one of {tuple(dots)}, got {precision!r}")
    return dots[precision]


@triton.jit
def _shifted_tile(
    x_ptr,
    stride_xm,
    stride_xd,
    shift_ptr,
    rows,
    rmask,
    d0,
    d,
    BLOCK_D: tl.constexpr,
    X_F64: tl.constexpr,
    ROUNDED: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """(BLOCK_M, BLOCK_D) float32 tile of x - shift, zero outside the matrix: one rounding of the
    exact difference (float64 input is shifted in float64 first; other dtypes widen exactly).
    ROUNDED: x already holds bfloat16(x - shift) (see ncc_sweep); the tile is returned as loaded.
    BF16_BITS: x holds bfloat16 input as int16 bits (moments.load_wide)."""
    cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
    cmask = cols < d
    mask = rmask[:, None] & cmask[None, :]
    h = load_wide(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask, BF16_BITS)
    if ROUNDED:
        xs = h
    else:
        s = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
        if X_F64:
            xs = (h - s.to(tl.float64)[None, :]).to(tl.float32)
        else:
            xs = h.to(tl.float32) - s[None, :]
    return xs


@triton.jit
def _centre_tile(centres_ptr, stride_ck, stride_cd, cls, kmask, d0, d, BLOCK_D: tl.constexpr):
    """(BLOCK_D, BLOCK_N) float32 tile of the centres, transposed for the dot, zero outside."""
    cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask = (cols < d)[:, None] & kmask[None, :]
    return tl.load(centres_ptr + cls[None, :] * stride_ck + cols[:, None] * stride_cd, mask=mask, other=0.0)


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b for float32 tiles: "bf16" rounds both to bfloat16 (exact products, float32
    sums), the others are tl.dot's input precisions (DOTS). The interpreter's bfloat16 dot is wrong, so
    there the rounded tiles go back to float32 first (the same values, multiplied exactly)."""
    if DOT == "bf16":
        if INTERPRETED:
            out = tl.dot(
                a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc, input_precision="ieee"
            )
        else:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        out = tl.dot(a, b, acc, input_precision=DOT)
    return out


@triton.jit
def _ncc_sweep_kernel(
    best_ptr,
    stride_bm,
    stride_bg,  # (N, G) int64 out: argmin within each group
    unsure_ptr,
    stride_um,
    stride_ug,  # (N, G) bool out: top-2 gap within twice the bound
    x_ptr,
    stride_xm,
    stride_xd,  # (N, D) rows, any float dtype and strides
    shift_ptr,  # (D,) float32
    centres_ptr,
    stride_ck,
    stride_cd,  # (K, D) float32
    offsets_ptr,  # (K,) float32
    starts_ptr,  # (G + 1,) int64: group g owns classes starts[g] .. starts[g + 1]
    rel_ptr,  # (1,) float64 (a Python float argument would arrive as float32)
    cmax_ptr,
    omax_ptr,  # (G,) float64
    n,
    d,
    groups,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,  # one of DOTS (see _dot)
    X_F64: tl.constexpr,
    INTERPRETED: tl.constexpr,  # TRITON_INTERPRET=1 (see _dot)
    RESIDENT: tl.constexpr,  # D <= BLOCK_D: the rows' one feature block stays in registers
    ROUNDED: tl.constexpr,  # "bf16": x holds bfloat16(x - shift) and the centres bfloat16 (see ncc_sweep)
    BF16_BITS: tl.constexpr,  # x holds bfloat16 input as int16 bits (moments.load_wide)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    # The norm of the rounded rows feeds the bound (float32 is enough: the bound carries 10%
    # headroom). With one feature block that tile stays in registers for the whole sweep; with
    # more, keeping the first one there cost registers (the ieee sweep spilled 3 KB a thread at
    # 128 x 128 x 32) for a few per cent of the loads, so every block is loaded where it is used.
    x0 = _shifted_tile(x_ptr, stride_xm, stride_xd, shift_ptr, rows, rmask, 0, d, BLOCK_D, X_F64, ROUNDED, BF16_BITS)
    x0f = x0.to(tl.float32)
    sq = tl.sum(x0f * x0f, axis=1)
    for d0 in range(BLOCK_D, d, BLOCK_D):
        xs = _shifted_tile(
            x_ptr, stride_xm, stride_xd, shift_ptr, rows, rmask, d0, d, BLOCK_D, X_F64, ROUNDED, BF16_BITS
        ).to(tl.float32)
        sq += tl.sum(xs * xs, axis=1)
    norm = tl.sqrt(sq.to(tl.float64))
    rel = tl.load(rel_ptr)
    for g in range(0, groups):
        lo = tl.load(starts_ptr + g)
        hi = tl.load(starts_ptr + g + 1)
        b1 = tl.full((BLOCK_M,), float("inf"), tl.float32)
        b2 = tl.full((BLOCK_M,), float("inf"), tl.float32)
        i1 = tl.zeros((BLOCK_M,), dtype=tl.int64) + lo
        for n0 in range(lo, hi, BLOCK_N):
            cls = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            kmask = cls < hi
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if RESIDENT:
                ct = _centre_tile(centres_ptr, stride_ck, stride_cd, cls, kmask, 0, d, BLOCK_D)
                acc = _dot(x0, ct, acc, DOT, INTERPRETED)
            else:
                for d0 in range(0, d, BLOCK_D):
                    xs = _shifted_tile(
                        x_ptr, stride_xm, stride_xd, shift_ptr, rows, rmask, d0, d, BLOCK_D, X_F64, ROUNDED, BF16_BITS
                    )
                    ct = _centre_tile(centres_ptr, stride_ck, stride_cd, cls, kmask, d0, d, BLOCK_D)
                    acc = _dot(xs, ct, acc, DOT, INTERPRETED)
            # columns past the group (the next group's classes, or past K) score +inf: never best
            off = tl.load(offsets_ptr + cls, mask=kmask, other=float("inf"))
            s = acc + off[None, :]
            t1 = tl.min(s, axis=1)
            a1 = tl.min(tl.where(s == t1[:, None], cls[None, :], hi), axis=1)  # lowest index on ties
            t2 = tl.min(tl.where(cls[None, :] == a1[:, None], float("inf"), s), axis=1)
            # strict: an equal score in a later tile (higher indices) does not take over
            better = t1 < b1
            b2 = tl.where(better, tl.minimum(b1, t2), tl.minimum(b2, t1))
            b1 = tl.where(better, t1, b1)
            i1 = tl.where(better, a1, i1)
        magnitude = norm * tl.load(cmax_ptr + g) + tl.load(omax_ptr + g)
        bound = rel * magnitude
        # certified: no partial sum can have overflowed (magnitude under 2^126 bounds them all), the
        # two best scores are finite and apart by more than twice the bound (NaN: not certified);
        # a group of one class is never unsure
        ok = (
            (magnitude < 8.507059173023462e37)
            & (b1 > float("-inf"))
            & (b2 < float("inf"))
            & (b2.to(tl.float64) - b1.to(tl.float64) > 2.0 * bound)
        )
        unsure = (hi - lo > 1) & (ok == 0)
        tl.store(best_ptr + rows * stride_bm + g * stride_bg, i1 - lo, mask=rmask)
        tl.store(unsure_ptr + rows * stride_um + g * stride_ug, unsure, mask=rmask)


def ncc_sweep(
    x: torch.Tensor,
    shift: torch.Tensor,
    centres: torch.Tensor,
    offsets: torch.Tensor,
    starts,
    rel: float,
    cmax,
    omax,
    dot: str = "ieee",
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """(best int64 (N, G), unsure bool (N, G)): the certified argmin of every group of classes.

    x (N, D) any float dtype and strides; shift (D,), centres (K, D) and offsets (K,) as float32;
    starts: G + 1 ints from 0 to K; rel, cmax, omax: the per-row error bound
    rel * (||x_i - shift|| * cmax[g] + omax[g]) (``ncfast._numerics.rel_tensor_core(dot, D)`` gives rel);
    dot: one of DOTS (``dot_of`` maps a backend precision to it). A group of one class gives best 0,
    never unsure. Tile shape and launch settings default to CONFIGS[dot]; block sizes are powers
    of two >= 16 (tl.dot's minimum), block_n and block_d shrunk to the problem.
    """
    if dot not in DOTS:
        raise ValueError(f"dot: expected one of {DOTS}, got {dot!r}")
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"features: expected a 2-D floating tensor, got {x.dtype} {tuple(x.shape)}")
    n, d = x.shape
    dev = x.device
    k = centres.shape[0]
    starts = [int(s) for s in starts]
    groups = len(starts) - 1
    if groups < 1 or starts[0] != 0 or starts[-1] != k or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"starts: expected G + 1 >= 2 increasing ints from 0 to K = {k}, got {starts}")
    if centres.shape != (k, d) or offsets.shape != (k,) or shift.shape != (d,):
        raise ValueError(f"centres, offsets, shift: expected shapes {(k, d)}, {(k,)}, {(d,)}")
    best = torch.empty(n, groups, dtype=torch.int64, device=dev)
    unsure = torch.empty(n, groups, dtype=torch.bool, device=dev)
    if n == 0:
        return best, unsure
    f32 = dict(dtype=torch.float32, device=dev)
    f64 = dict(dtype=torch.float64, device=dev)
    shift = shift.to(**f32).contiguous()
    rounded = dot == "bf16"
    centres = centres.to(torch.bfloat16 if rounded else torch.float32)
    cfg_m, cfg_n, cfg_d, cfg_warps, cfg_stages = CONFIGS[dot]
    widest = max(b - a for a, b in zip(starts, starts[1:]))
    block_m = block_m or cfg_m
    block_n = max(16, min(block_n or cfg_n, triton.next_power_of_2(max(widest, 1))))
    block_d = max(16, min(block_d or cfg_d, triton.next_power_of_2(max(d, 1))))
    common = (
        shift,
        centres,
        centres.stride(0),
        centres.stride(1),
        offsets.to(**f32).contiguous(),
        torch.tensor(starts, dtype=torch.int64, device=dev),
        torch.tensor([rel], **f64),
        torch.as_tensor(cmax, **f64).reshape(groups).contiguous(),
        torch.as_tensor(omax, **f64).reshape(groups).contiguous(),
    )
    consts = dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT=dot,
        INTERPRETED=interpreting(),
        RESIDENT=d <= block_d,
        num_warps=num_warps or cfg_warps,
        num_stages=num_stages or cfg_stages,
    )
    # "bf16": the rows are shifted and rounded to bfloat16 once, a block of them at a time (the
    # same values the kernel would make from float32 x - shift), so the sweep, which re-reads
    # each row block for every tile of classes, moves half the bytes and holds half in L2.
    step = max(1, _ROUNDED_BLOCK // max(d, 1)) if rounded else n
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        xb = x[lo:hi]
        if rounded:
            xb = (
                (xb.to(torch.float64) - shift.to(torch.float64)).to(torch.float32)
                if x.dtype == torch.float64
                else xb.to(torch.float32) - shift
            ).to(torch.bfloat16)
        bb, ub = best[lo:hi], unsure[lo:hi]
        xk, bits = (xb, False) if rounded else as_loadable(xb)
        _ncc_sweep_kernel[(triton.cdiv(hi - lo, block_m),)](
            bb,
            bb.stride(0),
            bb.stride(1),
            ub,
            ub.stride(0),
            ub.stride(1),
            xk,
            xk.stride(0),
            xk.stride(1),
            *common,
            hi - lo,
            d,
            groups,
            X_F64=xb.dtype == torch.float64,
            ROUNDED=rounded,
            BF16_BITS=bits,
            **consts,
        )
    return best, unsure
