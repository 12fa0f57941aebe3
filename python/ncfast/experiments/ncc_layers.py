"""Paper 003 (Ben-Shaul & Dekel, "Nearest class-center simplification through intermediate layers"):
NCC mismatch at every layer over training, the interpolation threshold and the terminal phase of training
(TPT), and the Stochastic Variability-Simplification Loss (SVSL).

    python -m ncfast.experiments.ncc_layers                          # digits, ResNet-18, 3 seeds
    python -m ncfast.experiments.ncc_layers --preset fashion-mnist   # a CPU-sized F-MNIST run
    python -m ncfast.experiments.ncc_layers --preset cifar10 --data ~/data
    python -m ncfast.experiments.ncc_layers --quick --seeds 2        # a smoke run, two seeds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..train.trainer import Config
from . import _common
from ._common import MISSING, number, percent

MOST = 0.9
"""A conjecture stated "in the TPT" holds when its inequalities hold at no less than this fraction
of the measured TPT epochs (or epoch-layer pairs), on each split."""
IT_THRESHOLD = 0.995
LAYERS = ["layer1", "layer2", "layer3", "layer4", "pool", "head"]
"""ResNet probe layers: the paper's {Layer1, Layer2, Layer3, Layer4, AvgPool, FC}, shallowest first."""
RUNS = ("vanilla", "svsl")
SPLITS = ("train", "test")

# Paper 003 Table 1 (test accuracy, %) and Table 2 (SVSL alpha, gamma), the rows our presets stand in for.
PAPER = {
    "digits": {
        "dataset": "MNIST",
        "alpha": 1e-5,
        "gamma": "layer1",
        "table1": {"vanilla": (99.37, 99.61, 99.65, True), "svsl": (99.36, 99.69, 99.69, True)},
    },
    "fashion-mnist": {
        "dataset": "Fashion MNIST",
        "alpha": 1e-5,
        "gamma": "layer1",
        "table1": {"vanilla": (91.78, 93.82, 93.93, True), "svsl": (93.13, 93.88, 94.03, True)},
    },
    "cifar10": {
        "dataset": "CIFAR10",
        "alpha": 4e-6,
        "gamma": "pool",
        "table1": {"vanilla": (80.64, 80.96, 80.96, True), "svsl": (80.56, 81.19, 81.19, True)},
    },
    "cifar100": {
        "dataset": "CIFAR100",
        "alpha": 1e-5,
        "gamma": "layer3",
        "table1": {"vanilla": (52.77, 53.31, 53.79, True), "svsl": (53.28, 54.29, 54.29, True)},
    },
}
"""table1[run] = (test acc at IT, at EOT, at the best test epoch, whether that epoch is in the TPT)."""
DRIVER_KEYS = ("svsl_alpha", "svsl_from", "seeds")
"""The settings that are not Config fields shared by both runs of a pair."""


def _preset(dataset: str, **fields) -> dict:
    base = {
        "arch": "resnet18",
        "width": 64,
        "batch_size": 128,
        "augment": False,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "layers": list(LAYERS),
        "it_threshold": IT_THRESHOLD,
        "clp_embed": "none",
        "schedule": "cosine",
        "seeds": 1,
        "svsl_alpha": PAPER[dataset]["alpha"],
        "svsl_from": PAPER[dataset]["gamma"],
    }
    return {**base, "dataset": dataset, **fields}


PRESETS = {
    "digits": _preset("digits", epochs=30, metrics_every=1, seeds=3),
    "fashion-mnist": _preset("fashion-mnist", width=8, train_subset=5000, epochs=30, metrics_every=2),
    "cifar10": _preset("cifar10", epochs=350, schedule="step", metrics_every=5),
    # the paper's ResNet-50 (bottleneck blocks) is not among the trainer's models; ResNet-34 has the same
    # four stages (layer1 .. layer4, so Table 2's "Layer 3" means the same)
    "cifar100": _preset("cifar100", arch="resnet34", epochs=350, schedule="step", metrics_every=5),
}
"""Per preset: the Config fields of both runs, SVSL's alpha and first layer (the paper's Table 2) and
the number of seeds (run pairs)."""
QUICK = {"width": 8, "epochs": 12, "lr": 0.05, "seeds": 1}


def run_config(settings: dict) -> dict:
    """The Config fields shared by both runs of a pair: the settings less DRIVER_KEYS."""
    return {k: (list(v) if k == "layers" else v) for k, v in settings.items() if k not in DRIVER_KEYS}


def check(settings: dict) -> None:
    """Refuse, before anything trains, what the trainer refuses: the SVSL run's Config."""
    Config(**run_config(settings), svsl_alpha=settings["svsl_alpha"], svsl_from=settings["svsl_from"])


# ------------------------------------------------------------------------------------ reading runs
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def interpolation_epoch(history: list[dict], threshold: float = IT_THRESHOLD) -> int | None:
    """The IT: the first epoch (> 0) whose train accuracy reaches ``threshold``; None if none does."""
    return next(
        (
            r["epoch"]
            for r in history
            if r["epoch"] > 0 and r.get("train_acc") is not None and r["train_acc"] >= threshold
        ),
        None,
    )


def in_tpt(epoch: int, it: int | None) -> bool:
    """Whether an epoch is in the terminal phase of training: after the IT."""
    return it is not None and epoch > it


def mismatch_curves(measured: list[dict], layers: list[str]) -> dict:
    """{"epochs": [...], split: {layer: [Lambda per measured epoch]}} from metrics.jsonl records
    (None where a value is missing)."""
    return {
        "epochs": [r["epoch"] for r in measured],
        **{
            split: {
                name: [r["layers"].get(name, {}).get(split, {}).get("ncc_mismatch") for r in measured]
                for name in layers
            }
            for split in SPLITS
        },
    }


def degenerate_marks(measured: list[dict], layers: list[str], key: str = "ncc_mismatch") -> dict:
    """{split: {layer: [bool per measured epoch]}}: whether the record lists ``key`` as degenerate
    (forced by the sample size; drawn hollow). NCC mismatch never is, but the figure honours it."""
    return {
        split: {
            name: [key in r["layers"].get(name, {}).get(split, {}).get("degenerate", ()) for r in measured]
            for name in layers
        }
        for split in SPLITS
    }


# ---------------------------------------------------------------------------------- the conjectures
def ordering(curves: dict, layers: list[str], it: int | None) -> dict:
    """Conjecture 7 on one run: at each measured TPT epoch, whether Lambda^(j) >= Lambda^(j+1) for
    every adjacent pair of ``layers`` (shallowest first), per split.

    Returns {split: {"holds": n epochs where the whole chain is ordered, "epochs": n TPT epochs,
    "violations": [(epoch, layer j, layer j+1), ...]}}."""
    out = {}
    for split in SPLITS:
        held, total, violations = 0, 0, []
        for i, e in enumerate(curves["epochs"]):
            values = [curves[split][name][i] for name in layers]
            if not in_tpt(e, it) or any(v is None for v in values):
                continue
            bad = [(e, layers[j], layers[j + 1]) for j in range(len(layers) - 1) if values[j] < values[j + 1]]
            total, held, violations = total + 1, held + (not bad), violations + bad
        out[split] = {"holds": held, "epochs": total, "violations": violations}
    return out


def it_vs_eot(curves: dict, layers: list[str], it: int | None) -> dict | None:
    """Conjecture 8 on one run: per split, the layers where Lambda at the IT >= Lambda at the EOT (the
    last measured epoch). {split: {"holds": [layers], "fails": [layers], "it": {layer: value},
    "eot": {layer: value}}}; None when the IT was not reached or not measured."""
    epochs = curves["epochs"]
    if it is None or it not in epochs:
        return None
    out = {}
    for split in SPLITS:
        at_it = {name: curves[split][name][epochs.index(it)] for name in layers}
        at_eot = {name: curves[split][name][-1] for name in layers}
        ok = [
            name
            for name in layers
            if at_it[name] is not None and at_eot[name] is not None and at_it[name] >= at_eot[name]
        ]
        out[split] = {"holds": ok, "fails": [name for name in layers if name not in ok], "it": at_it, "eot": at_eot}
    return out


def svsl_vs_vanilla(vanilla: dict, svsl: dict, layers: list[str], it_vanilla: int | None, it_svsl: int | None) -> dict:
    """Conjecture 11: over the epochs measured in both runs and in the TPT of both, and every layer,
    whether Lambda_vanilla >= Lambda_SVSL, per split. {split: {"holds": n pairs, "pairs": n,
    "ties": n pairs with equal values, "epochs": [common TPT epochs], "by_layer": {layer: [holds,
    pairs, mean vanilla - mean SVSL over those epochs]}}}."""
    common = [e for e in vanilla["epochs"] if e in svsl["epochs"] and in_tpt(e, it_vanilla) and in_tpt(e, it_svsl)]
    out = {}
    for split in SPLITS:
        by_layer, ties = {}, 0
        for name in layers:
            both = [
                (vanilla[split][name][vanilla["epochs"].index(e)], svsl[split][name][svsl["epochs"].index(e)])
                for e in common
            ]
            both = [(a, b) for a, b in both if a is not None and b is not None]
            ties += sum(a == b for a, b in both)
            gap = float(np.mean([a - b for a, b in both])) if both else None
            by_layer[name] = [sum(a >= b for a, b in both), len(both), gap]
        out[split] = {
            "holds": sum(v[0] for v in by_layer.values()),
            "pairs": sum(v[1] for v in by_layer.values()),
            "ties": ties,
            "epochs": common,
            "by_layer": by_layer,
        }
    return out


def _most(held: int, total: int) -> bool | None:
    return None if total == 0 else held >= MOST * total


def verdict_ordering(result: dict) -> tuple[str, bool | None]:
    """(our number, holds) of conjecture 7 on one run: holds when the chain is ordered at >= MOST of
    the TPT epochs on train and on test; None (not measured) without TPT epochs."""
    tr, te = result["train"], result["test"]
    if tr["epochs"] == 0 or te["epochs"] == 0:
        return "no measured TPT epoch (the IT was not reached)", None
    ours = f"ordered at {tr['holds']} of {tr['epochs']} TPT epochs, train; {te['holds']} of {te['epochs']}, test"
    return ours, bool(_most(tr["holds"], tr["epochs"]) and _most(te["holds"], te["epochs"]))


def verdict_it_eot(result: dict | None, layers: list[str]) -> tuple[str, bool | None]:
    """(our number, holds) of conjecture 8 on one run: holds when Lambda_IT >= Lambda_EOT at every
    layer on both splits."""
    if result is None:
        return "the IT was not reached (or not measured)", None
    ours = "; ".join(
        f"{len(result[s]['holds'])} of {len(layers)} layers, {s}"
        + (" (not " + ", ".join(result[s]["fails"]) + ")" if result[s]["fails"] else "")
        for s in SPLITS
    )
    return ours, all(not result[s]["fails"] for s in SPLITS)


def verdict_svsl(result: dict) -> tuple[str, bool | None]:
    """(our number, holds) of conjecture 11: holds when vanilla >= SVSL at >= MOST of the
    (epoch, layer) pairs of the common TPT on train and on test."""
    tr, te = result["train"], result["test"]
    if tr["pairs"] == 0 or te["pairs"] == 0:
        return "no epoch in the TPT of both runs", None
    ours = (
        f"vanilla >= SVSL at {tr['holds']} of {tr['pairs']} (epoch, layer) pairs, train ({tr['ties']} ties); "
        f"{te['holds']} of {te['pairs']}, test ({te['ties']} ties)"
    )
    return ours, bool(_most(tr["holds"], tr["pairs"]) and _most(te["holds"], te["pairs"]))


def accuracy_table(history: list[dict], it: int | None) -> dict:
    """Table 1's row for one run from its history.jsonl: test accuracy at the IT, at the EOT (last
    epoch) and at the best epoch (the first epoch >= 1 with the highest test accuracy), and whether
    that epoch is in the TPT (after the IT). Accuracies as fractions; None where undefined."""
    rows = [r for r in history if r["epoch"] > 0 and r.get("test_acc") is not None]
    if not rows:
        return {"it": None, "eot": None, "best": None, "best_epoch": None, "best_in_tpt": None, "it_epoch": it}
    acc = {r["epoch"]: r["test_acc"] for r in rows}
    best = max(rows, key=lambda r: r["test_acc"])  # max keeps the first of equal values
    return {
        "it": acc.get(it) if it is not None else None,
        "eot": rows[-1]["test_acc"],
        "best": best["test_acc"],
        "best_epoch": best["epoch"],
        "best_in_tpt": in_tpt(best["epoch"], it) if it is not None else None,
        "it_epoch": it,
        "eot_epoch": rows[-1]["epoch"],
    }


def verdict_test_gain(table: dict) -> tuple[str, bool | None]:
    """(our number, holds) of conjecture 12: SVSL's EOT test accuracy strictly above vanilla's."""
    v, s = table["vanilla"]["eot"], table["svsl"]["eot"]
    if v is None or s is None:
        return "no test accuracy", None
    return f"EOT test acc. {percent(v, 2)} vanilla, {percent(s, 2)} SVSL", s > v


def verdict_best_in_tpt(table: dict) -> tuple[str, bool | None]:
    """(our number, holds) of Table 1's "In TPT" column: the best test epoch of both runs lies in the TPT."""
    flags = [table[run]["best_in_tpt"] for run in RUNS]
    if any(f is None for f in flags):
        return "the IT was not reached", None
    ours = "; ".join(
        f"{run}: best epoch {table[run]['best_epoch']} (IT {table[run]['it_epoch']}), "
        f"{'in' if table[run]['best_in_tpt'] else 'not in'} TPT"
        for run in RUNS
    )
    return ours, all(flags)


def verdict_tpt_gain(table: dict) -> tuple[str, bool | None]:
    """(our number, holds) of "both models improve in terms of test-performance during the TPT"
    (Fig. 1, Table 1: EOT > IT): holds when EOT test accuracy is strictly above the IT's in both runs."""
    if any(table[run]["it"] is None for run in RUNS):
        return "the IT was not reached", None
    ours = "; ".join(f"{run} {percent(table[run]['it'], 2)} -> {percent(table[run]['eot'], 2)}" for run in RUNS)
    return ours, all(table[run]["eot"] > table[run]["it"] for run in RUNS)


def analyse(folders: dict, layers: list[str], threshold: float = IT_THRESHOLD) -> dict:
    """Everything the report rests on, from the run folders' metrics.jsonl and history.jsonl
    ({"vanilla": folder, "svsl": folder})."""
    history = {run: read_jsonl(Path(f) / "history.jsonl") for run, f in folders.items()}
    measured = {run: read_jsonl(Path(f) / "metrics.jsonl") for run, f in folders.items()}
    its = {run: interpolation_epoch(history[run], threshold) for run in RUNS}
    curves = {run: mismatch_curves(measured[run], layers) for run in RUNS}
    same = [
        (a, b)
        for a, b in zip(layers, layers[1:])
        if all(curves[run][s][a] == curves[run][s][b] for run in RUNS for s in SPLITS)
    ]
    return {
        "identical_layers": same,
        "layers": layers,
        "it_threshold": threshold,
        "interpolation_epoch": its,
        "history": history,
        "curves": curves,
        "degenerate": {run: degenerate_marks(measured[run], layers) for run in RUNS},
        "table1": {run: accuracy_table(history[run], its[run]) for run in RUNS},
        "conjecture7": {run: ordering(curves[run], layers, its[run]) for run in RUNS},
        "conjecture8": {run: it_vs_eot(curves[run], layers, its[run]) for run in RUNS},
        "conjecture11": svsl_vs_vanilla(curves["vanilla"], curves["svsl"], layers, its["vanilla"], its["svsl"]),
    }


# ------------------------------------------------------------------------------------------ seeds
CLAIM_KEYS = ("c7_vanilla", "c7_svsl", "c8_vanilla", "c8_svsl", "c11", "c12", "best_in_tpt", "tpt_gain")


def seed_claims(results: dict) -> dict:
    """{claim key: (our number, holds)} of one seed's run pair (``analyse``'s output), in report order."""
    t = results["table1"]
    out = {f"c7_{run}": verdict_ordering(results["conjecture7"][run]) for run in RUNS}
    out.update({f"c8_{run}": verdict_it_eot(results["conjecture8"][run], results["layers"]) for run in RUNS})
    out.update(
        c11=verdict_svsl(results["conjecture11"]),
        c12=verdict_test_gain(t),
        best_in_tpt=verdict_best_in_tpt(t),
        tpt_gain=verdict_tpt_gain(t),
    )
    return out


def majority(flags) -> tuple[bool | None, int, int]:
    """(verdict, k, m) over seeds: m seeds with a measured verdict, k of them holding; the claim holds
    when k > m / 2 (a tie does not hold), None when no seed measured it."""
    measured = [f for f in flags if f is not None]
    k, m = sum(bool(f) for f in measured), len(measured)
    return (None if m == 0 else k > m / 2), k, m


def pooled_claims(per_seed: dict) -> dict:
    """{claim key: (our number, holds)} over several seeds ({seed: analyse output}): each claim holds
    when it holds in more than half of the seeds that measured it (``majority``); the text gives that
    count and the counts pooled over the seeds (conjectures 7 and 11), the failing layers
    (conjecture 8) or the mean accuracies (conjecture 12, Table 1). One seed: that seed's claims."""
    seeds, rs = list(per_seed), list(per_seed.values())
    each = {s: seed_claims(r) for s, r in per_seed.items()}
    if len(seeds) == 1:
        return each[seeds[0]]

    def pooled(results: list[dict], total: str) -> str:  # 'held of total, train; held of total, test'
        return "; ".join(
            f"{sum(r[sp]['holds'] for r in results)} of {sum(r[sp][total] for r in results)}, {sp}" for sp in SPLITS
        )

    def mean(run: str, at: str) -> str:  # the mean accuracy over the seeds that measured it
        values = [r["table1"][run][at] for r in rs if r["table1"][run][at] is not None]
        return percent(float(np.mean(values)) if values else None, 2)

    def fails(run: str) -> str:  # conjecture 8's failing layers, seed by seed
        c8 = {s: r["conjecture8"][run] for s, r in per_seed.items() if r["conjecture8"][run] is not None}
        return "".join(
            f"; seed {s} {sp}: not {', '.join(r[sp]['fails'])}"
            for s, r in c8.items()
            for sp in SPLITS
            if r[sp]["fails"]
        )

    detail = {
        **{
            f"c7_{run}": "; ordered TPT epochs, pooled: " + pooled([r["conjecture7"][run] for r in rs], "epochs")
            for run in RUNS
        },
        **{f"c8_{run}": fails(run) for run in RUNS},
        "c11": "; vanilla >= SVSL (epoch, layer) pairs, pooled: " + pooled([r["conjecture11"] for r in rs], "pairs"),
        "c12": f"; mean EOT test acc. {mean('vanilla', 'eot')} vanilla, {mean('svsl', 'eot')} SVSL",
        "best_in_tpt": "",
        "tpt_gain": f"; mean IT -> EOT: vanilla {mean('vanilla', 'it')} -> {mean('vanilla', 'eot')}, "
        f"SVSL {mean('svsl', 'it')} -> {mean('svsl', 'eot')}",
    }
    out = {}
    for key in CLAIM_KEYS:
        holds, k, m = majority(each[s][key][1] for s in seeds)
        tally = f"holds in {k} of {m} seeds" + (f" ({len(seeds) - m} without a TPT)" if m < len(seeds) else "")
        out[key] = (tally + detail[key], holds)
    return out


# ------------------------------------------------------------------------------------------- tables
def table1_markdown(rows, paper: dict) -> str:
    """Table 1 of the paper with its row (for the data set the preset stands in for) beside ours:
    ``rows`` is one run pair's table (row "ours") or a list of (label, table), one row each (seeds)."""
    rows = [("ours", rows)] if isinstance(rows, dict) else list(rows)
    yes = {True: "Yes", False: "No", None: MISSING}
    pv, ps = paper["table1"]["vanilla"], paper["table1"]["svsl"]
    cells = [
        [
            f"paper, {paper['dataset']}",
            *(number(x, ".2f") for x in (pv[0], ps[0], pv[1], ps[1], pv[2])),
            yes[pv[3]],
            number(ps[2], ".2f"),
            yes[ps[3]],
        ]
    ]
    for label, t in rows:
        v, s = t["vanilla"], t["svsl"]
        cells.append(
            [
                label,
                *(percent(x, 2, sign="") for x in (v["it"], s["it"], v["eot"], s["eot"])),
                f"{percent(v['best'], 2, sign='')} (ep. {v['best_epoch']})",
                yes[v["best_in_tpt"]],
                f"{percent(s['best'], 2, sign='')} (ep. {s['best_epoch']})",
                yes[s["best_in_tpt"]],
            ]
        )
    return _common.table(
        ["", "IT vanilla", "IT SVSL", "EOT vanilla", "EOT SVSL", "best vanilla", "in TPT", "best SVSL", "in TPT"], cells
    )


def layer_table_markdown(curves: dict, layers: list[str], its: dict) -> str:
    """NCC mismatch (%) of every layer at the IT and at the EOT, both runs and splits."""

    def cell(run: str, split: str, name: str) -> str:
        c, it = curves[run], its[run]
        at_it = c[split][name][c["epochs"].index(it)] if it in c["epochs"] else None
        return f"{percent(at_it, 2, sign='')} → {percent(c[split][name][-1], 2, sign='')}"

    return _common.table(
        ["layer", *(f"{run} {split} IT → EOT" for run in RUNS for split in SPLITS)],
        [[name, *(cell(run, split, name) for run in RUNS for split in SPLITS)] for name in layers],
    )


def svsl_table_markdown(c11: dict, layers: list[str]) -> str:
    """Conjecture 11 per layer: how often vanilla >= SVSL and the mean gap (pp), on each split."""

    def cells(held: int, pairs: int, gap: float | None) -> list[str]:
        return [f"{held} of {pairs}", number(None if gap is None else 100 * gap, "+.2f")]

    rows = [[name, *(c for split in SPLITS for c in cells(*c11[split]["by_layer"][name]))] for name in layers]
    return _common.table(
        ["layer", "train: vanilla ≥ SVSL", "mean gap train (pp)", "test: vanilla ≥ SVSL", "mean gap test (pp)"], rows
    )


def sample_note(samples: dict | None) -> str:
    """How much one sample moves the mismatch (and the accuracy) on each split: a failed inequality
    of one sample's size is within the resolution of the split."""
    if not samples:
        return ""
    parts = [f"{100 / n:.2f} pp on {split} ({n} samples)" for split, n in samples.items() if n]
    return " One sample is " + ", ".join(parts) + " of NCC mismatch or accuracy."


# ------------------------------------------------------------------------------------------ figures
TPT_COLOURS = {"vanilla": "#f4a6c8", "svsl": "#9ec5f0", "both": "#c8a2e8"}


def tpt_spans(it_vanilla: int | None, it_svsl: int | None, last: int) -> list[tuple[float, float, str]]:
    """The shaded background of the paper's Fig. 2: (start, end, who) intervals, who in "vanilla",
    "svsl" (one run in its TPT) or "both" (purple). A run's TPT is the span from its IT to ``last``."""
    starts = {run: it for run, it in (("vanilla", it_vanilla), ("svsl", it_svsl)) if it is not None and it < last}
    if len(starts) < 2:
        return [(s, last, run) for run, s in starts.items()]
    first, second = min(starts, key=lambda r: (starts[r], r)), max(starts.values())
    return ([(starts[first], second, first)] if starts[first] < second else []) + [(second, last, "both")]


def _shade(ax, spans: list) -> None:
    for lo, hi, who in spans:
        ax.axvspan(lo, hi, color=TPT_COLOURS[who], alpha=0.35, lw=0, zorder=0)


def _tpt_handles(spans: list) -> list:
    from matplotlib.patches import Patch

    label = {"vanilla": "TPT vanilla", "svsl": "TPT SVSL", "both": "TPT both"}
    return [Patch(color=TPT_COLOURS[w], alpha=0.5, label=label[w]) for w in dict.fromkeys(s[2] for s in spans)]


def plot_mismatch(curves: dict, marks: dict, layers: list[str], its: dict, path: Path, title: str) -> Path:
    """The paper's Fig. 2 for one data set: NCC mismatch per layer over epochs, train (top) and test
    (bottom); solid vanilla, dashed SVSL; the TPT shaded; the y axis linear below 1%, logarithmic
    above (the paper's is linear: its 350 epochs leave room to see the TPT). Degenerate values (none
    expected for NCC mismatch) are drawn as hollow markers."""
    plt = _common.pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 1, figsize=(6.4, 6.6), sharex=True)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(layers)))
    spans = tpt_spans(its["vanilla"], its["svsl"], max(max(curves[run]["epochs"]) for run in RUNS))
    for ax, split in zip(axes, SPLITS):
        _shade(ax, spans)
        for colour, name in zip(colours, layers):
            for run, style in (("vanilla", "-"), ("svsl", "--")):
                c = curves[run]
                ys = np.array([np.nan if v is None else v for v in c[split][name]], dtype=float)
                hollow = np.array(marks[run][split][name], dtype=bool)
                ax.plot(c["epochs"], np.where(hollow, np.nan, ys), style, color=colour, lw=1.4)
                if hollow.any():
                    ax.plot(np.array(c["epochs"])[hollow], ys[hollow], "o", mfc="none", color=colour)
        # symlog: linear below 1% (one sample is 0.07% of digits' train split), logarithmic above, so
        # that the TPT's small differences between layers and runs are visible beside the early 90%
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"{split} NCC mismatch")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(
        handles=[Line2D([], [], color=c, lw=2, label=n) for c, n in zip(colours, layers)],
        fontsize=7,
        ncol=2,
        loc="upper right",
        title="layer",
        title_fontsize=7,
    )
    axes[1].legend(
        handles=[
            Line2D([], [], color="k", ls="-", label="vanilla"),
            Line2D([], [], color="k", ls="--", label="SVSL"),
            *_tpt_handles(spans),
        ],
        fontsize=7,
        loc="upper right",
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _common.save_figure(fig, path, dpi=80)


def plot_accuracy(histories: dict, its: dict, path: Path, title: str) -> Path:
    """The paper's Fig. 1: train and test accuracy of both runs over epochs, the TPT shaded
    (vanilla pink, SVSL blue, as the paper), and the test accuracy again from the first IT on, zoomed."""
    plt = _common.pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    spans = tpt_spans(its["vanilla"], its["svsl"], max(r["epoch"] for h in histories.values() for r in h))
    colour = {"vanilla": "#d6337f", "svsl": "#1f5fbf"}
    first_it = min((it for it in its.values() if it is not None), default=None)
    panels = [("train", None), ("test", None)] + ([("test", first_it)] if first_it is not None else [])
    for ax, (split, start) in zip(axes, panels):
        _shade(ax, [(max(lo, start or 0), hi, who) for lo, hi, who in spans])
        for run in RUNS:
            rows = [r for r in histories[run] if r.get(f"{split}_acc") is not None and r["epoch"] >= (start or 0)]
            ax.plot(
                [r["epoch"] for r in rows],
                [r[f"{split}_acc"] for r in rows],
                color=colour[run],
                marker="." if start is not None else None,
                label="vanilla" if run == "vanilla" else "SVSL",
            )
        ax.set_title(f"{split} accuracy" + ("" if start is None else f" from epoch {start} (first IT)"), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if first_it is None:
        axes[2].axis("off")
    axes[0].legend(handles=axes[0].get_legend_handles_labels()[0] + _tpt_handles(spans), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _common.save_figure(fig, path, dpi=80)


# -------------------------------------------------------------------------------------- the driver
def run(ctx: _common.Context) -> dict:
    """Train a vanilla / SVSL pair per seed (--seed, --seed + 1, ...) and analyse each pair; the first
    seed's analysis is the top level (figures and per-layer tables), every seed's under "per_seed"."""
    cfg, alpha, gamma = run_config(ctx.settings), ctx.settings["svsl_alpha"], ctx.settings["svsl_from"]
    seeds = [ctx.seed + i for i in range(ctx.settings["seeds"])]
    per_seed, seconds, sizes = {}, {}, None
    for seed in seeds:
        folder, runs = ctx.out if len(seeds) == 1 else ctx.out / f"seed_{seed}", {}
        for i, name in enumerate(RUNS, start=1):
            svsl = {"svsl_alpha": alpha, "svsl_from": gamma} if name == "svsl" else {}
            ctx.log(
                f"seed {seed}, run {i}/{len(RUNS)}: {name} ({cfg['arch']} width {cfg['width']} on "
                f"{cfg['dataset']}, {cfg['epochs']} epochs"
                f"{f', SVSL alpha {alpha:g} from {gamma}' if svsl else ''})"
            )
            runs[name] = ctx.train(folder / name, **cfg, seed=seed, **svsl)
            ctx.log(f"{name} done in {runs[name].seconds:.0f} s")
        per_seed[seed] = dict(analyse({r: folder / r for r in RUNS}, list(LAYERS), cfg["it_threshold"]), seed=seed)
        seconds[str(seed)] = {r: runs[r].seconds for r in RUNS}
        sizes = {split: int(runs["vanilla"].trainer.x[split].shape[0]) for split in SPLITS}
    results = dict(
        per_seed[seeds[0]],
        svsl_alpha=alpha,
        svsl_from=gamma,
        config=cfg,
        seeds=seeds,
        samples=sizes,
        paper=PAPER[ctx.preset],
        run_seconds=seconds,
        _quick=ctx.quick,
    )
    if len(seeds) > 1:
        results["per_seed"] = {str(sd): {k: v for k, v in r.items() if k != "history"} for sd, r in per_seed.items()}
    return results


def seed_results(results: dict) -> dict:
    """{seed: that seed's analysis}: "per_seed" with several seeds, else the top level."""
    if "per_seed" in results:
        return {int(sd): r for sd, r in results["per_seed"].items()}
    return {results["seed"]: results}


def _first(results: dict) -> str:
    """ " (seed S of the N)" where several seeds ran: the figures and per-layer tables are the first's."""
    seeds = results["seeds"]
    return f" (seed {seeds[0]} of the {len(seeds)})" if len(seeds) > 1 else ""


def claims(results: dict) -> list[_common.Claim]:
    """The paper's claims, each with our number and the majority verdict over the seeds (``pooled_claims``)."""
    paper, layers, ours = results["paper"], results["layers"], pooled_claims(seed_results(results))
    data, (pv, ps) = paper["dataset"], (paper["table1"]["vanilla"], paper["table1"]["svsl"])
    rows = [
        (
            f"c7_{run}",
            (f"Conj. 7, {run}: NCC mismatch falls with depth in the TPT, train and test ({' ≥ '.join(layers)})"),
            f"Fig. 2 ({data}): monotone in depth in the TPT",
        )
        for run in RUNS
    ]
    rows += [
        (
            f"c8_{run}",
            f"Conj. 8, {run}: at every layer, NCC mismatch at the IT ≥ at the EOT, train and test",
            f"Fig. 2 ({data}): decreases in the TPT",
        )
        for run in RUNS
    ]
    rows += [
        (
            "c11",
            (
                f"Conj. 11: SVSL (alpha {results['svsl_alpha']:g} from {results['svsl_from']}) lowers NCC "
                "mismatch at every layer in the TPT, train and test"
            ),
            f"Fig. 2 ({data}): lower for almost all layers",
        ),
        ("c12", "Conj. 12: SVSL improves the EOT test accuracy", f"{data}: {pv[1]:.2f}% vanilla, {ps[1]:.2f}% SVSL"),
        ("best_in_tpt", "Table 1: the best test epoch lies in the TPT (both runs)", f"{data}: Yes, Yes"),
        (
            "tpt_gain",
            "Fig. 1 / Table 1: test accuracy improves from the IT to the EOT (both runs)",
            f"{data}: vanilla {pv[0]:.2f}% -> {pv[1]:.2f}%, SVSL {ps[0]:.2f}% -> {ps[1]:.2f}%",
        ),
    ]
    return [_common.Claim(claim, paper_says, *ours[key]) for key, claim, paper_says in rows]


def figures(results: dict, out: Path) -> list[tuple[str, str]]:
    """The paper's Fig. 2 (ncc_mismatch.png) and Fig. 1 (accuracy.png), of the first seed."""
    cfg, its, first = results["config"], results["interpolation_epoch"], _first(results)
    svsl = f"alpha {results['svsl_alpha']:g} from {results['svsl_from']}"
    what = f"{'quick ' if results['_quick'] else ''}{cfg['dataset']}, {cfg['arch']} (width {cfg['width']})"
    plot_mismatch(
        results["curves"],
        results["degenerate"],
        results["layers"],
        its,
        out / "ncc_mismatch.png",
        f"{what}: vanilla (solid) vs SVSL (dashed, {svsl})",
    )
    plot_accuracy(results["history"], its, out / "accuracy.png", f"{what}: vanilla vs SVSL ({svsl})")
    return [
        (
            "ncc_mismatch.png",
            (
                f"NCC mismatch per layer{first} (top train, bottom test against the train class "
                f"means), solid vanilla, dashed SVSL; TPT shaded (pink vanilla from epoch {its['vanilla']}, blue SVSL "
                f"from epoch {its['svsl']}, purple both). The paper's Fig. 2."
            ),
        ),
        ("accuracy.png", f"Train and test accuracy of both runs{first}, TPT shaded (the paper's Fig. 1)."),
    ]


def sections(results: dict) -> list[tuple[str, str]]:
    """Table 1, the mismatch per layer at the IT and the EOT, conjecture 11 per layer, and how the
    verdicts are computed (from the seed count and the split sizes)."""
    per_seed, its, first = seed_results(results), results["interpolation_epoch"], _first(results)
    if len(per_seed) > 1:
        rows = [(f"ours, seed {sd}", r["table1"]) for sd, r in per_seed.items()]
        it_text = "; ".join(
            f"seed {sd}: vanilla {r['interpolation_epoch']['vanilla']}, SVSL {r['interpolation_epoch']['svsl']}"
            for sd, r in per_seed.items()
        )
        seeds = (
            f"With {len(per_seed)} seeds ({', '.join(map(str, per_seed))}) a claim holds when it holds in more "
            f"than half of the seeds that measured it; the counts after the tally are pooled over the seeds."
        )
    else:
        rows, it_text = results["table1"], f"vanilla: {its['vanilla']}, SVSL: {its['svsl']}"
        seeds = (
            "One seed is one draw: verdicts near the thresholds can turn with another seed or other float "
            "rounding (--seeds N runs N pairs and takes the majority)."
        )
    same = "".join(
        f" {a} and {b} have the same mismatch at every measured epoch of both runs"
        + (
            " (on 8 x 8 digits layer4's map is 1 x 1: the average pool changes nothing)."
            if (a, b) == ("layer4", "pool")
            else "."
        )
        for a, b in results["identical_layers"]
    )
    return [
        (
            "Table 1: test accuracy (%) at the IT, the EOT and the best test epoch",
            table1_markdown(rows, results["paper"]) + f"\n\nThe IT is the first epoch with train accuracy ≥ "
            f"{results['it_threshold']} ({it_text}); the TPT is the epochs after it. "
            "Read from each run's history.jsonl.",
        ),
        (
            f"NCC mismatch (%) per layer at the IT and at the EOT{first}",
            layer_table_markdown(results["curves"], results["layers"], its) + "\n\nThe paper's discussion: the first "
            "layer's train mismatch in the TPT hints at the data set's difficulty (~16% on MNIST, ~60% on CIFAR-10); "
            'where the mismatch reaches ~0 several layers before the output, NCC simplification "propagates back" '
            "(contribution ii)." + same,
        ),
        (
            f"Conjecture 11 per layer{first} (common TPT epochs; gap = mean vanilla − mean SVSL mismatch)",
            svsl_table_markdown(results["conjecture11"], results["layers"]),
        ),
        (
            "How the verdicts are computed",
            f"Every inequality is the paper's ≥ with no tolerance, over the measured epochs after the IT. Conjectures "
            f'7 and 11 ("in the TPT") hold when their inequalities hold at ≥ {MOST:.0%} of those epochs (conj. 11: '
            f"epoch-layer pairs, in the TPT of both runs), on train and on test; conjecture 8 when it holds at every "
            f"layer on both splits; conjecture 12 when SVSL's EOT test accuracy is strictly higher. Both runs of a "
            f"pair share the seed: same initial weights, same batches. " + seeds + sample_note(results.get("samples")),
        ),
    ]


DRIVER = _common.Driver(
    name="ncc_layers",
    title="Paper 003: NCC mismatch through intermediate layers, TPT and SVSL",
    usage=__doc__,
    presets=PRESETS,
    quick=QUICK,
    check=check,
    run=run,
    claims=claims,
    figures=figures,
    sections=sections,
    flags=[
        _common.flag("--epochs", type=_common.positive_int, help="training epochs (default: the preset's)"),
        _common.flag(
            "--svsl-alpha",
            type=_common.positive_float,
            help="SVSL alpha (default: the paper's Table 2 value for the data set)",
        ),
        _common.flag(
            "--svsl-from", choices=LAYERS[:-1], help="SVSL's first layer gamma (default: the paper's Table 2 layer)"
        ),
        _common.flag(
            "--metrics-every", type=_common.positive_int, help="measure every N epochs (default: the preset's)"
        ),
        _common.flag(
            "--seeds",
            type=_common.positive_int,
            help="run pairs with seeds --seed, --seed + 1, ...; each "
            "claim holds when it holds in more than half of them (default: 3 on digits, 1 otherwise)",
        ),
    ],
)


def main(argv=None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
