"""What the tests share: small seeded data with every awkward case docs/metrics.md names, float64
comparisons, the backends this machine runs and the tolerance of a result computed in each dtype.
Tests import these from here; conftest.py holds pytest's fixtures over them."""

import math

import numpy as np
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the Triton tests run their kernels: a GPU, else CPU tensors in Triton's interpreter
(conftest.py sets TRITON_INTERPRET=1 before any kernel module is imported)."""


def backend_names() -> list[str]:
    """The backends this machine runs: cpp and torch, and triton on DEVICE where it runs there."""
    from ncfast import backends

    return ["cpp", "torch"] + (["triton"] if backends.triton_runs_on(torch.zeros(1, device=DEVICE)) else [])


BACKENDS = backend_names()
"""backend_names() once, for pytest.mark.parametrize / skipif at collection; conftest.py's
backend_name and backend_list fixtures are built from it."""

TOLERANCES = {dtype: (1e-12, 1e-12) for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
"""dtype -> (atol, rtol) of a kernel's float64 result from inputs of that dtype against the float64
reference of the same (already rounded) inputs; atol is relative to the reference's largest
magnitude (the floor for entries that cancel to near zero): atol * max|want| + rtol * |want|.
Every kernel (C++, torch, Triton) widens its input exactly and accumulates in float64, so the rounding
of a float32 / float16 / bfloat16 input is no error and the rows are equal: 1e-12, the tightest that
the per-dtype kernel tests used (test_cpp's centred scatter, test_backends' means and norm sums)."""


def make_data(n=600, d=12, c=5, *, seed=0, imbalanced=False, absent=(), spread=1.0, shift=0.0, dtype=torch.float32):
    """Gaussian classes around random means; returns (features, labels, num_classes).

    imbalanced: class c gets weight proportional to (c + 1); absent: classes with no sample;
    spread: within-class std relative to the spacing of the means; shift: added to every feature.
    """
    g = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, c + 1, dtype=torch.float64) if imbalanced else torch.ones(c, dtype=torch.float64)
    for a in absent:
        probs[a] = 0
    present = [k for k in range(c) if k not in absent]
    # every present class gets at least 2 samples, the rest drawn from probs
    base = torch.tensor(present * 2)
    rest = torch.multinomial(probs, n - base.numel(), replacement=True, generator=g)
    y = torch.cat([base, rest])[torch.randperm(n, generator=g)]
    means = torch.randn(c, d, generator=g, dtype=torch.float64) * math.sqrt(1.0 / d) * 4
    x = means[y] + spread * torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return (x + shift).to(dtype), y, c


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    denom = np.maximum(np.abs(b), 1e-300)
    err = np.where(both_nan, 0.0, np.abs(a - b) / denom)
    return float(np.max(err)) if err.size else 0.0


def assert_close(a, b, rtol, atol=0.0, what=""):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    assert (nan_a == nan_b).all(), f"{what}: NaN pattern differs"
    ok = np.abs(a - b) <= atol + rtol * np.abs(b)
    ok |= nan_a
    assert ok.all(), f"{what}: max rel err {rel_err(a, b):.3e} (got {a[~ok][:3]}, want {b[~ok][:3]})"
