"""NeuralCollapse: a torchmetrics.Metric over ClassMoments (needs the torchmetrics package)."""

from __future__ import annotations

import functools

import torch
from torchmetrics import Metric

from .metrics import DEFAULT_RTOL, metrics_from_moments
from .stats import ClassMoments


def _merge_packed(template_state: dict, stacked: torch.Tensor) -> torch.Tensor:
    """Reduction of the packed states gathered from every process: ClassMoments' own fold (Chan's
    merge in process order, as ``ClassMoments.all_reduce``). A plain sum would need raw moments
    E[hh^T], which the numerics contract rules out."""
    template = ClassMoments.from_state_dict(template_state, device=stacked.device)
    return template._fold_packed(stacked)._pack()


class NeuralCollapse(Metric):
    """Neural-collapse metrics as a torchmetrics Metric, streamed over batches.

    ``update(features, labels)`` feeds a ClassMoments; ``compute()`` returns
    ``metrics_from_moments`` (every metric except the NCC ones, which need a second pass over
    the features: see ``ncfast.ncc_mismatch``). Across processes the state is gathered and
    merged with Chan's formula in rank order, so every process computes the one-shot result.

    The ClassMoments stays live between batches (each update merges into its own tensors); its
    packed float64 vector, the torchmetrics state ``packed``, is written only where torchmetrics
    reads it: before a sync, a compute, a merge_state or a move to another device.

    Args:
        num_classes, dim: as ClassMoments.
        weighting, rtol: as nc_metrics.
        class_counts: per-class counts of the data to come, for an exact balanced Sigma_W on
            imbalanced classes (see ClassMoments).
        weight: optional classifier weight (C, D) for nc3; superclass: map for msdr.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        weighting: str = "balanced",
        rtol: float = DEFAULT_RTOL,
        class_counts=None,
        scatter: bool = True,
        weight=None,
        superclass=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._template = ClassMoments(num_classes, dim, scatter=scatter, class_counts=class_counts)
        self.weighting = weighting
        self.rtol = rtol
        self.weight = weight
        self.superclass = superclass
        reduce = functools.partial(_merge_packed, self._template.state_dict())
        self.add_state("packed", default=self._template._pack(), dist_reduce_fx=reduce)
        self._live: ClassMoments | None = None  # None: ``packed`` is the state
        self._live_of: torch.Tensor | None = None  # the ``packed`` tensor the live state started from

    def _moments(self) -> ClassMoments:
        """The ClassMoments of ``packed`` (a new object)."""
        template = ClassMoments.from_state_dict(self._template.state_dict(), device=self.packed.device)
        return template._unpack(self.packed)

    def _flush(self) -> None:
        """Write the live state into ``packed`` (one pack), where it has taken batches since."""
        if self._live is not None and self._live_of is self.packed:
            self.packed = self._live._pack()
        self._live = self._live_of = None

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        # torchmetrics replaces ``packed`` (reset, sync, a device move): the live state is rebuilt from it
        if self._live is None or self._live_of is not self.packed:
            self._live, self._live_of = self._moments(), self.packed
        self._live.update(features, labels)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Same as update: a per-batch value is not computed, since one batch rarely holds enough
        samples per class for these metrics (and cannot match the stream's class_counts)."""
        self.update(features, labels)

    def sync(self, *args, **kwargs) -> None:
        self._flush()
        super().sync(*args, **kwargs)

    def merge_state(self, incoming_state) -> None:
        self._flush()
        if isinstance(incoming_state, NeuralCollapse):
            incoming_state._flush()
        super().merge_state(incoming_state)

    def reset(self) -> None:
        self._live = self._live_of = None
        super().reset()

    def _apply(self, fn, *args, **kwargs):
        self._flush()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        self._flush()
        return super().__getstate__()

    def compute(self):
        self._flush()
        m = self._moments()
        weight = None if self.weight is None else torch.as_tensor(self.weight).to(m.device)
        return metrics_from_moments(
            m, weight=weight, superclass=self.superclass, weighting=self.weighting, rtol=self.rtol
        )
