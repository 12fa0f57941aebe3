"""Random cases against the float64 reference: the search that found the cases tests/ now pins.

    python bench/fuzz_reference.py --what metrics --backend cpp --cases 300 --seed 0
    python bench/fuzz_reference.py --what ncc --backend triton --cases 100   # Triton's interpreter
    python bench/fuzz_reference.py --what solver --cases 200                 # the eigensolvers' corners

Not a test (CI does not run it): each case is drawn at random from the awkward corners (dtypes down
to bfloat16, absent classes, NaN rows under nan_policy="omit", the collapse regime with a shift of
1e3, features on a subspace, duplicated means, rows at midpoints between means) and the differences
from ``ncfast.reference`` beyond the 1e-6 of docs/metrics.md are printed, one line each, with the case that gave
them. A case that finds something belongs in tests/ as a fixed case. Exit status 1 if any did.

--what metrics: nc_metrics (weight, bias, logits, superclass; balanced and sample weighting).
--what stream:  ClassMoments fed in shuffled batches, shards merged in random order, then
                metrics_from_moments, against the one-shot reference.
--what ncc:     ncc_assign and classifier_decisions, both modes, against the exact argmin.
--what solver:  what the eigen- and singular-value solvers see (ncfast._linalg): ReLU layers with
                dead units (all-zero columns at random positions) in D up to 4,096, duplicated
                columns, rank 1 to D, dense low-rank mixtures, clustered and repeated eigenvalues;
                nc_metrics, or metrics_from_moments on streamed batches. For D > 512 the reference
                runs on the non-zero columns (padded with zero columns to C - 1, so that
                r = min(D, C - 1) is unchanged): zero columns are exact zero rows of every
                covariance and change no metric, and the reference's O(N D^2) sums take ~8 s per
                covariance at D = 4,096. Live blocks that are singular stay at <= 40 columns (the
                reference's 50-digit VCI).
--what magnitude: one small well-conditioned problem (C in {2, 3, 5, 12}, D in {1, 3, 8, 24}, rows at
                class-mean midpoints in half the cases), max |x| normalised to [1, 2), then scaled by an
                exact power of two 2^e, e near and at each format's limits (float16 2^-20..2^15,
                bfloat16 / float32 2^-140..2^127, float64 2^-1070..2^1023); the classifier by 2^bw, its
                bias by 2^(e + bw) (|e + bw| <= 1000), logits by their own 2^l. Compared with the
                UNSCALED problem (the scaled values times 2^-e, exact): ncc_assign and
                classifier_decisions, both modes, equal to the reference's exact answer at any finite
                scale; nc_metrics equal to its own float64 result on the unscaled data (itself checked
                against the reference to 1e-6) to 1e-9 relative, ncc_accuracy and ncc_mismatch exactly,
                feature_norm and logits_norm times 2^e and 2^l. float64 features may be refused with a
                ValueError saying "magnitude" (sums of squares out of float64's normal range), but not
                with max |x| in [2^-400, 2^401); the other dtypes never. Refusals are counted per dtype.
--what headers: ncfast.measure.main in this process, under a 6 GiB address-space cap, on a valid
                features + labels (+ --weight) set (.npy, .safetensors written by hand, .pt) with one
                hostile change: truncated, empty, bytes appended or flipped in the header, shapes of
                2^40..2^62 / negative / strings / floats, unknown or missing dtypes, bad data_offsets,
                header length 0 / 2^63 / past the end, a header that is a list / number / not UTF-8,
                int or bool features, float labels, a label of 2^40 / 2^62 / negative, --num-classes
                out of range, a stray ._x_1.npy among shards, shards x_1, x_2, x_10 with y_01, y_02,
                y_10 (must pair by number), x_a, x_c with y_b, y_d (must be refused), unequal shard
                counts; and harmless ones (.npy 2.0, big-endian .npy, __metadata__, header padding).
                Each must exit 0 with the metrics nc_metrics gives on what the file really holds (read
                back by numpy / the safetensors layout / torch.load; 1e-9), or exit 2 with exactly one
                "error:" line naming the file (or FEATURES / LABELS / --num-classes / --weight).
--what nonfinite: one NaN, +Inf or -Inf at a random place of one argument of nc_metrics (features,
                weight, bias, logits, ood_features, class_means; float superclass and labels),
                class_distance, ncc_assign, classifier_decisions, ncc_and_decisions, ncc_mismatch,
                ClassMoments.update and metrics_from_moments (features in all four float dtypes): a
                ValueError naming the argument (TypeError too for float labels / superclass /
                decisions), and ClassMoments left as it was; with nan_policy="omit" the row is dropped
                and the result equals the reference on the kept rows. NaN in a row of the means is
                documented ("rows that hold NaN never win"): there the answer must equal the
                reference's with that row no candidate; Inf in the means is refused.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import os
import random
import resource
import sys
import tempfile
import warnings
from pathlib import Path


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--what", choices=("metrics", "stream", "ncc", "solver", "magnitude", "headers", "nonfinite"), default="metrics"
    )
    ap.add_argument(
        "--backend",
        choices=("cpp", "torch", "triton"),
        default="cpp",
        help="NCFAST_BACKEND; triton runs in Triton's CPU interpreter",
    )
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-dim", type=int, default=4096, help="--what solver: largest D drawn")
    return ap.parse_args()


ARGS = _parse()
if ARGS.backend == "triton":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit sees the kernels
os.environ["NCFAST_BACKEND"] = ARGS.backend

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ncfast  # noqa: E402
import ncfast.measure as measure_cli  # noqa: E402
from ncfast import reference as ref  # noqa: E402

LOW = (torch.float16, torch.bfloat16)


def _close(a: float, b: float, rtol: float = 1e-6, atol: float = 1e-10) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= rtol * abs(b) + atol


def _uniformity_atol(x, y, num_classes, weighting, d: int) -> float:
    """The documented accuracy of ncfast's uniformity terms (ncfast.pairwise): log(1 / ||u_i - u_j||)
    comes from 2 - 2 cos_ij of the Gram, which carries an absolute error of about D eps, so a term is
    good to about D eps / (2 - 2 cos_ij) absolute; taken at the two closest directions (equal ones
    excepted: both sides make those +inf), with a factor 4 to spare."""
    h, yy, k = ref._prepare(x, y, num_classes)
    mt, _ = ref._mt(h, yy, k, weighting)
    u = mt / np.linalg.norm(mt, axis=1, keepdims=True)
    sq = ((u[:, None, :] - u[None, :, :]) ** 2).sum(-1)[np.triu_indices(len(u), 1)]
    sq = sq[sq > 4.0 * (d + 4) * 2.0**-53]
    return 4.0 * d * 2.0**-53 / sq.min() if sq.size else 0.0


def _diffs(got, want, keys, x, y, num_classes, weighting, d: int) -> list[str]:
    """Each metric of ``keys`` where ncfast and the reference differ beyond 1e-6 (relative), the
    uniformity terms beyond their documented bound where that is looser."""
    atol = None
    out = []
    for key in keys:
        tol = 1e-10
        if key.startswith("uniformity"):
            atol = _uniformity_atol(x, y, num_classes, weighting, d) if atol is None else atol
            tol = max(tol, atol if key == "uniformity_mean" else 2.0 * math.sqrt(abs(want[key])) * atol + atol**2)
        if not _close(got[key], want[key], atol=tol):
            out.append(f"{key}: ncfast {got[key]} reference {want[key]}")
    return out


def _features(rng: random.Random, g: torch.Generator, y: torch.Tensor, k: int, d: int, dtype):
    """Class means (some duplicated) plus a spread, a shift and sometimes a subspace."""
    spread = 1.0 if dtype in LOW else rng.choice([1.0, 1e-2, 1e-4])
    shift = rng.choice([0.0, 5.0]) if dtype in LOW else rng.choice([0.0, 10.0, 1e3])
    means = 3.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    noise = spread * torch.randn(len(y), d, generator=g, dtype=torch.float64)
    if d > 2 and rng.random() < 0.2:
        noise[:, : d // 2] = 0.0  # within-class spread on a subspace only
    return (means[y] + noise + shift).to(dtype), dict(spread=spread, shift=shift)


def _labels(rng: random.Random, g: torch.Generator, n: int, c: int, k: int):
    """n labels over c present classes among k (the others absent), each present class at least once."""
    present = torch.tensor(sorted(rng.sample(range(k), c)))
    y = present[torch.randint(0, c, (n,), generator=g)]
    y[:c] = present
    return y


def case_metrics(it: int, rng: random.Random):
    c = rng.choice([2, 3, 6, 13, 40])
    k = c + rng.choice([0, 0, 2])
    d = rng.choice([1, 4, 9, 20, 33])
    n = rng.choice([c, 3 * c, 100, 400])
    dtype = rng.choice([torch.float64, torch.float32, torch.float16, torch.bfloat16])
    weighting = rng.choice(["balanced", "sample"])
    g = torch.Generator().manual_seed(it)
    y = _labels(rng, g, n, c, k)
    x, desc = _features(rng, g, y, k, d, dtype)
    kw = dict(num_classes=k, superclass=torch.arange(k) % 2, weighting=weighting)
    if rng.random() < 0.7:
        kw.update(weight=torch.randn(k, d, generator=g), bias=torch.randn(k, generator=g))
    logits = torch.randn(n, k, generator=g) if rng.random() < 0.5 else None
    omit = rng.random() < 0.3
    if omit:
        x[-1, 0] = float("nan")
    keep = torch.isfinite(x.to(torch.float64)).all(1)
    if len(torch.unique(y[keep])) < 2:
        return [], None
    got = ncfast.nc_metrics(x, y, logits=logits, nan_policy="omit" if omit else "raise", **kw)
    want = ref.nc_metrics(x[keep], y[keep], logits=None if logits is None else logits[keep], **kw)
    diffs = _diffs(got, want, want, x[keep], y[keep], k, weighting, d)
    if set(got) != set(want):
        diffs.append(f"keys in one only: {sorted(set(got) ^ set(want))}")
    desc.update(it=it, c=c, k=k, d=d, n=n, dtype=str(dtype), weighting=weighting, omit=omit)
    return diffs, desc


def case_stream(it: int, rng: random.Random):
    c = rng.choice([2, 3, 7, 20])
    d = rng.choice([1, 3, 8, 17])
    n = rng.choice([2 * c, 60, 300])
    dtype = rng.choice([torch.float64, torch.float32, torch.bfloat16])
    weighting = rng.choice(["balanced", "sample"])
    g = torch.Generator().manual_seed(it)
    y = _labels(rng, g, n, c, c)
    x, desc = _features(rng, g, y, c, d, dtype)
    counts = torch.bincount(y, minlength=c) if weighting == "balanced" else None
    cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.choice([1, 2, 5]))))
    shards = []
    for lo, hi in zip([0] + cuts, cuts + [n]):
        shard = ncfast.ClassMoments(c, d, class_counts=counts)
        rows = list(range(lo, hi))
        rng.shuffle(rows)
        for part in (rows[: len(rows) // 2], rows[len(rows) // 2 :]):
            if part:
                shard.update(x[part], y[part])
        shards.append(shard)
    rng.shuffle(shards)
    total = shards[0]
    for shard in shards[1:]:
        total.merge(shard)
    got = ncfast.metrics_from_moments(total, weighting=weighting)
    want = ref.nc_metrics(x, y, num_classes=c, weighting=weighting)
    desc.update(it=it, c=c, d=d, n=n, dtype=str(dtype), weighting=weighting, shards=len(shards))
    return _diffs(got, want, got, x, y, c, weighting, d), desc


def case_ncc(it: int, rng: random.Random):
    c = rng.choice([1, 2, 5, 33, 200])
    d = rng.choice([1, 2, 7, 64, 130])
    n = rng.choice([1, 17, 300])
    dtype = rng.choice([torch.float64, torch.float32, torch.float16, torch.bfloat16])
    g = torch.Generator().manual_seed(it)
    means = torch.randn(c, d, generator=g, dtype=torch.float64) * rng.choice([1.0, 1e-3]) + rng.choice([0.0, 1e3])
    if c > 2 and rng.random() < 0.5:
        means[1] = means[0]  # an exact tie
    pick = torch.randint(0, c, (n,), generator=g)
    kind = rng.choice(["on", "near", "mid", "random"])
    if kind == "on":
        x = means[pick]
    elif kind == "near":
        x = means[pick] + 1e-6 * torch.randn(n, d, generator=g, dtype=torch.float64)
    elif kind == "mid":
        x = (means[pick] + means[(pick + 1) % c]) / 2
    else:
        x = torch.randn(n, d, generator=g, dtype=torch.float64) + means.mean(0)
    x = x.to(dtype)
    m = means.to(rng.choice([torch.float64, torch.float32]))
    bias = -(m.to(torch.float64).square().sum(1) / 2)  # logits that tie where the distances do
    want_ncc = torch.from_numpy(ref.ncc_assign(x, m))
    want_dec = torch.from_numpy(ref.decisions(x, m, bias))
    diffs = []
    for mode in ("exact", "fast"):
        wrong = int((ncfast.ncc_assign(x, m, mode=mode).cpu() != want_ncc).sum())
        if wrong:
            diffs.append(f"ncc_assign {mode}: {wrong} of {n} rows differ from the exact argmin")
        wrong = int((ncfast.classifier_decisions(x, m, bias, mode=mode).cpu() != want_dec).sum())
        if wrong:
            diffs.append(f"classifier_decisions {mode}: {wrong} of {n} rows differ from the exact argmax")
    return diffs, dict(it=it, c=c, d=d, n=n, dtype=str(dtype), mdtype=str(m.dtype), kind=kind)


def case_solver(it: int, rng: random.Random):
    c = rng.choice([2, 3, 5, 10])
    d = min(ARGS.max_dim, rng.choice([4, 16, 64, 512, 1024, 4096]))
    mode = rng.choice(["dead", "dup", "lowrank", "cluster", "rank1"])
    n = rng.choice([2 * c + 1, 40, 200, 360])
    dtype = rng.choice([torch.float32, torch.float64])
    weighting = rng.choice(["balanced", "sample"])
    g = torch.Generator().manual_seed(it)
    y = torch.randint(0, c, (n,), generator=g)
    y[:c] = torch.arange(c)
    if mode == "dead":  # ReLU units, full rank on the live block when N - C allows
        k = min(d, rng.choice([1, 5, 20, 60, 96]) if n - c > 100 else rng.choice([1, 5, 20, 40]))
        q = k
    elif mode == "rank1":
        k, q = min(d, rng.choice([1, 3, 20])), 1
    else:
        k = min(d, rng.choice([2, 8, 24, 40]))
        q = rng.randint(1, k)
    spread = rng.choice([1.0, 0.1])
    z = torch.randn(c, q, generator=g, dtype=torch.float64)[y] + spread * torch.randn(
        n, q, generator=g, dtype=torch.float64
    )
    if mode == "dead":
        live = torch.relu(z - rng.choice([0.0, 0.5, 1.5]))
    elif mode == "dup" or mode == "rank1":  # exact copies of the latent columns, times 1, 2 or -0.5
        src = torch.cat([torch.arange(q), torch.randint(0, q, (k - q,), generator=g)])
        scale = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)[torch.randint(0, 3, (k,), generator=g)]
        live = z[:, src] * scale
    elif mode == "lowrank":
        live = z @ torch.randn(q, k, generator=g, dtype=torch.float64)
    else:  # clustered: a few repeated scales (some split by 1e-9) on a rotated basis
        levels = [1.0, 1.0 + 1e-9, 1e-2, 1e-3]
        scales = torch.tensor([rng.choice(levels[: rng.randint(1, 4)]) for _ in range(q)], dtype=torch.float64)
        rot, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        live = (z * scales) @ rot[:q]
    live = live + rng.choice([0.0, 0.0, 3.0])  # a shift keeps the columns non-constant, not zero
    cols = torch.randperm(d, generator=g)[:k].sort().values
    x = torch.zeros(n, d, dtype=torch.float64)
    x[:, cols] = live
    x = x.to(dtype)
    stream = rng.random() < 0.3
    if stream:
        counts = torch.bincount(y, minlength=c) if weighting == "balanced" else None
        m = ncfast.ClassMoments(c, d, class_counts=counts)
        cut = rng.randint(1, n - 1)
        m.update(x[:cut], y[:cut])
        m.update(x[cut:], y[cut:])
        got = ncfast.metrics_from_moments(m, weighting=weighting)
    else:
        got = ncfast.nc_metrics(x, y, weighting=weighting)
    xr = x
    if d > 512:  # the reference on the non-zero columns, padded with zeros up to C - 1 columns
        pad = torch.zeros(n, max(0, c - 1 - k), dtype=dtype)
        xr = torch.cat([x[:, cols], pad], dim=1)
    want = ref.nc_metrics(xr, y, num_classes=c, weighting=weighting)
    if stream:
        want.pop("ncc_accuracy")
    diffs = _diffs(got, want, want, xr, y, c, weighting, d)
    desc = dict(
        it=it,
        mode=mode,
        c=c,
        d=d,
        live=k,
        latent=q,
        n=n,
        dtype=str(dtype),
        weighting=weighting,
        stream=stream,
        ranks=got.ranks,
    )
    return diffs, desc


# ----------------------------------------------------------------------------------- magnitude
STATS: collections.Counter = collections.Counter()  # per-kind tallies printed in the summary
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
EXPONENTS = {  # data normalised to max |x| in [1, 2), then scaled by 2^e: near and at each format's limits
    torch.float16: [-20, -14, -10, -1, 0, 1, 8, 14, 15],
    torch.bfloat16: [-130, -126, -100, -64, -1, 0, 1, 64, 100, 126, 127],
    torch.float32: [-140, -133, -126, -125, -100, -64, -20, 0, 20, 64, 100, 120, 126, 127],
    torch.float64: [
        -1070,
        -1060,
        -1022,
        -1000,
        -900,
        -600,
        -520,
        -500,
        -481,
        -480,
        -470,
        -400,
        -300,
        -100,
        -30,
        0,
        30,
        100,
        300,
        400,
        470,
        480,
        499,
        500,
        501,
        520,
        600,
        900,
        1000,
        1023,
    ],
}
F64_SURE = 400
"""float64 features with max |x| in [2^-400, 2^401) must not be refused: their sums of squares are far
inside float64's normal range."""


def _ldexp(t: torch.Tensor, e: int, dtype=torch.float64) -> torch.Tensor:
    """t * 2^e in float64 (numpy's ldexp: one rounding, none where the result is normal), cast to dtype."""
    return torch.from_numpy(np.ldexp(t.detach().to(torch.float64).numpy(), e)).to(dtype)


def _scaled(t0: torch.Tensor, e: int, dtype, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(t0 * 2^e rounded to dtype, its exact float64 unscaled value, e); e is lowered until the cast is
    finite (a value of [1, 2) may round up to 2^(emax + 1) = inf)."""
    while True:
        s = _ldexp(t0, e, dtype)
        if bool(torch.isfinite(s.to(torch.float64)).all()):
            return s, _ldexp(s, -e), e
        e -= 1


def _normalised(t: torch.Tensor) -> torch.Tensor:
    """t times a power of two so that max |t| is in [1, 2)."""
    top = float(t.abs().max())
    return t if top == 0 else _ldexp(t, -math.frexp(top)[1] + 1)


def _same_or_close(got: float, want: float, rtol: float = 1e-9, atol: float = 1e-12) -> bool:
    return got == want or (math.isnan(got) and math.isnan(want)) or abs(got - want) <= rtol * abs(want) + atol


def _indices_differ(name: str, got: torch.Tensor, want: np.ndarray) -> list[str]:
    wrong = int((got.cpu() != torch.from_numpy(want)).sum())
    return [f"{name}: {wrong} of {len(want)} rows differ from the exact answer on the unscaled data"] if wrong else []


def case_magnitude(it: int, rng: random.Random):
    c = rng.choice([2, 3, 5, 12])
    d = rng.choice([1, 3, 8, 24])
    n = c * rng.choice([2, 3, 6])
    dtype = rng.choice(FLOATS)
    g = torch.Generator().manual_seed(it)
    y = torch.arange(n) % c
    y = y[torch.randperm(n, generator=g)]
    spread = rng.choice([1.0, 0.3])
    x0 = 3.0 * torch.randn(c, d, generator=g, dtype=torch.float64)[y] + spread * torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    x0 = _normalised(x0)
    cm0 = torch.zeros(c, d, dtype=torch.float64).index_add_(0, y, x0) / torch.bincount(y, minlength=c)[:, None]
    mids = rng.random() < 0.5
    if mids:  # rows at midpoints between two class means: ties, in exact arithmetic where representable
        for r in rng.sample(range(n), max(1, n // 4)):
            i, j = rng.sample(range(c), 2)
            x0[r] = (cm0[i] + cm0[j]) / 2
    a = rng.choice(EXPONENTS[dtype])
    x_s, x_u, a = _scaled(x0, a, dtype, rng)
    top = math.frexp(float(x_s.to(torch.float64).abs().max()))[1] - 1  # log2 of max |x|, floored
    desc = dict(it=it, c=c, d=d, n=n, dtype=str(dtype), e=a, max_log2=top, mids=mids)
    diffs = []

    # the class means (ncc_assign), in float64 or float32 where they fit
    mdt = torch.float32 if -120 <= a <= 120 and rng.random() < 0.5 else torch.float64
    m_s, m_u, _ = _scaled(cm0, a, mdt, rng)
    # a classifier at 2^bw, its bias at 2^(a + bw): the decisions of the unscaled problem, with
    # |a + bw| <= 1000 so that the logits of the scaled problem are finite in float64
    wdt = rng.choice([torch.float32, torch.float64])
    bws = [
        b
        for b in ([0, 0, 0] + EXPONENTS[wdt])
        if abs(a + b) <= 1000 and abs(b) <= (120 if wdt == torch.float32 else 1000)
    ]
    bw = rng.choice(bws or [0])
    if rng.random() < 0.3:  # the NCC classifier: W = means, b = -||mu||^2 / 2 (ties where NCC ties)
        w0 = cm0.clone()
        b0 = -(cm0.square().sum(1) / 2)
    else:
        w0 = _normalised(torch.randn(c, d, generator=g, dtype=torch.float64))
        b0 = 2.0 * torch.randn(c, generator=g, dtype=torch.float64)
    w_s, w_u, bw = _scaled(w0, bw, wdt, rng)
    bdt = torch.float32 if abs(a + bw) <= 120 and rng.random() < 0.5 else torch.float64
    b_s, b_u, _ = _scaled(b0, a + bw, bdt, rng)
    desc.update(mdt=str(mdt), wdt=str(wdt), bw=bw, bdt=str(bdt))
    want_ncc = ref.ncc_assign(x_u, m_u)
    want_dec = ref.decisions(x_u, w_u, b_u)
    for mode in ("exact", "fast"):
        for name, call, want in (
            ("ncc_assign", lambda m=mode: ncfast.ncc_assign(x_s, m_s, mode=m), want_ncc),
            ("classifier_decisions", lambda m=mode: ncfast.classifier_decisions(x_s, w_s, b_s, mode=m), want_dec),
        ):
            try:
                diffs += _indices_differ(f"{name} {mode}", call(), want)
            except Exception as e:  # noqa: BLE001 - a hard contract: any finite scale
                diffs.append(f"{name} {mode}: {type(e).__name__}: {str(e)[:200]}")

    # nc_metrics: the unscaled float64 problem's metrics (checked against the reference), then the scaled
    kw_s, kw_u = dict(num_classes=c), dict(num_classes=c)
    if c > 2 and rng.random() < 0.5:
        kw_s["superclass"] = kw_u["superclass"] = torch.arange(c) % 2
    if rng.random() < 0.5:
        kw_s.update(weight=w_s, bias=b_s)
        kw_u.update(weight=w_u, bias=b_u)
    lx = None
    if rng.random() < 0.4:
        ldt = rng.choice([torch.float32, torch.float64])
        lx = rng.choice(EXPONENTS[ldt][1:-1])
        kw_s["logits"], kw_u["logits"], lx = _scaled(torch.randn(n, c, generator=g, dtype=torch.float64), lx, ldt, rng)
        desc.update(logits_e=lx, ldt=str(ldt))
    desc.update(metrics_args=sorted(k for k in kw_s if k != "num_classes"))
    truth = ncfast.nc_metrics(x_u, y, **kw_u)
    want = ref.nc_metrics(x_u, y, **kw_u)
    # the reference's vci carries about 1e-9 absolute where Sigma_W is singular (N - C < D): seed
    # 20261208, case 37 (C = 12, D = 24, N = 24) gave 9.2e-10 where 80-digit mpmath gives 1.3e-73 and
    # ncfast 0.0; vci is in [0, 1], so it is compared to 1e-8 absolute here
    # Two more places where the reference and ncfast may part by rounding alone, both tested exactly
    # elsewhere: at a midpoint row the tie is decided by the last bit of the class means, which the
    # reference sums differently (seed 20261211, case 145: ncfast's mean is the correctly rounded
    # one, the reference's 1 ulp off, ncc_mismatch 0.0 against 0.25); and a centred class mean of
    # length ~0 has no direction (exactly 0 in one: NaN cosines; 1e-17 in the other: finite; seeds
    # 20261210 case 158, 20261214 case 108, C = 12 classes on D = 1).
    skip = {"vci"}
    if mids:
        skip |= {"ncc_accuracy", "ncc_mismatch"}
    norms = ncfast.class_moments(x_u, y, scatter=False, unit_sums=False).centred_means().norm(dim=1)
    if float(norms.min()) <= 1e-12 * float(norms.max()):
        skip |= {"equiangularity", "coherence", "uniformity_mean", "uniformity_var", "duality_mean", "duality_std"}
    lines = _diffs(truth, want, [k for k in want if k not in skip], x_u, y, c, "balanced", d)
    if "vci" in want and not _close(truth["vci"], want["vci"], atol=1e-8):
        lines.append(f"vci: ncfast {truth['vci']} reference {want['vci']}")
    diffs += [f"unscaled float64 vs reference: {line}" for line in lines]
    try:
        got = ncfast.nc_metrics(x_s, y, **kw_s)
    except ValueError as e:
        if "magnitude" not in str(e):
            return diffs + [f"nc_metrics: ValueError: {str(e)[:200]}"], desc
        STATS[f"magnitude refused, {dtype}"] += 1
        STATS[f"magnitude refused, message starts {str(e).split(':')[0]!r}"] += 1
        if dtype != torch.float64:
            diffs.append(f"nc_metrics refused {dtype} features (every finite scale must work): {str(e)[:160]}")
        elif -F64_SURE <= top <= F64_SURE:
            diffs.append(f"nc_metrics refused float64 features of max |x| 2^{top}: {str(e)[:160]}")
        return diffs, desc
    except Exception as e:  # noqa: BLE001
        return diffs + [f"nc_metrics: {type(e).__name__}: {str(e)[:200]}"], desc
    STATS[f"magnitude measured, {dtype}"] += 1
    if set(got) != set(truth):
        diffs.append(f"nc_metrics keys in one only: {sorted(set(got) ^ set(truth))}")
    for key in sorted(set(got) & set(truth)):
        g_, w_ = float(got[key]), float(truth[key])
        if key in ("feature_norm", "logits_norm"):  # scales by 2^e (a subnormal result carries less)
            e = a if key == "feature_norm" else lx
            ok = _same_or_close(math.ldexp(g_, -e), w_, atol=max(1e-12, math.ldexp(2.0**-1074, 2 - e)))
        elif key in ("ncc_accuracy", "ncc_mismatch"):
            ok = g_ == w_
        else:
            ok = _same_or_close(g_, w_)
        if not ok:
            diffs.append(
                f"nc_metrics {key}: scaled {g_} unscaled {w_}" + (f" (x 2^{a})" if key == "feature_norm" else "")
            )
    return diffs, desc


# ------------------------------------------------------------------------------------- headers
ST_CODES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
MUTATIONS = [  # (name, the file it hits); the values are drawn in _mutate
    ("none", None),
    ("truncate", "any"),
    ("empty", "any"),
    ("append", "any"),
    ("flip", "any"),
    ("shape", "npy/st"),
    ("dtype", "npy/st"),
    ("offsets", "st"),
    ("header_len", "st"),
    ("header_json", "st"),
    ("npy_v2", "npy"),
    ("npy_big_endian", "npy"),
    ("st_metadata", "st"),
    ("st_padding", "st"),
    ("pt_dict2", "pt"),
    ("pt_list", "pt"),
    ("int_features", "features"),
    ("bool_features", "features"),
    ("float_labels", "labels"),
    ("label_value", "labels"),
    ("int32_labels", "labels"),
    ("num_classes", None),
    ("stray_appledouble", None),
    ("pair_numbers", None),
    ("pair_names", None),
    ("shard_count", None),
]
MUST_ACCEPT = {"none", "npy_v2", "st_metadata", "st_padding", "int32_labels", "pair_numbers"}
# bytes appended to a .pt may still load (a zip is read from its end): there, exit 0 is fine too
MUST_REFUSE = {
    "truncate",
    "empty",
    "append",
    "pair_names",
    "shard_count",
    "int_features",
    "bool_features",
    "float_labels",
}


def _npy_bytes(arr: np.ndarray, header: str | None = None, version: int = 1) -> bytes:
    """A .npy file, written by hand so that its header can be anything."""
    if header is None:
        header = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
            np.lib.format.dtype_to_descr(arr.dtype),
            tuple(arr.shape),
        )
    hb = header.encode("latin1")
    pre = 10 if version == 1 else 12
    hb += b" " * ((-(pre + len(hb) + 1)) % 64) + b"\n"
    size = len(hb).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + size + hb + np.ascontiguousarray(arr).tobytes()


def _st_bytes(
    t: torch.Tensor,
    meta: dict | None = None,
    *,
    header: bytes | None = None,
    length: int | None = None,
    data: bytes | None = None,
) -> bytes:
    """A .safetensors file of one tensor "t" (8-byte little-endian header length, JSON header, data)."""
    raw = t.contiguous().view(torch.uint8).numpy().tobytes() if data is None else data
    if header is None:
        entry = {"dtype": ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [0, len(raw)]}
        header = json.dumps({"t": {**entry, **(meta or {})}}).encode()
    n = len(header) if length is None else length
    return n.to_bytes(8, "little") + header + raw


def _write(path: Path, t: torch.Tensor) -> Path:
    fmt = path.suffix
    if fmt == ".npy":
        path.write_bytes(_npy_bytes(t.numpy()))
    elif fmt == ".safetensors":
        path.write_bytes(_st_bytes(t))
    else:
        torch.save(t.clone(), path)
    return path


def _read_back(path: Path) -> torch.Tensor:
    """What a file really holds, by each format's own rules (numpy, the safetensors layout, torch.load)."""
    if path.suffix == ".npy":
        a = np.load(path, allow_pickle=False)
        return torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))  # torch takes native order only
    if path.suffix == ".pt":
        obj = torch.load(path, weights_only=True, map_location="cpu")  # as ncfast.measure: the location tag is not data
        if isinstance(obj, dict):
            (obj,) = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        assert isinstance(obj, torch.Tensor), type(obj)
        return obj
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    meta = {k: v for k, v in json.loads(blob[8 : 8 + n]).items() if k != "__metadata__"}
    ((_, entry),) = meta.items()
    dtype = {v: k for k, v in ST_CODES.items()}[entry["dtype"]]
    lo, hi = entry["data_offsets"]
    raw = blob[8 + n + lo : 8 + n + hi]
    assert lo == 0 and 8 + n + hi == len(blob), "data_offsets disagree with the file"
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    return t.view(dtype).reshape(entry["shape"])


def _run_measure(argv: list[str]) -> tuple[int | str, str]:
    """ncfast.measure.main in this process: (exit code, or the exception it raised; stderr)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = measure_cli.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        except BaseException as e:  # noqa: BLE001 - MemoryError, a traceback: a finding
            if isinstance(e, KeyboardInterrupt):
                raise
            rc = f"{type(e).__name__}: {str(e)[:200]}"
    return rc, err.getvalue()


def _mutate(kind: str, path: Path, t: torch.Tensor, rng: random.Random) -> str:
    """Rewrite path (a valid file of t) with one hostile change of the given kind; returns the detail."""
    blob = path.read_bytes()
    fmt = path.suffix
    if kind == "truncate":
        k = rng.randrange(1, len(blob))
        path.write_bytes(blob[:k])
        return f"cut to {k} of {len(blob)} bytes"
    if kind == "empty":
        path.write_bytes(b"")
        return "0 bytes"
    if kind == "append":
        extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 64])))
        path.write_bytes(blob + extra)
        return f"{len(extra)} bytes appended"
    if kind == "flip":
        end = {
            ".npy": 10 + int.from_bytes(blob[8:10], "little"),
            ".safetensors": 8 + int.from_bytes(blob[:8], "little"),
        }.get(fmt, len(blob))
        b = bytearray(blob)
        where = sorted(rng.randrange(min(end, len(b))) for _ in range(rng.choice([1, 2, 3])))
        for i in where:
            b[i] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(b))
        return f"bytes {where} flipped (header ends at {end})"
    shape = list(t.shape)
    if kind == "shape":
        i = rng.randrange(len(shape))
        v = rng.choice([2**40, 2**55, 2**62, -shape[i], -1, "30", float(shape[i]), None, [shape[i]], 0])
        new = shape.copy()
        if rng.random() < 0.2:
            new = rng.choice([[], [len(t)] * 3, [t.numel()]])
            v = new
        else:
            new[i] = v
        if fmt == ".npy":
            body = "(" + ", ".join(repr(s) for s in new) + ("," if len(new) == 1 else "") + ")"
            hdr = "{'descr': %r, 'fortran_order': False, 'shape': %s, }" % (
                np.lib.format.dtype_to_descr(t.numpy().dtype),
                body,
            )
            path.write_bytes(_npy_bytes(t.numpy(), hdr))
        else:
            path.write_bytes(_st_bytes(t, {"shape": new}))
        return f"shape {new}"
    if kind == "dtype":
        if fmt == ".npy":
            v = rng.choice(["'<f8'", "'<f2'", "'<i4'", "'|b1'", "'<x9'", "'|O'", "'<c16'", "'V8'", "'<U2'", "3"])
            hdr = "{'descr': %s, 'fortran_order': False, 'shape': %r, }" % (v, tuple(shape))
            if rng.random() < 0.2:
                v, hdr = "missing", "{'fortran_order': False, 'shape': %r, }" % (tuple(shape),)
            path.write_bytes(_npy_bytes(t.numpy(), hdr))
            return f"descr {v}"
        v = rng.choice(["F64", "F16", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XX", "", 7, None, "missing"])
        meta = {"dtype": v}
        if v == "missing":
            hdr = json.dumps({"t": {"shape": shape, "data_offsets": [0, t.numel() * t.element_size()]}}).encode()
            path.write_bytes(_st_bytes(t, header=hdr))
        else:
            path.write_bytes(_st_bytes(t, meta))
        return f"dtype {v!r}"
    nbytes = t.numel() * t.element_size()
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    if kind == "offsets":
        v = rng.choice(
            [
                [0, nbytes + 16],
                [nbytes, 0],
                [-8, nbytes - 8],
                [8, nbytes + 8],
                [0],
                [0.0, float(nbytes)],
                ["0", str(nbytes)],
                [0, 2**63],
                None,
            ]
        )
        data = b"\0" * 8 + raw if v == [8, nbytes + 8] else raw  # the hole: the bytes are there, 8 late
        path.write_bytes(_st_bytes(t, {"data_offsets": v}, data=data))
        return f"data_offsets {v}"
    if kind == "header_len":
        n = len(blob) - 8 - nbytes
        v = rng.choice([0, 2**63, 2**64 - 1, len(blob), len(blob) - 8 + 1, n + 1, n - 1, 100 << 20])
        path.write_bytes(v.to_bytes(8, "little") + blob[8:])
        return f"header length field {v} (true {n})"
    if kind == "header_json":
        v = rng.choice(
            [
                b"[1, 2]",
                b"42",
                b"null",
                b'"t"',
                b"\xff\xfe\x00{",
                b"{",
                b"{}",
                b'{"t": 1}',
                b'{"t": {"dtype": "F32"}, "u": {}}',
                json.dumps({"t": {}}).encode(),
            ]
        )
        path.write_bytes(_st_bytes(t, header=v))
        return f"header {v!r}"
    if kind == "npy_v2":
        path.write_bytes(_npy_bytes(t.numpy(), version=2))
        return "format version 2.0"
    if kind == "npy_big_endian":
        arr = t.numpy().astype(t.numpy().dtype.newbyteorder(">"))
        path.write_bytes(_npy_bytes(arr))
        return f"descr {np.lib.format.dtype_to_descr(arr.dtype)}"
    if kind == "st_metadata":
        hdr = json.loads(blob[8 : len(blob) - nbytes])
        hdr["__metadata__"] = {"format": "pt", "note": "x"}
        path.write_bytes(_st_bytes(t, header=json.dumps(hdr).encode()))
        return "__metadata__ added"
    if kind == "st_padding":
        path.write_bytes(_st_bytes(t, header=blob[8 : len(blob) - nbytes] + b" " * rng.choice([1, 5, 8])))
        return "header padded with spaces"
    if kind == "pt_dict2":
        torch.save({"a": t, "b": t[:1].clone()}, path)
        return "a dict of two tensors"
    if kind == "pt_list":
        torch.save([t], path)
        return "a list holding the tensor"
    raise AssertionError(kind)


def case_headers(it: int, rng: random.Random, kind: str | None = None):
    with tempfile.TemporaryDirectory(prefix="ncfuzz_") as tmp:
        return _case_headers(it, rng, Path(tmp), kind)


def _case_headers(it: int, rng: random.Random, tmp: Path, kind: str | None):
    c = rng.choice([2, 3, 5])
    d = rng.choice([1, 3, 8])
    n = rng.choice([2 * c, 20, 45])
    g = torch.Generator().manual_seed(it)
    kind, target = (kind, None) if kind else rng.choice(MUTATIONS)
    fmts = {"npy": ".npy", "st": ".safetensors", "pt": ".pt"}
    if target in ("npy", "st", "pt"):
        fx = fy = fw = fmts[target]
    elif target == "npy/st":
        fx = fy = fw = fmts[rng.choice(["npy", "st"])]
    else:
        fx, fy, fw = (rng.choice(list(fmts.values())) for _ in range(3))
    xdt = rng.choice([torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if fx != ".npy" else []))
    y = torch.arange(n) % c
    y = y[torch.randperm(n, generator=g)]
    x = (3.0 * torch.randn(c, d, generator=g)[y] + torch.randn(n, d, generator=g)).to(xdt)
    w = torch.randn(c, d, generator=g) if rng.random() < 0.4 else None
    desc = dict(it=it, kind=kind, c=c, d=d, n=n, xdt=str(xdt), fx=fx, fy=fy, weight=w is not None and fw)
    argv_extra, numc = [], None
    if rng.random() < 0.3:
        argv_extra += ["--block-rows", str(rng.choice([1, 7, 1000]))]
    files = {}  # role -> path (the single files)
    fdir, ydir = tmp / "features", tmp / "labels"
    fdir.mkdir(), ydir.mkdir()
    tokens: set[str] = set()
    detail = ""
    if kind in ("stray_appledouble", "pair_numbers", "pair_names", "shard_count"):
        names = {
            "pair_names": (["x_a", "x_c"], ["y_b", "y_d"]),
            "shard_count": (["x_1", "x_2"], ["y_1", "y_2", "y_3"]),
            "pair_numbers": (["x_1", "x_2", "x_10"], ["y_01", "y_02", "y_10"]),
            "stray_appledouble": (["x_1", "x_2"], ["y_1", "y_2"]),
        }[kind]
        k = len(names[0])
        xs = [(3.0 * torch.randn(c, d, generator=g)[y] + torch.randn(n, d, generator=g)).to(xdt) for _ in range(k)]
        ys = [y[torch.randperm(n, generator=g)] for _ in range(len(names[1]))]
        for name, t in zip(names[0], xs):
            _write(fdir / f"{name}{fx}", t)
        for name, t in zip(names[1], ys):
            _write(ydir / f"{name}{fy}", t)
        if kind == "stray_appledouble":  # macOS's AppleDouble companion of x_1: not an array at all
            stray = fdir / "._x_1.npy"
            stray.write_bytes(
                b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(rng.randrange(256) for _ in range(4000))
            )
            tokens |= {str(stray)}
        tokens |= {str(fdir), str(ydir), "LABELS", "FEATURES"}
        feats, labels = fdir, ydir
        truth_x, truth_y = torch.cat(xs[: len(ys)]), torch.cat(ys[: len(xs)])  # natural order: 1, 2, 10
    else:
        files["FEATURES"] = _write(tmp / f"x{fx}", x)
        files["LABELS"] = _write(tmp / f"y{fy}", y)
        if w is not None:
            files["--weight"] = _write(tmp / f"w{fw}", w)
            argv_extra += ["--weight", str(files["--weight"])]
        feats, labels = files["FEATURES"], files["LABELS"]
        truth_x, truth_y = None, None
        if kind == "num_classes":
            numc = rng.choice([c - 1, 0, -1, 2**40, 2**62, c + 2, c])
            argv_extra += ["--num-classes", str(numc)]
            if w is not None and numc != c:
                argv_extra = argv_extra[: argv_extra.index("--weight")] + argv_extra[argv_extra.index("--weight") + 2 :]
                desc["weight"] = False
            tokens |= {"--num-classes"}
            detail = f"--num-classes {numc}"
        elif kind == "int_features" or kind == "bool_features":
            t = (x.to(torch.float32) * 10).to(torch.int32 if kind == "int_features" else torch.bool)
            _write(feats, t)
            tokens |= {str(feats), "FEATURES"}
        elif kind == "float_labels":
            _write(labels, y.to(rng.choice([torch.float32, torch.float64])))
            tokens |= {str(labels), "LABELS"}
        elif kind == "int32_labels":
            _write(labels, y.to(torch.int32))
        elif kind == "label_value":
            yy = y.clone()
            yy[rng.randrange(n)] = rng.choice([2**40, 2**62, -1, -(2**40)])
            _write(labels, yy)
            detail = f"a label {int(yy.max()) if int(yy.max()) >= c else int(yy.min())}"
            tokens |= {str(labels), "LABELS", "--num-classes"}
        elif kind != "none":
            roles = [
                r
                for r, p in files.items()
                if target in ("any", None)
                or p.suffix
                in {"npy": [".npy"], "st": [".safetensors"], "pt": [".pt"], "npy/st": [".npy", ".safetensors"]}[target]
            ]
            role = rng.choice(roles)
            t = {"FEATURES": x, "LABELS": y, "--weight": w}[role]
            detail = f"{role}: " + _mutate(kind, files[role], t, rng)
            tokens |= {str(files[role])} | ({role} if kind in ("shape", "dtype", "pt_dict2", "pt_list") else set())
            desc["role"] = role
    desc["detail"] = detail
    out = tmp / "out.json"
    rc, err = _run_measure([str(feats), str(labels), "--no-progress", "--json", str(out), *argv_extra])
    STATS[f"headers {kind}: exit {rc if isinstance(rc, int) else 'exception'}"] += 1
    STATS[f"headers, all kinds: exit {rc if isinstance(rc, int) else 'exception'}"] += 1
    if rc == 0:
        if kind in MUST_REFUSE and not (kind == "append" and desc.get("role") and files[desc["role"]].suffix == ".pt"):
            return [f"exit 0 on a file that must be refused; stderr {err.strip()[-200:]!r}"], desc
        try:
            if truth_x is None:
                truth_x, truth_y = _read_back(feats), _read_back(labels)
            ww = _read_back(files["--weight"]) if "--weight" in argv_extra else None
            want = ncfast.nc_metrics(truth_x, truth_y.long(), num_classes=numc, weight=ww)
        except Exception as e:  # noqa: BLE001
            return [f"exit 0, but the file does not read back as valid input: {type(e).__name__}: {str(e)[:160]}"], desc
        got = {k: (math.nan if v is None else v) for k, v in json.loads(out.read_text()).items()}
        diffs = [f"keys in one only: {sorted(set(got) ^ set(want))}"] if set(got) != set(want) else []
        for key in sorted(set(got) & set(want)):
            wv = float(want[key])
            if not (
                got[key] == wv
                or (math.isnan(got[key]) and not math.isfinite(wv))
                or abs(got[key] - wv) <= 1e-9 * abs(wv) + 1e-12
            ):
                diffs.append(f"{key}: measure {got[key]} nc_metrics {wv}")
        return diffs, desc
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    if rc != 2:
        return [f"exit {rc}; stderr {err.strip()[-300:]!r}"], desc
    if kind in MUST_ACCEPT:
        return [f"refused a valid input: {' | '.join(lines)[:300]}"], desc
    if "Traceback" in err or len(lines) != 1:
        return [f"exit 2 with {len(lines)} error lines: {err.strip()[-300:]!r}"], desc
    if not any(tok in lines[0] for tok in tokens):
        return [f"the error names none of {sorted(tokens)}: {lines[0][:300]}"], desc
    return [], desc


def _headers_memory_cap() -> None:
    """The memory cap of --what headers (6 GiB of address space), checked on a valid case first."""
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    diffs, desc = case_headers(-1, random.Random(-1), kind="none")
    if diffs:
        sys.exit(f"--what headers: a valid case fails under the 6 GiB cap: {diffs} {desc}")


# ----------------------------------------------------------------------------------- nonfinite
NONFINITE_TARGETS = [  # (API, argument); "features+omit" is nan_policy="omit"
    ("nc_metrics", "features"),
    ("nc_metrics", "features+omit"),
    ("nc_metrics", "weight"),
    ("nc_metrics", "bias"),
    ("nc_metrics", "logits"),
    ("nc_metrics", "superclass"),
    ("nc_metrics", "labels"),
    ("nc_metrics", "ood_features"),
    ("nc_metrics", "class_means"),
    ("class_distance", "features"),
    ("class_distance", "features+omit"),
    ("class_distance", "labels"),
    ("ncc_assign", "features"),
    ("ncc_assign", "means"),
    ("classifier_decisions", "features"),
    ("classifier_decisions", "weight"),
    ("classifier_decisions", "bias"),
    ("ncc_and_decisions", "features"),
    ("ncc_and_decisions", "means"),
    ("ncc_and_decisions", "weight"),
    ("ncc_and_decisions", "bias"),
    ("ClassMoments.update", "features"),
    ("ClassMoments.update", "features+omit"),
    ("ClassMoments.update", "labels"),
    ("metrics_from_moments", "weight"),
    ("ncc_mismatch", "features"),
    ("ncc_mismatch", "means"),
    ("ncc_mismatch", "decisions"),
]
NONFINITE_TARGETS = [t for t in NONFINITE_TARGETS if hasattr(ncfast, t[0].split(".")[0])]


def _poison(t: torch.Tensor, value: float, rng: random.Random, row: int | None = None) -> tuple[torch.Tensor, int]:
    """A copy of t with one entry (in ``row`` if given) set to value; returns (copy, its row)."""
    t = t.clone()
    flat = t.view(-1) if t.dim() == 1 else t
    if t.dim() == 1:
        i = rng.randrange(len(t)) if row is None else row
        flat[i] = value
        return t, i
    i = rng.randrange(t.shape[0]) if row is None else row
    t[i, rng.randrange(t.shape[1])] = value
    return t, i


def _refused(call, name: str, types=(ValueError,), agree=None) -> list[str]:
    """[] when call() raises one of types naming ``name``; else what went wrong (``agree(result)``: a
    word on whether an accepted result matches a reading the docs leave open)."""
    try:
        out = call()
    except types as e:
        STATS["nonfinite, all: refused"] += 1
        return [] if name in str(e) else [f"refused without naming {name!r}: {type(e).__name__}: {str(e)[:160]}"]
    except Exception as e:  # noqa: BLE001
        return [f"{type(e).__name__} (expected {'/'.join(t.__name__ for t in types)} naming {name!r}): {str(e)[:160]}"]
    return [f"accepted a non-finite {name}: returned {_brief(out)}" + (f"; {agree(out)}" if agree else "")]


def _as_no_candidate(same: bool) -> str:
    return (
        "equal to the reference's answer with that row no candidate"
        if same
        else "DIFFERENT from the reference's answer with that row no candidate"
    )


def _brief(out) -> str:
    if isinstance(out, dict):
        return "{" + ", ".join(f"{k}: {float(v):.4g}" for k, v in list(out.items())[:4]) + ", ...}"
    if isinstance(out, tuple):
        return "(" + ", ".join(_brief(o) for o in out) + ")"
    if isinstance(out, torch.Tensor):
        return f"tensor{tuple(out.shape)} {out.view(-1)[:6].tolist()}"
    return repr(out)[:80]


def _matrix_diffs(got: torch.Tensor, want: np.ndarray, name: str) -> list[str]:
    g = got.detach().cpu().to(torch.float64).numpy()
    same = (g == want) | (np.isnan(g) & np.isnan(want)) | (np.abs(g - want) <= 1e-6 * np.abs(want) + 1e-10)
    if same.all():
        return []
    return [
        f"{name}: {int((~same).sum())} entries differ from the reference on the kept rows, "
        f"e.g. {g[~same][0]} vs {want[~same][0]}"
    ]


def case_nonfinite(it: int, rng: random.Random):
    c = rng.choice([2, 3, 5])
    d = rng.choice([1, 3, 8])
    n = c * rng.choice([2, 3, 6])
    dtype = rng.choice(FLOATS)
    g = torch.Generator().manual_seed(it)
    y = torch.arange(n) % c
    y = y[torch.randperm(n, generator=g)]
    x, _ = _features(rng, g, y, c, d, dtype)
    wdt = rng.choice([torch.float32, torch.float64])
    w = torch.randn(c, d, generator=g, dtype=wdt)
    b = torch.randn(c, generator=g, dtype=wdt)
    logits = torch.randn(n, c, generator=g, dtype=wdt)
    cm = torch.zeros(c, d, dtype=torch.float64).index_add_(0, y, x.to(torch.float64)) / (n // c)
    means = cm.to(rng.choice([torch.float32, torch.float64]))
    api, arg = rng.choice(NONFINITE_TARGETS)
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    omit = arg == "features+omit"
    arg = "features" if omit else arg
    desc = dict(it=it, api=api, arg=arg, value=value, omit=omit, c=c, d=d, n=n, dtype=str(dtype), wdt=str(wdt))
    STATS[f"nonfinite {api}({arg}{', omit' if omit else ''})"] += 1
    bad = dict(
        features=x,
        weight=w,
        bias=b,
        logits=logits,
        means=means,
        class_means=means.clone(),
        ood_features=x[: max(2, n // 2)].clone(),
    )
    row = None
    if arg in bad:
        bad[arg], row = _poison(bad[arg], value, rng)
    ybad = _poison(y.to(rng.choice([torch.float32, torch.float64])), value, rng)[0]  # float labels
    desc["row"] = row
    keep = torch.ones(n, dtype=torch.bool)
    if arg == "features":
        keep[row] = False
    xf = bad["features"]
    name_of = {"class_means": "class_means", "ood_features": "ood"}  # the word the message must hold

    if api == "nc_metrics":
        kw = dict(num_classes=c)
        if arg in ("weight", "bias"):
            kw.update(weight=bad["weight"], bias=bad["bias"])
        elif arg in ("logits", "class_means", "ood_features"):
            kw[arg] = bad[arg]
        elif arg == "superclass":
            kw["superclass"] = _poison((torch.arange(c) % 2).to(torch.float64), value, rng)[0]
        if arg == "labels":
            return _refused(lambda: ncfast.nc_metrics(x, ybad, **kw), "labels", (ValueError, TypeError)), desc
        if arg == "superclass":
            return _refused(lambda: ncfast.nc_metrics(x, y, **kw), "superclass", (ValueError, TypeError)), desc
        if arg == "class_means" and math.isnan(value):  # documented: rows holding NaN are no candidates
            try:
                got = ncfast.nc_metrics(x, y, **kw)
            except Exception as e:  # noqa: BLE001
                return [f"class_means with a NaN row (documented: no candidate): {type(e).__name__}: {e}"], desc
            want = ref.nc_metrics(x, y, **kw)
            return _diffs(got, want, want, x, y, c, "balanced", d), desc
        if not omit:
            agree = None
            if arg == "class_means":  # +-Inf: undocumented; the reference puts such a row infinitely far
                want = ref.nc_metrics(x, y, **kw)
                agree = lambda out: _as_no_candidate(not _diffs(out, want, want, x, y, c, "balanced", d))  # noqa: E731
            return _refused(lambda: ncfast.nc_metrics(xf, y, **kw), name_of.get(arg, arg), agree=agree), desc
        got = ncfast.nc_metrics(xf, y, nan_policy="omit", **kw)
        want = ref.nc_metrics(x[keep], y[keep], **kw)
        diffs = _diffs(got, want, want, x[keep], y[keep], c, "balanced", d)
        if set(got) != set(want):
            diffs.append(f"keys in one only: {sorted(set(got) ^ set(want))}")
        if got.omitted_rows != 1:
            diffs.append(f"omitted_rows {got.omitted_rows}, expected 1")
        return diffs, desc

    if api == "class_distance":
        if arg == "labels":
            return _refused(
                lambda: ncfast.class_distance(x, ybad, num_classes=c), "labels", (ValueError, TypeError)
            ), desc
        if not omit:
            return _refused(lambda: ncfast.class_distance(xf, y, num_classes=c), "features"), desc
        got = ncfast.class_distance(xf, y, num_classes=c, nan_policy="omit")
        return _matrix_diffs(got, ref.class_distance(x[keep], y[keep], c), "class_distance"), desc

    if api in ("ncc_assign", "ncc_and_decisions", "ncc_mismatch"):
        mb = bad["means"]
        if arg == "means" and math.isnan(value):  # documented (ncc_assign): rows that hold NaN never win
            nearest = ref.ncc_assign(x, mb)
            try:
                if api == "ncc_assign":
                    return _indices_differ(
                        "ncc_assign (NaN in a row of means)", ncfast.ncc_assign(x, mb), nearest
                    ), desc
                if api == "ncc_and_decisions":
                    got = ncfast.ncc_and_decisions(x, mb, w, b)[0]
                    return _indices_differ("ncc_and_decisions (NaN in a row of means)", got, nearest), desc
                dec = torch.from_numpy(ref.decisions(x, w, b))
                got, want = ncfast.ncc_mismatch(x, mb, dec), float(np.mean(nearest != dec.numpy()))
                return ([] if got == want else [f"ncc_mismatch (NaN in a row of means): {got} vs {want}"]), desc
            except Exception as e:  # noqa: BLE001
                return [
                    f"{api}: NaN in a row of means (documented for ncc_assign: never wins): "
                    + f"{type(e).__name__}: {str(e)[:160]}"
                ], desc
        dec = torch.from_numpy(ref.decisions(x, w, b))
        agree = None
        if arg == "means":  # +-Inf: undocumented; the reference puts such a row infinitely far
            nearest = ref.ncc_assign(x, mb)
            agree = {
                "ncc_assign": lambda out: _as_no_candidate(bool((out.cpu().numpy() == nearest).all())),
                "ncc_and_decisions": lambda out: _as_no_candidate(bool((out[0].cpu().numpy() == nearest).all())),
                "ncc_mismatch": lambda out: _as_no_candidate(out == float(np.mean(nearest != dec.numpy()))),
            }[api]
        if api == "ncc_assign":
            return _refused(lambda: ncfast.ncc_assign(xf, mb), arg, agree=agree), desc
        if api == "ncc_and_decisions":
            return _refused(
                lambda: ncfast.ncc_and_decisions(xf, mb, bad["weight"], bad["bias"]), arg, agree=agree
            ), desc
        if arg == "decisions":
            return _refused(
                lambda: ncfast.ncc_mismatch(x, means, _poison(dec.to(torch.float64), value, rng)[0]),
                "decisions",
                (ValueError, TypeError),
            ), desc
        return _refused(lambda: ncfast.ncc_mismatch(xf, mb, dec), arg, agree=agree), desc

    if api == "classifier_decisions":
        return _refused(lambda: ncfast.classifier_decisions(xf, bad["weight"], bad["bias"]), arg), desc

    # ClassMoments: a clean first half, the poisoned update refused and atomic (or its row omitted),
    # the rest; weighting "sample" (an omitted row unbalances the classes)
    m = ncfast.ClassMoments(c, d)
    half = n // 2
    first, rest = torch.arange(n) < half, torch.arange(n) >= half
    diffs = []
    if api == "metrics_from_moments":
        m.update(x, y)
        return _refused(
            lambda: ncfast.metrics_from_moments(m, weight=bad["weight"], weighting="sample"), "weight"
        ), desc
    if arg == "features":  # the poisoned row in the second batch
        xf, row = _poison(x, value, rng, row=rng.randrange(half, n))
        keep = torch.arange(n) != row
        desc["row"] = row
    m.update(x[first], y[first])
    before = m.state_dict()
    if arg == "labels":
        diffs += _refused(lambda: m.update(x[rest], ybad[rest]), "labels", (ValueError, TypeError))
    elif not omit:
        diffs += _refused(lambda: m.update(xf[rest], y[rest]), "features")
    if arg == "labels" or not omit:
        after = m.state_dict()
        if any(not torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor)):
            diffs.append("the refused update changed the state")
        m.update(x[rest], y[rest])
        kept = torch.ones(n, dtype=torch.bool)
    else:
        m.update(xf[rest], y[rest], nan_policy="omit")
        kept = keep
        if m.omitted_rows != 1:
            diffs.append(f"omitted_rows {m.omitted_rows}, expected 1")
    got = ncfast.metrics_from_moments(m, weighting="sample")
    want = ref.nc_metrics(x[kept], y[kept], num_classes=c, weighting="sample")
    want.pop("ncc_accuracy")
    return diffs + _diffs(got, want, want, x[kept], y[kept], c, "sample", d), desc


def main() -> int:
    warnings.simplefilter("ignore")  # the reference's 0 / 0 warns; the values are compared
    rng = random.Random(ARGS.seed)
    case = {
        "metrics": case_metrics,
        "stream": case_stream,
        "ncc": case_ncc,
        "solver": case_solver,
        "magnitude": case_magnitude,
        "headers": case_headers,
        "nonfinite": case_nonfinite,
    }[ARGS.what]
    if ARGS.what == "headers":
        _headers_memory_cap()
    found = 0
    with np.errstate(all="ignore"):
        for it in range(ARGS.cases):
            try:
                diffs, desc = case(ARGS.seed * 100_000 + it, rng)
            except Exception as e:  # noqa: BLE001 - any exception on a valid case is a finding
                print(f"case {it}: {type(e).__name__}: {e}")
                found += 1
                continue
            for line in diffs:
                print(f"case {it}: {line}  {desc}")
            found += bool(diffs)
    for key, count in sorted(STATS.items()):
        print(f"  {key}: {count}")
    print(f"{ARGS.what}, backend {ARGS.backend}: {ARGS.cases} cases, {found} with a finding")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
