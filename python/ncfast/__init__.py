"""ncfast: exact, mergeable Neural Collapse metrics with a compiled C++ core.

Quick use::

    import ncfast
    m = ncfast.nc_metrics(features, labels, weight=W, bias=b)   # dict of floats: m["nc1"], m["vci"], ...
    D = ncfast.class_distance(features, labels)                 # (C, C) float64

Streaming::

    stats = ncfast.ClassMoments(num_classes, dim)
    for x, y in loader:
        stats.update(x, y)
    stats.all_reduce()                    # across torch.distributed processes
    m = ncfast.metrics_from_moments(stats)

Every probed layer of a network, from forward hooks::

    probe = ncfast.LayerProbe(model, ["layer3", "layer4", "pool"], num_classes=10)
    result = probe.measure(loader)          # result["layer4"].metrics: NCMetrics, NCC mismatch included
"""

import sys as _sys

from ._extension import load as _load_extension

# The compiled core: a source install's _C, or the best x86-64 level of a portable wheel (_extension).
_C, _C_LEVEL = _load_extension(__name__)
_sys.modules.setdefault(f"{__name__}._C", _C)

from . import reference  # noqa: E402
from .functional import class_distance, class_moments, nc_metrics
from .labels import coarse_labels, fine_labels, random_coarse_labels
from .losses import svsl_loss
from .metrics import (
    DEFAULT_RTOL,
    NCMetrics,
    cdnv_matrix,
    class_distance_from_moments,
    metrics_from_moments,
    msdr_from_moments,
)
from .ncc import classifier_decisions, ncc_and_decisions, ncc_assign, ncc_mismatch
from .pairwise import PairStats, class_pair_stats
from .probe import LayerProbe, LayerResult, ProbeResult, shard_indices
from .stats import ClassMoments

__version__ = "0.1.0"

__all__ = [
    "ClassMoments",
    "DEFAULT_RTOL",
    "LayerProbe",
    "LayerResult",
    "NCMetrics",
    "PairStats",
    "ProbeResult",
    "class_distance",
    "class_distance_from_moments",
    "class_moments",
    "class_pair_stats",
    "cdnv_matrix",
    "classifier_decisions",
    "coarse_labels",
    "compile_options",
    "fine_labels",
    "metrics_from_moments",
    "msdr_from_moments",
    "ncc_and_decisions",
    "nc_metrics",
    "ncc_assign",
    "ncc_mismatch",
    "random_coarse_labels",
    "reference",
    "svsl_loss",
    "shard_indices",
]


def compile_options() -> str:
    """What the compiled core was built with: OpenMP (and its threads), SIMD level, AVX512-BF16, and,
    in a portable wheel, the x86-64 level chosen at import ("ISA=x86_64_v3")."""
    return _C.compile_options() + ("" if _C_LEVEL == "native" else f" ISA={_C_LEVEL}")


try:
    from .torchmetrics import NeuralCollapse  # noqa: F401  (needs the optional torchmetrics package)
except ImportError:
    pass
else:
    __all__.append("NeuralCollapse")
