"""The GPU path of ncfast as Triton kernels, one module per op (used by ``ncfast.backends.triton``).

- ``moments``:  per-class (count, mean, M2, unit sums, norm sums) of a block of rows, and the
  centred rows of the within-class scatter.
- ``ncc``:      the certified nearest-class / decision sweep (no N x K score matrix).
- ``pairwise``: one tile of class pairs, its Gram block computed and reduced in one kernel.

Triton itself is imported only by those modules, so ``import ncfast`` works without it. With
TRITON_INTERPRET=1 (set before the op modules are imported) the kernels run on CPU tensors in
Triton's interpreter, which is how the tests exercise them on machines without a GPU.

Conventions (Triton tutorials / Liger-Kernel): kernels are private (``_name_kernel``), launchers
public; kernel arguments list outputs first, every 2-D tensor followed by its strides (1-D
vectors are made contiguous by the launchers), modes as ``tl.constexpr``; row and column offsets
are int64 before they meet a stride; float64 scalars travel in tensors (a Python float argument
reaches a kernel as float32).
"""

from __future__ import annotations

import functools
import os


@functools.cache
def importable() -> bool:
    """Whether triton (and triton.language) import."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"
