"""Nearest class centre (NCC) and classifier decisions, exact and blocked.

Both are an argmin over classes of an affine score of the row,

    NCC:       s_c(h) = ||mu_c - m0||^2 - 2 (h - m0) . (mu_c - m0)   (= ||h - mu_c||^2 - ||h - m0||^2)
    decision:  s_c(h) = -(b_c + h . w_c)                              (argmax of the logits)

computed on a block of rows at a time in float32 (so no N x C matrix is ever held whole),
then certified: every row whose two best float32 scores are closer than twice the
float32 error bound is recomputed literally in float64, so the answer equals the float64
argmin of the definition on every row. Centring on m0 (the mean of the class means)
keeps the bound small when all features share a large offset. Ties go to the lowest index.
"""
from __future__ import annotations

import contextlib

import torch

from ._validation import as_tensor, check_features, check_same_device

_U32 = 2.0 ** -24  # unit roundoff of float32
_BLOCK_ELEMS = 1 << 22  # floats in one (rows x classes) score block


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


def _certified_argmin(x: torch.Tensor, centres: torch.Tensor, offsets: torch.Tensor, scale: float,
                      shift: torch.Tensor, exact_scores) -> torch.Tensor:
    """argmin_c offsets_c + scale * (x - shift) . centres_c, equal to the float64 argmin of exact_scores.

    centres (K, D), offsets (K,), shift (D,) are float64. exact_scores(rows_float64) -> (r, K)
    float64 scores of the literal definition, used on rows whose float32 top-2 gap is
    within the error bound (and when K == 1 nothing needs checking).
    """
    n, d = x.shape
    k = centres.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    c32 = centres.to(torch.float32)
    o32 = offsets.to(torch.float32)
    cmax = float(centres.norm(dim=1).max())
    omax = float(offsets.abs().max())
    # Rounding of x - shift and of the centres, the length-D dot product in any summation
    # order (gamma_D), and the offset: a generous multiple of each, per row.
    rel = 4.0 * (d + 4) * _U32
    rows = max(1, min(16384, _BLOCK_ELEMS // max(k, d)))
    for lo in range(0, n, rows):
        xb64 = x[lo : lo + rows].to(torch.float64) - shift
        with _full_fp32():
            scores = torch.addmm(o32, xb64.to(torch.float32), c32.T, alpha=scale)
        if k == 1:
            out[lo : lo + rows] = 0
            continue
        top = torch.topk(scores, 2, dim=1, largest=False)
        best = top.indices[:, 0]
        bound = rel * (abs(scale) * xb64.norm(dim=1) * cmax + omax)
        unsure = (top.values[:, 1] - top.values[:, 0]) <= 2.0 * bound
        if bool(unsure.any()):
            idx = unsure.nonzero().squeeze(1)
            best[idx] = torch.argmin(exact_scores(x[lo : lo + rows][idx].to(torch.float64)), dim=1)
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
    m0 = m64.mean(dim=0)
    mc = m64 - m0

    def exact(rows64):
        return (rows64.unsqueeze(1) - m64.unsqueeze(0)).square().sum(-1)

    local = _certified_argmin(x, mc, mc.square().sum(1), -2.0, m0, exact)
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
    zero = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)

    def exact(rows64):
        return -(rows64 @ w64.T + b64)

    return _certified_argmin(x, w64, -b64, -1.0, zero, exact)


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
