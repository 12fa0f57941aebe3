"""python -m ncfast.measure on large saved features: throughput against the read floor of the same
file, peak RSS, and the seconds of each pass.

    python bench/measure_files.py --case imagenet   # 1,280,000 x 2,048 float16 (5.2 GB), C = 1,000
    python bench/measure_files.py --case vocab      # 1,000,000 x 768 float16 (1.5 GB), C = 50,000

The features are synthetic (class means plus noise), written once to --dir as .npy and reused, with
a classifier (W, b), super-classes of 10 classes and 10,000 OOD rows, so that every metric of
nc_metrics is computed (nc3, duality, ncc_mismatch, msdr, nc5_ood). The
read floor is the bandwidth of reading the same file in 64 MiB chunks with os.readv into one buffer,
measured in the same run right before (the file is then in the page cache, as it is for measure);
measure's throughput is the file's bytes over its wall time. Peak RSS is the child process's
ru_maxrss. Prints one markdown row per case for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CASES = {"imagenet": dict(n=1_280_000, d=2048, c=1000), "vocab": dict(n=1_000_000, d=768, c=50_000)}


def make(folder: Path, n: int, d: int, c: int, seed: int = 0) -> tuple[Path, Path]:
    """Features (n, d) float16 around c random class means, labels, and a classifier W (c, d), b (c,)
    (the means plus noise: it decides mostly like the nearest class centre, as a trained one does)."""
    x_path, y_path = folder / f"x_{n}x{d}_c{c}.npy", folder / f"y_{n}_c{c}.npy"
    if x_path.exists() and y_path.exists():
        return x_path, y_path
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    means = g.standard_normal((c, d), dtype=np.float32)
    np.save(folder / f"w_{d}_c{c}.npy", means + 0.1 * g.standard_normal((c, d), dtype=np.float32))
    np.save(folder / f"b_c{c}.npy", -0.5 * (means.astype(np.float64) ** 2).sum(1).astype(np.float32))
    np.save(folder / f"s_c{c}.npy", np.arange(c) // 10)  # super-classes of 10 classes each (msdr)
    np.save(folder / f"ood_{d}.npy", (g.standard_normal((10_000, d), dtype=np.float32) + 1).astype(np.float16))
    y = np.concatenate([np.arange(c), g.integers(0, c, n - c)]).astype(np.int64)
    x = np.lib.format.open_memmap(x_path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float16, shape=(n, d))
    step = 65536
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        x[lo:hi] = (means[y[lo:hi]] + 0.5 * g.standard_normal((hi - lo, d), dtype=np.float32)).astype(np.float16)
    x.flush()
    del x
    x_path.with_suffix(".tmp.npy").rename(x_path)
    np.save(y_path, y)
    return x_path, y_path


def read_floor(path: Path, chunk: int = 64 << 20) -> float:
    """Bytes per second of reading the whole file in chunks into one reused buffer."""
    buf = bytearray(chunk)
    size = path.stat().st_size
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return size / (time.perf_counter() - t0)


def run_measure(x: Path, y: Path, extra: list[str]) -> tuple[float, int, str, list]:
    """(wall seconds, peak RSS in bytes, stderr, RSS timeline) of python -m ncfast.measure in a child
    process. The peak is the child's own (os.wait4's rusage of that pid, not RUSAGE_CHILDREN, which
    keeps the largest of every earlier child); the timeline samples its VmRSS every half second."""
    t0 = time.perf_counter()
    err_file = open(Path(x).parent / "measure_stderr.txt", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ncfast.measure", str(x), str(y), "--no-progress", *extra],
        stdout=subprocess.DEVNULL,
        stderr=err_file,
    )
    timeline = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            text = Path(f"/proc/{proc.pid}/status").read_text()
            timeline.append((time.perf_counter() - t0, int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024))
        except (OSError, AttributeError):
            pass
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    err_file.seek(0)
    err = err_file.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(err)
    return wall, usage.ru_maxrss * 1024, err, timeline


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), action="append", help="default: both")
    p.add_argument("--dir", default="/tmp/ncfast_bench", help="where the feature files are written and kept")
    p.add_argument("--n", type=int, default=None, help="override the case's N (a smaller try)")
    a = p.parse_args(argv)
    rows = []
    for case in a.case or sorted(CASES):
        spec = dict(CASES[case])
        if a.n:
            spec["n"] = a.n
        x, y = make(Path(a.dir), **spec)
        size = x.stat().st_size
        read_floor(x)  # warm the page cache the way measure will find it
        floor = read_floor(x)
        folder = Path(a.dir)
        wall, peak, err, timeline = run_measure(
            x,
            y,
            [
                "--weight",
                str(folder / f"w_{spec['d']}_c{spec['c']}.npy"),
                "--bias",
                str(folder / f"b_c{spec['c']}.npy"),
                "--superclass",
                str(folder / f"s_c{spec['c']}.npy"),
                "--ood",
                str(folder / f"ood_{spec['d']}.npy"),
                "--json",
                str(folder / f"{case}.json"),
                "--per-class",
                str(folder / f"{case}_per_class.npz"),
            ],
        )
        passes = re.search(r"passes: (.*)", err)
        top = max(timeline, key=lambda t: t[1], default=(0.0, 0))
        print(
            f"{case}: RSS peaked at {top[1] / 2**30:.2f} GiB {top[0]:.0f} s into the run (sampled every 0.5 s)",
            flush=True,
        )
        rows.append(
            f"| {case} | {spec['n']:,} x {spec['d']:,} float16, C = {spec['c']:,} | {size / 1e9:.2f} GB | "
            f"{floor / 1e9:.2f} GB/s | {wall:.1f} s | {size / wall / 1e9:.3f} GB/s | "
            f"{size / wall / floor:.1%} | {peak / 2**30:.2f} GiB | {passes.group(1) if passes else '?'} |"
        )
        print(rows[-1], flush=True)
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}: python bench/measure_files.py " + " ".join(argv or sys.argv[1:])
    )
    print("| case | features | file | read floor | measure wall | throughput | of floor | peak RSS | passes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
