"""Training losses that encourage neural collapse (differentiable, torch)."""

import math
import numbers

import torch

from ._validation import as_tensor, check_labels

_LOW_PRECISION = (torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum")


def svsl_loss(layer_features, labels, *, alpha, num_classes, reduction="mean"):
    """Stochastic Variability-Simplification Loss (SVSL) term, paper 003 definition 10 (docs/metrics.md "Losses").

    Paper 003, definition 10: for a sample (x_i, y_i = c) of batch B,

        L(y^_i, y_i) := CE(y^_i, y_i) + eta * sum_{j=gamma..k} ||g^(j)(x_i) - mu_{c,B}^(j)||_2^2,
        eta = alpha / (C (k + 1 - gamma) |{i in B : y_i = c}|),

    with mu_{c,B}^(j) the mean of g^(j) over the samples of class c in the batch (definition 9).
    This function returns the second term only, reduced over the batch like ``F.cross_entropy``:

        sum_{i in B} eta_{y_i} sum_j ||g_j(x_i) - mu_{y_i,B}^(j)||^2     (reduction="sum")

    and that sum divided by |B| (reduction="mean", the default), so that
    ``F.cross_entropy(logits, y, reduction=r) + svsl_loss(..., reduction=r)`` is the paper's loss
    summed or averaged over the batch. Here C = ``num_classes``, the number of classes of the task
    (not only those present in the batch), k + 1 - gamma = ``len(layer_features)``, the number of
    layers passed (the paper runs them up to the output layer k, the logits), and n_{c,B} the
    count of class c in the batch. Each layer is flattened to (N, D_j).

    Vectorised over classes (bincount / index_add_ on the labels); gradients flow through the
    features and through the batch means. Computed in each layer's dtype, except that float16 and
    bfloat16 layers are upcast to float32; the result has the promoted dtype of those.

    Args:
        layer_features: sequence of floating tensors (N, ...), one per layer gamma..k, on the
            labels' device; layers may differ in shape and dtype.
        labels: integer tensor (N,) with values in [0, num_classes).
        alpha: the paper's alpha, a finite number >= 0.
        num_classes: C, an int >= 1.
        reduction: "mean" (divide by N) or "sum".

    Returns:
        0-dim tensor.

    Raises:
        TypeError: layer_features is a single tensor or holds a non-tensor or a non-floating
            tensor; labels are not integers; num_classes is not an int; alpha is not a number.
        ValueError: no layers; N = 0; a layer's first dimension differs from len(labels) or it
            has no features; devices differ; a label outside [0, num_classes); num_classes < 1;
            alpha < 0 or not finite; reduction not "mean" or "sum".

    Example::

        loss = F.cross_entropy(logits, y) + ncfast.svsl_loss([f1, f2, logits], y, alpha=1e-5,
                                                             num_classes=10)
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha: expected a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha: must be a finite number >= 0, got {alpha}")
    if isinstance(layer_features, torch.Tensor):
        raise TypeError("layer_features: expected a sequence of tensors, one per layer, not a single tensor")
    layers = list(layer_features)
    if not layers:
        raise ValueError("layer_features: empty; pass at least one layer")

    labels = as_tensor(labels, "labels")
    n = labels.shape[0] if labels.dim() == 1 else -1
    labels, _ = check_labels(labels, n, labels.device, num_classes)
    if n == 0:
        raise ValueError("labels: empty batch (N = 0)")
    for j, g in enumerate(layers):
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"layer_features[{j}]: expected a torch.Tensor, got {type(g).__name__}")
        if not g.is_floating_point():
            raise TypeError(f"layer_features[{j}]: expected a floating dtype, got {g.dtype}")
        if g.dim() < 1 or g.shape[0] != n:
            raise ValueError(
                f"layer_features[{j}]: shape {tuple(g.shape)} does not match len(labels) = {n} in its first dimension"
            )
        if g[0].numel() == 0:
            raise ValueError(f"layer_features[{j}]: no features per sample (shape {tuple(g.shape)})")
        if g.device != labels.device:
            raise ValueError(f"layer_features[{j}]: on device {g.device}, but labels are on {labels.device}")
    counts = torch.bincount(labels, minlength=num_classes)
    total = None
    for g in layers:
        x = g.reshape(n, -1)
        if x.dtype in _LOW_PRECISION:
            x = x.float()
        class_counts = counts.to(x.dtype)
        sums = x.new_zeros(num_classes, x.shape[1]).index_add_(0, labels, x)
        # clamp only guards absent classes, whose sums are zero and whose means are never read.
        means = sums / class_counts.clamp(min=1).unsqueeze(1)
        sq = (x - means[labels]).pow(2).sum(dim=1)
        # sample i carries 1 / n_{y_i} of eta; alpha / (C L) is applied once below
        term = (sq / class_counts[labels]).sum()
        total = term if total is None else total + term
    scale = alpha / (num_classes * len(layers))
    if reduction == "mean":
        scale /= n
    return total * scale
