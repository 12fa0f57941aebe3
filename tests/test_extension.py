"""ncfast._extension: which compiled core a portable wheel imports on which CPU."""

import pytest

import ncfast
from ncfast import _extension

ALL = [level for level, _ in _extension.LEVELS]
AVX2 = {"avx2": True, "fma": True, "bmi2": True}
AVX512 = dict(AVX2, avx512f=True, avx512bw=True, avx512dq=True, avx512vl=True, avx512cd=True)


def test_choose_takes_the_best_level_the_cpu_runs():
    assert _extension.choose(ALL, {}) == "x86_64"
    assert _extension.choose(ALL, AVX2) == "x86_64_v3"
    assert _extension.choose(ALL, AVX512) == "x86_64_v4"
    assert _extension.choose(ALL, dict(AVX512, avx512bf16=True)) == "x86_64_v4_bf16"
    # AVX-512 without AVX2's companions (a feature the OS does not save counts as missing) is not v4
    assert _extension.choose(ALL, dict(AVX512, bmi2=False)) == "x86_64"
    # only the levels the wheel has
    assert _extension.choose(["x86_64", "x86_64_v3"], dict(AVX512, avx512bf16=True)) == "x86_64_v3"


def test_choose_by_hand_refuses_what_cannot_run():
    assert _extension.choose(ALL, AVX512, "x86_64_v3") == "x86_64_v3"
    with pytest.raises(ValueError, match=r"NCFAST_ISA=x86_64_v4: this CPU lacks \['avx512f'"):
        _extension.choose(ALL, AVX2, "x86_64_v4")
    with pytest.raises(ValueError, match=r"NCFAST_ISA=x86_64_v9: this install has"):
        _extension.choose(ALL, AVX2, "x86_64_v9")
    with pytest.raises(ImportError, match="none of the compiled modules"):
        _extension.choose(["x86_64_v4"], AVX2)


def test_the_loaded_core_is_ncfast_C():
    import sys

    assert sys.modules["ncfast._C"] is ncfast._C
    level = ncfast._C_LEVEL
    assert level == "native" or level in ALL
    if level != "native":  # a portable wheel: the level this CPU was given
        assert level == _extension.choose(ALL, ncfast._C.cpu_features())


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86-64 CPU features")
def test_cpu_features_agree_with_proc_cpuinfo():
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(next(line for line in info.read_text().splitlines() if line.startswith("flags")).split(":")[1].split())
    got = ncfast._C.cpu_features()
    assert set(got) == {"avx2", "fma", "bmi2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512bf16"}
    for name, has in got.items():
        assert has == (name in flags), name
