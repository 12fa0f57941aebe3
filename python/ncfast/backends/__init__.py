"""The backends: one object per implementation of ncfast's kernels, chosen once per public call.

    backend = backends.for_tensor(x)      # CppBackend for CPU tensors, TritonBackend for CUDA ones
    part = backend.block_moments(x, y, num_classes, unit_sums=True, check_finite=True)

Every backend implements ``Backend``, the small protocol below; results are the dataclasses of
this module. The formula modules (``stats``, ``metrics``, ``pairwise``, ``ncc``) take the backend
their public entry point chose and never import ``ncfast._C`` or Triton themselves.

- ``cpp``    (``backends/cpp.py``):    the compiled C++ core ``ncfast._C``, CPU tensors.
- ``torch``  (``backends/torch.py``):  PyTorch operations, any device.
- ``triton`` (``backends/triton.py``): the Triton kernels of ``ncfast.triton``, CUDA tensors (or
  CPU tensors under TRITON_INTERPRET=1, Triton's interpreter, as the tests run them).

CPU tensors go to ``cpp``; CUDA tensors to ``triton`` where triton imports, else (like other
devices) to ``torch``. The environment variable NCFAST_BACKEND ("cpp", "torch" or "triton")
overrides the choice; "cpp" on a non-CPU tensor is an error rather than a silent copy, and
"triton" on a CPU tensor needs TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import os

from .base import (
    PAIR_PARAMS,
    PRECISIONS,
    Backend,
    BlockMoments,
    PairContext,
    PairSums,
    PairTileVectors,
    PairVectors,
    Precision,
    Sweep,
    ncc_block_rows,
    tile_vectors,
)

NAMES = ("cpp", "torch", "triton")


# ---------------------------------------------------------------------------------- selection
@functools.cache
def get(name: str) -> Backend:
    """The backend of this name (one instance per process)."""
    if name == "cpp":
        from .cpp import CppBackend

        return CppBackend()
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend()
    if name == "triton":
        from .triton import TritonBackend

        return TritonBackend()
    raise ValueError(f"backend: expected one of {NAMES}, got {name!r}")


def triton_runs_on(x) -> bool:
    """Whether the Triton kernels can run on x: triton imports and x is a CUDA tensor, or the
    interpreter is on (TRITON_INTERPRET=1) and x is a CPU tensor."""
    from ..triton import importable, interpreting

    if x.device.type == "cuda":
        return importable()
    return x.device.type == "cpu" and interpreting() and importable()


def for_tensor(x) -> Backend:
    """The backend for x's device, or the one NCFAST_BACKEND names (see the module docstring)."""
    forced = os.environ.get("NCFAST_BACKEND", "").strip().lower()
    if forced:
        if forced not in NAMES:
            raise ValueError(f"NCFAST_BACKEND: expected one of {NAMES}, got {forced!r}")
        if forced == "cpp" and x.device.type != "cpu":
            raise ValueError(f"NCFAST_BACKEND=cpp needs CPU tensors, got one on {x.device}")
        if forced == "triton" and not triton_runs_on(x):
            raise ValueError(
                f"NCFAST_BACKEND=triton needs triton installed and a CUDA tensor, or TRITON_INTERPRET=1 "
                f"for a CPU tensor; got one on {x.device}"
            )
        return get(forced)
    if x.device.type == "cpu":
        return get("cpp")
    return get("triton" if x.device.type == "cuda" and triton_runs_on(x) else "torch")


__all__ = [
    "NAMES",
    "PAIR_PARAMS",
    "PRECISIONS",
    "Backend",
    "BlockMoments",
    "PairContext",
    "PairSums",
    "PairTileVectors",
    "PairVectors",
    "Precision",
    "Sweep",
    "for_tensor",
    "get",
    "ncc_block_rows",
    "tile_vectors",
    "triton_runs_on",
]
