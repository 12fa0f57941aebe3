"""Benchmark ncfast against the PyTorch (and faiss) code people write today.

Measures, for each op and each size (N rows, D features, C classes), the wall time of
ncfast and of its baselines on identical inputs:

    class_moments          counts, float64 means, per-class variances  vs  bincount + index_add_
                           (ncfast also sums the unit vectors and norms of cosine_separation)
    class_moments:no_units the same with unit_sums=False: the baseline's statistics and no more
    class_moments+scatter  the same plus the D x D within-class scatter vs  ... + centred.T @ centred
    class_distance         (C, C) class-distance matrix                 vs  index_add_ moments + cdist
    class_pair_stats       CDNV and NC2 statistics over all class pairs vs  the dense C x C torch way
    ncc_assign             nearest class mean of every row              vs  chunked addmm + argmin,
                                                                            chunked cdist + argmin,
                                                                            faiss.knn (if installed)
    ncc_assign:fast        the same, mode="fast" (bf16 products, same certified answers)
    nc_metrics             all NC metrics                               vs  a compact PyTorch script
                                                                            (torch_nc_metrics below)

Run from the repository root::

    python bench/run.py                      # default sizes, < 3 minutes on 2 CPU cores
    python bench/run.py --sizes quick        # smoke run, ~10 s
    python bench/run.py --full --ops ncc_assign --threads 16
    python bench/run.py --ops probe,dxd      # what measuring costs against a forward pass and
                                             # X^T X + eigvalsh(D) (bench/costs.py), ~8 minutes

Each provider runs ``--warmup`` times, then ``--repeat`` timed runs (providers take turns, so
a burst of background load hits all of them alike); the median and min are reported.
``ratio`` = baseline median / ncfast median, so ratio > 1 means ncfast is faster.
Every baseline's result is checked against ncfast's (the same quantities, to
float64 rounding); for ncc_assign, ncfast's certified float64 argmin is first checked against
``ncfast.reference`` on a sample of rows, and ``agree`` is the fraction of rows on which a
float32 baseline picks the same class as ncfast. Results also go to JSON (``--json``).

The floors are measured in the same run: the read bandwidth of each input array (``x.sum()``,
timed in turn with the providers, median) and the peak vector-FMA rate of every thread
(``ncfast._peak.fma_peak``, float32 and float64, in a build with ``NCFAST_BENCH=ON``, as the README's
test install makes; without it, the best rate of large ``torch.mm`` products, BLAS's rate, which is
at most the FMA peak, so the floors come out lower and ``of floor`` higher). An op's floor is max(bytes / bandwidth,
flops / peak); ``of floor`` = floor / ncfast time. Where the work is a matrix product, the same
product through ``torch.mm`` on the same shapes is timed too, so ncfast's FLOP rate can be set
beside BLAS's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import ncfast

try:
    from ncfast import _peak
except ImportError:  # a build without NCFAST_BENCH: the peaks come from torch.mm (machine_peaks)
    _peak = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
import costs as bench_costs  # noqa: E402

OPS = (
    "class_moments",
    "class_moments:no_units",
    "class_moments+scatter",
    "class_distance",
    "ncc_assign",
    "ncc_assign:fast",
    "class_pair_stats",
    "nc_metrics",
)
# Ratios to the work a user cannot avoid (bench/costs.py), not against a baseline: run when asked for.
COST_OPS = ("probe", "dxd")

# (N, D, C) per op. N is a multiple of C so the classes are balanced and every one is present.
# The default set runs in about a minute on 2 idle cores, leaving room for a loaded machine.
PRESETS = {
    "quick": {
        "class_moments": [(20_000, 256, 100)],
        "class_moments:no_units": [(20_000, 256, 100)],
        "class_moments+scatter": [(20_000, 256, 100)],
        "class_distance": [(20_000, 256, 100)],
        "ncc_assign": [(20_000, 256, 10), (20_000, 256, 1000)],
        "ncc_assign:fast": [(20_000, 256, 10), (20_000, 256, 1000)],
        "class_pair_stats": [(4_000, 256, 1000)],
        "nc_metrics": [(10_000, 256, 100)],
    },
    "default": {
        "class_moments": [(50_000, 512, 10), (50_000, 512, 100), (50_000, 512, 1000)],
        "class_moments:no_units": [(50_000, 512, 10), (50_000, 512, 100), (50_000, 512, 1000)],
        "class_moments+scatter": [(50_000, 512, 10), (50_000, 512, 1000)],
        "class_distance": [(50_000, 512, 100), (50_000, 512, 1000)],
        "ncc_assign": [(50_000, 512, 10), (50_000, 512, 100), (50_000, 512, 1000)],
        "ncc_assign:fast": [(50_000, 512, 10), (50_000, 512, 100), (50_000, 512, 1000)],
        "class_pair_stats": [(8_000, 512, 4000)],
        "nc_metrics": [(20_000, 512, 10), (20_000, 512, 1000)],
    },
    "full": {
        "class_moments": [(200_000, 512, 10), (200_000, 512, 1000)],
        "class_moments:no_units": [(200_000, 512, 10), (200_000, 512, 1000)],
        "class_moments+scatter": [(200_000, 512, 10), (200_000, 512, 1000)],
        "class_distance": [(200_000, 512, 1000)],
        "ncc_assign": [(200_000, 512, 1000), (200_000, 512, 10_000)],
        "ncc_assign:fast": [(200_000, 512, 1000), (200_000, 512, 10_000)],
        "class_pair_stats": [(40_000, 512, 20_000)],
        "nc_metrics": [(100_000, 512, 100), (100_000, 512, 1000)],
    },
    # the GPU targets on one H100 (run with --device cuda): 16-41 GB of features
    "h100": {
        "class_moments": [(10_000_000, 1024, 10)],
        "class_moments:no_units": [(10_000_000, 1024, 10)],  # the target's counts, means and variances
        "ncc_assign": [(4_000_000, 1024, 1000), (4_000_000, 1024, 50_000)],
        "ncc_assign:fast": [(4_000_000, 1024, 1000), (4_000_000, 1024, 50_000)],
        "class_pair_stats": [(200_000, 1024, 100_000)],
        "nc_metrics": [(50_000, 512, 10)],
    },
}

SEED = 0
# Scale of the class centres against unit noise: NCC accuracy lands between about 0.5 and 1.
SEPARATION = 0.1
# Scores per block in the chunked baselines: the same budget ncfast's own blocks use (16 MiB of
# float32), so neither side wins by holding more memory.
BLOCK_ELEMS = 1 << 22
BLOCK_ELEMS_GPU = 1 << 26  # on a GPU, as ncfast's own blocks there: 1,342 rows at C = 50,000, not 83
# Rows of each ncc_assign input on which ncfast is checked against the float64 brute force.
REFERENCE_ROWS = 64


# ----------------------------------------------------------------------------- data
def make_data(n: int, d: int, c: int, device: torch.device):
    """Post-ReLU-like float32 features and balanced int64 labels, the same for a given size.

    ReLU gives the features a large common mean, as penultimate-layer features have, so the
    float32 baselines of ncc_assign meet the rounding they meet in practice.
    """
    g = torch.Generator().manual_seed(SEED)
    centres = torch.randn(c, d, generator=g) * SEPARATION
    y = (torch.arange(n) % c)[torch.randperm(n, generator=g)]
    if device.type == "cpu":
        return torch.relu(centres[y] + torch.randn(n, d, generator=g)), y
    # On a GPU the features (up to 41 GB at the h100 sizes) are drawn there, 1 GiB at a time: on
    # the host they and their temporaries would need three times the machine's memory.
    gdev = torch.Generator(device=device).manual_seed(SEED)
    centres, y = centres.to(device), y.to(device)
    x = torch.empty(n, d, device=device)
    step = max(1, (1 << 28) // max(d, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        x[lo:hi] = torch.randn(hi - lo, d, generator=gdev, device=device).add_(centres[y[lo:hi]]).relu_()
    return x, y


# ------------------------------------------------------------------ PyTorch baselines
def torch_moments(x, y, c, scatter):
    """(counts, means, variances[, scatter]) in float64, the idiomatic two-pass way."""
    x64 = x.to(torch.float64)
    counts = torch.bincount(y, minlength=c)
    n = counts.clamp_min(1).to(torch.float64)
    means = torch.zeros(c, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, y, x64) / n.unsqueeze(1)
    centred = x64 - means[y]
    var = torch.zeros(c, dtype=torch.float64, device=x.device).index_add_(0, y, centred.square().sum(1)) / n
    if scatter:
        return counts, means, var, centred.T @ centred
    return counts, means, var


def torch_class_distance(x, y, c):
    _, means, var = torch_moments(x, y, c, scatter=False)
    return torch.cdist(means, means).square() + var.unsqueeze(1) + var.unsqueeze(0)


def _block_rows(c: int, device: torch.device) -> int:
    return max(1, (BLOCK_ELEMS_GPU if device.type == "cuda" else BLOCK_ELEMS) // c)


def torch_addmm_argmin(x, means):
    sq = means.square().sum(1)
    rows = _block_rows(means.shape[0], x.device)
    return torch.cat(
        [torch.addmm(sq, x[lo : lo + rows], means.T, alpha=-2.0).argmin(1) for lo in range(0, x.shape[0], rows)]
    )


def torch_cdist_argmin(x, means):
    rows = _block_rows(means.shape[0], x.device)
    return torch.cat([torch.cdist(x[lo : lo + rows], means).argmin(1) for lo in range(0, x.shape[0], rows)])


def torch_nc_metrics(x, y, c):
    """What people copy today: NC1 (Papyan et al.), NC2 and NCC accuracy, all in one pass of torch."""
    x64 = x.to(torch.float64)
    n = x.shape[0]
    counts = torch.bincount(y, minlength=c).to(torch.float64)
    means = torch.zeros(c, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, y, x64) / counts.unsqueeze(1)
    centred = x64 - means[y]
    sigma_w = centred.T @ centred / n
    mt = means - means.mean(0)
    sigma_b = mt.T @ mt / c
    nc1 = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b)) / c
    norms = mt.norm(dim=1)
    gram = mt @ mt.T
    etf = (torch.eye(c, dtype=torch.float64, device=x.device) - 1.0 / c) / (c - 1) ** 0.5
    nearest = torch.cdist(x, means.to(x.dtype)).argmin(1)
    return {
        "nc1": float(nc1),
        "equinorm": float(norms.std(correction=0) / norms.mean()),
        "nc2_etf": float(torch.linalg.norm(gram / torch.linalg.norm(gram) - etf)),
        "ncc_accuracy": float((nearest == y).to(torch.float64).mean()),
    }


def torch_pair_stats(means, var):
    """CDNV and the NC2 cosine statistics the dense way: full C x C Gram, distance and cosine matrices."""
    c = means.shape[0]
    mt = means - means.mean(0)
    gram = mt @ mt.T
    d2 = torch.cdist(means, means).square()
    iu = torch.triu_indices(c, c, 1, device=means.device)
    cdnv = ((var.unsqueeze(1) + var.unsqueeze(0)) / (2 * d2))[iu[0], iu[1]]
    norms = mt.norm(dim=1)
    cos = gram / (norms.unsqueeze(1) * norms.unsqueeze(0))
    off = cos[~torch.eye(c, dtype=torch.bool, device=means.device)]
    etf = (torch.eye(c, dtype=torch.float64, device=means.device) - 1.0 / c) / (c - 1) ** 0.5
    return {
        "cdnv": float(cdnv.mean()),
        "equiangularity": float(off.std(correction=0)),
        "coherence": float((off + 1.0 / (c - 1)).abs().mean()),
        "nc2_etf": float(torch.linalg.norm(gram / torch.linalg.norm(gram) - etf)),
    }


def faiss_provider(device: torch.device):
    """faiss's exact 1-nearest-neighbour search as an ncc_assign baseline, or None (with the reason
    printed) when unavailable. The same faiss API on both: ``faiss.get_num_gpus()`` decides, so on
    CUDA with faiss-gpu installed it is ``knn_gpu`` on the tensors where they are, and on CPU
    ``knn``."""
    try:
        import faiss
    except ImportError:
        print("faiss: not installed")
        return None
    if device.type == "cuda":
        if faiss.get_num_gpus() == 0:
            print("faiss: skipped on cuda (this faiss has no GPU support: install faiss-gpu)")
            return None
        import faiss.contrib.torch_utils  # noqa: F401  (faiss functions take torch tensors)

        resources = faiss.StandardGpuResources()

        def knn_gpu(x, means):
            return faiss.knn_gpu(resources, x, means, 1, device=device.index or 0)[1][:, 0]

        return knn_gpu
    if device.type != "cpu":
        print(f"faiss: skipped on {device.type}")
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())

    def knn(x, means):
        return torch.from_numpy(faiss.knn(x.numpy(), means.numpy(), 1)[1][:, 0])

    return knn


# --------------------------------------------------------------------------- checks
def _close(a, b, what, rtol=1e-7):
    a, b = a.to(torch.float64).cpu(), b.to(torch.float64).cpu()
    scale = float(b.abs().max()) if b.numel() else 0.0
    if not torch.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True):
        raise AssertionError(f"{what}: baseline and ncfast disagree (max abs diff {float((a - b).abs().max()):.3g})")


def check_moments(ours, theirs):
    _close(theirs[0], ours.counts, "counts", rtol=0.0)
    _close(theirs[1], ours.means, "means")
    _close(theirs[2], ours.variances, "variances")
    if len(theirs) == 4:
        _close(theirs[3], ours.scatter, "scatter")


def check_distance(ours, theirs):
    # cdist expands ||a||^2 - 2ab + ||b||^2, so its error scales with the largest entry.
    _close(theirs, ours, "class_distance", rtol=1e-6)


def check_nc_metrics(ours, theirs):
    # The baseline's float32 cdist may flip a near-tie or two, hence the loose ncc_accuracy bound.
    for k, tol in (
        ("nc1", 1e-6 * abs(ours["nc1"])),
        ("equinorm", 1e-6 * abs(ours["equinorm"])),
        ("nc2_etf", 1e-6 * abs(ours["nc2_etf"])),
        ("ncc_accuracy", 1e-3),
    ):
        if abs(theirs[k] - ours[k]) > tol:
            raise AssertionError(f"nc_metrics[{k}]: baseline {theirs[k]!r} vs ncfast {ours[k]!r}")


def check_exact(x, means, mode="exact"):
    """ncfast.ncc_assign must equal the float64 brute force, since agree is measured against it.

    Each row's answer depends on that row and the means alone, so a sample of rows suffices.
    """
    # the numpy brute force costs rows x C x D; at the GPU sizes' C = 50,000 x D = 1,024 fewer rows
    sample = x[: REFERENCE_ROWS if means.shape[0] * means.shape[1] <= 1 << 24 else REFERENCE_ROWS // 4]
    xs, ms = sample.cpu().numpy(), means.cpu().numpy()
    step = max(1, (1 << 24) // (ms.shape[0] * ms.shape[1]))  # the reference holds rows x C x D doubles
    ref = torch.cat(
        [torch.from_numpy(ncfast.reference.ncc_assign(xs[lo : lo + step], ms)) for lo in range(0, xs.shape[0], step)]
    )
    if not torch.equal(ref, ncfast.ncc_assign(sample, means, mode=mode).cpu()):
        raise AssertionError("ncc_assign: ncfast differs from ncfast.reference on the sampled rows")


def agreement(ours, theirs) -> float:
    return float((ours == theirs.to(ours.device)).to(torch.float64).mean())


# --------------------------------------------------------------------------- cases
def build_case(op, x, y, c, faiss_knn):
    """(ncfast fn, {baseline name: fn or None}, check(ours, theirs) -> agree or None) for one op."""
    if op.startswith("class_moments"):
        scatter = op.endswith("+scatter")
        units = not op.endswith(":no_units")
        return (
            lambda: ncfast.class_moments(x, y, num_classes=c, scatter=scatter, unit_sums=units),
            {"torch": lambda: torch_moments(x, y, c, scatter)},
            check_moments,
        )
    if op == "class_distance":
        return (
            lambda: ncfast.class_distance(x, y, num_classes=c),
            {"torch": lambda: torch_class_distance(x, y, c)},
            check_distance,
        )
    if op.startswith("ncc_assign"):
        mode = "fast" if op.endswith(":fast") else "exact"
        # Every provider gets the same float32 means (ncfast widens them to float64 itself).
        means = ncfast.class_moments(x, y, num_classes=c, scatter=False).means.to(torch.float32)
        check_exact(x, means, mode)
        baselines = {
            "torch addmm": lambda: torch_addmm_argmin(x, means),
            "torch cdist": lambda: torch_cdist_argmin(x, means),
            "faiss knn": None if faiss_knn is None else (lambda: faiss_knn(x, means)),
        }
        return lambda: ncfast.ncc_assign(x, means, mode=mode), baselines, agreement
    if op == "class_pair_stats":
        from ncfast.pairwise import class_pair_stats

        moments = ncfast.class_moments(x, y, num_classes=c, scatter=False)
        means, var = moments.means, moments.variances

        def check(ours, theirs):
            for k in theirs:
                if abs(getattr(ours, k) - theirs[k]) > 1e-7 * abs(theirs[k]):
                    raise AssertionError(
                        f"class_pair_stats[{k}]: baseline {theirs[k]!r} vs ncfast {getattr(ours, k)!r}"
                    )

        # The dense way holds four C x C float64 matrices (and a host index of C^2 / 2 pairs): at
        # C = 100,000 that is 320 GB, so where it cannot fit it is reported n/a without trying.
        dense = (
            None
            if x.is_cuda and 4 * 8 * c * c > torch.cuda.mem_get_info(x.device)[0]
            else (lambda: torch_pair_stats(means, var))
        )
        return (lambda: class_pair_stats(moments), {"torch dense": dense}, check)
    if op == "nc_metrics":
        return (
            lambda: ncfast.nc_metrics(x, y, num_classes=c),
            {"torch script": lambda: torch_nc_metrics(x, y, c)},
            check_nc_metrics,
        )
    raise ValueError(f"unknown op {op!r}")


# --------------------------------------------------------------------------- floors
READ = "x.sum (read floor)"


def best_ms(fn, repeat=5, sync=lambda: None):
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def machine_peaks(threads: int, device) -> dict:
    """Peak FLOP/s of the machine, float32 and float64: on CPU vector FMAs on every thread
    (``ncfast._peak``); on a GPU, or on a CPU build without ``_peak``, the best of large torch.mm
    products (float32 at 'highest' precision, i.e. no TF32; on a GPU tf32 separately, the fast
    mode's floor). ``source`` says which."""
    if device.type == "cpu" and _peak is not None:
        return {
            "fp32": _peak.fma_peak(False, 0.5, threads),
            "fp64": _peak.fma_peak(True, 0.5, threads),
            "source": "fma_peak",
        }
    peaks = {"source": "torch.mm"}
    n = 8192 if device.type == "cuda" else 2048
    kinds = (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("fp64", torch.float64, False))
    for name, dtype, tf32 in kinds if device.type == "cuda" else (kinds[0], kinds[2]):
        a = torch.randn(n, n, device=device, dtype=dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        try:
            peaks[name] = 2.0 * n**3 / (best_ms(lambda: a @ a, sync=sync) * 1e-3)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        a = None  # free it before the next dtype's
    return peaks


def op_work(op, n, d, c) -> tuple[float, float, str]:
    """(bytes read from the input, flops, precision) of an op's unavoidable work."""
    read = n * d * 4
    if op in ("class_moments", "class_moments:no_units", "class_distance"):
        return read, 0.0, "fp64"
    if op == "class_moments+scatter":
        return read, n * d * (d + 1), "fp64"  # one triangle of the D x D product
    if op.startswith("ncc_assign"):
        return read, 2.0 * n * c * d, "fp32"  # (on a GPU the fast mode's floor is the tf32 one, printed too)
    if op == "class_pair_stats":
        return 0.0, c * (c + 1) * d, "fp64"  # one triangle of the C x C Gram matrix
    if op == "nc_metrics":
        return read, n * d * (d + 1) + 2.0 * n * c * d, "fp64"
    raise ValueError(op)


def torch_mm_case(op, x, y, c):
    """(fn, flops) of the op's matrix product through torch.mm on the same shapes, or None."""
    if op not in ("class_moments+scatter", "class_pair_stats"):
        return None
    moments = ncfast.class_moments(x, y, num_classes=c, scatter=False)
    if op == "class_moments+scatter":
        z = x.to(torch.float64) - moments.means[y]
        return (lambda: z.T @ z), 2.0 * z.shape[0] * z.shape[1] ** 2
    from ncfast import backends
    from ncfast.pairwise import _tiles

    mt = moments.centred_means("balanced")
    tiles = list(_tiles(mt.shape[0], backends.for_tensor(mt).pair_tile))  # the tiles ncfast takes on this device
    flops = sum(2.0 * (r.stop - r.start) * (q.stop - q.start) * mt.shape[1] for r, q in tiles)
    side = tiles[0][0].stop - tiles[0][0].start
    out = torch.empty(side, side, dtype=mt.dtype, device=mt.device)  # one tile at a time, as ncfast

    def products():
        for r, q in tiles:
            torch.mm(mt[r], mt[q].T, out=out[: r.stop - r.start, : q.stop - q.start])

    return products, flops


# --------------------------------------------------------------------------- timing
def time_providers(fns: dict, warmup: int, repeat: int, sync):
    """{name: (last output, median ms, min ms)}; providers take turns on every repeat."""
    fns = dict(fns)
    outs, times = {}, {name: [] for name in fns}

    def call(name):
        try:
            return fns[name]()
        except torch.cuda.OutOfMemoryError:  # a dense baseline at a GPU size: reported as n/a
            print(f"{name}: out of memory, skipped", file=sys.stderr)
            del fns[name], times[name]
            torch.cuda.empty_cache()
            return None

    for name in list(fns):
        for _ in range(warmup):
            if name in fns:
                call(name)
    for _ in range(repeat):
        for name in list(fns):
            sync()
            t0 = time.perf_counter()
            out = call(name)
            if name not in fns:
                continue
            outs[name] = out
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (outs[name], statistics.median(t), min(t)) for name, t in times.items()}


def machine_header(device, threads):
    cpu = platform.processor()
    if not cpu and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    header = {
        "machine": {"platform": platform.platform(), "processor": cpu, "cpu_count": os.cpu_count()},
        "torch": torch.__version__,
        "ncfast": ncfast.__version__,
        "compile_options": ncfast.compile_options(),
        "device": str(device),
        "threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        header["machine"]["gpu"] = torch.cuda.get_device_name(device)
    return header


def _fmt_ms(v):
    return "n/a" if v is None else f"{v:.1f}"


def print_table(records):
    cols = [
        ("op", 22, "<"),
        ("N", 8, ">"),
        ("D", 5, ">"),
        ("C", 6, ">"),
        ("baseline", 13, "<"),
        ("ncfast ms", 10, ">"),
        ("(min)", 9, ">"),
        ("base ms", 10, ">"),
        ("(min)", 9, ">"),
        ("ratio", 7, ">"),
        ("agree", 9, ">"),
    ]
    line = "  ".join(f"{name:{align}{width}}" for name, width, align in cols)
    print(line)
    print("-" * len(line))
    ours = {}
    for r in records:
        key = (r["op"], tuple(r["size"].values()))
        if r["provider"] == "ncfast":
            ours[key] = r
            continue
        o = ours[key]
        cells = [
            r["op"],
            r["size"]["N"],
            r["size"]["D"],
            r["size"]["C"],
            r["provider"],
            _fmt_ms(o["median_ms"]),
            _fmt_ms(o["min_ms"]),
            _fmt_ms(r["median_ms"]),
            _fmt_ms(r["min_ms"]),
            "n/a" if r["ratio_vs_ncfast"] is None else f"{r['ratio_vs_ncfast']:.2f}",
            "-" if r["agree"] is None else f"{r['agree']:.6f}",
        ]
        print("  ".join(f"{v:{align}{width}}" for v, (_, width, align) in zip(cells, cols)))
    print()
    print("ratio = baseline median / ncfast median (> 1: ncfast is faster). Times in ms: median (min).")
    print("agree = fraction of rows where the baseline's class equals ncfast's; ncfast's ncc_assign is the exact")
    print("        (certified float64) argmin, the baselines are plain float32. '-': results checked equal instead.")


def print_floors(records, peaks):
    if not peaks:
        return
    print()
    print(
        f"ncfast against the floors (peak rate measured now: {peaks['fp32'] / 1e9:.0f} GFLOP/s float32, "
        f"{peaks['fp64'] / 1e9:.0f} float64; read bandwidth: x.sum() on each input)"
    )
    cols = [
        ("op", 22, "<"),
        ("N", 8, ">"),
        ("D", 5, ">"),
        ("C", 6, ">"),
        ("ncfast ms", 10, ">"),
        ("floor ms", 9, ">"),
        ("of floor", 9, ">"),
        ("GB/s", 7, ">"),
        ("GFLOP/s", 8, ">"),
        ("torch.mm", 9, ">"),
        ("vs mm", 6, ">"),
    ]
    line = "  ".join(f"{name:{align}{width}}" for name, width, align in cols)
    print(line)
    print("-" * len(line))
    for r in records:
        if r["provider"] != "ncfast":
            continue
        mm = r["torch_mm_GFLOPs"]
        cells = [
            r["op"],
            r["size"]["N"],
            r["size"]["D"],
            r["size"]["C"],
            _fmt_ms(r["median_ms"]),
            _fmt_ms(r["floor_ms"]),
            f"{100 * r['of_floor']:.0f}%",
            "-" if r["bandwidth_GBps"] is None else f"{r['bandwidth_GBps']:.1f}",
            "-" if r["useful_GFLOPs"] is None else f"{r['useful_GFLOPs']:.0f}",
            "-" if mm is None else f"{mm:.0f}",
            "-" if mm is None else f"{100 * r['useful_GFLOPs'] / mm:.0f}%",
        ]
        print("  ".join(f"{v:{align}{width}}" for v, (_, width, align) in zip(cells, cols)))
    print("GB/s = input bytes / ncfast time; GFLOP/s = the op's useful flops (one triangle of a symmetric")
    print("product) / ncfast time; torch.mm = the same product's rate through torch.mm (a full GEMM); vs mm = ratio.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ops",
        default=",".join(OPS),
        help=f"comma-separated subset of {', '.join(OPS + COST_OPS)} (default: all but {', '.join(COST_OPS)})",
    )
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--sizes", choices=tuple(PRESETS), default="default", help="size preset (default: default)")
    sizes.add_argument("--full", action="store_const", const="full", dest="sizes", help="same as --sizes full")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per provider (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per provider first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's current)")
    p.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "latest.json",
        help="where to write the results (default bench/results/latest.json)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the inputs live (default cpu); the GPU sizes: --device cuda --sizes h100",
    )
    args = p.parse_args(argv)
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in args.ops if op not in OPS + COST_OPS]
    if unknown:
        p.error(f"--ops: unknown {', '.join(unknown)}; choose from {', '.join(OPS + COST_OPS)}")
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # the float32 baselines at 'highest' precision: true float32 products, no TF32
    torch.set_float32_matmul_precision("highest")
    faiss_knn = faiss_provider(device) if "ncc_assign" in args.ops else None

    # Cheapest first (a run cut short by a timeout keeps the most results), grouped by size so
    # each data set is generated once; the table is sorted back by op.
    jobs = sorted(
        ((op, size) for op in args.ops if op in OPS for size in PRESETS[args.sizes][op]),
        key=lambda j: (_job_cost(j[0], *j[1]), j[1]),
    )
    records = []
    data_size = None
    peaks = machine_peaks(torch.get_num_threads(), device)
    header = machine_header(device, torch.get_num_threads())
    header["peak_source"] = peaks.pop("source")
    header["peak_GFLOPs"] = {k: v / 1e9 for k, v in peaks.items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, (op, (n, d, c)) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {op} N={n} D={d} C={c} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        if data_size != (n, d, c):
            data_size, data = (n, d, c), make_data(n, d, c, device)
        x, y = data
        run_ours, baselines, check = build_case(op, x, y, c, faiss_knn)
        available = {name: fn for name, fn in baselines.items() if fn is not None}
        # The read floor takes its turn with the providers, so it meets the same cache state (a
        # baseline streaming 400 MB leaves nothing of x in L3; back-to-back x.sum() runs would).
        timed = time_providers({"ncfast": run_ours, **available, READ: lambda: x.sum()}, args.warmup, args.repeat, sync)
        ours, our_median, our_min = timed["ncfast"]
        read_ms = timed.pop(READ)[1]
        size = {"N": n, "D": d, "C": c}
        nbytes, flops, precision = op_work(op, n, d, c)
        floor = (
            {"read_ms": read_ms * nbytes / (n * d * 4), "compute_ms": flops / peaks[precision] * 1e3} if peaks else {}
        )
        floor_ms = max(floor.values()) if floor else None
        mm = torch_mm_case(op, x, y, c)
        mm_rate = None
        if mm is not None:
            mm_rate = mm[1] / (best_ms(mm[0], repeat=3, sync=sync) * 1e-3)
        records.append(
            dict(
                op=op,
                size=size,
                provider="ncfast",
                median_ms=our_median,
                min_ms=our_min,
                ratio_vs_ncfast=1.0,
                agree=None,
                floor_ms=floor_ms,
                floor=floor,
                of_floor=None if floor_ms is None else floor_ms / our_median,
                bandwidth_GBps=nbytes / (our_median * 1e-3) / 1e9 if nbytes else None,
                useful_GFLOPs=flops / (our_median * 1e-3) / 1e9 if flops else None,
                torch_mm_GFLOPs=None if mm_rate is None else mm_rate / 1e9,
            )
        )
        for name in baselines:
            if name not in timed:
                records.append(
                    dict(op=op, size=size, provider=name, median_ms=None, min_ms=None, ratio_vs_ncfast=None, agree=None)
                )
                continue
            theirs, median, low = timed[name]
            records.append(
                dict(
                    op=op,
                    size=size,
                    provider=name,
                    median_ms=median,
                    min_ms=low,
                    ratio_vs_ncfast=median / our_median,
                    agree=check(ours, theirs),
                )
            )
        summary = ", ".join(
            f"{r['provider']} {_fmt_ms(r['median_ms'])} ms" for r in records if r["op"] == op and r["size"] == size
        )
        print(f"    {summary}", file=sys.stderr)
        _write_json(args.json, header, records, partial=i < len(jobs))  # kept if the run is cut short
    records.sort(key=lambda r: (OPS.index(r["op"]), r["size"]["N"], r["size"]["D"], r["size"]["C"]))
    costs = []
    if any(op in COST_OPS for op in args.ops):
        costs = bench_costs.run(args.ops, args.sizes, device, args.warmup, args.repeat, sync)
        header["costs"] = costs
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    if records:
        print_table(records)
        print_floors(records, peaks)
    bench_costs.print_rows(costs)
    _write_json(args.json, header, records, partial=False)
    print(f"\nwrote {args.json}")


def _job_cost(op, n, d, c) -> int:
    """A rough size of an op's work, to run the cheap jobs first."""
    return c * c * d if op == "class_pair_stats" else n * d * c


def _write_json(path, header, records, partial: bool):
    with open(path, "w") as f:
        json.dump({"header": header, "records": records, "partial": partial}, f, indent=1)


if __name__ == "__main__":
    main()
