"""python -m ncfast.experiments.ncc_layers (paper 003): the --quick run end to end, its numbers held
to the run folders and to an independent numpy computation, and the pure functions behind the
verdicts, tables and figures on hand-made inputs."""

import json
import re

import numpy as np
import pytest
import torch

from ncfast.experiments import ncc_layers as nl
from ncfast.train.trainer import Config, Trainer

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------- the --quick run
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ncc_layers")
    assert nl.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def _report_rows(text):
    """The claim table of report.md as (claim, paper, ours, verdict) tuples."""
    lines = text.splitlines()
    start = lines.index("| claim | paper | ours | verdict |") + 2  # after the header and its rule
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append(tuple(c.strip() for c in line[2:-2].split(" | ")))
    return rows


def test_quick_writes_every_file(quick):
    out, _ = quick
    for f in ("report.md", "results.json", "ncc_mismatch.png", "accuracy.png"):
        assert (out / f).stat().st_size > 0
    for f in ("ncc_mismatch.png", "accuracy.png"):
        data = (out / f).read_bytes()
        assert data[:8] == PNG and len(data) < 150_000
    for run in nl.RUNS:
        for f in ("history.jsonl", "metrics.jsonl", "summary.json"):
            assert (out / run / f).exists()


def test_quick_report_matches_json(quick):
    out, res = quick
    rows = _report_rows((out / "report.md").read_text())
    claims = res["report"]["claims"]
    assert len(rows) == len(claims) == 8
    for row, c in zip(rows, claims):
        assert row == (c["claim"], c["paper"], c["ours"], c["verdict"])
    assert [c.as_dict() for c in nl.claims(res)] == claims  # the claims follow from results.json alone
    text = (out / "report.md").read_text()
    assert "python -m ncfast.experiments.ncc_layers --quick" in text
    assert res["samples"] == {"train": 1437, "test": 360}  # digits' 80 / 20 split
    assert nl.sample_note(res["samples"]) in text
    assert "## How the verdicts are computed" in text and "One seed is one draw" in text
    # the runner's total time; each run's training time per seed under run_seconds
    assert res["seconds"] == res["report"]["seconds"] > sum(res["run_seconds"]["0"].values()) > 0
    assert set(res["run_seconds"]) == {"0"} and set(res["run_seconds"]["0"]) == set(nl.RUNS)
    assert res["config"] == nl.run_config({**nl.PRESETS["digits"], **nl.QUICK})
    assert res["report"]["preset"] == "digits" and res["report"]["quick"] is True


def _ordered_epochs(curves, split, it):
    n = 0
    for i, e in enumerate(curves["epochs"]):
        if e > it:
            v = [curves[split][name][i] for name in nl.LAYERS]
            n += all(a >= b for a, b in zip(v, v[1:]))
    return n


def test_quick_verdicts_follow_from_the_numbers(quick):
    _, res = quick
    claims = res["report"]["claims"]
    its = res["interpolation_epoch"]
    for k, run in enumerate(nl.RUNS):
        it = its[run]
        assert it is not None, "the quick run must reach the interpolation threshold"
        curves = res["curves"][run]
        tpt = sum(e > it for e in curves["epochs"])
        c7 = res["conjecture7"][run]
        counts = {}
        for split in nl.SPLITS:
            assert c7[split]["epochs"] == tpt
            counts[split] = _ordered_epochs(curves, split, it)
            assert c7[split]["holds"] == counts[split]
        want = all(counts[s] >= 0.9 * tpt for s in nl.SPLITS)
        assert claims[k]["verdict"] == ("holds" if want else "does not hold")
        assert f"{counts['train']} of {tpt} TPT epochs, train" in claims[k]["ours"]
        # conjecture 8: IT against the last measured epoch, per layer
        i = curves["epochs"].index(it)
        ok = all(curves[s][name][i] >= curves[s][name][-1] for s in nl.SPLITS for name in nl.LAYERS)
        assert claims[2 + k]["verdict"] == ("holds" if ok else "does not hold")
    # conjecture 11 over the epochs in the TPT of both runs
    common = [e for e in res["curves"]["vanilla"]["epochs"] if e > max(its.values())]
    c11 = res["conjecture11"]
    for split in nl.SPLITS:
        assert c11[split]["epochs"] == common
        v, s = res["curves"]["vanilla"][split], res["curves"]["svsl"][split]
        idx = [res["curves"]["vanilla"]["epochs"].index(e) for e in common]
        held = sum(v[name][i] >= s[name][i] for name in nl.LAYERS for i in idx)
        assert c11[split]["holds"] == held and c11[split]["pairs"] == len(nl.LAYERS) * len(common)
    ok11 = all(c11[s]["holds"] >= 0.9 * c11[s]["pairs"] for s in nl.SPLITS)
    assert claims[4]["verdict"] == ("holds" if ok11 else "does not hold")
    t = res["table1"]
    assert claims[5]["verdict"] == ("holds" if t["svsl"]["eot"] > t["vanilla"]["eot"] else "does not hold")


def test_quick_table1_from_history(quick):
    out, res = quick
    for run in nl.RUNS:
        hist = [json.loads(line) for line in (out / run / "history.jsonl").read_text().splitlines()]
        summary = json.loads((out / run / "summary.json").read_text())
        it = res["interpolation_epoch"][run]
        assert it == summary["interpolation_epoch"]  # the trainer's own IT agrees
        acc = {r["epoch"]: r["test_acc"] for r in hist if r["epoch"] > 0}
        row = res["table1"][run]
        assert row["it"] == acc[it] and row["eot"] == acc[max(acc)] == summary["test_accuracy"]
        assert row["best"] == max(acc.values()) and acc[row["best_epoch"]] == row["best"]
        assert row["best_in_tpt"] == (row["best_epoch"] > it)
    text = (out / "report.md").read_text()
    v, s = res["table1"]["vanilla"], res["table1"]["svsl"]
    assert f"| ours | {100 * v['it']:.2f} | {100 * s['it']:.2f} | {100 * v['eot']:.2f} | {100 * s['eot']:.2f} |" in text
    assert "| paper, MNIST | 99.37 | 99.36 | 99.61 | 99.69 |" in text


def test_quick_svsl_run_is_configured_as_the_paper(quick):
    out, res = quick
    vanilla = json.loads((out / "vanilla" / "summary.json").read_text())["config"]
    svsl = json.loads((out / "svsl" / "summary.json").read_text())["config"]
    assert vanilla["svsl_alpha"] == 0.0
    assert svsl["svsl_alpha"] == 1e-5 and svsl["svsl_from"] == "layer1"  # Table 2, MNIST
    assert vanilla["layers"] == svsl["layers"] == nl.LAYERS
    assert {k: v for k, v in vanilla.items() if not k.startswith("svsl") and k != "out"} == {
        k: v for k, v in svsl.items() if not k.startswith("svsl") and k != "out"
    }


def _features(model, name, x):
    store = []
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: store.append(o.reshape(o.shape[0], -1)))
    with torch.no_grad():
        logits = model(x)
    h.remove()
    return store[0].double().numpy(), logits.double().numpy()


def test_quick_mismatch_agrees_with_numpy(quick):
    """The last epoch's NCC mismatch of layer2 and of the output layer, train and test (test against
    the TRAIN class means, def. 6), recomputed with numpy from the saved model."""
    out, res = quick
    state = torch.load(out / "vanilla" / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = dict(state["config"], device="cpu")
    trainer = Trainer(Config(**cfg))
    trainer.model.load_state_dict(state["model"])
    model = trainer.model.eval()
    y_train = trainer.y["train"].numpy()
    for name in ("layer2", "head"):
        h_train, _ = _features(model, name, trainer.x["train"])
        means = np.stack([h_train[y_train == c].mean(0) for c in range(10)])
        for split in nl.SPLITS:
            h, logits = _features(model, name, trainer.x[split])
            nearest = ((h[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
            want = float(np.mean(nearest != logits.argmax(1)))
            got = res["curves"]["vanilla"][split][name][-1]
            # one sample may flip on a near-tie between batch sizes' float32 rounding
            assert abs(got - want) <= 1.0 / h.shape[0] + 1e-12, (name, split, got, want)


# -------------------------------------------------------------------------------- pure functions
def _curves(epochs, train, test=None):
    """Curves over nl-style layers from {layer: values}."""
    return {"epochs": list(epochs), "train": train, "test": test if test is not None else train}


def test_interpolation_epoch():
    h = [
        {"epoch": 0, "train_acc": 1.0},
        {"epoch": 1, "train_acc": 0.9},
        {"epoch": 2, "train_acc": 0.995},
        {"epoch": 3, "train_acc": 0.99},
    ]
    assert nl.interpolation_epoch(h) == 2  # epoch 0 never counts; equality reaches the threshold
    assert nl.interpolation_epoch(h, threshold=0.999) is None
    assert nl.interpolation_epoch([{"epoch": 1, "train_acc": None}, {"epoch": 2, "train_acc": 1.0}]) == 2
    assert nl.in_tpt(3, 2) and not nl.in_tpt(2, 2) and not nl.in_tpt(5, None)


def test_ordering_counts_tpt_epochs_and_violations():
    layers = ["a", "b", "c"]
    tr = {"a": [0.9, 0.5, 0.4, 0.3], "b": [0.95, 0.3, 0.3, 0.35], "c": [0.1, 0.1, 0.0, None]}
    r = nl.ordering(_curves([0, 1, 2, 3], tr), layers, it=0)
    # epoch 0 is the IT (not in the TPT); epoch 2 has a tie (ordered); epoch 3 has a None (skipped)
    assert r["train"]["epochs"] == 2 and r["train"]["holds"] == 2
    r = nl.ordering(_curves([0, 1, 2, 3], {**tr, "c": [0.1, 0.1, 0.0, 0.0]}), layers, it=0)
    assert r["train"]["epochs"] == 3 and r["train"]["holds"] == 2
    assert r["train"]["violations"] == [(3, "a", "b")]
    assert nl.ordering(_curves([0, 1], tr), layers, it=None)["test"]["epochs"] == 0


def test_it_vs_eot():
    layers = ["a", "b"]
    c = _curves([0, 2, 5], {"a": [0.9, 0.3, 0.2], "b": [0.9, 0.1, 0.1]}, {"a": [0.9, 0.3, 0.4], "b": [0.8, 0.1, 0.1]})
    r = nl.it_vs_eot(c, layers, it=2)
    assert r["train"]["holds"] == ["a", "b"] and r["test"]["fails"] == ["a"]
    assert r["test"]["it"] == {"a": 0.3, "b": 0.1} and r["test"]["eot"] == {"a": 0.4, "b": 0.1}
    assert nl.it_vs_eot(c, layers, it=3) is None  # IT not measured
    assert nl.it_vs_eot(c, layers, it=None) is None
    ours, holds = nl.verdict_it_eot(r, layers)
    assert holds is False and ours == "2 of 2 layers, train; 1 of 2 layers, test (not a)"
    assert nl.verdict_it_eot(None, layers)[1] is None


def test_svsl_vs_vanilla_uses_the_common_tpt():
    layers = ["a"]
    v = _curves([0, 1, 2, 3, 4], {"a": [0.9, 0.5, 0.2, 0.1, 0.1]})
    s = _curves([0, 1, 2, 4], {"a": [0.9, 0.1, 0.3, 0.1]})  # epoch 3 not measured for SVSL
    r = nl.svsl_vs_vanilla(v, s, layers, it_vanilla=1, it_svsl=0)
    assert r["train"]["epochs"] == [2, 4]  # after both ITs, measured in both
    assert (r["train"]["holds"], r["train"]["pairs"], r["train"]["ties"]) == (1, 2, 1)
    assert r["train"]["by_layer"]["a"][:2] == [1, 2]
    assert r["train"]["by_layer"]["a"][2] == pytest.approx(((0.2 - 0.3) + 0.0) / 2)
    ours, holds = nl.verdict_svsl(r)
    assert holds is False and "1 of 2 (epoch, layer) pairs, train (1 ties)" in ours
    empty = nl.svsl_vs_vanilla(v, s, layers, it_vanilla=None, it_svsl=0)
    assert empty["train"]["pairs"] == 0 and nl.verdict_svsl(empty)[1] is None


@pytest.mark.parametrize("held, total, want", [(9, 10, True), (8, 10, False), (10, 10, True), (0, 1, False)])
def test_verdict_ordering_threshold(held, total, want):
    r = {"train": {"holds": held, "epochs": total}, "test": {"holds": total, "epochs": total}}
    ours, holds = nl.verdict_ordering(r)
    assert holds is want and ours.startswith(f"ordered at {held} of {total} TPT epochs, train")
    r["test"]["holds"] = 0  # both splits must pass
    assert nl.verdict_ordering(r)[1] is False


def test_verdict_ordering_without_tpt():
    r = {"train": {"holds": 0, "epochs": 0}, "test": {"holds": 0, "epochs": 0}}
    assert nl.verdict_ordering(r)[1] is None


def test_accuracy_table():
    h = [
        {"epoch": 0, "test_acc": 0.99},
        {"epoch": 1, "test_acc": 0.5},
        {"epoch": 2, "test_acc": 0.8},
        {"epoch": 3, "test_acc": 0.9},
        {"epoch": 4, "test_acc": 0.9},
        {"epoch": 5, "test_acc": 0.85},
    ]
    t = nl.accuracy_table(h, it=3)
    # epoch 0 (untrained) is no candidate; the first of equal best values is the best epoch, the IT itself
    assert (t["it"], t["eot"], t["best"], t["best_epoch"], t["best_in_tpt"]) == (0.9, 0.85, 0.9, 3, False)
    t = nl.accuracy_table(h, it=2)
    assert t["best_in_tpt"] is True and t["it"] == 0.8
    t = nl.accuracy_table(h, it=None)
    assert t["it"] is None and t["best_in_tpt"] is None
    assert nl.accuracy_table([{"epoch": 0, "test_acc": 0.1}], it=None)["best"] is None


def _table(it_v, eot_v, it_s, eot_s, in_v=True, in_s=True):
    return {
        "vanilla": {"it": it_v, "eot": eot_v, "best": eot_v, "best_epoch": 9, "best_in_tpt": in_v, "it_epoch": 3},
        "svsl": {"it": it_s, "eot": eot_s, "best": eot_s, "best_epoch": 8, "best_in_tpt": in_s, "it_epoch": 2},
    }


def test_accuracy_verdicts():
    assert nl.verdict_test_gain(_table(0.9, 0.95, 0.9, 0.96))[1] is True
    assert nl.verdict_test_gain(_table(0.9, 0.95, 0.9, 0.95))[1] is False  # a tie is no improvement
    assert nl.verdict_test_gain(_table(0.9, None, 0.9, 0.95))[1] is None
    assert nl.verdict_best_in_tpt(_table(0.9, 0.95, 0.9, 0.96))[1] is True
    assert nl.verdict_best_in_tpt(_table(0.9, 0.95, 0.9, 0.96, in_s=False))[1] is False
    assert nl.verdict_best_in_tpt(_table(0.9, 0.95, 0.9, 0.96, in_v=None))[1] is None
    assert nl.verdict_tpt_gain(_table(0.9, 0.95, 0.9, 0.96))[1] is True
    assert nl.verdict_tpt_gain(_table(0.9, 0.95, 0.97, 0.96))[1] is False
    assert nl.verdict_tpt_gain(_table(None, 0.95, 0.97, 0.96))[1] is None


def test_table1_markdown():
    text = nl.table1_markdown(_table(0.9, 0.95, 0.91, 0.96, in_s=False), nl.PAPER["cifar10"])
    lines = text.splitlines()
    assert lines[2] == "| paper, CIFAR10 | 80.64 | 80.56 | 80.96 | 81.19 | 80.96 | Yes | 81.19 | Yes |"
    assert lines[3] == "| ours | 90.00 | 91.00 | 95.00 | 96.00 | 95.00 (ep. 9) | Yes | 96.00 (ep. 8) | No |"
    assert all(line.count("|") == 10 for line in lines)


@pytest.mark.parametrize(
    "it_v, it_s, want",
    [
        (3, 5, [(3, 5, "vanilla"), (5, 10, "both")]),
        (5, 3, [(3, 5, "svsl"), (5, 10, "both")]),
        (4, 4, [(4, 10, "both")]),
        (None, 4, [(4, 10, "svsl")]),
        (None, None, []),
        (10, 10, []),  # an IT at the last epoch leaves no TPT
    ],
)
def test_tpt_spans(it_v, it_s, want):
    assert nl.tpt_spans(it_v, it_s, 10) == want


def test_plot_mismatch_draws_degenerate_points_hollow(tmp_path):
    layers = ["a", "b"]
    c = _curves([0, 1, 2], {"a": [0.9, 0.2, 0.1], "b": [0.8, 0.1, None]})
    curves = {"vanilla": c, "svsl": c}
    marks = {run: {s: {"a": [False, False, True], "b": [False] * 3} for s in nl.SPLITS} for run in nl.RUNS}
    path = nl.plot_mismatch(curves, marks, layers, {"vanilla": 1, "svsl": None}, tmp_path / "f.png", "t")
    assert path.read_bytes()[:8] == PNG
    import matplotlib

    matplotlib.use("Agg")
    # the hollow markers: plot again capturing the figure
    import matplotlib.pyplot as plt

    created = []
    orig = plt.subplots

    def spy(*a, **k):
        fig, axes = orig(*a, **k)
        created.append(axes)
        return fig, axes

    plt.subplots = spy
    try:
        nl.plot_mismatch(curves, marks, layers, {"vanilla": 1, "svsl": None}, tmp_path / "g.png", "t")
    finally:
        plt.subplots = orig
    hollow = [
        ln
        for ax in created[0]
        for ln in ax.get_lines()
        if ln.get_marker() == "o" and ln.get_markerfacecolor() == "none"
    ]
    assert len(hollow) == 2 * len(nl.SPLITS)  # one per run per split, at the flagged point
    assert all(list(ln.get_xdata()) == [2] for ln in hollow)


def test_degenerate_marks_and_curves_from_records():
    rec = {
        "epoch": 4,
        "layers": {
            "a": {
                "train": {"ncc_mismatch": 0.1, "degenerate": ["ncc_mismatch"]},
                "test": {"ncc_mismatch": 0.2, "degenerate": []},
            }
        },
    }
    assert nl.mismatch_curves([rec], ["a", "b"]) == {
        "epochs": [4],
        "train": {"a": [0.1], "b": [None]},
        "test": {"a": [0.2], "b": [None]},
    }
    assert nl.degenerate_marks([rec], ["a"]) == {"train": {"a": [True]}, "test": {"a": [False]}}


def test_presets():
    assert list(nl.PRESETS) == list(nl.DRIVER.presets) == ["digits", "fashion-mnist", "cifar10", "cifar100"]
    digits = nl.run_config(nl.PRESETS["digits"])
    assert digits["layers"] == ["layer1", "layer2", "layer3", "layer4", "pool", "head"]
    assert digits["metrics_every"] == 1 and digits["augment"] is False and digits["it_threshold"] == 0.995
    assert not set(nl.DRIVER_KEYS) & set(digits)  # SVSL's settings and the seed count are not shared Config fields
    for name in ("cifar10", "cifar100"):
        cfg = nl.run_config(nl.PRESETS[name])
        assert cfg["dataset"] == name and cfg["epochs"] == 350 and cfg["batch_size"] == 128
        assert cfg["arch"] == ("resnet34" if name == "cifar100" else "resnet18")
    fashion = nl.run_config(nl.PRESETS["fashion-mnist"])  # CPU-sized: under 15 minutes on 2 cores
    assert fashion["dataset"] == "fashion-mnist" and fashion["train_subset"] == 5000 and fashion["width"] == 8
    assert nl.PRESETS["digits"]["seeds"] == 3 and nl.PRESETS["fashion-mnist"]["seeds"] == 1
    assert nl.QUICK == {"width": 8, "epochs": 12, "lr": 0.05, "seeds": 1}
    assert (nl.PAPER["cifar10"]["alpha"], nl.PAPER["cifar10"]["gamma"]) == (4e-6, "pool")
    for name, preset in nl.PRESETS.items():  # SVSL's alpha and gamma: the paper's Table 2
        assert (preset["svsl_alpha"], preset["svsl_from"]) == (nl.PAPER[name]["alpha"], nl.PAPER[name]["gamma"])
    # every SVSL gamma of the paper is one of the probed layers below the output
    assert all(p["gamma"] in nl.LAYERS[:-1] for p in nl.PAPER.values())


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--preset", "cifar10"], "--data"),
        (["--quick", "--preset", "cifar10"], "--quick"),
    ],
)
def test_bad_arguments_are_named(tmp_path, capsys, argv, needle):
    assert nl.main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing trained


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "0"],
        ["--metrics-every", "0"],
        ["--svsl-alpha", "-1"],
        ["--svsl-alpha", "nan"],
        ["--svsl-from", "head"],
        ["--seeds", "0"],
    ],
)
def test_bad_flag_values_are_argparse_errors(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        nl.main([*argv, "--quick", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing trained


def test_report_layer_table_marks_missing_it():
    curves = {run: _curves([0, 1], {n: [0.5, 0.25] for n in ["a"]}) for run in nl.RUNS}
    text = nl.layer_table_markdown(curves, ["a"], {"vanilla": 1, "svsl": None})
    row = text.splitlines()[2]
    assert row == "| a | 25.00 → 25.00 | 25.00 → 25.00 | n/a → 25.00 | n/a → 25.00 |"
    assert re.match(r"\| layer \| vanilla train IT → EOT", text)


@pytest.mark.parametrize("its", [{"vanilla": 2, "svsl": 1}, {"vanilla": None, "svsl": None}])
def test_plot_accuracy(tmp_path, its):
    h = [{"epoch": e, "train_acc": a, "test_acc": a - 0.05} for e, a in enumerate([0.1, 0.9, 1.0, 1.0])]
    path = nl.plot_accuracy({"vanilla": h, "svsl": h}, its, tmp_path / "a.png", "t")
    assert path.read_bytes()[:8] == PNG


def test_sample_note():
    assert (
        nl.sample_note({"train": 1437, "test": 360})
        == " One sample is 0.07 pp on train (1437 samples), 0.28 pp on test (360 samples) of NCC mismatch or accuracy."
    )
    assert nl.sample_note(None) == "" and nl.sample_note({}) == ""


@pytest.mark.parametrize("preset", ["digits", "fashion-mnist", "cifar10", "cifar100"])
def test_preset_configs_are_valid_trainer_configs(tmp_path, preset):
    """Every preset is a Config the trainer accepts, on a model that has every probed layer (the
    GPU presets cannot be trained here)."""
    from ncfast.train.models import build_model

    settings = nl.PRESETS[preset]
    nl.check(settings)
    cfg = Config(
        **nl.run_config(settings), out=str(tmp_path), svsl_alpha=settings["svsl_alpha"], svsl_from=settings["svsl_from"]
    )
    model = build_model(cfg.arch, 100 if preset == "cifar100" else 10, 1 if preset != "cifar10" else 3, 8, width=8)
    names = dict(model.named_modules())
    assert all(name in names for name in cfg.layers) and names["head"] is model.head


# ------------------------------------------------------------------------------------ several seeds
def _analysed(train_by_layer, it, eot_v=0.95, eot_s=0.96):
    """One seed's analyse()-shaped result on layers a, b over epochs 0..3: both runs share the curves."""
    layers = ["a", "b"]
    curves = {run: _curves([0, 1, 2, 3], train_by_layer) for run in nl.RUNS}
    its = {run: it for run in nl.RUNS}
    return {
        "layers": layers,
        "interpolation_epoch": its,
        "curves": curves,
        "table1": _table(0.9, eot_v, 0.9, eot_s),
        "conjecture7": {run: nl.ordering(curves[run], layers, it) for run in nl.RUNS},
        "conjecture8": {run: nl.it_vs_eot(curves[run], layers, it) for run in nl.RUNS},
        "conjecture11": nl.svsl_vs_vanilla(curves["vanilla"], curves["svsl"], layers, it, it),
    }


ORDERED = {"a": [0.9, 0.5, 0.4, 0.3], "b": [0.9, 0.4, 0.2, 0.1]}
UNORDERED = {"a": [0.9, 0.5, 0.1, 0.1], "b": [0.9, 0.4, 0.2, 0.2]}  # b > a at epochs 2, 3


def test_majority_rule():
    assert nl.majority([True, True, False]) == (True, 2, 3)
    assert nl.majority([True, False]) == (False, 1, 2)  # a tie does not hold
    assert nl.majority([None, True]) == (True, 1, 1)  # unmeasured seeds do not vote
    assert nl.majority([None, None]) == (None, 0, 0)


def test_pooled_claims_take_the_majority_and_pool_the_counts():
    per_seed = {0: _analysed(ORDERED, 1), 1: _analysed(UNORDERED, 1, eot_s=0.94), 2: _analysed(ORDERED, 1)}
    claims = nl.pooled_claims(per_seed)
    assert list(claims) == list(nl.CLAIM_KEYS)
    ours, holds = claims["c7_vanilla"]
    assert holds is True  # ordered in seeds 0 and 2 (2 TPT epochs each), not in seed 1
    assert ours == "holds in 2 of 3 seeds; ordered TPT epochs, pooled: 4 of 6, train; 4 of 6, test"
    # conjecture 8 (IT epoch 1 against the EOT): every layer falls in every seed, the unordered one too
    assert claims["c8_svsl"] == ("holds in 3 of 3 seeds", True)
    ours, holds = claims["c12"]
    assert holds is True and ours == "holds in 2 of 3 seeds; mean EOT test acc. 95.00% vanilla, 95.33% SVSL"
    # one seed: exactly that seed's verdicts
    assert nl.pooled_claims({5: per_seed[1]}) == nl.seed_claims(per_seed[1])
    assert nl.seed_claims(per_seed[1])["c7_vanilla"] == nl.verdict_ordering(per_seed[1]["conjecture7"]["vanilla"])


def test_pooled_claims_count_seeds_without_a_tpt():
    per_seed = {0: _analysed(ORDERED, None), 1: _analysed(UNORDERED, 1)}
    ours, holds = nl.pooled_claims(per_seed)["c7_svsl"]
    assert holds is False and ours.startswith("holds in 0 of 1 seeds (1 without a TPT)")
    assert nl.pooled_claims({0: _analysed(ORDERED, None), 1: _analysed(ORDERED, None)})["c11"][1] is None


def test_table1_markdown_one_row_per_seed():
    text = nl.table1_markdown(
        [("ours, seed 0", _table(0.9, 0.95, 0.91, 0.96)), ("ours, seed 1", _table(0.8, 0.85, 0.81, 0.86))],
        nl.PAPER["digits"],
    )
    lines = text.splitlines()
    assert lines[3].startswith("| ours, seed 0 | 90.00 | 91.00 |") and lines[4].startswith("| ours, seed 1 | 80.00 |")


def test_seeds_run_pairs_per_seed_and_report_the_majority(tmp_path):
    out = tmp_path / "s"
    assert nl.main(["--quick", "--seeds", "2", "--epochs", "3", "--seed", "4", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [4, 5] and set(res["per_seed"]) == {"4", "5"}
    for seed in (4, 5):
        for run in nl.RUNS:
            summary = json.loads((out / f"seed_{seed}" / run / "summary.json").read_text())
            assert summary["config"]["seed"] == seed and summary["config"]["epochs"] == 3
    assert not (out / "vanilla").exists()
    # the report's claims are the majority over the per-seed results in the JSON
    rows = _report_rows((out / "report.md").read_text())
    want = nl.pooled_claims({int(k): v for k, v in res["per_seed"].items()})
    assert [r[2:] for r in rows] == [(ours, verdict_word(h)) for ours, h in want.values()]
    # the first seed's analysis is the top level (figures and per-layer tables)
    assert res["interpolation_epoch"] == res["per_seed"]["4"]["interpolation_epoch"]
    assert set(res["run_seconds"]) == {"4", "5"}
    # Table 1 has one row per seed; the verdict rules name the seeds
    text = (out / "report.md").read_text()
    assert "| ours, seed 4 |" in text and "| ours, seed 5 |" in text
    assert "With 2 seeds (4, 5) a claim holds when it holds in more than half" in text
    assert [c.as_dict() for c in nl.claims(res)] == res["report"]["claims"]  # they follow from results.json


def verdict_word(holds):
    return "not measured" if holds is None else ("holds" if holds else "does not hold")
