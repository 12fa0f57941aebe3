"""The numerics every backend shares: Chan's merge, IEEE ratios, certified error bounds.

Each rule lives here once; the backends and the formula modules import it.

- ``chan_merge`` / ``chan_reduce``: Chan, Golub and LeVeque's combination of (count, mean, M2)
  of two (or many) parts, elementwise over classes or over the sums of tiles.
- ``ieee_ratio``: a division with IEEE semantics where Python raises.
- ``coincidence_floor``: below it, 1 - cos between two unit vectors is rounding, not geometry.
- ``exponent_of`` / ``times_power_of_two``: exact rescaling by powers of two, which moves a problem
  into float64's (or float32's) range without changing any scale-free result.
- ``score_bound`` and the ``rel_*`` functions: the worst-case error of one score of the certified
  NCC / decision sweep at the precision of its products, for every backend (``ncfast.ncc``).
"""

from __future__ import annotations

import math

import torch

U64 = 2.0**-53  # unit roundoff of float64
U32 = 2.0**-24  # unit roundoff of float32
UTF32 = 2.0**-11  # unit roundoff of TF32 (11 significant bits)
UBF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
TENSOR_CORE_FLOOR = 2.0**-100
"""Relative floor for centres' elements that tensor cores or VDPBF16PS flush to zero (subnormals)."""


# ------------------------------------------------------------------------------- powers of two
def exponent_of(t: torch.Tensor) -> int:
    """k with max |t| in [2^(k-1), 2^k) (0 for an empty, all-zero or non-finite t). t * 2^-k has its
    largest element in [1/2, 1): a product or a sum of squares of such elements cannot overflow,
    and cannot underflow but for elements far below the largest."""
    a = float(t.abs().max()) if t.numel() else 0.0
    return math.frexp(a)[1] if a > 0.0 and math.isfinite(a) else 0


def times_power_of_two(t, k: int):
    """t * 2^k, exactly where the result is a normal number (two normal factors, so 2^k itself
    need not be representable); t a tensor or a float."""
    return t * 2.0 ** (k // 2) * 2.0 ** (k - k // 2)


def _scaled_row_norms(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(||t_i|| 2^-k for every row, k): the rows scaled by 2^-k (k of the largest element) before
    their squares are summed. torch's norm squares as they are: logits near 2^600 gave inf, near
    2^-1022 gave 0."""
    t = t.to(torch.float64)
    k = exponent_of(t)
    return torch.linalg.vector_norm(times_power_of_two(t, -k), dim=1), k


def row_norms(t: torch.Tensor) -> torch.Tensor:
    """The float64 Euclidean norm of every row of ``t``, at any finite magnitude."""
    norms, k = _scaled_row_norms(t)
    return times_power_of_two(norms, k)


def mean_row_norm(t: torch.Tensor) -> float:
    """mean_i ||t_i||, at any finite magnitude (the mean taken before the scale goes back)."""
    norms, k = _scaled_row_norms(t)
    return times_power_of_two(float(norms.mean()), k)


# ----------------------------------------------------------------------------------- Chan merge
def chan_merge(
    n_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    n_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
):
    """Chan et al.'s combination of two parts, elementwise over the leading dimensions.

    For parts a, b with counts n_a, n_b (int64, shape S), means (float64, S + (D,)) and sums of
    squared deviations M2 (float64, S), delta = mean_b - mean_a and n = n_a + n_b:

        mean = mean_a + delta n_b / n,    M2 = M2_a + M2_b + (n_a n_b / n) ||delta||^2

    so no raw second moment is formed. An empty part (n = 0) leaves the other unchanged. A part
    whose mean holds +-inf (an infinite CDNV ratio or uniformity term) makes the mean the
    count-weighted one, inf, and M2 NaN (inf - inf would otherwise make the mean NaN).

    Returns (n, mean, M2, delta, weight) with weight = n_a n_b / n (0 where a part is empty) and
    delta zeroed there: a D x D scatter merges as S_a + S_b + sum weight delta delta^T.
    """
    n = n_a + n_b
    both = (n_a > 0) & (n_b > 0)
    na = n_a.to(torch.float64)
    wb = n_b.to(torch.float64) / n.clamp_min(1).to(torch.float64)
    finite = torch.isfinite(mean_a).all(-1) & torch.isfinite(mean_b).all(-1)
    chan = both & finite
    delta = torch.where(chan.unsqueeze(-1), mean_b - mean_a, torch.zeros_like(mean_a))
    weight = torch.where(chan, na * wb, torch.zeros_like(wb))
    mean = torch.where((n_a == 0).unsqueeze(-1), mean_b, mean_a + delta * wb.unsqueeze(-1))
    m2 = m2_a + m2_b + weight * delta.square().sum(-1)
    if not bool(chan.eq(both).all()):  # a part with an infinite mean
        inf = both & ~finite
        weighted = (mean_a * na.unsqueeze(-1) + mean_b * n_b.to(torch.float64).unsqueeze(-1)) / n.clamp_min(1).to(
            torch.float64
        ).unsqueeze(-1)
        mean = torch.where(inf.unsqueeze(-1), weighted, mean)
        m2 = torch.where(inf, torch.full_like(m2, math.nan), m2)
    return n, mean, m2, delta, weight


def chan_reduce(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """(n, mean, M2) of all parts along dim 0 (n (P, ...), mean (P, ..., D), M2 (P, ...)), merged
    by ``chan_merge`` in a fixed tree (pairs of neighbours, level by level): log2(P) vectorised
    merges, deterministic for a given P."""
    while n.shape[0] > 1:
        odd = n.shape[0] % 2
        last = (n[-1:], mean[-1:], m2[-1:]) if odd else None
        p = n.shape[0] - odd
        n, mean, m2, _, _ = chan_merge(n[0:p:2], mean[0:p:2], m2[0:p:2], n[1:p:2], mean[1:p:2], m2[1:p:2])
        if last is not None:
            n, mean, m2 = torch.cat([n, last[0]]), torch.cat([mean, last[1]]), torch.cat([m2, last[2]])
    return n[0], mean[0], m2[0]


def scalar_moments(parts) -> tuple[int, float, float]:
    """(n, mean, M2) of many scalar parts given as (n, mean, M2) triples, by ``chan_reduce``:
    how the tile sums of the pairwise pass are combined."""
    parts = [p for p in parts if p[0]]
    if not parts:
        return 0, 0.0, 0.0
    n = torch.tensor([p[0] for p in parts], dtype=torch.int64)
    mean = torch.tensor([[p[1]] for p in parts], dtype=torch.float64)
    m2 = torch.tensor([p[2] for p in parts], dtype=torch.float64)
    total, mu, q = chan_reduce(n, mean, m2)
    return int(total), float(mu[0]), float(q)


def top2(scores: torch.Tensor):
    """(argmin, smallest, second smallest) of each row of a (rows, K >= 2) score block."""
    top = torch.topk(scores, 2, dim=1, largest=False)
    return top.indices[:, 0], top.values[:, 0], top.values[:, 1]


SCORE_RANGE32 = 2.0**126
"""Half of float32's range: a row whose scores' magnitude bound (||x - t|| cmax + omax, which also
bounds every partial sum, by Cauchy-Schwarz) is below it overflows nowhere in a float32 sweep."""
SCORE_RANGE64 = 2.0**1022
"""The same for float64 products."""
TINY32 = 2.0**-149
"""Spacing of float32's subnormals: the absolute error of a product or sum that falls below the
normal range, where the relative bound does not hold."""
TINY64 = 2.0**-1074
"""The same for float64."""


def certain(
    best: torch.Tensor, second: torch.Tensor, magnitude: torch.Tensor, rel: float, score_range: float
) -> torch.Tensor:
    """Whether a row's argmin is certified: its magnitude bound is inside the precision's range (so
    nothing overflowed), its two best scores are finite and their gap exceeds twice the bound rel x
    magnitude. NaN anywhere (a norm, a score) leaves the row uncertified."""
    return (
        (magnitude < score_range)
        & torch.isfinite(best)
        & torch.isfinite(second)
        & (second - best > 2.0 * rel * magnitude)
    )


def underflow_floor(tiny: float, d: int, cmax: float) -> float:
    """Absolute error of the products and partial sums of one score that fall below the normal range
    (each at most ``tiny``, the subnormal spacing): added to omax as this over rel, so the bound
    stays rel (||x|| cmax + omax)."""
    return tiny * d * (1.0 + cmax) * 2.0


# ------------------------------------------------------------------------------- IEEE division
def ieee_ratio(num: float, den: float) -> float:
    """num / den with IEEE semantics where Python raises: x / 0 is +-inf, 0 / 0 is NaN.

    Degenerate but valid inputs reach these divisions (features that are all equal, as from a
    network whose units are all dead; classes with the same mean; one sample per class, for
    MSDR): the metric is then undefined or infinite, like the reference's float64 value, and
    nc_metrics must not raise inside a training loop."""
    if den == 0.0:
        return math.nan if num == 0.0 or math.isnan(num) else math.copysign(math.inf, num) * math.copysign(1.0, den)
    return num / den


def coincidence_floor(d: int) -> float:
    """4 (D + 4) eps: the rounding of 1 - cos (or 2 - 2 cos) between two float64 unit vectors of
    length D, whose own norms are 1 only to about D eps. A value at or below it cannot be told
    from 0: two directions that coincide (uniformity's +inf term) or unit vectors that all agree
    (cosine separation's 0 / 0)."""
    return 4.0 * (d + 4) * U64


# -------------------------------------------------------------------- certified score bounds
def rel_float(u: float, d: int) -> float:
    """Relative bound of a score at unit roundoff u: x - shift and the centres rounded to the
    working precision (u each), a dot product whose summation tree has at most d roundings on any
    path (gamma_d <= 1.01 d u; d = the length for a sum in any order, less for a kernel that adds
    chunks of known size, ``_C.ncc_sum_terms``), the offset added once, and 10% headroom for the
    row norm itself being computed in that precision."""
    return 1.1 * (1.01 * d + 4) * u


def rel_bf16_fma(d: int) -> float:
    """Relative bound of a bfloat16-product score on the CPU (VDPBF16PS): the row and the centre
    each rounded once more (to bfloat16, u = 2^-8), products exact in float32, a float32 sum of d
    terms; a 2^-100 term covers centre elements flushed to zero (denormals as zero)."""
    return 1.1 * (2.0 * UBF16 + (1.01 * d + 4) * U32) + TENSOR_CORE_FLOOR


def rel_tensor_core(dot: str, d: int) -> float:
    """Relative bound of a score from GPU products, by how ``tl.dot`` forms them (``dot``, one of
    ``ncfast.triton.ncc.DOTS``): tensor cores "tf32", "tf32x3" or "bf16"; "ieee" is float32 FMAs,
    ``rel_float(U32, d)``.

    Tensor cores add each instruction's k products (k = 8 for tf32, 16 for bf16) and the
    accumulator after aligning them to the largest and truncating (Fasi, Higham, Mikaitis and
    Pranesh 2021, "Numerical behavior of NVIDIA tensor cores"): under (k + 1) units in the last
    place of the largest, 2 u (1 + 1/k) per product-add over a long sum. We take 2.5 u (A), and
    an operand may be truncated to tf32 rather than rounded (the tl.dot docs warn of it),
    2 u_tf32 with u_tf32 = 2^-11:

    - "tf32":   1.1 (2 * 2 u_tf32 + A);
    - "tf32x3": each operand a = a_hi + a_lo with |a - a_hi| <= 2 u_tf32 |a| and a_lo's own error
      <= 2 u_tf32 |a - a_hi|; dropping a_lo b_lo, the product errs by at most 3 (2 u_tf32)^2 |a||b|
      (bounded by 4 (2 u_tf32)^2), and three products accumulate, 3 A;
    - "bf16":   both operands rounded to bfloat16 (u_bf16 = 2^-8, round to nearest), products exact
      in float32: 1.1 (2 u_bf16 + A).

    Each adds the 2^-100 floor for flushed subnormals (``TENSOR_CORE_FLOOR``).
    """
    acc = (1.01 * d + 4) * U32
    if dot == "ieee":
        return 1.1 * acc
    tc = 2.5 * acc
    if dot == "tf32":
        return 1.1 * (2.0 * 2.0 * UTF32 + tc) + TENSOR_CORE_FLOOR
    if dot == "tf32x3":
        return 1.1 * (4.0 * (2.0 * UTF32) ** 2 + 3.0 * tc) + TENSOR_CORE_FLOOR
    if dot == "bf16":
        return 1.1 * (2.0 * UBF16 + tc) + TENSOR_CORE_FLOOR
    raise ValueError(f"dot: expected 'ieee', 'tf32', 'tf32x3' or 'bf16', got {dot!r}")


def flush_floor(d: int, cmax: float) -> float:
    """Absolute error of flushed subnormal inputs, products and partial sums in a sweep whose
    products flush them (bfloat16 FMAs, tensor cores); added to omax as this over rel, so the
    bound stays rel (||x|| cmax + omax)."""
    return underflow_floor(2.0**-121, d, cmax)


def score_bound(rel: float, row_norms, cmax: float, omax: float):
    """Worst-case |computed - exact| of one score offsets_c + x . c_c: rel (||x|| cmax + omax)."""
    return rel * (row_norms * cmax + omax)
