"""The benchmark harness runs end to end (tiny sizes): every op, its checks against the baselines,
the floors and the JSON. Nothing here is timed or asserted on speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import run as bench  # noqa: E402


def test_harness_runs_every_op_and_writes_floors(tmp_path, monkeypatch, capsys):
    tiny = {op: [(600, 16, 6)] for op in bench.OPS}
    tiny["class_pair_stats"] = [(600, 16, 60)]
    monkeypatch.setitem(bench.PRESETS, "quick", tiny)
    out = tmp_path / "r.json"
    bench.main(["--sizes", "quick", "--repeat", "1", "--warmup", "0", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["header"]["peak_GFLOPs"]["fp32"] > 0 and data["header"]["peak_GFLOPs"]["fp64"] > 0
    ours = [r for r in data["records"] if r["provider"] == "ncfast"]
    assert sorted({r["op"] for r in ours}) == sorted(bench.OPS)
    for r in ours:
        assert r["floor_ms"] > 0 and r["of_floor"] > 0
    for r in data["records"]:
        if r["provider"] != "ncfast" and r["op"].startswith("ncc_assign") and r["agree"] is not None:
            assert 0.9 <= r["agree"] <= 1.0
    text = capsys.readouterr().out
    assert "ncfast against the floors" in text


def test_cost_rows_run_and_report_ratios(tmp_path, monkeypatch, capsys):
    """--ops probe,dxd at tiny sizes: every case's ratio to its floor is written and printed; the
    train split's features were cached."""
    import costs

    monkeypatch.setitem(costs.PRESETS, "quick", {"probe": [40], "dxd": [(30, 24)]})
    monkeypatch.setattr(costs, "BATCH", 16)
    out = tmp_path / "c.json"
    bench.main(["--ops", "probe,dxd", "--sizes", "quick", "--repeat", "1", "--warmup", "0", "--json", str(out)])
    rows = json.loads(out.read_text())["header"]["costs"]
    assert [(r["op"], r["case"]) for r in rows] == [
        ("probe", "train"),
        ("probe", "train, uncached"),
        ("probe", "held-out"),
        ("dxd", "nc_metrics"),
    ]
    for r in rows:
        assert r["ncfast_s"] > 0 and r["floor_s"] > 0 and r["ratio"] == r["ncfast_s"] / r["floor_s"]
        assert r["ratio_of_min"] == r["ncfast_min_s"] / r["floor_min_s"]
        assert r["ratio_paired"] == r["ratio"]  # one turn: its own ratio
    assert rows[0]["cached_layers"] == costs.PROBE_LAYERS
    assert rows[3]["floor_s"] == rows[3]["xtx_s"] + rows[3]["eigvalsh_s"]
    assert "What measuring costs" in capsys.readouterr().out


def test_moments_bandwidth_script_runs(capsys):
    """bench/moments_bandwidth.py at a tiny size: one line per C, both timings and ratios printed."""
    import moments_bandwidth

    assert (
        moments_bandwidth.main(
            ["--rows", "300", "--dim", "8", "--classes", "3,70", "--repeat", "1", "--before", "baseline"]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in lines[2:]]
    assert [r[0] for r in rows] == ["3", "70"]
    for r in rows:
        assert len(r) == 10 and all(float(v) > 0 for v in (r[1], r[2], r[4], r[6], r[8]))


ROOT = Path(__file__).resolve().parents[1]


def test_sm90_compile_report_runs():
    """bench/sm90_compile.py --only moments compiles the moments kernels for sm_90 without a GPU
    (Triton's own ptxas and cuobjdump): a row per kernel with registers, float64 FMAs, 16-byte
    loads and no spills."""
    pytest.importorskip("triton")
    r = subprocess.run(
        [sys.executable, "bench/sm90_compile.py", "--only", "moments"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    head = next(ln for ln in lines if ln.startswith("kernel")).split()[1:]
    rows = {}
    for ln in lines:
        if ln.startswith("_chunk_moments_kernel") or ln.startswith("_merge_chunks_kernel"):
            parts = ln.split()
            rows.setdefault(parts[0], []).append(dict(zip(head, map(int, parts[-len(head) :]))))
    assert len(rows["_chunk_moments_kernel"]) == 3 and len(rows["_merge_chunks_kernel"]) == 3
    for row in rows["_chunk_moments_kernel"]:
        assert 0 < row["regs"] <= 255 and row["DFMA"] > 0 and row["LDG.128"] > 0
        assert row["stack"] == 0 and row["LDL"] == 0


def test_gpu_tune_smoke_runs(tmp_path):
    """bench/gpu_tune.py --smoke (CPU tensors, Triton's interpreter) runs its nc_metrics part and
    writes the ceilings and one timing per part of nc_metrics."""
    pytest.importorskip("triton")
    out = tmp_path / "tune.json"
    r = subprocess.run(
        [sys.executable, "bench/gpu_tune.py", "--smoke", "--only", "metrics", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["header"]["copy_GBps"] > 0 and data["header"]["mm_fp64_TFLOPs"] > 0
    parts = [row["what"] for row in data["rows"]]
    assert parts[0] == "nc_metrics" and len(parts) == 7
    assert all(row["ms"] > 0 for row in data["rows"])


@pytest.mark.parametrize("what", ["metrics", "stream", "ncc", "solver"])
def test_fuzz_reference_finds_nothing_on_its_first_cases(what):
    """bench/fuzz_reference.py runs, and its first seeded cases of each kind agree with the reference
    (each draws dtypes, absent classes, NaN rows, the collapse regime, ties, midpoints; solver: dead
    units, copied columns, low rank, clustered eigenvalues, here with D <= 512)."""
    small = ["--max-dim", "512"] if what == "solver" else []
    r = subprocess.run(
        [sys.executable, "bench/fuzz_reference.py", "--what", what, "--cases", "25", "--seed", "7", *small],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert r.stdout.strip().endswith("25 cases, 0 with a finding")
