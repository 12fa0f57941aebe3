"""The skeleton every paper driver is built on.

A driver is a :class:`Driver`: its presets, its own flags, and four functions of its science:

- ``run(ctx) -> results``: trains and measures (``ctx.train`` runs the reference trainer), returning a
  dict of every number the report rests on. Keys starting with ``_`` (live objects a figure needs,
  such as a trained run) are left out of ``results.json``;
- ``claims(results) -> [Claim]``: the paper's claims with ours and a verdict computed from the data;
- ``figures(results, out) -> [(file, caption)]``: draws its figures into ``out`` (``save_figure``);
- ``sections(results) -> [(heading, markdown)]``: the report's further tables and notes.

``Driver.main(argv)`` is the one runner: it parses the common flags and the driver's, merges the
settings (preset, then ``--quick``, then every flag given), checks them and the preset's data before
anything trains, runs, writes ``report.md`` and ``results.json`` into ``--out``, and prints the
claims. A bad flag or missing data is one line on stderr and exit status 2.

Every driver formats numbers with :func:`number` / :func:`percent` (one "missing" marker,
``MISSING``), writes tables with :func:`table`, saves figures with :func:`save_figure` and logs with
``ctx.log``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..train import figures as _figures
from ..train._files import atomic_write
from ..train.data import FASHION_MNIST_DIR, IDX_FILES
from ..train.trainer import Config, Trainer, finite

MISSING = "n/a"  # what number / percent write for a value that was not measured (None or NaN)
DOCS = "docs/experiments.md"  # where each driver's protocol, presets and claims are written out


# ------------------------------------------------------------------------------------- flag types
def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = _float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_floats(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated finite numbers > 0 ("0.5,1,2"), sorted, without repeats."""
    try:
        values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0 such as 1,2.5, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers ("1,5,10"), sorted, without repeats."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,5,10, got {text!r}")
    return values


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


@dataclass(frozen=True)
class Flag:
    """One flag of a driver: ``argparse.ArgumentParser.add_argument(name, **kwargs)``. A flag whose
    destination is a settings key overrides the preset's value when it is given (its default is
    None); the others are read from ``ctx.args``."""

    name: str
    kwargs: dict

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest", self.name.lstrip("-").replace("-", "_"))


def flag(name: str, **kwargs) -> Flag:
    """A driver flag; ``kwargs`` as ``argparse.add_argument`` takes them (default None)."""
    return Flag(name, kwargs)


# ----------------------------------------------------------------------------- formatting, output
def number(v, spec: str = ".3g") -> str:
    """``v`` formatted by ``spec`` (Python's format mini-language), ``MISSING`` for None or NaN."""
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return MISSING
    return format(v, spec)


def compact(v, digits: int = 3) -> str:
    """A float with ``digits`` significant digits, or in ".1e" at 1e4 and above or below 1e-3 in size;
    other values (an int, a string) as str() writes them; ``MISSING`` for None or NaN."""
    if not isinstance(v, (float, np.floating)):
        return number(v, "")
    tiny_or_huge = abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3)
    return number(v, ".1e" if tiny_or_huge else f".{digits}g")


def percent(v, digits: int = 1, sign: str = "%") -> str:
    """A fraction as a percentage with ``digits`` decimals ("87.5%"), ``MISSING`` for None or NaN."""
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return MISSING
    return f"{100 * v:.{digits}f}{sign}"


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; cells are written with str() (format them with number / percent first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig, path, dpi: int = 80) -> Path:
    """Write a matplotlib figure to ``path`` whole or not at all, and close it."""
    _figures.save(fig, path, dpi=dpi)
    return Path(path)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    return _figures.pyplot()


def write_json(obj, path: Path) -> Path:
    """``obj`` as JSON (NaN and Inf written as null), whole or not at all."""
    text = json.dumps(finite(obj), indent=1) + "\n"
    atomic_write(Path(path), "results", lambda tmp: Path(tmp).write_text(text))
    return Path(path)


class Log:
    """Progress lines on stderr, "[driver] message", unless quiet (``--no-progress``)."""

    def __init__(self, name: str, quiet: bool = False):
        self.name, self.quiet = name, quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{self.name}] {msg}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------- statistics
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


# ----------------------------------------------------------------------------------------- report
def verdict(holds: bool | None) -> str:
    """The verdict word of a claim: computed by the driver from its data, None where not measured."""
    return "not measured" if holds is None else ("holds" if holds else "does not hold")


@dataclass
class Claim:
    """One claim of the paper: the claim, the paper's number, ours, and whether it holds in our data
    (None: not measured by this run)."""

    claim: str
    paper: str
    ours: str
    holds: bool | None

    def __post_init__(self):
        self.holds = None if self.holds is None else bool(self.holds)

    @property
    def verdict(self) -> str:
        return verdict(self.holds)

    def row(self) -> str:
        cells = (self.claim, self.paper, self.ours, self.verdict)
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    def as_dict(self) -> dict:
        return {"claim": self.claim, "paper": self.paper, "ours": self.ours, "verdict": self.verdict}


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
        c = Claim(claim, paper, ours, holds)
        self.claims.append(c)
        return c

    def figure(self, file: str, caption: str) -> None:
        self.parts.append(f"![{caption}]({file})\n\n*{caption}*")

    def section(self, heading: str, text: str) -> None:
        self.parts.append(f"## {heading}\n\n{text.rstrip()}")

    def markdown(self) -> str:
        smoke = " (`--quick`: a smoke run, too small for the paper's claims)" if self.quick else ""
        took = f"; {self.seconds:.0f} s." if self.seconds is not None else "."
        lines = [f"# {self.title}", "", f"Preset `{self.preset}`{smoke}{took}", "", "```", self.command, "```", ""]
        if self.claims:
            lines += ["| claim | paper | ours | verdict |", "| --- | --- | --- | --- |"]
            lines += [c.row() for c in self.claims]
            lines.append("")
        for part in self.parts:
            lines += [part, ""]
        return "\n".join(lines)

    def write(self, out: Path) -> Path:
        path = Path(out) / "report.md"
        text = self.markdown()
        atomic_write(path, "report", lambda tmp: Path(tmp).write_text(text))
        return path

    def as_dict(self) -> dict:
        return {
            "title": self.title,
            "command": self.command,
            "preset": self.preset,
            "quick": self.quick,
            "seconds": self.seconds,
            "claims": [c.as_dict() for c in self.claims],
        }


# ----------------------------------------------------------------------------------- training runs
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


def train_run(out: Path, trainer: type[Trainer] = Trainer, **config) -> Run:
    """Train (or, when ``resume=True`` and a checkpoint exists, finish) one reference-trainer run into
    ``out``; ``config`` are ``ncfast.train.trainer.Config`` fields, ``trainer`` the Trainer class."""
    t0 = time.perf_counter()
    tr = trainer(Config(out=str(out), **config))
    summary = tr.run()
    return Run(trainer=tr, summary=summary, seconds=time.perf_counter() - t0)


def check_preset(preset: str, data: str | None) -> None:
    """Raise FileNotFoundError, naming what is missing, when a preset's data is not on this machine
    (before any training starts)."""
    if preset == "fashion-mnist":
        folder = Path(data or FASHION_MNIST_DIR)
        missing = [f for f in IDX_FILES if not (folder / f).exists() and not (folder / (f + ".gz")).exists()]
        if missing:
            raise FileNotFoundError(
                f"--preset fashion-mnist: {missing} not in {folder} (apt install "
                f"dataset-fashion-mnist, or --data FOLDER)"
            )
    elif preset in ("cifar10", "cifar100") and data is None:
        raise FileNotFoundError(
            f"--preset {preset}: give --data, the folder holding the CIFAR archive or its extracted folder"
        )


def command(name: str, argv) -> str:
    """The command line that reproduces a driver's run."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", f"ncfast.experiments.{name}", *map(shlex.quote, args)])


@dataclass
class Context:
    """What a driver's ``run`` gets: the merged settings, the parsed flags and the output folder."""

    name: str
    settings: dict
    args: argparse.Namespace
    out: Path
    log: Log

    @property
    def preset(self) -> str:
        return self.args.preset

    @property
    def quick(self) -> bool:
        return self.args.quick

    @property
    def seed(self) -> int:
        return self.args.seed

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    def train(self, folder, trainer: type[Trainer] = Trainer, **config) -> Run:
        """One reference-trainer run into ``folder``. ``config``: Config fields; --data (None under
        --quick), --device, --seed and progress bars are filled in unless given."""
        config.setdefault("data", None if self.quick else self.args.data)
        config.setdefault("device", self.args.device)
        config.setdefault("seed", self.seed)
        config.setdefault("progress", self.progress)
        return train_run(Path(folder), trainer, **config)


# ------------------------------------------------------------------------------------------ driver
def _nothing(*_args) -> list:
    return []


@dataclass
class Driver:
    """A paper driver: see the module docstring.

    presets: {name: settings}; the first is the default. quick: settings of ``--quick``, merged over
    the first preset (``--quick`` runs on the first preset's data, which ships with the packages).
    check(settings): raise ValueError naming the flag for settings that do not go together.
    dataset(settings): the data set whose files ``check_preset`` looks for (default: the preset)."""

    name: str
    title: str
    usage: str
    presets: dict[str, dict]
    run: Callable[[Context], dict]
    claims: Callable[[dict], list[Claim]]
    figures: Callable[[dict, Path], list[tuple[str, str]]] = _nothing
    sections: Callable[[dict], list[tuple[str, str]]] = _nothing
    quick: dict | None = None
    flags: Sequence[Flag] = ()
    check: Callable[[dict], None] | None = None
    dataset: Callable[[dict], str] | None = None

    def parser(self) -> argparse.ArgumentParser:
        """The common flags (--out, --preset, --data, --quick, --seed, --device, --no-progress) and
        the driver's own; --help is the driver's usage."""
        names = list(self.presets)
        p = argparse.ArgumentParser(
            prog=f"python -m ncfast.experiments.{self.name}",
            description=self.usage.strip() + f"\n\nThe protocol, presets and claims: {DOCS}.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--out", default=f"runs/{self.name}", help=f"output folder (default runs/{self.name})")
        p.add_argument("--preset", choices=names, default=names[0], help=f"data set and sizes (default {names[0]})")
        p.add_argument("--data", default=None, help="folder of the preset's data files")
        p.add_argument("--quick", action="store_true", help=f"a smoke run for tests, on the {names[0]} preset")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
        p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
        for f in self.flags:
            p.add_argument(f.name, **f.kwargs)
        return p

    def settings(self, args: argparse.Namespace) -> dict:
        """The preset's settings, then --quick's, then every driver flag given that names a setting;
        checked by ``check``."""
        if args.quick and args.preset != next(iter(self.presets)):
            raise ValueError(f"--quick runs on the {next(iter(self.presets))} preset only; drop --preset")
        s = dict(self.presets[args.preset])
        if args.quick:
            s.update(self.quick or {})
        for f in self.flags:
            value = getattr(args, f.dest)
            if f.dest in s and value is not None and f.kwargs.get("action") not in ("store_true", "store_false"):
                s[f.dest] = value
        if self.check is not None:
            self.check(s)
        return s

    def execute(self, argv=None) -> dict:
        """Parse, check, run, and write report.md and results.json; the results."""
        args = self.parser().parse_args(argv)
        settings = self.settings(args)
        if not args.quick:
            check_preset(self.dataset(settings) if self.dataset else args.preset, args.data)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        ctx = Context(self.name, settings, args, out, Log(self.name, args.no_progress))
        t0 = time.perf_counter()
        results = self.run(ctx)
        claims = list(self.claims(results))
        report = Report(self.title, command(self.name, argv), args.preset, quick=args.quick, claims=claims)
        for file, caption in self.figures(results, out):
            report.figure(file, caption)
        for heading, text in self.sections(results):
            report.section(heading, text)
        report.seconds = time.perf_counter() - t0
        results = {k: v for k, v in results.items() if not k.startswith("_")}
        results["seconds"] = report.seconds
        results["report"] = report.as_dict()
        report.write(out)
        write_json(results, out / "results.json")
        for c in claims:
            print(f"{c.verdict:>13}: {c.claim}: {c.ours}")
        ctx.log(f"wrote {out / 'report.md'} and {out / 'results.json'} ({report.seconds:.0f} s)")
        return results

    def main(self, argv=None) -> int:
        """The command line: exit status 0, or 2 with one line on stderr for a bad flag or missing data."""
        try:
            self.execute(argv)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
