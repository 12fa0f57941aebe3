"""The C++ backend: the compiled core ``ncfast._C`` on CPU tensors (csrc/).

Tensors cross as numpy buffers (half and bfloat16 as their uint16 bits with a dtype name), so the
extension needs no libtorch. What the build offers is asked of ``_C`` (``gram_available``,
``ncc_register_tiled``, ``ncc_has_precision``). The one autotuning cache of this backend is
``_ENGINE_FASTER``: whether the C++ Gram engine or BLAS forms a pairwise tile faster here.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import _C, _numerics
from .._validation import NON_FINITE
from .base import BlockMoments, PairSums, Sweep, tile_vectors
from .torch import DEFAULT_TILE, blockwise_scatters, gemm_sweep

FUSED_MAX_CLASSES = 256
"""Without the register-tiled (AVX-512) sweep, the C++ NCC sweep up to this many classes in all;
above, GEMM blocks (``backends.torch.gemm_sweep``) are faster."""
DIAGONAL_STRIPS = 3
"""Row strips per diagonal block of the pairwise pass: 3 forms 2/3 of the block's products (the
strips start at the diagonal), and a 336-row strip still runs near torch.mm's full-tile rate."""
STRIP_ALIGN = 48
"""Strip heights are multiples of this: whole register tiles of the C++ Gram engine (12 x 16)."""
PROBE_MIN_TILES = 6
"""Below this many tiles the products are not timed (the engine forms them): the slower choice on
the timed tiles could cost more than the right choice saves on the rest."""

_ENGINE_FASTER: dict[tuple[int, int, int], bool] = {}
"""(tile side, D, threads) -> whether the C++ Gram engine formed a tile faster than torch.mm (BLAS)
when this process first timed both (which wins depends on the CPU and its BLAS)."""


def buffer(x: torch.Tensor):
    """(numpy view, dtype name) of a CPU tensor; half and bfloat16 travel as their uint16 bits."""
    buf = x.view(torch.int16).numpy() if x.dtype in (torch.float16, torch.bfloat16) else x.numpy()
    return buf, str(x.dtype).replace("torch.", "")


class _TileProducts:
    """Forms tile products G[rows, cols] = Mt[rows] Mt[cols]^T into a given buffer, by the C++ Gram
    engine or by torch.mm (BLAS): both give the same float64 products up to rounding. Where this
    process has no verdict for (tile side, D, threads) yet, the pass's own first full tiles time the
    two: the engine's first one untimed (its warm-up), its second, then torch.mm's first (BLAS
    warmed by the diagonal strips before it); the faster one forms the rest and is remembered in
    _ENGINE_FASTER. No product is formed twice: the timing costs only the slower choice's excess
    on two tiles."""

    def __init__(self, mt: torch.Tensor, side: int, tiles: int):
        self.mt, self.side = mt, side
        self.key = (side, mt.shape[1], torch.get_num_threads())
        self.seconds: dict[str, list[float]] = {"engine": [], "blas": []}
        self.engine: bool | None  # None: not yet known
        if not _C.gram_available():
            self.engine = False
        elif tiles < PROBE_MIN_TILES:
            self.engine = True
        else:
            self.engine = _ENGINE_FASTER.get(self.key)  # None: time it on this pass's tiles

    def __call__(self, rows: slice, cols: slice, out: torch.Tensor) -> None:
        engine, timing = self.engine, False
        if engine is None and out.shape == (self.side, self.side):
            timing = True
            engine = len(self.seconds["engine"]) < 2
        t0 = time.perf_counter()
        if engine:
            _C.gram_nt(self.mt[rows].numpy(), self.mt[cols].numpy(), out.numpy(), torch.get_num_threads())
        else:
            torch.mm(self.mt[rows], self.mt[cols].T, out=out)
        if timing:
            self.seconds["engine" if engine else "blas"].append(time.perf_counter() - t0)
            if self.seconds["blas"]:
                self.engine = self.seconds["engine"][-1] <= self.seconds["blas"][0]
                _ENGINE_FASTER[self.key] = self.engine


class CppBackend:
    """The C++ core on CPU tensors."""

    name = "cpp"
    checks_labels = True  # _C.block_moments checks every label before it writes
    pair_tile = DEFAULT_TILE

    # ----------------------------------------------------------------------------- moments
    def block_moments(self, x, y, num_classes, *, unit_sums, check_finite):
        # any number of rows in O(C D) memory, in one call
        buf, dtype_name = buffer(x)
        r = _C.block_moments(
            buf, dtype_name, y.contiguous().numpy(), num_classes, torch.get_num_threads(), unit_sums=unit_sums
        )
        if check_finite and not r["finite"]:
            raise ValueError(NON_FINITE)
        return BlockMoments(
            *(torch.from_numpy(r[k]) if k in r else None for k in ("counts", "means", "m2", "unit_sums", "norm_sums"))
        )

    def merge_into(self, state, part, delta):
        # the state's own arrays, written through numpy views (CPU float64, contiguous)
        tensors = (state.counts, state.means, state.m2, state.unit_sums, state.norm_sums)
        if not all(t is None or t.is_contiguous() for t in tensors) or (
            delta is not None and not delta.is_contiguous()
        ):
            return None
        view = lambda t: None if t is None else t.numpy()
        weight = _C.merge_moments(
            *(view(t) for t in tensors),
            *(
                view(t.contiguous()) if t is not None else None
                for t in (part.counts, part.means, part.m2, part.unit_sums, part.norm_sums)
            ),
            delta=view(delta),
        )
        return None if weight is None else torch.from_numpy(weight)

    def centred_scatters(self, x, y, means, scales):
        buf, dtype_name = buffer(x)
        labels = y.contiguous().numpy()
        mu = means.contiguous().numpy()
        threads = torch.get_num_threads()
        if not _C.gram_available():

            def centre(xb, yb, out):
                b, name = buffer(xb)
                _C.centre_rows(b, name, yb.contiguous().numpy(), mu, out.numpy(), threads)
                return out

            return blockwise_scatters(x, y, means, scales, centre)
        # The register-tiled engine centres rows as it packs them: no N x D float64 copy.
        out = []
        for s in scales:
            acc = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            _C.centred_scatter(
                buf, dtype_name, labels, mu, None if s is None else s.contiguous().numpy(), acc.numpy(), threads
            )
            out.append(acc)
        return out

    def sym_gram(self, a):
        if not _C.gram_available():
            return a.T @ a
        # one class centred at the origin: the engine's symmetric update of the plain a^T a
        c, d = a.shape
        out = torch.zeros(d, d, dtype=torch.float64)
        _C.centred_scatter(
            a.contiguous().numpy(),
            "float64",
            torch.zeros(c, dtype=torch.int64).numpy(),
            torch.zeros(1, d, dtype=torch.float64).numpy(),
            None,
            out.numpy(),
            torch.get_num_threads(),
        )
        return out

    # --------------------------------------------------------------------------------- NCC
    @staticmethod
    def _fused(classes: int) -> bool:
        return _C.ncc_register_tiled() or classes <= FUSED_MAX_CLASSES

    def ncc_sweep(self, x, shift, centres, offsets, starts, cmax, omax, precision):
        if not self._fused(centres.shape[0]):
            if precision != "fp32":
                raise ValueError(f"precision: GEMM blocks sweep in 'fp32' only, got {precision!r}")
            return gemm_sweep(x, shift, centres, offsets, starts, cmax, omax)
        d = x.shape[1]
        if precision == "bf16":
            rel = _numerics.rel_bf16_fma(d)
            # VDPBF16PS flushes subnormal inputs and products
            omax = [o + _numerics.flush_floor(d, c) / rel for o, c in zip(omax, cmax)]
        else:  # the sweep's own summation depth (chunks of features without AVX-512), not d
            rel = _numerics.rel_float(_numerics.U32, _C.ncc_sum_terms(d))
            omax = [o + _numerics.underflow_floor(_numerics.TINY32, d, c) / rel for o, c in zip(omax, cmax)]
        buf, dtype_name = buffer(x)
        best, unsure = _C.ncc_sweep(
            buf,
            dtype_name,
            shift.contiguous().numpy(),
            centres.contiguous().numpy(),
            offsets.contiguous().numpy(),
            starts,
            rel,
            cmax,
            omax,
            torch.get_num_threads(),
            precision,
        )
        return Sweep(torch.from_numpy(best), torch.from_numpy(unsure).to(torch.bool))

    def fast_precisions(self, classes):
        return ("bf16",) if self._fused(classes) and _C.ncc_has_precision("bf16") else ()

    def probe_rows(self):
        return 1024

    def warm_up(self, x, sweep):
        pass

    def synchronize(self, x):
        pass

    # ---------------------------------------------------------------------------- pairwise
    def pair_reducer(self, mt, tile, ctx):
        """The C++ tile sweep over Gram blocks from the C++ Gram engine or torch.mm (BLAS),
        whichever forms a tile faster on this machine (_TileProducts; BLAS without the engine).
        A diagonal block goes as row strips from the diagonal rightwards: the products below the
        diagonal, which no statistic reads, are not formed."""
        mt = mt.contiguous()
        c = mt.shape[0]
        side = min(tile, c)
        blocks = -(-c // tile)
        products = _TileProducts(mt, side, blocks * (blocks + 1) // 2)
        buf = torch.empty(side * side, dtype=torch.float64)  # one tile's Gram block, reused
        # numpy views of the per-class vectors, sliced per tile without a torch view each time
        host = ctx.vectors().map(torch.Tensor.numpy)
        params = np.array(ctx.params(), dtype=np.float64)
        threads = torch.get_num_threads()

        def sweep(rows, cols):
            gram = buf[: (rows.stop - rows.start) * (cols.stop - cols.start)].view(rows.stop - rows.start, -1)
            products(rows, cols, gram)
            vec = tile_vectors(host, rows, cols)
            return PairSums.of(_C.reduce_pair_tile(gram.numpy(), vec.rows, vec.cols, params, threads))

        def reduce(rows, cols):
            if rows.start != cols.start:
                return [sweep(rows, cols)]
            step = -(-(rows.stop - rows.start) // DIAGONAL_STRIPS)
            step = -(-step // STRIP_ALIGN) * STRIP_ALIGN
            return [
                sweep(slice(r0, min(rows.stop, r0 + step)), slice(r0, cols.stop))
                for r0 in range(rows.start, rows.stop, step)
            ]

        return reduce
