"""Compile ncfast's Triton kernels for a Hopper GPU (sm_90) on a machine without one, and report
what the compiler made of them: registers, local memory (spills), shared memory, and the
instructions that say which arithmetic path a kernel took (HGMMA = Hopper tensor cores, HMMA =
older tensor cores, DMMA = float64 tensor cores, FFMA / DFMA = plain float32 / float64 FMAs).

    python bench/sm90_compile.py                 # every kernel at the launchers' settings
    python bench/sm90_compile.py --sass-dir DIR  # also write each kernel's SASS there
    python bench/sm90_compile.py --tests         # every launch tests/test_triton_*.py makes, compiled instead of run

The launchers in ncfast.triton are called on CPU tensors of representative shapes; every kernel
launch is turned into an ahead-of-time compile for GPUTarget("cuda", 90, 32), with the argument
specialisation a real launch would get (Triton's own binder: ints equal to 1 become constants,
pointers and ints divisible by 16 get the divisibility hint). No kernel runs, so outputs are
garbage and only the compile reports count. It needs a Triton with the NVIDIA backend (the
PyPI wheel carries ptxas and cuobjdump); the GPU machine's Triton version is what matters, so
run it under that version (for example a wheel unpacked on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, before the kernel modules load

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# SASS opcodes worth counting: which unit does the arithmetic, and how wide the global loads are.
# LDG / LDGSTS are split by width: .128 (16-byte vectors), .64, and 4 bytes or less.
OPCODES = (
    "HGMMA",
    "HMMA",
    "DMMA",
    "FFMA",
    "DFMA",
    "LDG.128",
    "LDG.64",
    "LDG",
    "LDGSTS.128",
    "LDGSTS",
    "STG",
    "LDL",
    "STL",
)


class _AheadOfTimeDriver:
    """The few driver calls JITFunction.run makes, answered without a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _report(kernel, label: str, sass_dir: Path | None) -> dict:
    """Resource usage and opcode counts of one compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_cuobjdump(), "--dump-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ops = collections.Counter()
    for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)([.\w]*)", sass):
        op, suffix = m.group(1), m.group(2)
        if op in ("LDG", "LDGSTS"):
            width = re.search(r"\.(128|64)\b", suffix)
            op = f"{op}.{width.group(1)}" if width else op
        ops[op] += 1
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        (sass_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", label) + ".sass")).write_text(sass)
    return {
        "label": label,
        "regs": int(fields.get("REG", 0)),
        "local": int(fields.get("LOCAL", 0)),
        "stack": int(fields.get("STACK", 0)),
        "shared": int(kernel.metadata.shared),
        "ops": {k: ops.get(k, 0) for k in OPCODES},
    }


class _Recorder:
    """Turns ``kernel[grid](*args, **kwargs)`` into an ahead-of-time compile and keeps its report
    (a row without "regs" for a launch that does not compile). With ``dedupe`` a launch whose
    label was seen before adds nothing."""

    def __init__(self, sass_dir, dedupe: bool = False):
        self.rows: list[dict] = []
        self.sass_dir = sass_dir
        self.label = ""
        self.dedupe = dedupe
        self._seen: set = set()

    def __call__(self, fn: JITFunction, grid):
        def launch(*args, **kwargs):
            consts = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
            label = (f"{fn.__name__} {self.label} " + " ".join(f"{k}={v}" for k, v in consts.items())).replace(
                "  ", " "
            )
            if self.dedupe and label in self._seen:
                return None
            self._seen.add(label)
            try:
                kernel = fn.run(*args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported as a row of its own
                self.rows.append(
                    {"label": f"{label}: does not compile ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"}
                )
                return None
            self.rows.append(_report(kernel, label, self.sass_dir))
            return kernel

        return launch


PARTS = ("moments", "ncc", "pairwise")


def _cases(recorder: _Recorder, parts=PARTS):
    """Call every launcher at the GPU sizes' shapes (D = 1024; the row count only sets alignment)."""
    from ncfast.triton import moments, ncc, pairwise

    g = torch.Generator().manual_seed(0)
    n, d = 4096, 1024
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    if "moments" in parts:
        for dtype, units in ((torch.float32, True), (torch.float32, False), (torch.bfloat16, True)):
            recorder.label = f"x={str(dtype).removeprefix('torch.')}"
            moments.block_moments(x.to(dtype), y, 10, unit_sums=units)
        recorder.label = ""
        moments.centre_rows(x, y, torch.zeros(10, d, dtype=torch.float64))
    if "ncc" in parts:
        _ncc_cases(recorder, ncc, x, g)
    if "pairwise" in parts:
        _pair_cases(recorder, pairwise, g)


def _ncc_cases(recorder: _Recorder, ncc, x, g):
    from ncfast._numerics import rel_tensor_core

    d = x.shape[1]
    k = 1000
    centres = torch.randn(k, d, generator=g)
    for prec in ncc.DOTS:
        recorder.label = f"dot={prec}"
        ncc.ncc_sweep(
            x,
            torch.zeros(d),
            centres,
            torch.zeros(k),
            [0, k],
            rel_tensor_core(prec, d),
            [1.0],
            [1.0],
            prec,
        )
    recorder.label = "x=bfloat16"  # read as int16 bits and widened in the kernel (moments.load_wide)
    ncc.ncc_sweep(
        x.to(torch.bfloat16),
        torch.zeros(d),
        centres,
        torch.zeros(k),
        [0, k],
        rel_tensor_core("ieee", d),
        [1.0],
        [1.0],
        "ieee",
    )
    recorder.label = "D=32"  # one feature block: the rows stay in registers through the sweep
    ncc.ncc_sweep(
        x[:, :32].contiguous(),
        torch.zeros(32),
        centres[:, :32].contiguous(),
        torch.zeros(k),
        [0, k],
        rel_tensor_core("tf32", 32),
        [1.0],
        [1.0],
        "tf32",
        block_d=32,
    )


def _pair_cases(recorder: _Recorder, pairwise, g):
    from ncfast import backends

    t, d = 512, 1024
    mt = torch.randn(t, d, dtype=torch.float64, generator=g)
    for f64_dot in (True, False):
        recorder.label = f"F64_DOT={f64_dot}"
        for diagonal in (False, True):
            for exponent in (1.0, 0.5):  # UNIT_P: the CDNV division alone, or d2^p = exp(p log d2) before it
                # the diagonal tile of t classes, or the tile 0..t x t..2t of 2t classes
                n = t if diagonal else 2 * t
                ones = torch.ones(n, dtype=torch.float64)
                ctx = backends.PairContext(
                    sq=ones,
                    norms=ones,
                    var=ones,
                    sup=None,
                    g=1.0,
                    etf_diag=0.1,
                    etf_offdiag=-0.1,
                    mean_cos=0.0,
                    etf_cos=0.1,
                    best=torch.full((n,), float("inf"), dtype=torch.float64),
                    best_idx=torch.zeros(n, dtype=torch.int64),
                    cdnv_exponent=exponent,
                    ratio_sum=ones.clone(),
                )
                vectors = backends.tile_vectors(ctx, slice(0, t), slice(0, t) if diagonal else slice(t, 2 * t))
                pairwise.reduce_pair_tile(
                    mt, mt, vectors, torch.tensor(ctx.params(), dtype=torch.float64), f64_dot=f64_dot
                )


def _compile_tests(recorder: _Recorder) -> int:
    """Run tests/test_triton_*.py with every launch compiled for sm_90 instead of run (``recorder``
    with dedupe): which of the kernel variants the tests use fail to compile, or spill. The
    tests' assertions then fail (nothing ran), so only the compile report counts."""
    import pytest

    from ncfast import triton as nt
    from ncfast.triton import moments, ncc, pairwise  # noqa: F401 - compiled kernels, before the tests set the interpreter

    ncc.interpreting = nt.interpreting = lambda: False  # the GPU variants (no bf16 emulation)
    JITFunction.__getitem__ = lambda fn, grid: recorder(fn, grid)
    tests = Path(__file__).resolve().parents[1] / "tests"
    pytest.main(
        [
            "-q",
            "-p",
            "no:cacheprovider",
            "--tb=no",
            "--no-header",
            "-rN",
            *map(str, sorted(tests.glob("test_triton_*.py"))),
        ]
    )
    compiled = [row for row in recorder.rows if "regs" in row]
    failures = [row["label"] for row in recorder.rows if "regs" not in row]
    print(f"\nsm_90: {len(compiled)} distinct kernel launches of the tests compiled, {len(failures)} failed to compile")
    for row in compiled:
        if row["stack"] or row["ops"]["LDL"]:
            print(f"  spills: {row['label']}: stack {row['stack']} bytes, {row['ops']['LDL']} LDL")
    for f in failures:
        print("  does not compile:", f)
    return 1 if failures else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sass-dir", type=Path, default=None, help="write each kernel's SASS into this folder")
    p.add_argument("--tests", action="store_true", help="compile every launch of tests/test_triton_*.py instead")
    p.add_argument("--only", choices=PARTS, default=None, help="one group of kernels")
    args = p.parse_args(argv)

    _driver.set_active(_AheadOfTimeDriver())
    if args.tests:
        raise SystemExit(_compile_tests(_Recorder(args.sass_dir, dedupe=True)))
    recorder = _Recorder(args.sass_dir)
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda fn, grid: recorder(fn, grid)
    try:
        _cases(recorder, PARTS if args.only is None else (args.only,))
    finally:
        JITFunction.__getitem__ = original  # the stub driver stays: without a GPU there is no other

    print(f"triton {triton.__version__}, target {TARGET.backend} sm_{TARGET.arch}")
    head = ["regs", "stack", "shared"] + list(OPCODES)
    print(f"{'kernel':<90} " + " ".join(f"{h:>10}" for h in head))
    failed = 0
    for row in recorder.rows:
        if "regs" not in row:
            print(row["label"])
            failed += "F64_DOT=False" not in row["label"]  # the fallback is optional, the rest is not
            continue
        vals = [row["regs"], row["stack"], row["shared"]] + [row["ops"][k] for k in OPCODES]
        print(f"{row['label'][:90]:<90} " + " ".join(f"{v:>10}" for v in vals))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
