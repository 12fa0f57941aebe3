"""What every experiment driver shares: its command line, its presets, training runs through the
reference trainer, and the report it writes.

A driver ``python -m ncfast.experiments.<name>`` writes into ``--out`` (default ``runs/<name>/``):

- ``report.md``: one row per claim of the paper: the claim, the paper's number, ours, and a verdict
  computed from our data ("holds", "does not hold", or "not measured" where the preset cannot test it),
  then the command that produced it, the figures and any further tables;
- ``results.json``: every number the report and the figures rest on (NaN written as null);
- the figures (PNG) and, under sub-folders, the trainer's own run folders.

Presets: ``digits`` (default; ships with scikit-learn), ``fashion-mnist`` (the IDX files, by default in
/usr/share/datasets/fashion-mnist), ``cifar10`` / ``cifar100`` (``--data``; the paper's sizes and
epochs, for a GPU). ``--quick`` is a tiny version for the tests: under 2 minutes on 2 CPU cores, on
data that ships with the installed packages only.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..train.data import FASHION_MNIST_DIR, IDX_FILES
from ..train.trainer import Config, Trainer, finite

PRESETS = ("digits", "fashion-mnist", "cifar10", "cifar100")


def parser(name: str, doc: str, presets=PRESETS) -> argparse.ArgumentParser:
    """The driver's argument parser with the options every driver has: --out, --preset, --data,
    --quick, --seed, --device, --no-progress. ``doc`` is the module docstring (shown by --help)."""
    p = argparse.ArgumentParser(prog=f"python -m ncfast.experiments.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=f"runs/{name}", help=f"output folder (default runs/{name})")
    p.add_argument("--preset", choices=presets, default=presets[0],
                   help=f"data set and sizes (default {presets[0]})")
    p.add_argument("--data", default=None, help="folder of the data files (fashion-mnist, cifar10, cifar100)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny version for tests: under 2 minutes on 2 CPU cores, bundled data only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def check_preset(preset: str, data: str | None) -> None:
    """Raise FileNotFoundError, naming what is missing, when a preset's data is not on this machine
    (before any training starts)."""
    if preset == "fashion-mnist":
        folder = Path(data or FASHION_MNIST_DIR)
        missing = [f for f in IDX_FILES if not (folder / f).exists() and not (folder / (f + ".gz")).exists()]
        if missing:
            raise FileNotFoundError(f"--preset fashion-mnist: {missing} not in {folder} (apt install "
                                    f"dataset-fashion-mnist, or --data FOLDER)")
    elif preset in ("cifar10", "cifar100") and data is None:
        raise FileNotFoundError(f"--preset {preset}: give --data, the folder holding the CIFAR archive "
                                f"or its extracted folder")


def command(name: str, argv) -> str:
    """The command line that reproduces a driver's run."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", f"ncfast.experiments.{name}", *map(shlex.quote, args)])


@dataclass
class Run:
    """One finished training run of the reference trainer.

    ``history``: one record per epoch (epoch 0 = the untrained network); the measured ones carry
    ``layers`` ({layer: {split: metrics}}). ``trainer`` keeps the trained model and the data."""
    trainer: Trainer
    summary: dict
    seconds: float

    @property
    def history(self) -> list[dict]:
        return self.trainer.history

    @property
    def measured(self) -> list[dict]:
        return [r for r in self.trainer.history if "layers" in r]


def train_run(out: Path, **config) -> Run:
    """Train (or, when ``resume=True`` and a checkpoint exists, finish) one reference-trainer run into
    ``out``; ``config`` are ``ncfast.train.trainer.Config`` fields."""
    t0 = time.perf_counter()
    trainer = Trainer(Config(out=str(out), **config))
    summary = trainer.run()
    return Run(trainer=trainer, summary=summary, seconds=time.perf_counter() - t0)


def spearman(x, y, min_points: int = 3) -> tuple[float, float]:
    """Spearman's rank correlation (average ranks for ties) and its two-sided p-value (scipy) over the
    pairs where both values are finite (None counts as missing); (nan, nan) with fewer than
    ``min_points`` pairs or a constant side, where it is undefined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < max(2, min_points) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    from scipy.stats import spearmanr

    res = spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def write_json(obj, path: Path) -> Path:
    path.write_text(json.dumps(finite(obj), indent=1) + "\n")
    return path


def verdict(holds: bool | None) -> str:
    """The verdict word of a claim: computed by the driver from its data, None where not measured."""
    return "not measured" if holds is None else ("holds" if holds else "does not hold")


@dataclass
class Claim:
    claim: str
    paper: str
    ours: str
    holds: bool | None

    def row(self) -> str:
        cells = (self.claim, self.paper, self.ours, verdict(self.holds))
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


@dataclass
class Report:
    """report.md of a driver: a title, the claims with their verdicts, then figures and sections."""
    title: str
    command: str
    preset: str
    quick: bool = False
    claims: list[Claim] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    seconds: float | None = None

    def claim(self, claim: str, paper: str, ours: str, holds: bool | None) -> Claim:
        c = Claim(claim, paper, ours, None if holds is None else bool(holds))
        self.claims.append(c)
        return c

    def figure(self, file: str, caption: str) -> None:
        self.parts.append(f"![{caption}]({file})\n\n*{caption}*")

    def section(self, heading: str, text: str) -> None:
        self.parts.append(f"## {heading}\n\n{text.rstrip()}")

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", f"Preset `{self.preset}`" + (" (`--quick`: a smoke run, too small for the "
                                                                         "paper's claims)" if self.quick else "")
                 + (f"; {self.seconds:.0f} s." if self.seconds is not None else "."), "",
                 "```", self.command, "```", ""]
        if self.claims:
            lines += ["| claim | paper | ours | verdict |", "| --- | --- | --- | --- |"]
            lines += [c.row() for c in self.claims]
            lines.append("")
        for part in self.parts:
            lines += [part, ""]
        return "\n".join(lines)

    def write(self, out: Path) -> Path:
        path = Path(out) / "report.md"
        path.write_text(self.markdown())
        return path

    def as_dict(self) -> dict:
        return {"title": self.title, "command": self.command, "preset": self.preset, "quick": self.quick,
                "seconds": self.seconds,
                "claims": [{"claim": c.claim, "paper": c.paper, "ours": c.ours, "verdict": verdict(c.holds)}
                           for c in self.claims]}


def run_main(body, argv=None) -> int:
    """Run a driver's ``body(argv)``; a missing data file or a bad argument is one line on stderr
    and exit status 2, not a traceback."""
    try:
        body(argv)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
