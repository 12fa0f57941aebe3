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
    """The backends this machine runs (helpers.backend_names)."""
    return helpers.backend_names()


@pytest.fixture(scope="session")
def tolerance():
    """dtype -> (atol, rtol) of a value accumulated in that dtype (helpers.TOLERANCES)."""
    return helpers.TOLERANCES.__getitem__


def pytest_generate_tests(metafunc):
    """A test that takes ``backend_name`` runs once per backend this machine runs."""
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", helpers.backend_names())
