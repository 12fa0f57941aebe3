"""Paper 000 appendix B: fine-grained structure in a Gaussian mixture, measured by MSDR.

python -m ncfast.experiments.gmm                 # the study, 3 seeds per point
python -m ncfast.experiments.gmm --seeds 10      # the paper's 10 runs per point
python -m ncfast.experiments.gmm --hidden 512    # every sweep at another default width
python -m ncfast.experiments.gmm --quick         # a smoke run for the tests
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..labels import coarse_labels
from ..metrics import msdr_from_moments
from ..stats import ClassMoments
from ..train.data import gaussian_mixture
from . import _common
from ._common import spearman

CLUSTERS = 8
# the knobs of one run, and the values each sweep holds the other knobs at (the paper does not state them)
DEFAULTS = {
    "dim": 32,
    "hidden": 128,
    "weight_decay": 5e-4,
    "lr": 0.5,
    "momentum": 0.0,
    "steps": 1000,
    "n_per_cluster": 500,
}
SIGMA2 = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
SWEEPS = {"dim": (8, 32, 128), "hidden": (32, 128, 512), "weight_decay": (0.0, 5e-4, 5e-3)}
TAU2 = (0.01, 0.1, 0.5, 1.0, 2.0, 4.0)
PRESETS = {"gmm": dict(DEFAULTS, seeds=3, sigma2=SIGMA2, sweeps=SWEEPS, tau2=TAU2)}
QUICK = dict(seeds=1, sigma2=(0.5, 8.0), sweeps={"dim": (8, 32)}, tau2=(0.1, 4.0), steps=100, n_per_cluster=200)


def run_one(
    sigma2: float,
    seed: int,
    *,
    dim: int,
    hidden: int,
    weight_decay: float,
    lr: float,
    steps: int,
    n_per_cluster: int,
    momentum: float = 0.0,
    tau2: float | None = None,
) -> dict:
    """One run of the appendix: "data from 8 clusters ... the input from the c-th cluster is generated
    from N(mu^(c), I), and each cluster mean mu^(c) is drawn i.i.d. from N(0, sigma^2 I)", trained on the
    coarse labels c mod 4 by a 2-layer MLP with "gradient descent for 1,000 steps"; MSDR of its hidden
    features (all super-classes, and with ``tau2`` the similar / dissimilar ones apart)."""
    x, y = gaussian_mixture(n_per_cluster, CLUSTERS, dim, sigma2, tau2=tau2, seed=seed)
    k = CLUSTERS // 2
    yc = coarse_labels(y, k)
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
    head = nn.Linear(hidden, k)
    opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=lr, momentum=momentum, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(head(body(x)), yc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = body(x)
        acc = float((head(h).argmax(1) == yc).double().mean())
    superclass = torch.arange(CLUSTERS) % k

    def msdr(keep: torch.Tensor) -> float:  # over the clusters under `keep` alone
        rows = keep[y]
        moments = ClassMoments(CLUSTERS, hidden, scatter=False, unit_sums=False).update(h[rows], y[rows])
        return msdr_from_moments(moments, superclass)

    out = {"msdr": msdr(torch.ones(CLUSTERS, dtype=torch.bool)), "train_acc": acc}
    if tau2 is not None:
        # the first k // 2 super-classes hold the similar pairs (gaussian_mixture's B.1 layout)
        similar = superclass < k // 2
        for name, sel in (("msdr_similar", similar), ("msdr_dissimilar", ~similar)):
            out[name] = msdr(sel)
    return out


def _mean(rows: list[dict], key: str) -> tuple[float, float]:
    vals = [r[key] for r in rows]
    return float(np.mean(vals)), float(np.std(vals))


def study(
    seeds: int = 3,
    sigma2=SIGMA2,
    sweeps=SWEEPS,
    tau2=TAU2,
    defaults: dict | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Every point of the sweeps, averaged over ``seeds`` runs (``defaults``: DEFAULTS unless given)."""
    defaults = dict(DEFAULTS if defaults is None else defaults)
    results = {"defaults": defaults, "seeds": seeds, "sweeps": {}, "tau2": []}
    total = sum(len(v) for v in sweeps.values()) * len(sigma2) + len(tau2)
    done = 0
    cache = {}
    for param, values in sweeps.items():
        rows = []
        for value in values:
            for s2 in sigma2:
                cfg = dict(defaults, **{param: value})
                key = (s2, tuple(sorted(cfg.items())))
                if key not in cache:
                    runs = [run_one(s2, seed, **cfg) for seed in range(seeds)]
                    cache[key] = {"msdr": _mean(runs, "msdr"), "train_acc": min(r["train_acc"] for r in runs)}
                rows.append({param: value, "sigma2": s2, **cache[key]})
                done += 1
                log(f"[{done}/{total}] {param}={value} sigma2={s2}")
        results["sweeps"][param] = rows
    for t2 in tau2:
        runs = [run_one(4.0, seed, tau2=t2, **defaults) for seed in range(seeds)]
        results["tau2"].append(
            {
                "tau2": t2,
                "msdr_similar": _mean(runs, "msdr_similar"),
                "msdr_dissimilar": _mean(runs, "msdr_dissimilar"),
                "train_acc": min(r["train_acc"] for r in runs),
            }
        )
        done += 1
        log(f"[{done}/{total}] tau2={t2}")
    return results


def _msdr(value: float, train_acc: float) -> str:
    """A table cell: MSDR, starred where training accuracy stayed below 100% in some seed."""
    return _common.number(value, ".2f") + ("" if train_acc >= 1.0 else "*")


def table(results: dict) -> str:
    """Markdown tables: MSDR (mean over seeds) against sigma^2 per sweep, and against tau^2."""
    parts = []
    for param, rows in results["sweeps"].items():
        s2s = sorted({r["sigma2"] for r in rows})
        cell = {(r[param], r["sigma2"]): _msdr(r["msdr"][0], r["train_acc"]) for r in rows}
        others = ", ".join(f"{k}={v}" for k, v in results["defaults"].items() if k != param)
        body = [[v, *(cell[v, s] for s in s2s)] for v in sorted({r[param] for r in rows})]
        parts.append(
            f"MSDR vs sigma^2, varying {param} (others: {others})\n\n"
            + _common.table([param, *(f"σ²={s}" for s in s2s)], body)
        )
    if results["tau2"]:
        body = [
            [r["tau2"], *(_msdr(r[key][0], r["train_acc"]) for key in ("msdr_similar", "msdr_dissimilar"))]
            for r in results["tau2"]
        ]
        parts.append(
            "MSDR vs tau^2 (sigma^2 = 4): similar vs dissimilar sub-classes\n\n"
            + _common.table(["τ²", "similar", "dissimilar"], body)
        )
    parts.append(f"Mean of {results['seeds']} seeds; * = training accuracy below 100% in some seed.")
    return "\n\n".join(parts)


def _curve(rows: list[dict], param: str, value) -> tuple[list, list]:
    pts = sorted((r["sigma2"], r["msdr"][0]) for r in rows if r[param] == value)
    return [p[0] for p in pts], [p[1] for p in pts]


def claims(results: dict) -> list[_common.Claim]:
    """The appendix's claims, each with our number and a verdict computed from ``results``.

    - MSDR rises with sigma^2: Spearman's rho of MSDR against sigma^2 on every curve of every sweep;
      holds when the smallest rho is >= 0.8.
    - "both input and hidden dimensions exhibit a clear positive correlation with MSDR": at each
      sigma^2, Spearman's rho of MSDR against the swept value; holds when rho > 0 at >= 2/3 of the
      sigma^2 values.
    - "the weight decay rate does not have an impact on MSDR": at each sigma^2, the spread
      (max - min) / mean of MSDR over the weight decays; holds when it is <= 0.2 at >= 2/3 of them.
    - B.1, "fine-grained structure within a super-class does require sufficient dissimilarity between
      its sub-classes": MSDR of the similar pairs below the dissimilar ones at every tau^2 < sigma^2 = 4,
      and rising with tau^2 (rho >= 0.8).
    """
    out = []
    sweeps = results["sweeps"]
    curves = [_curve(rows, param, v) for param, rows in sweeps.items() for v in sorted({r[param] for r in rows})]
    if curves:
        worst = min(spearman(x, y, min_points=2)[0] for x, y in curves)
        out.append(
            _common.Claim(
                "MSDR rises with sigma^2 (more separated clusters keep their sub-classes apart)",
                "rises on every curve (figs. 18-20)",
                f"Spearman rho of MSDR vs sigma^2: min {_common.number(worst, '.2f')} over {len(curves)} curves",
                worst >= 0.8,
            )
        )
    for param, what, fig in (("dim", "input dimension", 18), ("hidden", "hidden dimension", 19)):
        rows = sweeps.get(param)
        if not rows:
            continue
        s2s = sorted({r["sigma2"] for r in rows})
        rhos = []
        for s2 in s2s:
            pts = sorted((r[param], r["msdr"][0]) for r in rows if r["sigma2"] == s2)
            rhos.append(spearman([p[0] for p in pts], [p[1] for p in pts], min_points=2)[0])
        positive = sum(r > 0 for r in rhos)
        out.append(
            _common.Claim(
                f"MSDR grows with the {what}",
                f"clear positive correlation (fig. {fig})",
                f"rho > 0 at {positive} of {len(s2s)} sigma^2 (rho: "
                + ", ".join(_common.number(r, "+.2f") for r in rhos)
                + ")",
                positive * 3 >= 2 * len(s2s),
            )
        )
    if sweeps.get("weight_decay"):
        rows = sweeps["weight_decay"]
        s2s = sorted({r["sigma2"] for r in rows})
        spreads = []
        for s2 in s2s:
            vals = [r["msdr"][0] for r in rows if r["sigma2"] == s2]
            spreads.append((max(vals) - min(vals)) / float(np.mean(vals)))
        flat = sum(sp <= 0.2 for sp in spreads)
        out.append(
            _common.Claim(
                "the weight decay does not change MSDR",
                "no impact (fig. 20)",
                f"spread (max - min) / mean <= 0.2 at {flat} of {len(s2s)} sigma^2 (largest {max(spreads):.2f})",
                flat * 3 >= 2 * len(s2s),
            )
        )
    if results["tau2"]:
        t = results["tau2"]
        below = [r for r in t if r["tau2"] < 4.0]
        apart = sum(r["msdr_similar"][0] < r["msdr_dissimilar"][0] for r in below)
        rho = spearman([r["tau2"] for r in t], [r["msdr_similar"][0] for r in t], min_points=2)[0]
        smallest = min(t, key=lambda r: r["tau2"])
        out.append(
            _common.Claim(
                "similar sub-classes (small tau^2) merge; MSDR of similar pairs rises with tau^2",
                "similar pairs near 1, below dissimilar ones (fig. 21)",
                f"similar < dissimilar at {apart} of {len(below)} tau^2 < 4; at tau^2 = "
                f"{smallest['tau2']}: {smallest['msdr_similar'][0]:.2f} vs "
                f"{smallest['msdr_dissimilar'][0]:.2f}; rho(tau^2, similar) "
                f"{_common.number(rho, '.2f')}",
                bool(below) and apart == len(below) and rho >= 0.8,
            )
        )
    return out


def plot(results: dict, path: Path) -> Path:
    """MSDR against sigma^2 for every sweep and against tau^2, mean +- std over the seeds; points
    below 100% training accuracy in some seed drawn red and hollow (the paper draws them red)."""
    sweeps, t = results["sweeps"], results["tau2"]
    fig, axes = _common.pyplot().subplots(1, len(sweeps) + 1, figsize=(4 * (len(sweeps) + 1), 3.4), squeeze=False)

    def curve(ax, x: list, mean: list, std: list, acc: list, label: str) -> bool:
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=2, label=label)
        low = [i for i, a in enumerate(acc) if a < 1.0]
        if low:
            ax.plot(
                [x[i] for i in low],
                [mean[i] for i in low],
                linestyle="none",
                marker="o",
                markersize=9,
                markerfacecolor="none",
                markeredgecolor="red",
            )
        return bool(low)

    short = False
    for ax, (param, rows) in zip(axes[0], sweeps.items()):
        for v in sorted({r[param] for r in rows}):
            pts = sorted((r["sigma2"], *r["msdr"], r["train_acc"]) for r in rows if r[param] == v)
            short |= curve(ax, *map(list, zip(*pts)), label=f"{param}={v}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="σ²", ylabel="MSDR", title=f"varying {param}")
        ax.legend(fontsize=7)
    if t:
        ax = axes[0][-1]
        for key, label in (("msdr_similar", "similar"), ("msdr_dissimilar", "dissimilar")):
            short |= curve(
                ax,
                [r["tau2"] for r in t],
                [r[key][0] for r in t],
                [r[key][1] for r in t],
                [r["train_acc"] for r in t],
                label,
            )
        ax.set_xscale("log")
        ax.set(xlabel="τ² (σ² = 4)", ylabel="MSDR", title="similar vs dissimilar sub-classes")
        ax.legend(fontsize=7)
    if short:
        fig.suptitle("red rings: training accuracy below 100% in some seed", fontsize=9)
    fig.tight_layout()
    return _common.save_figure(fig, path, dpi=80)


# -------------------------------------------------------------------------------------------- driver
def check(s: dict) -> None:
    if not s["momentum"] < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {s['momentum']}")


def run(ctx: _common.Context) -> dict:
    s = ctx.settings
    return study(s["seeds"], s["sigma2"], s["sweeps"], s["tau2"], defaults={k: s[k] for k in DEFAULTS}, log=ctx.log)


def figures(results: dict, out: Path) -> list[tuple[str, str]]:
    """msdr.png, and table.md: the tables of the report alone."""
    (Path(out) / "table.md").write_text(table(results) + "\n")
    plot(results, Path(out) / "msdr.png")
    return [
        (
            "msdr.png",
            "MSDR vs sigma^2 per sweep and vs tau^2 (mean +- std over seeds; red rings: training accuracy below 100%)",
        )
    ]


def sections(results: dict) -> list[tuple[str, str]]:
    rules = claims.__doc__.split("\n\n", 1)[1]  # the docstring's bullets, each joined onto one line
    bullets = [" ".join(b.split()) for b in rules.split("\n    - ")]
    return [
        ("Tables", table(results)),
        ("How the verdicts are computed", "\n".join("- " + b.removeprefix("- ") for b in bullets)),
    ]


_KNOB = "(the value the sweeps of the other knobs hold it at)"
DRIVER = _common.Driver(
    name="gmm",
    title="Fine-grained structure in a Gaussian mixture (paper 000 appendix B)",
    usage=__doc__,
    presets=PRESETS,
    quick=QUICK,
    check=check,
    run=run,
    claims=claims,
    figures=figures,
    sections=sections,
    flags=[
        _common.flag("--seeds", type=_common.positive_int, help="runs per point (default 3; the paper: 10)"),
        *(
            _common.flag("--" + key.replace("_", "-"), type=kind, help=f"default {DEFAULTS[key]} {_KNOB}")
            for key, kind in (
                ("dim", _common.positive_int),
                ("hidden", _common.positive_int),
                ("weight_decay", _common.nonnegative_float),
                ("lr", _common.positive_float),
                ("momentum", _common.nonnegative_float),
                ("steps", _common.positive_int),
                ("n_per_cluster", _common.positive_int),
            )
        ),
    ],
)


def main(argv=None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
