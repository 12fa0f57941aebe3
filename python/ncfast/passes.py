"""The passes of a measurement (internal): one orchestration for ``nc_metrics``,
``LayerProbe.measure`` and ``python -m ncfast.measure``.

A ``Stream`` is one set of features measured over a sequence of blocks of rows (a layer of a
network over a loader, a file of saved features, a tensor held in memory). It takes one or two
passes over those blocks:

- **first pass**: the class moments of every block (counts, means, M2, unit-vector and norm
  sums). When the class centres are known before the first pass (a held-out split scored against
  the train split's class means, paper 003 def. 6) and the stream runs in ``one_pass`` mode, the
  first pass also tallies the nearest class centre of every row and streams the D x D scatter
  (Chan's merge; the exact balanced Sigma_W on imbalanced classes then needs the class counts up
  front): it is the only pass.
- **second pass** (otherwise): now that the class means are final, the D x D scatter about them
  (the exact two-pass form: every block centred on the same means, so no class counts are needed
  in advance) and the NCC tally against them, or against the given centres.

A ``Plan`` runs several streams over the same blocks (a model's probed layers, each with its
channel-pooled features when it is wide) and keeps the first pass's blocks of the streams that need
a second pass, while they fit a byte budget (``cache_bytes``), so that their second pass reads the
kept blocks back instead of reading the source again (for a network: instead of another forward
pass). The budget is filled over the cache groups (a layer and its pooled features) in the order
given: a group's blocks are kept while, with those of the groups kept before it, they fit; a group
that no longer fits is dropped from the cache for the rest of the measure (its blocks are freed) and
its second pass reads the source again. The kept blocks are the tensors the first pass read (no
copy: their own dtype, on their own device), so a stream's results are the same bit for bit
whichever way its second pass is fed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import backends
from ._distributed import Ranks
from .metrics import NCMetrics, _metrics_from_moments, _scatter_metrics, class_fractions
from .ncc import _problems, _solve
from .stats import ClassMoments, imbalanced


def announced_counts(counts: torch.Tensor | None, weighting: str) -> torch.Tensor | None:
    """The class counts that a streamed (one-pass) balanced Sigma_W must be given up front: ``counts``
    under balanced weighting when the present classes' counts differ, else None (on balanced data,
    or under sample weighting, the pooled scatter gives Sigma_W exactly)."""
    return counts if counts is not None and weighting == "balanced" and imbalanced(counts) else None


class NCCTally:
    """Per-class integer counts of the nearest-class-centre pass: the rows whose nearest centre is
    their label (``hits[0]``) and, where the network's decisions are known, those whose nearest
    centre differs from the decision (``hits[1]``). Integers, so sums over processes are exact."""

    def __init__(self, num_classes: int, decisions: bool):
        self.num_classes = num_classes
        self.decisions = decisions
        self.hits = torch.zeros(2, num_classes, dtype=torch.int64)
        self._prepared = None  # (centres, classifier, problems): the last blocks' centres, prepared once

    def add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        centres: torch.Tensor,
        backend: backends.Backend,
        *,
        classifier=None,
        decisions: torch.Tensor | None = None,
    ) -> None:
        """Score a block: the exact nearest centre of every row (rows of ``centres`` holding NaN are
        no candidates); the decision is argmax W h + b with ``classifier`` = (W, b), else ``decisions``."""
        p = self._prepared
        if p is None or p[0] is not centres or p[1] is not classifier:
            w, b = classifier if classifier is not None else (None, None)
            p = self._prepared = (centres, classifier, _problems(x, centres, w, b))
        nearest, decided = _solve(x, p[2], "exact", backend)
        if decided is not None:
            decisions = decided
        c = self.num_classes
        self.hits[0] += torch.bincount(y[nearest == y], minlength=c)[:c].cpu()
        if decisions is not None:
            self.hits[1] += torch.bincount(y[nearest != decisions], minlength=c)[:c].cpu()

    def reduce(self, comm: Ranks) -> None:
        self.hits = comm.reduce(self.hits)

    def write(self, out: NCMetrics, counts: torch.Tensor) -> None:
        """ncc_accuracy (and ncc_mismatch with decisions) into ``out`` and its ``per_class``."""
        counts = counts.cpu()
        n = int(counts.sum())
        keys = ("ncc_accuracy", "ncc_mismatch") if self.decisions else ("ncc_accuracy",)
        for i, key in enumerate(keys):
            out[key] = int(self.hits[i].sum()) / n
            out.per_class[key] = class_fractions(self.hits[i], counts)


class Stream:
    """One set of features measured in one or two passes (module docstring).

    Args:
        num_classes, dim, device: the ClassMoments' shape and device.
        weighting: the weighting whose Sigma_W the metrics read.
        scatter, unit_sums: the statistics kept (as ClassMoments).
        ncc: tally the nearest class centre (with ``classifier`` = (W, b) or per-block
            ``decisions``: the NCC mismatch too, ``decisions=True``).
        centres: (num_classes, D) centres known before the first pass; None: the final class means.
        one_pass: with ``centres``, take everything in the first pass (the scatter streamed, with
            ``class_counts`` announced for an exact balanced Sigma_W on imbalanced classes).
        pooled: keep the pooled scatter beside the balanced one (False: only ``weighting``'s).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        device,
        weighting: str = "balanced",
        scatter: bool = True,
        unit_sums: bool = True,
        ncc: bool = True,
        centres: torch.Tensor | None = None,
        one_pass: bool = False,
        class_counts: torch.Tensor | None = None,
        classifier=None,
        decisions: bool = False,
        pooled: bool = True,
    ):
        if one_pass and ncc and centres is None:
            raise ValueError("one_pass: the nearest class centre needs the centres before the first pass")
        self.weighting = weighting
        self.one_pass = one_pass
        self.centres = centres
        self.classifier = classifier
        self.pooled = pooled
        self.scatter = scatter
        self.moments = ClassMoments(
            num_classes,
            dim,
            scatter=scatter and one_pass,
            unit_sums=unit_sums,
            class_counts=announced_counts(class_counts, weighting) if one_pass else None,
            device=device,
        )
        self.tally = NCCTally(num_classes, decisions or classifier is not None) if ncc else None
        self._scatter = None

    @property
    def needs_second_pass(self) -> bool:
        return not self.one_pass and (self.scatter or self.tally is not None)

    def first(
        self, x: torch.Tensor, y: torch.Tensor, backend: backends.Backend, decisions: torch.Tensor | None = None
    ) -> None:
        """The first pass over a block: moments (ClassMoments.update: checked, atomic), and in
        one-pass mode the scatter and the NCC tally."""
        self.moments.update(x, y)
        if self.one_pass and self.tally is not None:
            self.tally.add(x, y, self.centres, backend, classifier=self.classifier, decisions=decisions)

    def end_first(self, comm: Ranks) -> None:
        """Merge the processes' moments (exact); fix the second pass's centres and scatter pass."""
        if comm.active:
            self.moments.all_reduce(comm.group)
        if self.needs_second_pass:
            if self.centres is None:
                self.centres = self.moments.means
            if self.scatter:
                self._scatter = self.moments._scatter_pass(self.weighting, pooled=self.pooled)

    def second(
        self, x: torch.Tensor, y: torch.Tensor, backend: backends.Backend, decisions: torch.Tensor | None = None
    ) -> None:
        """The second pass over the same block again: scatter about the final means, NCC tally."""
        if self._scatter is not None:
            self._scatter.add(x, y, backend)
        if self.tally is not None:
            self.tally.add(x, y, self.centres, backend, classifier=self.classifier, decisions=decisions)

    def end(self, comm: Ranks) -> None:
        """After the last pass: the scatter summed over the processes and attached; the tally summed."""
        if self._scatter is not None:
            self._scatter.attach(comm.reduce if comm.active else None)
            self._scatter = None
        if self.tally is not None and comm.active:
            self.tally.reduce(comm)

    def metrics(
        self,
        backend: backends.Backend,
        *,
        weight=None,
        superclass=None,
        ood=None,
        rtol: float,
        cdnv_exponent: float = 1.0,
        tile=None,
    ) -> NCMetrics:
        """metrics_from_moments of the stream, with its NCC tally written in."""
        out = _metrics_from_moments(
            self.moments,
            backend,
            weight=weight,
            superclass=superclass,
            ood=ood,
            weighting=self.weighting,
            rtol=rtol,
            cdnv_exponent=cdnv_exponent,
            tile=tile,
        )
        if self.tally is not None:
            self.tally.write(out, self.moments.count)
        return out

    def scatter_metrics(self, rtol: float) -> tuple[dict, dict, tuple]:
        """(values, ranks, degenerate) of the stream's D x D metrics alone (metrics._scatter_metrics)."""
        return _scatter_metrics(self.moments, self.weighting, rtol)


@dataclass
class Block:
    """One block of rows as every stream of a Plan sees it: features per stream, labels, and the
    network's decisions (or None)."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    decisions: torch.Tensor | None = None


@dataclass
class _Kept:
    """The blocks a cache group keeps: per block, the group's streams' features."""

    streams: list[str]
    blocks: list[dict[str, torch.Tensor]] = field(default_factory=list)
    bytes: int = 0
    dropped: bool = False

    def block_bytes(self, block: Block) -> int:
        """What keeping one more block of this group costs."""
        return sum(_nbytes(block.features[n]) for n in self.streams)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Plan:
    """Streams measured side by side over the same blocks, with the cache of their second pass.

    Use: ``first(block)`` for every block, ``end_first()``, ``second_from_cache()``, then
    ``second(block)`` over the blocks again for the streams of ``pending`` (if any), then ``end()``.

    Args:
        streams: name -> Stream, in the order they are fed.
        groups: cache groups in priority order, name -> the stream names it holds (default: one group
            per stream that needs a second pass).
        comm: the processes whose shards make up the data.
        cache_bytes: the budget of kept blocks (0: none; None: no limit, for features already in
            memory, which the cache only references).
        expected_rows: the number of rows the first pass will see, when known (a loader's length
            times its first batch's rows): the groups are then chosen by first fit at the first
            block, so that a group that cannot fit at the end takes no room meanwhile.
    """

    def __init__(
        self,
        streams: Mapping[Any, Stream],
        *,
        groups: Mapping[Any, Sequence[Any]] | None = None,
        comm: Ranks | None = None,
        cache_bytes: int | None = 0,
        expected_rows: int | None = None,
    ):
        self.streams = streams
        self.comm = comm or Ranks(False)
        self.cache_bytes = cache_bytes
        self.expected_rows = expected_rows
        if groups is None:
            groups = {name: [name] for name in streams}
        self.groups = {g: _Kept([n for n in names if streams[n].needs_second_pass]) for g, names in groups.items()}
        self.groups = {g: k for g, k in self.groups.items() if k.streams}
        if cache_bytes == 0:
            for kept in self.groups.values():
                kept.dropped = True
        self._shared: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # labels, decisions per block
        self._shared_bytes = 0
        self._first = True  # no block seen yet

    def first(self, block: Block) -> None:
        for name, s in self.streams.items():
            x = block.features[name]
            s.first(x, block.labels, backends.for_tensor(x), block.decisions)
        self._keep(block)

    def _keep(self, block: Block) -> None:
        """Keep the block for the groups that still fit (module docstring: first fit in order)."""
        live = [k for k in self.groups.values() if not k.dropped]
        if not live:
            return
        shared = _nbytes(block.labels) + _nbytes(block.decisions)
        rows = block.labels.shape[0]
        first, self._first = self._first, False
        if first and self.expected_rows and self.cache_bytes is not None and rows:
            # the first block: first fit of the groups' expected totals
            scale = self.expected_rows / rows
            used = shared * scale
            for kept in live:
                size = kept.block_bytes(block) * scale
                if used + size <= self.cache_bytes:
                    used += size
                else:
                    kept.dropped = True
            live = [k for k in live if not k.dropped]
            if not live:
                return
        used = self._shared_bytes + shared
        kept_any = False
        for kept in live:
            size = kept.bytes + kept.block_bytes(block)
            if self.cache_bytes is None or used + size <= self.cache_bytes:
                kept.blocks.append({n: block.features[n] for n in kept.streams})
                kept.bytes = size
                used += size
                kept_any = True
            else:
                kept.dropped, kept.blocks, kept.bytes = True, [], 0
        if kept_any:
            self._shared.append((block.labels, block.decisions))
            self._shared_bytes += shared
        else:
            self._shared, self._shared_bytes = [], 0

    def end_first(self) -> None:
        for s in self.streams.values():
            s.end_first(self.comm)

    @property
    def cached(self) -> list[str]:
        """The cache groups whose second pass reads the kept blocks."""
        return [g for g, k in self.groups.items() if not k.dropped]

    @property
    def pending(self) -> list[str]:
        """The cache groups whose second pass must read the source again (``second``)."""
        return [g for g, k in self.groups.items() if k.dropped]

    def pending_streams(self) -> list[str]:
        return [n for g in self.pending for n in self.groups[g].streams]

    def second_from_cache(self) -> None:
        """The second pass of the cached groups, over their kept blocks (then freed)."""
        for g in self.cached:
            kept = self.groups[g]
            for feats, (y, decisions) in zip(kept.blocks, self._shared):
                for n in kept.streams:
                    x = feats[n]
                    self.streams[n].second(x, y, backends.for_tensor(x), decisions)
            kept.blocks = []
        self._shared = []

    def second(self, block: Block) -> None:
        """The second pass over a block read again, for the streams of the pending groups."""
        for n in self.pending_streams():
            x = block.features[n]
            self.streams[n].second(x, block.labels, backends.for_tensor(x), block.decisions)

    def end(self) -> None:
        for s in self.streams.values():
            s.end(self.comm)
