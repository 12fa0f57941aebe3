"""Paper 003 (Ben-Shaul & Dekel, "Nearest class-center simplification through intermediate layers"):
NCC mismatch at every layer over training, the interpolation threshold (IT) and the terminal phase of
training (TPT), and the Stochastic Variability-Simplification Loss (SVSL).

    python -m ncfast.experiments.ncc_layers                          # digits, ResNet-18, 3 seeds, minutes on 2 cores
    python -m ncfast.experiments.ncc_layers --preset fashion-mnist   # a CPU-sized F-MNIST run (5,000 images)
    python -m ncfast.experiments.ncc_layers --preset cifar10 --data ~/data

Two runs of the reference trainer with the same seed (same initial weights, same batches): vanilla
cross-entropy and SVSL, each with every ResNet stage AND the output layer probed: the paper's layers
{Layer1, Layer2, Layer3, Layer4, AvgPool, FC} are our ``layer1 .. layer4, pool, head`` (``head``'s
output is the logits g^(k)).

The paper's definitions, followed exactly:

- Def. 5/6 (layer j train / test NCC mismatch): Lambda^(j) = (1/N) |{ argmax_c' g(x_i)_c' !=
  argmin_c' ||g^(j)(x_i) - mu_c'^(j)||_2 }|, with mu^(j) the TRAIN class means of layer j (def. 1) on
  both splits. The trainer's probe computes it (``ncc_mismatch``); the test split is scored against
  the train means.
- Def. 10 (SVSL): L(y^_i, y_i) = CE(y^_i, y_i) + eta sum_{j=gamma..k} ||g^(j)(x_i) - mu_{c,B}^(j)||^2,
  eta = alpha / (C (k+1-gamma) |{i in B | y_i = c}|) (the trainer's ``svsl_alpha`` / ``svsl_from``;
  the layers run from gamma to the output layer k). Table 2: alpha = 1e-5 from Layer 1 on MNIST and
  F-MNIST, 4e-6 from AvgPool on CIFAR-10, 1e-5 from Layer 3 on CIFAR-100.
- IT: "We use a threshold of 0.995 for determining the Interpolation Threshold" (sec. 5.3; another
  sentence says 0.985, we use 0.995, docs/metrics.md's default): the IT is the first epoch whose train accuracy
  reaches it, and the TPT the epochs after it.
- Conjecture 7 (ordering): "In the TPT, for 1 <= j <= k, Lambda_Train^(j) >= Lambda_Train^(j+1) and
  Lambda_Test^(j) >= Lambda_Test^(j+1)".
- Conjecture 8 (NCC mismatch improves in TPT): "At each intermediate layer, both the train and test
  NCC mismatch decreases from the IT to the End of Training (EOT)": Lambda_IT^(j) >= Lambda_EOT^(j).
- Conjecture 11 (SVSL improves NCC mismatch): "In the TPT, for 1 <= j <= k,
  Lambda_Train,Vanilla^(j) >= Lambda_Train,SVSL^(j) and Lambda_Test,Vanilla^(j) >= Lambda_Test,SVSL^(j)".
- Conjecture 12 (SVSL can improve test performance): "The EOT test metrics are improved for all
  datasets using the SVSL and proper hyperparameter tuning."

How the verdicts are computed (``ordering``, ``it_vs_eot``, ``svsl_vs_vanilla``, the ``verdict_*``
functions): every inequality is the paper's ">=" with no tolerance, counted over the measured epochs
of the TPT (epochs > IT; for conjecture 11 the epochs in the TPT of both runs). A conjecture stated
"in the TPT" holds when its inequalities hold at no less than MOST = 90% of those epochs (or
epoch-layer pairs), on train and on test; conjecture 8 (one comparison per layer) holds when it holds
at every layer on both splits; conjecture 12 when SVSL's EOT test accuracy is strictly higher. With
``--seeds N`` the driver trains N vanilla / SVSL pairs (seeds --seed, --seed + 1, ...) and a claim
holds when it holds in more than half of the seeds that measured it (``majority``; a tie does not
hold). The digits preset takes three seeds: there many comparisons differ by one or two of the 360
test images, and one seed's verdicts on conjectures 7, 8 and 12 turned when the same command ran with
one BLAS thread instead of two (other float rounding).

Presets (the paper: ResNet-18 on MNIST, F-MNIST and CIFAR-10, ResNet-50 on CIFAR-100 and STL-10; SGD,
batch 128, 350 epochs, Papyan et al.'s protocol and logged hyper-parameters, which paper 003 does not
list; no augmentation is mentioned, Papyan et al. use none):

- ``digits`` (default): scikit-learn's 8 x 8 digits (1,437 train / 360 test), ResNet-18 width 64, no
  augmentation, SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine schedule, 30 epochs, measured
  every epoch, three seeds; SVSL with MNIST's alpha = 1e-5 from layer1. Not MNIST: far fewer, smaller
  images.
- ``fashion-mnist``: sized for 2 CPU cores: a seeded 5,000-image subset of the training set (all
  10,000 test images), ResNet-18 width 8, 30 epochs, cosine schedule, measured every 2 epochs and at
  the IT (the trainer always measures it), one seed; F-MNIST's alpha = 1e-5 from layer1. The paper's
  run (60,000 images, width 64, 350 epochs) takes a GPU and is not a preset.
- ``cifar10``: the full set, ResNet-18 width 64, 350 epochs, step schedule (/10 at 1/2 and 3/4 of
  training; Papyan et al. divide at 1/3 and 2/3), lr 0.01, measured every 5 epochs and at the IT;
  alpha = 4e-6 from pool (the paper's AvgPool). Meant for a GPU; ``--epochs`` and
  ``--metrics-every`` shorten it.
- ``cifar100``: as cifar10 but ResNet-34 (the paper uses ResNet-50, whose bottleneck blocks the trainer
  does not have; ResNet-34 has the same four stages); alpha = 1e-5 from layer3.
- ``--quick``: digits, ResNet-18 width 8, 12 epochs, lr 0.05: a smoke test (under a minute).

Writes to --out: report.md, results.json, ncc_mismatch.png (the paper's Fig. 2: NCC mismatch per layer
over epochs, train and test, solid vanilla and dashed SVSL, the TPT shaded pink for vanilla, blue for
SVSL, purple for both), accuracy.png (Fig. 1: train and test accuracy of both runs, TPT shaded), and
the trainer's run folders vanilla/ and svsl/ (metrics.jsonl, history.jsonl, summary.json, figures);
with several seeds seed_<S>/vanilla and seed_<S>/svsl, the figures and per-layer tables from the first
seed and Table 1 with one row per seed.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..train.figures import pyplot
from ._common import Report, check_preset, command, parser, run_main, train_run, verdict, write_json

NAME = "ncc_layers"
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
    "digits": {"dataset": "MNIST", "alpha": 1e-5, "gamma": "layer1",
               "table1": {"vanilla": (99.37, 99.61, 99.65, True), "svsl": (99.36, 99.69, 99.69, True)}},
    "fashion-mnist": {"dataset": "Fashion MNIST", "alpha": 1e-5, "gamma": "layer1",
                      "table1": {"vanilla": (91.78, 93.82, 93.93, True), "svsl": (93.13, 93.88, 94.03, True)}},
    "cifar10": {"dataset": "CIFAR10", "alpha": 4e-6, "gamma": "pool",
                "table1": {"vanilla": (80.64, 80.96, 80.96, True), "svsl": (80.56, 81.19, 81.19, True)}},
    "cifar100": {"dataset": "CIFAR100", "alpha": 1e-5, "gamma": "layer3",
                 "table1": {"vanilla": (52.77, 53.31, 53.79, True), "svsl": (53.28, 54.29, 54.29, True)}},
}
"""table1[run] = (test acc at IT, at EOT, at the best test epoch, whether that epoch is in the TPT)."""


SEEDS = {"digits": 3, "fashion-mnist": 1, "cifar10": 1, "cifar100": 1}
"""Run pairs per preset (--seeds): digits' verdicts rest on one or two test images of 360, so its
preset takes the majority of three seeds."""


def preset_config(preset: str, quick: bool = False) -> dict:
    """Config fields shared by both runs of a preset (everything but svsl_alpha / svsl_from)."""
    base = dict(arch="resnet18", width=64, batch_size=128, augment=False, lr=0.01, momentum=0.9,
                weight_decay=5e-4, layers=list(LAYERS), it_threshold=IT_THRESHOLD, clp_embed="none")
    if quick:
        return dict(base, dataset="digits", width=8, epochs=12, lr=0.05, schedule="cosine", metrics_every=1)
    if preset == "digits":
        return dict(base, dataset="digits", epochs=30, schedule="cosine", metrics_every=1)
    if preset == "fashion-mnist":
        return dict(base, dataset="fashion-mnist", width=8, train_subset=5000, epochs=30, schedule="cosine",
                    metrics_every=2)
    if preset in ("cifar10", "cifar100"):
        # CIFAR-100: the paper's ResNet-50 (bottleneck blocks) is not among the trainer's models; ResNet-34
        # has the same four stages (layer1 .. layer4, so Table 2's "Layer 3" means the same) and depth
        arch = "resnet34" if preset == "cifar100" else "resnet18"
        return dict(base, arch=arch, dataset=preset, epochs=350, schedule="step", metrics_every=5)
    raise ValueError(f"--preset: unknown preset {preset!r}")


# ------------------------------------------------------------------------------------ reading runs
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def interpolation_epoch(history: list[dict], threshold: float = IT_THRESHOLD) -> int | None:
    """The IT: the first epoch (> 0) whose train accuracy reaches ``threshold``; None if none does."""
    return next((r["epoch"] for r in history
                 if r["epoch"] > 0 and r.get("train_acc") is not None and r["train_acc"] >= threshold), None)


def in_tpt(epoch: int, it: int | None) -> bool:
    """Whether an epoch is in the terminal phase of training: after the IT."""
    return it is not None and epoch > it


def mismatch_curves(measured: list[dict], layers: list[str]) -> dict:
    """{"epochs": [...], split: {layer: [Lambda per measured epoch]}} from metrics.jsonl records
    (None where a value is missing)."""
    out = {"epochs": [r["epoch"] for r in measured]}
    for split in SPLITS:
        out[split] = {name: [r["layers"].get(name, {}).get(split, {}).get("ncc_mismatch") for r in measured]
                      for name in layers}
    return out


def degenerate_marks(measured: list[dict], layers: list[str], key: str = "ncc_mismatch") -> dict:
    """{split: {layer: [bool per measured epoch]}}: whether the record lists ``key`` as degenerate
    (forced by the sample size; drawn hollow). NCC mismatch never is, but the figure honours it."""
    return {split: {name: [key in r["layers"].get(name, {}).get(split, {}).get("degenerate", ())
                           for r in measured] for name in layers} for split in SPLITS}


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
            if not in_tpt(e, it):
                continue
            values = [curves[split][name][i] for name in layers]
            if any(v is None for v in values):
                continue
            total += 1
            bad = [(e, layers[j], layers[j + 1]) for j in range(len(layers) - 1) if values[j] < values[j + 1]]
            violations += bad
            held += not bad
        out[split] = {"holds": held, "epochs": total, "violations": violations}
    return out


def it_vs_eot(curves: dict, layers: list[str], it: int | None) -> dict:
    """Conjecture 8 on one run: per split, the layers where Lambda at the IT >= Lambda at the EOT (the
    last measured epoch). {split: {"holds": [layers], "fails": [layers], "it": {layer: value},
    "eot": {layer: value}}}; None when the IT was not reached or not measured."""
    epochs = curves["epochs"]
    if it is None or it not in epochs or not epochs:
        return None
    i, last = epochs.index(it), len(epochs) - 1
    out = {}
    for split in SPLITS:
        at_it = {name: curves[split][name][i] for name in layers}
        at_eot = {name: curves[split][name][last] for name in layers}
        ok = [name for name in layers if at_it[name] is not None and at_eot[name] is not None
              and at_it[name] >= at_eot[name]]
        out[split] = {"holds": ok, "fails": [name for name in layers if name not in ok], "it": at_it, "eot": at_eot}
    return out


def svsl_vs_vanilla(vanilla: dict, svsl: dict, layers: list[str], it_vanilla: int | None,
                    it_svsl: int | None) -> dict:
    """Conjecture 11: over the epochs measured in both runs and in the TPT of both, and every layer,
    whether Lambda_vanilla >= Lambda_SVSL, per split. {split: {"holds": n pairs, "pairs": n,
    "ties": n pairs with equal values, "epochs": [common TPT epochs], "by_layer": {layer: [holds,
    pairs, mean vanilla - mean SVSL over those epochs]}}}."""
    common = [e for e in vanilla["epochs"] if e in svsl["epochs"] and in_tpt(e, it_vanilla) and in_tpt(e, it_svsl)]
    out = {}
    for split in SPLITS:
        held = pairs = ties = 0
        by_layer = {}
        for name in layers:
            v = [vanilla[split][name][vanilla["epochs"].index(e)] for e in common]
            s = [svsl[split][name][svsl["epochs"].index(e)] for e in common]
            both = [(a, b) for a, b in zip(v, s) if a is not None and b is not None]
            h = sum(a >= b for a, b in both)
            held += h
            pairs += len(both)
            ties += sum(a == b for a, b in both)
            gap = float(np.mean([a - b for a, b in both])) if both else None
            by_layer[name] = [h, len(both), gap]
        out[split] = {"holds": held, "pairs": pairs, "ties": ties, "epochs": common, "by_layer": by_layer}
    return out


def _most(held: int, total: int) -> bool | None:
    return None if total == 0 else held >= MOST * total


def verdict_ordering(result: dict) -> tuple[str, bool | None]:
    """(our number, holds) of conjecture 7 on one run: holds when the chain is ordered at >= MOST of
    the TPT epochs on train and on test; None (not measured) without TPT epochs."""
    tr, te = result["train"], result["test"]
    if tr["epochs"] == 0 or te["epochs"] == 0:
        return "no measured TPT epoch (the IT was not reached)", None
    ours = (f"ordered at {tr['holds']} of {tr['epochs']} TPT epochs, train; "
            f"{te['holds']} of {te['epochs']}, test")
    return ours, bool(_most(tr["holds"], tr["epochs"]) and _most(te["holds"], te["epochs"]))


def verdict_it_eot(result: dict | None, layers: list[str]) -> tuple[str, bool | None]:
    """(our number, holds) of conjecture 8 on one run: holds when Lambda_IT >= Lambda_EOT at every
    layer on both splits."""
    if result is None:
        return "the IT was not reached (or not measured)", None
    parts = []
    for split in SPLITS:
        r = result[split]
        text = f"{len(r['holds'])} of {len(layers)} layers, {split}"
        if r["fails"]:
            text += " (not " + ", ".join(r["fails"]) + ")"
        parts.append(text)
    return "; ".join(parts), all(not result[s]["fails"] for s in SPLITS)


def verdict_svsl(result: dict) -> tuple[str, bool | None]:
    """(our number, holds) of conjecture 11: holds when vanilla >= SVSL at >= MOST of the
    (epoch, layer) pairs of the common TPT on train and on test."""
    tr, te = result["train"], result["test"]
    if tr["pairs"] == 0 or te["pairs"] == 0:
        return "no epoch in the TPT of both runs", None
    ours = (f"vanilla >= SVSL at {tr['holds']} of {tr['pairs']} (epoch, layer) pairs, train ({tr['ties']} ties); "
            f"{te['holds']} of {te['pairs']}, test ({te['ties']} ties)")
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
    return {"it": acc.get(it) if it is not None else None, "eot": rows[-1]["test_acc"], "best": best["test_acc"],
            "best_epoch": best["epoch"], "best_in_tpt": in_tpt(best["epoch"], it) if it is not None else None,
            "it_epoch": it, "eot_epoch": rows[-1]["epoch"]}


def verdict_test_gain(table: dict) -> tuple[str, bool | None]:
    """(our number, holds) of conjecture 12: SVSL's EOT test accuracy strictly above vanilla's."""
    v, s = table["vanilla"]["eot"], table["svsl"]["eot"]
    if v is None or s is None:
        return "no test accuracy", None
    return f"EOT test acc. {100 * v:.2f}% vanilla, {100 * s:.2f}% SVSL", s > v


def verdict_best_in_tpt(table: dict) -> tuple[str, bool | None]:
    """(our number, holds) of Table 1's "In TPT" column: the best test epoch of both runs lies in the TPT."""
    flags = [table[run]["best_in_tpt"] for run in RUNS]
    if any(f is None for f in flags):
        return "the IT was not reached", None
    ours = "; ".join(f"{run}: best epoch {table[run]['best_epoch']} (IT {table[run]['it_epoch']}), "
                     f"{'in' if table[run]['best_in_tpt'] else 'not in'} TPT" for run in RUNS)
    return ours, all(flags)


def verdict_tpt_gain(table: dict) -> tuple[str, bool | None]:
    """(our number, holds) of "both models improve in terms of test-performance during the TPT"
    (Fig. 1, Table 1: EOT > IT): holds when EOT test accuracy is strictly above the IT's in both runs."""
    if any(table[run]["it"] is None for run in RUNS):
        return "the IT was not reached", None
    ours = "; ".join(f"{run} {100 * table[run]['it']:.2f}% -> {100 * table[run]['eot']:.2f}%" for run in RUNS)
    return ours, all(table[run]["eot"] > table[run]["it"] for run in RUNS)


# ------------------------------------------------------------------------------------------- tables
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def table1_markdown(table, paper: dict) -> str:
    """Table 1 of the paper with its row (for the data set the preset stands in for) beside ours:
    ``table`` is one run pair's table (row "ours") or a list of (label, table), one row each (seeds)."""
    rows = [("ours", table)] if isinstance(table, dict) else list(table)
    lines = ["| | IT vanilla | IT SVSL | EOT vanilla | EOT SVSL | best vanilla | in TPT | best SVSL | in TPT |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    pv, ps = paper["table1"]["vanilla"], paper["table1"]["svsl"]
    yes = {True: "Yes", False: "No", None: "–"}
    lines.append(f"| paper, {paper['dataset']} | {pv[0]:.2f} | {ps[0]:.2f} | {pv[1]:.2f} | {ps[1]:.2f} | "
                 f"{pv[2]:.2f} | {yes[pv[3]]} | {ps[2]:.2f} | {yes[ps[3]]} |")
    for label, t in rows:
        v, s = t["vanilla"], t["svsl"]
        lines.append(f"| {label} | {_pct(v['it'])} | {_pct(s['it'])} | {_pct(v['eot'])} | {_pct(s['eot'])} | "
                     f"{_pct(v['best'])} (ep. {v['best_epoch']}) | {yes[v['best_in_tpt']]} | "
                     f"{_pct(s['best'])} (ep. {s['best_epoch']}) | {yes[s['best_in_tpt']]} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ seeds
CLAIM_KEYS = ("c7_vanilla", "c7_svsl", "c8_vanilla", "c8_svsl", "c11", "c12", "best_in_tpt", "tpt_gain")


def seed_claims(results: dict) -> dict:
    """{claim key: (our number, holds)} of one seed's run pair (``analyse``'s output), in report order."""
    layers, table = results["layers"], results["table1"]
    out = {f"c7_{run}": verdict_ordering(results["conjecture7"][run]) for run in RUNS}
    out.update({f"c8_{run}": verdict_it_eot(results["conjecture8"][run], layers) for run in RUNS})
    out.update(c11=verdict_svsl(results["conjecture11"]), c12=verdict_test_gain(table),
               best_in_tpt=verdict_best_in_tpt(table), tpt_gain=verdict_tpt_gain(table))
    return {k: out[k] for k in CLAIM_KEYS}


def majority(flags) -> tuple[bool | None, int, int]:
    """(verdict, k, m) over seeds: m seeds with a measured verdict, k of them holding; the claim holds
    when k > m / 2 (a tie does not hold), None when no seed measured it."""
    measured = [f for f in flags if f is not None]
    k, m = sum(bool(f) for f in measured), len(measured)
    return (None if m == 0 else k > m / 2), k, m


def _mean_pct(values) -> str:
    values = [v for v in values if v is not None]
    return "–" if not values else f"{100 * float(np.mean(values)):.2f}%"


def _pooled(results: list[dict], total: str) -> str:
    """'held of total, train; held of total, test' summed over several seeds' counts."""
    return "; ".join(f"{sum(r[sp]['holds'] for r in results)} of {sum(r[sp][total] for r in results)}, {sp}"
                     for sp in SPLITS)


def pooled_claims(per_seed: dict) -> dict:
    """{claim key: (our number, holds)} over several seeds ({seed: analyse output}): each claim holds
    when it holds in more than half of the seeds that measured it (``majority``); the text gives that
    count and the counts pooled over the seeds (conjectures 7 and 11), the failing layers
    (conjecture 8) or the mean accuracies (conjecture 12, Table 1). One seed: that seed's claims."""
    seeds = list(per_seed)
    each = {s: seed_claims(r) for s, r in per_seed.items()}
    if len(seeds) == 1:
        return each[seeds[0]]
    out = {}
    for key in CLAIM_KEYS:
        holds, k, m = majority(each[s][key][1] for s in seeds)
        tally = f"holds in {k} of {m} seeds" + (f" ({len(seeds) - m} without a TPT)" if m < len(seeds) else "")
        if key.startswith("c7_"):
            run = key[3:]
            ours = f"{tally}; ordered TPT epochs, pooled: " + _pooled(
                [per_seed[s]["conjecture7"][run] for s in seeds], "epochs")
        elif key.startswith("c8_"):
            run = key[3:]
            fails = []
            for s in seeds:
                r = per_seed[s]["conjecture8"][run]
                if r is not None:
                    fails += [f"seed {s} {sp}: not {', '.join(r[sp]['fails'])}" for sp in SPLITS if r[sp]["fails"]]
            ours = tally + ("; " + "; ".join(fails) if fails else "")
        elif key == "c11":
            ours = f"{tally}; vanilla >= SVSL (epoch, layer) pairs, pooled: " + _pooled(
                [per_seed[s]["conjecture11"] for s in seeds], "pairs")
        else:
            t = [per_seed[s]["table1"] for s in seeds]
            if key == "c12":
                ours = (f"{tally}; mean EOT test acc. {_mean_pct(x['vanilla']['eot'] for x in t)} vanilla, "
                        f"{_mean_pct(x['svsl']['eot'] for x in t)} SVSL")
            elif key == "best_in_tpt":
                ours = tally
            else:
                ours = (f"{tally}; mean IT -> EOT: vanilla {_mean_pct(x['vanilla']['it'] for x in t)} -> "
                        f"{_mean_pct(x['vanilla']['eot'] for x in t)}, SVSL {_mean_pct(x['svsl']['it'] for x in t)}"
                        f" -> {_mean_pct(x['svsl']['eot'] for x in t)}")
        out[key] = (ours, holds)
    return out


def layer_table_markdown(curves: dict, layers: list[str], its: dict) -> str:
    """NCC mismatch (%) of every layer at the IT and at the EOT, both runs and splits."""
    head = "| layer | " + " | ".join(f"{run} {split} IT → EOT" for run in RUNS for split in SPLITS) + " |"
    lines = [head, "| --- |" + " --- |" * (len(RUNS) * len(SPLITS))]
    for name in layers:
        cells = []
        for run in RUNS:
            c = curves[run]
            for split in SPLITS:
                it = its[run]
                at_it = c[split][name][c["epochs"].index(it)] if it in c["epochs"] else None
                cells.append(f"{_pct(at_it)} → {_pct(c[split][name][-1])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ figures
TPT_COLOURS = {"vanilla": "#f4a6c8", "svsl": "#9ec5f0", "both": "#c8a2e8"}


def tpt_spans(it_vanilla: int | None, it_svsl: int | None, last: int) -> list[tuple[float, float, str]]:
    """The shaded background of the paper's Fig. 2: (start, end, who) intervals, who in "vanilla",
    "svsl" (one run in its TPT) or "both" (purple). A run's TPT is the span from its IT to ``last``."""
    starts = {run: it for run, it in (("vanilla", it_vanilla), ("svsl", it_svsl)) if it is not None and it < last}
    if not starts:
        return []
    if len(starts) == 1:
        run, s = next(iter(starts.items()))
        return [(s, last, run)]
    first = min(starts, key=lambda r: (starts[r], r))
    second = max(starts.values())
    spans = [(starts[first], second, first)] if starts[first] < second else []
    return spans + [(second, last, "both")]


def _shade(ax, spans):
    for lo, hi, who in spans:
        ax.axvspan(lo, hi, color=TPT_COLOURS[who], alpha=0.35, lw=0, zorder=0)


def _tpt_handles(spans):
    from matplotlib.patches import Patch

    label = {"vanilla": "TPT vanilla", "svsl": "TPT SVSL", "both": "TPT both"}
    seen = []
    for _, _, who in spans:
        if who not in seen:
            seen.append(who)
    return [Patch(color=TPT_COLOURS[w], alpha=0.5, label=label[w]) for w in seen]


def plot_mismatch(curves: dict, marks: dict, layers: list[str], its: dict, path: Path, title: str) -> Path:
    """The paper's Fig. 2 for one data set: NCC mismatch per layer over epochs, train (top) and test
    (bottom); solid vanilla, dashed SVSL; the TPT shaded; the y axis linear below 1%, logarithmic
    above (the paper's is linear: its 350 epochs leave room to see the TPT). Degenerate values (none expected for NCC
    mismatch) are drawn as hollow markers."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 1, figsize=(6.4, 6.6), sharex=True)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(layers)))
    last = max(max(curves[run]["epochs"]) for run in RUNS)
    spans = tpt_spans(its["vanilla"], its["svsl"], last)
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
    layer_handles = [Line2D([], [], color=c, lw=2, label=n) for c, n in zip(colours, layers)]
    style_handles = [Line2D([], [], color="k", ls="-", label="vanilla"),
                     Line2D([], [], color="k", ls="--", label="SVSL")]
    axes[0].legend(handles=layer_handles, fontsize=7, ncol=2, loc="upper right", title="layer", title_fontsize=7)
    axes[1].legend(handles=style_handles + _tpt_handles(spans), fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_accuracy(histories: dict, its: dict, path: Path, title: str) -> Path:
    """The paper's Fig. 1: train and test accuracy of both runs over epochs, the TPT shaded
    (vanilla pink, SVSL blue, as the paper), and the test accuracy again from the first IT on, zoomed."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    last = max(r["epoch"] for h in histories.values() for r in h)
    spans = tpt_spans(its["vanilla"], its["svsl"], last)
    colour = {"vanilla": "#d6337f", "svsl": "#1f5fbf"}
    first_it = min((it for it in its.values() if it is not None), default=None)
    panels = [("train", None), ("test", None)] + ([("test", first_it)] if first_it is not None else [])
    for ax, (split, start) in zip(axes, panels):
        _shade(ax, [(max(lo, start or 0), hi, who) for lo, hi, who in spans])
        for run in RUNS:
            rows = [r for r in histories[run] if r.get(f"{split}_acc") is not None and r["epoch"] >= (start or 0)]
            ax.plot([r["epoch"] for r in rows], [r[f"{split}_acc"] for r in rows], color=colour[run],
                    marker="." if start is not None else None, label="vanilla" if run == "vanilla" else "SVSL")
        ax.set_title(f"{split} accuracy" + ("" if start is None else f" from epoch {start} (first IT)"), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if first_it is None:
        axes[2].axis("off")
    axes[0].legend(handles=axes[0].get_legend_handles_labels()[0] + _tpt_handles(spans), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------- the driver
def analyse(folders: dict, layers: list[str], threshold: float = IT_THRESHOLD) -> dict:
    """Everything the report rests on, from the run folders' metrics.jsonl and history.jsonl
    ({"vanilla": folder, "svsl": folder})."""
    history = {run: read_jsonl(Path(f) / "history.jsonl") for run, f in folders.items()}
    measured = {run: read_jsonl(Path(f) / "metrics.jsonl") for run, f in folders.items()}
    its = {run: interpolation_epoch(history[run], threshold) for run in RUNS}
    curves = {run: mismatch_curves(measured[run], layers) for run in RUNS}
    marks = {run: degenerate_marks(measured[run], layers) for run in RUNS}
    table = {run: accuracy_table(history[run], its[run]) for run in RUNS}
    same = [(a, b) for a, b in zip(layers, layers[1:])
            if all(curves[run][s][a] == curves[run][s][b] for run in RUNS for s in SPLITS)]
    return {
        "identical_layers": same,
        "layers": layers, "it_threshold": threshold, "interpolation_epoch": its,
        "history": history, "curves": curves, "degenerate": marks, "table1": table,
        "conjecture7": {run: ordering(curves[run], layers, its[run]) for run in RUNS},
        "conjecture8": {run: it_vs_eot(curves[run], layers, its[run]) for run in RUNS},
        "conjecture11": svsl_vs_vanilla(curves["vanilla"], curves["svsl"], layers, its["vanilla"], its["svsl"]),
    }


def sample_note(samples: dict | None) -> str:
    """How much one sample moves the mismatch (and the accuracy) on each split: a failed inequality
    of one sample's size is within the resolution of the split."""
    if not samples:
        return ""
    parts = [f"{100 / n:.2f} pp on {split} ({n} samples)" for split, n in samples.items() if n]
    return " One sample is " + ", ".join(parts) + " of NCC mismatch or accuracy."


def build_report(results: dict, preset: str, quick: bool, cmd: str, per_seed: dict | None = None) -> Report:
    """report.md: the claims with computed verdicts, Table 1, the per-layer table and the figures.
    ``results``: the first seed's ``analyse`` output (figures and per-layer tables); ``per_seed``
    ({seed: analyse output}, several seeds): the claims are then their majority (``pooled_claims``)."""
    paper = PAPER[preset if not quick else "digits"]
    layers = results["layers"]
    per_seed = per_seed or {results.get("seed", 0): results}
    many = len(per_seed) > 1
    claims = pooled_claims(per_seed)
    rep = Report(title="Paper 003: NCC mismatch through intermediate layers, TPT and SVSL", command=cmd,
                 preset=preset, quick=quick)
    fig2 = f"Fig. 2 ({paper['dataset']}): monotone in depth in the TPT"
    for run in RUNS:
        rep.claim(f"Conj. 7, {run}: NCC mismatch falls with depth in the TPT, train and test "
                  f"({' ≥ '.join(layers)})", fig2, *claims[f"c7_{run}"])
    for run in RUNS:
        rep.claim(f"Conj. 8, {run}: at every layer, NCC mismatch at the IT ≥ at the EOT, train and test",
                  f"Fig. 2 ({paper['dataset']}): decreases in the TPT", *claims[f"c8_{run}"])
    rep.claim(f"Conj. 11: SVSL (alpha {results['svsl_alpha']:g} from {results['svsl_from']}) lowers NCC mismatch "
              "at every layer in the TPT, train and test",
              f"Fig. 2 ({paper['dataset']}): lower for almost all layers", *claims["c11"])
    pv, ps = paper["table1"]["vanilla"], paper["table1"]["svsl"]
    table = results["table1"]
    rep.claim("Conj. 12: SVSL improves the EOT test accuracy",
              f"{paper['dataset']}: {pv[1]:.2f}% vanilla, {ps[1]:.2f}% SVSL", *claims["c12"])
    rep.claim("Table 1: the best test epoch lies in the TPT (both runs)",
              f"{paper['dataset']}: Yes, Yes", *claims["best_in_tpt"])
    rep.claim("Fig. 1 / Table 1: test accuracy improves from the IT to the EOT (both runs)",
              f"{paper['dataset']}: vanilla {pv[0]:.2f}% -> {pv[1]:.2f}%, SVSL {ps[0]:.2f}% -> {ps[1]:.2f}%",
              *claims["tpt_gain"])
    first = f" (seed {next(iter(per_seed))} of the {len(per_seed)})" if many else ""
    its = results["interpolation_epoch"]
    rep.figure("ncc_mismatch.png", f"NCC mismatch per layer{first} (top train, bottom test against the train "
               f"class means), solid vanilla, dashed SVSL; TPT shaded (pink vanilla from epoch {its['vanilla']}, "
               f"blue SVSL from epoch {its['svsl']}, purple both). The paper's Fig. 2.")
    rep.figure("accuracy.png", f"Train and test accuracy of both runs{first}, TPT shaded (the paper's Fig. 1).")
    if many:
        rows = [(f"ours, seed {sd}", r["table1"]) for sd, r in per_seed.items()]
        it_text = "; ".join(f"seed {sd}: vanilla {r['interpolation_epoch']['vanilla']}, SVSL "
                            f"{r['interpolation_epoch']['svsl']}" for sd, r in per_seed.items())
    else:
        rows, it_text = table, f"vanilla: {its['vanilla']}, SVSL: {its['svsl']}"
    rep.section("Table 1: test accuracy (%) at the IT, the EOT and the best test epoch",
                table1_markdown(rows, paper)
                + f"\n\nThe IT is the first epoch with train accuracy ≥ {results['it_threshold']} "
                  f"({it_text}); the TPT is the epochs after it. Read from each run's history.jsonl.")
    rep.section(f"NCC mismatch (%) per layer at the IT and at the EOT{first}",
                layer_table_markdown(results["curves"], layers, its)
                + "\n\nThe paper's discussion: the first layer's train mismatch in the TPT hints at the data set's "
                  "difficulty (~16% on MNIST, ~60% on CIFAR-10); where the mismatch reaches ~0 several layers "
                  "before the output, NCC simplification \"propagates back\" (contribution ii)."
                + "".join(f" {a} and {b} have the same mismatch at every measured epoch of both runs"
                          + (" (on 8 x 8 digits layer4's map is 1 x 1: the average pool changes nothing)."
                             if (a, b) == ("layer4", "pool") else ".")
                          for a, b in results["identical_layers"]))
    c11 = results["conjecture11"]
    rows = ["| layer | train: vanilla ≥ SVSL | mean gap train (pp) | test: vanilla ≥ SVSL | mean gap test (pp) |",
            "| --- | --- | --- | --- | --- |"]
    for name in layers:
        cells = []
        for split in SPLITS:
            h, n, gap = c11[split]["by_layer"][name]
            cells += [f"{h} of {n}", "–" if gap is None else f"{100 * gap:+.2f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rep.section(f"Conjecture 11 per layer{first} (common TPT epochs; gap = mean vanilla − mean SVSL mismatch)",
                "\n".join(rows))
    rep.section("How the verdicts are computed",
                f"Every inequality is the paper's ≥ with no tolerance, over the measured epochs after the IT. "
                f"Conjectures 7 and 11 (\"in the TPT\") hold when their inequalities hold at ≥ {MOST:.0%} of "
                f"those epochs (conj. 11: epoch-layer pairs, in the TPT of both runs), on train and on test; "
                f"conjecture 8 when it holds at every layer on both splits; conjecture 12 when SVSL's EOT test "
                f"accuracy is strictly higher. Both runs of a pair share the seed: same initial weights, same "
                f"batches. "
                + (f"With {len(per_seed)} seeds ({', '.join(map(str, per_seed))}) a claim holds when it holds in "
                   f"more than half of the seeds that measured it; the counts after the tally are pooled over the "
                   f"seeds." if many else
                   "One seed is one draw: verdicts near the thresholds can turn with another seed or other float "
                   "rounding (--seeds N runs N pairs and takes the majority).")
                + sample_note(results.get("samples")))
    return rep


def body(argv=None) -> dict:
    p = parser(NAME, __doc__)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's)")
    p.add_argument("--svsl-alpha", type=float, default=None,
                   help="SVSL alpha (default: the paper's Table 2 value for the data set)")
    p.add_argument("--svsl-from", default=None, choices=LAYERS[:-1],
                   help="SVSL's first layer gamma (default: the paper's Table 2 layer)")
    p.add_argument("--metrics-every", type=int, default=None, help="measure every N epochs (default: the preset's)")
    p.add_argument("--seeds", type=int, default=None,
                   help="run pairs with seeds --seed, --seed + 1, ...; each claim holds when it holds in more "
                        "than half of them (default: 3 on digits, 1 otherwise)")
    a = p.parse_args(argv)
    if a.seeds is not None and a.seeds < 1:
        raise ValueError(f"--seeds: must be >= 1, got {a.seeds}")
    if a.epochs is not None and a.epochs < 1:
        raise ValueError(f"--epochs: must be >= 1, got {a.epochs}")
    if a.metrics_every is not None and a.metrics_every < 1:
        raise ValueError(f"--metrics-every: must be >= 1, got {a.metrics_every}")
    if a.svsl_alpha is not None and not (np.isfinite(a.svsl_alpha) and a.svsl_alpha > 0):
        raise ValueError(f"--svsl-alpha: must be a finite number > 0, got {a.svsl_alpha}")
    preset = "digits" if a.quick else a.preset  # --quick always runs on the bundled digits
    if not a.quick:
        check_preset(preset, a.data)
    cfg = preset_config(preset, a.quick)
    if a.epochs is not None:
        cfg["epochs"] = a.epochs
    if a.metrics_every is not None:
        cfg["metrics_every"] = a.metrics_every
    paper = PAPER["digits" if a.quick else preset]
    alpha = paper["alpha"] if a.svsl_alpha is None else a.svsl_alpha
    gamma = paper["gamma"] if a.svsl_from is None else a.svsl_from
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n_seeds = a.seeds if a.seeds is not None else (1 if a.quick else SEEDS[preset])
    seeds = [a.seed + i for i in range(n_seeds)]
    shared = dict(cfg, data=None if a.quick else a.data, device=a.device, progress=not a.no_progress)
    t0 = time.perf_counter()
    per_seed, seconds, sizes = {}, {}, None
    for seed in seeds:
        folder = out if n_seeds == 1 else out / f"seed_{seed}"
        runs = {}
        for i, run in enumerate(RUNS, start=1):
            extra = dict(svsl_alpha=alpha, svsl_from=gamma) if run == "svsl" else {}
            print(f"[{NAME}] seed {seed}, run {i}/{len(RUNS)}: {run} ({cfg['arch']} width {cfg['width']} on "
                  f"{cfg['dataset']}, {cfg['epochs']} epochs{', SVSL alpha %g from %s' % (alpha, gamma) if extra else ''})",
                  file=sys.stderr, flush=True)
            runs[run] = train_run(folder / run, **shared, seed=seed, **extra)
            print(f"[{NAME}] {run} done in {runs[run].seconds:.0f} s", file=sys.stderr, flush=True)
        per_seed[seed] = analyse({run: folder / run for run in RUNS}, list(LAYERS), cfg["it_threshold"])
        per_seed[seed]["seed"] = seed
        seconds[seed] = {run: runs[run].seconds for run in RUNS}
        sizes = {split: int(runs["vanilla"].trainer.x[split].shape[0]) for split in SPLITS}
    results = dict(per_seed[seeds[0]])
    results.update(svsl_alpha=alpha, svsl_from=gamma, config=cfg, seed=a.seed, seeds=seeds, samples=sizes,
                   paper=PAPER["digits" if a.quick else preset],
                   seconds=dict(seconds[seeds[0]]) if n_seeds == 1 else {"per_seed": seconds})
    if n_seeds > 1:
        results["per_seed"] = {str(sd): {k: v for k, v in r.items() if k != "history"} for sd, r in per_seed.items()}
        for r in per_seed.values():
            r.update(svsl_alpha=alpha, svsl_from=gamma)
    what = f"{'quick ' if a.quick else ''}{cfg['dataset']}, {cfg['arch']} (width {cfg['width']})"
    plot_mismatch(results["curves"], results["degenerate"], results["layers"], results["interpolation_epoch"],
                  out / "ncc_mismatch.png",
                  f"{what}: vanilla (solid) vs SVSL (dashed, alpha {alpha:g} from {gamma})")
    plot_accuracy(results["history"], results["interpolation_epoch"], out / "accuracy.png",
                  f"{what}: vanilla vs SVSL (alpha {alpha:g} from {gamma})")
    rep = build_report(results, preset, a.quick, command(NAME, argv), per_seed=per_seed)
    rep.seconds = time.perf_counter() - t0
    results["report"] = rep.as_dict()
    results["seconds"]["total"] = rep.seconds
    rep.write(out)
    write_json(results, out / "results.json")
    print(f"[{NAME}] wrote {out / 'report.md'}, {out / 'results.json'}, {out / 'ncc_mismatch.png'}, "
          f"{out / 'accuracy.png'} ({rep.seconds:.0f} s)", file=sys.stderr, flush=True)
    for c in rep.claims:
        print(f"  {verdict(c.holds):>13}: {c.claim}: {c.ours}", file=sys.stderr)
    return results


def main(argv=None) -> int:
    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
