"""Argument checks shared by every public entry point.

Each check raises before any state is touched, and names the offending argument,
as the bad-input contract of docs/metrics.md asks.
"""

from __future__ import annotations

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WEIGHTINGS = ("balanced", "sample")
NAN_POLICIES = ("raise", "omit")
NON_FINITE = "features: contains NaN or Inf (pass nan_policy='omit' to drop such rows)"


def as_tensor(x, name: str) -> torch.Tensor:
    """Torch tensors pass through; numpy arrays (and lists) are converted without a copy where possible."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    try:
        return torch.as_tensor(x)
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
        raise TypeError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}") from exc


def check_features(features, name: str = "features", *, allow_empty: bool = False) -> torch.Tensor:
    x = as_tensor(features, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape (N, D), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: D = 0 (features have no columns)")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name}: N = 0 (no rows)")
    return x


def check_labels(
    labels, n: int, device: torch.device, num_classes: int | None, name: str = "labels", *, values: bool = True
) -> tuple[torch.Tensor, int]:
    """Return (labels as int64, num_classes). num_classes=None means labels.max() + 1.

    ``values=False`` (with num_classes given) skips the pass that checks every label lies in
    [0, num_classes): for callers whose first use of the labels is the C++ moments kernel, which
    checks them itself before it writes anything and raises the same ValueError.
    """
    y = as_tensor(labels, name)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{name}: expected shape (N,), got {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"{name}: length {y.shape[0]} does not match features' N = {n}")
    if y.device != device:
        raise ValueError(f"{name}: on device {y.device}, but features are on {device}")
    y = y.to(torch.int64)
    if not values and num_classes is not None:
        num_classes = int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
        return y, num_classes
    if n:
        lo, hi = (int(v) for v in torch.aminmax(y))  # one read of the labels
        if lo < 0:
            raise ValueError(f"{name}: negative label {lo}")
    else:
        hi = -1
    if num_classes is None:
        if n == 0:
            raise ValueError("num_classes: must be given when there are no labels")
        num_classes = hi + 1
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
    if hi >= num_classes:
        raise ValueError(f"{name}: label {hi} out of range [0, {num_classes})")
    return y, num_classes


def available_bytes(device) -> int | None:
    """Memory free for new allocations on ``device``: MemAvailable of /proc/meminfo for the host,
    the free memory of a CUDA device; None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no verdict rather than a failure
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_state_fits(
    num_classes: int,
    dim: int,
    device,
    vectors: int = 2,
    *,
    what: str = "num_classes",
    source: str = " (the given num_classes, or the largest label + 1)",
    remedy: str = "pass the true num_classes",
) -> None:
    """Refuse, before anything is allocated by it, a number of classes (given, or the largest label
    + 1) whose per-class statistics (``vectors`` float64 vectors of ``dim`` per class: the means and
    the unit-vector sums) alone exceed the memory free on ``device``: a single stray label of 2^40
    would otherwise end in an allocator's traceback, or take the machine's memory first. ``what``
    leads the message (the argument, flag or file that set the count), ``source`` says where the
    count came from and ``remedy`` what to pass instead."""
    need = int(num_classes) * int(dim) * 8 * vectors
    free = available_bytes(device)
    if free is not None and need > free:
        raise ValueError(
            f"{what}: {num_classes} classes{source} x {dim} features need {need / 2**30:.1f} GiB for "
            f"their statistics, more than the {free / 2**30:.1f} GiB free on {torch.device(device)}; "
            f"{remedy}, or relabel the classes 0..C-1"
        )


def check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_same_device(ref: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if other.device != ref.device:
        raise ValueError(f"{name}: on device {other.device}, but features are on {ref.device}")


def check_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """t, or a ValueError naming it when it holds NaN or Inf (a classifier's weight and bias, logits:
    one non-finite entry would decide an argmax)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return t


def check_bias(bias, num_classes: int, ref: torch.Tensor) -> torch.Tensor:
    """A finite floating classifier bias of shape (num_classes,) on the features' device."""
    b = as_tensor(bias, "bias")
    if not b.dtype.is_floating_point:
        raise TypeError(f"bias: expected a floating dtype, got {b.dtype}")
    if b.shape != (num_classes,):
        raise ValueError(f"bias: expected shape ({num_classes},), got {tuple(b.shape)}")
    check_same_device(ref, b, "bias")
    return check_finite(b, "bias")


MAGNITUDE_FLOOR = 2.0**-480
"""float64 features whose largest |x| is below this are refused: the class statistics' squared
deviations would fall below float64's normal range (2^-1022) and lose their digits."""


def magnitude_error(x: torch.Tensor) -> str:
    top = float(x.abs().max())
    side = "large" if top >= 1.0 else "small"
    return (
        f"features: finite, but too {side} in magnitude for the float64 class statistics (largest |x| = "
        f"{top:.3g}): their sums of squares need |x| below about 2^500 (3e150), and the largest |x| above "
        f"2^-480 (3e-145). Scale the features by a power of two: the metrics are scale-free but "
        f"feature_norm and the per-class variances and distances"
    )


def check_magnitude(x: torch.Tensor, means: torch.Tensor, m2: torch.Tensor) -> None:
    """A float64 block whose class statistics left float64's range raises ValueError
    (``magnitude_error``): sums of squares that overflowed (``m2`` not finite though ``x`` is), or
    every |x| below MAGNITUDE_FLOOR. Lower precisions always fit: their squares are far inside
    float64's range. Costs a pass over the C x D statistics, and over ``x`` only when every class mean
    is below the floor."""
    if x.dtype != torch.float64 or x.numel() == 0:
        return
    if not bool(torch.isfinite(m2).all()):
        raise ValueError(magnitude_error(x))
    if float(means.abs().max()) < MAGNITUDE_FLOOR and 0.0 < float(x.abs().max()) < MAGNITUDE_FLOOR:
        raise ValueError(magnitude_error(x))


def omit_non_finite(x: torch.Tensor, y: torch.Tensor):
    """nan_policy="omit": (x, y without the rows holding NaN or Inf, mask of the rows kept, number
    omitted)."""
    keep = finite_rows(x)
    omitted = int((~keep).sum())
    return (x[keep], y[keep], keep, omitted) if omitted else (x, y, keep, 0)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Mask of rows without NaN or Inf.

    A float64 row sum is non-finite exactly when the row holds NaN or Inf for half and float32
    input (it cannot overflow), and costs one read instead of an N x D boolean tensor.
    """
    if x.dtype == torch.float64:
        return torch.isfinite(x).all(dim=1)
    return torch.isfinite(x.sum(dim=1, dtype=torch.float64))


def check_superclass(superclass, num_classes: int, device) -> torch.Tensor:
    s = as_tensor(superclass, "superclass")
    if s.dtype.is_floating_point:
        raise TypeError(f"superclass: expected an integer dtype, got {s.dtype}")
    if s.shape != (num_classes,):
        raise ValueError(
            f"superclass: expected shape ({num_classes},) mapping class -> super-class, got {tuple(s.shape)}"
        )
    return s.to(device=device, dtype=torch.int64)


def check_per_class(value, name: str, num_classes: int, dim: int, device, *, finite: bool = False) -> torch.Tensor:
    """A floating (num_classes, dim) matrix on ``device``, one row per class (a classifier's
    weight, class means); errors name the argument. ``finite``: NaN or Inf is an error (a weight;
    class means may hold NaN rows for absent classes)."""
    m = as_tensor(value, name)
    if not m.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {m.dtype}")
    if m.shape != (num_classes, dim):
        raise ValueError(f"{name}: expected shape ({num_classes}, {dim}) (classes x features), got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"{name}: on device {m.device}, but the features are on {device}")
    return check_finite(m, name) if finite else m
