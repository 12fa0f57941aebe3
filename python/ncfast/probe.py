"""Per-layer Neural-Collapse metrics of a network, collected with forward hooks.

``LayerProbe`` watches some of a model's modules. One pass over a data loader feeds one streaming
``ClassMoments`` per watched layer (features are never stored); a second pass, now that the class
means are final, scores every sample's nearest class centre at every layer against its label and
against the network's own decision (NCC accuracy and NCC mismatch, paper 003 def. 5). Then
``metrics_from_moments`` gives the rest of the metrics of docs/metrics.md for each layer::

    probe = ncfast.LayerProbe(model, ["layer3", "layer4", "pool"], num_classes=10)
    train = probe.measure(train_loader)      # ProbeResult: a LayerResult per layer
    test = probe.measure(test_loader, class_means=train.class_means)
    print(test["layer4"].metrics["nc1"], test["layer4"].metrics["ncc_mismatch"], test.accuracy)

On a held-out split the nearest class centre must be taken among the TRAIN class means of the same
layer (paper 003 def. 6; Papyan et al.'s NC4 on test data), never the held-out split's own: pass a
train measure's ``class_means`` (``ProbeResult.class_means``) back, as above. Every other metric of the held-out split describes
its own features.

A layer's output is flattened per sample. When its flattened size exceeds ``max_dim`` (a D x D
scatter would be too large: 64 x 32 x 32 = 65,536 features make a 34 GB matrix), the D x D
metrics (``SCATTER_METRICS``: nc1, fuzziness, vci, rank, effective_rank) are computed on the
channel-pooled features (the mean over spatial positions, one value per channel) and the layer's
result says so in ``LayerResult.dxd_features == "channel_pooled"``; every other metric, NCC
included, uses the full flattened features. ``NCMetrics.degenerate`` is judged on the features the
D x D metrics were computed on (the channel-pooled ones for such a layer).

With original labels beside the training labels (coarse / fine experiments, paper 000), each
layer also keeps the moments of the original classes: ``LayerResult.class_distance`` is their
class-distance matrix and the metric ``msdr`` their mean super-class distance ratio, the super-class
of an original class being its training label (left out when an original class appears under two
training labels, as with fine labels).

Under torch.distributed (``torchrun``), each process measures its own shard of the data and
``LayerProbe`` combines them: the label counts and the NCC counts are summed, every layer's
``ClassMoments`` is merged exactly (``ClassMoments.all_reduce``, Chan's formula in rank order), so
every process gets the metrics of one process over all the shards, to float64 rounding. The shards
must be disjoint and cover the data once: shard a measurement loader with ``shard_indices`` (or any
split without padding), not with ``DistributedSampler``, whose padding repeats samples to even out
the shards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import backends
from ._validation import WEIGHTINGS, check_choice
from .metrics import (
    SCATTER_METRICS,
    NCMetrics,
    class_distance_from_moments,
    class_fractions,
    metrics_from_moments,
    msdr_from_moments,
)
from .ncc import _ncc_assign
from ._distributed import Ranks
from .stats import ClassMoments

DEFAULT_MAX_DIM = 4096
"""Largest flattened layer size whose D x D metrics are computed on the full features."""


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """The indices of ``n`` samples that process ``rank`` of ``world_size`` measures: rank, rank +
    world_size, ... Every sample lands in exactly one shard (no padding, unlike
    ``DistributedSampler``); a shard may be one sample shorter than another, or empty when n <
    world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, {world_size}) (world_size {world_size}), got {rank}")
    return range(rank, int(n), world_size)


@dataclass
class LayerResult:
    """One probed layer's measure."""

    metrics: NCMetrics  # every metric of the layer (docs/metrics.md)
    class_means: torch.Tensor  # (C, D) float64 over the loader's training labels; NaN rows for absent classes
    dim: int  # flattened feature size D
    dxd_dim: int  # size of the features the D x D metrics were computed on
    dxd_features: str  # "full", or "channel_pooled" when D > max_dim
    moments: ClassMoments  # the layer's full features over the training labels
    class_distance: torch.Tensor | None  # (C_orig, C_orig) over the original labels, or None

    @property
    def train_class_distance(self) -> torch.Tensor:
        """(C, C) class-distance matrix over the training labels, formed on request (a C x C
        matrix, which the metrics themselves never hold)."""
        return class_distance_from_moments(self.moments)


@dataclass
class ProbeResult:
    """What ``LayerProbe.measure`` returns: a LayerResult per layer (``result[name]``), and the
    network's own accuracy on the samples measured."""

    layers: dict[str, LayerResult]
    accuracy: float  # fraction of samples whose decision (logits argmax) is their label

    def __getitem__(self, name: str) -> LayerResult:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def items(self):
        return self.layers.items()

    @property
    def class_means(self) -> dict[str, torch.Tensor]:
        """{layer: (C, D) class means}: the ``class_means`` to score a held-out split against."""
        return {name: r.class_means for name, r in self.layers.items()}


@dataclass
class _LayerState:
    """The running statistics of one layer during the first pass."""

    full: ClassMoments  # the flattened features, training labels
    pooled: ClassMoments | None  # channel-pooled features when D > max_dim
    orig: ClassMoments | None  # the flattened features, original labels
    superclass: torch.Tensor | None  # training label of each original class (-1: not seen)
    hits: torch.Tensor  # (2, C) int64: samples whose nearest centre is their label / differs from the decision
    split: bool = False  # an original class seen under two training labels (no super-class)


def flatten(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().reshape(out.shape[0], -1)


def channel_pool(out) -> torch.Tensor:
    """Channel-pooled features (N, channels) of a layer's output (N, channels, ...): the mean over
    every axis after the channel axis; a 2-D output as it is."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = out.detach()
    return out.reshape(out.shape[0], out.shape[1], -1).mean(dim=2) if out.dim() > 2 else out


class LayerProbe:
    """Neural-Collapse metrics of several layers of ``model`` from two passes over a loader.

    Args:
        model: the network; its forward output must be the logits (N, C_train).
        layers: names of modules of ``model`` (as in ``model.named_modules()``) whose outputs to probe.
        num_classes: number of training classes.
        head: the final linear layer (``W``, ``b``), to add nc3 at ``penultimate`` (its input layer).
        penultimate: name (in ``layers``) of the layer that feeds ``head``.
        num_original_classes: number of original classes when the loader also yields original labels.
        weighting, rtol: as in ``nc_metrics``.
        logit_scale: the factor T by which the loss sees the network's logits (paper 002's
            temperature): ``logits_norm`` is mean_i ||T z_i||, the norm of the logits the loss
            sees, and ``logits_norm_raw`` mean_i ||z_i|| of the network's output.
        max_dim: layers with more flattened features get their D x D metrics from channel-pooled
            features (see the module docstring).
        class_counts: training-label counts of the data the loader yields (under torch.distributed:
            of all processes' shards together); needed for the exact balanced Sigma_W on imbalanced
            classes. When None, ``measure`` counts the labels first (one pass over the loader
            without the model).
        process_group: under torch.distributed, the group whose processes' shards make up the
            data (None: the default group when torch.distributed is initialised); every process of
            the group must call ``measure`` with the same arguments, and gets the same result.
            ``False``: measure this process's loader alone.
    """

    def __init__(self, model: nn.Module, layers, num_classes: int, *, head: nn.Linear | None = None,
                 penultimate: str | None = None, num_original_classes: int | None = None,
                 weighting: str = "balanced", rtol: float | None = None, max_dim: int = DEFAULT_MAX_DIM,
                 class_counts=None, logit_scale: float = 1.0, process_group=None):
        check_choice(weighting, WEIGHTINGS, "weighting")
        modules = dict(model.named_modules())
        layers = list(layers)
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"layers: {missing} are not modules of the model")
        if not layers:
            raise ValueError("layers: give at least one module name")
        if penultimate is not None and penultimate not in layers:
            raise ValueError(f"penultimate: {penultimate!r} is not one of the probed layers")
        if (head is None) != (penultimate is None):
            raise ValueError("head and penultimate: give both or neither")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes: must be >= 2, got {num_classes}")
        if max_dim < 1:
            raise ValueError(f"max_dim: must be >= 1, got {max_dim}")
        if not (math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"logit_scale: must be a finite number > 0, got {logit_scale}")
        self.model = model
        self.layers = layers
        self.modules = {name: modules[name] for name in layers}
        self.num_classes = int(num_classes)
        self.head = head
        self.penultimate = penultimate
        self.num_original_classes = num_original_classes
        self.weighting = weighting
        self.rtol = rtol
        self.max_dim = int(max_dim)
        self.class_counts = None if class_counts is None else torch.as_tensor(class_counts, dtype=torch.int64)
        self.logit_scale = float(logit_scale)
        self.process_group = process_group

    # ------------------------------------------------------------------ passes
    def _forward_all(self, loader, on_batch):
        """Run the model on every batch with hooks that hand each layer's output to on_batch."""
        captured: dict[str, torch.Tensor] = {}
        handles = [module.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
                   for name, module in self.modules.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in loader:
                    x, y = batch[0], batch[1]
                    y_orig = batch[2] if len(batch) > 2 else None
                    captured.clear()
                    logits = self.model(x)
                    on_batch(captured, logits, y.to(logits.device),
                             None if y_orig is None else y_orig.to(logits.device))
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)

    def measure(self, loader, class_means=None) -> ProbeResult:
        """Per-layer metrics of the samples ``loader`` yields as (inputs, labels) or (inputs, labels,
        original_labels), on the model's device. ``loader`` must yield the same samples on each
        iteration (no shuffling or augmentation).

        ``class_means``: ``{layer: (num_classes, D) tensor}`` to score the nearest class centre
        (ncc_accuracy, ncc_mismatch and their per-class vectors) against, for a held-out loader:
        the ``class_means`` of a measure of the train loader (paper 003 def. 6). Rows holding
        NaN (classes absent from the train data) are no candidates. Default: this loader's own
        means.
        """
        if class_means is not None:
            missing = [name for name in self.layers if name not in class_means]
            if missing:
                raise ValueError(f"class_means: no means for layers {missing}")
        comm = Ranks(self.process_group)
        counts = self._label_counts(loader, comm)
        states, logits_norm_raw = self._moments_pass(loader, counts, class_means, comm)
        means = {name: states[name].full.means for name in self.layers}
        centres = means if class_means is None else {
            name: class_means[name].to(device=means[name].device, dtype=torch.float64) for name in self.layers}
        accuracy = self._ncc_pass(loader, states, centres, comm)
        layers = {name: self._layer_result(states[name], means[name], logits_norm_raw, name)
                  for name in self.layers}
        return ProbeResult(layers=layers, accuracy=accuracy)

    def _label_counts(self, loader, comm: Ranks) -> torch.Tensor:
        """Training-label counts: the given ``class_counts``, else one pass over the loader's labels
        (summed over the processes)."""
        if self.class_counts is not None:
            return self.class_counts
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        for batch in loader:
            counts += torch.bincount(batch[1].reshape(-1).cpu(), minlength=self.num_classes)[: self.num_classes]
        return comm.reduce(counts)

    def _new_state(self, out, flat: torch.Tensor, counts: torch.Tensor, has_orig: bool) -> _LayerState:
        dev, d = flat.device, flat.shape[1]
        present = counts[counts > 0]
        balanced_exact = self.weighting == "balanced" and bool((present != present[0]).any())
        cc = counts.to(dev) if balanced_exact else None
        big = d > self.max_dim
        orig = has_orig and self.num_original_classes is not None
        return _LayerState(
            full=ClassMoments(self.num_classes, d, scatter=not big, device=dev, class_counts=None if big else cc),
            pooled=ClassMoments(self.num_classes, channel_pool(out).shape[1], scatter=True, device=dev, class_counts=cc)
            if big else None,
            orig=ClassMoments(self.num_original_classes, d, scatter=False, unit_sums=False, device=dev)
            if orig else None,
            superclass=torch.full((self.num_original_classes,), -1, dtype=torch.int64, device=dev) if orig else None,
            hits=torch.zeros(2, self.num_classes, dtype=torch.int64),
        )

    def _moments_pass(self, loader, counts: torch.Tensor, class_means,
                      comm: Ranks) -> tuple[dict[str, _LayerState], float]:
        """The first pass: every layer's ClassMoments (and the original labels' and super-classes),
        and mean_i ||z_i|| of the network's logits; merged over the processes."""
        states: dict[str, _LayerState] = {}
        norm = [0.0, 0]

        def on_batch(captured, logits, y, y_orig):
            for name in self.layers:
                out = captured[name]
                flat = flatten(out)
                s = states.get(name)
                if s is None:
                    if class_means is not None:
                        self._check_means(name, class_means[name], flat.shape[1])
                    s = states[name] = self._new_state(out, flat, counts, y_orig is not None)
                s.full.update(flat, y)
                if s.pooled is not None:
                    s.pooled.update(channel_pool(out), y)
                if s.orig is not None:
                    s.orig.update(flat, y_orig)
                    # an original class seen under two training labels (fine labels) has no super-class
                    seen = s.superclass[y_orig]
                    s.superclass[y_orig] = y
                    if bool((((seen >= 0) & (seen != y)) | (s.superclass[y_orig] != y)).any()):
                        s.split = True
            norm[0] += float(logits.detach().to(torch.float64).norm(dim=1).sum())
            norm[1] += logits.shape[0]

        self._forward_all(loader, on_batch)
        empty = comm.scalars(float(not states))[0] if comm.active else float(not states)
        if empty:
            raise ValueError("loader: yielded no batch" + (f" on {int(empty)} process(es)" if comm.active else ""))
        if comm.active:
            self._merge_states(states, comm)
            norm = comm.scalars(*norm)
        return states, norm[0] / max(1, norm[1])

    def _merge_states(self, states: dict[str, _LayerState], comm: Ranks) -> None:
        """Every process's layer statistics merged (exact), in the order of ``self.layers`` on each."""
        for name in self.layers:
            s = states[name]
            for m in (s.full, s.pooled, s.orig):
                if m is not None:
                    m.all_reduce(comm.group)
            if s.superclass is not None:
                # a class seen under two training labels on any process, or under different ones on
                # two processes, has no super-class
                # high / low: the largest / smallest training label any process saw (-1 / C: none)
                high = comm.reduce(s.superclass, "max")
                unseen = torch.full_like(s.superclass, -self.num_classes)
                low = -comm.reduce(torch.where(s.superclass >= 0, -s.superclass, unseen), "max")
                clash = bool(((high >= 0) & (low != high)).any())
                s.split = bool(comm.reduce(torch.tensor([int(s.split or clash)]), "max").item())
                s.superclass = high

    def _check_means(self, name: str, mu, dim: int) -> None:
        if not isinstance(mu, torch.Tensor) or mu.shape != (self.num_classes, dim):
            raise ValueError(f"class_means[{name!r}]: expected a tensor of shape ({self.num_classes}, {dim}), got "
                             f"{tuple(getattr(mu, 'shape', ()))}")

    def _ncc_pass(self, loader, states: dict[str, _LayerState], centres: dict[str, torch.Tensor],
                  comm: Ranks) -> float:
        """The second pass, now that the class means are final: per layer and class, the samples whose
        nearest centre is their label and those where it differs from the network's decision
        (summed over the processes). Returns the network's accuracy."""
        correct = [0, 0]

        def on_batch(captured, logits, y, y_orig):
            decisions = logits.argmax(dim=1)
            correct[0] += int((decisions == y).sum())
            correct[1] += y.shape[0]
            for name in self.layers:
                flat = flatten(captured[name])
                nearest = _ncc_assign(flat, centres[name], "exact", backends.for_tensor(flat))
                hits = states[name].hits
                hits[0] += torch.bincount(y[nearest == y], minlength=self.num_classes).cpu()
                hits[1] += torch.bincount(y[nearest != decisions], minlength=self.num_classes).cpu()

        self._forward_all(loader, on_batch)
        if comm.active:
            for name in self.layers:
                states[name].hits = comm.reduce(states[name].hits)
            correct = comm.scalars(*correct)
        return correct[0] / max(1, correct[1])

    def _layer_result(self, s: _LayerState, means: torch.Tensor, logits_norm_raw: float, name: str) -> LayerResult:
        """The metrics of one layer from its statistics (D x D ones from the pooled features when kept)."""
        kw = dict(weighting=self.weighting)
        if self.rtol is not None:
            kw["rtol"] = self.rtol
        weight = self.head.weight.detach() if (self.head is not None and name == self.penultimate) else None
        out = metrics_from_moments(s.full, weight=weight, **kw)
        dxd = s.full.dim
        if s.pooled is not None:
            pooled = metrics_from_moments(s.pooled, **kw)
            for k in SCATTER_METRICS:
                out[k] = pooled[k]
            out.ranks.update(pooled.ranks)
            out.degenerate = pooled.degenerate
            dxd = s.pooled.dim
        counts = s.full.counts.cpu()
        n_rows = int(counts.sum())
        for i, key in enumerate(("ncc_accuracy", "ncc_mismatch")):
            out[key] = int(s.hits[i].sum()) / n_rows
            out.per_class[key] = class_fractions(s.hits[i], counts)
        out["logits_norm"] = self.logit_scale * logits_norm_raw
        out["logits_norm_raw"] = logits_norm_raw
        distance = None
        if s.orig is not None:
            distance = class_distance_from_moments(s.orig)
            if not s.split:  # with fine labels the original classes have no super-class
                out["msdr"] = msdr_from_moments(s.orig, s.superclass)
        return LayerResult(metrics=out, class_means=means, dim=s.full.dim, dxd_dim=dxd,
                           dxd_features="channel_pooled" if s.pooled is not None else "full", moments=s.full,
                           class_distance=distance)
