"""The one-shot API: metrics of (features, labels) held in memory (definitions: docs/metrics.md).

Each function checks its arguments, chooses the backend for the features' device once, takes the
batch's ``ClassMoments`` and hands them to the formulas of ``ncfast.metrics`` (and, for the
nearest class centre, to ``ncfast.ncc``)::

    m = ncfast.nc_metrics(features, labels, weight=W, bias=b)   # NCMetrics: m["nc1"], m["vci"], ...
    D = ncfast.class_distance(features, labels)                 # (C, C) float64
"""

from __future__ import annotations

import torch

from . import backends
from ._numerics import mean_row_norm
from ._validation import (
    NAN_POLICIES,
    NON_FINITE,
    WEIGHTINGS,
    as_tensor,
    check_bias,
    check_choice,
    check_features,
    check_finite,
    check_labels,
    check_per_class,
    check_same_device,
    check_state_fits,
    check_superclass,
    omit_non_finite,
)
from .metrics import DEFAULT_RTOL, NCMetrics, class_distance_from_moments
from .passes import Block, Plan, Stream
from .stats import ClassMoments


def _prepare(features, labels, num_classes, nan_policy, *, kernel_checks_labels: bool = False):
    """Validated (x, y, num_classes, omitted count, kept-row mask, backend) with NaN/Inf rows
    handled per nan_policy, and the backend for x chosen.

    ``kernel_checks_labels``: the caller's first use of the labels is the backend's moments kernel;
    where that kernel checks every label before it writes anything (``Backend.checks_labels``),
    the torch pass over them is skipped when num_classes is given.
    """
    check_choice(nan_policy, NAN_POLICIES, "nan_policy")
    x = check_features(features)
    backend = backends.for_tensor(x)
    defer = kernel_checks_labels and num_classes is not None and nan_policy == "raise" and backend.checks_labels
    y, num_classes = check_labels(labels, x.shape[0], x.device, num_classes, values=not defer)
    check_state_fits(num_classes, x.shape[1], x.device)
    # Under "raise", ClassMoments rejects NaN/Inf from its own statistics: no extra pass.
    keep = None
    omitted = 0
    if nan_policy == "omit":
        x, y, keep, omitted = omit_non_finite(x, y)
        if x.shape[0] == 0:
            raise ValueError("features: every row holds NaN or Inf")
    return x, y, num_classes, omitted, keep, backend


def _moments(x, y, num_classes, backend, weighting, scatter, unit_sums=True, pooled=True) -> ClassMoments:
    """The one-shot ClassMoments of checked (x, y); under balanced weighting on imbalanced labels it
    keeps the exact balanced Sigma_W too (and, with ``pooled=False``, only that one)."""
    return ClassMoments._of_batch(
        x,
        y,
        num_classes,
        backend,
        scatter=scatter,
        unit_sums=unit_sums,
        balanced=weighting == "balanced",
        pooled=pooled,
    )


def class_moments(
    features,
    labels,
    *,
    num_classes=None,
    weighting: str = "balanced",
    scatter: bool = True,
    unit_sums: bool = True,
    nan_policy: str = "raise",
) -> ClassMoments:
    """One-shot ClassMoments of (features, labels).

    With ``weighting="balanced"`` on imbalanced labels the exact balanced Sigma_W is kept too
    (the class counts are known up front here). ``scatter=False`` drops the D x D scatter and
    ``unit_sums=False`` the unit-vector and norm sums (see ClassMoments): counts, means and
    variances are always kept.
    """
    check_choice(weighting, WEIGHTINGS, "weighting")
    x, y, num_classes, omitted, _, backend = _prepare(
        features, labels, num_classes, nan_policy, kernel_checks_labels=True
    )
    m = _moments(x, y, num_classes, backend, weighting, scatter, unit_sums=unit_sums)
    m.omitted_rows = omitted
    return m


def class_distance(features, labels, *, num_classes=None, nan_policy: str = "raise") -> torch.Tensor:
    """Class-distance matrix D (paper 000 eq. 6), float64 (num_classes, num_classes).

    D_ij = (1/(n_i n_j)) sum_{u in i} sum_{v in j} ||h_u - h_v||^2 = ||mu_i - mu_j||^2 + v_i + v_j,
    computed from class means and variances (never from pairs). Absent classes: NaN rows/columns.
    nan_policy: "raise" or "omit" (drop rows with NaN/Inf), as in nc_metrics.
    """
    return class_distance_from_moments(
        class_moments(features, labels, num_classes=num_classes, scatter=False, unit_sums=False, nan_policy=nan_policy)
    )


def nc_metrics(
    features,
    labels,
    *,
    num_classes=None,
    weight=None,
    bias=None,
    logits=None,
    superclass=None,
    ood_features=None,
    class_means=None,
    weighting: str = "balanced",
    rtol: float = DEFAULT_RTOL,
    cdnv_exponent: float = 1.0,
    nan_policy: str = "raise",
) -> NCMetrics:
    """All Neural-Collapse metrics for one layer's features (docs/metrics.md), as an NCMetrics (a dict
    of floats with ``per_class`` vectors and the ``degenerate`` flags).

    Args:
        features: (N, D) float tensor or array (float16 / bfloat16 / float32 / float64, any device).
        labels: (N,) integer class labels in [0, num_classes).
        num_classes: defaults to labels.max() + 1; classes without samples are absent and left out.
        weight, bias: the classifier (C, D) and (C,); adds nc3 and ncc_mismatch (decision =
            argmax W h + b, computed block-wise without materialising logits).
        logits: (N, C) network outputs; adds logits_norm, and ncc_mismatch with decision
            logits.argmax(1) when no weight is given (with a weight, the classifier's W h + b decides).
        superclass: (num_classes,) class -> super-class map; adds msdr.
        ood_features: (N_ood, D) out-of-distribution features of the same layer; adds nc5_ood.
        class_means: (num_classes, D) class means to score the nearest class centre against, for
            a held-out split: the TRAIN split's means of the same layer (paper 003 def. 6), e.g.
            ``class_moments(train_features, train_labels).means``. Rows holding NaN (classes
            absent from the train split) are no candidates. Default: the means of ``features``.
        weighting: "balanced" (every class counts equally, Papyan et al.) or "sample".
        rtol: eigenvalues <= rtol * lambda_max count as zero in pseudo-inverses and ranks.
        cdnv_exponent: p in CDNV = (v_i + v_j) / (2 ||mu_i - mu_j||^(2p)); default 1.
        nan_policy: "raise" or "omit" (drop rows with NaN/Inf and report ``omitted_rows``).

    Beside the metrics_from_moments keys: ncc_accuracy (fraction whose nearest class mean is their
    label), ncc_mismatch (paper 003 def. 5), logits_norm (mean ||z_i||); ``per_class`` gains
    ncc_accuracy and, with a classifier or logits, ncc_mismatch.
    """
    check_choice(weighting, WEIGHTINGS, "weighting")
    x, y, num_classes, omitted, keep, backend = _prepare(features, labels, num_classes, nan_policy)
    d = x.shape[1]
    w = check_per_class(weight, "weight", num_classes, d, x.device, finite=True) if weight is not None else None
    b = None
    if bias is not None:
        if w is None:
            raise ValueError("bias: given without weight")
        b = check_bias(bias, num_classes, x)
    z = None
    if logits is not None:
        z = as_tensor(logits, "logits")
        if not z.dtype.is_floating_point:
            raise TypeError(f"logits: expected a floating dtype, got {z.dtype}")
        n_in = x.shape[0] + omitted
        if z.dim() != 2 or z.shape != (n_in, num_classes):
            raise ValueError(f"logits: expected shape ({n_in}, {num_classes}) (rows x classes), got {tuple(z.shape)}")
        check_same_device(x, z, "logits")
        z = z[keep] if omitted else z
        check_finite(z, "logits")
    if superclass is not None:
        check_superclass(superclass, num_classes, x.device)
    if class_means is not None:
        class_means = check_per_class(class_means, "class_means", num_classes, d, x.device)
        if bool(torch.isinf(class_means).any()):
            raise ValueError("class_means: contains Inf (a row of NaN marks an absent class, which never wins)")
        if not bool(torch.isfinite(class_means).all(dim=1).any()):
            raise ValueError("class_means: every row is NaN (no class to be nearest to)")
    xo = None
    if ood_features is not None:
        xo = check_features(ood_features, "ood_features")
        if xo.shape[1] != d:
            raise ValueError(f"ood_features: expected {d} columns like features, got {xo.shape[1]}")
        check_same_device(x, xo, "ood_features")
    counts = torch.bincount(y, minlength=num_classes)
    present = int((counts > 0).sum())
    if present < 2:
        raise ValueError(f"labels: nc_metrics needs at least 2 present classes, got {present}")

    # The features are in memory: both passes read them (the plan's cache only references them).
    # Only `weighting`'s Sigma_W is read here, so imbalanced labels under "balanced" cost one scatter.
    stream = Stream(
        num_classes,
        d,
        device=x.device,
        weighting=weighting,
        centres=class_means,
        classifier=None if w is None else (w, b),
        decisions=z is not None,
        pooled=False,
    )
    decisions = z.argmax(dim=1) if (z is not None and w is None) else None
    plan = Plan({"features": stream}, cache_bytes=None)
    plan.first(Block({"features": x}, y, decisions))
    plan.end_first()
    plan.second_from_cache()
    plan.end()
    stream.moments.omitted_rows = omitted
    ood = None
    if xo is not None:  # only its mean is read: one class, no scatter, no unit sums
        try:
            ood = _moments(
                xo,
                torch.zeros(xo.shape[0], dtype=torch.int64, device=xo.device),
                1,
                backend,
                "sample",
                scatter=False,
                unit_sums=False,
            )
        except ValueError as e:  # the checks name "features"; nan_policy does not apply to these rows
            if not str(e).startswith("features:"):
                raise
            raise ValueError("ood_features: contains NaN or Inf" if str(e) == NON_FINITE else "ood_" + str(e)) from None
    out = stream.metrics(backend, weight=w, superclass=superclass, ood=ood, rtol=rtol, cdnv_exponent=cdnv_exponent)
    if z is not None:
        out["logits_norm"] = mean_row_norm(z)
    return out
