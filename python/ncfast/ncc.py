"""Nearest class centre (NCC) and classifier decisions, exact and blocked.

Both are an argmin over classes of an affine score of the row,

    NCC:       s_c(h) = ||mu_c - t||^2 - 2 (h - t) . (mu_c - t)   (= ||h - mu_c||^2 - ||h - t||^2)
    decision:  s_c(h) = -(b_c + h . w_c)                            (argmax of the logits)

for any shift t. A block of rows at a time (no N x C matrix is ever held whole; for few classes on
CPU, the fused C++ sweep of csrc/ncc.cpp) is scored in float32, then certified in two tiers: rows
whose two best float32 scores are closer than twice the float32 error bound are rescored with a
float64 product, and the rare rows whose float64 gap is still inside the float64 bound are
recomputed literally (||h - mu_c||^2 summed in float64).
The answer is the float64 argmin of the definition on every row. Shifting by the mean of the
class means (rounded to float32, so the shift is exact in both precisions) keeps the bound small
when all features share a large offset. Ties go to the lowest index.
"""
from __future__ import annotations

import contextlib

import torch

from . import _C, _dispatch
from ._validation import as_tensor, check_features, check_same_device

_U32 = 2.0 ** -24  # unit roundoff of float32
_U64 = 2.0 ** -53  # unit roundoff of float64
_BLOCK_ELEMS = 1 << 22  # floats in one (rows x classes) score block
_FUSED_MAX_CLASSES = 256  # up to here the C++ sweep; above, GEMM blocks


@contextlib.contextmanager
def _full_fp32():
    """Keep TF32 off on CUDA: the error bound below is for true float32 products."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _error_bound(u: float, d: int, scale: float, row_norms: torch.Tensor | float, cmax: float, omax: float):
    """Worst-case |computed - exact| of one score offsets_c + scale * x . c_c at unit roundoff u.

    Rounding of x - shift and of the centres to the working precision (u each), the length-d dot
    product in any summation order (gamma_d <= 1.01 d u), the scaling and the offset, with 10%
    headroom for the row norm itself being computed in that precision.
    """
    return _rel(u, d) * (abs(scale) * row_norms * cmax + omax)


def _rel(u: float, d: int) -> float:
    return 1.1 * (1.01 * d + 4) * u


def _top2(scores: torch.Tensor):
    top = torch.topk(scores, 2, dim=1, largest=False)
    return top.indices[:, 0], top.values[:, 1] - top.values[:, 0]


def _recheck(rows: torch.Tensor, centres, offsets, scale, shift64, cmax, omax, literal_scores) -> torch.Tensor:
    """Exact answers for rows the float32 sweep could not certify: a float64 product, then the
    literal definition for rows still within the float64 bound."""
    d = rows.shape[1]
    x64 = rows.to(torch.float64) - shift64
    best, gap = _top2(torch.addmm(offsets, x64, centres.T, alpha=scale))
    still = gap <= 2.0 * _error_bound(_U64, d, scale, x64.norm(dim=1), cmax, omax)
    if bool(still.any()):
        best[still] = torch.argmin(literal_scores(x64[still] + shift64), dim=1)
    return best


def _certified_argmin(x: torch.Tensor, centres: torch.Tensor, offsets: torch.Tensor, scale: float,
                      shift: torch.Tensor, literal_scores) -> torch.Tensor:
    """argmin_c offsets_c + scale * (x - shift) . centres_c, equal to the float64 argmin of literal_scores.

    centres (K, D), offsets (K,) are float64, shift (D,) is float32 (so x - shift is the same
    value in both precisions). The float32 sweep runs in the fused C++ kernel on CPU
    (csrc/ncc.cpp) and block-wise with torch elsewhere; both flag the rows to recheck.
    """
    n, d = x.shape
    k = centres.shape[0]
    if k == 1:
        return torch.zeros(n, dtype=torch.int64, device=x.device)
    c32, o32 = centres.to(torch.float32), offsets.to(torch.float32)
    cmax = float(centres.norm(dim=1).max())
    omax = float(offsets.abs().max())
    shift64 = shift.to(torch.float64)
    rows = max(1, min(16384, _BLOCK_ELEMS // max(k, d)))

    def recheck(idx, block):
        return _recheck(block[idx], centres, offsets, scale, shift64, cmax, omax, literal_scores)

    # The fused sweep wins while the centres stay in cache and a GEMM is mostly overhead; for
    # more classes the BLAS GEMM route is faster (50k x 512: C=100 66 vs 84 ms, C=1000 622 vs 373 ms).
    if _dispatch.backend_for(x) == "cpp" and k <= _FUSED_MAX_CLASSES:
        buf, dtype_name = _dispatch._buffer(x)
        best, unsure = _C.ncc_sweep(buf, dtype_name, shift.contiguous().numpy(), c32.contiguous().numpy(),
                                    o32.contiguous().numpy(), scale, _rel(_U32, d), cmax, omax,
                                    torch.get_num_threads())
        out = torch.from_numpy(best)
        idx = torch.from_numpy(unsure).nonzero().squeeze(1)
        for lo in range(0, idx.numel(), rows):
            part = idx[lo : lo + rows]
            out[part] = recheck(part, x)
        return out

    out = torch.empty(n, dtype=torch.int64, device=x.device)
    for lo in range(0, n, rows):
        block = x[lo : lo + rows]
        # one rounding of the exact difference, also for float64 input (the bound assumes it)
        xb = (block - shift64).to(torch.float32) if x.dtype == torch.float64 else block.to(torch.float32) - shift
        with _full_fp32():
            scores = torch.addmm(o32, xb, c32.T, alpha=scale)
        best, gap = _top2(scores)
        unsure = (gap <= 2.0 * _error_bound(_U32, d, scale, xb.norm(dim=1), cmax, omax)).nonzero().squeeze(1)
        if unsure.numel():
            best[unsure] = recheck(unsure, block)
        out[lo : lo + rows] = best
    return out


def ncc_assign(features, means) -> torch.Tensor:
    """Nearest class mean of every row: argmin_c ||h_i - mu_c||^2, int64 (N,).

    Equal to the float64 argmin on every row (see module docstring). Rows of ``means`` that
    hold NaN (absent classes, as ``ClassMoments.means`` reports them) never win; the
    returned indices refer to the rows of ``means``.
    """
    x = check_features(features, allow_empty=True)
    mu = as_tensor(means, "means")
    if mu.dim() != 2 or mu.shape[1] != x.shape[1]:
        raise ValueError(f"means: expected shape (C, {x.shape[1]}), got {tuple(mu.shape)}")
    check_same_device(x, mu, "means")
    if not mu.dtype.is_floating_point:
        raise TypeError(f"means: expected a floating dtype, got {mu.dtype}")
    valid = torch.isfinite(mu).all(dim=1)
    if not bool(valid.any()):
        raise ValueError("means: no row is finite")
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    index = valid.nonzero().squeeze(1)
    m64 = mu[index].to(torch.float64)
    shift = m64.mean(dim=0).to(torch.float32)
    mc = m64 - shift.to(torch.float64)

    def literal(rows64):
        return (rows64.unsqueeze(1) - m64.unsqueeze(0)).square().sum(-1)

    local = _certified_argmin(x, mc, mc.square().sum(1), -2.0, shift, literal)
    return index[local]


def classifier_decisions(features, weight, bias=None) -> torch.Tensor:
    """The network's decision argmax_c (W h_i + b)_c, int64 (N,), equal to the float64 argmax.

    Computed block by block with the same certified float32 sweep as ncc_assign, so the
    N x C logits are never materialised.
    """
    x = check_features(features, allow_empty=True)
    w = as_tensor(weight, "weight")
    if w.dim() != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"weight: expected shape (C, {x.shape[1]}), got {tuple(w.shape)}")
    check_same_device(x, w, "weight")
    w64 = w.to(torch.float64)
    if bias is None:
        b64 = torch.zeros(w.shape[0], dtype=torch.float64, device=x.device)
    else:
        b = as_tensor(bias, "bias")
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias: expected shape ({w.shape[0]},), got {tuple(b.shape)}")
        check_same_device(x, b, "bias")
        b64 = b.to(torch.float64)
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    zero = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)

    def literal(rows64):
        return -(rows64 @ w64.T + b64)

    return _certified_argmin(x, w64, -b64, -1.0, zero, literal)


def ncc_mismatch(features, means, decisions) -> float:
    """Fraction of rows whose decision differs from their nearest class centre (paper 003 def. 5).

    ``decisions`` are the network's class predictions (int (N,)), e.g. ``logits.argmax(1)`` or
    ``classifier_decisions(features, W, b)``; ``means`` the class means of the layer whose
    ``features`` are given (for an intermediate layer, its own class means).
    """
    x = check_features(features)
    dec = as_tensor(decisions, "decisions")
    if dec.dtype.is_floating_point:
        raise TypeError(f"decisions: expected an integer dtype, got {dec.dtype}")
    if dec.shape != (x.shape[0],):
        raise ValueError(f"decisions: expected shape ({x.shape[0]},), got {tuple(dec.shape)}")
    check_same_device(x, dec, "decisions")
    return float((ncc_assign(x, means) != dec.to(torch.int64)).to(torch.float64).mean())
