"""CDNV and NC2 statistics over C classes without a C x C matrix: time, FLOP rate beside torch.mm on
the same tiles, and peak memory growth (the target: C = 20,000, D = 512 under 200 MB extra).

    python bench/pairwise_memory.py --classes 20000 --dim 512

The class moments are built from two samples per class, 500 classes at a time, so the input never
dominates the memory measured; the peak resident set is reset (Linux /proc/self/clear_refs) just
before class_pair_stats runs.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import ncfast
from ncfast.backends.torch import DEFAULT_TILE
from ncfast.pairwise import _tiles, class_pair_stats


def _kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=512)
    a = p.parse_args(argv)
    c, d = a.classes, a.dim
    g = torch.Generator().manual_seed(0)
    moments = ncfast.ClassMoments(c, d, scatter=False)
    for lo in range(0, c, 500):
        k = min(500, c - lo)
        mu = torch.randn(k, d, generator=g, dtype=torch.float64)
        x = torch.cat([mu + 0.1 * torch.randn(k, d, generator=g, dtype=torch.float64) for _ in range(2)]).float()
        moments.update(x, torch.arange(lo, lo + k).repeat(2))
    del mu, x
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM)
    before = _kb("VmRSS")
    t0 = time.perf_counter()
    stats = class_pair_stats(moments)
    seconds = time.perf_counter() - t0
    growth_mb = (_kb("VmHWM") - before) / 1024
    flops = float(c) * (c + 1) * d  # one triangle of the C x C Gram matrix
    mt = moments.centred_means("balanced").contiguous()
    tiles = list(_tiles(c, DEFAULT_TILE))[:6]
    mm_seconds = float("inf")
    for _ in range(3):  # the best of three passes: the reference rate is not understated by a slow pass
        t1 = time.perf_counter()
        for r, q in tiles:
            mt[r] @ mt[q].T
        mm_seconds = min(mm_seconds, time.perf_counter() - t1)
    mm_rate = sum(2.0 * (r.stop - r.start) * (q.stop - q.start) * d for r, q in tiles) / mm_seconds
    print(
        f"C={c} D={d}: class_pair_stats {seconds:.2f} s, {flops / seconds / 1e9:.1f} GFLOP/s "
        f"(torch.mm on the same {DEFAULT_TILE}-tiles {mm_rate / 1e9:.1f} GFLOP/s: "
        f"{100 * flops / seconds / mm_rate:.0f}%), peak RSS growth {growth_mb:.0f} MB, "
        f"cdnv {stats.cdnv:.6g}, threads {torch.get_num_threads()}, {ncfast.compile_options()}"
    )


if __name__ == "__main__":
    main()
