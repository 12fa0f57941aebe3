"""The package's layering, read from its import statements: every module of ncfast has its place,
the formula modules reach kernels only through the backend object they are given (never a backend
module itself), the float64 reference imports no ncfast code, and nothing imports a layer above it.
Imports are compared as full module paths: ``ncc -> backends.torch`` is not ``ncc -> backends``."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "ncfast"
FORMULAS = ("stats", "metrics", "pairwise", "ncc", "passes", "probe", "functional", "torchmetrics", "losses")
LEAVES = {"_numerics", "_validation", "_linalg", "_distributed"}
"""Helpers every module but the reference may import; they import no ncfast module themselves."""
_DRIVER = {
    "experiments._common",
    "train.data",
    "train.figures",
    "train.models",
    "train.probes",
    "train.trainer",
    "labels",
    "metrics",
    "stats",
    "functional",
}
LAYERS = {  # module -> the ncfast modules it may import, besides the leaves
    "ncfast": {
        "_extension",
        "functional",
        "labels",
        "losses",
        "metrics",
        "ncc",
        "pairwise",
        "probe",
        "reference",
        "stats",
        "torchmetrics",
    },
    **{leaf: set() for leaf in LEAVES},
    "reference": set(),
    "_extension": set(),  # finds and imports the compiled core (importlib), no ncfast module
    "backends": {"backends.base", "backends.cpp", "backends.torch", "backends.triton", "triton"},
    "backends.base": set(),
    "backends.cpp": {"_C", "backends.base", "backends.torch"},
    "backends.torch": {"backends.base"},
    "backends.triton": {"backends.base", "backends.torch", "triton.moments", "triton.ncc", "triton.pairwise"},
    "triton": set(),
    "triton.moments": set(),
    "triton.ncc": {"triton", "triton.moments"},
    "triton.pairwise": set(),
    "stats": {"backends"},
    "pairwise": {"backends", "stats"},
    "ncc": {"backends"},
    "metrics": {"backends", "pairwise", "stats"},
    "passes": {"backends", "metrics", "ncc", "stats"},
    "functional": {"backends", "metrics", "passes", "stats"},
    "probe": {"backends", "metrics", "passes", "stats"},
    "torchmetrics": {"metrics", "stats"},
    "losses": set(),
    "labels": set(),
    "measure": {"backends", "metrics", "passes"},
    "train": set(),
    "train.data": {"labels"},
    "train._files": set(),
    "train.figures": {"train._files"},
    "train.models": set(),
    "train.probes": set(),
    "train._faults": set(),
    "train.trainer": {
        "labels",
        "losses",
        "probe",
        "train._faults",
        "train._files",
        "train.data",
        "train.figures",
        "train.models",
        "train.probes",
    },
    "train.__main__": {"train.data", "train.models", "train.probes", "train.trainer"},
    "experiments": set(),
    "experiments._common": {"train.data", "train.trainer", "train.figures", "train._files"},
    "experiments._verdicts": set(),  # numpy only: the statistics of the verdicts
    **{f"experiments.{name}": _DRIVER for name in ("coarse", "gmm", "ncc_layers", "rank_collapse", "vci")},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "ncfast"


EXTENSIONS = {"_C"}
"""Compiled modules of the package (built beside it, not in the source tree)."""


def _is_module(parts: list[str]) -> bool:
    if ".".join(parts) in EXTENSIONS:
        return True
    target = PACKAGE.joinpath(*parts)
    return target.with_suffix(".py").exists() or (target / "__init__.py").exists()


def _ncfast_imports(path: Path, text: str | None = None) -> set[str]:
    """The ncfast modules a file (or ``text`` as if it were that file) imports, as full paths within
    the package (``backends.torch``): ``ncfast.x.y``, ``.x.y``, ``..x``, and ``from .x import y``
    where y is a submodule of x."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    package = list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "ncfast":
                parts = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                sub = parts + [alias.name]
                found.add(".".join(sub) if _is_module(sub) else ".".join(parts) or "ncfast")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ncfast":
                    found.add(".".join(alias.name.split(".")[1:]) or "ncfast")
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_its_place():
    assert sorted(set(MODULES) - set(LAYERS)) == [], "modules missing from LAYERS"
    assert sorted(set(LAYERS) - set(MODULES)) == [], "LAYERS names modules that do not exist"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    allowed = LAYERS[module] | ({module} if module == "ncfast" else set())
    if module != "reference":
        allowed |= LEAVES
    extra = _ncfast_imports(MODULES[module]) - allowed - {module}
    assert not extra, f"{MODULES[module].relative_to(PACKAGE)} imports {sorted(extra)}"


def test_the_reference_imports_no_ncfast_code():
    assert _ncfast_imports(MODULES["reference"]) == set()


def test_the_resolver_sees_submodules():
    """The check itself: ``from .backends.torch import f`` and ``from .backends import torch`` are
    imports of backends.torch, ``from .backends import Backend`` one of backends."""
    text = (
        "from .backends.torch import f\nfrom .backends import cpp\nfrom .backends import Backend\n"
        "from ncfast.triton import moments\nimport ncfast.stats\nfrom . import _C\n"
    )
    got = _ncfast_imports(PACKAGE / "ncc.py", text)
    assert got == {"backends.torch", "backends.cpp", "backends", "triton.moments", "stats", "_C"}


@pytest.mark.parametrize("module", FORMULAS)
def test_formula_modules_reach_no_kernel_directly(module):
    path = PACKAGE / f"{module}.py"
    imports = _ncfast_imports(path)
    kernels = {m for m in imports if m == "_C" or m.split(".")[0] == "triton" or m.startswith("backends.")}
    assert not kernels, f"{module}.py imports {sorted(kernels)}"
    tree = ast.parse(path.read_text())
    third_party = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    third_party |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and not node.level and node.module
    }
    assert "triton" not in third_party, f"{module}.py imports triton"
