"""The package's layering, read from its import statements: the formula modules reach kernels only
through the backend object they are given, and nothing imports a layer above it."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "ncfast"
FORMULAS = ("stats", "metrics", "pairwise", "ncc", "passes", "probe", "functional", "torchmetrics", "losses")
LAYERS = {  # module -> the ncfast modules it may import (leaf helpers are always allowed)
    "backends": {"_C", "backends", "triton"},
    "triton": {"triton"},
    "stats": {"backends"},
    "pairwise": {"backends", "stats"},
    "ncc": {"backends"},
    "metrics": {"backends", "pairwise", "stats"},
    "passes": {"backends", "metrics", "ncc", "stats"},
    "functional": {"backends", "metrics", "passes", "stats"},
    "probe": {"backends", "metrics", "passes", "stats"},
    "torchmetrics": {"metrics", "stats"},
    "losses": set(),
}
LEAVES = {"_numerics", "_validation", "_linalg", "_distributed"}


def _ncfast_imports(path: Path) -> set[str]:
    """The top-level ncfast modules a file imports (``ncfast.x``, ``.x``, ``..x``, ``from . import x``)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    package = list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "ncfast":
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                found.add(parts[0])
            else:  # from . import a, b
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ncfast" and "." in alias.name:
                    found.add(alias.name.split(".")[1])
    return found


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_go_down_the_layers(module):
    files = sorted((PACKAGE / module).glob("*.py")) if (PACKAGE / module).is_dir() else [PACKAGE / f"{module}.py"]
    assert files
    for path in files:
        extra = _ncfast_imports(path) - LAYERS[module] - LEAVES - {module}
        assert not extra, f"{path.relative_to(PACKAGE)} imports {sorted(extra)}"


@pytest.mark.parametrize("module", FORMULAS)
def test_formula_modules_reach_no_kernel_directly(module):
    path = PACKAGE / f"{module}.py"
    imports = _ncfast_imports(path)
    assert not imports & {"_C", "triton"}, f"{module}.py imports {sorted(imports & {'_C', 'triton'})}"
    tree = ast.parse(path.read_text())
    third_party = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names}
    third_party |= {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and not node.level and node.module}
    assert "triton" not in third_party, f"{module}.py imports triton"
