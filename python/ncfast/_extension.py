"""Which compiled core ``ncfast._C`` is.

A source install builds one module, ``_C``, for the machine it is built on. A portable wheel
(CMake's ``NCFAST_ISA_BUILDS``) carries one module per x86-64 level instead, ``_C_x86_64``,
``_C_x86_64_v3`` (AVX2, FMA), ``_C_x86_64_v4`` (AVX-512) and ``_C_x86_64_v4_bf16`` (AVX-512 with
AVX512-BF16), and ``load`` imports the best one this CPU runs, so that a wheel never executes an
instruction its CPU lacks. ``NCFAST_ISA=<level>`` picks one by hand (to time one level against
another); a level the CPU cannot run is refused.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

# Best first: (level, the cpu_features() flags it needs).
LEVELS = (
    (
        "x86_64_v4_bf16",
        ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512bf16", "avx2", "fma", "bmi2"),
    ),
    ("x86_64_v4", ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma", "bmi2")),
    ("x86_64_v3", ("avx2", "fma", "bmi2")),
    ("x86_64", ()),
)


def choose(available, features: dict, wanted: str | None = None) -> str:
    """The level to import: ``wanted`` (NCFAST_ISA) when given, else the best of ``available`` whose
    features the CPU has. ValueError naming NCFAST_ISA for a level not built or not runnable here."""
    runs = {level for level, needs in LEVELS if all(features.get(f, False) for f in needs)}
    if wanted:
        if wanted not in available:
            raise ValueError(f"NCFAST_ISA={wanted}: this install has {sorted(available)}")
        if wanted not in runs:
            raise ValueError(
                f"NCFAST_ISA={wanted}: this CPU lacks {[f for f in dict(LEVELS)[wanted] if not features.get(f, False)]}"
            )
        return wanted
    for level, _ in LEVELS:
        if level in available and level in runs:
            return level
    raise ImportError(f"ncfast: none of the compiled modules {sorted(available)} runs on this CPU")


def load(package: str) -> tuple[ModuleType, str]:
    """The compiled core and its level ("native" for a source install's single ``_C``)."""
    if importlib.util.find_spec(f"{package}._C") is not None:
        return importlib.import_module(f"{package}._C"), "native"
    available = [level for level, _ in LEVELS if importlib.util.find_spec(f"{package}._C_{level}") is not None]
    if "x86_64" not in available:
        raise ImportError(f"ncfast: no compiled core (_C or _C_x86_64) in {package}; reinstall ncfast")
    base = importlib.import_module(f"{package}._C_x86_64")
    level = choose(available, base.cpu_features(), os.environ.get("NCFAST_ISA") or None)
    return importlib.import_module(f"{package}._C_{level}"), level
