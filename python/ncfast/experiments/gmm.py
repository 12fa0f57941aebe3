"""Paper 000 appendix B: fine-grained structure in a Gaussian mixture, measured by MSDR.

    python -m ncfast.experiments.gmm                 # the study, 3 seeds per point (under 10 minutes on 2 cores)
    python -m ncfast.experiments.gmm --seeds 10      # the paper's 10 runs per point
    python -m ncfast.experiments.gmm --quick         # a smoke run for the tests

The appendix: "we create a dataset from a mixture of Gaussians, where the input from the c-th cluster is
generated from N(mu^(c), I), and each cluster mean mu^(c) is drawn i.i.d. from N(0, sigma^2 I) ... We
generate data from 8 clusters, each having 500 samples. We train the model with gradient descent for
1,000 steps. The results are averaged over 10 runs." The training labels are the coarse labels
c mod 4, so every super-class holds two clusters (sub-classes). Model: a 2-layer MLP (input -> hidden,
ReLU -> 4 logits) trained by plain full-batch gradient descent (momentum 0, ``--momentum`` to change).
Measured: MSDR of the 8 original clusters on the hidden features,

    MSDR = mean_{i != j, same super-class} D_ij / mean_i D_ii,   D_ij = ||mu_i - mu_j||^2 + v_i + v_j

(ncfast's streaming class moments; paper 000 eq. 6). MSDR ~ 1: the two sub-classes of a super-class
have collapsed together; larger: they stay apart inside their super-class. The sweeps vary sigma^2
for several input dimensions, hidden widths and weight decays (paper figures 18-20), and tau^2 for
"similar" sub-classes (B.1, figure 21: the means of a similar pair are drawn around a shared centre
with variance tau^2; sigma^2 = 4). The paper does not state its input dimension, width, learning rate
or weight decay; ours are in DEFAULTS (and the flags). Points whose training accuracy stays below 100%
in some seed are drawn red and hollow, as the paper draws them red, and starred in the tables.

Writes to --out (default runs/gmm/): report.md (the appendix's claims, ours, verdicts computed from the
data), table.md, results.json and msdr.png.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..labels import coarse_labels
from ..metrics import msdr_from_moments
from ..stats import ClassMoments
from ..train.data import gaussian_mixture
from ..train.figures import pyplot
from . import _common
from ._common import spearman

CLUSTERS = 8
DEFAULTS = {"dim": 32, "hidden": 128, "weight_decay": 5e-4, "lr": 0.5, "momentum": 0.0, "steps": 1000,
            "n_per_cluster": 500}
SIGMA2 = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
SWEEPS = {"dim": (8, 32, 128), "hidden": (32, 128, 512), "weight_decay": (0.0, 5e-4, 5e-3)}
TAU2 = (0.01, 0.1, 0.5, 1.0, 2.0, 4.0)


def run_one(sigma2: float, seed: int, *, dim: int, hidden: int, weight_decay: float, lr: float, steps: int,
            n_per_cluster: int, momentum: float = 0.0, tau2: float | None = None) -> dict:
    """Train one MLP; MSDR of its hidden features (all super-classes, and similar / dissimilar ones)."""
    x, y = gaussian_mixture(n_per_cluster, CLUSTERS, dim, sigma2, tau2=tau2, seed=seed)
    k = CLUSTERS // 2
    yc = coarse_labels(y, k)
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
    head = nn.Linear(hidden, k)
    opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
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
        return msdr_from_moments(ClassMoments(CLUSTERS, hidden, scatter=False, unit_sums=False).update(h[rows], y[rows]),
                                 superclass)

    out = {"msdr": msdr(torch.ones(CLUSTERS, dtype=torch.bool)), "train_acc": acc}
    if tau2 is not None:
        # the first k // 2 super-classes hold the similar pairs (gaussian_mixture's B.1 layout)
        similar = superclass < k // 2
        for name, sel in (("msdr_similar", similar), ("msdr_dissimilar", ~similar)):
            out[name] = msdr(sel)
    return out


def _mean(rows, key):
    vals = [r[key] for r in rows]
    return float(np.mean(vals)), float(np.std(vals))


def study(seeds: int = 3, sigma2=SIGMA2, sweeps=SWEEPS, tau2=TAU2, defaults=None, progress=True) -> dict:
    """Every point of the sweeps, averaged over ``seeds`` runs (``defaults``: DEFAULTS unless given)."""
    defaults = dict(DEFAULTS if defaults is None else defaults)
    results = {"defaults": defaults, "seeds": seeds, "sweeps": {}, "tau2": []}
    t0 = time.perf_counter()
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
                if progress:
                    print(f"\r[{done}/{total}] {param}={value} sigma2={s2} ({time.perf_counter() - t0:.0f} s)",
                          end="", file=sys.stderr, flush=True)
        results["sweeps"][param] = rows
    for t2 in tau2:
        runs = [run_one(4.0, seed, tau2=t2, **defaults) for seed in range(seeds)]
        results["tau2"].append({"tau2": t2, "msdr_similar": _mean(runs, "msdr_similar"),
                                "msdr_dissimilar": _mean(runs, "msdr_dissimilar"),
                                "train_acc": min(r["train_acc"] for r in runs)})
        done += 1
        if progress:
            print(f"\r[{done}/{total}] tau2={t2} ({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr,
                  flush=True)
    if progress:
        print(file=sys.stderr)
    results["seconds"] = time.perf_counter() - t0
    return results


def table(results: dict) -> str:
    """Markdown tables: MSDR (mean over seeds) against sigma^2 per sweep, and against tau^2."""
    lines = []
    for param, rows in results["sweeps"].items():
        values = sorted({r[param] for r in rows})
        s2s = sorted({r["sigma2"] for r in rows})
        lines.append(f"MSDR vs sigma^2, varying {param} (others: "
                     + ", ".join(f"{k}={v}" for k, v in results["defaults"].items() if k != param) + ")")
        lines.append("")
        lines.append(f"| {param} | " + " | ".join(f"σ²={s}" for s in s2s) + " |")
        lines.append("| --- |" + " --- |" * len(s2s))
        for v in values:
            cells = []
            for s in s2s:
                r = next(r for r in rows if r[param] == v and r["sigma2"] == s)
                cells.append(f"{r['msdr'][0]:.2f}" + ("" if r["train_acc"] >= 1.0 else "*"))
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    if results["tau2"]:
        lines.append("MSDR vs tau^2 (sigma^2 = 4): similar vs dissimilar sub-classes")
        lines.append("")
        lines.append("| τ² | similar | dissimilar |")
        lines.append("| --- | --- | --- |")
        for r in results["tau2"]:
            mark = "" if r["train_acc"] >= 1.0 else "*"
            lines.append(f"| {r['tau2']} | {r['msdr_similar'][0]:.2f}{mark} | {r['msdr_dissimilar'][0]:.2f}{mark} |")
        lines.append("")
    lines.append(f"Mean of {results['seeds']} seeds; * = training accuracy below 100% in some seed.")
    return "\n".join(lines)


def _curve(rows, param, value):
    pts = sorted((r["sigma2"], r["msdr"][0]) for r in rows if r[param] == value)
    return [p[0] for p in pts], [p[1] for p in pts]


def claims(results: dict) -> list[dict]:
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
    curves = [(param, v, *_curve(rows, param, v)) for param, rows in sweeps.items() for v in sorted({r[param] for r in rows})]
    if curves:
        rhos = [spearman(x, y, min_points=2)[0] for _, _, x, y in curves]
        worst = min(rhos)
        out.append({"claim": "MSDR rises with sigma^2 (more separated clusters keep their sub-classes apart)",
                    "paper": "rises on every curve (figs. 18-20)",
                    "ours": f"Spearman rho of MSDR vs sigma^2: min {worst:.2f} over {len(curves)} curves",
                    "holds": bool(worst >= 0.8)})
    for param, what in (("dim", "input dimension"), ("hidden", "hidden dimension")):
        if not sweeps.get(param):
            continue
        rows = sweeps[param]
        s2s = sorted({r["sigma2"] for r in rows})
        rhos = []
        for s2 in s2s:
            pts = sorted((r[param], r["msdr"][0]) for r in rows if r["sigma2"] == s2)
            rhos.append(spearman([p[0] for p in pts], [p[1] for p in pts], min_points=2)[0])
        positive = sum(r > 0 for r in rhos)
        out.append({"claim": f"MSDR grows with the {what}",
                    "paper": "clear positive correlation (fig. 18)" if param == "dim" else
                             "clear positive correlation (fig. 19)",
                    "ours": f"rho > 0 at {positive} of {len(s2s)} sigma^2 (rho: "
                            + ", ".join(f"{r:+.2f}" for r in rhos) + ")",
                    "holds": bool(positive * 3 >= 2 * len(s2s))})
    if sweeps.get("weight_decay"):
        rows = sweeps["weight_decay"]
        s2s = sorted({r["sigma2"] for r in rows})
        spreads = []
        for s2 in s2s:
            vals = [r["msdr"][0] for r in rows if r["sigma2"] == s2]
            spreads.append((max(vals) - min(vals)) / float(np.mean(vals)))
        flat = sum(sp <= 0.2 for sp in spreads)
        out.append({"claim": "the weight decay does not change MSDR",
                    "paper": "no impact (fig. 20)",
                    "ours": f"spread (max - min) / mean <= 0.2 at {flat} of {len(s2s)} sigma^2 (largest "
                            f"{max(spreads):.2f})",
                    "holds": bool(flat * 3 >= 2 * len(s2s))})
    if results["tau2"]:
        t = results["tau2"]
        below = [r for r in t if r["tau2"] < 4.0]
        apart = sum(r["msdr_similar"][0] < r["msdr_dissimilar"][0] for r in below)
        rho = spearman([r["tau2"] for r in t], [r["msdr_similar"][0] for r in t], min_points=2)[0]
        smallest = min(t, key=lambda r: r["tau2"])
        out.append({"claim": "similar sub-classes (small tau^2) merge; MSDR of similar pairs rises with tau^2",
                    "paper": "similar pairs near 1, below dissimilar ones (fig. 21)",
                    "ours": f"similar < dissimilar at {apart} of {len(below)} tau^2 < 4; at tau^2 = "
                            f"{smallest['tau2']}: {smallest['msdr_similar'][0]:.2f} vs "
                            f"{smallest['msdr_dissimilar'][0]:.2f}; rho(tau^2, similar) {rho:.2f}",
                    "holds": bool(below and apart == len(below) and rho >= 0.8)})
    return out


def plot(results: dict, path: Path) -> None:
    """MSDR against sigma^2 for every sweep and against tau^2, mean +- std over the seeds; points
    below 100% training accuracy in some seed drawn red and hollow (the paper draws them red)."""
    plt = pyplot()
    sweeps = results["sweeps"]
    fig, axes = plt.subplots(1, len(sweeps) + 1, figsize=(4 * (len(sweeps) + 1), 3.4), squeeze=False)
    short = False
    for ax, (param, rows) in zip(axes[0], sweeps.items()):
        for v in sorted({r[param] for r in rows}):
            pts = sorted((r["sigma2"], r["msdr"][0], r["msdr"][1], r["train_acc"]) for r in rows if r[param] == v)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=2, label=f"{param}={v}")
            low = [p for p in pts if p[3] < 1.0]
            if low:
                short = True
                ax.plot([p[0] for p in low], [p[1] for p in low], linestyle="none", marker="o", markersize=9,
                        markerfacecolor="none", markeredgecolor="red")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("σ²")
        ax.set_ylabel("MSDR")
        ax.set_title(f"varying {param}")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    if results["tau2"]:
        t = [r["tau2"] for r in results["tau2"]]
        for key, label in (("msdr_similar", "similar"), ("msdr_dissimilar", "dissimilar")):
            ax.errorbar(t, [r[key][0] for r in results["tau2"]], yerr=[r[key][1] for r in results["tau2"]],
                        marker="o", capsize=2, label=label)
            low = [r for r in results["tau2"] if r["train_acc"] < 1.0]
            if low:
                short = True
                ax.plot([r["tau2"] for r in low], [r[key][0] for r in low], linestyle="none", marker="o",
                        markersize=9, markerfacecolor="none", markeredgecolor="red")
        ax.set_xscale("log")
        ax.set_xlabel("τ² (σ² = 4)")
        ax.set_ylabel("MSDR")
        ax.set_title("similar vs dissimilar sub-classes")
        ax.legend(fontsize=7)
    if short:
        fig.suptitle("red rings: training accuracy below 100% in some seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    return _common.run_main(_main, argv)


def _main(argv) -> None:
    p = _common.parser("gmm", __doc__, presets=("gmm",))
    p.add_argument("--seeds", type=int, default=3, help="runs per point (the paper: 10)")
    for key, kind in (("dim", int), ("hidden", int), ("weight_decay", float), ("lr", float), ("momentum", float),
                      ("steps", int), ("n_per_cluster", int)):
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=DEFAULTS[key],
                       help=f"default {DEFAULTS[key]} (the value the sweeps of the other knobs hold it at)")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    if a.lr <= 0 or a.steps < 1 or a.n_per_cluster < 1 or a.dim < 1 or a.hidden < 1:
        p.error("--lr, --steps, --n-per-cluster, --dim and --hidden must be positive")
    if a.weight_decay < 0 or not 0 <= a.momentum < 1:
        p.error("--weight-decay must be >= 0 and --momentum in [0, 1)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    defaults = {k: getattr(a, k) for k in DEFAULTS}
    progress = not a.no_progress
    if a.quick:
        results = study(1, sigma2=(0.5, 8.0), sweeps={"dim": (8, 32)}, tau2=(0.1, 4.0),
                        defaults=dict(defaults, steps=100, n_per_cluster=200), progress=progress)
    else:
        results = study(a.seeds, defaults=defaults, progress=progress)
    text = table(results)
    report = _common.Report("Fine-grained structure in a Gaussian mixture (paper 000 appendix B)",
                            _common.command("gmm", argv), "gmm", quick=a.quick, seconds=results["seconds"])
    results["claims"] = claims(results)
    for c in results["claims"]:
        report.claim(c["claim"], c["paper"], c["ours"], c["holds"])
    report.figure("msdr.png", "MSDR vs sigma^2 per sweep and vs tau^2 (mean +- std over seeds; red rings: "
                              "training accuracy below 100%)")
    report.section("Tables", text)
    report.section("How the verdicts are computed", "\n".join(
        "- " + line.strip()[2:] for line in claims.__doc__.split("\n") if line.strip().startswith("- ")))
    write_json = _common.write_json
    write_json(dict(results, report=report.as_dict()), out / "results.json")
    (out / "table.md").write_text(text + "\n")
    plot(results, out / "msdr.png")
    report.write(out)
    print(text)
    print(f"\nwrote {out / 'report.md'}, {out / 'table.md'}, {out / 'results.json'}, {out / 'msdr.png'} "
          f"({results['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
