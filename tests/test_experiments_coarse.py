"""The coarse-label driver (paper 000): one --quick --fine --grid run end to end, its numbers checked
against the files it writes and against independent recomputations, and the pure functions on
hand-made inputs."""

import json
import math
import re

import numpy as np
import pytest

from ncfast.experiments import coarse
from ncfast.experiments.coarse import (
    central_first,
    claims,
    clp_chance,
    grid_table,
    line_ratios,
    lines_table,
    main,
    shows_up,
    twin_ratios,
)
from ncfast.labels import superclass_map
from ncfast.train.trainer import LEARNING_RATES, WEIGHT_DECAYS

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("coarse")
    from threadpoolctl import threadpool_limits

    # one OpenMP thread for faiss / scikit-learn: on a busy 2-core machine their spinning threads
    # stall each other for minutes; the results do not depend on it
    with threadpool_limits(1):
        rc = main(["--quick", "--fine", "--grid", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def _report_rows(text):
    """The claim table of report.md: [(claim, paper, ours, verdict)]."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| claim", "| ---", "| epoch", "| lr")):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(cells) == 4 and cells[3] in ("holds", "does not hold", "not measured"):
                rows.append(tuple(cells))
    return rows


def _word(holds):
    return "not measured" if holds is None else ("holds" if holds else "does not hold")


# ------------------------------------------------------------------------------------ end to end
def test_quick_writes_every_file_and_valid_pngs(quick):
    out, res = quick
    for name in (
        "report.md",
        "results.json",
        "coarse.png",
        "class_distance.png",
        "tsne.png",
        "fine_class_distance.png",
        "grid.png",
        "features.npz",
    ):
        assert (out / name).is_file(), name
    import matplotlib.image as mpimg

    for name in ("coarse.png", "class_distance.png", "tsne.png", "fine_class_distance.png", "grid.png"):
        assert (out / name).read_bytes()[:8] == PNG
        image = mpimg.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01  # not a blank canvas
    for run in ("coarse", "original", "fine"):
        assert (out / run / "summary.json").is_file()
    assert len(list((out / "grid").iterdir())) == 9
    text = (out / "report.md").read_text()
    for fig in ("coarse.png", "class_distance.png", "tsne.png", "fine_class_distance.png", "grid.png"):
        assert f"]({fig})" in text
    assert "python -m ncfast.experiments.coarse --quick --fine --grid" in text


def test_report_verdicts_follow_from_the_json(quick):
    out, res = quick
    rows = _report_rows((out / "report.md").read_text())
    listed = res["report"]["claims"]
    assert [(r[0], r[2], r[3]) for r in rows] == [(c["claim"], c["ours"], c["verdict"]) for c in listed]
    assert not any(k.startswith("_") for k in res)  # the trained run the figures drew on stays out
    t, c, o = res["thresholds"], res["coarse"], res["original"]
    last = c["lines"][-1]
    clp, lpo, ot, chance = c["clp_accuracy"], c["linear_probe_accuracy"], o["best_test_accuracy"], c["clp_chance"]
    # the verdicts recomputed here from the raw numbers, not through coarse.claims
    epochs = [r["epoch"] for r in c["lines"]]

    def first_stays(key):
        ok = [r[key] is not None and r[key] <= t["line"] for r in c["lines"]]
        for i in range(len(ok)):
            if all(ok[i:]):
                return epochs[i]
        return None

    ec, es = first_stays("central"), first_stays("same")
    assert c["shows_up"] == {"central": ec, "same": es}
    f = res["fine"]
    early = next(r for r in f["twins"] if r["epoch"] == f["early_epoch"])
    end = f["twins"][-1]
    grid = res["grid"]
    close = sum(abs(g["clp_accuracy"] - g["linear_probe_accuracy"]) <= t["close"] for g in grid)
    others = [g for g in grid if (g["lr"], g["weight_decay"]) != (0.1, 5e-3)]
    expected = [
        c["train_accuracy"] >= c["it_threshold"] and c["nc1_last"] <= c["nc1_first"] / t["nc1_fall"],
        last["same"] <= t["line"],
        ec is not None and (es is None or ec < es),
        last["msdr"] >= t["fine_structure"],
        clp >= (1 + chance) / 2,
        abs(clp - lpo) <= t["close"],
        ot - clp <= t["close"],
        early["twin"] <= t["line"],
        end["twin"] <= t["line"],
        end["twin"] > early["twin"],
        2 * close > len(grid),
        all(g["train_accuracy"] >= c["it_threshold"] for g in others),
    ]
    assert [r[3] for r in rows] == [_word(e) for e in expected]
    # the numbers a reader sees are the JSON's
    assert f"{100 * clp:.1f}%" in rows[4][2] and f"{100 * lpo:.1f}%" in rows[5][2] and f"{100 * ot:.1f}%" in rows[6][2]
    assert f"{last['msdr']:.2f}" in rows[3][2]
    assert f"{close} of 9" in rows[10][2]


def test_numbers_match_the_run_folders(quick):
    out, res = quick
    summary = json.loads((out / "coarse" / "summary.json").read_text())
    c = res["coarse"]
    assert c["clp_accuracy"] == summary["clp_accuracy"]
    assert c["linear_probe_accuracy"] == summary["linear_probe_accuracy"]
    assert c["num_super"] == 5 and c["superclass_of"] == [i % 5 for i in range(10)]
    assert c["clp_chance"] == pytest.approx(0.5)
    history = [json.loads(line) for line in (out / "original" / "history.jsonl").read_text().splitlines()]
    assert res["original"]["best_test_accuracy"] == max(h["test_acc"] for h in history if h["epoch"] > 0)
    metrics = [json.loads(line) for line in (out / "coarse" / "metrics.jsonl").read_text().splitlines()]
    assert [e for e, _ in c["nc1"]] == [m["epoch"] for m in metrics]
    assert c["nc1_last"] == metrics[-1]["layers"][c["penultimate"]]["train"]["nc1"]
    # every measured epoch has its ratios; epochs 1..EARLY and the heatmap epochs are measured
    assert set(range(0, 9)) == {r["epoch"] for r in c["lines"]}
    grid = {(g["lr"], g["weight_decay"]) for g in res["grid"]}
    assert grid == {(lr, wd) for lr in LEARNING_RATES for wd in WEIGHT_DECAYS}
    g = next(g for g in res["grid"] if g["lr"] == 0.01 and g["weight_decay"] == 5e-4)
    cell = json.loads((out / "grid" / "lr0.01_wd0.0005" / "summary.json").read_text())
    assert g["clp_accuracy"] == cell["clp_accuracy"] and g["train_accuracy"] == cell["train_accuracy"]
    assert cell["config"]["epochs"] == res["grid_epochs"] and cell["config"]["lr"] == 0.01


def test_class_distance_recomputed_from_saved_features(quick):
    """D_ij of eq. 6 by brute force over all sample pairs (numpy, float64) from the saved final
    features equals the trainer's matrix, and the driver's final line ratios follow from it."""
    out, res = quick
    saved = np.load(out / "features.npz")
    x = saved["features"].astype(np.float64)
    y = saved["y_orig"]
    assert int(saved["epoch"]) == res["config"]["epochs"]
    assert np.array_equal(saved["y_train"], y % 5)
    sq = (x * x).sum(1)
    pair = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)  # every ||h_u - h_v||^2
    onehot = (y[:, None] == np.arange(10)[None, :]).astype(np.float64)
    n = onehot.sum(0)
    d = onehot.T @ pair @ onehot / np.outer(n, n)
    trainer_d = np.load(out / "coarse" / "class_distance" / f"epoch_{res['config']['epochs']:03d}.npy")
    np.testing.assert_allclose(trainer_d, d, rtol=1e-4)
    diag = np.diag(d).mean()
    i, j = np.meshgrid(range(10), range(10), indexing="ij")
    same = d[(i % 5 == j % 5) & (i != j)].mean()
    other = d[i % 5 != j % 5].mean()
    last = res["coarse"]["lines"][-1]
    assert last["central"] == pytest.approx(diag / other, rel=1e-4)
    assert last["same"] == pytest.approx(same / other, rel=1e-4)
    assert last["msdr"] == pytest.approx(same / diag, rel=1e-4)


def test_fine_ratios_from_the_saved_matrices(quick):
    out, res = quick
    f = res["fine"]
    assert f["num_classes"] == 10 and f["early_epoch"] == 1
    d = np.load(out / "fine" / "class_distance" / f"epoch_{f['twins'][-1]['epoch']:03d}_train_labels.npy")
    assert d.shape == (20, 20)
    twin = np.mean([d[c, c + 10] for c in range(10)])  # symmetric: (c + 10, c) is the same value
    lab = np.arange(20) % 10
    other = d[lab[:, None] != lab[None, :]].mean()
    assert f["twins"][-1]["twin"] == pytest.approx(twin / other, rel=1e-6)


# ---------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--quick", "--coarse", "1"], "--coarse"),
        (["--quick", "--coarse", "10"], "--coarse"),
        (["--quick", "--coarse", "official"], "--coarse official"),
        (["--quick", "--coarse", "5", "--random-coarse", "5"], "--random-coarse"),
        (["--quick", "--random-coarse", "1"], "--random-coarse"),
        (["--quick", "--random-coarse", "10"], "--random-coarse"),
        (["--quick", "--distance-epochs", "1,99"], "--distance-epochs"),
        (["--quick", "--distance-epochs=-1,3"], "--distance-epochs"),
        (["--quick", "--preset", "cifar10"], "--quick"),
        (["--preset", "cifar10"], "--data"),
        (["--quick", "--arch", "vgg11", "--depth", "12"], "depth"),
    ],
)
def test_bad_arguments_name_the_flag(argv, flag, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err
    assert not (tmp_path / "x" / "results.json").exists()
    assert not (tmp_path / "x" / "coarse").exists()  # refused before any training started


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--arch", "vgg12"], "--arch"),
        (["--coarse", "two"], "--coarse"),
        (["--distance-epochs", "a"], "--distance-epochs"),
        (["--epochs", "0"], "--epochs"),
        (["--grid-epochs", "0"], "--grid-epochs"),
        (["--lr", "0"], "--lr"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--width", "0"], "--width"),
        (["--random-coarse", "x"], "--random-coarse"),
    ],
)
def test_malformed_flags_are_argparse_errors(argv, flag, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", *argv])
    assert flag in capsys.readouterr().err


# ------------------------------------------------------------------------------------ pure functions
def test_superclass_map():
    y = np.array([0, 1, 2, 3, 5, 6, 6, 0])
    assert superclass_map(y, y % 3, 8).tolist() == [0, 1, 2, 0, -1, 2, 0, -1]  # 4 and 7 absent
    with pytest.raises(ValueError, match="original class 1 carries 2 training labels"):
        superclass_map(np.array([0, 1, 1]), np.array([0, 1, 3]), 2)


def _hand_d():
    # 4 classes, super-classes {0, 2} and {1, 3}: diag 1, same-super 3, other 9
    d = np.full((4, 4), 9.0)
    np.fill_diagonal(d, 1.0)
    d[0, 2] = d[2, 0] = d[1, 3] = d[3, 1] = 3.0
    return d


def test_line_ratios_hand_made():
    r = line_ratios(_hand_d(), [0, 1, 0, 1])
    assert r == pytest.approx({"central": 1 / 9, "same": 3 / 9, "msdr": 3.0})
    # an absent class (NaN row, super-class -1) is left out
    d = np.pad(_hand_d(), ((0, 1), (0, 1)), constant_values=np.nan)
    assert line_ratios(d, [0, 1, 0, 1, -1]) == pytest.approx(r)
    # no super-class holds two classes: no same-super pairs
    r = line_ratios(_hand_d(), [0, 1, 2, 3])
    assert math.isnan(r["same"]) and math.isnan(r["msdr"])
    assert r["central"] == pytest.approx(1 / ((9 * 8 + 3 * 4) / 12))
    # one super-class: no background
    r = line_ratios(_hand_d(), [0, 0, 0, 0])
    assert math.isnan(r["central"]) and math.isnan(r["same"]) and r["msdr"] > 1
    # fully collapsed classes (D_ii = 0): MSDR undefined, not inf
    d = _hand_d()
    np.fill_diagonal(d, 0.0)
    assert math.isnan(line_ratios(d, [0, 1, 0, 1])["msdr"])


def test_twin_ratios_hand_made():
    c = 3
    d = np.full((6, 6), 10.0)
    np.fill_diagonal(d, 1.0)
    for k in range(c):
        d[k, k + c] = d[k + c, k] = 2.0
    assert twin_ratios(d, c) == pytest.approx({"twin": 0.2, "diag": 0.1})


@pytest.mark.parametrize(
    "ratios, expected",
    [
        ([0.9, 0.6, 0.4, 0.3], 10),
        ([0.4, 0.6, 0.4, 0.3], 10),  # a dip that does not stay does not count
        ([0.4, 0.3, 0.2, 0.1], 0),
        ([0.9, 0.8, 0.7, 0.6], None),
        ([0.9, 0.4, 0.3, 0.6], None),  # rises again at the end
        ([0.9, 0.4, float("nan"), 0.3], 20),
        ([0.9, 0.5, 0.4, None], None),
        ([], None),
    ],
)
def test_shows_up(ratios, expected):
    assert shows_up([0, 5, 10, 20][: len(ratios)], ratios, 0.5) == expected


def test_central_first():
    assert central_first(2, 3) and central_first(2, None)
    assert not central_first(3, 3) and not central_first(4, 3)
    assert not central_first(None, None) and not central_first(None, 1)


def test_clp_chance():
    assert clp_chance(np.arange(10) % 5) == pytest.approx(0.5)
    assert clp_chance([0, 0, 0, 1, 1]) == pytest.approx((3 * (1 / 3) + 2 * (1 / 2)) / 5)
    assert clp_chance([0, 1, -1]) == pytest.approx(1.0)


def _results(**over):
    lines = [
        {"epoch": 0, "train_acc": 0.1, "central": 0.7, "same": 1.0, "msdr": 1.4},
        {"epoch": 1, "train_acc": 0.9, "central": 0.4, "same": 0.8, "msdr": 2.0},
        {"epoch": 2, "train_acc": 1.0, "central": 0.2, "same": 0.4, "msdr": 2.0},
    ]
    c = {
        "num_super": 5,
        "lines": lines,
        "shows_up": {"central": 1, "same": 2},
        "nc1_first": 2.0,
        "nc1_last": 0.1,
        "train_accuracy": 1.0,
        "it_threshold": 0.995,
        "clp_accuracy": 0.9,
        "linear_probe_accuracy": 0.93,
        "clp_chance": 0.5,
    }
    c.update(over)
    return {"config": {"arch": "resnet18"}, "coarse": c, "original": {"best_test_accuracy": 0.96}, "grid_epochs": 3}


def _holds(results):
    return [c.holds for c in claims(results)]


def test_claims_verdicts_on_hand_made_results():
    assert _holds(_results()) == [True, True, True, True, True, True, False]  # OT 96% vs CLP 90%: 6 points apart
    got = _holds(_results(clp_accuracy=0.74, nc1_last=0.21, shows_up={"central": 2, "same": 2}))
    assert got == [False, True, False, True, False, False, False]
    # missing numbers are "not measured", never a verdict, and print as n/a
    got = claims(_results(clp_accuracy=None, nc1_first=None))
    assert [c.holds for c in got][:7] == [None, True, True, True, None, None, None]
    assert got[0].ours == "train acc 100.0%; NC1 n/a -> 0.1" and got[4].verdict == "not measured"
    assert got[4].ours == "CLP n/a (chance 50.0%, bar 75.0%)"
    # a line that never shows up
    never = claims(_results(shows_up={"central": 1, "same": None}))[2]
    assert never.ours == "central from epoch 1, same-super from epoch n/a" and never.holds is True
    # exactly at a threshold: holds
    got = claims(_results(clp_accuracy=0.75, linear_probe_accuracy=0.75))
    assert got[4].holds is True and got[5].holds is True
    # VGG: the paper column says the paper did not see it there
    assert "VGG" in claims({**_results(), "config": {"arch": "vgg16"}})[2].paper


def test_claims_fine_and_grid():
    res = _results()
    res["fine"] = {
        "num_classes": 10,
        "early_epoch": 1,
        "twins": [{"epoch": 1, "twin": 0.3, "diag": 0.2}, {"epoch": 5, "twin": 0.45, "diag": 0.1}],
    }
    res["grid"] = [
        {
            "lr": lr,
            "weight_decay": wd,
            "clp_accuracy": 0.9,
            "linear_probe_accuracy": 0.9 + 0.1 * (lr == 0.1),
            "train_accuracy": 0.5 if (lr, wd) == (0.1, 5e-3) else 1.0,
        }
        for lr in LEARNING_RATES
        for wd in WEIGHT_DECAYS
    ]
    rows = claims(res)
    assert [c.holds for c in rows[7:]] == [True, True, True, True, True]
    assert "6 of 9" in rows[10].ours and "8 of 8" in rows[11].ours
    res["grid"][4]["train_accuracy"] = 0.9  # (0.01, 5e-4) short of interpolation
    res["fine"]["twins"][-1]["twin"] = 0.6
    assert _holds(res)[7:] == [True, False, True, True, False]


def test_tables():
    text = lines_table(_results()["coarse"]["lines"])
    assert text.splitlines()[3] == "| 1 | 90.0% | 0.400 | 0.800 | 2.00 |"
    grid = [
        {"lr": 0.1, "weight_decay": 5e-3, "clp_accuracy": 0.5, "linear_probe_accuracy": 0.6, "train_accuracy": 0.7},
        {"lr": 0.01, "weight_decay": 5e-4, "clp_accuracy": None, "linear_probe_accuracy": 0.6, "train_accuracy": 1.0},
    ]
    lines = grid_table(grid).splitlines()
    assert lines[0] == "| lr \\ wd | 0.005 | 0.0005 |"
    assert lines[2] == "| 0.1 | 50.0% / 60.0% / 70.0% | n/a |"  # a cell not trained
    assert lines[3] == "| 0.01 | n/a | n/a / 60.0% / 100.0% |"


def test_class_names():
    # the meta file's order: alphabetical
    assert len(coarse.CIFAR100) == 100 and coarse.CIFAR100 == sorted(set(coarse.CIFAR100))
    assert coarse.CIFAR100[:3] == ["apple", "aquarium_fish", "baby"] and coarse.CIFAR100[-1] == "worm"
    assert all(len(v) == 10 for k, v in coarse.CLASS_NAMES.items() if k != "cifar100")


def test_paper_presets_settings():
    """The GPU presets cannot run here: their settings are the paper's (ResNet-18, 350 epochs, config #1,
    heatmaps at epochs 20 / 120 / 240 / 350; CIFAR-100 coarse 20, or its official super-classes)."""
    s = _settings("--preset", "cifar10")
    assert (s["arch"], s["epochs"], s["lr"], s["weight_decay"], s["coarse"]) == ("resnet18", 350, 0.01, 5e-4, 5)
    assert s["distance_epochs"] == [20, 120, 240, 350] and s["random_coarse"] is None
    s = _settings("--preset", "cifar100", "--coarse", "official", "--arch", "vgg19", "--weight-decay", "5e-5")
    assert (s["coarse"], s["arch"], s["weight_decay"]) == ("official", "vgg19", 5e-5)
    s = _settings("--preset", "cifar100", "--random-coarse", "20", "--epochs", "30")
    assert (s["coarse"], s["random_coarse"], s["distance_epochs"]) == (None, 20, [20, 30])
    s = _settings("--preset", "cifar100", "--coarse", "50", "--distance-epochs", "0,5,350")
    assert (s["coarse"], s["distance_epochs"]) == (50, [0, 5, 350])


def _settings(*argv):
    """The settings a run starts from: the preset, --quick, the flags, then what hangs on which were given."""
    args = coarse.DRIVER.parser().parse_args(list(argv))
    return coarse.resolve(coarse.DRIVER.settings(args), args)


def test_quick_settings_and_flags():
    s = _settings("--quick")
    assert {k: s[k] for k in coarse.QUICK} == {**coarse.QUICK, "distance_epochs": [1, 3, 8]}
    assert (s["depth"], s["random_coarse"]) == (None, None)
    s = _settings("--quick", "--epochs", "3", "--lr", "0.1", "--grid-epochs", "1")
    assert (s["epochs"], s["lr"], s["grid_epochs"], s["distance_epochs"]) == (3, 0.1, 1, [1, 3])


def test_fashion_preset_is_cpu_sized_and_reaches_the_trainer(tmp_path):
    """The offline fashion-mnist preset trains a width-8 ResNet-18 on a 5,000-image subset without
    augmentation: both fields reach the trainer's Config of every run."""
    from ncfast.train.trainer import Config

    s = _settings("--preset", "fashion-mnist")
    assert (s["arch"], s["width"], s["epochs"], s["distance_epochs"]) == ("resnet18", 8, 20, [1, 5, 10, 20])
    cfg = coarse._fields(s, coarse=s["coarse"])
    assert cfg["train_subset"] == 5000 and cfg["augment"] is False
    Config(out=str(tmp_path), **cfg)
    digits = coarse._fields(_settings())
    assert "train_subset" not in digits and "augment" not in digits  # the trainer's defaults
