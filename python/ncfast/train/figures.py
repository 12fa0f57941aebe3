"""Figures of a training run, drawn from its metrics.jsonl and class-distance files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ._files import atomic_write

CURVES = ("nc1", "nc2_etf", "cdnv", "vci", "rank", "ncc_mismatch", "ncc_accuracy", "msdr")


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (figures are only written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi: int = 120) -> None:
    """Write a figure to path (its format from the suffix, png without one, at ``dpi``) and close it, whole or not
    at all (``_files.atomic_write``): a failed write leaves the old file and is a ValueError naming the
    path and the cause: "<path>: could not write the figure: No space left on device"."""
    plt = pyplot()
    path = Path(path)
    try:
        atomic_write(path, "figure", lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix[1:] or "png"))
    finally:
        plt.close(fig)


def class_distance_heatmaps(
    distances: dict[int, np.ndarray], path: Path | None, title: str = "", names=None, axes=None
) -> None:
    """Heatmaps of D on the original labels at up to six epochs (paper 000 fig. 5), each with its own
    colour bar (dark = small distance, as the paper draws them).

    names: the class names for both axes (index order of D); shown as tick labels up to 20 classes,
    every tenth index beyond. axes: draw into these matplotlib axes (one per epoch drawn) instead of
    a new figure, and save nothing (``path`` is then ignored)."""
    plt = pyplot()
    epochs = sorted(distances)
    if len(epochs) > 6:
        epochs = [epochs[round(i * (len(epochs) - 1) / 5)] for i in range(6)]
    c = np.asarray(distances[epochs[0]]).shape[0] if epochs else 0
    if c <= 20:
        ticks = np.arange(c)
        labels = [str(n) for n in (names if names is not None else ticks)]
    else:
        ticks = np.arange(0, c, 10)
        labels = [str(t) for t in ticks]
    small = 7 if c <= 10 else 5
    own = axes is None
    if own:
        # fixed margins sized to the longest tick label: tight_layout over many tick labels and
        # colour bars costs about a second a figure, and the trainer draws several per run
        margin = 0.3 + 0.075 * small / 7 * max([len(t) for t in labels] or [1])
        width, height = 3.6 * len(epochs) + margin, 2.9 + margin
        fig, grid = plt.subplots(1, len(epochs), figsize=(width, height), squeeze=False)
        fig.subplots_adjust(
            left=margin / width, right=1 - 0.55 / width, bottom=margin / height, top=1 - 0.55 / height, wspace=0.45
        )
        axes = grid[0]
    for ax, e in zip(axes, epochs):
        image = ax.imshow(np.asarray(distances[e]), cmap="viridis")
        bar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.ax.tick_params(labelsize=7)
        ax.set_title(f"epoch {e}", fontsize=9)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=90, fontsize=small)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=small)
    if own:
        fig.suptitle(title or "class distance D (original labels, penultimate layer, train)", fontsize=10)
        save(fig, path)


def nc_curves(records: list[dict], layer: str, path: Path) -> None:
    """The NC metrics of one layer over epochs, train and test.

    A value the sample size forced (listed in the record's ``degenerate``: rank(Sigma_T) = N - 1,
    where VCI and rank say nothing about the geometry) is left off its curve and drawn as a hollow
    marker, so that it does not read as collapse."""
    plt = pyplot()
    names = [k for k in CURVES if any(k in r["layers"][layer].get("train", {}) for r in records)]
    cols = 4
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    epochs = [r["epoch"] for r in records]
    any_degenerate = False
    for ax, name in zip(axes.flat, names):
        for split in ("train", "test"):
            entries = [r["layers"][layer].get(split, {}) for r in records]
            forced = [name in e.get("degenerate", ()) for e in entries]
            ys = [float("nan") if e.get(name) is None else e[name] for e in entries]
            line = ax.plot(epochs, [float("nan") if f else v for v, f in zip(ys, forced)], marker=".", label=split)[0]
            if any(forced):
                any_degenerate = True
                ax.plot(
                    [e for e, f in zip(epochs, forced) if f],
                    [v for v, f in zip(ys, forced) if f],
                    linestyle="none",
                    marker="o",
                    markerfacecolor="none",
                    color=line.get_color(),
                )
        if name in ("nc1", "cdnv") and all(v > 0 for v in ys if v == v):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend()
    note = "   (hollow: degenerate, forced by the sample size: rank(Sigma_T) = N - 1)" if any_degenerate else ""
    fig.suptitle(f"{layer}{note}")
    fig.tight_layout()
    save(fig, path)


def mismatch_per_layer(records: list[dict], layers: list[str], path: Path, split: str = "train") -> None:
    """NCC mismatch of every probed layer over epochs (paper 003 fig. 2)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [r["epoch"] for r in records]
    for layer in layers:
        ax.plot(epochs, [r["layers"][layer][split]["ncc_mismatch"] for r in records], marker=".", label=layer)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"NCC mismatch ({split})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def superclass_embeddings(pictures: dict, path: Path, original_names=None) -> None:
    """The 2-D embedding of each super-class's train features, coloured by original class (paper 000 fig. 6)."""
    plt = pyplot()
    supers = sorted(pictures)
    cols = min(5, len(supers))
    rows = math.ceil(len(supers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax, s in zip(axes.flat, supers):
        z, orig = pictures[s]
        for o in np.unique(orig):
            sel = orig == o
            ax.scatter(z[sel, 0], z[sel, 1], s=4, label=str(o if original_names is None else original_names[o]))
        ax.set_title(f"super-class {s}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, markerscale=2)
    for ax in list(axes.flat)[len(supers) :]:
        ax.axis("off")
    fig.tight_layout()
    save(fig, path)
