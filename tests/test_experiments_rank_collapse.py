"""The paper-002 driver (python -m ncfast.experiments.rank_collapse): its pure parts (settings,
Spearman, claims, tables, OOD sets) on hand-made inputs, and one --quick run end to end whose
numbers are checked against report.md and against an independent numpy computation from the saved
checkpoint. Nothing is downloaded."""

import json
import math

import numpy as np
import pytest
import torch

from ncfast.experiments import _common
from ncfast.experiments import rank_collapse as rc
from ncfast.experiments._common import spearman, verdict

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ hand-made records
def rec(
    name,
    *,
    groups,
    init_norm,
    erank,
    final_norm=10.0,
    T=1.0,
    init="kaiming",
    scale=1.0,
    ln=False,
    model="MLP-4x512",
    feature_norm=1.0,
    ood=0.5,
    evolution=None,
    it=5,
    degenerate=(),
    diverged=False,
):
    layer = {
        "effective_rank": erank,
        "rank": 100,
        "feature_norm": feature_norm,
        "degenerate": list(degenerate),
        "linear_probe": 0.9,
        "ood_probe": ood,
    }
    return {
        "name": name,
        "groups": list(groups),
        "model": model,
        "init": init,
        "init_scale": scale,
        "temperature": T,
        "layernorm": ln,
        "rank_layer": "layer4",
        "initial_logits_norm": init_norm,
        "final_logits_norm": final_norm,
        "final_effective_rank": erank,
        "final_rank": 100,
        "degenerate": list(degenerate),
        "train_accuracy": 1.0,
        "interpolation_epoch": it,
        "layers": {"layer1": dict(layer), "layer4": dict(layer)},
        "evolution": evolution or [],
        "diverged": diverged,
        "diverged_after_epoch": 3 if diverged else None,
    }


def ranks_pearson(x, y):
    """Spearman by hand: Pearson correlation of average ranks."""

    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        for u in np.unique(v):  # ties share their mean rank
            r[v == u] = r[v == u].mean()
        return r

    a, b = ranks(x), ranks(y)
    return float(np.corrcoef(a, b)[0, 1])


def test_spearman_matches_a_hand_written_rank_correlation_and_is_undefined_on_edge_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = np.round(x + rng.normal(size=12), 1)
    y[3] = y[5]  # a tie
    rho, p = spearman(x, y)
    assert rho == pytest.approx(ranks_pearson(x, y), abs=1e-12)
    assert 0 <= p <= 1
    assert spearman([1, 2, 3, 4], [8, 6, 4, 1])[0] == pytest.approx(-1.0)
    for x, y in (([1, 2], [2, 1]), ([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [5, 5, 5])):
        assert all(math.isnan(v) for v in spearman(x, y))
    # non-finite points are dropped, not propagated
    assert spearman([1, 2, 3, float("nan"), 4], [4, 3, 2, 0, 1])[0] == pytest.approx(-1.0)
    assert spearman([1, 2, 3, None, 4], [4, 3, 2, 0, 1])[0] == pytest.approx(-1.0)


def test_build_settings_trains_the_shared_default_run_once_and_twins_every_init_setting():
    m = rc.Model("mlp", 4, 512)
    s = rc.build_settings([m], "kaiming", (0.5, 2.0), (1.0, 10.0), ("init", "temperature", "layernorm"))
    names = [x.name for x in s]
    assert len(names) == len(set(names)) == 3 + 1 + 3  # init: default, k0.5, k2; T=10; LN twins of the three
    shared = next(x for x in s if x.init == "default" and x.temperature == 1 and not x.layernorm)
    assert shared.groups == ["init", "temperature"]
    assert sum(x.layernorm for x in s) == 3 and all(x.groups == ["layernorm"] for x in s if x.layernorm)
    assert len({x.folder for x in s}) == len(s) and all(" " not in x.folder for x in s)
    # the init sweep of the default scheme does not train default x 1 twice
    d = rc.build_settings([m], "default", (1.0, 2.0), (), ("init",))
    assert [(x.init, x.init_scale) for x in d] == [("default", 1.0), ("default", 2.0)]
    assert rc.build_settings([m], "kaiming", (1.0,), (1.0, 3.0), ("temperature",))[1].groups == ["temperature"]
    # two models: nothing shared between them
    two = rc.build_settings([m, rc.Model("mlp", 6, 512)], "kaiming", (1.0,), (1.0,), ("init", "temperature"))
    assert len(two) == 4


def test_rank_vs_initial_norm_claim():
    runs = [
        rec(f"k{i}", groups=["init"], init_norm=n, erank=e)
        for i, (n, e) in enumerate([(0.1, 200), (1.0, 150), (10, 90), (100, 40), (1000, 10)])
    ]
    c = rc.claim_rank_vs_initial_norm(runs)
    assert c["holds"] is True and c["rho"] == pytest.approx(-1.0) and c["n"] == 5 and c["p"] < rc.P_VALUE
    # layernorm and diverged runs are left out: adding contrary ones changes nothing
    extra = [
        rec("ln", groups=["layernorm"], init_norm=1e4, erank=500, ln=True),
        rec("nan", groups=["temperature"], init_norm=1e5, erank=None, diverged=True),
    ]
    assert rc.claim_rank_vs_initial_norm(runs + extra)["rho"] == pytest.approx(-1.0)
    up = [dict(r, final_effective_rank=1000 - r["final_effective_rank"]) for r in runs]
    assert rc.claim_rank_vs_initial_norm(up)["holds"] is False
    # falling on the whole (rho = -0.8) but not significant with 4 points (p = 0.2): does not hold
    weak = [
        rec("a", groups=["init"], init_norm=1, erank=5),
        rec("b", groups=["init"], init_norm=2, erank=3),
        rec("c", groups=["init"], init_norm=3, erank=4),
        rec("d", groups=["init"], init_norm=4, erank=1),
    ]
    w = rc.claim_rank_vs_initial_norm(weak)
    assert w["rho"] < 0 and w["p"] >= rc.P_VALUE and w["holds"] is False
    assert rc.claim_rank_vs_initial_norm(runs[:2])["holds"] is None  # too few points: not measured


def test_init_scale_claim_uses_the_non_default_scheme_per_model():
    runs = [rec("d", groups=["init"], init="default", init_norm=50, erank=1)]
    runs += [rec(f"k{s}", groups=["init"], scale=s, init_norm=s**5, erank=1) for s in (0.5, 1, 1.5, 2)]
    c = rc.claim_init_scale_norm(runs)
    assert c["holds"] is True and c["n"] == 4  # the default-init run is not on the scale axis
    runs.append(rec("k3", groups=["init"], scale=3, init_norm=0.01, erank=1, model="MLP-6x512"))
    assert rc.claim_init_scale_norm(runs)["holds"] is None  # one point for MLP-6: undefined
    assert rc.claim_init_scale_norm([])["holds"] is None


def test_layernorm_claims_pair_each_run_with_its_twin():
    plain = [rec(f"k{s}", groups=["init"], scale=s, init_norm=10 * s, erank=100 / s) for s in (1, 2, 4)]
    ln = [rec(f"k{s} LN", groups=["layernorm"], scale=s, ln=True, init_norm=3.0, erank=120) for s in (1, 2, 4)]
    assert rc.claim_layernorm_norm(plain + ln)["holds"] is True
    r = rc.claim_layernorm_rank(plain + ln)
    assert r["holds"] is True and r["higher"] == 3 and r["n"] == 3
    # LN higher in only one of three pairs: does not hold; a tie does not count as higher
    ln2 = [dict(x, final_effective_rank=v) for x, v in zip(ln, (100.0, 10.0, 120.0))]
    r2 = rc.claim_layernorm_rank(plain + ln2)
    assert r2["higher"] == 1 and r2["holds"] is False
    big = [dict(x, initial_logits_norm=1e3) for x in ln]
    assert rc.claim_layernorm_norm(plain + big)["holds"] is False
    # an LN run without a twin is not paired; none at all: not measured
    lone = [rec("k8 LN", groups=["layernorm"], scale=8, ln=True, init_norm=3, erank=1)]
    assert rc.claim_layernorm_rank(plain + lone)["holds"] is None
    assert rc.claim_layernorm_norm(plain)["holds"] is None


def test_temperature_claims():
    ts = [
        rec(
            f"T{t}",
            groups=["temperature"],
            init="default",
            T=t,
            init_norm=t,
            erank=e,
            final_norm=10 * t,
            feature_norm=f,
            ood=o,
        )
        for t, e, f, o in ((1, 80, 1.0, 0.9), (10, 60, 2.0, 0.8), (100, 30, 3.0, 0.85), (1000, 20, 5.0, 0.7))
    ]
    for what in ("rank", "logits_norm", "feature_norm", "ood"):
        assert rc.claim_temperature(ts, what)["holds"] is True, what
    # rank rising with T: does not hold; the order of the records does not matter
    up = [dict(r, final_effective_rank=200 - r["final_effective_rank"]) for r in reversed(ts)]
    c = rc.claim_temperature(up, "rank")
    assert c["holds"] is False and c["per_model"]["MLP-4x512"]["temperatures"] == [1, 10, 100, 1000]
    # falling on the whole (rho = -0.2) but the largest T above the smallest: does not hold
    ends = [dict(r, final_effective_rank=e) for r, e in zip(ts, (50, 90, 80, 10))]
    ends.append(dict(ts[-1], temperature=10000, final_effective_rank=55))
    c = rc.claim_temperature(ends, "rank")
    assert c["per_model"]["MLP-4x512"]["rho"] < 0 and c["holds"] is False
    # two temperatures: the end points decide
    assert rc.claim_temperature(ts[:2], "rank")["holds"] is True
    assert rc.claim_temperature([ts[0], dict(ts[1], final_effective_rank=90)], "rank")["holds"] is False
    # no temperature sweep, or one run: not measured; diverged runs are left out
    assert rc.claim_temperature(ts[:1], "rank")["holds"] is None
    assert rc.claim_temperature([dict(r, groups=["init"]) for r in ts], "ood")["holds"] is None
    dead = dict(ts[-1], diverged=True, final_effective_rank=None)
    assert rc.claim_temperature(ts[:3] + [dead], "rank")["per_model"]["MLP-4x512"]["temperatures"] == [1, 10, 100]
    # OOD: mean over layers; a layer without an OOD probe is skipped
    r = dict(ts[0], layers={"a": {"ood_probe": 0.2}, "b": {"ood_probe": None}, "c": {"ood_probe": 0.4}})
    assert rc._mean_layers(r, "ood_probe") == pytest.approx(0.3)


def test_collapse_epoch_and_the_early_collapse_claim():
    ev = [{"epoch": e, "effective_rank": v} for e, v in ((0, 200), (5, 40), (10, 25), (15, 21), (20, 20))]
    # 90% of the drop 200 -> 20 is reached at 38: epoch 10
    assert rc.collapse_epoch(ev) == 10
    assert rc.collapse_epoch(ev, fraction=0.5) == 5
    assert rc.collapse_epoch([dict(e, effective_rank=5 + e["epoch"]) for e in ev]) is None  # rank rose
    assert rc.collapse_epoch(ev[:1]) is None
    runs = [
        rec("T1", groups=["temperature"], T=1, init_norm=1, erank=30, evolution=ev, it=3),
        rec("T10", groups=["temperature"], T=10, init_norm=10, erank=20, evolution=ev, it=15),
    ]
    c = rc.claim_early_collapse(runs)
    assert c["holds"] is True and c["per_model"]["MLP-4x512"]["temperature"] == 10  # the largest T is judged
    assert rc.claim_early_collapse([runs[0], dict(runs[1], interpolation_epoch=5)])["holds"] is False
    assert rc.claim_early_collapse([runs[0], dict(runs[1], interpolation_epoch=None)])["holds"] is True
    assert rc.claim_early_collapse([])["holds"] is None


def test_tables_show_every_run_and_mark_degenerate_and_diverged_ones():
    runs = [
        rec("a run", groups=["init"], init_norm=1.5, erank=12.25, degenerate=["effective_rank"]),
        rec("b run", groups=["temperature"], init_norm=2.0, erank=None, diverged=True),
    ]
    t = rc.settings_table(runs).splitlines()
    assert len(t) == 2 + 2
    assert "| a run | init | 1.5 |" in t[2] and "12.25 (degenerate)" in t[2]
    assert "diverged" in t[3] and t[3].count("|") == t[0].count("|")
    lt = rc.layers_table([rec("T1", groups=["temperature"], init_norm=1, erank=3, ood=0.25)]).splitlines()
    assert len(lt) == 2 + 2 and "| T1 | layer1 | 0.9 | 0.25 | 3 | 1 |" in lt


def test_ood_sets():
    assert rc.resolve_ood("auto", "digits", None, quick=True) == "rotated"
    assert rc.resolve_ood("auto", "cifar10", None, quick=False) == "rotated"
    assert rc.resolve_ood("auto", "cifar100", "/x", quick=False) == "svhn"
    assert rc.resolve_ood("auto", "fashion-mnist", None, quick=False) == "digits"
    assert rc.resolve_ood("svhn", "digits", None, quick=True) == "svhn"
    with pytest.raises(ValueError, match="--ood"):
        rc.resolve_ood("mnist", "digits", None, quick=False)
    from ncfast.train.data import load_dataset

    ds = load_dataset("digits")
    o = rc.load_ood("rotated", ds, ds.train_x[:7], ds.test_x[:5], None)
    assert o.train_x.shape == (7, 1, 8, 8) and o.test_x.shape == (5, 1, 8, 8)
    assert torch.equal(o.train_x[2, 0], -ds.train_x[2, 0].rot90(1, (0, 1)))
    # digits for a 28 x 28 grey data set: upsampled, normalised with that set's statistics
    grey28 = type(
        "DS", (), {"mean": torch.tensor([0.3], dtype=torch.float64), "std": torch.tensor([0.2], dtype=torch.float64)}
    )()
    o = rc.load_ood("digits", grey28, torch.zeros(3, 1, 28, 28), torch.zeros(3, 1, 28, 28), None, n_train=50, n_test=20)
    assert o.train_x.shape == (50, 1, 28, 28) and o.test_x.shape == (20, 1, 28, 28) and o.train_y.shape == (50,)
    assert float(o.train_x.min()) == pytest.approx((0 - 0.3) / 0.2, abs=1e-5)  # a black pixel
    with pytest.raises(FileNotFoundError, match="--ood"):
        rc.load_ood("svhn", grey28, torch.zeros(3, 3, 32, 32), torch.zeros(3, 3, 32, 32), None)


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 12)):
        savemat(
            tmp_path / f"{split}_32x32.mat",
            {
                "X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                "y": np.arange(1, n + 1).reshape(-1, 1) % 10 + 1,
            },
        )
    rgb = type(
        "DS",
        (),
        {"mean": torch.full((3,), 0.5, dtype=torch.float64), "std": torch.full((3,), 0.25, dtype=torch.float64)},
    )()
    o = rc.load_ood("svhn", rgb, torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32), str(tmp_path), n_train=20)
    assert o.train_x.shape == (20, 3, 32, 32) and o.test_x.shape == (12, 3, 32, 32)
    assert set(o.test_y.tolist()) <= set(range(10)) and 0 in o.test_y.tolist()  # SVHN's label 10 is digit 0
    assert float(o.train_x.max()) <= (1 - 0.5) / 0.25 + 1e-6


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--width", "0"], "--width"),
        (["--temperatures", "1,x"], "--temperatures"),
        (["--init-scales", "1,-2"], "--init-scales"),
        (["--epochs", "0"], "--epochs"),
        (["--depths", "4,0"], "--depths"),
        (["--lr", "0"], "--lr"),
        (["--ood", "mnist"], "--ood"),
        (["--preset", "cifar100", "--data", "/nowhere", "--depths", "4"], "--depths"),
        (["--preset", "fashion-mnist", "--quick", "--data", "/usr/share/datasets/fashion-mnist"], "--quick"),
        (["--preset", "cifar10"], "--data"),
        (["--train-subset", "0"], "--train-subset"),
    ],
)
def test_bad_arguments_name_the_flag(tmp_path, capsys, args, flag):
    # a bad value of one flag: argparse's usage error; flags that do not fit the preset: one line; both exit 2
    try:
        code = rc.main([*args, "--out", str(tmp_path / "o"), "--no-progress"])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error: " in err and flag in err
    assert not (tmp_path / "o" / "results.json").exists() and not (tmp_path / "o" / "runs").exists()


def _plan(tmp_path, *argv):
    args = rc.DRIVER.parser().parse_args(list(argv))
    settings = rc.DRIVER.settings(args)
    return settings, rc.plan(_common.Context("rank_collapse", settings, args, tmp_path, _common.Log("t", True)))


def test_flags_replace_the_presets_settings(tmp_path):
    s, cfg = _plan(tmp_path)
    assert s == rc.PRESETS["digits"] and cfg["groups"] == ("init", "temperature", "layernorm")
    assert cfg["ood"] in ("fashion-mnist", "rotated")  # auto: Fashion-MNIST where its files are installed
    s, cfg = _plan(
        tmp_path,
        "--epochs",
        "7",
        "--lr",
        "0.5",
        "--temperatures",
        "10,1,10",
        "--init-scales",
        "3",
        "--init",
        "default",
        "--temperature-init",
        "default",
        "--loss",
        "mse",
        "--train-subset",
        "99",
        "--depths",
        "6,2",
        "--width",
        "32",
        "--no-layernorm",
        "--ood",
        "rotated",
    )
    assert (s["epochs"], s["lr"], s["temperatures"], s["init_scales"]) == (7, 0.5, (1.0, 10.0), (3.0,))
    assert (s["init"], s["temperature_init"], s["loss"], s["train_subset"]) == ("default", "default", "mse", 99)
    assert [m.label for m in cfg["models"]] == ["MLP-2x32", "MLP-6x32"]
    assert cfg["groups"] == ("init", "temperature") and cfg["ood"] == "rotated"
    assert s["models"] == rc.PRESETS["digits"]["models"]  # plan leaves the merged settings alone
    # --quick: QUICK over the digits preset; its OOD set is the rotated images unless --ood says otherwise
    s, cfg = _plan(tmp_path, "--quick")
    assert s == {**rc.PRESETS["digits"], **rc.QUICK} and cfg["ood"] == "rotated"
    assert _plan(tmp_path, "--quick", "--ood", "auto")[1]["ood"] == "rotated"
    # the cifar100 preset trains CNNs: --width sets their base channels
    _, cfg = _plan(tmp_path, "--preset", "cifar100", "--data", "/x", "--width", "16")
    assert [m.label for m in cfg["models"]] == ["vgg19-w16", "resnet18-w16"] and cfg["ood"] == "rotated"
    assert cfg["groups"] == ("temperature",)


def test_run_config_is_the_trainers_config_of_a_setting():
    setting = rc.Setting(rc.Model("mlp", 4, 2048), init="kaiming", init_scale=2.0, temperature=10.0, layernorm=True)
    c = rc.run_config(setting, rc.PRESETS["digits"])
    assert (c["arch"], c["depth"], c["width"], c["logit_scale"]) == ("mlp", 4, 2048, 10.0)
    assert (c["init"], c["init_scale"], c["output_norm"]) == ("kaiming", 2.0, "layernorm")
    assert c["max_dim"] == 2048 and c["augment"] is False and c["clp_embed"] == "none"
    assert (c["epochs"], c["lr"], c["metrics_every"], c["loss"]) == (30, 0.01, 5, "ce")
    from ncfast.train.trainer import Config

    Config(**c)  # every key is a Config field


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("rank_collapse")
    assert rc.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_writes_report_json_and_figures(quick):
    out, res = quick
    for f in ("rank_collapse.png", "rank_collapse_layers.png", "rank_collapse_evolution.png"):
        data = (out / f).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, f
        import matplotlib.image

        assert matplotlib.image.imread(out / f).ndim == 3
    report = (out / "report.md").read_text()
    assert "python -m ncfast.experiments.rank_collapse --quick" in report
    assert report.startswith("# Paper 002: rank collapse driven by the initial logits norm\n")
    for heading in ("## Setup", "## Runs", "## Per layer (temperature runs)"):
        assert heading in report
    assert res["report"]["quick"] is True and res["report"]["preset"] == "digits" and res["seconds"] > 0
    assert (res["preset"], res["quick"], res["seed"], res["config"]["ood"]) == ("digits", True, 0, "rotated")
    assert res["config"]["models"] == [{"arch": "mlp", "depth": 2, "width": 64}]
    runs = res["runs"]
    # default T=1 (init + temperature), kaiming x2, T=10, and the layernorm twins of the first two
    assert len(runs) == 5 and sum(r["layernorm"] for r in runs) == 2
    assert sorted(r["temperature"] for r in runs if "temperature" in r["groups"]) == [1.0, 10.0]
    for r in runs:
        assert not r["diverged"] and r["initial_logits_norm"] > 0 and r["final_effective_rank"] > 0
        assert set(r["layers"]) >= {"layer1", "layer2"} and r["rank_layer"] == "layer2"
        assert ("norm" in r["layers"]) == r["layernorm"]
        for v in r["layers"].values():
            assert 0 <= v["linear_probe"] <= 1
            assert (v["ood_probe"] is not None) == ("temperature" in r["groups"])
        assert [e["epoch"] for e in r["evolution"]] == [0, 1, 2, 3]
        assert (out / "runs" / r["folder"] / "summary.json").exists()
    # the temperature knob is the loss's T: the initial logits norm of T = 10 is ten times T = 1's
    t1, t10 = (next(r for r in runs if "temperature" in r["groups"] and r["temperature"] == t) for t in (1, 10))
    assert t10["initial_logits_norm"] == pytest.approx(10 * t1["initial_logits_norm"], rel=1e-6)


def test_quick_verdicts_follow_from_the_json_numbers(quick):
    out, res = quick
    # the claims recomputed from the JSON run records give the JSON's claims ...
    again = rc.evaluate_claims(res["runs"])
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")][2:]
    rows = rows[: len(rc.CLAIMS)]
    assert len(rows) == len(rc.CLAIMS)
    for (key, _claim, paper, _), row in zip(rc.CLAIMS, rows):
        stored = res["claims"][key]
        assert stored["holds"] == again[key]["holds"], key
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        # ... and the report's verdict is the word for the JSON's holds, beside the JSON's numbers
        assert cells[-1] == verdict(stored["holds"]), key
        assert cells[2] == stored["ours"].replace("|", "\\|") and cells[1] == paper.replace("|", "\\|")
    words = [verdict(res["claims"][k]["holds"]) for k, *_ in rc.CLAIMS]
    assert [c["verdict"] for c in res["report"]["claims"]] == words
    # a check of one number by hand: the layernorm claim's maxima are the runs' initial norms
    pairs = [r for r in res["runs"] if r["layernorm"]]
    assert res["claims"]["layernorm_norm"]["max_ln"] == pytest.approx(max(r["initial_logits_norm"] for r in pairs))


def test_quick_rank_and_logits_norm_match_numpy_on_the_saved_network(quick):
    """The final effective rank (docs/metrics.md: exp of the entropy of the normalised singular values
    sqrt(lambda_k) of the balanced Sigma_T, eigenvalues above 1e-10 lambda_max) and the final logits
    norm (mean ||T z||), recomputed with numpy from the checkpoint of the T = 10 run."""
    from ncfast.train.data import load_dataset
    from ncfast.train.models import build_model

    out, res = quick
    r = next(r for r in res["runs"] if r["temperature"] == 10)
    folder = out / "runs" / r["folder"]
    cfg = json.loads((folder / "summary.json").read_text())["config"]
    ds = load_dataset("digits", seed=cfg["seed"])
    model = build_model("mlp", 10, 1, (8, 8), depth=cfg["depth"], width=cfg["width"], output_norm=cfg["output_norm"])
    model.load_state_dict(torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["model"])
    model.eval()
    seen = {}
    model.get_submodule(r["rank_layer"]).register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    with torch.no_grad():
        z = model(ds.train_x)
    h = seen["h"].double().numpy()
    y = ds.train_y.numpy()
    means = np.stack([h[y == c].mean(0) for c in range(10)])
    sw = sum(np.cov(h[y == c].T, bias=True) for c in range(10)) / 10
    centred = means - means.mean(0)
    sigma_t = sw + centred.T @ centred / 10
    lam = np.linalg.eigvalsh(sigma_t)
    lam = lam[lam > 1e-10 * lam.max()]
    p = np.sqrt(lam) / np.sqrt(lam).sum()
    erank = float(np.exp(-(p * np.log(p)).sum()))
    assert r["final_effective_rank"] == pytest.approx(erank, rel=1e-5)
    assert r["final_rank"] == lam.size
    norm = float(10 * z.double().norm(dim=1).mean())
    assert r["final_logits_norm"] == pytest.approx(norm, rel=1e-5)
