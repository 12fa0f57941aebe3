"""The benchmark harness runs end to end (tiny sizes): every op, its checks against the baselines,
the floors and the JSON. Nothing here is timed or asserted on speed."""
import json
import sys
from pathlib import Path


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


def test_moments_bandwidth_script_runs(capsys):
    """bench/moments_bandwidth.py at a tiny size: one line per C, both timings and ratios printed."""
    import moments_bandwidth

    assert moments_bandwidth.main(["--rows", "300", "--dim", "8", "--classes", "3,70", "--repeat", "1",
                                   "--before", "baseline"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in lines[2:]]
    assert [r[0] for r in rows] == ["3", "70"]
    for r in rows:
        assert len(r) == 10 and all(float(v) > 0 for v in (r[1], r[2], r[4], r[6], r[8]))
