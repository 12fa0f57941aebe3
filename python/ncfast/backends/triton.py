"""The Triton backend: the kernels of ``ncfast.triton`` on CUDA tensors (or on CPU tensors in
Triton's interpreter, TRITON_INTERPRET=1).

The kernel modules are imported on first use, so this module imports without triton. Sweeps at
"fp32" (``backends.base.PRECISIONS``) run as ``ncfast.triton.ncc.FP32_DOT`` (three TF32 tensor-core
products, float32-like accuracy); the fast mode's low precisions are TF32 and bfloat16 tensor cores.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from .. import _numerics
from .._validation import NON_FINITE
from .base import BlockMoments, PairContext, PairSums, Sweep, tile_vectors
from .torch import blockwise_scatters

TRITON_TILE = 16384
"""Classes per tile side of the pairwise pass. The kernel never holds the tile (it reduces 64 x 64
blocks in registers): only its per-program partials, 16 bytes per row per 64 columns (67 MB at
16,384), so C = 100,000 takes 28 launches and host syncs instead of 4,950 of 1,008-tiles."""
PROBE_ROWS = 32768
"""Rows the fast mode times each precision on: 256 programs of 128 rows, two waves of an H100."""


def _sweep_bound(dot: str, d: int) -> tuple[float, bool]:
    """(rel, whether the products flush subnormals) of a sweep with this dot (``ncfast.triton.ncc.DOTS``)."""
    from ..triton import ncc

    return _numerics.rel_tensor_core(dot, d), dot in ncc.TENSOR_CORES


class TritonBackend:
    """The Triton kernels."""

    name = "triton"
    checks_labels = False
    pair_tile = TRITON_TILE

    def block_moments(self, x, y, num_classes, *, unit_sums, check_finite):
        # one launch sequence for any number of rows (float64 partials per chunk of rows)
        from ..triton import moments

        part = BlockMoments(*moments.block_moments(x, y, num_classes, unit_sums=unit_sums))
        if check_finite and not bool(torch.isfinite(part.m2).all()):
            raise ValueError(NON_FINITE)
        return part

    def merge_into(self, state, part, delta):
        return None  # the caller merges out of place

    def centred_scatters(self, x, y, means, scales):
        from ..triton import moments

        return blockwise_scatters(x, y, means, scales, lambda xb, yb, out: moments.centre_rows(xb, yb, means, out=out))

    def sym_gram(self, a):
        return a.T @ a

    def ncc_sweep(self, x, shift, centres, offsets, starts, cmax, omax, precision):
        from ..triton import ncc

        dot = ncc.dot_of(precision)
        d = x.shape[1]
        rel, flushes = _sweep_bound(dot, d)
        if flushes:
            omax = [o + _numerics.flush_floor(d, c) / rel for o, c in zip(omax, cmax)]
        else:  # float32 products that fall below the normal range
            omax = [o + _numerics.underflow_floor(_numerics.TINY32, d, c) / rel for o, c in zip(omax, cmax)]
        return Sweep(*ncc.ncc_sweep(x, shift, centres, offsets, starts, rel, cmax, omax, dot))

    def fast_precisions(self, classes):
        return ("tf32", "bf16")

    def probe_rows(self):
        return PROBE_ROWS

    def warm_up(self, x, sweep):
        if x.is_cuda:  # compile each kernel on a few rows first
            for precision in (*self.fast_precisions(0), "fp32"):
                sweep(x[:16], precision)

    def synchronize(self, x):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    def pair_reducer(self, mt, tile, ctx: PairContext):
        from ..triton import pairwise

        params = torch.tensor(ctx.params(), dtype=torch.float64)  # host scalars, copied per launch

        def reduce(rows, cols):
            # views of ctx's vectors: the kernel's in-place updates reach ctx.best, best_idx and ratio_sum
            vectors = tile_vectors(ctx, rows, cols)

            def launch(f64_dot: bool):
                return pairwise.reduce_pair_tile(mt[rows], mt[cols], vectors, params, f64_dot=f64_dot)

            return [tile_sums(*with_f64_dot(launch, mt.device))]

        return reduce


F64_DOT: dict = {}
"""Per device (type, index), whether the pair tile's float64 tl.dot compiled there (absent: not
tried yet). Float64 dots arrived in Triton only in 2025-26 (MMA on SM80 / SM90, FMAs elsewhere);
where the compiler refuses one, the first launch on that GPU falls back for good to the Gram block
from broadcast products (``triton.pairwise._launch``). The interpreter runs both."""


def with_f64_dot(launch, device: torch.device):
    """``launch(f64_dot)`` with the float64 dot where it compiles: the first launch on a GPU whose
    Triton refuses it warns once and takes the fallback, as every later launch there does. A failure
    after a successful compile, or in the interpreter, is raised."""
    key = (device.type, device.index)
    if F64_DOT.get(key, True):
        try:
            out = launch(True)
            F64_DOT.setdefault(key, True)
            return out
        except Exception as exc:  # noqa: BLE001 - a compiler without float64 dots; anything else re-raises below
            if device.type != "cuda" or key in F64_DOT:  # only a first, never-compiled launch on a GPU
                raise
            import warnings

            warnings.warn(
                f"ncfast: this Triton does not compile a float64 tl.dot on {device} ({type(exc).__name__}); "
                "class_pair_stats tiles use float64 FMAs instead",
                RuntimeWarning,
                stacklevel=3,
            )
            F64_DOT[key] = False
    return launch(False)


def tile_sums(sums: torch.Tensor, counts: torch.Tensor) -> PairSums:
    """A tile's PairSums from the per-program partials of ``ncfast.triton.pairwise.reduce_pair_tile``,
    combined on the device in a fixed order: each field from the partials' column of its name
    (``pairwise.COLUMNS``, ``pairwise.COUNTS``), an (n, mean, M2) field from its programs' means and
    M2 (columns name_mean, name_m2) over their numbers of pairs."""
    from ..triton import pairwise

    columns = {name: i for i, name in enumerate(pairwise.COLUMNS)}
    count_columns = {name: i for i, name in enumerate(pairwise.COUNTS)}
    n = counts[:, count_columns["pairs"]]
    triples = PairSums.triples()
    merged = {}
    for key in triples:
        mean = sums[:, columns[f"{key}_mean"]].unsqueeze(1)
        merged[key] = _numerics.chan_reduce(n, mean, sums[:, columns[f"{key}_m2"]]) if n.numel() else None
    host = sums.sum(0).tolist()
    values = {}
    for f in fields(PairSums):
        if f.name in columns:
            values[f.name] = host[columns[f.name]]
        elif f.name in count_columns:
            values[f.name] = int(counts[:, count_columns[f.name]].sum()) if counts.numel() else 0
        elif f.name in triples:
            triple = merged[f.name]
            if triple is not None and int(triple[0]):
                values[f.name] = (int(triple[0]), float(triple[1][0]), float(triple[2]))
        else:
            raise AssertionError(f"PairSums.{f.name}: no column of the Triton partials")
    return PairSums(**values)
