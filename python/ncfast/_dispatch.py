"""The one place that picks a backend for a tensor.

CPU tensors go to the compiled C++ core (`ncfast._C`); CUDA tensors to the Triton
kernels (`ncfast.triton`) where triton is installed, else, like other devices, to
the PyTorch implementation. The environment variable NCFAST_BACKEND ("cpp",
"torch" or "triton") overrides the choice; "cpp" on a non-CPU tensor is an error
rather than a silent copy, and "triton" on a CPU tensor needs TRITON_INTERPRET=1
(Triton's interpreter, as the tests use it).
"""
from __future__ import annotations

import os

import torch

from . import _C
from . import triton as _triton

BACKENDS = ("cpp", "torch", "triton")
NON_FINITE = "features: contains NaN or Inf (pass nan_policy='omit' to drop such rows)"


def backend_for(x: torch.Tensor) -> str:
    forced = os.environ.get("NCFAST_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"NCFAST_BACKEND: expected one of {BACKENDS}, got {forced!r}")
        if forced == "cpp" and x.device.type != "cpu":
            raise ValueError(f"NCFAST_BACKEND=cpp needs CPU tensors, got one on {x.device}")
        if forced == "triton" and not _triton.available(x):
            raise ValueError(f"NCFAST_BACKEND=triton needs triton installed and a CUDA tensor, or TRITON_INTERPRET=1 "
                             f"for a CPU tensor; got one on {x.device}")
        return forced
    if x.device.type == "cpu":
        return "cpp"
    return "triton" if x.device.type == "cuda" and _triton.available(x) else "torch"


def _torch_block_moments(x: torch.Tensor, y: torch.Tensor, num_classes: int):
    x = x.to(torch.float64)
    d = x.shape[1]
    counts = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=x.device).index_add_(0, y, x)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    centred = x - means[y]
    m2 = torch.zeros(num_classes, dtype=torch.float64, device=x.device).index_add_(0, y, centred.square().sum(1))
    norms = x.norm(dim=1)
    unit = x / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(1)
    unit_sums = torch.zeros_like(sums).index_add_(0, y, unit)
    norm_sums = torch.zeros_like(m2).index_add_(0, y, norms)
    return counts, means, m2, unit_sums, norm_sums


def _buffer(x: torch.Tensor):
    """(numpy view, dtype name) of a CPU tensor; half and bfloat16 travel as their uint16 bits."""
    buf = x.view(torch.int16).numpy() if x.dtype in (torch.float16, torch.bfloat16) else x.numpy()
    return buf, str(x.dtype).replace("torch.", "")


def _cpp_block_moments(x: torch.Tensor, y: torch.Tensor, num_classes: int, unit_sums: bool, check_finite: bool):
    buf, dtype_name = _buffer(x)
    r = _C.block_moments(buf, dtype_name, y.contiguous().numpy(), num_classes, torch.get_num_threads(),
                         unit_sums=unit_sums)
    if check_finite and not r["finite"]:
        raise ValueError(NON_FINITE)
    return tuple(torch.from_numpy(r[k]) if k in r else None for k in ("counts", "means", "m2", "unit_sums", "norm_sums"))


def block_moments(x: torch.Tensor, y: torch.Tensor, num_classes: int, unit_sums: bool = True,
                  check_finite: bool = False):
    """Per-class (counts, means, m2, unit_sums, norm_sums) of one block of rows, float64.

    m2[c] = sum_{y_i=c} ||h_i - mu_c||^2 centred on the block's own class means. With
    ``unit_sums=False`` the last two are None (the C++ core and the Triton kernels then take no
    row norms). With ``check_finite``, NaN or Inf in the rows raises ValueError: it makes a
    class's centred M2 NaN or Inf, so the (C,) vector tells without a pass over the features (the
    C++ core checks it as it returns).
    """
    backend = backend_for(x)
    if backend == "cpp":
        return _cpp_block_moments(x, y, num_classes, unit_sums, check_finite)
    if backend == "triton":
        from .triton import moments

        stats = moments.block_moments(x, y, num_classes, unit_sums=unit_sums)
    else:
        stats = _torch_block_moments(x, y, num_classes)
        stats = stats if unit_sums else (*stats[:3], None, None)
    if check_finite and not bool(torch.isfinite(stats[2]).all()):
        raise ValueError(NON_FINITE)
    return stats


def centred_rows(x: torch.Tensor, y: torch.Tensor, means: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x_i - means[y_i] in float64, written into ``out`` (N, D) on the C++ path (a reused buffer
    avoids first-touch page faults, and on the Triton path): the rows whose Gram matrix is the
    within-class scatter."""
    backend = backend_for(x)
    if backend == "triton":
        from .triton import moments

        return moments.centre_rows(x, y, means, out=out)
    if backend == "cpp":
        buf, dtype_name = _buffer(x)
        _C.centre_rows(buf, dtype_name, y.contiguous().numpy(), means.contiguous().numpy(), out.numpy(),
                       torch.get_num_threads())
        return out
    return x.to(torch.float64) - means[y]
