"""Per-layer Neural-Collapse metrics of a network, collected with forward hooks.

``LayerProbe`` watches some of a model's modules. A forward pass over a data loader feeds the
streaming class moments of every watched layer (``ncfast.passes``); a second pass over the same
features, now that the class means are final, adds the D x D scatter about them and scores every
sample's nearest class centre against its label and against the network's own decision (NCC
accuracy and NCC mismatch, paper 003 def. 5). The second pass reads the layer outputs the first
one kept (up to ``cache_bytes``, 1 GiB per process by default) and runs the model again only for
the layers that did not fit; a held-out split scored against the train split's class means needs
no second pass at all. Then ``metrics_from_moments`` gives the rest of the metrics of
docs/metrics.md for each layer, so measuring costs about one forward pass::

    probe = ncfast.LayerProbe(model, ["layer3", "layer4", "pool"], num_classes=10)
    train = probe.measure(train_loader)      # ProbeResult: a LayerResult per layer
    test = probe.measure(test_loader, class_means=train.class_means)
    print(test["layer4"].metrics["nc1"], test["layer4"].metrics["ncc_mismatch"], test.accuracy)

On a held-out split the nearest class centre must be taken among the TRAIN class means of the same
layer (paper 003 def. 6; Papyan et al.'s NC4 on test data), never the held-out split's own: pass a
train measure's ``class_means`` (``ProbeResult.class_means``) back, as above.
Every other metric of the held-out split describes
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
``ClassMoments`` is merged exactly (``ClassMoments.all_reduce``, Chan's formula in rank order) and
the scatters about the merged means are summed, so
every process gets the metrics of one process over all the shards, to float64 rounding. The shards
must be disjoint and cover the data once: shard a measurement loader with ``shard_indices`` (or any
split without padding), not with ``DistributedSampler``, whose padding repeats samples to even out
the shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import backends
from ._distributed import Ranks
from ._numerics import row_norms
from ._validation import NON_FINITE, WEIGHTINGS, available_bytes, check_choice, check_labels
from .metrics import DEFAULT_RTOL, SCATTER_METRICS, NCMetrics, class_distance_from_moments, msdr_from_moments
from .passes import Block, Plan, Stream
from .stats import ClassMoments

DEFAULT_MAX_DIM = 4096
"""Largest flattened layer size whose D x D metrics are computed on the full features."""
DEFAULT_CACHE_BYTES = 1 << 30
"""Bytes of features a LayerProbe keeps per process between its two passes (1 GiB)."""


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
    cached_layers: list[str] = field(default_factory=list)  # layers whose second pass read kept features

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


def _named_non_finite(error: ValueError, feats: dict) -> ValueError:
    """The features' NaN / Inf error of a batch, naming the layer whose output holds them (the
    one-shot API's message suggests nan_policy, which LayerProbe does not have); other errors as
    they are."""
    if str(error) != NON_FINITE:
        return error
    bad = next((name for (name, _), t in feats.items() if not bool(torch.isfinite(t).all())), "?")
    return ValueError(
        f"layer {bad!r}: its output holds NaN or Inf in this batch (the network diverged, or its "
        f"input holds them); LayerProbe measures finite features only"
    )


def _batch_labels(labels, num_classes: int) -> torch.Tensor:
    """A batch's labels checked at the probe's door (an integer vector in [0, num_classes)), so a
    float or negative label is a ValueError / TypeError naming ``labels``, not an error from inside
    a torch operation."""
    y = torch.as_tensor(labels)
    return check_labels(y, y.shape[0] if y.dim() == 1 else -1, y.device, num_classes)[0]


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
            of all processes' shards together). Read only by a measure with ``class_means`` (one
            forward pass, the scatter streamed) under balanced weighting, for the exact balanced
            Sigma_W on imbalanced classes; when None there, ``measure`` counts the labels first (a
            pass over the loader without the model). A measure without ``class_means`` takes its
            scatter in its second pass, when the counts are known.
        process_group: under torch.distributed, the group whose processes' shards make up the
            data (None: the default group when torch.distributed is initialised); every process of
            the group must call ``measure`` with the same arguments, and gets the same result.
            ``False``: measure this process's loader alone.
        cache_bytes: how many bytes of layer outputs ``measure`` may keep (per process) between its
            two passes over a split measured without ``class_means``, in the outputs' own dtype on
            their device. The budget is filled over ``layers`` in the order given: a layer's
            features are kept while, with those of the layers kept before it, they fit; a layer
            that no longer fits is dropped from the cache (its kept batches freed) and the forward
            pass is run again for it. Where the loader has a length, the layers that fit are chosen
            at its first batch from the expected total (length x the first batch's rows), so a layer
            that cannot fit takes no room meanwhile. 0: every split takes two forward passes.
    """

    def __init__(
        self,
        model: nn.Module,
        layers,
        num_classes: int,
        *,
        head: nn.Linear | None = None,
        penultimate: str | None = None,
        num_original_classes: int | None = None,
        weighting: str = "balanced",
        rtol: float | None = None,
        max_dim: int = DEFAULT_MAX_DIM,
        class_counts=None,
        logit_scale: float = 1.0,
        process_group=None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
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
        if not (isinstance(cache_bytes, int) and cache_bytes >= 0):
            raise ValueError(f"cache_bytes: must be an integer >= 0, got {cache_bytes!r}")
        self.cache_bytes = cache_bytes

    # ------------------------------------------------------------------ passes
    def _forward_all(self, loader, on_batch, names=None):
        """Run the model on every batch with hooks that hand the outputs of the layers ``names``
        (default: every probed layer) to on_batch."""
        captured: dict[str, torch.Tensor] = {}
        names = self.layers if names is None else names
        handles = [
            self.modules[name].register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
            for name in names
        ]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in loader:
                    x, y = batch[0], _batch_labels(batch[1], self.num_classes)
                    y_orig = batch[2] if len(batch) > 2 else None
                    captured.clear()
                    logits = self.model(x)
                    on_batch(
                        captured, logits, y.to(logits.device), None if y_orig is None else y_orig.to(logits.device)
                    )
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

        Forward passes: one with ``class_means`` (the centres are known, so every statistic is
        taken in the same pass; under balanced weighting without ``class_counts`` the labels are
        counted first, a pass over the loader without the model). Without, one for the layers whose
        features fit ``cache_bytes`` (their second pass, the D x D scatter about the final class
        means and the nearest class centre, reads the kept features) and a second forward pass for
        the others. ``ProbeResult.cached_layers`` names the layers that were kept.
        """
        if class_means is not None:
            missing = [name for name in self.layers if name not in class_means]
            if missing:
                raise ValueError(f"class_means: no means for layers {missing}")
        comm = Ranks(self.process_group)
        one_pass = class_means is not None
        counts = self._label_counts(loader, comm) if one_pass and self.weighting == "balanced" else None
        try:
            batches = len(loader)
        except TypeError:  # an iterable without a length
            batches = None
        run = _Run(self, comm, class_means, counts, batches)
        self._forward_all(loader, run.first)
        run.end_first()
        run.plan.second_from_cache()
        pending = run.plan.pending
        if pending:
            self._forward_all(loader, run.second, names=pending)
        run.plan.end()
        layers = {name: self._layer_result(run, name) for name in self.layers}
        return ProbeResult(
            layers=layers, accuracy=run.correct[0] / max(1, run.correct[1]), cached_layers=run.plan.cached
        )

    def _label_counts(self, loader, comm: Ranks) -> torch.Tensor:
        """Training-label counts: the given ``class_counts``, else one pass over the loader's labels
        (summed over the processes)."""
        if self.class_counts is not None:
            return self.class_counts
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        for batch in loader:
            y = _batch_labels(batch[1], self.num_classes).cpu()
            counts += torch.bincount(y, minlength=self.num_classes)[: self.num_classes]
        return comm.reduce(counts)

    def _check_means(self, name: str, mu, dim: int) -> None:
        if not isinstance(mu, torch.Tensor) or mu.shape != (self.num_classes, dim):
            raise ValueError(
                f"class_means[{name!r}]: expected a tensor of shape ({self.num_classes}, {dim}), got "
                f"{tuple(getattr(mu, 'shape', ()))}"
            )

    def _layer_result(self, run: _Run, name: str) -> LayerResult:
        """The metrics of one layer from its streams (D x D ones from the pooled features when kept)."""
        rtol = DEFAULT_RTOL if self.rtol is None else self.rtol
        full = run.plan.streams[(name, "full")]
        pooled = run.plan.streams.get((name, "pooled"))
        weight = self.head.weight.detach() if (self.head is not None and name == self.penultimate) else None
        backend = backends.for_tensor(full.moments.mean)
        out = full.metrics(backend, weight=weight, rtol=rtol)
        dxd = full.moments.dim
        if pooled is not None:
            values, ranks, degenerate = pooled.scatter_metrics(rtol)
            for k in SCATTER_METRICS:
                out[k] = values[k]
            out.ranks.update(ranks)
            out.degenerate = degenerate
            dxd = pooled.moments.dim
        norm = run.norm[0] / max(1, run.norm[1])
        out["logits_norm"] = self.logit_scale * norm
        out["logits_norm_raw"] = norm
        distance = None
        orig = run.orig.get(name)
        if orig is not None:
            distance = class_distance_from_moments(orig)
            if not run.split[name]:  # with fine labels the original classes have no super-class
                out["msdr"] = msdr_from_moments(orig, run.superclass[name])
        return LayerResult(
            metrics=out,
            class_means=full.moments.means,
            dim=full.moments.dim,
            dxd_dim=dxd,
            dxd_features="channel_pooled" if pooled is not None else "full",
            moments=full.moments,
            class_distance=distance,
        )


DXD_MATRICES = 4
"""D x D float64 matrices a layer measured in full holds at once: its pooled and balanced scatters,
and the solver's copy and workspace."""


def _check_dxd_fits(full: dict, max_dim: int) -> None:
    """ValueError naming max_dim when the D x D statistics of the layers measured in full (D <=
    max_dim) need more memory than their device has free: max_dim decides that allocation, and a
    layer of D = 65,536 (a ResNet's first stage on CIFAR) would ask for 128 GiB."""
    need: dict = {}
    for d, dev in full.values():
        need[dev] = need.get(dev, 0) + DXD_MATRICES * 8 * d * d
    for dev, total in need.items():
        free = available_bytes(dev)
        if free is not None and total > free:
            name, (d, _) = max(((n, v) for n, v in full.items() if v[1] == dev), key=lambda item: item[1][0])
            raise ValueError(
                f"max_dim: {max_dim:,} keeps the D x D statistics of layers up to that size, "
                f"{total / 2**30:.1f} GiB on {dev} (the largest, {name!r}, has D = {d:,}), more than "
                f"the {free / 2**30:.1f} GiB free; lower max_dim so that the wider layers are measured "
                f"from channel-pooled features"
            )


class _Run:
    """One LayerProbe.measure: the passes.Plan of every layer's streams (created from the first
    batch's shapes), the original labels' moments and super-classes, the logits norm and the
    network's accuracy."""

    def __init__(self, probe: LayerProbe, comm: Ranks, class_means, counts, batches: int | None):
        self.probe = probe
        self.batches = batches  # the loader's length, when it has one
        self.comm = comm
        self.class_means = class_means
        self.counts = counts
        self._plan: Plan | None = None  # made at the first batch (``plan``)
        self.orig: dict[str, ClassMoments] = {}
        self.superclass: dict[str, torch.Tensor] = {}  # training label of each original class (-1: not seen)
        self.split: dict[str, bool] = {}  # an original class seen under two training labels (no super-class)
        self.norm: list[float] = [0.0, 0]
        self.correct: list[float] = [0, 0]

    @property
    def plan(self) -> Plan:
        """The passes' plan, made at the first batch (``end_first`` refuses a loader without one)."""
        if self._plan is None:
            raise RuntimeError("the plan is made at the first batch; none came")
        return self._plan

    def _feeds(self, captured, names) -> dict:
        feats = {}
        for name in names:
            out = captured[name]
            feats[(name, "full")] = flatten(out)
            if (name, "pooled") in self.plan.streams:
                feats[(name, "pooled")] = channel_pool(out)
        return feats

    def _start(self, captured, has_orig: bool, first_rows: int) -> None:
        p = self.probe
        streams, groups = {}, {}
        one_pass = self.class_means is not None
        full = {}  # layers whose D x D statistics are kept in full: name -> (D, device)
        for name in p.layers:
            out = captured[name]
            flat = flatten(out)
            dev, d = flat.device, flat.shape[1]
            centres = None
            if one_pass:
                p._check_means(name, self.class_means[name], d)
                centres = self.class_means[name].to(device=dev, dtype=torch.float64)
            big = d > p.max_dim
            if not big:
                full[name] = (d, dev)
            counts = None if self.counts is None else self.counts.to(dev)
            streams[(name, "full")] = Stream(
                p.num_classes,
                d,
                device=dev,
                weighting=p.weighting,
                scatter=not big,
                centres=centres,
                one_pass=one_pass,
                class_counts=counts,
                decisions=True,
            )
            groups[name] = [(name, "full")]
            if big:
                streams[(name, "pooled")] = Stream(
                    p.num_classes,
                    channel_pool(out).shape[1],
                    device=dev,
                    weighting=p.weighting,
                    unit_sums=False,
                    ncc=False,
                    one_pass=one_pass,
                    class_counts=counts,
                )
                groups[name].append((name, "pooled"))
            if has_orig and p.num_original_classes is not None:
                self.orig[name] = ClassMoments(p.num_original_classes, d, scatter=False, unit_sums=False, device=dev)
                self.superclass[name] = torch.full((p.num_original_classes,), -1, dtype=torch.int64, device=dev)
                self.split[name] = False
        _check_dxd_fits(full, p.max_dim)
        expected = None if self.batches is None else self.batches * first_rows  # the loader's length x rows
        self._plan = Plan(streams, groups=groups, comm=self.comm, cache_bytes=p.cache_bytes, expected_rows=expected)

    def first(self, captured, logits, y, y_orig) -> None:
        """The first forward pass's batch: every stream's first pass (kept for the second while the
        cache allows), the original labels' moments, the logits norm and the accuracy."""
        if self._plan is None:
            self._start(captured, y_orig is not None, first_rows=y.shape[0])
        decisions = logits.argmax(dim=1)
        feats = self._feeds(captured, self.probe.layers)
        try:
            self.plan.first(Block(feats, y, decisions))
        except ValueError as e:
            raise _named_non_finite(e, feats) from None
        for name, orig in self.orig.items():
            orig.update(feats[(name, "full")], y_orig)
            # an original class seen under two training labels (fine labels) has no super-class
            sup = self.superclass[name]
            seen = sup[y_orig]
            sup[y_orig] = y
            if bool((((seen >= 0) & (seen != y)) | (sup[y_orig] != y)).any()):
                self.split[name] = True
        self.norm[0] += float(row_norms(logits.detach()).sum())
        self.norm[1] += logits.shape[0]
        self.correct[0] += int((decisions == y).sum())
        self.correct[1] += y.shape[0]

    def end_first(self) -> None:
        """After the first pass: an empty loader refused, every process's statistics merged."""
        comm = self.comm
        empty = comm.scalars(float(self._plan is None))[0] if comm.active else float(self._plan is None)
        if empty:
            raise ValueError("loader: yielded no batch" + (f" on {int(empty)} process(es)" if comm.active else ""))
        self.plan.end_first()
        if comm.active:
            for name in self.probe.layers:
                self._merge_orig(name)
            self.norm = comm.scalars(*self.norm)
            self.correct = comm.scalars(*self.correct)

    def _merge_orig(self, name: str) -> None:
        """The original labels' moments merged (exact) and the super-classes checked across processes."""
        orig = self.orig.get(name)
        if orig is None:
            return
        comm, nc = self.comm, self.probe.num_classes
        orig.all_reduce(comm.group)
        sup = self.superclass[name]
        # a class seen under two training labels on any process, or under different ones on two
        # processes, has no super-class. high / low: the largest / smallest training label any
        # process saw (-1 / C: none)
        high = comm.reduce(sup, "max")
        unseen = torch.full_like(sup, -nc)
        low = -comm.reduce(torch.where(sup >= 0, -sup, unseen), "max")
        clash = bool(((high >= 0) & (low != high)).any())
        self.split[name] = bool(comm.reduce(torch.tensor([int(self.split[name] or clash)]), "max").item())
        self.superclass[name] = high

    def second(self, captured, logits, y, y_orig) -> None:
        """A batch of the second forward pass, for the layers the cache did not keep."""
        names = [n for n in self.probe.layers if n in self.plan.pending]
        self.plan.second(Block(self._feeds(captured, names), y, logits.argmax(dim=1)))
