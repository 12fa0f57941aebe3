"""What every backend implements (``Backend``) and the dataclasses its kernels return."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Literal, NamedTuple, Protocol

import torch

from .. import _numerics

NCC_BLOCK_ELEMS = 1 << 22
"""Floats in one (rows x classes) score block of the GEMM sweep and of the recheck."""
NCC_BLOCK_ELEMS_GPU = 1 << 26
"""The same on a GPU, where the rechecks' float64 GEMMs want many rows."""


def ncc_block_rows(x: torch.Tensor, classes: int) -> int:
    """Rows per score block for ``classes`` centres of x's width: the GEMM sweep's and the formula
    layer's recheck of uncertain rows (ncfast.ncc) share it."""
    elems = NCC_BLOCK_ELEMS_GPU if x.is_cuda else NCC_BLOCK_ELEMS
    return max(1, min(16384, elems // max(classes, x.shape[1])))


# ------------------------------------------------------------------------------------ results
@dataclass
class BlockMoments:
    """Per-class statistics of a block of rows, float64 (counts int64), on the rows' device.

    m2[c] = sum_{y_i=c} ||h_i - mu_c||^2 centred on the block's own class means; unit_sums[c] =
    sum_{y_i=c} h_i / ||h_i|| and norm_sums[c] = sum_{y_i=c} ||h_i|| (None when not asked for).
    """

    counts: torch.Tensor  # (C,) int64
    means: torch.Tensor  # (C, D); zero rows for classes without a row
    m2: torch.Tensor  # (C,)
    unit_sums: torch.Tensor | None  # (C, D)
    norm_sums: torch.Tensor | None  # (C,)

    def merge(self, other: BlockMoments) -> BlockMoments:
        """The statistics of both blocks' rows (Chan's merge per class)."""
        return self.combine(other)[0]

    def combine(self, other: BlockMoments):
        """(merge(other), delta, weight): with ``_numerics.chan_merge``'s per-class delta and weight,
        from which a D x D scatter merges (``ClassMoments``)."""
        n, mean, m2, delta, weight = _numerics.chan_merge(
            self.counts, self.means, self.m2, other.counts, other.means, other.m2
        )
        unit_sums = norm_sums = None
        if self.unit_sums is not None and other.unit_sums is not None:
            # unit and norm sums come together (block_moments' unit_sums flag)
            assert self.norm_sums is not None and other.norm_sums is not None
            unit_sums, norm_sums = self.unit_sums + other.unit_sums, self.norm_sums + other.norm_sums
        merged = BlockMoments(n, mean, m2, unit_sums, norm_sums)
        return merged, delta, weight


Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "tf32", "bf16")
"""What a nearest-centre sweep's products are accurate to, in every backend: "fp32" float32-level
(the exact mode: C++ and torch float32 FMAs, Triton's three-TF32 split ``triton.ncc.FP32_DOT``),
"tf32" and "bf16" the fast mode's low precisions (``Backend.fast_precisions``)."""


@dataclass
class Sweep:
    """A certified argmin sweep over G groups of classes (``Backend.ncc_sweep``)."""

    best: torch.Tensor  # (N, G) int64: argmin within each group, lowest index on ties
    unsure: torch.Tensor  # (N, G) bool: the two best scores within twice the error bound


PAIR_PARAMS = ("g", "etf_diag", "etf_offdiag", "mean_cos", "etf_cos", "cdnv_exponent", "unif_floor")
"""The scalars of ``PairContext`` every tile reducer reads, in the order of the packed float64 params
buffer of the C++ core and of the Triton kernel (``_C.PAIR_PARAMS`` and ``triton.pairwise.PARAMS``
name the same)."""


class PairVectors(NamedTuple):
    """The per-class vectors of the pairwise pass for the classes start, start + 1, ...: of all
    classes (``PairContext.vectors``), or of one side of a tile (``tile_vectors``). The reducers read
    sq, norms, var and sup and update best, best_idx and ratio_sum in place. Torch tensors, or numpy
    views of them (``map``); the field names are those of ``PairContext``."""

    start: int  # the global index of the first class
    sq: Any  # ||Mt_c||^2
    norms: Any  # ||Mt_c||
    var: Any  # v_c
    sup: Any  # super-class of each class (int64), or None
    best: Any  # running min_{j != c} ||mu_c - mu_j||^2
    best_idx: Any  # its argmin (global index, int64)
    ratio_sum: Any  # sum of the CDNV ratios of the pairs of c

    def take(self, part: slice) -> PairVectors:
        """The classes ``part`` of these (positions from start): views, so in-place updates reach these."""
        return PairVectors(self.start + part.start, *(None if v is None else v[part] for v in self[1:]))

    def map(self, fn: Callable) -> PairVectors:
        """fn applied to every vector (None stays None)."""
        return PairVectors(self.start, *(None if v is None else fn(v) for v in self[1:]))


class PairTileVectors(NamedTuple):
    """The per-class vectors of a tile's rows and of its columns (``tile_vectors``); on a diagonal
    tile (the same start) the two sides view the same classes."""

    rows: PairVectors
    cols: PairVectors


@dataclass
class PairContext:
    """Per-class vectors and constants every tile of the pairwise pass needs (``ncfast.pairwise``);
    best, best_idx and ratio_sum are updated in place by the tile reducers. A tile reducer sees
    the vectors as ``PairVectors`` (``tile_vectors``) and the scalars as ``params()``: every field
    is one or the other."""

    sq: torch.Tensor  # ||Mt_c||^2
    norms: torch.Tensor  # ||Mt_c||
    var: torch.Tensor  # v_c
    sup: torch.Tensor | None  # super-class of each class, int64
    g: float  # ||G||_F
    etf_diag: float
    etf_offdiag: float
    mean_cos: float
    etf_cos: float
    best: torch.Tensor  # running min_{j != i} ||mu_i - mu_j||^2
    best_idx: torch.Tensor  # its argmin, int64
    cdnv_exponent: float = 1.0
    unif_floor: float = 0.0  # 2 - 2 cos_ij at or below this: the two directions coincide to rounding
    ratio_sum: torch.Tensor | None = None  # per class: sum of its pairs' CDNV ratios

    def __post_init__(self):
        if self.ratio_sum is None:
            self.ratio_sum = torch.zeros_like(self.best)

    def vectors(self) -> PairVectors:
        """The per-class vectors of all classes (the tensors themselves, not copies)."""
        return PairVectors(0, *(getattr(self, name) for name in PairVectors._fields[1:]))

    def params(self) -> tuple[float, ...]:
        """The scalars in ``PAIR_PARAMS`` order, as floats: the reducers' packed params buffer."""
        return tuple(float(getattr(self, name)) for name in PAIR_PARAMS)


def tile_vectors(ctx: PairContext | PairVectors, rows: slice, cols: slice) -> PairTileVectors:
    """The per-class vectors of the tile of pairs (rows x cols) as views of ctx's: its tensors, or
    the vectors of all classes made from them (as the C++ backend keeps numpy views), so that the
    reducers' in-place updates of best, best_idx and ratio_sum reach ctx."""
    whole = ctx.vectors() if isinstance(ctx, PairContext) else ctx
    return PairTileVectors(whole.take(rows), whole.take(cols))


@dataclass
class PairSums:
    """One tile's sums over its unordered pairs i < j (see ``ncfast.pairwise``): additive sums, and
    (n, mean, M2) triples for the CDNV ratios and the uniformity terms. The fields name what every
    reducer returns: ``of`` reads them off the C++ core's PairSums, ``total`` sums the additive ones
    and merges the triples (the fields whose default is a tuple)."""

    resid: float = 0.0  # sum of (G_ij / ||G||_F - E_ij)^2, both triangles
    cos_dev: float = 0.0  # sum over ordered pairs of (cos_ij - mean cos)^2
    coh: float = 0.0  # sum over ordered pairs of |cos_ij + 1/(C-1)|
    dist: float = 0.0  # sum of D_ij
    msdr_sum: float = 0.0  # sum over ordered same-super-class pairs of D_ij
    msdr_n: int = 0
    cdnv: tuple = (0, 0.0, 0.0)
    unif: tuple = (0, 0.0, 0.0)

    @classmethod
    def of(cls, sums) -> PairSums:
        """The PairSums of any object with these fields as attributes (the C++ core's ``_C.PairSums``)."""
        return cls(**{f.name: getattr(sums, f.name) for f in fields(cls)})

    @classmethod
    def triples(cls) -> tuple[str, ...]:
        """The (n, mean, M2) fields, merged by Chan's formula."""
        return tuple(f.name for f in fields(cls) if isinstance(f.default, tuple))

    @classmethod
    def total(cls, tiles) -> PairSums:
        """The sums of many tiles (the triples merged by Chan's formula)."""
        tiles = list(tiles)
        triples = cls.triples()
        out = cls(**{f.name: sum(getattr(t, f.name) for t in tiles) for f in fields(cls) if f.name not in triples})
        for name in triples:
            setattr(out, name, _numerics.scalar_moments(getattr(t, name) for t in tiles))
        return out


# ----------------------------------------------------------------------------------- protocol
class Backend(Protocol):
    """What a backend implements. Shapes: x (N, D) float16 / bfloat16 / float32 / float64 features,
    y (N,) int64 labels in [0, num_classes), means (C, D) float64."""

    name: str
    checks_labels: bool  # block_moments checks every label's range before it writes anything
    pair_tile: int  # classes per tile side of the pairwise pass

    def block_moments(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, unit_sums: bool, check_finite: bool
    ) -> BlockMoments:
        """Per-class moments of all rows (any N; memory O(C D)). ``check_finite``: NaN or Inf in
        x raises ValueError (``_validation.NON_FINITE``)."""

    def merge_into(self, state: BlockMoments, part: BlockMoments, delta: torch.Tensor | None) -> torch.Tensor | None:
        """Chan's merge of ``part`` into ``state`` in place (the operations of
        ``_numerics.chan_merge``), returning the per-class weights n_a n_b / n and writing the
        per-class delta = mean_b - mean_a into ``delta`` (zero where a part is empty) when given.
        None, with nothing written, where this backend has no in-place merge or a class present in
        both has a mean that is not finite: the caller then merges out of place
        (``BlockMoments.combine``)."""

    def centred_scatters(
        self, x: torch.Tensor, y: torch.Tensor, means: torch.Tensor, scales: list
    ) -> list[torch.Tensor]:
        """For each entry s of ``scales`` (None, or a (C,) float64 per-class factor) the D x D
        float64 scatter sum_i s_{y_i}^2 (x_i - means[y_i])(x_i - means[y_i])^T (s = 1 for None)."""

    def sym_gram(self, a: torch.Tensor) -> torch.Tensor:
        """a^T a for a float64 (C, D) matrix, symmetric (D, D)."""

    def ncc_sweep(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        centres: torch.Tensor,
        offsets: torch.Tensor,
        starts: list[int],
        cmax: list[float],
        omax: list[float],
        precision: Precision,
    ) -> Sweep:
        """The certified argmin of offsets_c + (x_i - shift) . centres_c within each group of
        classes starts[g] .. starts[g + 1] (``ncfast.ncc``): rows whose two best scores are within
        twice the score bound at ``precision`` (rel (||x_i - shift|| cmax[g] + omax[g])) come back
        unsure. shift (D,), centres (K, D) and offsets (K,) float32."""

    def fast_precisions(self, classes: int) -> tuple[Precision, ...]:
        """The low precisions the fast mode may sweep ``classes`` centres with first (empty: none)."""

    def probe_rows(self) -> int:
        """Rows the fast mode times every precision on before it chooses one."""

    def warm_up(self, x: torch.Tensor, sweep: Callable) -> None:
        """Run ``sweep(rows, precision)`` once per precision on a few rows where the first call
        compiles a kernel (so that no compile is timed); nothing elsewhere."""

    def synchronize(self, x: torch.Tensor) -> None:
        """Wait for the device's queued work (for timing)."""

    def pair_reducer(self, mt: torch.Tensor, tile: int, ctx: PairContext) -> Callable[[slice, slice], list[PairSums]]:
        """(rows, cols) -> the PairSums of the tile of pairs (rows x cols of the centred means mt,
        cols.start >= rows.start), one per piece the backend reduced it in (``PairSums.total``
        combines them), updating ctx.best / best_idx / ratio_sum in place."""
