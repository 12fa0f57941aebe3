"""Kernel-level timings of ncfast's Triton kernels on a GPU: the numbers for choosing their tiles.

    python bench/gpu_tune.py                 # about a minute and a half on an H100, compiles included
    python bench/gpu_tune.py --only ncc      # one part: metrics, moments, pairwise or ncc
    python bench/gpu_tune.py --smoke         # tiny sizes on CPU in Triton's interpreter: the script runs

Beside each kernel the same run measures its ceiling on this GPU: a device-to-device copy and
x.sum() (bytes / s), torch.mm in float32 ('highest', no TF32), TF32, bfloat16 and float64
(flop / s). Every time is the median of triton.testing.do_bench (CUDA events, warm caches
flushed by do_bench itself between runs).

- ncc: ``ncfast.triton.ncc.ncc_sweep`` alone at D = 1,024 and C = 1,000 and 50,000, for each
  precision its CONFIGS entry and a few other tile shapes that compile without spills on sm_90
  (bench/sm90_compile.py); rate = 2 N C D / time, and the share of rows it could not certify.
- moments: ``ncfast.triton.moments.block_moments`` (the whole call: sort, chunk kernel, merges)
  on 8 GiB of float32 features, C = 10, with and without unit sums, over chunk tiles; GB/s of
  the features read.
- pairwise: ``reduce_pair_tile`` on a 4,096 x 4,096 tile of float64 centred means, D = 1,024,
  against torch.mm of the same shapes in float64.
- metrics: ``nc_metrics`` on 50,000 x 512 features, C = 10 (the 20 ms target), its parts
  (moments with the scatter, metrics_from_moments, ncc_assign) and the D x D eigendecompositions
  it makes, on the GPU and on the host.

Writes the table and a JSON (``--json``). Nothing here is a test: the answers are checked by
tests/test_triton_*.py, which the device run executes first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

# Tile shapes tried per precision (block_m, block_n, block_d, num_warps, num_stages), CONFIGS first.
NCC_TRIALS = {
    "ieee": [(128, 128, 32, 8, 3), (64, 64, 32, 4, 3), (64, 256, 32, 8, 3)],
    "tf32x3": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 4)],
    "tf32": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 32, 4, 3), (64, 256, 32, 8, 3)],
    "bf16": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3)],
}
# (block_i, block_j, block_d) of the pair tile kernel (8 warps), the launcher's default first;
# all compile without spills on sm_90 but 128 x 64 (32 bytes).
PAIR_TRIALS = [(64, 64, 32), (64, 64, 16), (32, 64, 32), (128, 64, 32)]
# (block_rows, block_d, num_warps) of the moments chunk kernel; None: the launcher's default.
MOMENT_TRIALS = [(None, None, 8), (64, 64, 8), (128, 64, 8), (32, 128, 8), (32, 64, 4), (16, 256, 4)]


SMOKE = False  # --smoke: tiny sizes, CPU tensors, Triton's interpreter, wall-clock timing


def _size(full: int, smoke: int) -> int:
    return smoke if SMOKE else full


def _bench(fn) -> float:
    """Median milliseconds of fn (CUDA events; with --smoke three wall-clock runs)."""
    if SMOKE:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def ceilings(device) -> dict:
    """Copy and read bandwidth (bytes/s, a copy counts its read and its write) and torch.mm rates."""
    out = {}
    a = torch.empty(_size(1 << 30, 1 << 12), dtype=torch.float32, device=device).normal_()  # 4 GiB
    b = torch.empty_like(a)
    out["copy_GBps"] = 2 * a.numel() * 4 / (_bench(lambda: b.copy_(a)) * 1e-3) / 1e9
    out["sum_GBps"] = a.numel() * 4 / (_bench(lambda: a.sum()) * 1e-3) / 1e9
    a = b = None  # free them before the products
    n = _size(8192, 64)
    for name, dtype, tf32 in (
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("bf16", torch.bfloat16, False),
        ("fp64", torch.float64, False),
    ):
        m = torch.randn(n, n, device=device, dtype=dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            out[f"mm_{name}_TFLOPs"] = 2.0 * n**3 / (_bench(lambda: m @ m) * 1e-3) / 1e12
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        m = None
    return out


def tune_ncc(device, rows_out: list):
    from ncfast._numerics import rel_tensor_core
    from ncfast.triton import ncc

    g = torch.Generator(device=device).manual_seed(0)
    d = _size(1024, 32)
    for k, n in ((_size(1000, 40), _size(1 << 18, 64)), (_size(50_000, 70), _size(1 << 16, 32))):
        centres = torch.randn(k, d, device=device, generator=g) * 0.1
        x = torch.relu(
            centres[torch.randint(0, k, (n,), device=device, generator=g)]
            + torch.randn(n, d, device=device, generator=g)
        )
        shift = centres.mean(0)
        w = -2.0 * (centres - shift)
        o = (centres - shift).square().sum(1)
        cmax, omax = [float(w.double().norm(dim=1).max())], [float(o.double().abs().max())]
        for precision, trials in NCC_TRIALS.items():
            rel = rel_tensor_core(precision, d)
            for bm, bn, bd, warps, stages in trials:

                def run():
                    return ncc.ncc_sweep(
                        x,
                        shift,
                        w,
                        o,
                        [0, k],
                        rel,
                        cmax,
                        omax,
                        precision,
                        block_m=bm,
                        block_n=bn,
                        block_d=bd,
                        num_warps=warps,
                        num_stages=stages,
                    )

                try:
                    unsure = float(run()[1].float().mean())
                    ms = _bench(run)
                except Exception as exc:  # noqa: BLE001 - a tile shape the GPU refuses is reported, not fatal
                    rows_out.append(
                        dict(
                            part="ncc",
                            C=k,
                            N=n,
                            precision=precision,
                            config=[bm, bn, bd, warps, stages],
                            error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}",
                        )
                    )
                    print(
                        f"ncc C={k} {precision} {bm}x{bn}x{bd} w{warps} s{stages}: {rows_out[-1]['error']}", flush=True
                    )
                    continue
                rows_out.append(
                    dict(
                        part="ncc",
                        C=k,
                        N=n,
                        precision=precision,
                        config=[bm, bn, bd, warps, stages],
                        ms=ms,
                        TFLOPs=2.0 * n * k * d / (ms * 1e-3) / 1e12,
                        unsure=unsure,
                    )
                )
                print(
                    f"ncc C={k:<6} {precision:<7} {bm}x{bn}x{bd} w{warps} s{stages}: {ms:8.2f} ms "
                    f"{rows_out[-1]['TFLOPs']:7.1f} TFLOP/s, unsure {unsure:.4f}",
                    flush=True,
                )
        x = centres = None


def tune_moments(device, rows_out: list):
    from ncfast.triton import moments

    n, d, c = _size(1 << 21, 200), _size(1024, 40), 10
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(n, d, device=device, generator=g).add_(1.0)
    y = torch.randint(0, c, (n,), device=device, generator=g)
    nbytes = n * d * 4
    for units in (False, True):
        for rows, bd, warps in MOMENT_TRIALS:
            ms = _bench(
                lambda: moments.block_moments(x, y, c, unit_sums=units, block_rows=rows, block_d=bd, num_warps=warps)
            )
            rows_out.append(
                dict(
                    part="moments",
                    N=n,
                    D=d,
                    C=c,
                    unit_sums=units,
                    config=[rows, bd, warps],
                    ms=ms,
                    GBps=nbytes / (ms * 1e-3) / 1e9,
                )
            )
            print(
                f"moments units={units!s:<5} rows={rows or 'def':<3} block_d={bd or 'def':<3} w{warps}: {ms:7.2f} ms "
                f"{rows_out[-1]['GBps']:7.0f} GB/s",
                flush=True,
            )


def tune_pairwise(device, rows_out: list):
    from ncfast import backends
    from ncfast.backends import triton as triton_backend
    from ncfast.triton import pairwise

    t, d = _size(4096, 40), _size(1024, 24)
    g = torch.Generator(device=device).manual_seed(2)
    mt = torch.randn(t, d, device=device, dtype=torch.float64, generator=g)
    sq = mt.square().sum(1)
    norms, var = sq.sqrt(), torch.rand(t, device=device, dtype=torch.float64, generator=g)
    # an off-diagonal tile, classes 0..t x t..2t of 2t classes whose centred means are mt twice
    ctx = backends.PairContext(
        sq=sq.repeat(2),
        norms=norms.repeat(2),
        var=var.repeat(2),
        sup=None,
        g=1.0,
        etf_diag=0.1,
        etf_offdiag=-0.1,
        mean_cos=0.0,
        etf_cos=0.1,
        best=torch.full((2 * t,), float("inf"), device=device, dtype=torch.float64),
        best_idx=torch.zeros(2 * t, device=device, dtype=torch.int64),
    )
    vectors = backends.tile_vectors(ctx, slice(0, t), slice(t, 2 * t))
    params = torch.tensor(ctx.params(), dtype=torch.float64)

    mm = _bench(lambda: mt @ mt.T)
    flops = 2.0 * t * t * d
    for bi, bj, bd in PAIR_TRIALS:

        def run():  # the float64 dot where this Triton compiles it, as the backend launches it
            return triton_backend.with_f64_dot(
                lambda f64_dot: pairwise.reduce_pair_tile(
                    mt, mt, vectors, params, block_i=bi, block_j=bj, block_d=bd, f64_dot=f64_dot
                ),
                device,
            )

        run()
        ms = _bench(run)
        rows_out.append(
            dict(
                part="pairwise",
                tile=t,
                D=d,
                config=[bi, bj, bd],
                ms=ms,
                GFLOPs=flops / (ms * 1e-3) / 1e9,
                mm_GFLOPs=flops / (mm * 1e-3) / 1e9,
                f64_dot=triton_backend.F64_DOT.get((device.type, device.index)),
            )
        )
        print(
            f"pairwise tile {t}x{t} D={d} blocks {bi}x{bj}x{bd}: {ms:.2f} ms, {rows_out[-1]['GFLOPs']:.0f} GFLOP/s "
            f"(torch.mm float64 {rows_out[-1]['mm_GFLOPs']:.0f})",
            flush=True,
        )


def tune_metrics(device, rows_out: list):
    """nc_metrics on one CIFAR-10 epoch's features (50,000 x 512, C = 10) and its parts, and the two
    D x D eigendecompositions it makes, on the GPU and on the host."""
    import ncfast
    from ncfast.metrics import metrics_from_moments

    n, d, c = _size(50_000, 300), _size(512, 24), 10
    g = torch.Generator(device=device).manual_seed(3)
    y = torch.randint(0, c, (n,), device=device, generator=g)
    x = torch.relu(torch.randn(c, d, device=device, generator=g)[y] + torch.randn(n, d, device=device, generator=g))
    m = ncfast.class_moments(x, y, num_classes=c)
    means = m.means
    sym = m.sigma_w("balanced")
    parts = {
        "nc_metrics": lambda: ncfast.nc_metrics(x, y, num_classes=c),
        "class_moments(scatter)": lambda: ncfast.class_moments(x, y, num_classes=c),
        "metrics_from_moments": lambda: metrics_from_moments(m),
        "ncc_assign": lambda: ncfast.ncc_assign(x, means),
        "eigh D x D (device)": lambda: torch.linalg.eigh(sym),
        "eigvalsh D x D (device)": lambda: torch.linalg.eigvalsh(sym),
        "eigh D x D (host)": lambda: torch.linalg.eigh(sym.cpu()),
    }
    for name, fn in parts.items():
        ms = _bench(fn)
        rows_out.append(dict(part="metrics", what=name, N=n, D=d, C=c, ms=ms))
        print(f"metrics {name:<26} {ms:8.2f} ms", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("ncc", "moments", "pairwise", "metrics"), default=None)
    p.add_argument("--json", type=Path, default=Path("bench/results/gpu_tune.json"))
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1 (checks the script)"
    )
    args = p.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    if SMOKE:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
        os.environ["NCFAST_BACKEND"] = "triton"  # the public calls too, on CPU tensors
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --smoke)")
    else:
        device = torch.device("cuda")
    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (--smoke)"
    header = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__}
    header.update(ceilings(device))
    print(json.dumps(header), flush=True)
    rows: list = []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    # The most telling part first, and the JSON rewritten after each, so a run cut short keeps it.
    for name, fn in (
        ("ncc", tune_ncc),
        ("moments", tune_moments),
        ("metrics", tune_metrics),
        ("pairwise", tune_pairwise),
    ):
        if args.only in (None, name):
            fn(device, rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
