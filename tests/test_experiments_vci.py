"""The paper-004 driver (python -m ncfast.experiments.vci): its pure functions on hand-made inputs,
and one --quick run end to end whose numbers are checked against ncfast.reference and against
what report.md says."""

import argparse
import json
import math
import re

import numpy as np
import pytest

from ncfast import reference
from ncfast.experiments import _common, vci
from ncfast.labels import superclass_map

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out


def _blobs(n_per=40, d=6, c=4, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((c, d)) * 2
    y = np.repeat(np.arange(c), n_per)
    h = means[y] + spread * rng.standard_normal((y.size, d)) * rng.uniform(0.5, 2.0, size=d)
    return h, y, c


def _projector_on_span_b(h, y, c):
    sb = reference.between_class_covariance(h, y, c)
    lam, v = np.linalg.eigh(sb)
    kept = v[:, lam > reference.DEFAULT_RTOL * lam.max()]
    return kept @ kept.T


# ------------------------------------------------------------------------------ span_split
def test_span_split_matches_brute_force():
    h, y, c = _blobs()
    got = vci.span_split(h, y, c)
    sw = reference.within_class_covariance(h, y, c)
    p = _projector_on_span_b(h, y, c)
    inside = np.trace(p @ sw)
    outside = np.trace((np.eye(h.shape[1]) - p) @ sw)
    assert got["rank_b"] == c - 1
    assert got["inside"] == pytest.approx(inside, rel=1e-12)
    assert got["outside"] == pytest.approx(outside, rel=1e-12)
    assert got["total"] == pytest.approx(np.trace(sw), rel=1e-12)
    assert got["share_inside"] == pytest.approx(inside / np.trace(sw), rel=1e-12)


def test_span_split_imbalanced_uses_balanced_weighting():
    h, y, c = _blobs(n_per=30)
    keep = np.ones(y.size, bool)
    keep[np.flatnonzero(y == 0)[:20]] = False  # class 0 keeps 10 samples, the others 30
    h, y = h[keep], y[keep]
    got = vci.span_split(h, y, c)
    sw = reference.within_class_covariance(h, y, c, weighting="balanced")
    assert got["total"] == pytest.approx(np.trace(sw), rel=1e-12)
    assert got["inside"] == pytest.approx(np.trace(_projector_on_span_b(h, y, c) @ sw), rel=1e-12)


def test_span_split_edge_cases():
    # within-class spread only along the line of the two class means: all of Sigma_W inside
    y = np.array([0, 0, 1, 1])
    h = np.array([[0.0, 0, 0], [0.5, 0, 0], [3.0, 0, 0], [3.5, 0, 0]])
    got = vci.span_split(h, y, 2)
    assert got["rank_b"] == 1 and got["share_inside"] == pytest.approx(1.0) and got["outside"] == pytest.approx(0.0)
    # spread only orthogonal to it: all outside
    h = np.array([[0.0, 1, 0], [0.0, -1, 0], [3.0, 0, 1], [3.0, 0, -1]])
    got = vci.span_split(h, y, 2)
    assert got["share_inside"] == pytest.approx(0.0, abs=1e-15) and got["outside"] == pytest.approx(1.0)
    # an absent class is left out; one present class is an error naming the labels
    got3 = vci.span_split(h, y, 5)
    assert got3["outside"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels"):
        vci.span_split(h[:2], y[:2], 2)


# ------------------------------------------------------------------------------ transforms / invariance
def test_transforms_shapes_and_maps():
    h, y, c = _blobs(d=8)
    t = vci.transforms(h, y, c, seed=3)
    assert set(t) == set(vci.TRANSFORMS)
    for name in ("invertible", "block", "orthogonal"):
        a = np.linalg.lstsq(h, t[name], rcond=None)[0].T  # recover the map from H A^T
        s = np.linalg.svd(a, compute_uv=False)
        if name == "orthogonal":
            assert np.allclose(s, 1.0)
        elif name == "invertible":
            assert s.max() / s.min() == pytest.approx(10.0, rel=1e-6)
    # the block map keeps span(Sigma_B) (and so its complement) in place
    p = _projector_on_span_b(h, y, c)
    a = np.linalg.lstsq(h, t["block"], rcond=None)[0].T
    assert np.allclose(a @ p, p @ a @ p, atol=1e-10)
    assert np.allclose(t["isotropic"], 3.7 * h)
    ratio = t["per-sample"] / h
    assert np.allclose(ratio, ratio[:, :1]) and ratio.min() >= 0.5 - 1e-12 and ratio.max() <= 2.0 + 1e-12
    # seeded
    assert np.array_equal(vci.transforms(h, y, c, seed=3)["invertible"], t["invertible"])


def test_invariance_matches_reference_on_synthetic_features():
    h, y, c = _blobs(d=8)
    inv = vci.invariance(h, y, c, seed=1)
    t = vci.transforms(h, y, c, seed=1)
    for name, feats in t.items():
        assert inv["transformed"][name]["vci"] == pytest.approx(reference.vci(feats, y, c), rel=1e-9, abs=1e-12)
        assert inv["transformed"][name]["squared_distance"] == pytest.approx(
            reference.squared_distance(feats, y, c), rel=1e-9
        )
    verdicts = vci.invariance_verdicts(inv["change"])
    assert all(v["holds"] for v in verdicts.values()), verdicts


def test_invariance_verdicts_on_hand_made_changes():
    ok = {t: {k: (1e-15 if vci.EXPECTED[k][t] else 0.5) for k in vci.METRICS} for t in vci.TRANSFORMS}
    v = vci.invariance_verdicts(ok)
    assert all(x["holds"] is True and x["failed"] == [] for x in v.values())
    assert v["vci"]["max_same"] == 1e-15 and v["vci"]["min_changed"] is None
    bad = json.loads(json.dumps(ok))
    bad["invertible"]["vci"] = 1e-6  # above rounding: not invariant
    bad["invertible"]["fuzziness"] = 1e-5  # below CHANGE_TOL: no visible change
    v = vci.invariance_verdicts(bad)
    assert v["vci"]["holds"] is False and v["vci"]["failed"] == ["invertible"]
    assert v["fuzziness"]["holds"] is False and v["fuzziness"]["failed"] == ["invertible"]
    assert v["squared_distance"]["holds"] is True
    nan = json.loads(json.dumps(ok))
    nan["orthogonal"]["cosine_separation"] = float("nan")
    assert vci.invariance_verdicts(nan)["cosine_separation"]["holds"] is None
    # boundaries: exactly the tolerances count as invariant / changed
    edge = json.loads(json.dumps(ok))
    edge["block"]["vci"] = vci.SAME_TOL
    edge["invertible"]["squared_distance"] = vci.CHANGE_TOL
    v = vci.invariance_verdicts(edge)
    assert v["vci"]["holds"] and v["squared_distance"]["holds"]


def test_relative_change():
    assert vci.relative_change(2.0, 1.0) == 1.0
    assert vci.relative_change(0.0, 0.0) == 0.0
    assert vci.relative_change(1.0, 0.0) == math.inf
    assert math.isnan(vci.relative_change(float("nan"), 1.0))


# ------------------------------------------------------------------------------ trends and correlations
def test_collapse_trend():
    t = vci.collapse_trend([1, 2, 3, 4], [0.9, 0.7, 0.6, 0.2])
    assert t["rho"] == pytest.approx(-1.0) and t["collapses"] and t["consistent"]
    assert (t["first"], t["last"], t["epochs"]) == (0.9, 0.2, [1, 4])
    # cosine separation: larger = more collapse
    t = vci.collapse_trend([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], sign=-1)
    assert t["rho"] == pytest.approx(-1.0) and t["collapses"]
    # down, then back up above the start: no collapse, no consistent trend
    t = vci.collapse_trend([1, 2, 3, 4, 5], [1.0, 0.5, 0.6, 0.9, 1.1])
    assert not t["collapses"] and not t["consistent"]
    # a weak downward trend collapses but is not consistent
    t = vci.collapse_trend([1, 2, 3, 4, 5], [1.0, 0.6, 0.9, 0.5, 0.8])
    assert t["collapses"] and not t["consistent"] and t["rho"] > -vci.CONSISTENT_RHO
    # NaN left out; too few points: undecided
    t = vci.collapse_trend([1, 2, 3], [1.0, float("nan"), 0.5])
    assert t["collapses"] is None and t["consistent"] is None and math.isnan(t["rho"])


def test_pearson_and_spearman():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(9), rng.standard_normal(9)
    assert vci.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    from scipy.stats import spearmanr

    y[3] = y[5]  # a tie
    assert _common.spearman(x, y)[0] == pytest.approx(spearmanr(x, y)[0], rel=1e-12)
    assert math.isnan(vci.pearson([1, 2, 3], [4, 4, 4]))
    assert math.isnan(vci.pearson([1, 2], [3, 4]))
    assert vci.pearson([1, 2, 3, float("nan")], [1, 2, 3, 7]) == pytest.approx(1.0)


def test_logit_and_mlog():
    assert vci.logit(0.5, 100) == 0.0
    assert vci.logit(1.0, 100) == pytest.approx(math.log(199.0))  # clipped to 1 - 1/200
    assert vci.logit(0.0, 100) == pytest.approx(-math.log(199.0))
    acc = {"a": 0.9, "b": 0.6}
    want = (math.log(9) + math.log(1.5)) / 2 - math.log(0.8 / 0.2)
    assert vci.mlog(acc, 0.8, {"a": 1000, "b": 1000}, 1000) == pytest.approx(want)
    with pytest.raises(ValueError, match="task_accuracies"):
        vci.mlog({}, 0.8, {}, 10)


def test_transfer_correlations_are_oriented():
    rows = [
        {"mlog": m, "metrics": {"fuzziness": f, "squared_distance": -f, "cosine_separation": -f, "vci": f}}
        for m, f in ((0.1, 1.0), (0.2, 2.0), (0.35, 3.0))
    ]
    c = vci.transfer_correlations(rows)
    assert c["fuzziness"] == pytest.approx(np.corrcoef([1, 2, 3], [0.1, 0.2, 0.35])[0, 1])
    assert c["squared_distance"] == pytest.approx(-c["fuzziness"])
    assert c["cosine_separation"] == pytest.approx(c["fuzziness"])  # larger cosine = more collapse: flipped
    # a run that did not fit its pretraining task is left out
    outlier = {"mlog": 5.0, "fitted": False, "metrics": {k: 100.0 for k in vci.METRICS}}
    assert vci.transfer_correlations(rows + [outlier]) == pytest.approx(c)
    assert all(math.isnan(v) for v in vci.transfer_correlations(rows[:2] + [outlier]).values())
    assert vci.most_correlated({"a": 0.1, "b": 0.9}) == "b"
    assert vci.most_correlated({"a": 0.1, "b": float("nan")}) is None


def test_paper_correlations_from_table_2():
    pc = vci.paper_correlations()
    t = pc["temperature"]
    # Fig. 7 top row: every metric says less collapse goes with better transfer
    assert all(t[k] > 0.98 for k in vci.METRICS)
    assert t["vci"] == pytest.approx(0.995, abs=1e-3)
    # bottom row: the three older metrics flip sign, VCI stays positive
    r = pc["regularizer"]
    assert r["vci"] > 0.9 and all(r[k] < 0 for k in ("fuzziness", "squared_distance", "cosine_separation"))
    assert vci.most_correlated(pc["all"]) == "vci"


def test_downstream_tasks_and_superclass_map():
    y = np.arange(10).repeat(3)
    sup = superclass_map(y, y % 5, 10)
    assert sup.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    tasks = vci.downstream_tasks(y, sup)
    assert np.array_equal(tasks["fine"], y)
    assert np.array_equal(tasks["within"], y // 5)  # 0-4 vs 5-9
    assert np.array_equal(tasks["blocks"], y // 2)  # {0,1}, {2,3}, ...
    # an irregular map (CIFAR-100's official super-classes are not consecutive)
    sup = np.array([1, 0, 1, 0, 1, 0])
    t = vci.downstream_tasks(np.arange(6), sup)
    assert t["within"].tolist() == [0, 0, 1, 1, 2, 2] and t["blocks"].tolist() == [0, 0, 0, 1, 1, 1]
    # a class never seen: -1; a class split over two training labels: an error
    assert superclass_map(np.array([0, 2]), np.array([0, 1]), 3).tolist() == [0, -1, 1]
    with pytest.raises(ValueError, match="labels"):
        superclass_map(np.array([0, 0]), np.array([0, 1]), 1)


def _claims_for(corr):
    trend = {"rho": -1.0, "first": 1.0, "last": 0.5, "epochs": [1, 4], "collapses": True, "consistent": True}
    flat = {"rho": 0.2, "first": 1.0, "last": 1.1, "epochs": [1, 4], "collapses": False, "consistent": False}
    trends = {
        s: {"vci": trend, "fuzziness": trend, "squared_distance": flat, "cosine_separation": flat}
        for s in ("train", "test")
    }
    span = {
        s: {"inside": dict(trend), "outside": {**flat, "first": 0.1, "last": 0.3}, "share_inside": dict(trend)}
        for s in ("train", "test")
    }
    change = {t: {k: (1e-15 if vci.EXPECTED[k][t] else 0.5) for k in vci.METRICS} for t in vci.TRANSFORMS}
    inv = {
        "change": change,
        "original": {**{k: 1.0 for k in vci.METRICS}, "degenerate": []},
        "verdicts": vci.invariance_verdicts(change),
    }
    results = {
        "training": {"trends": trends, "span_trends": span},
        "invariance": inv,
        "transfer": {"correlations": corr, "paper_correlations": vci.paper_correlations()},
    }
    return {c.claim: c.holds for c in vci.claims(results)}


def test_claim_verdicts_follow_the_numbers():
    claims = _claims_for({"fuzziness": 0.5, "squared_distance": 0.6, "cosine_separation": 0.7, "vci": 0.9})
    assert len(claims) == 13
    assert all(claims.values()), claims
    claims = _claims_for({"fuzziness": 0.95, "squared_distance": -0.6, "cosine_separation": 0.7, "vci": 0.9})
    assert claims["VCI correlates with transfer more than the other metrics"] is False
    assert claims["VCI correlates positively with transfer (MLOG)"] is True
    key = next(k for k in claims if k.startswith("temperature sweep"))
    assert claims[key] is False
    claims = _claims_for({"fuzziness": 0.5, "squared_distance": 0.6, "cosine_separation": 0.7, "vci": float("nan")})
    assert claims["VCI correlates positively with transfer (MLOG)"] is None
    assert claims["VCI correlates with transfer more than the other metrics"] is None


def test_number_format():
    """_common.compact: .3g (or the digits given), .1e for values >= 1e4 or below 1e-3 in size, n/a when missing."""
    assert _common.compact(float("nan")) == _common.MISSING == "n/a" and _common.compact(None) == "n/a"
    assert (
        _common.compact(3e-15) == "3.0e-15"
        and _common.compact(0.12345) == "0.123"
        and _common.compact(0.12345, 2) == "0.12"
    )
    assert _common.compact(12345.0) == "1.2e+04" and _common.compact(0.0) == "0" and _common.compact(7) == "7"
    assert _common.number(0.99956, ".3f") == "1.000" and _common.number(float("nan"), ".3f") == "n/a"


def test_logit_scales_flag():
    assert vci._scales("3,1,0.3") == (3.0, 1.0, 0.3)  # kept in the order given
    for bad in ("1,2", "1,x,3", "1,-2,3", "1,1,3", "1,inf,3"):
        with pytest.raises(argparse.ArgumentTypeError):
            vci._scales(bad)


# ------------------------------------------------------------------------------ command line
@pytest.mark.parametrize(
    "args, name",
    [
        (["--quick", "--epochs", "0"], "--epochs"),
        (["--quick", "--metrics-every", "0"], "--metrics-every"),
        (["--quick", "--width", "0"], "--width"),
        (["--quick", "--logit-scales", "1,2"], "--logit-scales"),
        (["--quick", "--logit-scales", "1,x,3"], "--logit-scales"),
        (["--quick", "--logit-scales", "1,-2,3"], "--logit-scales"),
        (["--quick", "--transfer-epochs", "-1"], "--transfer-epochs"),
        (["--quick", "--transfer-seeds", "0"], "--transfer-seeds"),
        (["--preset", "cifar10"], "--data"),
        (["--quick", "--preset", "cifar10"], "--quick"),
    ],
)
def test_bad_arguments_are_named(tmp_path, capsys, args, name):
    try:  # argparse refuses a bad flag value with SystemExit(2), the driver a bad setting with status 2
        status = vci.main(["--out", str(tmp_path / "o"), *args])
    except SystemExit as e:
        status = e.code
    assert status == 2
    assert name in capsys.readouterr().err
    assert not (tmp_path / "o" / "train").exists()  # nothing trained


# ------------------------------------------------------------------------------ --quick end to end
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("vci") / "run"
    assert vci.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def _report_rows(text):
    """The cells of report.md's claim table (the rows under its header and separator)."""
    lines = text.splitlines()
    start = lines.index("| claim | paper | ours | verdict |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_quick_writes_everything(quick):
    out, res = quick
    import matplotlib.image as mpimg

    for name in ("vci_metrics.png", "vci_span.png", "vci_invariance.png", "vci_transfer.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
        assert f"]({name})" in (out / "report.md").read_text()
    assert (out / "train" / "metrics.jsonl").exists() and (out / "train" / "history.jsonl").exists()
    assert len(res["transfer"]["rows"]) == len(vci.QUICK["logit_scales"])
    for scale in vci.QUICK["logit_scales"]:
        assert (out / "transfer" / f"T{scale:g}_s0" / "summary.json").exists()
    curve = res["training"]["curves"]["train"]
    assert curve["epoch"] == list(range(vci.QUICK["epochs"] + 1))
    assert all(0 <= v <= 1 for v in curve["vci"])


def test_quick_report_agrees_with_results(quick):
    out, res = quick
    rows = _report_rows((out / "report.md").read_text())
    claims = res["report"]["claims"]
    assert len(rows) == len(claims) == 13
    for row, c in zip(rows, claims):
        assert row[0].replace("\\|", "|") == c["claim"] and row[3] == c["verdict"]
    by = {c["claim"]: c["verdict"] for c in claims}

    def word(holds):
        return "not measured" if holds is None else ("holds" if holds else "does not hold")

    # the verdicts recomputed from the JSON numbers
    inv = res["invariance"]
    for k in vci.METRICS:
        same = [inv["change"][t][k] for t in vci.TRANSFORMS if vci.EXPECTED[k][t]]
        changed = [inv["change"][t][k] for t in vci.TRANSFORMS if vci.EXPECTED[k][t] is False]
        holds = max(same) <= inv["same_tol"] and min(changed or [1.0]) >= inv["change_tol"]
        assert inv["verdicts"][k]["holds"] == holds
    assert by["VCI is invariant to invertible linear maps"] == word(inv["verdicts"]["vci"]["holds"])
    corr = res["transfer"]["correlations"]
    assert by["VCI correlates positively with transfer (MLOG)"] == word(corr["vci"] > 0)
    best = max(corr, key=corr.get)
    assert by["VCI correlates with transfer more than the other metrics"] == word(best == "vci")
    key = next(k for k in by if k.startswith("temperature sweep"))
    assert by[key] == word(all(v > 0 for v in corr.values()))
    t = res["training"]["trends"]["train"]["vci"]
    assert by["VCI decreases over training (train)"] == word(t["collapses"])
    span, st = res["training"]["span"]["train"], res["training"]["span_trends"]["train"]
    key = next(k for k in by if k.startswith("Tr(P_B Σ_W) shrinks"))
    assert by[key] == word(st["inside"]["rho"] < 0 and st["outside"]["rho"] > 0)
    share = [v for e, v in zip(span["epoch"], span["share_inside"]) if e >= 1]
    assert st["share_inside"]["rho"] == pytest.approx(_common.spearman(range(len(share)), share)[0])
    key = next(k for k in by if k.startswith("the share"))
    assert by[key] == word(st["share_inside"]["rho"] < 0)
    # the trend itself from the curve (no degenerate values at these sizes)
    curve = res["training"]["curves"]["train"]
    assert not any(curve["degenerate"]["vci"])
    vals = curve["vci"][1:]
    assert t["first"] == vals[0] and t["last"] == vals[-1]
    assert t["collapses"] == (_common.spearman(range(len(vals)), vals)[0] < 0 and vals[-1] < vals[0])


def test_quick_transfer_numbers_recomputed(quick):
    _, res = quick
    rows = res["transfer"]["rows"]
    for r in rows:
        assert set(r["task_accuracy"]) == {"fine", "within", "blocks"}
        assert r["num_pretrain_classes"] == 5
        n = 360  # digits' test split
        lg = [
            math.log(min(max(a, 0.5 / n), 1 - 0.5 / n) / (1 - min(max(a, 0.5 / n), 1 - 0.5 / n)))
            for a in r["task_accuracy"].values()
        ]
        p = r["pretrain_accuracy"]
        assert r["mlog"] == pytest.approx(np.mean(lg) - math.log(p / (1 - p)), rel=1e-12)
    assert all(r["fitted"] for r in rows)  # --quick counts every run (fitted threshold 0)
    target = [r["mlog"] for r in rows]
    for k in vci.METRICS:
        r = np.corrcoef([row["metrics"][k] for row in rows], target)[0, 1] * vci.COLLAPSE_SIGN[k]
        assert res["transfer"]["correlations"][k] == pytest.approx(r, rel=1e-9)


def test_quick_metrics_match_reference_on_saved_features(quick):
    out, res = quick
    saved = np.load(out / "features.npz")
    h, y, c = saved["train"].astype(np.float64), saved["labels"], int(saved["num_classes"])
    inv = res["invariance"]
    ref = reference.vci(h, y, c)
    assert inv["original"]["vci"] == pytest.approx(ref, rel=1e-9)
    assert inv["original"]["fuzziness"] == pytest.approx(reference.fuzziness(h, y, c), rel=1e-7)
    # the trainer's float32 streaming measurement of the final epoch, same features
    assert res["training"]["curves"]["train"]["vci"][-1] == pytest.approx(ref, rel=1e-5)
    # one transformed value, independently
    a = vci.transforms(h, y, c, seed=inv["seed"])["invertible"]
    assert inv["transformed"]["invertible"]["vci"] == pytest.approx(reference.vci(a, y, c), rel=1e-9)
    assert inv["transformed"]["invertible"]["squared_distance"] == pytest.approx(
        reference.squared_distance(a, y, c), rel=1e-9
    )
    # Sigma_W's split at the last epoch, by brute force
    sw = reference.within_class_covariance(h, y, c)
    inside = np.trace(_projector_on_span_b(h, y, c) @ sw)
    span = res["training"]["span"]["train"]
    assert span["inside"][-1] == pytest.approx(inside, rel=1e-5)
    assert span["inside"][-1] + span["outside"][-1] == pytest.approx(np.trace(sw), rel=1e-5)


def test_fashion_preset_is_cpu_sized():
    """The offline fashion-mnist preset: width 8 on 5,000 training images, no augmentation, and a
    temperature sweep inside the range that fits the task in its epochs."""

    def settings(*argv):
        return vci.DRIVER.settings(vci.DRIVER.parser().parse_args(["--preset", "fashion-mnist", *argv]))

    s = settings()
    assert (s["width"], s["train_subset"], s["augment"], s["epochs"]) == (8, 5000, False, 20)
    assert s["logit_scales"] == vci.FASHION_SCALES and s["transfer_epochs"] == 16
    assert settings("--width", "16")["width"] == 16
    assert settings("--logit-scales", "4,2,1")["logit_scales"] == (4.0, 2.0, 1.0)
