"""Nearest class centre (NCC) and classifier decisions, exact and blocked.

Both are an argmin over classes of an affine score of the row,

    NCC:       s_c(h) = ||mu_c - t||^2 - 2 (h - t) . (mu_c - t)   (= ||h - mu_c||^2 - ||h - t||^2)
    decision:  s_c(h) = -(b_c + h . w_c)                            (argmax of the logits)

for any shift t. The backend's sweep (``Backend.ncc_sweep``: on CPU the fused C++ sweep of
csrc/ncc.cpp, in an AVX-512 build for any number of classes, else for few and GEMM blocks above;
no N x C matrix is ever held whole) scores the rows in float32, then they are certified in tiers:
rows whose two best float32 scores are closer than twice the float32 error bound are rescored
with a float64 product, and the rare rows whose float64 gap is still inside the float64 bound are
settled in exact integer arithmetic among their candidates. ``mode="fast"`` scores first with
bfloat16 products (VDPBF16PS, AVX512-BF16 builds) or, on CUDA, TF32 or bfloat16 tensor cores
(Triton; a probe of the first rows picks) under that format's bound, sends its unsure rows
through the float32 sweep, then on as above. On CUDA the float32 sweep itself runs on tensor
cores as tf32x3 (three TF32 products, float32-like accuracy, its own bound; ``ncfast.triton.ncc``).
Every bound is in ``ncfast._numerics``.

The answer is the argmin of the definition on every row, exact for the given values (so equal to
a float64 evaluation wherever its rounding can tell the two best classes apart), in either mode.
Shifting by the mean of the class means (rounded to float32, so the shift is exact in both
precisions) keeps the bound small when all features share a large offset. Ties go to the lowest
index.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch

from . import _numerics, backends
from ._numerics import exponent_of, times_power_of_two
from ._validation import as_tensor, check_bias, check_features, check_finite, check_same_device
from .backends import ncc_block_rows

MODES = ("exact", "fast")


def _exact_ints(values: list[float]) -> tuple[list[int], int]:
    """(I, e) with values[i] == I[i] * 2**e for one common e: every float64 is a 53-bit integer
    times a power of two, so sums and products of these integers are exact."""
    parts = [math.frexp(v) for v in values]
    exps = [e for m, e in parts if m != 0.0]
    low = min(exps) if exps else 0
    return [int(m * 9007199254740992.0) << (e - low) if m != 0.0 else 0 for m, e in parts], low - 53


@dataclass
class _Problem:
    """argmin_c offsets_c + (x - shift) . centres_c (scales folded into the centres, exactly).

    ``keys`` (K, k) holds what defines class c's score (its mean, or its weight row and bias):
    classes with equal keys tie on every row. ``exact(row, classes)`` is the argmin among
    ``classes`` of the definition's score of the float64 ``row`` in exact integer arithmetic,
    ties to the lowest index.
    """

    centres: torch.Tensor  # (K, D) float64
    offsets: torch.Tensor  # (K,) float64
    keys: torch.Tensor  # (K, k) float64
    exact: Callable[[list[float], list[int]], int]

    @functools.cached_property
    def first_equal(self) -> torch.Tensor:
        """(K,) the lowest index whose keys equal class c's (c itself if none lower)."""
        _, inverse = torch.unique(self.keys, dim=0, return_inverse=True)
        k = self.keys.shape[0]
        idx = torch.arange(k, device=self.keys.device)
        lowest = torch.full((k,), k, dtype=torch.int64, device=self.keys.device).scatter_reduce_(
            0, inverse, idx, reduce="amin"
        )
        return lowest[inverse]

    @functools.cached_property
    def centres32(self) -> torch.Tensor:
        return self.centres.to(torch.float32)

    @functools.cached_property
    def offsets32(self) -> torch.Tensor:
        return self.offsets.to(torch.float32)

    @functools.cached_property
    def cmax(self) -> float:
        return float(self.centres.norm(dim=1).max())

    @functools.cached_property
    def omax(self) -> float:
        return float(self.offsets.abs().max())


def _recheck(rows: torch.Tensor, p: _Problem, shift64: torch.Tensor) -> torch.Tensor:
    """Exact answers for rows the float32 sweep could not certify: a float64 product, then, for
    rows whose float64 gap is still within the float64 bound, the definition in exact integer
    arithmetic among the classes within that bound of the best (_exact_rows)."""
    rows64 = rows.to(torch.float64)
    x64 = rows64 - shift64
    scores = torch.addmm(p.offsets, x64, p.centres.T)
    best, b1, b2 = _numerics.top2(scores)
    d = rows.shape[1]
    rel = _numerics.rel_float(_numerics.U64, d)
    magnitude = x64.norm(dim=1) * p.cmax + p.omax + _numerics.underflow_floor(_numerics.TINY64, d, p.cmax) / rel
    still = (~_numerics.certain(b1, b2, magnitude, rel, _numerics.SCORE_RANGE64)).nonzero().squeeze(1)
    if still.numel():
        tied = scores[still]
        bound = rel * magnitude[still].unsqueeze(1)
        near = tied <= tied.min(dim=1, keepdim=True).values + 2.0 * bound
        # rows whose float64 scores overflowed (or are NaN) keep every class as a candidate
        lost = ~(torch.isfinite(tied).all(dim=1) & (magnitude[still] < _numerics.SCORE_RANGE64))
        near[lost] = True
        best[still] = _exact_rows(rows64[still], near, p).to(best.device)
    return best


def _exact_rows(rows64: torch.Tensor, near: torch.Tensor, p: _Problem) -> torch.Tensor:
    """argmin of the definition, exactly, for rows whose float64 scores cannot tell their
    candidates (``near``, (r, K) bool) apart. A float64 literal sum cannot settle them either:
    two float64 evaluations of ||h - mu_c||^2 in different summation orders disagreed on rows
    whose exact gap was 2e-22 (midpoints between class means). Classes with equal keys tie
    exactly and keep their lowest index (every class, when all the means are equal), so the
    integer arithmetic runs only over distinct candidates; these rows are rare by construction."""
    if not bool(torch.isfinite(rows64).all()):  # they reach here: no precision certifies them
        raise ValueError("features: contains NaN or Inf")
    first = p.first_equal.unsqueeze(0)
    k = near.shape[1]
    low = torch.where(near, first, k).min(dim=1).values
    high = torch.where(near, first, -1).max(dim=1).values
    out = low.cpu()  # rows whose candidates all share one key: their lowest index
    mixed = (low != high).nonzero().squeeze(1).cpu()
    if mixed.numel():
        rows, near_cpu, first_cpu = rows64[mixed].cpu(), near[mixed].cpu(), first[0].cpu()
        for j, i in enumerate(mixed.tolist()):
            out[i] = p.exact(rows[j].tolist(), torch.unique(first_cpu[near_cpu[j]]).tolist())
    return out


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return mode


def _sweep(
    x: torch.Tensor,
    shift: torch.Tensor,
    problems: list[_Problem],
    precision: backends.Precision,
    backend: backends.Backend,
) -> backends.Sweep:
    """One fused sweep over every problem at ``precision`` ("fp32", or one of the backend's
    ``fast_precisions``): Sweep(best (N, G), unsure (N, G))."""
    starts = [0]
    for p in problems:
        starts.append(starts[-1] + p.centres.shape[0])
    if len(problems) == 1:  # prepared once per set of centres (_problems)
        centres, offsets = problems[0].centres32, problems[0].offsets32
    else:
        centres = torch.cat([p.centres for p in problems]).to(torch.float32)
        offsets = torch.cat([p.offsets for p in problems]).to(torch.float32)
    return backend.ncc_sweep(
        x, shift, centres, offsets, starts, [p.cmax for p in problems], [p.omax for p in problems], precision
    )


def _timed_sweep(x, shift, problems, precision, backend):
    """_sweep and its wall time in seconds (the device synchronised on both ends)."""
    backend.synchronize(x)
    t0 = time.perf_counter()
    out = _sweep(x, shift, problems, precision, backend)
    backend.synchronize(x)
    return out, time.perf_counter() - t0


def _low_cost(low_seconds: float, fp32_seconds: float, unsure_share: float) -> float:
    """Estimated time of a low-precision sweep plus a float32 sweep of its unsure rows."""
    return low_seconds + unsure_share * fp32_seconds


def _sweep_fast(
    x: torch.Tensor,
    shift: torch.Tensor,
    problems: list[_Problem],
    lows: tuple[backends.Precision, ...],
    backend: backends.Backend,
) -> backends.Sweep:
    """The fast mode's first pass: a sweep at a low precision (bf16 on CPU; tf32 or bf16 on GPU)
    whose unsure rows are swept again in float32, or float32 alone, whichever the first rows time
    fastest.

    The first rows (``backend.probe_rows()``) are swept every way (their float32 results are
    kept; where kernels compile on first use, each is compiled on a few rows first, so no compile
    is timed); a low precision takes the rest only if its time plus the float32 recheck of the
    share of rows it could not certify beats float32. Classes too close for bf16 to certify most
    rows make it lose, and so does a CPU whose bf16 dot products are no faster than float32 FMAs
    (VDPBF16PS without AMX), so the fast mode never costs much more than the exact one."""
    n = x.shape[0]
    probe_n = backend.probe_rows()
    if n <= probe_n:
        sweep = _sweep(x, shift, problems, lows[0], backend)
        low_rows: torch.Tensor | None = torch.arange(n, device=x.device)
    else:
        probe = x[:probe_n]
        backend.warm_up(probe, lambda rows, precision: _sweep(rows, shift, problems, precision, backend))
        sweep, t_fp32 = _timed_sweep(probe, shift, problems, "fp32", backend)
        choice: backends.Precision = "fp32"
        cost = t_fp32
        for low in lows:
            low_sweep, t_low = _timed_sweep(probe, shift, problems, low, backend)
            c = _low_cost(t_low, t_fp32, float(low_sweep.unsure.any(dim=1).to(torch.float64).mean()))
            if c < cost:
                choice, cost = low, c
        rest = _sweep(x[probe_n:], shift, problems, choice, backend)
        sweep = backends.Sweep(torch.cat([sweep.best, rest.best]), torch.cat([sweep.unsure, rest.unsure]))
        low_rows = torch.arange(probe_n, n, device=x.device) if choice != "fp32" else None
    if low_rows is not None:  # rows the low precision could not certify get a float32 sweep
        again = low_rows[sweep.unsure[low_rows].any(dim=1)]
        if again.numel():
            redo = _sweep(x[again], shift, problems, "fp32", backend)
            sweep.best[again], sweep.unsure[again] = redo.best, redo.unsure
    return sweep


def _certified_argmins(
    x: torch.Tensor, shift: torch.Tensor, problems: list[_Problem], mode: str, backend: backends.Backend
) -> list[torch.Tensor]:
    """For each problem, the argmin of its exact scores on every row of x (the float64 inputs'
    exact values: a float64 evaluation can only differ from it where two scores agree to its
    rounding).

    shift (D,) is float32, so x - shift is the same value in both precisions. The backend sweeps
    every problem in one read of x (the C++ core's fused sweep, or GEMM blocks, or the Triton
    kernel); rows whose top-2 gap is within the bound are rechecked: bf16 / tf32 (fast mode) ->
    float32 sweep -> float64 product -> exact integers.
    """
    shift64 = shift.to(torch.float64)
    if any(p.centres.shape[0] == 1 for p in problems):
        # a problem of one class certifies every row without scoring it: the sweep's NaN check
        # (no precision certifies a non-finite row, so such rows end in _exact_rows) is bypassed
        check_finite(x, "features")
    total = sum(p.centres.shape[0] for p in problems)
    rows = ncc_block_rows(x, total)
    lows = backend.fast_precisions(total)
    if mode == "fast" and lows:
        sweep = _sweep_fast(x, shift, problems, lows, backend)
    else:
        sweep = _sweep(x, shift, problems, "fp32", backend)
    outs = []
    for g, p in enumerate(problems):
        out = sweep.best[:, g].contiguous()
        idx = sweep.unsure[:, g].nonzero().squeeze(1)
        for lo in range(0, idx.numel(), rows):
            part = idx[lo : lo + rows]
            out[part] = _recheck(x[part], p, shift64)
        outs.append(out)
    return outs


def _ncc_problem(x: torch.Tensor, means):
    """(problem, shift, index of the finite rows of means) for the nearest class mean.

    Score ||mu_c - t||^2 - 2 (h - t) . (mu_c - t) with t the mean of the class means in float32.
    """
    mu = as_tensor(means, "means")
    if mu.dim() != 2 or mu.shape[1] != x.shape[1]:
        raise ValueError(f"means: expected shape (C, {x.shape[1]}), got {tuple(mu.shape)}")
    check_same_device(x, mu, "means")
    if not mu.dtype.is_floating_point:
        raise TypeError(f"means: expected a floating dtype, got {mu.dtype}")
    if bool(torch.isinf(mu).any()):  # NaN marks an absent class; Inf is no class mean
        raise ValueError("means: contains Inf (a row of NaN marks an absent class, which never wins)")
    valid = torch.isfinite(mu).all(dim=1)
    if not bool(valid.any()):
        raise ValueError("means: no row is finite")
    index = valid.nonzero().squeeze(1)
    m64 = mu[index].to(torch.float64)
    # the mean of the means, without overflow; where it leaves float32's range, no shift
    k = exponent_of(m64)
    shift = times_power_of_two(times_power_of_two(m64, -k).mean(dim=0), k).to(torch.float32)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    mc = m64 - shift.to(torch.float64)
    k = exponent_of(mc)
    mcs = times_power_of_two(mc, -k)

    means_cpu = m64.cpu()

    def exact(row: list[float], classes: list[int]) -> int:
        d = len(row)
        ints, _ = _exact_ints(row + means_cpu[classes].reshape(-1).tolist())
        h = ints[:d]
        dist = [
            sum((a - b) * (a - b) for a, b in zip(h, ints[d + j * d : d + (j + 1) * d])) for j in range(len(classes))
        ]
        return min(zip(dist, classes))[1]

    # the scores times 2^-k: ||mu_c - t||^2 2^-k - 2 (h - t) . (mu_c - t) 2^-k, the centres of
    # magnitude below 2 whatever the means' (the argmin is the same; see _numerics.exponent_of;
    # unscaled, the float32 scores of means near 1e19 overflowed)
    return _Problem(-2.0 * mcs, times_power_of_two(mcs.square().sum(1), k), m64, exact), shift, index


def _decision_problem(x: torch.Tensor, weight, bias, shift: torch.Tensor) -> _Problem:
    """The classifier decision as an argmin: -(b_c + w_c . t) - (h - t) . w_c for the shift t."""
    w = as_tensor(weight, "weight")
    if w.dim() != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"weight: expected shape (C, {x.shape[1]}), got {tuple(w.shape)}")
    check_same_device(x, w, "weight")
    if not w.dtype.is_floating_point:
        raise TypeError(f"weight: expected a floating dtype, got {w.dtype}")
    w64 = check_finite(w.to(torch.float64), "weight")
    if bias is None:
        b64 = torch.zeros(w.shape[0], dtype=torch.float64, device=x.device)
    else:
        b64 = check_bias(bias, w.shape[0], x).to(torch.float64)

    w_cpu, b_cpu = w64.cpu(), b64.cpu()

    def exact(row: list[float], classes: list[int]) -> int:
        # b_c + h . w_c as one exact rational per class: integers for h and w at one scale 2^e
        # (their products at 2^(2e)), the bias added as a Fraction
        d = len(row)
        ints, e = _exact_ints(row + w_cpu[classes].reshape(-1).tolist())
        scale = Fraction(2) ** (2 * e)
        scores = []
        for j, c in enumerate(classes):
            dot = sum(a * b for a, b in zip(ints[:d], ints[d + j * d : d + (j + 1) * d]))
            scores.append(-(dot * scale + Fraction(float(b_cpu[c]))))
        return min(zip(scores, classes))[1]

    # the scores times 2^-k, k from the largest weight or bias (see _numerics.exponent_of)
    k = exponent_of(torch.cat([w64.reshape(-1), b64]))
    ws, bs = times_power_of_two(w64, -k), times_power_of_two(b64, -k)
    return _Problem(-ws, -(bs + ws @ shift.to(torch.float64)), torch.cat([w64, b64.unsqueeze(1)], dim=1), exact)


def ncc_assign(features, means, *, mode: str = "exact") -> torch.Tensor:
    """Nearest class mean of every row: argmin_c ||h_i - mu_c||^2, int64 (N,).

    Equal to the float64 argmin on every row (see module docstring), in both modes: ``"exact"``
    scores in float32 (on CUDA tf32x3 tensor cores), ``"fast"`` first in bfloat16 where the CPU
    has AVX512-BF16 (elsewhere it is the same as "exact"; on CUDA TF32 or bfloat16 tensor cores);
    the certified recheck makes their answers identical. Rows of
    ``means`` that hold NaN (absent classes, as ``ClassMoments.means`` reports them) never win;
    an Inf in ``means`` is a ValueError. The returned indices refer to the rows of ``means``.
    """
    _check_mode(mode)
    x = check_features(features, allow_empty=True)
    return _ncc_assign(x, means, mode, backends.for_tensor(x))


def _ncc_assign(x: torch.Tensor, means, mode: str, backend: backends.Backend) -> torch.Tensor:
    """ncc_assign of checked features with the caller's backend."""
    return _solve(x, _problems(x, means), mode, backend)[0]


def _problems(x: torch.Tensor, means, weight=None, bias=None):
    """The nearest-centre problem (and with ``weight`` the decision problem), the shift and the
    index of the finite centres: prepared once for every block of rows scored against the same
    centres (``_solve``); ``x`` gives the width and device."""
    ncc, shift, index = _ncc_problem(x, means)
    problems = [ncc] if weight is None else [ncc, _decision_problem(x, weight, bias, shift)]
    return problems, shift, index


def _solve(x: torch.Tensor, prepared, mode: str, backend: backends.Backend):
    """(nearest centre, decision or None) of the rows x for problems from ``_problems``."""
    problems, shift, index = prepared
    if x.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.int64, device=x.device)
        return empty, (empty.clone() if len(problems) > 1 else None)
    out = _certified_argmins(x, shift, problems, mode, backend)
    return index[out[0]], (out[1] if len(problems) > 1 else None)


def classifier_decisions(features, weight, bias=None, *, mode: str = "exact") -> torch.Tensor:
    """The network's decision argmax_c (W h_i + b)_c, int64 (N,), equal to the float64 argmax.

    Computed block by block with the same certified sweep as ncc_assign (``mode`` as there), so
    the N x C logits are never materialised.
    """
    _check_mode(mode)
    x = check_features(features, allow_empty=True)
    shift = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    problem = _decision_problem(x, weight, bias, shift)
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    return _certified_argmins(x, shift, [problem], mode, backends.for_tensor(x))[0]


def ncc_and_decisions(features, means, weight, bias=None, *, mode: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """(ncc_assign(features, means), classifier_decisions(features, weight, bias)) in one read of
    the features: both argmins share the sweep (and its certified recheck), so NCC mismatch needs
    neither the N x C distances nor the logits. ``mode`` as in ncc_assign."""
    _check_mode(mode)
    x = check_features(features, allow_empty=True)
    return _ncc_and_decisions(x, means, weight, bias, mode, backends.for_tensor(x))


def _ncc_and_decisions(x: torch.Tensor, means, weight, bias, mode: str, backend: backends.Backend):
    """ncc_and_decisions of checked features with the caller's backend."""
    return _solve(x, _problems(x, means, weight, bias), mode, backend)


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
    nearest = _ncc_assign(x, means, "exact", backends.for_tensor(x))
    return float((nearest != dec.to(torch.int64)).to(torch.float64).mean())
