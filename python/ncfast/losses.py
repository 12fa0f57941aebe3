"""Training losses that encourage neural collapse (differentiable, torch)."""

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def svsl_loss(layer_features, labels, *, alpha):
    """Stochastic Variability-Simplification Loss (SVSL), paper 003 definition 10 (SPEC "Losses").

    For the layers j = 1..L passed in (the paper's gamma..k), with batch features g_j(x_i) flattened
    to (N, D_j) and the batch class means mu_c^(j):

        SVSL = alpha / L * (1/C_B) sum_{c in B} (1/n_c) sum_{i: y_i=c} sum_j ||g_j(x_i) - mu_c^(j)||^2

    where C_B is the number of classes present in the batch and n_c the batch count of class c, so
    every present class weighs the same however unbalanced the batch is. It is the per-sample loss of
    the paper, eta * sum_j ||g_j(x_i) - mu_c^(j)||^2 with eta = alpha / (C_B L n_c), summed over the
    batch; add it to the cross-entropy.

    Vectorized over classes (index_add_ / bincount on the labels); gradients flow through the
    features and the batch means. Computed in the input dtype, except that float16 / bfloat16
    layers are upcast to float32 so the sums accumulate in at least float32.

    Args:
        layer_features: sequence of floating tensors (N, ...), one per layer; each is flattened to
            (N, D_j). Layers may differ in shape and dtype.
        labels: integer tensor (N,) of class indices on the same device.
        alpha: weight of the term, >= 0.

    Returns:
        0-dim tensor.

    Example::

        loss = F.cross_entropy(logits, y) + ncfast.svsl_loss([f1, f2], y, alpha=0.1)
    """
    if isinstance(layer_features, torch.Tensor):
        raise TypeError("layer_features must be a sequence of tensors, one per layer, not a single tensor")
    layers = list(layer_features)
    if not layers:
        raise ValueError("layer_features is empty: pass at least one layer")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")

    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    n = labels.shape[0]
    if n == 0:
        raise ValueError("labels is empty (N = 0)")
    for j, g in enumerate(layers):
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"layer_features[{j}] must be a torch.Tensor, got {type(g).__name__}")
        if not g.is_floating_point():
            raise TypeError(f"layer_features[{j}] must be floating point, got {g.dtype}")
        if g.dim() < 1 or g.shape[0] != n:
            raise ValueError(
                f"layer_features[{j}] has shape {tuple(g.shape)}, expected first dim len(labels) = {n}"
            )
        if g.device != labels.device:
            raise ValueError(f"layer_features[{j}] is on {g.device} but labels is on {labels.device}")
    if (labels < 0).any():
        raise ValueError("labels must be non-negative")

    labels = labels.long()
    counts = torch.bincount(labels)
    num_present = (counts > 0).sum()
    total = None
    for g in layers:
        x = g.reshape(n, -1)
        if x.dtype in _LOW_PRECISION:
            x = x.float()
        class_counts = counts.to(x.dtype)
        sums = x.new_zeros(counts.shape[0], x.shape[1]).index_add_(0, labels, x)
        # clamp only guards absent classes, whose sums are zero and whose means are never read.
        means = sums / class_counts.clamp(min=1).unsqueeze(1)
        sq = (x - means[labels]).pow(2).sum(dim=1)
        # Each sample carries 1/(C_B n_c): the per-class average, then the average over classes.
        term = (sq / (class_counts[labels] * num_present.to(x.dtype))).sum()
        total = term if total is None else total + term
    return alpha / len(layers) * total
