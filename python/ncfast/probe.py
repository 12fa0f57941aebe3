"""Per-layer Neural-Collapse metrics of a network, collected with forward hooks.

``LayerProbe`` watches some of a model's modules. One pass over a data loader feeds one streaming
``ClassMoments`` per watched layer (features are never stored); a second pass, now that the class
means are final, scores every sample's nearest class centre at every layer against its label and
against the network's own decision (NCC accuracy and NCC mismatch, paper 003 def. 5). Then
``metrics_from_moments`` gives the rest of the metrics of docs/metrics.md for each layer::

    probe = ncfast.LayerProbe(model, ["layer3", "layer4", "pool"], num_classes=10)
    train = probe.measure(train_loader)      # {layer: NCMetrics}
    train_means = probe.class_means          # {layer: (C, D) float64}, this loader's class means
    test = probe.measure(test_loader, class_means=train_means)
    print(test["layer4"]["nc1"], test["layer4"]["ncc_mismatch"])

On a held-out split the nearest class centre must be taken among the TRAIN class means of the same
layer (paper 003 def. 6; Papyan et al.'s NC4 on test data), never the held-out split's own: pass a
train measure's ``class_means`` back, as above. Every other metric of the held-out split describes
its own features.

A layer's output is flattened per sample. When its flattened size exceeds ``max_dim`` (a D x D
scatter would be too large: 64 x 32 x 32 = 65,536 features make a 34 GB matrix), the D x D
metrics (``SCATTER_METRICS``: nc1, fuzziness, vci, rank, effective_rank) are computed on the
channel-pooled features (the mean over spatial positions, one value per channel) and the layer's
result says so in ``NCMetrics.dxd_features == "channel_pooled"``; every other metric, NCC
included, uses the full flattened features. ``NCMetrics.degenerate`` is judged on the features the
D x D metrics were computed on (the channel-pooled ones for such a layer).

With original labels beside the training labels (coarse / fine experiments, paper 000), each
layer also keeps the moments of the original classes: ``LayerResult.class_distance`` is their
class-distance matrix and the metric ``msdr`` their mean super-class distance ratio, the super-class
of an original class being its training label (left out when an original class appears under two
training labels, as with fine labels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ._validation import WEIGHTINGS, check_choice
from .metrics import SCATTER_METRICS, NCMetrics, class_distance_from_moments, class_fractions, metrics_from_moments
from .ncc import ncc_assign
from .stats import ClassMoments

DEFAULT_MAX_DIM = 4096
"""Largest flattened layer size whose D x D metrics are computed on the full features."""


@dataclass
class LayerResult:
    """What ``LayerProbe.measure`` reports besides the metrics of one layer."""

    class_distance: torch.Tensor | None  # (C_orig, C_orig) on the original labels, or None
    dim: int  # flattened feature size
    dxd_dim: int  # size of the features the D x D metrics were computed on
    moments: ClassMoments  # the layer's full features over the training labels the loader yields

    @property
    def train_class_distance(self) -> torch.Tensor:
        """(C, C) class-distance matrix over the training labels, formed on request (a C x C
        matrix, which the metrics themselves never hold)."""
        return class_distance_from_moments(self.moments)


def _flatten(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().reshape(out.shape[0], -1)


def _pool(out) -> torch.Tensor:
    """Channel-pooled features: the mean over every axis after the channel axis."""
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
        class_counts: training-label counts of the data the loader yields; needed for the exact
            balanced Sigma_W on imbalanced classes. When None, ``measure`` counts the labels first
            (one pass over the loader without the model).
    """

    def __init__(self, model: nn.Module, layers, num_classes: int, *, head: nn.Linear | None = None,
                 penultimate: str | None = None, num_original_classes: int | None = None,
                 weighting: str = "balanced", rtol: float | None = None, max_dim: int = DEFAULT_MAX_DIM,
                 class_counts=None, logit_scale: float = 1.0):
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
        self.class_means: dict[str, torch.Tensor] = {}

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

    def measure(self, loader, class_means=None) -> dict[str, NCMetrics]:
        """Per-layer metrics of the samples ``loader`` yields as (inputs, labels) or (inputs, labels,
        original_labels), on the model's device. ``loader`` must yield the same samples on each
        iteration (no shuffling or augmentation).

        ``class_means``: ``{layer: (num_classes, D) tensor}`` to score the nearest class centre
        (ncc_accuracy, ncc_mismatch and their per-class vectors) against, for a held-out loader:
        the ``class_means`` a measure of the train loader left (paper 003 def. 6). Rows holding
        NaN (classes absent from the train data) are no candidates. Default: this loader's own
        means. Afterwards ``self.class_means`` holds this loader's means, float64, NaN rows for
        absent classes; ``self.details`` a LayerResult per layer; ``self.accuracy`` the
        network's accuracy on these samples.
        """
        if class_means is not None:
            missing = [name for name in self.layers if name not in class_means]
            if missing:
                raise ValueError(f"class_means: no means for layers {missing}")
        counts = self.class_counts
        if counts is None:
            counts = torch.zeros(self.num_classes, dtype=torch.int64)
            for batch in loader:
                counts += torch.bincount(batch[1].reshape(-1).cpu(), minlength=self.num_classes)[: self.num_classes]
        present = counts[counts > 0]
        balanced_exact = self.weighting == "balanced" and bool((present != present[0]).any())
        state: dict[str, dict] = {}

        def first(captured, logits, y, y_orig):
            for name in self.layers:
                out = captured[name]
                flat = _flatten(out)
                s = state.get(name)
                if s is None:
                    dev, d = flat.device, flat.shape[1]
                    big = d > self.max_dim
                    pooled_dim = _pool(out).shape[1] if big else d
                    cc = counts.to(dev) if balanced_exact else None
                    s = state[name] = {
                        "full": ClassMoments(self.num_classes, d, scatter=not big, device=dev,
                                             class_counts=None if big else cc),
                        "pooled": ClassMoments(self.num_classes, pooled_dim, scatter=True, device=dev,
                                               class_counts=cc) if big else None,
                        "orig": None if y_orig is None or self.num_original_classes is None else
                        ClassMoments(self.num_original_classes, d, scatter=False, unit_sums=False, device=dev),
                        "superclass": None if y_orig is None or self.num_original_classes is None else
                        torch.full((self.num_original_classes,), -1, dtype=torch.int64, device=dev),
                    }
                if class_means is not None and "checked" not in s:
                    mu = class_means[name]
                    if not isinstance(mu, torch.Tensor) or mu.shape != (self.num_classes, flat.shape[1]):
                        raise ValueError(f"class_means[{name!r}]: expected a tensor of shape "
                                         f"({self.num_classes}, {flat.shape[1]}), got "
                                         f"{tuple(getattr(mu, 'shape', ()))}")
                    s["checked"] = True
                s["full"].update(flat, y)
                if s["pooled"] is not None:
                    s["pooled"].update(_pool(out), y)
                if s["orig"] is not None:
                    s["orig"].update(flat, y_orig)
                    # an original class seen under two training labels (fine labels) has no super-class
                    sup = s["superclass"]
                    seen = sup[y_orig]
                    sup[y_orig] = y
                    split = ((seen >= 0) & (seen != y)) | (sup[y_orig] != y)
                    if bool(split.any()):
                        s["split"] = True
            state.setdefault("_logits", {"norm_sum": 0.0, "n": 0})
            state["_logits"]["norm_sum"] += float(logits.detach().to(torch.float64).norm(dim=1).sum())
            state["_logits"]["n"] += logits.shape[0]

        self._forward_all(loader, first)
        if not state:
            raise ValueError("loader: yielded no batch")

        means = {name: state[name]["full"].means for name in self.layers}
        centres = means if class_means is None else {
            name: class_means[name].to(device=means[name].device, dtype=torch.float64) for name in self.layers}
        # per layer and class: samples whose nearest centre is their label / differs from the decision
        hits = {name: torch.zeros(2, self.num_classes, dtype=torch.int64) for name in self.layers}
        correct = [0, 0]  # decision == label, rows

        def second(captured, logits, y, y_orig):
            decisions = logits.argmax(dim=1)
            correct[0] += int((decisions == y).sum())
            correct[1] += y.shape[0]
            for name in self.layers:
                nearest = ncc_assign(_flatten(captured[name]), centres[name])
                hits[name][0] += torch.bincount(y[nearest == y], minlength=self.num_classes).cpu()
                hits[name][1] += torch.bincount(y[nearest != decisions], minlength=self.num_classes).cpu()

        self._forward_all(loader, second)
        self.accuracy = correct[0] / max(1, correct[1])  # the network's own accuracy on these samples
        self.class_means = means

        results: dict[str, NCMetrics] = {}
        self.details: dict[str, LayerResult] = {}
        kw = dict(weighting=self.weighting)
        if self.rtol is not None:
            kw["rtol"] = self.rtol
        logits_norm_raw = state["_logits"]["norm_sum"] / max(1, state["_logits"]["n"])
        for name in self.layers:
            s = state[name]
            weight = self.head.weight.detach() if (self.head is not None and name == self.penultimate) else None
            sup = s["superclass"]
            out = metrics_from_moments(s["full"], weight=weight, **kw)
            dxd = s["full"].dim
            if s["pooled"] is not None:
                pooled = metrics_from_moments(s["pooled"], **kw)
                for k in SCATTER_METRICS:
                    out[k] = pooled[k]
                out.ranks.update(pooled.ranks)
                out.degenerate = pooled.degenerate
                dxd = s["pooled"].dim
            out.dxd_features = "channel_pooled" if s["pooled"] is not None else "full"
            counts = s["full"].counts.cpu()
            n_rows = int(counts.sum())
            out["ncc_accuracy"] = int(hits[name][0].sum()) / n_rows
            out["ncc_mismatch"] = int(hits[name][1].sum()) / n_rows
            for i, key in enumerate(("ncc_accuracy", "ncc_mismatch")):
                out.per_class[key] = class_fractions(hits[name][i], counts)
            out["logits_norm"] = self.logit_scale * logits_norm_raw
            out["logits_norm_raw"] = logits_norm_raw
            distance = None
            if s["orig"] is not None:
                distance = class_distance_from_moments(s["orig"])
                if not s.get("split"):  # with fine labels the original classes have no super-class
                    out["msdr"] = _msdr(distance, sup)
            results[name] = out
            self.details[name] = LayerResult(class_distance=distance, dim=s["full"].dim, dxd_dim=dxd,
                                             moments=s["full"])
        return results


def _msdr(distance: torch.Tensor, superclass: torch.Tensor) -> float:
    """MSDR (docs/metrics.md) from a class-distance matrix (NaN rows for absent classes) and the super-class
    of each class (-1 where absent): mean of D_ij over i != j in one super-class / mean of D_ii."""
    present = superclass >= 0
    d = distance[present][:, present]
    s = superclass[present]
    same = (s.unsqueeze(0) == s.unsqueeze(1)) & ~torch.eye(s.numel(), dtype=torch.bool, device=s.device)
    if not bool(same.any()):
        return float("nan")
    return float(d[same].mean() / d.diagonal().mean())
