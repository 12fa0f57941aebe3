"""Neural-Collapse metrics of features saved on disk, streamed in blocks.

    python -m ncfast.measure FEATURES LABELS [--weight W.npy --bias b.npy] [--json out.json]
    torchrun --nproc_per_node 4 -m ncfast.measure FEATURES LABELS          # shards split across ranks

FEATURES and LABELS are each one file or a directory of shards (the files with a known suffix,
sorted by name; the k-th feature shard pairs with the k-th label shard and must have as many rows).
Formats: ``.npy`` and ``.safetensors`` (one tensor per file) are read one block of rows at a time,
each block memory-mapped, copied and unmapped, so the peak memory does not grow with N;
``.pt`` (one tensor per file, ``torch.save``) is memory-mapped by
``torch.load(mmap=True)``. Features may be float16, bfloat16 (safetensors), float32 or float64;
each block is measured in float64 statistics (``ClassMoments``).

Two passes over the features, as ``nc_metrics`` (``ncfast.passes``): the first streams every block
into one ``ClassMoments`` (exact, mergeable: Chan's formula); the second, now that the class means
are final, adds the D x D scatter about them and scores every row's nearest class centre against
its label and, with ``--weight``, against the classifier's decision argmax W h + b. With
``--train-means`` (a held-out split scored against the train split's class means) the centres are
known up front and everything is taken in the first pass: one read of the features. Then
``metrics_from_moments`` gives every metric of docs/metrics.md; no N x C or C x C matrix is held
(pairwise metrics stream over class tiles), except for ``--class-distance``, which writes the
C x C matrix and so needs C^2 x 8 bytes.

Under torchrun (torch.distributed initialised by the launcher's environment) the blocks are dealt
to the ranks in turn, each rank's statistics are merged exactly (``ClassMoments.all_reduce``) and
the counts summed: the result equals one process's (to float64 rounding). Rank 0 prints and writes.
A block that fails on one rank (NaN, an unreadable file) is reported by that rank, with its file,
and every rank stops with exit status 2.

Rows holding NaN or Inf stop the command, naming the file and the rows; ``--nan-policy omit``
drops them with their labels instead and reports how many were dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import backends
from ._distributed import Ranks, init_distributed, launched_by_torchrun
from ._validation import NAN_POLICIES, NON_FINITE, WEIGHTINGS, check_choice, check_state_fits, finite_rows
from .metrics import DEFAULT_RTOL, class_distance_from_moments
from .passes import Block, Plan, Stream

SUFFIXES = (".npy", ".safetensors", ".pt")
DEFAULT_BLOCK_BYTES = 64 << 20
"""Feature bytes per block (--block-rows overrides): 64 MiB, e.g. 16,384 rows of 2,048 float16."""
CLASS_DISTANCE_LIMIT = 8 << 30
"""--class-distance refuses a C x C float64 matrix larger than this (C = 32,768)."""


def _heap_trimmer():
    """glibc's malloc_trim, or a no-op elsewhere. Blocks allocate and free chunks of a few MB to tens
    of MB (a block's float32 copy, C x D float64 temporaries); glibc serves the smaller ones from its
    heap, whose freed pages it keeps, and the peak RSS then grew with the number of blocks (1.6 GB
    for 80,000 rows of 2,048 features against 0.8 GB for 20,000). Trimming before each block hands
    the freed pages back."""
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


_trim_heap = _heap_trimmer()

_SAFETENSORS_DTYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "BF16": "bf16",
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
}


# ------------------------------------------------------------------------------------- reading
@dataclass
class Shard:
    """One 1-D or 2-D array in a file, read by rows."""

    path: Path
    shape: tuple
    dtype: object  # a numpy dtype, or "bf16" (bfloat16 stored as 2-byte words)
    offset: int = 0  # byte offset of the C-ordered data (.npy / .safetensors)
    tensor: torch.Tensor | None = None  # .pt: the memory-mapped tensor

    @property
    def rows(self) -> int:
        return int(self.shape[0]) if self.shape else 0

    @property
    def row_items(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bf16" else np.dtype(self.dtype).itemsize

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) as a torch tensor of their own (the file's pages are released after, and the
        heap pages the previous block freed)."""
        _trim_heap()
        if self.tensor is not None:
            return self.tensor[lo:hi].clone()
        row_bytes = self.row_items * self.itemsize
        start, length = self.offset + lo * row_bytes, (hi - lo) * row_bytes
        with open(self.path, "rb") as f:
            if length == 0:
                raw = np.empty(0, dtype=np.uint8)
            else:
                page = mmap.PAGESIZE
                base = (start // page) * page
                # the block alone is mapped, copied and unmapped: its pages leave this process's RSS
                with mmap.mmap(f.fileno(), start + length - base, access=mmap.ACCESS_READ, offset=base) as mm:
                    raw = np.frombuffer(mm, dtype=np.uint8, count=length, offset=start - base).copy()
        shape = (hi - lo, *self.shape[1:])
        if self.dtype == "bf16":
            words = torch.from_numpy(raw.view(np.int16).reshape(shape))
            return words.view(torch.bfloat16)
        values = raw.view(self.dtype).reshape(shape)
        if not values.dtype.isnative:  # a big-endian .npy: torch takes native byte order only
            values = values.astype(values.dtype.newbyteorder("="))
        return torch.from_numpy(values)


MAX_HEADER_BYTES = 100 << 20
"""The largest safetensors header read (the format's own reader refuses larger ones)."""


def _check_shape(path: Path, shape) -> tuple:
    """A header's shape as a tuple of ints >= 0, or ValueError naming the file."""
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise ValueError(f"{path}: the header's shape {shape!r} is not a list of integers >= 0")
    return tuple(shape)


def _check_extent(path: Path, shape: tuple, itemsize: int, offset: int, end: int | None = None) -> None:
    """The data the header describes (shape x itemsize bytes from ``offset``) must be exactly what the
    file holds from there (``end``: where the header says it ends): checked before anything is
    allocated or read by the shape."""
    size = path.stat().st_size
    nbytes = math.prod(shape) * itemsize
    if end is not None and end - offset != nbytes:
        raise ValueError(
            f"{path}: the header's shape {shape} x {itemsize} bytes is {nbytes} bytes, but its "
            f"data_offsets span {end - offset}"
        )
    if offset + nbytes != size:
        raise ValueError(
            f"{path}: the header describes {nbytes} bytes of data from byte {offset}, but the file has "
            f"{size - offset} there ({'truncated' if offset + nbytes > size else 'bytes left over'})"
        )


def _npy(path: Path) -> Shard:
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception as exc:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, TokenError...
            raise ValueError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from None
        offset = f.tell()
    if fortran and len(shape) > 1:
        raise ValueError(f"{path}: a Fortran-ordered array; save it C-ordered (np.ascontiguousarray)")
    if dtype.hasobject:
        raise ValueError(f"{path}: an object array")
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"{path}: holds {dtype.str}, not numbers (features are floating point, labels integers)")
    shape = _check_shape(path, shape)
    _check_extent(path, shape, dtype.itemsize, offset)
    return Shard(path, shape, dtype, offset)


def _safetensors(path: Path) -> Shard:
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: not a safetensors file (a header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: the safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is a {type(header).__name__}, not an object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) != 1:
        raise ValueError(f"{path}: expected one tensor, found {sorted(tensors)}")
    ((name, meta),) = tensors.items()
    if not isinstance(meta, dict) or not all(k in meta for k in ("dtype", "shape", "data_offsets")):
        raise ValueError(f"{path}: tensor {name!r} needs dtype, shape and data_offsets in the header")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {meta['dtype']}, not one of {sorted(_SAFETENSORS_DTYPES)}")
    shape = _check_shape(path, meta["shape"])
    offsets = meta["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(
            f"{path}: tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end"
        )
    if offsets[0] != 0:
        raise ValueError(f"{path}: tensor {name!r} starts {offsets[0]} bytes into the data (a hole before it)")
    dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
    itemsize = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
    _check_extent(path, shape, itemsize, 8 + n, 8 + n + offsets[1])
    return Shard(path, shape, dtype, 8 + n)


def _pt(path: Path) -> Shard:
    try:
        obj = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - empty, truncated, legacy-format or not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable .pt file of one tensor ({first})") from None
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ValueError(f"{path}: expected one tensor, found a dict with keys {sorted(obj)}")
        obj = tensors[0]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, got {type(obj).__name__}")
    return Shard(path, tuple(obj.shape), None, tensor=obj)


def open_shards(source, what: str) -> list[Shard]:
    """The shards of a file or a directory (files with a known suffix, sorted by name)."""
    path = Path(source)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file()), key=_natural_key)
        if not files:
            raise FileNotFoundError(f"{what}: no {'/'.join(SUFFIXES)} file in the directory {path}")
    elif path.is_file():
        files = [path]
    elif path.exists():
        raise ValueError(f"{what}: {path} is not a regular file or a directory")
    else:
        raise FileNotFoundError(f"{what}: {path} does not exist")
    readers = {".npy": _npy, ".safetensors": _safetensors, ".pt": _pt}
    shards = []
    for p in files:
        if p.suffix not in readers:
            raise ValueError(f"{what}: {p} is not {', '.join(SUFFIXES)}")
        shards.append(readers[p.suffix](p))
    return shards


def _natural_key(path: Path) -> tuple:
    """Sort key of a shard's file name: its numbers compared as numbers (x_2 before x_10)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.stem) if t)


def _stem_numbers(path: Path) -> tuple[int, ...]:
    return tuple(int(t) for t in re.findall(r"\d+", path.stem))


def pair_shards(features: list[Shard], labels: list[Shard]) -> list[tuple[Shard, Shard]]:
    """Feature and label shards paired in natural order (x_2 before x_10); with several shards,
    each pair must have the same stem or the same (non-empty) numbers in its stem (x_07 with y_7), else
    ValueError naming both files: a sorted-name pairing of x_10 with y_02 gave a wrong nc1 silently."""
    if len(features) != len(labels):
        raise ValueError(f"LABELS: {len(labels)} shard(s) for {len(features)} feature shard(s)")
    if len(features) > 1:
        for f, y in zip(features, labels):
            numbers = _stem_numbers(f.path)
            if f.path.stem != y.path.stem and (not numbers or numbers != _stem_numbers(y.path)):
                raise ValueError(
                    f"LABELS: {y.path} is paired with {f.path}, but their names share neither stem nor "
                    f"numbers; name the shards alike (x_1.npy with y_1.npy)"
                )
    d = None
    for f, y in zip(features, labels):
        if len(f.shape) != 2:
            raise ValueError(f"FEATURES: {f.path} has shape {f.shape}, expected (N, D)")
        if len(y.shape) != 1:
            raise ValueError(f"LABELS: {y.path} has shape {y.shape}, expected (N,)")
        if f.rows != y.rows:
            raise ValueError(f"LABELS: {y.path} has {y.rows} rows, {f.path} {f.rows}")
        if d is not None and f.shape[1] != d:
            raise ValueError(f"FEATURES: {f.path} has D = {f.shape[1]}, the first shard {d}")
        d = f.shape[1]
    return list(zip(features, labels))


def blocks(shards: list[Shard], block_rows: int | None) -> list[tuple[int, int, int]]:
    """(shard index, lo, hi) of every block of rows, in file order."""
    out = []
    for k, f in enumerate(shards):
        rows = block_rows or max(1, DEFAULT_BLOCK_BYTES // max(1, f.row_items * f.itemsize))
        out += [(k, lo, min(lo + rows, f.rows)) for lo in range(0, f.rows, rows)]
    return out


# ------------------------------------------------------------------------------------ measuring
def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, file=sys.stderr, leave=False)


def _floating(shard: Shard) -> bool:
    if shard.tensor is not None:
        return shard.tensor.dtype.is_floating_point
    return shard.dtype == "bf16" or np.dtype(shard.dtype).kind == "f"


def _float(x: torch.Tensor) -> torch.Tensor:
    """Half-precision blocks are measured in float32 (the statistics are float64 either way)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _load_matrix(path, what: str, shape=None, *, floating: bool = True) -> torch.Tensor:
    """The one array of a file given by a flag: floating point (or integer with ``floating=False``)
    and of ``shape``, else ValueError naming the flag and the file."""
    shard = open_shards(path, what)
    if len(shard) != 1:
        raise ValueError(f"{what}: give one file, not a directory")
    t = shard[0].read(0, shard[0].rows)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what}: {shard[0].path}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    integer = not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)
    if (floating and not t.dtype.is_floating_point) or (not floating and not integer):
        raise ValueError(
            f"{what}: {shard[0].path} holds {t.dtype}, expected {'floating-point' if floating else 'integer'} values"
        )
    return t


def measure(
    features,
    labels,
    *,
    num_classes: int | None = None,
    weight=None,
    bias=None,
    superclass=None,
    ood=None,
    train_means=None,
    weighting: str = "balanced",
    rtol: float = DEFAULT_RTOL,
    block_rows: int | None = None,
    device="cpu",
    progress: bool = False,
    timings: dict | None = None,
    nan_policy: str = "raise",
):
    """Metrics of saved features (paths, see the module docstring). Returns (NCMetrics, ClassMoments).
    ``timings``, when given, receives the seconds of each pass: labels, moments, ood, ncc, metrics.

    ``nan_policy``: "raise" (default) stops at the first block holding NaN or Inf, naming its file
    and rows; "omit" drops those rows with their labels in every pass and counts them in
    ``NCMetrics.omitted_rows``. With ``train_means`` and "omit" the label pass reads the features
    too, since the class counts announced to the one pass are those of the rows kept.

    ``weight``/``bias``/``superclass``/``train_means``: paths of .npy/.pt/.safetensors files or
    tensors; ``ood``: a path (file or directory) of out-of-distribution features of the same layer.
    Under torch.distributed every rank gets the same result."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"--weighting: one of {WEIGHTINGS}, got {weighting!r}")
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"--block-rows: must be >= 1, got {block_rows}")
    check_choice(nan_policy, NAN_POLICIES, "--nan-policy")
    omit = nan_policy == "omit"
    device = torch.device(device)
    ranks = Ranks()
    timings = {} if timings is None else timings
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        timings[name] = now - clock[0]
        clock[0] = now

    pairs = pair_shards(open_shards(features, "FEATURES"), open_shards(labels, "LABELS"))
    for f, _ in pairs:
        if not _floating(f):
            raise ValueError(
                f"FEATURES: {f.path} holds {f.tensor.dtype if f.tensor is not None else f.dtype}, "
                f"expected floating-point features (float16, bfloat16, float32, float64)"
            )
    d = pairs[0][0].shape[1]
    todo = ranks.mine(blocks([f for f, _ in pairs], block_rows))
    n_total = sum(f.rows for f, _ in pairs)

    # pass 0: the labels (counts, and num_classes from the largest label), read once; a class count,
    # given or met, is sized against the free memory before anything is allocated by it
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"--num-classes: must be >= 1, got {num_classes}")
        _fits(num_classes, d, device, "--num-classes")
    count_kept = omit and train_means is not None  # the one pass needs the counts of the rows it keeps

    def label_pass():
        low_high = torch.tensor([0, -1], dtype=torch.int64)
        counts = torch.zeros(0, dtype=torch.int64)
        for k, lo, hi in todo:
            y = pairs[k][1].read(lo, hi)
            if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
                raise ValueError(f"LABELS: {pairs[k][1].path} holds {y.dtype}, expected integers")
            if y.numel():
                y = y.long()
                high = int(y.max())
                # before bincount allocates by it: one stray label of 2^40 would ask for 8 TiB
                if num_classes is not None and high >= num_classes:
                    raise ValueError(f"--num-classes: {num_classes}, but a label is {high}")
                if num_classes is None:
                    _fits(high + 1, d, device, f"LABELS: {pairs[k][1].path}: a label is {high}, so")
                low_high = torch.maximum(low_high, torch.stack([-y.min(), y.max()]))
                if count_kept:
                    y = y[finite_rows(pairs[k][0].read(lo, hi))]
                block = torch.bincount(y.clamp_min(0))  # a negative label is refused below, on every rank
                counts = torch.nn.functional.pad(counts, (0, max(0, block.numel() - counts.numel())))
                counts[: block.numel()] += block
        return low_high, counts

    low_high, counts = _together(ranks, label_pass)
    low_high = ranks.reduce(low_high, "max")
    if int(low_high[0]) > 0:
        raise ValueError(f"LABELS: a label is negative ({-int(low_high[0])}); labels must be in [0, C)")
    c = int(low_high[1]) + 1 if num_classes is None else int(num_classes)
    if int(low_high[1]) >= c:
        raise ValueError(f"--num-classes: {c}, but a label is {int(low_high[1])}")
    counts = ranks.reduce(torch.nn.functional.pad(counts, (0, c - counts.numel())))
    present = counts[counts > 0]
    if present.numel() < 2:
        raise ValueError(f"LABELS: at least 2 classes must have samples, got {present.numel()}")
    lap("labels")

    w = b = sup = means_given = None
    if weight is not None:
        w = weight if isinstance(weight, torch.Tensor) else _load_matrix(weight, "--weight", (c, d))
        w = _float(w).to(device)
    if bias is not None:
        if w is None:
            raise ValueError("--bias: given without --weight")
        b = bias if isinstance(bias, torch.Tensor) else _load_matrix(bias, "--bias", (c,))
        b = _float(b).to(device)
    if superclass is not None:
        sup = (
            superclass
            if isinstance(superclass, torch.Tensor)
            else _load_matrix(superclass, "--superclass", (c,), floating=False)
        )
        sup = sup.long().to(device)
    if train_means is not None:
        means_given = (
            train_means if isinstance(train_means, torch.Tensor) else _load_matrix(train_means, "--train-means", (c, d))
        ).to(device)

    # pass 1: the moments; with --train-means (the centres known) also the scatter and the nearest
    # class centre, and then it is the only pass over the features (passes.Stream)
    stream = Stream(
        c,
        d,
        device=device,
        weighting=weighting,
        centres=means_given,
        one_pass=means_given is not None,
        class_counts=counts.to(device),
        classifier=None if w is None else (w, b),
    )
    plan = Plan({"features": stream}, comm=ranks, cache_bytes=0)

    def feed(step, desc, first: bool):
        bar = _progress(n_total, desc, progress and ranks.rank == 0)
        for k, lo, hi in todo:
            f, yl = pairs[k]
            x, y = _float(f.read(lo, hi)), yl.read(lo, hi).long()
            if omit:
                keep = finite_rows(x)
                if not bool(keep.all()):
                    x, y = x[keep], y[keep]
                    if first:
                        stream.moments.omitted_rows += int((~keep).sum())  # summed over the ranks by end_first
            try:
                step(Block({"features": x.to(device)}, y.to(device)))
            except ValueError as e:
                if str(e) != NON_FINITE:
                    raise
                # the API's message names its own nan_policy argument; this names the command's flag
                raise ValueError(
                    f"FEATURES: {f.path}: rows {lo} to {hi - 1} hold NaN or Inf; pass --nan-policy "
                    f"omit to drop such rows (and their labels), or remove them"
                ) from None
            if bar is not None:
                bar.update((hi - lo) * ranks.world)
        if bar is not None:
            bar.close()

    _together(ranks, lambda: feed(plan.first, "moments" if plan.pending else "moments and nearest class centre", True))
    plan.end_first()
    m = stream.moments
    lap("moments")
    ood_mean = None
    if ood is not None:
        shards = open_shards(ood, "--ood")
        total = torch.zeros(d + 1, dtype=torch.float64, device=device)
        for s in shards:
            if len(s.shape) != 2 or s.shape[1] != d:
                raise ValueError(f"--ood: {s.path} has shape {s.shape}, expected (N, {d})")

        def ood_pass():
            for k, lo, hi in ranks.mine(blocks(shards, block_rows)):
                x = shards[k].read(lo, hi).to(device=device, dtype=torch.float64)
                total[:d] += x.sum(dim=0)
                total[d] += x.shape[0]

        _together(ranks, ood_pass)
        total = ranks.reduce(total)
        if total[d] == 0:
            raise ValueError("--ood: no rows")
        ood_mean = total[:d] / total[d]
        lap("ood")

    # pass 2: the scatter about the final class means, and the nearest class centre against the label
    # and the classifier's decision argmax W h + b
    if plan.pending:
        _together(ranks, lambda: feed(plan.second, "scatter and nearest class centre", False))
    plan.end()
    lap("ncc")

    out = stream.metrics(backends.for_tensor(m.mean), weight=w, superclass=sup, ood=ood_mean, rtol=rtol)
    lap("metrics")
    return out, m


def _fits(num_classes: int, d: int, device, what: str) -> None:
    """check_state_fits, its message led by the flag or the file that set the class count."""
    check_state_fits(num_classes, d, device, what=what, source="", remedy="pass --num-classes with the true C")


class OtherRankFailed(Exception):
    """Raised on the ranks whose own blocks were fine when another rank's were not."""

    def __init__(self, rank: int):
        super().__init__(f"rank {rank} stopped (its message names the file)")
        self.rank = rank


def _together(ranks: Ranks, work):
    """``work()``: this rank's share of a pass. Before the collective that follows it, every rank
    learns whether any rank's share failed (one rank that raised alone left the others waiting in
    that collective: rank 0 then died with a gloo traceback and was blamed). The failing rank
    re-raises its error prefixed with its rank; the others raise ``OtherRankFailed``."""
    if not ranks.active:
        return work()
    error = result = None
    try:
        result = work()
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        error = e
    first = int(ranks.reduce(torch.tensor([ranks.world - ranks.rank if error is not None else 0]), "max"))
    if error is not None:
        raise ValueError(f"rank {ranks.rank}: {error}") from None
    if first:
        raise OtherRankFailed(ranks.world - first)
    return result


# ------------------------------------------------------------------------------------- the CLI
def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ncfast.measure", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "features", metavar="FEATURES", help="(N, D) features: a .npy/.pt/.safetensors file or a directory of shards"
    )
    p.add_argument("labels", metavar="LABELS", help="(N,) integer labels: a file or a directory of shards")
    p.add_argument("--num-classes", type=int, default=None, help="C (default: the largest label + 1)")
    p.add_argument("--weight", help="(C, D) classifier weight: adds nc3, nc3_etf, duality and ncc_mismatch")
    p.add_argument("--bias", help="(C,) classifier bias (with --weight)")
    p.add_argument("--superclass", help="(C,) super-class of every class: adds msdr")
    p.add_argument("--ood", help="out-of-distribution features of the same layer (file or directory): adds nc5_ood")
    p.add_argument(
        "--train-means",
        help="(C, D) class means of the TRAIN split: the nearest class centres of a held-out split (paper 003 def. 6)",
    )
    p.add_argument("--save-means", help="write the (C, D) float64 class means to this .npy (for --train-means)")
    p.add_argument("--class-distance", help="write the C x C class-distance matrix to this .npy (C^2 x 8 bytes)")
    p.add_argument(
        "--per-class", help="write the per-class vectors (count, variance, cdnv, ncc_accuracy, ...) to this .npz"
    )
    p.add_argument("--json", help="write {metric: value} to this file (NaN as null)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="balanced")
    p.add_argument(
        "--nan-policy",
        choices=NAN_POLICIES,
        default="raise",
        help="raise (default): stop at a row holding NaN or Inf, naming its file; omit: drop such rows "
        "and their labels (counted in the summary)",
    )
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL)
    p.add_argument(
        "--block-rows",
        type=int,
        default=None,
        help=f"rows per block (default: {DEFAULT_BLOCK_BYTES >> 20} MiB of features)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true")
    return p


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _table(metrics) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(
        f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in metrics.items()
    )


def main(argv=None) -> int:
    a = _arg_parser().parse_args(argv)
    import torch.distributed as dist

    launched = launched_by_torchrun() and not dist.is_initialized()
    if launched:  # torchrun: gloo on CPU, nccl with --device cuda (one GPU per rank)
        a.device = init_distributed(a.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # the output paths, before the passes: a missing directory found after an hour of reading is lost work
    for flag in ("json", "save_means", "per_class", "class_distance"):
        target = getattr(a, flag)
        if target is None:
            continue
        parent = Path(target).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            print(
                f"error: --{flag.replace('_', '-')}: cannot write {target} (the directory {parent} "
                f"{'is not writable' if parent.is_dir() else 'does not exist'})",
                file=sys.stderr,
            )
            return 2
    try:
        t0 = time.perf_counter()
        timings = {}
        try:
            out, m = measure(
                a.features,
                a.labels,
                num_classes=a.num_classes,
                weight=a.weight,
                bias=a.bias,
                superclass=a.superclass,
                ood=a.ood,
                train_means=a.train_means,
                weighting=a.weighting,
                rtol=a.rtol,
                block_rows=a.block_rows,
                device=a.device,
                progress=not a.no_progress,
                timings=timings,
                nan_policy=a.nan_policy,
            )
        except OtherRankFailed as e:
            if rank == 0:
                print(f"error: {e}", file=sys.stderr)
            # the failing rank exits first, so torchrun reports it (not this one) as the root cause
            time.sleep(2.0)
            return 2
        except (OSError, ValueError, TypeError) as e:  # OSError: a file unreadable or gone meanwhile
            print(f"error: {e}", file=sys.stderr)
            return 2
        seconds = time.perf_counter() - t0
        if rank == 0:
            distance = None
            if a.class_distance:
                c = m.num_classes
                if c * c * 8 > CLASS_DISTANCE_LIMIT:
                    print(
                        f"error: --class-distance: a {c} x {c} float64 matrix is {c * c * 8 / 2**30:.0f} GiB "
                        f"(limit {CLASS_DISTANCE_LIMIT >> 30} GiB)",
                        file=sys.stderr,
                    )
                    return 2
                distance = class_distance_from_moments(m).cpu().numpy()
            values = {k: float(v) for k, v in out.items()}
            print(_table(values))
            n = int(m.counts.sum())
            print(
                f"\n{n} rows, D = {m.dim}, C = {m.num_classes} ({int((m.counts > 0).sum())} present), "
                f"{seconds:.1f} s"
                + (f"; {m.omitted_rows} rows holding NaN or Inf omitted" if m.omitted_rows else "")
                + (f"; degenerate: {', '.join(sorted(out.degenerate))}" if out.degenerate else ""),
                file=sys.stderr,
            )
            print("passes: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()), file=sys.stderr)
            writes = [
                (
                    "--json",
                    a.json,
                    lambda p: Path(p).write_text(
                        json.dumps({k: _finite(v) for k, v in values.items()}, indent=1) + "\n"
                    ),
                ),
                ("--save-means", a.save_means, lambda p: np.save(p, m.means.cpu().numpy())),
                (
                    "--per-class",
                    a.per_class,
                    lambda p: np.savez(p, **{k: v.cpu().numpy() for k, v in out.per_class.items()}),
                ),
                (
                    "--class-distance",
                    a.class_distance if distance is not None else None,
                    lambda p: np.save(p, distance),
                ),
            ]
            for flag, target, write in writes:
                if target is None:
                    continue
                try:
                    write(target)
                except OSError as e:  # a full disk, a path that went away meanwhile
                    print(f"error: {flag}: could not write {target}: {e.strerror or e}", file=sys.stderr)
                    return 2
        return 0
    finally:
        if launched:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
