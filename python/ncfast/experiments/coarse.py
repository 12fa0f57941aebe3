"""Paper 000 (conference version 001): fine-grained structure under Neural Collapse with coarse labels.

    python -m ncfast.experiments.coarse                    # digits, ResNet-18, coarse-5 + original labels
    python -m ncfast.experiments.coarse --fine --grid      # + fine labels (eq. 5) + the lr x wd grid
    python -m ncfast.experiments.coarse --preset cifar10 --data DIR          # the paper's setting (GPU)
    python -m ncfast.experiments.coarse --preset cifar100 --data DIR --coarse official

The protocol, as the paper writes it:

- Coarse labels (eq. 4): "create coarse labels by y~_k = y_k mod C~, which merges the classes whose
  index have the same modulus w.r.t. C~ and thus create C~ super-classes" (C~ = 5 on the 10-class
  sets: super-class s holds the classes s and s + 5). ``--random-coarse K`` shuffles the class
  indices (seeded) before the mod (app. F); ``--coarse official`` uses CIFAR-100's 20 semantic
  super-classes (sec. 5).
- The same network trained on the original labels is the "OT" baseline: "the highest test set
  accuracy achieved by ResNet18 trained on original CIFAR-10 with the same training hyper-parameters"
  (fig. 9 / 11), so OT here is the best test accuracy over the epochs of that run.
- Class distance (eq. 6), over the ORIGINAL classes, on the last-layer (penultimate) features of the
  train split: "D_ij = 1/(n_i n_j) sum_u sum_v ||h_u^(i) - h_v^(j)||^2". Under Neural Collapse on the
  coarse labels the heatmap of D shows "three dark lines" (D_ii and the two same-super-class
  diagonals |i - j| = 5); the paper observes that "the three dark lines does not show up
  simultaneously, and the central line - represents the samples in the same original classes - shows
  up earlier", and that "even in the final stage where the training error is zero, the three lines
  can be not of the same degree of darkness, with the central line [darker]" (sec. 4.1, fig. 5).
  We measure each line against the background, per measured epoch: central = mean D_ii / mean
  D_other, same = mean D_same / mean D_other (same: i != j in one super-class; other: different
  super-classes), and MSDR = mean D_same / mean D_ii (app. B). A line "shows up" at the first
  measured epoch from which its ratio stays <= 1/2 (``LINE``).
- CLP (sec. 4.3): "we first use t-SNE to reduce the dimensionality to 2 and then use k-means to find
  2 clusters in the dimensionality-reduced representations within each super-class. We use the
  clusters as reconstructed labels to do a linear probe ... we permute each possible mapping and
  report the highest performance. We also train a linear probe with original training labels as a
  comparison" (LPO). The trainer's CLP does exactly this (``ncfast.train.probes.clp``).
- ``--fine`` (eq. 5): "y^_k = y_k + beta C ... beta is a Bernoulli variable", 2C training classes; the
  2C x 2C class-distance matrix over the training labels (fig. 15) should show the C-class structure
  early ("three dark lines": D between the two halves (c, c + C) of one class) and keep it at the end
  "although with a lighter color".
- ``--grid``: "learning rate in {0.1, 0.01, 0.001} and weight-decay rate in {5e-3, 5e-4, 5e-5} ...
  all 9 possible combinations" (app. C), coarse labels, one run per cell with CLP and LPO.

The paper: ResNet-18 on CIFAR-10 (coarse 5) and CIFAR-100 (coarse 20), SGD, 350 epochs, config #1 lr
0.01 / wd 5e-4 (#2: wd 5e-5), heatmaps at epochs 20, 120, 240, 350; DenseNet-121 and VGG in the
appendix (VGG shows no fine-grained structure: "the three dark lines appears almost at the same
time"). Presets: ``cifar10`` / ``cifar100`` use those sizes (batch 128, cosine schedule, standard
crops and flips: the paper does not state its batch size, schedule or augmentation) and need a GPU
(about a day of CPU time each); ``fashion-mnist`` is sized for 2 CPU cores: ResNet-18 at width 8 on a
seeded 5,000-image subset of the training set (all 10,000 test images), no augmentation, 20 epochs,
heatmaps at epochs 1, 5, 10, 20; ``digits`` (default) is ResNet-18 at half width (32 base channels) on
scikit-learn's 8x8 digits for 40 epochs, minutes on 2 CPU cores. ``--quick`` is a two-layer MLP on digits for a few epochs, CLP on PCA instead of t-SNE
(tests only). Verdicts are computed from the data with the thresholds in LINE, FINE_STRUCTURE,
CLOSE and NC1_FALL.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from ..labels import superclass_map
from ..train.figures import pyplot
from ..train.models import ARCH_NAMES, resolve_arch
from ..train.probes import EMBEDDINGS, embed
from ..train.trainer import LEARNING_RATES, WEIGHT_DECAYS
from . import _common

NAME = "coarse"

LINE = 0.5  # a line of the heatmap "shows up" once its mean distance is <= LINE x the between-super-class mean
FINE_STRUCTURE = 1.5  # MSDR at the end >= this: the central line is clearly darker than the same-super lines
CLOSE = 0.05  # CLP "comparable" to LPO / OT: within 5 accuracy points
NC1_FALL = 10.0  # Neural Collapse on the training labels: NC1 falls by this factor from epoch 0 to the end
EARLY = 5  # epochs 1..EARLY are always measured: the order in which the lines show up is decided early
FIGURE_POINTS = 2000  # t-SNE figure: at most this many train points per super-class (seeded subsample)
FEATURES_LIMIT = 4_000_000  # features.npz (the final penultimate train features) when N x D is at most this

DIGITS = [str(i) for i in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100 = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()
CLASS_NAMES = {"digits": DIGITS, "fashion-mnist": FASHION, "cifar10": CIFAR10, "cifar100": CIFAR100}

# Config fields of the coarse-label run per preset (the original-label run is the same net on the
# original labels); "coarse": the default K, "distance_epochs": the heatmaps, "grid_epochs": --grid's.
PRESETS = {
    "digits": dict(dataset="digits", arch="resnet18", width=32, epochs=40, batch_size=128, lr=0.01,
                   weight_decay=5e-4, metrics_every=2, clp_embed="tsne", coarse=5, distance_epochs=(1, 3, 10, 40),
                   grid_epochs=20),
    "fashion-mnist": dict(dataset="fashion-mnist", arch="resnet18", width=8, train_subset=5000, augment=False,
                          epochs=20, batch_size=128, lr=0.01, weight_decay=5e-4, metrics_every=5, clp_embed="tsne",
                          coarse=5, distance_epochs=(1, 5, 10, 20), grid_epochs=10),
    "cifar10": dict(dataset="cifar10", arch="resnet18", width=None, epochs=350, batch_size=128, lr=0.01,
                    weight_decay=5e-4, metrics_every=10, clp_embed="tsne", coarse=5,
                    distance_epochs=(20, 120, 240, 350), grid_epochs=350),
    "cifar100": dict(dataset="cifar100", arch="resnet18", width=None, epochs=350, batch_size=128, lr=0.01,
                     weight_decay=5e-4, metrics_every=10, clp_embed="tsne", coarse=20,
                     distance_epochs=(20, 120, 240, 350), grid_epochs=350),
}
QUICK = dict(dataset="digits", arch="mlp", width=64, epochs=8, batch_size=64, lr=0.05, weight_decay=5e-4,
             metrics_every=1, clp_embed="pca", coarse=5, distance_epochs=(1, 3, 8), grid_epochs=2)


# ------------------------------------------------------------------------------------ pure functions
def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 and math.isfinite(a) and math.isfinite(b) else float("nan")


def line_ratios(distance, superclass) -> dict:
    """The three lines of a class-distance heatmap against its background: central = mean D_ii /
    mean D_other, same = mean D_same / mean D_other, msdr = mean D_same / mean D_ii (same: i != j in
    one super-class, other: i, j in different super-classes; absent classes, NaN rows, are left
    out). NaN where a group is empty (e.g. no super-class holds two classes)."""
    d = np.asarray(distance, dtype=np.float64)
    s = np.asarray(superclass)
    present = (s >= 0) & np.isfinite(np.diag(d))
    d, s = d[np.ix_(present, present)], s[present]
    eye = np.eye(d.shape[0], dtype=bool)
    same_super = s[:, None] == s[None, :]
    groups = {"diag": d[eye], "same": d[same_super & ~eye], "other": d[~same_super]}
    mean = {k: float(v.mean()) if v.size else float("nan") for k, v in groups.items()}
    return {"central": _ratio(mean["diag"], mean["other"]), "same": _ratio(mean["same"], mean["other"]),
            "msdr": _ratio(mean["same"], mean["diag"])}


def twin_ratios(distance, num_classes: int) -> dict:
    """The fine-label matrix (2C x 2C over labels l = c + beta C, paper 000 eq. 5) against its
    background: twin = mean D over the two halves (c, c + C) of one original class / mean D over
    labels of different original classes; diag = mean D_ll / the same. Under Neural Collapse on the
    fine labels twin -> 1 (the halves separate like any two classes); twin < 1: the original
    classes still show."""
    d = np.asarray(distance, dtype=np.float64)
    orig = np.arange(d.shape[0]) % num_classes
    eye = np.eye(d.shape[0], dtype=bool)
    same_orig = orig[:, None] == orig[None, :]
    other = d[~same_orig].mean() if (~same_orig).any() else float("nan")
    twin = d[same_orig & ~eye].mean() if (same_orig & ~eye).any() else float("nan")
    return {"twin": _ratio(twin, other), "diag": _ratio(d[eye].mean(), other)}


def shows_up(epochs, ratios, level: float = LINE):
    """The first epoch from which the ratio stays <= level at every later measured epoch (None: never;
    a NaN never counts as <= level)."""
    first = None
    for e, r in zip(epochs, ratios):
        if r is not None and r == r and r <= level:
            first = e if first is None else first
        else:
            first = None
    return first


def central_first(central_epoch, same_epoch) -> bool:
    """The paper's order: the central line shows up strictly before the same-super lines (or they
    never do). False when the central line never shows up."""
    if central_epoch is None:
        return False
    return same_epoch is None or central_epoch < same_epoch


def clp_chance(superclass) -> float:
    """Accuracy of a guess of the original class that knows the super-class: the mean over original
    classes of 1 / (classes in its super-class)."""
    s = np.asarray(superclass)
    s = s[s >= 0]
    sizes = {k: int((s == k).sum()) for k in np.unique(s)}
    return float(np.mean([1.0 / sizes[k] for k in s]))


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def _num(x, fmt=".3f") -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def _vgg(arch: str) -> bool:
    return arch.startswith("vgg")


def claims(results: dict) -> list[tuple[str, str, str, bool | None]]:
    """(claim, the paper's number, ours, holds) for every claim the results can test; holds is
    computed from the numbers in ``results`` (results.json's layout) and the module's thresholds,
    None where a number is missing."""
    out = []
    c = results["coarse"]
    k = c["num_super"]
    vgg = _vgg(results["config"]["arch"])
    not_vgg = " (not for VGG, app. H: the lines appear together)" if vgg else ""
    last = c["lines"][-1] if c["lines"] else {}
    nc1_0, nc1_t = c.get("nc1_first"), c.get("nc1_last")
    acc = c.get("train_accuracy")
    ok = None if None in (nc1_0, nc1_t, acc) else (acc >= c["it_threshold"] and nc1_t <= nc1_0 / NC1_FALL)
    out.append((f"Neural Collapse on the {k} coarse labels: train accuracy reaches {100 * c['it_threshold']:.1f}% "
                f"and NC1 falls {NC1_FALL:g}x or more",
                "0 training error; NC1, NC2 -> 0 (fig. 3)",
                f"train acc {_pct(acc)}; NC1 {_num(nc1_0, '.3g')} -> {_num(nc1_t, '.3g')}", ok))
    same_t = last.get("same")
    out.append((f"Three dark lines at the end: same-super-class distances <= {LINE:g} x the distances between "
                f"super-classes", "three dark lines at epoch 350 (fig. 5)",
                f"D_same / D_other = {_num(same_t)} at epoch {last.get('epoch')}",
                None if same_t is None else same_t <= LINE))
    ec, es = c["shows_up"]["central"], c["shows_up"]["same"]
    out.append((f"The central line (D_ii) shows up first, the same-super lines later (ratio to D_other <= {LINE:g} "
                f"from then on)", "central line first, side lines later (fig. 5, epochs 20-350)" + not_vgg,
                f"central from epoch {ec}, same-super from epoch {es}", central_first(ec, es) if c["lines"] else None))
    msdr = last.get("msdr")
    out.append((f"Fine-grained structure at the end: the central line stays darker, MSDR = D_same / D_ii >= "
                f"{FINE_STRUCTURE:g} (Neural Collapse alone: 1)",
                "central line clearly darker at epoch 350 and after 1,000 epochs (figs. 5, 9)" + not_vgg,
                f"MSDR {_num(msdr, '.2f')} at epoch {last.get('epoch')}",
                None if msdr is None else msdr >= FINE_STRUCTURE))
    clp, lpo, ot, chance = c.get("clp_accuracy"), c.get("linear_probe_accuracy"), results["original"].get(
        "best_test_accuracy"), c["clp_chance"]
    bar = (1 + chance) / 2
    out.append(("CLP recovers the original classes well above chance (half way from the in-super-class guess "
                "to 100%)", "> 93% on CIFAR-10 from 5 coarse labels (chance 50%)" + not_vgg,
                f"CLP {_pct(clp)} (chance {_pct(chance)}, bar {_pct(bar)})", None if clp is None else clp >= bar))
    out.append((f"CLP is comparable to LPO, the linear probe on the true original labels (within "
                f"{100 * CLOSE:g} points)", "comparable (fig. 9)",
                f"CLP {_pct(clp)} vs LPO {_pct(lpo)}", None if None in (clp, lpo) else abs(clp - lpo) <= CLOSE))
    out.append((f"CLP matches OT, the same net trained on the original labels (within {100 * CLOSE:g} points)",
                "> 93%, matching ResNet-18's standard accuracy (fig. 9)",
                f"CLP {_pct(clp)} vs OT {_pct(ot)} (best test accuracy)",
                None if None in (clp, ot) else ot - clp <= CLOSE))
    fine = results.get("fine")
    if fine:
        twins = fine["twins"]
        early = next((r for r in twins if r["epoch"] == fine["early_epoch"]), twins[0] if twins else {})
        end = twins[-1] if twins else {}
        te, tt = early.get("twin"), end.get("twin")
        out.append((f"Fine labels: early in training the {2 * fine['num_classes']} fine classes form "
                    f"{fine['num_classes']} clusters (twin lines (c, c+C) <= {LINE:g} x background)",
                    "three dark lines at epoch 20 (fig. 15)",
                    f"D_twin / D_other = {_num(te)} at epoch {early.get('epoch')}", None if te is None else te <= LINE))
        out.append((f"Fine labels: the original classes are still there at the end (twin ratio <= {LINE:g})",
                    "preserved at epoch 350 (fig. 15)", f"D_twin / D_other = {_num(tt)} at epoch {end.get('epoch')}",
                    None if tt is None else tt <= LINE))
        out.append(("Fine labels: ... but lighter than early (twin ratio grows)", "\"although with a lighter color\"",
                    f"{_num(te)} -> {_num(tt)}", None if None in (te, tt) else tt > te))
    grid = results.get("grid")
    if grid:
        close = [g for g in grid if g.get("clp_accuracy") is not None and g.get("linear_probe_accuracy") is not None
                 and abs(g["clp_accuracy"] - g["linear_probe_accuracy"]) <= CLOSE]
        out.append((f"Across the lr x wd grid CLP is comparable to LPO (within {100 * CLOSE:g} points) in most cells",
                    "\"in most cases\" (fig. 28)", f"{len(close)} of {len(grid)} cells",
                    2 * len(close) > len(grid)))
        exempt = [g for g in grid if not (g["lr"] == max(LEARNING_RATES) and g["weight_decay"] == max(WEIGHT_DECAYS))]
        fit = [g for g in exempt if g.get("train_accuracy") is not None and g["train_accuracy"] >= c["it_threshold"]]
        out.append((f"Every grid cell but (lr 0.1, wd 5e-3) reaches {100 * c['it_threshold']:.1f}% train accuracy",
                    "\"very low training error except ... wd 5e-3, lr 0.1\" (fig. 19)",
                    f"{len(fit)} of {len(exempt)} cells ({results['grid_epochs']} epochs)", len(fit) == len(exempt)))
    return out


def lines_table(rows: list[dict]) -> str:
    """Markdown table of the per-epoch line ratios (rows of results.json's coarse.lines)."""
    out = ["| epoch | train acc | D_ii / D_other | D_same / D_other | MSDR |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['epoch']} | {_pct(r.get('train_acc'))} | {_num(r.get('central'))} | {_num(r.get('same'))} | "
                   f"{_num(r.get('msdr'), '.2f')} |")
    return "\n".join(out)


def grid_table(grid: list[dict]) -> str:
    """Markdown table of the grid: one row per learning rate, one column per weight decay, each cell
    CLP / LPO / train accuracy; missing cells are "-"."""
    lrs = sorted({g["lr"] for g in grid}, reverse=True)
    wds = sorted({g["weight_decay"] for g in grid}, reverse=True)
    out = ["| lr \\ wd | " + " | ".join(f"{w:g}" for w in wds) + " |", "| --- |" + " --- |" * len(wds)]
    for lr in lrs:
        cells = []
        for wd in wds:
            g = next((g for g in grid if g["lr"] == lr and g["weight_decay"] == wd), None)
            cells.append("-" if g is None else f"{_pct(g.get('clp_accuracy'))} / {_pct(g.get('linear_probe_accuracy'))}"
                                               f" / {_pct(g.get('train_accuracy'))}")
        out.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n\nCells: CLP / LPO / final train accuracy."


# ------------------------------------------------------------------------------------------- figures
def draw_bars(ax, clp, lpo, ot, chance=None, title="") -> None:
    """CLP / LPO / OT bars with their values (paper 000 fig. 9); a dashed line at the CLP chance."""
    values = [clp, lpo, ot]
    heights = [0.0 if v is None else v for v in values]
    bars = ax.bar(["CLP", "LPO", "OT"], heights, color=["tab:blue", "tab:orange", "tab:green"])
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01, _pct(v), ha="center", va="bottom", fontsize=8)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"CLP chance {_pct(chance)}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy (original classes)")
    ax.set_title(title or "CLP vs LPO vs OT", fontsize=9)


def draw_lines(ax, rows: list[dict], interpolation=None, level: float = LINE) -> None:
    """The line ratios over the measured epochs; the level at which a line counts as shown up, and
    the interpolation epoch (first epoch at the train-accuracy threshold)."""
    epochs = [r["epoch"] for r in rows]
    for key, label in (("central", "central: D_ii / D_other"), ("same", "same-super: D_same / D_other")):
        ax.plot(epochs, [np.nan if r.get(key) is None else r[key] for r in rows], marker=".", label=label)
    ax.axhline(level, color="grey", linestyle="--", linewidth=1, label=f"shows up (<= {level:g})")
    if interpolation is not None:
        ax.axvline(interpolation, color="black", linestyle=":", linewidth=1, label=f"interpolation (epoch {interpolation})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ratio to between-super-class distance")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title("the three lines of D over training", fontsize=9)


def draw_nc1(ax, records: list[dict], layer: str) -> None:
    """NC1 on the training labels over the measured epochs, train split; hollow where the record
    lists it as degenerate (forced by the sample size)."""
    epochs = [r["epoch"] for r in records]
    entries = [r["layers"][layer]["train"] for r in records]
    vals = [np.nan if e.get("nc1") is None else e["nc1"] for e in entries]
    forced = ["nc1" in e.get("degenerate", ()) for e in entries]
    line = ax.plot(epochs, [np.nan if f else v for v, f in zip(vals, forced)], marker=".", label="NC1 (train)")[0]
    if any(forced):
        ax.plot([e for e, f in zip(epochs, forced) if f], [v for v, f in zip(vals, forced) if f], linestyle="none",
                marker="o", markerfacecolor="none", color=line.get_color(), label="degenerate (sample size)")
    if all(v > 0 for v in vals if v == v):
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("NC1 on the coarse labels", fontsize=9)
    ax.legend(fontsize=7)


def _save(fig, path: Path, dpi: int = 100) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def main_figure(distances: dict, names, rows, records, layer, bars: dict, interpolation, path: Path, title: str,
                dpi: int = 80) -> Path:
    """The summary figure: the class-distance heatmaps (top), the CLP / LPO / OT bars, the line
    ratios and NC1 over training (bottom)."""
    plt = pyplot()
    n = max(3, len(distances))
    fig = plt.figure(figsize=(3.3 * n, 6.6))
    grid = fig.add_gridspec(2, 3 * n)  # n heatmaps on top, three panels below, each row evenly spaced
    from ..train import figures

    figures.class_distance_heatmaps(distances, None, names=names, axes=[fig.add_subplot(grid[0, 3 * i:3 * i + 3])
                                                                         for i in range(len(distances))])
    bottom = [fig.add_subplot(grid[1, n * i:n * i + n]) for i in range(3)]
    draw_bars(bottom[0], **bars)
    draw_lines(bottom[1], rows, interpolation)
    draw_nc1(bottom[2], records, layer)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def grid_figure(grid: list[dict], path: Path, dpi: int = 100) -> Path:
    """3 x 3 heatmaps (rows lr, columns wd) of CLP, LPO and train accuracy, annotated."""
    plt = pyplot()
    lrs = sorted({g["lr"] for g in grid}, reverse=True)
    wds = sorted({g["weight_decay"] for g in grid}, reverse=True)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (key, label) in zip(axes, (("clp_accuracy", "CLP"), ("linear_probe_accuracy", "LPO"),
                                       ("train_accuracy", "train accuracy"))):
        m = np.full((len(lrs), len(wds)), np.nan)
        for g in grid:
            v = g.get(key)
            m[lrs.index(g["lr"]), wds.index(g["weight_decay"])] = np.nan if v is None else v
        image = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for i in range(len(lrs)):
            for j in range(len(wds)):
                if m[i, j] == m[i, j]:
                    ax.text(j, i, f"{100 * m[i, j]:.1f}", ha="center", va="center",
                            color="white" if m[i, j] < 0.6 else "black", fontsize=9)
        ax.set_xticks(range(len(wds)))
        ax.set_xticklabels([f"{w:g}" for w in wds])
        ax.set_yticks(range(len(lrs)))
        ax.set_yticklabels([f"{lr:g}" for lr in lrs])
        ax.set_xlabel("weight decay")
        ax.set_ylabel("learning rate")
        ax.set_title(label, fontsize=9)
    return _save(fig, path, dpi)


# -------------------------------------------------------------------------------------------- driver
def _arg_parser():
    p = _common.parser(NAME, __doc__)
    p.add_argument("--coarse", default=None,
                   help="K super-classes by y mod K (eq. 4; default 5 on the 10-class presets, 20 on cifar100), "
                        "or 'official' (cifar100's 20 semantic super-classes)")
    p.add_argument("--random-coarse", type=int, default=None, metavar="K",
                   help="K super-classes after a seeded shuffle of the classes (app. F) instead of --coarse")
    p.add_argument("--fine", action="store_true", help="also train on fine labels (eq. 5): the 2C x 2C matrix (fig. 15)")
    p.add_argument("--grid", action="store_true",
                   help="also train the lr x wd grid (lr 0.1/0.01/0.001 x wd 5e-3/5e-4/5e-5) on the coarse labels; "
                        "9 more runs of --grid-epochs (digits: estimated 10-15 more minutes on 2 cores)")
    p.add_argument("--grid-epochs", type=int, default=None, help="epochs of each grid run (default: the preset's)")
    p.add_argument("--arch", default=None, choices=ARCH_NAMES, help="network (default resnet18; the paper's "
                   "appendix also has densenet121 and VGG: vgg11/vgg13/vgg16/vgg19)")
    p.add_argument("--depth", type=int, default=None, help="depth override (resnet 18/34, vgg 11-19, densenet, mlp)")
    p.add_argument("--width", type=int, default=None, help="base channels / hidden units (default: the preset's; digits 32, the others the arch's own)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the coarse and original runs")
    p.add_argument("--lr", type=float, default=None, help="learning rate (paper config #1: 0.01)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (#1: 5e-4, #2: 5e-5)")
    p.add_argument("--distance-epochs", default=None,
                   help="comma-separated epochs of the class-distance heatmaps (default: the preset's, e.g. 1,3,10,40)")
    p.add_argument("--clp-embed", default=None, choices=EMBEDDINGS, help="CLP's reduction before k-means "
                   "(the paper: tsne)")
    p.add_argument("--resume", action="store_true", help="finish interrupted runs from their checkpoints")
    return p


def _parse_epochs(text: str, epochs: int) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--distance-epochs: comma-separated integers, got {text!r}") from None
    if not values or any(not 0 <= v <= epochs for v in values):
        raise ValueError(f"--distance-epochs: epochs in [0, {epochs}] (--epochs), got {text!r}")
    return values


def settings(a) -> dict:
    """The driver's settings from parsed arguments: the preset's, overridden by the flags; ValueError
    naming the flag for a bad value."""
    base = dict(QUICK if a.quick else PRESETS[a.preset])
    if a.quick and a.preset != "digits":
        raise ValueError("--quick runs on digits only (data that ships with scikit-learn); drop --preset")
    for flag, key in (("arch", "arch"), ("depth", "depth"), ("width", "width"), ("epochs", "epochs"), ("lr", "lr"),
                      ("weight_decay", "weight_decay"), ("clp_embed", "clp_embed"), ("grid_epochs", "grid_epochs")):
        value = getattr(a, flag)
        if value is not None:
            base[key] = value
    base.setdefault("depth", None)
    resolve_arch(base["arch"], base["depth"])
    for key, flag in (("epochs", "--epochs"), ("grid_epochs", "--grid-epochs")):
        if base[key] < 1:
            raise ValueError(f"{flag}: must be >= 1, got {base[key]}")
    if base["width"] is not None and base["width"] < 1:
        raise ValueError(f"--width: must be >= 1, got {base['width']}")
    if not (base["lr"] > 0):
        raise ValueError(f"--lr: must be > 0, got {base['lr']}")
    if not (base["weight_decay"] >= 0):
        raise ValueError(f"--weight-decay: must be >= 0, got {base['weight_decay']}")
    num_classes = 100 if base["dataset"] == "cifar100" else 10
    if a.random_coarse is not None and a.coarse is not None:
        raise ValueError("--coarse and --random-coarse: choose one")
    base["random_coarse"] = None
    if a.random_coarse is not None:
        if not 2 <= a.random_coarse < num_classes:
            raise ValueError(f"--random-coarse: K in [2, {num_classes - 1}], got {a.random_coarse}")
        base["coarse"], base["random_coarse"] = None, a.random_coarse
    elif a.coarse is not None:
        if a.coarse == "official":
            if base["dataset"] != "cifar100":
                raise ValueError(f"--coarse official: only cifar100 has official super-classes, not {base['dataset']}")
            base["coarse"] = "official"
        else:
            try:
                k = int(a.coarse)
            except ValueError:
                raise ValueError(f"--coarse: a number K or 'official', got {a.coarse!r}") from None
            if not 2 <= k < num_classes:
                raise ValueError(f"--coarse: K in [2, {num_classes - 1}] (every super-class must be able to hold "
                                 f"two classes), got {k}")
            base["coarse"] = k
    if a.distance_epochs is not None:
        base["distance_epochs"] = _parse_epochs(a.distance_epochs, base["epochs"])
    else:
        base["distance_epochs"] = sorted({min(e, base["epochs"]) for e in base["distance_epochs"]})
    base["num_classes"] = num_classes
    return base


def _config(s: dict, a, **over) -> dict:
    """Config fields of one training run."""
    cfg = dict(dataset=s["dataset"], data=a.data, arch=s["arch"], depth=s["depth"], width=s["width"],
               epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], weight_decay=s["weight_decay"],
               metrics_every=s["metrics_every"], clp_embed=s["clp_embed"], seed=a.seed, device=a.device,
               progress=not a.no_progress, resume=a.resume)
    for key in ("train_subset", "augment"):  # the CPU-sized fashion-mnist preset's
        if key in s:
            cfg[key] = s[key]
    cfg.update(over)
    return cfg


def _measured_epochs(s: dict, epochs: int) -> list[int]:
    """Epochs the trainer measures whatever metrics_every says: the heatmaps' and 1..EARLY."""
    return sorted({e for e in s["distance_epochs"] if e <= epochs} | set(range(1, min(EARLY, epochs) + 1)))


def _distances(run_dir: Path, suffix: str = "") -> dict[int, np.ndarray]:
    files = sorted((run_dir / "class_distance").glob(f"epoch_[0-9][0-9][0-9]{suffix}.npy"))
    return {int(p.stem.split("_")[1]): np.load(p) for p in files}


def _log(msg: str, a) -> None:
    if not a.no_progress:
        print(f"[coarse] {msg}", file=sys.stderr, flush=True)


def _coarse_results(run, s: dict) -> dict:
    tr = run.trainer
    pen = tr.model.penultimate_name
    y_orig, y_train = tr.y_orig["train"].cpu().numpy(), tr.y["train"].cpu().numpy()
    superclass = superclass_map(y_orig, y_train, tr.num_original)
    distances = _distances(tr.out)
    lines = []
    acc = {r["epoch"]: r["train_acc"] for r in run.history}
    for e in sorted(distances):
        lines.append({"epoch": e, "train_acc": acc.get(e), **line_ratios(distances[e], superclass)})
    epochs = [r["epoch"] for r in lines]
    shows = {key: shows_up(epochs, [r[key] for r in lines]) for key in ("central", "same")}
    nc1 = [(r["epoch"], r["layers"][pen]["train"].get("nc1")) for r in run.measured]
    summary = run.summary
    return {"run": tr.out.name, "num_super": tr.num_train_classes, "superclass_of": superclass.tolist(),
            "clp_accuracy": summary["clp_accuracy"], "clp_embedding": summary["clp_embedding"],
            "clp_chance": clp_chance(superclass), "linear_probe_accuracy": summary["linear_probe_accuracy"],
            "train_accuracy": summary["train_accuracy"], "test_accuracy": summary["test_accuracy"],
            "interpolation_epoch": summary["interpolation_epoch"], "it_threshold": tr.cfg.it_threshold,
            "penultimate": pen, "lines": lines, "shows_up": shows, "nc1": nc1,
            "nc1_first": nc1[0][1] if nc1 else None, "nc1_last": nc1[-1][1] if nc1 else None,
            "seconds": run.seconds}


def _tsne_figure(run, results: dict, names, path: Path, seed: int) -> Path:
    """Per super-class 2-D embedding of the final train features (the reduction CLP used), coloured by
    original class with its name (paper 000 fig. 6)."""
    from ..train import figures

    tr = run.trainer
    pen = results["penultimate"]
    x = tr.features("train", pen)
    y_orig, y_train = tr.y_orig["train"].cpu().numpy(), tr.y["train"].cpu().numpy()
    rng = np.random.default_rng(seed)
    pictures = {}
    for s in np.unique(y_train):
        rows = np.flatnonzero(y_train == s)
        if rows.size > FIGURE_POINTS:
            rows = np.sort(rng.choice(rows, FIGURE_POINTS, replace=False))
        z = embed(x[rows], tr.cfg.clp_embed, seed)
        if z.shape[1] != 2:
            z = embed(x[rows], "pca", seed)
        pictures[int(s)] = (z, y_orig[rows])
    figures.superclass_embeddings(pictures, path, original_names=names)
    return path


def _save_features(run, results: dict, out: Path) -> str | None:
    """features.npz: the final penultimate train features with their labels, when small enough."""
    tr = run.trainer
    x = tr.features("train", results["penultimate"])
    if x.size > FEATURES_LIMIT:
        return None
    np.savez_compressed(out / "features.npz", features=x, y_orig=tr.y_orig["train"].cpu().numpy(),
                        y_train=tr.y["train"].cpu().numpy(), epoch=tr.epoch)
    return "features.npz"


def body(argv=None) -> dict:
    a = _arg_parser().parse_args(argv)
    s = settings(a)
    _common.check_preset(s["dataset"] if not a.quick else "digits", a.data)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = CLASS_NAMES.get(s["dataset"], [str(i) for i in range(s["num_classes"])])
    label = (f"random-coarse-{s['random_coarse']}" if s["random_coarse"] else
             "official super-classes" if s["coarse"] == "official" else f"coarse-{s['coarse']}")
    total = 2 + int(a.fine) + (9 if a.grid else 0)
    step = 0

    def stage(msg):
        nonlocal step
        step += 1
        _log(f"[{step}/{total}] {msg} ({time.perf_counter() - t0:.0f} s so far)", a)

    stage(f"{s['arch']} on {s['dataset']}, {label} labels, {s['epochs']} epochs")
    coarse_run = _common.train_run(out / "coarse", **_config(
        s, a, coarse=s["coarse"], random_coarse=s["random_coarse"], distance_epochs=_measured_epochs(s, s["epochs"]),
        layers=None))
    coarse = _coarse_results(coarse_run, s)
    coarse["features"] = _save_features(coarse_run, coarse, out)
    stage(f"the same net on the original labels (OT), {s['epochs']} epochs")
    # OT needs the test accuracy of every epoch (history has it) and no CLP: measure only the ends
    ot_run = _common.train_run(out / "original", **_config(s, a, metrics_every=s["epochs"], clp_embed="pca"))
    tests = [r["test_acc"] for r in ot_run.history if r["epoch"] > 0]
    original = {"run": "original", "best_test_accuracy": max(tests) if tests else None,
                "test_accuracy": ot_run.summary["test_accuracy"], "train_accuracy": ot_run.summary["train_accuracy"],
                "linear_probe_accuracy": ot_run.summary["linear_probe_accuracy"], "seconds": ot_run.seconds}
    config = {k: v for k, v in s.items() if k != "num_classes"}
    results = {"preset": a.preset, "quick": a.quick, "config": config, "class_names": names,
               "grid_epochs": s["grid_epochs"], "coarse": coarse, "original": original,
               "thresholds": {"line": LINE, "fine_structure": FINE_STRUCTURE, "close": CLOSE, "nc1_fall": NC1_FALL}}
    if a.fine:
        stage(f"fine labels (2 x {s['num_classes']} classes), {s['epochs']} epochs")
        fine_run = _common.train_run(out / "fine", **_config(s, a, fine=True, clp_embed="pca",
                                                              distance_epochs=_measured_epochs(s, s["epochs"])))
        two = _distances(fine_run.trainer.out, "_train_labels")
        # "early": the first heatmap epoch after 0 (the paper's epoch 20 of 350)
        early = min([e for e in s["distance_epochs"] if e > 0] or [min(two)])
        results["fine"] = {"run": "fine", "num_classes": fine_run.trainer.num_original, "early_epoch": early,
                           "train_accuracy": fine_run.summary["train_accuracy"],
                           "twins": [{"epoch": e, **twin_ratios(two[e], fine_run.trainer.num_original)}
                                     for e in sorted(two) if e > 0], "seconds": fine_run.seconds}
    if a.grid:
        rows = []
        for lr in LEARNING_RATES:
            for wd in WEIGHT_DECAYS:
                stage(f"grid lr {lr:g} wd {wd:g}, {s['grid_epochs']} epochs")
                g = _common.train_run(out / "grid" / f"lr{lr:g}_wd{wd:g}", **_config(
                    s, a, coarse=s["coarse"], random_coarse=s["random_coarse"], epochs=s["grid_epochs"], lr=lr,
                    weight_decay=wd, metrics_every=s["grid_epochs"]))
                sup = superclass_map(g.trainer.y_orig["train"].cpu().numpy(), g.trainer.y["train"].cpu().numpy(),
                                     g.trainer.num_original)
                final = _distances(g.trainer.out)
                last = final[max(final)] if final else None
                rows.append({"lr": lr, "weight_decay": wd, "clp_accuracy": g.summary["clp_accuracy"],
                             "linear_probe_accuracy": g.summary["linear_probe_accuracy"],
                             "train_accuracy": g.summary["train_accuracy"], "test_accuracy": g.summary["test_accuracy"],
                             "msdr": None if last is None else line_ratios(last, sup)["msdr"], "seconds": g.seconds})
        results["grid"] = rows
    _log("figures and report", a)
    report = _report(results, coarse_run, names, out, a, argv)
    report.seconds = time.perf_counter() - t0
    results["seconds"] = report.seconds
    results["claims"] = report.as_dict()["claims"]
    report.write(out)
    _common.write_json(results, out / "results.json")
    print(report.markdown())
    _log(f"wrote {out / 'report.md'} and {out / 'results.json'} ({report.seconds:.0f} s)", a)
    return results


def _report(results: dict, coarse_run, names, out: Path, a, argv) -> _common.Report:
    c, s = results["coarse"], results["config"]
    report = _common.Report(title="Fine-grained structure under Neural Collapse: coarse labels (paper 000)",
                            command=_common.command(NAME, argv),
                            preset=results["preset"], quick=results["quick"])
    for row in claims(results):
        report.claim(*row)
    distances = {e: d for e, d in _distances(coarse_run.trainer.out).items() if e in s["distance_epochs"]}
    bars = dict(clp=c["clp_accuracy"], lpo=c["linear_probe_accuracy"], ot=results["original"]["best_test_accuracy"],
                chance=c["clp_chance"], title=f"CLP / LPO / OT ({s['dataset']}, {c['num_super']} super-classes)")
    sup = c["superclass_of"]
    title = (f"{s['arch']} on {s['dataset']} with {c['num_super']} coarse labels: class distance D over the "
             f"{len(sup)} original classes (penultimate layer, train)")
    main_figure(distances, names, c["lines"], coarse_run.measured, c["penultimate"], bars, c["interpolation_epoch"],
                out / "coarse.png", title)
    report.figure("coarse.png", "Top: D_ij (eq. 6) at the heatmap epochs, dark = small. Bottom: CLP, LPO and OT "
                  "test accuracy on the original classes; the central and same-super lines against the "
                  "between-super-class distance over training; NC1 on the coarse labels.")
    from ..train import figures

    figures.class_distance_heatmaps(distances, out / "class_distance.png", names=names,
                                    title=f"class distance D, {c['num_super']} super-classes (super-class of each "
                                          f"class: {sup if len(sup) <= 20 else '...'})")
    report.figure("class_distance.png", "Class distance D over the original classes at the heatmap epochs.")
    embedding = "t-SNE" if c["clp_embedding"] == "tsne" else c["clp_embedding"].upper()
    _tsne_figure(coarse_run, c, names, out / "tsne.png", a.seed)
    report.figure("tsne.png", f"{embedding} of the final penultimate train features inside each super-class, "
                  f"coloured by original class (fig. 6).")
    if results.get("fine"):
        f = results["fine"]
        two = {e: d for e, d in _distances(out / "fine", "_train_labels").items() if e in s["distance_epochs"]}
        if two:
            k = f["num_classes"]
            fine_names = [f"{names[i % k]}/{i // k}" for i in range(2 * k)]
            figures.class_distance_heatmaps(two, out / "fine_class_distance.png", names=fine_names,
                                            title=f"fine labels: D over the {2 * k} training labels c + beta C "
                                                  f"(fig. 15)")
            report.figure("fine_class_distance.png", "Fine labels: class distance over the 2C training labels; "
                          "the off-diagonals at distance C pair the two halves of one original class.")
        report.section("Fine labels", "| epoch | D_twin / D_other | D_ll / D_other |\n| --- | --- | --- |\n" + "\n".join(
            f"| {r['epoch']} | {_num(r['twin'])} | {_num(r['diag'])} |" for r in f["twins"]))
    if results.get("grid"):
        grid_figure(results["grid"], out / "grid.png")
        report.figure("grid.png", f"The lr x wd grid, coarse labels, {results['grid_epochs']} epochs per cell.")
        report.section("lr x wd grid", grid_table(results["grid"]))
    report.section("The three lines over training", lines_table(c["lines"]) + (
        f"\n\nA line shows up when its ratio stays <= {LINE:g} from that epoch on; central: epoch "
        f"{c['shows_up']['central']}, same-super: epoch {c['shows_up']['same']}. Interpolation (train accuracy "
        f">= {100 * c['it_threshold']:.1f}%): epoch {c['interpolation_epoch']}."))
    o = results["original"]
    cfg = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("grid_epochs",))
    report.section("Runs", f"Coarse run ({c['seconds']:.0f} s): CLP {_pct(c['clp_accuracy'])} "
                   f"({c['clp_embedding']}), LPO {_pct(c['linear_probe_accuracy'])}, test accuracy on the "
                   f"{c['num_super']} coarse labels {_pct(c['test_accuracy'])}. Original-label run ({o['seconds']:.0f} s):"
                   f" best test accuracy {_pct(o['best_test_accuracy'])}, final {_pct(o['test_accuracy'])}.\n\n"
                   f"Settings: {cfg}. Run folders (the trainer's own metrics and figures): coarse/, original/"
                   + (", fine/" if results.get("fine") else "") + (", grid/" if results.get("grid") else "") + ".")
    return report


def main(argv=None) -> int:
    def run(args):
        return body(args)

    return _common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
