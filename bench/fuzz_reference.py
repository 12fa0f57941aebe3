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
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import warnings


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=("metrics", "stream", "ncc", "solver"), default="metrics")
    ap.add_argument("--backend", choices=("cpp", "torch", "triton"), default="cpp",
                    help="NCFAST_BACKEND; triton runs in Triton's CPU interpreter")
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
    sq = sq[sq > 4.0 * (d + 4) * 2.0 ** -53]
    return 4.0 * d * 2.0 ** -53 / sq.min() if sq.size else 0.0


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
    z = torch.randn(c, q, generator=g, dtype=torch.float64)[y] + spread * torch.randn(n, q, generator=g,
                                                                                  dtype=torch.float64)
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
    desc = dict(it=it, mode=mode, c=c, d=d, live=k, latent=q, n=n, dtype=str(dtype), weighting=weighting,
                stream=stream, ranks=got.ranks)
    return diffs, desc


def main() -> int:
    warnings.simplefilter("ignore")  # the reference's 0 / 0 warns; the values are compared
    rng = random.Random(ARGS.seed)
    case = {"metrics": case_metrics, "stream": case_stream, "ncc": case_ncc, "solver": case_solver}[ARGS.what]
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
    print(f"{ARGS.what}, backend {ARGS.backend}: {ARGS.cases} cases, {found} with a finding")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
