"""ClassMoments: exact, mergeable per-class sufficient statistics.

State (all float64, on the device of the features it was fed):

- ``count[c]``      n_c
- ``mean[c]``       mu_c
- ``m2[c]``         sum_{y_i=c} ||h_i - mu_c||^2           (so v_c = m2[c] / n_c)
- ``scatter``       sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T  (D x D, optional)
- ``wscatter``      sum_c (1/N_c) sum_{y_i=c} (h_i - mu_c)(h_i - mu_c)^T for the class
                    counts N_c announced in ``class_counts`` (optional; gives the balanced
                    Sigma_W exactly on imbalanced data)
- ``unit_sum[c]``   sum_{y_i=c} h_i / ||h_i||               (cosine separation; optional)
- ``norm_sum[c]``   sum_{y_i=c} ||h_i||                      (feature norm; kept with unit_sum)

Every block is centred on its own class means before it is combined (Chan et al.):
for two parts a, b of class c with delta = mu_b - mu_a and n = n_a + n_b,

    mu   = mu_a + delta * n_b / n
    M2   = M2_a + M2_b + (n_a n_b / n) delta delta^T

so raw moments E[hh^T] - mu mu^T are never formed, and the statistics stay exact when
the within-class spread is tiny next to the class means. Updates in any order, merges
of shards in any order and ``all_reduce`` across processes give the one-shot result to
float64 rounding.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import numpy as np
import torch

from . import backends
from ._validation import (
    NAN_POLICIES,
    NON_FINITE,
    WEIGHTINGS,
    as_tensor,
    check_choice,
    check_features,
    check_labels,
    check_magnitude,
    check_state_fits,
    magnitude_error,
    omit_non_finite,
)

_STATE_KEYS = ("count", "mean", "m2", "unit_sum", "norm_sum", "scatter", "wscatter")


@dataclass
class _Part:
    """The statistics of one block, in the same layout as ClassMoments' state."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    unit_sum: torch.Tensor
    norm_sum: torch.Tensor
    scatter: torch.Tensor | None
    wscatter: torch.Tensor | None


# Zero states of at least this many bytes are mapped afresh (see _zeros_on).
_MAPPED_ZEROS_BYTES = 1 << 20


def _cpu_zeros(*shape: int) -> torch.Tensor:
    """float64 zeros whose pages are not written until used: anonymous memory mapped afresh for large
    states (pages the kernel zeroes on first touch, given back on release). The empty state of a
    one-shot call is replaced by the first block's statistics without being read, so it should cost
    nothing; numpy's calloc does not guarantee that (once glibc's allocator has freed one such
    block it raises its mmap threshold and serves the next from the heap with a memset)."""
    count = math.prod(shape)
    if count * 8 < _MAPPED_ZEROS_BYTES:
        return torch.from_numpy(np.zeros(shape, dtype=np.float64))
    return torch.from_numpy(np.frombuffer(mmap.mmap(-1, count * 8), dtype=np.float64).reshape(shape))


def imbalanced(counts: torch.Tensor) -> bool:
    """Whether the present classes (count > 0) have different counts: then the balanced Sigma_W is
    not the pooled scatter over N, and an exact one needs every class's count (``class_counts``)."""
    present = counts[counts > 0]
    return present.numel() > 0 and bool((present != present[0]).any())


def _zeros_on(device: torch.device):
    """A float64 zeros factory for the state (on CPU: _cpu_zeros)."""
    if device.type == "cpu":
        return _cpu_zeros
    return lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)


class ClassMoments:
    """Streaming per-class moments of features, mergeable exactly.

    Args:
        num_classes: number of label values C; labels must lie in [0, C).
        dim: feature dimension D.
        scatter: keep the D x D within-class scatter (needed by nc1, fuzziness, vci, rank,
            effective_rank). Turn off when D is large: the other metrics need only O(C * D).
        unit_sums: keep the per-class sums of h_i / ||h_i|| and ||h_i|| (needed by
            cosine_separation and feature_norm). Turn off when only counts, means and variances
            are wanted (class_distance, CDNV): the C++ core then needs no row norms and reads
            each row in one pass, about a third less work.
        class_counts: the per-class sample counts the whole stream will deliver. When given,
            the balanced within-class covariance (1/C) sum_c Cov_c is accumulated exactly even
            on imbalanced data. Without it, the balanced Sigma_W is available when all present
            classes end up with equal counts (balanced data), and raises otherwise.
        device: where the float64 state lives (the features' device).

    Example::

        m = ncfast.ClassMoments(10, 512)
        for x, y in loader:
            m.update(model.features(x), y)
        metrics = ncfast.metrics_from_moments(m)
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        scatter: bool = True,
        unit_sums: bool = True,
        class_counts=None,
        device="cpu",
    ):
        self._configure(num_classes, dim, scatter, unit_sums, class_counts, device)
        z = _zeros_on(self.device)
        c, d = self.num_classes, self.dim
        self.count = torch.zeros(c, dtype=torch.int64, device=self.device)
        self.mean = z(c, d)
        self.m2 = z(c)
        self.unit_sum = z(c, d) if unit_sums else None
        self.norm_sum = z(c) if unit_sums else None
        self.scatter = z(d, d) if scatter else None
        self.wscatter = z(d, d) if self._keeps_wscatter else None

    def _configure(self, num_classes, dim, scatter: bool, unit_sums: bool, class_counts, device) -> None:
        """The settings, checked; no state (``__init__`` adds the empty state, ``_of_batch`` a batch's)."""
        if int(num_classes) < 1:
            raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
        if int(dim) < 1:
            raise ValueError(f"dim: must be >= 1, got {dim}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.device = torch.device(device)
        check_state_fits(self.num_classes, self.dim, self.device, 2 if unit_sums else 1)
        self.omitted_rows = 0
        self._keeps_scatter = bool(scatter)
        self._keeps_units = bool(unit_sums)
        self.class_counts: torch.Tensor | None = None
        if class_counts is not None:
            cc = as_tensor(class_counts, "class_counts").to(device=self.device, dtype=torch.int64).reshape(-1)
            if cc.numel() != self.num_classes:
                raise ValueError(f"class_counts: expected {self.num_classes} entries, got {cc.numel()}")
            if bool((cc < 0).any()):
                raise ValueError("class_counts: negative count")
            self.class_counts = cc

    @property
    def _keeps_wscatter(self) -> bool:
        """The balanced scatter is kept with the scatter when the class counts were announced."""
        return self._keeps_scatter and self.class_counts is not None

    @classmethod
    def _of_batch(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        backend: backends.Backend,
        *,
        scatter: bool,
        unit_sums: bool,
        balanced: bool,
        pooled: bool = True,
    ) -> ClassMoments:
        """The one-shot ClassMoments of checked (x, y) (labels may be left to the C++ kernel's check).

        The batch's statistics become the state itself: no empty state is made and merged into.
        With a scatter and
        ``balanced``, imbalanced counts, known once the moments are taken, become ``class_counts``
        so that the balanced Sigma_W is exact.

        ``pooled=False`` (for callers that read only the balanced Sigma_W, like nc_metrics): when
        the balanced scatter is kept, the pooled one is not computed (it was half of nc_metrics'
        time on the CPU on imbalanced labels). The state then has ``scatter`` None and
        ``wscatter`` set; sigma_w("sample") refuses it, and it is not meant to be merged.
        """
        m = cls.__new__(cls)
        m._configure(num_classes, x.shape[1], scatter, unit_sums, None, x.device)
        part = m._block_part(x, y, backend, check_finite=True)
        if scatter and balanced and imbalanced(part.count):
            m.class_counts = part.count.clone()
        m._add_scatter(part, x, y, backend, pooled=pooled)
        for k in _STATE_KEYS:
            setattr(m, k, getattr(part, k))
        return m

    # ------------------------------------------------------------------ update
    def update(self, features, labels, *, nan_policy: str = "raise") -> ClassMoments:
        """Add a batch. Atomic: on any error the state is left exactly as it was.

        nan_policy: "raise" (default) rejects features holding NaN or Inf; "omit" drops those
        rows and counts them in ``omitted_rows``.
        """
        check_choice(nan_policy, NAN_POLICIES, "nan_policy")
        x = check_features(features, allow_empty=True)
        if x.shape[1] != self.dim:
            raise ValueError(f"features: expected D = {self.dim}, got {x.shape[1]}")
        if x.device != self.device:
            raise ValueError(f"features: on device {x.device}, but this ClassMoments lives on {self.device}")
        backend = backends.for_tensor(x)
        # A kernel that checks every label before anything is written needs no torch pass over them.
        kernel_checks = nan_policy == "raise" and backend.checks_labels
        y, _ = check_labels(labels, x.shape[0], x.device, self.num_classes, values=not kernel_checks)
        omitted = 0
        if nan_policy == "omit":
            x, y, _, omitted = omit_non_finite(x, y)
        self._add(x, y, backend, finite_required=nan_policy == "raise")
        self.omitted_rows += omitted
        return self

    def _add(
        self, x: torch.Tensor, y: torch.Tensor, backend: backends.Backend, *, finite_required: bool = True
    ) -> None:
        """update() after its checks: x (N, D) float on this device, y int64 labels (in range, or
        left to a backend that checks them). The batch's moments, then its scatter centred on the
        batch's own final class means (the exact two-pass form), merged into the state by Chan."""
        part = self._block_part(x, y, backend, check_finite=finite_required)
        self._add_scatter(part, x, y, backend)
        if not self._merge_in_place(part, backend):
            self._merge_part(part)

    def _block_part(
        self, x: torch.Tensor, y: torch.Tensor, backend: backends.Backend, check_finite: bool = False
    ) -> _Part:
        """Counts, means, M2 (and unit sums) of (x, y); no scatter yet. With ``check_finite`` NaN
        or Inf in x raises ValueError."""
        try:
            b = backend.block_moments(x, y, self.num_classes, unit_sums=self._keeps_units, check_finite=check_finite)
        except ValueError as e:
            if str(e) == NON_FINITE and bool(torch.isfinite(x).all()):
                raise ValueError(magnitude_error(x)) from None  # finite rows whose squares overflowed
            raise
        check_magnitude(x, b.means, b.m2)
        on = lambda t: t if t is None or t.device == self.device else t.to(self.device)
        return _Part(on(b.counts), on(b.means), on(b.m2), on(b.unit_sums), on(b.norm_sums), None, None)

    def _add_scatter(
        self, acc: _Part, x: torch.Tensor, y: torch.Tensor, backend: backends.Backend, pooled: bool = True
    ) -> None:
        """acc.scatter (and acc.wscatter) of (x, y), if kept: a second pass centred on acc's final class
        means (the exact two-pass form), so blocks need no C x D x D merge correction among themselves.
        ``pooled=False`` skips acc.scatter when acc.wscatter is kept (see _of_batch)."""
        if not self._keeps_scatter:
            return
        pooled = pooled or not self._keeps_wscatter
        scales: list[torch.Tensor | None] = [None] if pooled else []
        if self._keeps_wscatter:  # rows scaled by sqrt(1 / N_c): the balanced scatter
            assert self.class_counts is not None  # _keeps_wscatter says so
            scales.append((1.0 / self.class_counts.clamp_min(1).to(torch.float64)).sqrt())
        out = backend.centred_scatters(x, y, acc.mean, scales)
        acc.scatter = out[0] if pooled else None
        acc.wscatter = out[-1] if self._keeps_wscatter else None

    def _combine(self, a: _Part, b: _Part) -> _Part:
        """Chan's combination of two parts (a new _Part, or one of the inputs if the other is
        empty); the scatters merge as S_a + S_b + sum_c w_c delta_c delta_c^T."""
        if not bool(b.count.any()):
            return a
        if not bool(a.count.any()) and (a.scatter is None) == (b.scatter is None):
            return b
        moments, delta, weight = backends.BlockMoments(a.count, a.mean, a.m2, a.unit_sum, a.norm_sum).combine(
            backends.BlockMoments(b.count, b.mean, b.m2, b.unit_sum, b.norm_sum)
        )
        scatter = wscatter = None
        if a.scatter is not None and b.scatter is not None:
            corr, wcorr = self._scatter_corrections(delta, weight, a.wscatter is not None)
            scatter = a.scatter + b.scatter + corr
            if a.wscatter is not None:
                assert b.wscatter is not None  # both parts keep the same states
                wscatter = a.wscatter + b.wscatter + wcorr
        return _Part(moments.counts, moments.means, moments.m2, moments.unit_sums, moments.norm_sums, scatter, wscatter)

    def _merge_in_place(self, part: _Part, backend: backends.Backend) -> bool:
        """``_merge_part`` written into this state's own tensors by the backend (no C x D temporaries
        per block); False, with nothing changed, where it cannot (then ``_merge_part``). An empty
        part changes nothing; an empty state adopts the part's tensors (``_combine``)."""
        if not bool(part.count.any()):
            return True
        if (
            not bool(self.count.any())
            or (self.scatter is None) != (part.scatter is None)
            or (self.wscatter is None) != (part.wscatter is None)
        ):
            return False
        delta = torch.empty_like(self.mean) if self.scatter is not None else None
        weight = backend.merge_into(
            backends.BlockMoments(self.count, self.mean, self.m2, self.unit_sum, self.norm_sum),
            backends.BlockMoments(part.count, part.mean, part.m2, part.unit_sum, part.norm_sum),
            delta,
        )
        if weight is None:
            return False
        if delta is not None:
            corr, wcorr = self._scatter_corrections(delta, weight, self.wscatter is not None)
            # delta is made only where the scatter is kept, by both (checked above)
            assert self.scatter is not None and part.scatter is not None
            self.scatter.add_(part.scatter).add_(corr)  # (S_a + S_b) + correction, as _combine adds them
            if self.wscatter is not None:
                self.wscatter.add_(part.wscatter).add_(wcorr)
        return True

    def _scatter_corrections(self, delta: torch.Tensor, weight: torch.Tensor, balanced: bool):
        """Chan's D x D term of a merge, sum_c w_c delta_c delta_c^T, and with ``balanced`` its
        balanced twin with w_c / N_c (None without)."""
        idx = weight.nonzero().squeeze(1)
        dsel = delta[idx]
        corr = dsel.T @ (dsel * weight[idx].unsqueeze(1))
        if not balanced:
            return corr, None
        assert self.class_counts is not None  # the balanced scatter is kept only with class_counts
        w = 1.0 / self.class_counts.clamp_min(1).to(torch.float64)
        return corr, dsel.T @ (dsel * (weight * w)[idx].unsqueeze(1))

    def _as_part(self) -> _Part:
        return _Part(*(getattr(self, k) for k in _STATE_KEYS))

    def _merge_part(self, part: _Part) -> None:
        merged = self._combine(self._as_part(), part)
        for k in _STATE_KEYS:
            setattr(self, k, getattr(merged, k))

    def _scatter_pass(self, weighting: str, pooled: bool = True) -> _ScatterPass:
        """The second pass of the exact two-pass form for a state built without the scatter: a
        ``_ScatterPass`` that sums, over blocks of the same rows again, the D x D scatter about
        this state's (final) class means, and attaches it (``_ScatterPass.attach``)."""
        return _ScatterPass(self, weighting, pooled)

    # ------------------------------------------------------------- merge / sync
    def _check_compatible(self, other: ClassMoments) -> None:
        if not isinstance(other, ClassMoments):
            raise TypeError(f"other: expected a ClassMoments, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(
                f"other: shape (num_classes={other.num_classes}, dim={other.dim}) differs from "
                f"(num_classes={self.num_classes}, dim={self.dim})"
            )
        if (
            (other.scatter is None) != (self.scatter is None)
            or (other.wscatter is None) != (self.wscatter is None)
            or (other.unit_sum is None) != (self.unit_sum is None)
        ):
            raise ValueError("other: keeps a different set of statistics (scatter / unit_sums / class_counts)")
        if self.class_counts is not None and (
            other.class_counts is None or not torch.equal(self.class_counts, other.class_counts.to(self.device))
        ):
            raise ValueError("other: was built with different class_counts")
        if other.device != self.device:
            raise ValueError(f"other: on device {other.device}, but this ClassMoments lives on {self.device}")

    def merge(self, other: ClassMoments) -> ClassMoments:
        """Fold another ClassMoments (e.g. another shard) into this one, exactly."""
        self._check_compatible(other)
        self._merge_part(other.clone()._as_part())  # never share tensors with `other`
        self.omitted_rows += other.omitted_rows
        return self

    def all_reduce(self, group=None) -> ClassMoments:
        """Combine the statistics of every process in ``group`` (torch.distributed); all end equal.

        Each process's state travels packed in one float64 vector (``all_gather``, so any backend
        works: gloo, nccl, mpi), and every process folds them with ``merge`` in rank order, the
        exact pairwise form of Chan's formula with no raw second moments. The same fold merges
        the torchmetrics state (``ncfast.NeuralCollapse``). Memory: one packed state per process.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce: torch.distributed is not initialised")
        packed = self._pack()
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed, group=group)
        merged = self._fold_packed(torch.stack(gathered))
        for k in _STATE_KEYS:
            setattr(self, k, getattr(merged, k))
        self.omitted_rows = merged.omitted_rows
        return self

    # ----------------------------------------------------------------- packing
    def _pack(self) -> torch.Tensor:
        """The state as one float64 vector (counts and omitted_rows as exact float64 integers)."""
        parts = [getattr(self, k).reshape(-1).to(torch.float64) for k in _STATE_KEYS if getattr(self, k) is not None]
        parts.append(torch.tensor([float(self.omitted_rows)], dtype=torch.float64, device=self.device))
        return torch.cat(parts)

    def _unpack(self, flat: torch.Tensor) -> ClassMoments:
        """A ClassMoments with this one's settings and the state packed in ``flat`` (``_pack``)."""
        m = self.clone()
        off = 0
        for k in _STATE_KEYS:
            cur = getattr(self, k)
            if cur is None:
                continue
            piece = flat[off : off + cur.numel()].reshape(cur.shape)
            setattr(m, k, piece.round().to(torch.int64) if k == "count" else piece.clone())
            off += cur.numel()
        m.omitted_rows = int(flat[off].round())
        return m

    def _fold_packed(self, stacked: torch.Tensor) -> ClassMoments:
        """The merge of the packed states of ``stacked`` (one per row), in row order."""
        acc = self._unpack(stacked[0])
        for row in stacked[1:]:
            acc.merge(self._unpack(row))
        return acc

    def state_dict(self) -> dict:
        """Tensors and settings; ``ClassMoments.from_state_dict`` or ``load_state_dict`` restores them."""
        sd = {k: getattr(self, k) for k in _STATE_KEYS if getattr(self, k) is not None}
        sd.update(
            num_classes=self.num_classes, dim=self.dim, omitted_rows=self.omitted_rows, class_counts=self.class_counts
        )
        return sd

    def load_state_dict(self, state: dict) -> ClassMoments:
        """Restore a ``state_dict``. Every entry is checked (keys, types, shapes, counts >= 0, sums of
        squares and norms not negative) before anything changes: a state that fails leaves this
        ClassMoments as it was."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict (ClassMoments.state_dict()), got {type(state).__name__}")
        missing = [k for k in ("num_classes", "dim", "omitted_rows", "count", "mean", "m2") if k not in state]
        if missing:
            raise ValueError(f"state: missing {missing}")
        if (state["num_classes"], state["dim"]) != (self.num_classes, self.dim):
            raise ValueError("state: num_classes / dim differ from this ClassMoments")
        if (
            ("scatter" in state) != (self.scatter is not None)
            or ("wscatter" in state) != (self.wscatter is not None)
            or ("unit_sum" in state) != (self.unit_sum is not None)
        ):
            raise ValueError("state: holds a different set of statistics (scatter / unit_sums / class_counts)")
        c, d = self.num_classes, self.dim
        shapes = {
            "count": (c,),
            "mean": (c, d),
            "m2": (c,),
            "unit_sum": (c, d),
            "norm_sum": (c,),
            "scatter": (d, d),
            "wscatter": (d, d),
            "class_counts": (c,),
        }
        loaded = {}
        for k, shape in shapes.items():
            t = state.get(k)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state[{k!r}]: expected a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"state[{k!r}]: expected shape {shape}, got {tuple(t.shape)}")
            integer = k in ("count", "class_counts")
            if integer == t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(
                    f"state[{k!r}]: expected {'an integer' if integer else 'a floating'} dtype, got {t.dtype}"
                )
            t = t.to(device=self.device, dtype=torch.int64 if integer else torch.float64).clone()
            if k in ("count", "class_counts", "m2", "norm_sum") and bool((t < 0).any()):
                raise ValueError(f"state[{k!r}]: negative entries")
            loaded[k] = t
        omitted = state["omitted_rows"]
        try:
            whole = not isinstance(omitted, bool) and int(omitted) == omitted and int(omitted) >= 0
        except (TypeError, ValueError, RuntimeError):
            whole = False
        if not whole:
            raise ValueError(f"state['omitted_rows']: expected an integer >= 0, got {omitted!r}")
        for k in _STATE_KEYS:
            if k in loaded:
                setattr(self, k, loaded[k])
        self.omitted_rows = int(omitted)
        self.class_counts = loaded.get("class_counts")
        return self

    @classmethod
    def from_state_dict(cls, state: dict, device="cpu") -> ClassMoments:
        m = cls(
            state["num_classes"],
            state["dim"],
            scatter="scatter" in state,
            unit_sums="unit_sum" in state,
            class_counts=state.get("class_counts"),
            device=device,
        )
        return m.load_state_dict(state)

    def clone(self) -> ClassMoments:
        return ClassMoments.from_state_dict(self.state_dict(), device=self.device)

    # ---------------------------------------------------------------- read-outs
    @property
    def counts(self) -> torch.Tensor:
        """n_c, int64 (C,)."""
        return self.count

    @property
    def present(self) -> torch.Tensor:
        """Boolean mask of classes with n_c > 0."""
        return self.count > 0

    @property
    def absent_classes(self) -> list[int]:
        return (self.count == 0).nonzero().squeeze(1).tolist()

    @property
    def num_samples(self) -> int:
        return int(self.count.sum())

    @property
    def means(self) -> torch.Tensor:
        """mu_c (C, D) float64; NaN rows for absent classes."""
        return torch.where(self.present.unsqueeze(1), self.mean, torch.full_like(self.mean, float("nan")))

    @property
    def variances(self) -> torch.Tensor:
        """v_c = (1/n_c) sum_{y_i=c} ||h_i - mu_c||^2, the trace of the class covariance; NaN if absent."""
        return torch.where(self.present, self.m2 / self.count.clamp_min(1), torch.full_like(self.m2, float("nan")))

    @property
    def unit_sums(self) -> torch.Tensor:
        """S_c = sum_{y_i=c} h_i / ||h_i|| (C, D); zero vectors contribute nothing."""
        if self.unit_sum is None:
            raise ValueError("ClassMoments was built with unit_sums=False: the unit-vector sums are not kept")
        return self.unit_sum

    def class_weights(self, weighting: str = "balanced") -> torch.Tensor:
        """Weight of each present class in mu_G and Sigma_B: 1/C (balanced) or n_c/N (sample)."""
        check_choice(weighting, WEIGHTINGS, "weighting")
        n = self.count[self.present].to(torch.float64)
        if weighting == "balanced":
            return torch.full_like(n, 1.0 / n.numel())
        return n / n.sum()

    def _require_samples(self) -> None:
        if self.num_samples == 0:
            raise ValueError("ClassMoments: no samples have been added")

    def _require_in_range(self) -> None:
        """ValueError where merging in-range batches overflowed float64 (features near 2^500: each
        batch fits, their sum of squares does not); update() refuses single batches out of range."""
        kept = [t for t in (self.mean, self.m2, self.scatter, self.wscatter) if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in kept):
            raise ValueError(
                "features: too large in magnitude for the float64 class statistics: their sums of "
                "squares overflowed (every |x| must stay below about 2^500, 3e150). Scale the features "
                "down by a power of two: the metrics are scale-free but feature_norm and the "
                "per-class variances and distances"
            )

    def global_mean(self, weighting: str = "balanced") -> torch.Tensor:
        """mu_G: mean of class means (balanced) or of all samples (sample)."""
        self._require_samples()
        return self.class_weights(weighting) @ self._present_means()

    def centred_means(self, weighting: str = "balanced") -> torch.Tensor:
        """Mt: rows mu_c - mu_G for the present classes, (C_present, D)."""
        return self._present_means() - self.global_mean(weighting)

    def _present_means(self) -> torch.Tensor:
        """mu_c of the present classes: the state itself when every class is present (a masked copy
        of C x D float64 costs as much as the pairwise pass's per-tile work at C = 20,000)."""
        p = self.present
        return self.mean if bool(p.all()) else self.mean[p]

    def between_factor(self, weighting: str = "balanced") -> torch.Tensor:
        """A with Sigma_B = A^T A: rows sqrt(w_c) (mu_c - mu_G) over present classes."""
        return self.class_weights(weighting).sqrt().unsqueeze(1) * self.centred_means(weighting)

    def within_trace(self, weighting: str = "balanced") -> float:
        """Tr(Sigma_W) from the per-class traces alone (no D x D matrix needed)."""
        self._require_samples()
        p = self.present
        if weighting == "balanced":
            return float((self.m2[p] / self.count[p]).mean())
        check_choice(weighting, WEIGHTINGS, "weighting")
        return float(self.m2[p].sum() / self.num_samples)

    @property
    def has_scatter(self) -> bool:
        """Whether a D x D Sigma_W is kept (pooled, balanced or both)."""
        return self.scatter is not None or self.wscatter is not None

    def sigma_w(self, weighting: str = "balanced") -> torch.Tensor:
        """Sigma_W (D x D): (1/C) sum_c Cov_c (balanced) or (1/N) sum_i (h_i-mu_yi)(h_i-mu_yi)^T (sample)."""
        check_choice(weighting, WEIGHTINGS, "weighting")
        self._require_samples()
        if not self.has_scatter:
            raise ValueError("ClassMoments was built with scatter=False: Sigma_W is not kept")
        if weighting == "sample":
            if self.scatter is None:
                raise ValueError("weighting: this ClassMoments keeps only the balanced Sigma_W (pooled=False)")
            return self.scatter / self.num_samples
        present_counts = self.count[self.present]
        if self.wscatter is not None:
            assert self.class_counts is not None  # the balanced scatter is kept only with class_counts
            if not torch.equal(self.class_counts, self.count):
                raise ValueError(
                    "class_counts: the counts seen differ from the class_counts announced, so the "
                    "balanced Sigma_W cannot be exact; pass the true counts or weighting='sample'"
                )
            return self.wscatter / present_counts.numel()
        if imbalanced(present_counts):
            raise ValueError(
                "weighting: 'balanced' Sigma_W on imbalanced classes needs class_counts at "
                "construction (one-shot functions pass it); or use weighting='sample'"
            )
        assert self.scatter is not None  # has_scatter and no wscatter: the pooled scatter is kept
        return self.scatter / self.num_samples

    def sigma_b(self, weighting: str = "balanced") -> torch.Tensor:
        """Sigma_B = sum_c w_c (mu_c - mu_G)(mu_c - mu_G)^T (D x D)."""
        a = self.between_factor(weighting)
        return a.T @ a

    def sigma_t(self, weighting: str = "balanced") -> torch.Tensor:
        """Sigma_T = Sigma_W + Sigma_B (exactly the total covariance under sample weighting)."""
        return self.sigma_w(weighting) + self.sigma_b(weighting)

    def __repr__(self) -> str:
        return (
            f"ClassMoments(num_classes={self.num_classes}, dim={self.dim}, samples={self.num_samples}, "
            f"scatter={self.scatter is not None}, unit_sums={self.unit_sum is not None}, device={self.device})"
        )


class _ScatterPass:
    """sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T over a second pass of the rows a ClassMoments has
    seen, about its final means mu_c: the exact two-pass form, with no merge correction between
    blocks (every block is centred on the same means), so that under torch.distributed the
    processes' sums simply add.

    Kept as ``ClassMoments.scatter`` (pooled) and, under balanced weighting on imbalanced counts,
    ``wscatter`` (rows scaled by 1/sqrt(n_c): the exact balanced Sigma_W, the final counts
    becoming ``class_counts``). ``pooled=False`` keeps only the balanced one where it is kept (as
    nc_metrics, which reads only ``weighting``'s Sigma_W).
    """

    def __init__(self, moments: ClassMoments, weighting: str, pooled: bool):
        check_choice(weighting, WEIGHTINGS, "weighting")
        self.moments = moments
        counts = moments.count
        self.balanced = weighting == "balanced" and imbalanced(counts)
        self.pooled = pooled or not self.balanced
        self.scales: list[torch.Tensor | None] = [None] if self.pooled else []
        if self.balanced:
            self.scales.append((1.0 / counts.clamp_min(1).to(torch.float64)).sqrt())
        self.means = moments.mean
        self.sums: list[torch.Tensor | None] = [None] * len(self.scales)

    def add(self, x: torch.Tensor, y: torch.Tensor, backend: backends.Backend) -> None:
        """Add the scatter of a block (x, y) of checked rows (on the moments' device)."""
        if x.shape[0] == 0:
            return
        parts = backend.centred_scatters(x, y, self.means, self.scales)
        self.sums = [p if acc is None else acc.add_(p) for acc, p in zip(self.sums, parts)]

    def attach(self, reduce=None) -> ClassMoments:
        """Set the sums as the moments' scatter (after ``reduce``, e.g. a sum over processes)."""
        m = self.moments
        d = m.dim
        sums = [torch.zeros(d, d, dtype=torch.float64, device=m.device) if t is None else t for t in self.sums]
        if reduce is not None:
            sums = [reduce(t) for t in sums]
        m._keeps_scatter = True
        m.scatter = sums[0] if self.pooled else None
        if self.balanced:
            m.class_counts = m.count.clone()
            m.wscatter = sums[-1]
        else:
            m.wscatter = None
        return m
