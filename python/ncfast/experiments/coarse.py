"""Paper 000 (conference version 001): fine-grained structure under Neural Collapse with coarse labels.

python -m ncfast.experiments.coarse                    # digits, ResNet-18, coarse-5 + original labels
python -m ncfast.experiments.coarse --fine --grid      # + fine labels (eq. 5) + the lr x wd grid
python -m ncfast.experiments.coarse --preset cifar10 --data DIR          # the paper's setting (GPU)
python -m ncfast.experiments.coarse --preset cifar100 --data DIR --coarse official
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..labels import superclass_map
from ..train import figures as train_figures
from ..train.models import ARCH_NAMES
from ..train.probes import EMBEDDINGS, embed
from ..train.trainer import LEARNING_RATES, WEIGHT_DECAYS, Config, Trainer, coarse_arg
from . import _common
from ._common import number, percent

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
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
CLASS_NAMES = {"digits": DIGITS, "fashion-mnist": FASHION, "cifar10": CIFAR10, "cifar100": CIFAR100}

# Config fields of the coarse-label run per preset (the original-label run is the same net on the
# original labels); "coarse": the default K, "distance_epochs": the heatmaps, "grid_epochs": --grid's.
PRESETS = {
    name: dict(s, depth=None, random_coarse=None)
    for name, s in {
        "digits": dict(
            dataset="digits",
            arch="resnet18",
            width=32,
            epochs=40,
            batch_size=128,
            lr=0.01,
            weight_decay=5e-4,
            metrics_every=2,
            clp_embed="tsne",
            coarse=5,
            distance_epochs=(1, 3, 10, 40),
            grid_epochs=20,
        ),
        "fashion-mnist": dict(
            dataset="fashion-mnist",
            arch="resnet18",
            width=8,
            train_subset=5000,
            augment=False,
            epochs=20,
            batch_size=128,
            lr=0.01,
            weight_decay=5e-4,
            metrics_every=5,
            clp_embed="tsne",
            coarse=5,
            distance_epochs=(1, 5, 10, 20),
            grid_epochs=10,
        ),
        "cifar10": dict(
            dataset="cifar10",
            arch="resnet18",
            width=None,
            epochs=350,
            batch_size=128,
            lr=0.01,
            weight_decay=5e-4,
            metrics_every=10,
            clp_embed="tsne",
            coarse=5,
            distance_epochs=(20, 120, 240, 350),
            grid_epochs=350,
        ),
        "cifar100": dict(
            dataset="cifar100",
            arch="resnet18",
            width=None,
            epochs=350,
            batch_size=128,
            lr=0.01,
            weight_decay=5e-4,
            metrics_every=10,
            clp_embed="tsne",
            coarse=20,
            distance_epochs=(20, 120, 240, 350),
            grid_epochs=350,
        ),
    }.items()
}
QUICK = dict(
    dataset="digits",
    arch="mlp",
    width=64,
    epochs=8,
    batch_size=64,
    lr=0.05,
    weight_decay=5e-4,
    metrics_every=1,
    clp_embed="pca",
    coarse=5,
    distance_epochs=(1, 3, 8),
    grid_epochs=2,
)


# ------------------------------------------------------------------------------------ pure functions
def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 and math.isfinite(a) and math.isfinite(b) else float("nan")


def line_ratios(distance, superclass) -> dict:
    """The "three dark lines" of a class-distance heatmap (eq. 6, "D_ij = 1/(n_i n_j) sum_u sum_v
    ||h_u^(i) - h_v^(j)||^2") against its background: central = mean D_ii / mean D_other, same = mean
    D_same / mean D_other, msdr = mean D_same / mean D_ii (same: i != j in one super-class, other: i, j
    in different super-classes; absent classes, NaN rows, are left out). NaN where a group is empty
    (e.g. no super-class holds two classes)."""
    d = np.asarray(distance, dtype=np.float64)
    s = np.asarray(superclass)
    present = (s >= 0) & np.isfinite(np.diag(d))
    d, s = d[np.ix_(present, present)], s[present]
    eye = np.eye(d.shape[0], dtype=bool)
    same_super = s[:, None] == s[None, :]
    groups = {"diag": d[eye], "same": d[same_super & ~eye], "other": d[~same_super]}
    mean = {k: float(v.mean()) if v.size else float("nan") for k, v in groups.items()}
    return {
        "central": _ratio(mean["diag"], mean["other"]),
        "same": _ratio(mean["same"], mean["other"]),
        "msdr": _ratio(mean["same"], mean["diag"]),
    }


def twin_ratios(distance, num_classes: int) -> dict:
    """The fine-label matrix (2C x 2C over labels l = c + beta C, eq. 5: "y^_k = y_k + beta C ... beta is
    a Bernoulli variable") against its background: twin = mean D over the two halves (c, c + C) of one
    original class / mean D over labels of different original classes; diag = mean D_ll / the same.
    Under Neural Collapse on the fine labels twin -> 1 (the halves separate like any two classes);
    twin < 1: the original classes still show."""
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
    """The paper's order, "the central line ... shows up earlier": the central line shows up strictly
    before the same-super lines (or they never do). False when the central line never shows up."""
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


def _epoch(e) -> str:
    return number(e, "d")


def claims(results: dict) -> list[_common.Claim]:
    """The paper's claims the results can test, each with ours and a verdict computed from the numbers
    in ``results`` (results.json's layout) and the module's thresholds; not measured where a number is
    missing."""
    claim = _common.Claim
    c = results["coarse"]
    k = c["num_super"]
    not_vgg = " (not for VGG, app. H: the lines appear together)" if results["config"]["arch"].startswith("vgg") else ""
    last = c["lines"][-1] if c["lines"] else {}
    nc1_0, nc1_t, acc = c.get("nc1_first"), c.get("nc1_last"), c.get("train_accuracy")
    out = [
        claim(
            f"Neural Collapse on the {k} coarse labels: train accuracy reaches {100 * c['it_threshold']:.1f}% "
            f"and NC1 falls {NC1_FALL:g}x or more",
            "0 training error; NC1, NC2 -> 0 (fig. 3)",
            f"train acc {percent(acc)}; NC1 {number(nc1_0)} -> {number(nc1_t)}",
            None if None in (nc1_0, nc1_t, acc) else acc >= c["it_threshold"] and nc1_t <= nc1_0 / NC1_FALL,
        )
    ]
    same_t = last.get("same")
    out.append(
        claim(
            f"Three dark lines at the end: same-super-class distances <= {LINE:g} x the distances between "
            f"super-classes",
            "three dark lines at epoch 350 (fig. 5)",
            f"D_same / D_other = {number(same_t, '.3f')} at epoch {_epoch(last.get('epoch'))}",
            None if same_t is None else same_t <= LINE,
        )
    )
    ec, es = c["shows_up"]["central"], c["shows_up"]["same"]
    out.append(
        claim(
            f"The central line (D_ii) shows up first, the same-super lines later (ratio to D_other <= "
            f"{LINE:g} from then on)",
            "central line first, side lines later (fig. 5, epochs 20-350)" + not_vgg,
            f"central from epoch {_epoch(ec)}, same-super from epoch {_epoch(es)}",
            central_first(ec, es) if c["lines"] else None,
        )
    )
    msdr = last.get("msdr")
    out.append(
        claim(
            f"Fine-grained structure at the end: the central line stays darker, MSDR = D_same / D_ii >= "
            f"{FINE_STRUCTURE:g} (Neural Collapse alone: 1)",
            "central line clearly darker at epoch 350 and after 1,000 epochs (figs. 5, 9)" + not_vgg,
            f"MSDR {number(msdr, '.2f')} at epoch {_epoch(last.get('epoch'))}",
            None if msdr is None else msdr >= FINE_STRUCTURE,
        )
    )
    clp, lpo, chance = c.get("clp_accuracy"), c.get("linear_probe_accuracy"), c["clp_chance"]
    ot = results["original"].get("best_test_accuracy")
    bar = (1 + chance) / 2
    out.append(
        claim(
            "CLP recovers the original classes well above chance (half way from the in-super-class guess to 100%)",
            "> 93% on CIFAR-10 from 5 coarse labels (chance 50%)" + not_vgg,
            f"CLP {percent(clp)} (chance {percent(chance)}, bar {percent(bar)})",
            None if clp is None else clp >= bar,
        )
    )
    out.append(
        claim(
            f"CLP is comparable to LPO, the linear probe on the true original labels (within {100 * CLOSE:g} points)",
            "comparable (fig. 9)",
            f"CLP {percent(clp)} vs LPO {percent(lpo)}",
            None if None in (clp, lpo) else abs(clp - lpo) <= CLOSE,
        )
    )
    out.append(
        claim(
            f"CLP matches OT, the same net trained on the original labels (within {100 * CLOSE:g} points)",
            "> 93%, matching ResNet-18's standard accuracy (fig. 9)",
            f"CLP {percent(clp)} vs OT {percent(ot)} (best test accuracy)",
            None if None in (clp, ot) else ot - clp <= CLOSE,
        )
    )
    fine = results.get("fine")
    if fine:
        twins = fine["twins"]
        early = next((r for r in twins if r["epoch"] == fine["early_epoch"]), twins[0] if twins else {})
        end = twins[-1] if twins else {}
        te, tt = early.get("twin"), end.get("twin")
        out.append(
            claim(
                f"Fine labels: early in training the {2 * fine['num_classes']} fine classes form "
                f"{fine['num_classes']} clusters (twin lines (c, c+C) <= {LINE:g} x background)",
                "three dark lines at epoch 20 (fig. 15)",
                f"D_twin / D_other = {number(te, '.3f')} at epoch {_epoch(early.get('epoch'))}",
                None if te is None else te <= LINE,
            )
        )
        out.append(
            claim(
                f"Fine labels: the original classes are still there at the end (twin ratio <= {LINE:g})",
                "preserved at epoch 350 (fig. 15)",
                f"D_twin / D_other = {number(tt, '.3f')} at epoch {_epoch(end.get('epoch'))}",
                None if tt is None else tt <= LINE,
            )
        )
        out.append(
            claim(
                "Fine labels: ... but lighter than early (twin ratio grows)",
                '"although with a lighter color"',
                f"{number(te, '.3f')} -> {number(tt, '.3f')}",
                None if None in (te, tt) else tt > te,
            )
        )
    grid = results.get("grid")
    if grid:
        close = [
            g
            for g in grid
            if g.get("clp_accuracy") is not None
            and g.get("linear_probe_accuracy") is not None
            and abs(g["clp_accuracy"] - g["linear_probe_accuracy"]) <= CLOSE
        ]
        out.append(
            claim(
                f"Across the lr x wd grid CLP is comparable to LPO (within {100 * CLOSE:g} points) in most cells",
                '"in most cases" (fig. 28)',
                f"{len(close)} of {len(grid)} cells",
                2 * len(close) > len(grid),
            )
        )
        exempt = [g for g in grid if not (g["lr"] == max(LEARNING_RATES) and g["weight_decay"] == max(WEIGHT_DECAYS))]
        fit = [g for g in exempt if g.get("train_accuracy") is not None and g["train_accuracy"] >= c["it_threshold"]]
        out.append(
            claim(
                f"Every grid cell but (lr 0.1, wd 5e-3) reaches {100 * c['it_threshold']:.1f}% train accuracy",
                '"very low training error except ... wd 5e-3, lr 0.1" (fig. 19)',
                f"{len(fit)} of {len(exempt)} cells ({results['grid_epochs']} epochs)",
                len(fit) == len(exempt),
            )
        )
    return out


def lines_table(rows: list[dict]) -> str:
    """Markdown table of the per-epoch line ratios (rows of results.json's coarse.lines)."""
    return _common.table(
        ["epoch", "train acc", "D_ii / D_other", "D_same / D_other", "MSDR"],
        [
            [
                r["epoch"],
                percent(r.get("train_acc")),
                number(r.get("central"), ".3f"),
                number(r.get("same"), ".3f"),
                number(r.get("msdr"), ".2f"),
            ]
            for r in rows
        ],
    )


def grid_table(grid: list[dict]) -> str:
    """Markdown table of the grid: one row per learning rate, one column per weight decay, each cell
    CLP / LPO / train accuracy; a cell not trained is ``MISSING``."""
    lrs = sorted({g["lr"] for g in grid}, reverse=True)
    wds = sorted({g["weight_decay"] for g in grid}, reverse=True)
    cells = {
        (g["lr"], g["weight_decay"]): " / ".join(
            percent(g.get(key)) for key in ("clp_accuracy", "linear_probe_accuracy", "train_accuracy")
        )
        for g in grid
    }
    return (
        _common.table(
            ["lr \\ wd", *(f"{w:g}" for w in wds)],
            [[f"{lr:g}", *(cells.get((lr, wd), _common.MISSING) for wd in wds)] for lr in lrs],
        )
        + "\n\nCells: CLP / LPO / final train accuracy."
    )


# ------------------------------------------------------------------------------------------- figures
def draw_bars(ax, clp, lpo, ot, chance=None, title: str = "") -> None:
    """CLP / LPO / OT bars with their values (paper 000 fig. 9); a dashed line at the CLP chance."""
    values = [clp, lpo, ot]
    heights = [0.0 if v is None else v for v in values]
    bars = ax.bar(["CLP", "LPO", "OT"], heights, color=["tab:blue", "tab:orange", "tab:green"])
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01, percent(v), ha="center", va="bottom", fontsize=8)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"CLP chance {percent(chance)}")
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
        ax.axvline(
            interpolation, color="black", linestyle=":", linewidth=1, label=f"interpolation (epoch {interpolation})"
        )
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
        ax.plot(
            [e for e, f in zip(epochs, forced) if f],
            [v for v, f in zip(vals, forced) if f],
            linestyle="none",
            marker="o",
            markerfacecolor="none",
            color=line.get_color(),
            label="degenerate (sample size)",
        )
    if all(v > 0 for v in vals if v == v):
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("NC1 on the coarse labels", fontsize=9)
    ax.legend(fontsize=7)


def main_figure(
    distances: dict, names, rows, records, layer, bars: dict, interpolation, path: Path, title: str, dpi: int = 80
) -> Path:
    """The summary figure: the class-distance heatmaps (top), the CLP / LPO / OT bars, the line
    ratios and NC1 over training (bottom)."""
    n = max(3, len(distances))
    fig = _common.pyplot().figure(figsize=(3.3 * n, 6.6))
    grid = fig.add_gridspec(2, 3 * n)  # n heatmaps on top, three panels below, each row evenly spaced
    train_figures.class_distance_heatmaps(
        distances, None, names=names, axes=[fig.add_subplot(grid[0, 3 * i : 3 * i + 3]) for i in range(len(distances))]
    )
    bottom = [fig.add_subplot(grid[1, n * i : n * i + n]) for i in range(3)]
    draw_bars(bottom[0], **bars)
    draw_lines(bottom[1], rows, interpolation)
    draw_nc1(bottom[2], records, layer)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _common.save_figure(fig, path, dpi=dpi)


def grid_figure(grid: list[dict], path: Path, dpi: int = 100) -> Path:
    """3 x 3 heatmaps (rows lr, columns wd) of CLP, LPO and train accuracy, annotated."""
    lrs = sorted({g["lr"] for g in grid}, reverse=True)
    wds = sorted({g["weight_decay"] for g in grid}, reverse=True)
    fig, axes = _common.pyplot().subplots(1, 3, figsize=(11, 3.4))
    for ax, (key, label) in zip(
        axes, (("clp_accuracy", "CLP"), ("linear_probe_accuracy", "LPO"), ("train_accuracy", "train accuracy"))
    ):
        m = np.full((len(lrs), len(wds)), np.nan)
        for g in grid:
            v = g.get(key)
            m[lrs.index(g["lr"]), wds.index(g["weight_decay"])] = np.nan if v is None else v
        image = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for i in range(len(lrs)):
            for j in range(len(wds)):
                if m[i, j] == m[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{100 * m[i, j]:.1f}",
                        ha="center",
                        va="center",
                        color="white" if m[i, j] < 0.6 else "black",
                        fontsize=9,
                    )
        ax.set_xticks(range(len(wds)))
        ax.set_xticklabels([f"{w:g}" for w in wds])
        ax.set_yticks(range(len(lrs)))
        ax.set_yticklabels([f"{lr:g}" for lr in lrs])
        ax.set_xlabel("weight decay")
        ax.set_ylabel("learning rate")
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    return _common.save_figure(fig, path, dpi=dpi)


def tsne_figure(run: _common.Run, layer: str, names, path: Path, seed: int) -> Path:
    """Per super-class 2-D embedding of the final train features (the reduction CLP used: "we first use
    t-SNE to reduce the dimensionality to 2"), coloured by original class with its name (fig. 6)."""
    tr = run.trainer
    x = tr.features("train", layer)
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
    train_figures.superclass_embeddings(pictures, path, original_names=names)
    return path


# ------------------------------------------------------------------------------------------ the runs
def _num_classes(dataset: str) -> int:
    return 100 if dataset == "cifar100" else 10


def _fields(s: dict, **over) -> dict:
    """Config fields of one training run from the settings (``over`` added or replaced)."""
    keys = (
        "dataset",
        "arch",
        "depth",
        "width",
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "metrics_every",
        "clp_embed",
        "train_subset",
        "augment",
    )  # the last two: the CPU-sized fashion-mnist preset's
    return {**{k: s[k] for k in keys if k in s}, **over}


def _measured_epochs(s: dict) -> list[int]:
    """Epochs the trainer measures whatever metrics_every says: the heatmaps' and 1..EARLY."""
    return sorted({e for e in s["distance_epochs"] if e <= s["epochs"]} | set(range(1, min(EARLY, s["epochs"]) + 1)))


def _distances(run_dir: Path, suffix: str = "") -> dict[int, np.ndarray]:
    files = sorted((Path(run_dir) / "class_distance").glob(f"epoch_[0-9][0-9][0-9]{suffix}.npy"))
    return {int(p.stem.split("_")[1]): np.load(p) for p in files}


def _superclass(tr: Trainer) -> np.ndarray:
    """The super-class of each original class in a trainer's training labels (-1: absent)."""
    return superclass_map(tr.y_orig["train"].cpu().numpy(), tr.y["train"].cpu().numpy(), tr.num_original)


def _coarse_results(run: _common.Run) -> dict:
    tr = run.trainer
    pen = tr.model.penultimate_name
    superclass = _superclass(tr)
    distances = _distances(tr.out)
    acc = {r["epoch"]: r["train_acc"] for r in run.history}
    lines = [{"epoch": e, "train_acc": acc.get(e), **line_ratios(distances[e], superclass)} for e in sorted(distances)]
    epochs = [r["epoch"] for r in lines]
    shows = {key: shows_up(epochs, [r[key] for r in lines]) for key in ("central", "same")}
    nc1 = [(r["epoch"], r["layers"][pen]["train"].get("nc1")) for r in run.measured]
    summary = run.summary
    return {
        "run": tr.out.name,
        "num_super": tr.num_train_classes,
        "superclass_of": superclass.tolist(),
        "clp_accuracy": summary["clp_accuracy"],
        "clp_embedding": summary["clp_embedding"],
        "clp_chance": clp_chance(superclass),
        "linear_probe_accuracy": summary["linear_probe_accuracy"],
        "train_accuracy": summary["train_accuracy"],
        "test_accuracy": summary["test_accuracy"],
        "interpolation_epoch": summary["interpolation_epoch"],
        "it_threshold": tr.cfg.it_threshold,
        "penultimate": pen,
        "lines": lines,
        "shows_up": shows,
        "nc1": nc1,
        "nc1_first": nc1[0][1] if nc1 else None,
        "nc1_last": nc1[-1][1] if nc1 else None,
        "seconds": run.seconds,
    }


def _save_features(run: _common.Run, layer: str, out: Path) -> str | None:
    """features.npz: the final penultimate train features with their labels, when small enough."""
    tr = run.trainer
    x = tr.features("train", layer)
    if x.size > FEATURES_LIMIT:
        return None
    np.savez_compressed(
        out / "features.npz",
        features=x,
        y_orig=tr.y_orig["train"].cpu().numpy(),
        y_train=tr.y["train"].cpu().numpy(),
        epoch=tr.epoch,
    )
    return "features.npz"


def resolve(s: dict, args: argparse.Namespace) -> dict:
    """The settings that hang on which flags were given: --random-coarse replaces the preset's K (not
    --coarse's: one or the other); --distance-epochs must lie in [0, --epochs], the preset's are cut
    to --epochs. A ValueError naming the flag otherwise."""
    s = dict(s)
    if args.random_coarse is not None:
        if args.coarse is not None:
            raise ValueError("--coarse and --random-coarse: choose one")
        s["coarse"] = None
    if args.distance_epochs is None:
        s["distance_epochs"] = sorted({min(e, s["epochs"]) for e in s["distance_epochs"]})
    elif any(not 0 <= e <= s["epochs"] for e in s["distance_epochs"]):
        raise ValueError(f"--distance-epochs: epochs in [0, {s['epochs']}] (--epochs), got {s['distance_epochs']}")
    return s


def run(ctx: _common.Context) -> dict:
    s, a, out = resolve(ctx.settings, ctx.args), ctx.args, ctx.out
    num_classes = _num_classes(s["dataset"])
    names = CLASS_NAMES.get(s["dataset"], [str(i) for i in range(num_classes)])
    label = (
        f"random-coarse-{s['random_coarse']}"
        if s["random_coarse"]
        else "official super-classes"
        if s["coarse"] == "official"
        else f"coarse-{s['coarse']}"
    )
    t0, total, step = time.perf_counter(), 2 + int(a.fine) + (9 if a.grid else 0), itertools.count(1)

    def stage(msg: str) -> None:
        ctx.log(f"[{next(step)}/{total}] {msg} ({time.perf_counter() - t0:.0f} s so far)")

    def train(folder, **over) -> _common.Run:
        return ctx.train(out / folder, resume=a.resume, **_fields(s, **over))

    stage(f"{s['arch']} on {s['dataset']}, {label} labels, {s['epochs']} epochs")
    coarse_run = train(
        "coarse", coarse=s["coarse"], random_coarse=s["random_coarse"], distance_epochs=_measured_epochs(s), layers=None
    )
    coarse = _coarse_results(coarse_run)
    coarse["features"] = _save_features(coarse_run, coarse["penultimate"], out)
    stage(f"the same net on the original labels (OT), {s['epochs']} epochs")
    # OT needs the test accuracy of every epoch (history has it) and no CLP: measure only the ends
    ot_run = train("original", metrics_every=s["epochs"], clp_embed="pca")
    tests = [r["test_acc"] for r in ot_run.history if r["epoch"] > 0]
    original = {
        "run": "original",
        "best_test_accuracy": max(tests) if tests else None,
        "test_accuracy": ot_run.summary["test_accuracy"],
        "train_accuracy": ot_run.summary["train_accuracy"],
        "linear_probe_accuracy": ot_run.summary["linear_probe_accuracy"],
        "seconds": ot_run.seconds,
    }
    results = {
        "preset": ctx.preset,
        "quick": ctx.quick,
        "config": s,
        "class_names": names,
        "grid_epochs": s["grid_epochs"],
        "coarse": coarse,
        "original": original,
        "thresholds": {"line": LINE, "fine_structure": FINE_STRUCTURE, "close": CLOSE, "nc1_fall": NC1_FALL},
        "_coarse_run": coarse_run,
    }
    if a.fine:
        stage(f"fine labels (2 x {num_classes} classes), {s['epochs']} epochs")
        fine_run = train("fine", fine=True, clp_embed="pca", distance_epochs=_measured_epochs(s))
        two = _distances(fine_run.trainer.out, "_train_labels")
        # "early": the first heatmap epoch after 0 (the paper's epoch 20 of 350)
        early = min([e for e in s["distance_epochs"] if e > 0] or [min(two)])
        k = fine_run.trainer.num_original
        results["fine"] = {
            "run": "fine",
            "num_classes": k,
            "early_epoch": early,
            "train_accuracy": fine_run.summary["train_accuracy"],
            "twins": [{"epoch": e, **twin_ratios(two[e], k)} for e in sorted(two) if e > 0],
            "seconds": fine_run.seconds,
        }
    if a.grid:
        results["grid"] = []
        for lr in LEARNING_RATES:
            for wd in WEIGHT_DECAYS:
                stage(f"grid lr {lr:g} wd {wd:g}, {s['grid_epochs']} epochs")
                g = train(
                    Path("grid") / f"lr{lr:g}_wd{wd:g}",
                    coarse=s["coarse"],
                    random_coarse=s["random_coarse"],
                    epochs=s["grid_epochs"],
                    lr=lr,
                    weight_decay=wd,
                    metrics_every=s["grid_epochs"],
                )
                final = _distances(g.trainer.out)
                results["grid"].append(
                    {
                        "lr": lr,
                        "weight_decay": wd,
                        "clp_accuracy": g.summary["clp_accuracy"],
                        "linear_probe_accuracy": g.summary["linear_probe_accuracy"],
                        "train_accuracy": g.summary["train_accuracy"],
                        "test_accuracy": g.summary["test_accuracy"],
                        "msdr": line_ratios(final[max(final)], _superclass(g.trainer))["msdr"] if final else None,
                        "seconds": g.seconds,
                    }
                )
    ctx.log("figures and report")
    return results


def figures(results: dict, out: Path) -> list[tuple[str, str]]:
    c, s, run_ = results["coarse"], results["config"], results["_coarse_run"]
    names, sup = results["class_names"], c["superclass_of"]
    distances = {e: d for e, d in _distances(run_.trainer.out).items() if e in s["distance_epochs"]}
    bars = dict(
        clp=c["clp_accuracy"],
        lpo=c["linear_probe_accuracy"],
        ot=results["original"]["best_test_accuracy"],
        chance=c["clp_chance"],
        title=f"CLP / LPO / OT ({s['dataset']}, {c['num_super']} super-classes)",
    )
    main_figure(
        distances,
        names,
        c["lines"],
        run_.measured,
        c["penultimate"],
        bars,
        c["interpolation_epoch"],
        out / "coarse.png",
        f"{s['arch']} on {s['dataset']} with {c['num_super']} coarse labels: class "
        f"distance D over the {len(sup)} original classes (penultimate layer, train)",
    )
    train_figures.class_distance_heatmaps(
        distances,
        out / "class_distance.png",
        names=names,
        title=(
            f"class distance D, {c['num_super']} super-classes (super-class of each class: "
            f"{sup if len(sup) <= 20 else '...'})"
        ),
    )
    tsne_figure(run_, c["penultimate"], names, out / "tsne.png", run_.trainer.cfg.seed)
    embedding = "t-SNE" if c["clp_embedding"] == "tsne" else c["clp_embedding"].upper()
    files = [
        (
            "coarse.png",
            "Top: D_ij (eq. 6) at the heatmap epochs, dark = small. Bottom: CLP, LPO and OT test "
            "accuracy on the original classes; the central and same-super lines against the between-super-class "
            "distance over training; NC1 on the coarse labels.",
        ),
        ("class_distance.png", "Class distance D over the original classes at the heatmap epochs."),
        (
            "tsne.png",
            f"{embedding} of the final penultimate train features inside each super-class, coloured by "
            f"original class (fig. 6).",
        ),
    ]
    two = {e: d for e, d in _distances(out / "fine", "_train_labels").items() if e in s["distance_epochs"]}
    if results.get("fine") and two:
        k = results["fine"]["num_classes"]
        train_figures.class_distance_heatmaps(
            two,
            out / "fine_class_distance.png",
            names=[f"{names[i % k]}/{i // k}" for i in range(2 * k)],
            title=f"fine labels: D over the {2 * k} training labels c + beta C (fig. 15)",
        )
        files.append(
            (
                "fine_class_distance.png",
                "Fine labels: class distance over the 2C training labels; the "
                "off-diagonals at distance C pair the two halves of one original class.",
            )
        )
    if results.get("grid"):
        grid_figure(results["grid"], out / "grid.png")
        files.append(("grid.png", f"The lr x wd grid, coarse labels, {results['grid_epochs']} epochs per cell."))
    return files


def sections(results: dict) -> list[tuple[str, str]]:
    c, o, s = results["coarse"], results["original"], results["config"]
    out = []
    if results.get("fine"):
        out.append(
            (
                "Fine labels",
                _common.table(
                    ["epoch", "D_twin / D_other", "D_ll / D_other"],
                    [
                        [r["epoch"], number(r["twin"], ".3f"), number(r["diag"], ".3f")]
                        for r in results["fine"]["twins"]
                    ],
                ),
            )
        )
    if results.get("grid"):
        out.append(("lr x wd grid", grid_table(results["grid"])))
    out.append(
        (
            "The three lines over training",
            lines_table(c["lines"])
            + (
                f"\n\nA line shows up when its ratio stays <= {LINE:g} from that epoch on; central: epoch "
                f"{_epoch(c['shows_up']['central'])}, same-super: epoch {_epoch(c['shows_up']['same'])}. Interpolation "
                f"(train accuracy >= {100 * c['it_threshold']:.1f}%): epoch {_epoch(c['interpolation_epoch'])}."
            ),
        )
    )
    settings = ", ".join(f"{k} {v}" for k, v in s.items() if k != "grid_epochs")
    folders = ["coarse/", "original/"] + ["fine/"] * bool(results.get("fine")) + ["grid/"] * bool(results.get("grid"))
    out.append(
        (
            "Runs",
            f"Coarse run ({c['seconds']:.0f} s): CLP {percent(c['clp_accuracy'])} ({c['clp_embedding']}), "
            f"LPO {percent(c['linear_probe_accuracy'])}, test accuracy on the {c['num_super']} coarse labels "
            f"{percent(c['test_accuracy'])}. Original-label run ({o['seconds']:.0f} s): best test accuracy "
            f"{percent(o['best_test_accuracy'])}, final {percent(o['test_accuracy'])}.\n\nSettings: {settings}. "
            f"Run folders (the trainer's own metrics and figures): {', '.join(folders)}.",
        )
    )
    return out


# -------------------------------------------------------------------------------------------- driver
def check(s: dict) -> None:
    """Settings the trainer's Config does not check: K of --coarse / --random-coarse; then the Config of
    the coarse-label run (refused before anything trains)."""
    n = _num_classes(s["dataset"])
    for flag, k in (("--random-coarse", s["random_coarse"]), ("--coarse", s["coarse"])):
        if k == "official" and s["dataset"] != "cifar100":
            raise ValueError(f"--coarse official: only cifar100 has official super-classes, not {s['dataset']}")
        if k not in (None, "official") and not 2 <= k < n:
            raise ValueError(f"{flag}: K in [2, {n - 1}] (every super-class must be able to hold two classes), got {k}")
    Config(**_fields(s, coarse=None if s["random_coarse"] else s["coarse"], random_coarse=s["random_coarse"]))


_flag = _common.flag
DRIVER = _common.Driver(
    name="coarse",
    title="Fine-grained structure under Neural Collapse: coarse labels (paper 000)",
    usage=__doc__,
    presets=PRESETS,
    quick=QUICK,
    check=check,
    run=run,
    claims=claims,
    figures=figures,
    sections=sections,
    flags=[
        _flag(
            "--coarse",
            type=coarse_arg,
            help="K super-classes by y mod K (eq. 4; default 5 on the 10-class "
            "presets, 20 on cifar100), or 'official' (cifar100's 20 semantic super-classes)",
        ),
        _flag(
            "--random-coarse",
            type=_common.positive_int,
            metavar="K",
            help="K super-classes after a seeded shuffle of the classes (app. F) instead of --coarse",
        ),
        _flag("--fine", action="store_true", help="also train on fine labels (eq. 5): the 2C x 2C matrix (fig. 15)"),
        _flag(
            "--grid",
            action="store_true",
            help="also train the lr x wd grid (lr 0.1/0.01/0.001 x wd "
            "5e-3/5e-4/5e-5) on the coarse labels: 9 more runs of --grid-epochs",
        ),
        _flag("--grid-epochs", type=_common.positive_int, help="epochs of each grid run (default: the preset's)"),
        _flag(
            "--arch",
            choices=ARCH_NAMES,
            help="network (default resnet18; the paper's appendix also has "
            "densenet121 and VGG: vgg11/vgg13/vgg16/vgg19)",
        ),
        _flag("--depth", type=int, help="depth override (resnet 18/34, vgg 11-19, densenet, mlp)"),
        _flag(
            "--width",
            type=_common.positive_int,
            help="base channels / hidden units (default: the preset's; digits 32, the others the arch's own)",
        ),
        _flag("--epochs", type=_common.positive_int, help="epochs of the coarse and original runs"),
        _flag("--lr", type=_common.positive_float, help="learning rate (paper config #1: 0.01)"),
        _flag("--weight-decay", type=_common.nonnegative_float, help="weight decay (#1: 5e-4, #2: 5e-5)"),
        _flag(
            "--distance-epochs",
            type=_common.int_list,
            help="comma-separated epochs of the class-distance heatmaps (default: the preset's, e.g. 1,3,10,40)",
        ),
        _flag("--clp-embed", choices=EMBEDDINGS, help="CLP's reduction before k-means (the paper: tsne)"),
        _flag("--resume", action="store_true", help="finish interrupted runs from their checkpoints"),
    ],
)


def main(argv=None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
