"""pytest's side of the shared test code (the helpers themselves are in helpers.py): Triton's
interpreter switched on before any kernel module is imported where no GPU is present, and fixtures
over the backend list and the tolerance table."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # before any Triton kernel module is imported: triton.jit reads it when a kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def backend_list() -> list[str]:
    """The backends this machine runs (helpers.BACKENDS): ["cpp", "torch"], plus "triton" where it runs."""
    return list(helpers.BACKENDS)


@pytest.fixture(params=helpers.BACKENDS)
def backend_name(request) -> str:
    """Each backend this machine runs in turn: a test that takes it runs once per backend."""
    return request.param


@pytest.fixture(scope="session")
def tolerance():
    """tolerance(dtype) -> (atol, rtol) of a kernel's float64 result from inputs of that dtype against
    the float64 reference; atol is relative to the reference's largest magnitude (helpers.TOLERANCES)."""
    return helpers.TOLERANCES.__getitem__
