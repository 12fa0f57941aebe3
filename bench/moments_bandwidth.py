"""class_moments against the read bandwidth of its own input, with the cache state controlled.

``bench/run.py`` times every provider in turn, so ncfast's class_moments meets whatever the
torch baseline and ``x.sum()`` left behind. This script isolates the kernel: before every timed
call it either streams a 256 MB scratch tensor (``--before evict``: x is cold, the caches hold
dirty lines, the way a training step leaves them) or runs the torch baseline
(``--before baseline``: the state bench/run.py produces), then times, in turn,

- ``x.sum()``                       the single-pass read floor of the same array,
- ``_C.block_moments``              the compiled kernel alone (counts, means, M2, unit and norm sums),
- ``ncfast.class_moments``          the public one-shot call (validation, state, merge),
- the same two with ``unit_sums=False`` (counts, means, M2 only: the row norms are not taken),

and prints medians and the ratio floor / time (the target is >= 70% for class_moments).

    python bench/moments_bandwidth.py                      # N = 50,000, D = 512, C = 10, 64, 100, 1000
    python bench/moments_bandwidth.py --before baseline --classes 10,1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ncfast  # noqa: E402
import run as harness  # noqa: E402  (make_data and torch_moments: the same data and baseline)
from ncfast import _C  # noqa: E402
from ncfast.backends.cpp import buffer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", default="10,64,100,1000", help="comma-separated C values")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument(
        "--before",
        choices=("evict", "baseline"),
        default="evict",
        help="what runs before every timed call (see the module docstring)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    scratch = torch.ones(64_000_000) if args.before == "evict" else None
    print(
        f"N = {args.rows}, D = {args.dim}, float32, {threads} threads, before each call: {args.before}; "
        f"{_C.compile_options()}"
    )
    print(
        f"{'C':>6} {'x.sum ms':>9} {'kernel ms':>10} {'of floor':>9} {'API ms':>8} {'of floor':>9} "
        f"{'bare kernel':>12} {'of floor':>9} {'bare API':>9} {'of floor':>9}"
    )
    for c in (int(v) for v in args.classes.split(",")):
        x, y = harness.make_data(args.rows, args.dim, c, torch.device("cpu"))
        buf, dtype = buffer(x)
        labels = y.numpy()
        calls = {
            "sum": lambda: x.sum(),
            "kernel": lambda: _C.block_moments(buf, dtype, labels, c, threads),
            "api": lambda: ncfast.class_moments(x, y, num_classes=c, scatter=False),
            "bare_kernel": lambda: _C.block_moments(buf, dtype, labels, c, threads, unit_sums=False),
            "bare_api": lambda: ncfast.class_moments(x, y, num_classes=c, scatter=False, unit_sums=False),
        }
        times = {k: [] for k in calls}
        for k in calls:  # warm-up: buffers into the pool, code into the caches
            calls[k]()
        for _ in range(args.repeat):
            for k, fn in calls.items():
                if scratch is not None:
                    scratch.mul_(1.0001)
                else:
                    harness.torch_moments(x, y, c, False)
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{c:>6} {med['sum']:>9.3f} "
            + " ".join(
                f"{med[k]:>{w}.3f} {100 * med['sum'] / med[k]:>8.0f}%"
                for k, w in (("kernel", 10), ("api", 8), ("bare_kernel", 12), ("bare_api", 9))
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
