"""Paper 000 appendix B: fine-grained structure in a Gaussian mixture, measured by MSDR.

    python -m ncfast.experiments.gmm                 # the default grid, 3 seeds (a few minutes on 2 cores)
    python -m ncfast.experiments.gmm --seeds 10      # the paper's 10 runs per point

Data: 8 clusters x 500 samples, cluster means mu_c ~ N(0, sigma^2 I), samples ~ N(mu_c, I); the
training labels are the coarse labels c mod 4, so every super-class holds two clusters (sub-classes).
Model: a 2-layer MLP (input -> hidden, ReLU -> 4 logits) trained by full-batch gradient descent
(momentum 0.9) for 1,000 steps. Measured: MSDR of the 8 original clusters on the hidden features,

    MSDR = mean_{i != j, same super-class} D_ij / mean_i D_ii,   D_ij = ||mu_i - mu_j||^2 + v_i + v_j

(ncfast's streaming class moments; paper 000 eq. 6). MSDR ~ 1: the two sub-classes of a super-class
have collapsed together; larger: they stay apart inside their super-class. The sweeps vary sigma^2
for several input dimensions, hidden widths and weight decays (paper figures 18-20), and tau^2 for
"similar" sub-classes (B.1, figure 21: the means of a similar pair are drawn around a shared centre
with variance tau^2; sigma^2 = 4). The paper does not state its default input dimension, width,
learning rate or weight decay; ours are in DEFAULTS. Points whose training accuracy stays below 100%
are marked (the paper draws them red).
"""
from __future__ import annotations

import argparse
import json
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

CLUSTERS = 8
DEFAULTS = {"dim": 32, "hidden": 128, "weight_decay": 5e-4, "lr": 0.05, "steps": 1000, "n_per_cluster": 500}
SIGMA2 = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
SWEEPS = {"dim": (8, 32, 128), "hidden": (32, 128, 512), "weight_decay": (0.0, 5e-4, 5e-3)}
TAU2 = (0.01, 0.1, 0.5, 1.0, 2.0, 4.0)


def run_one(sigma2: float, seed: int, *, dim: int, hidden: int, weight_decay: float, lr: float, steps: int,
            n_per_cluster: int, tau2: float | None = None) -> dict:
    """Train one MLP; MSDR of its hidden features (all super-classes, and similar / dissimilar ones)."""
    x, y = gaussian_mixture(n_per_cluster, CLUSTERS, dim, sigma2, tau2=tau2, seed=seed)
    k = CLUSTERS // 2
    yc = coarse_labels(y, k)
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
    head = nn.Linear(hidden, k)
    opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=lr, momentum=0.9, weight_decay=weight_decay)
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


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = results["sweeps"]
    fig, axes = plt.subplots(1, len(sweeps) + 1, figsize=(4 * (len(sweeps) + 1), 3.4), squeeze=False)
    for ax, (param, rows) in zip(axes[0], sweeps.items()):
        for v in sorted({r[param] for r in rows}):
            pts = sorted((r["sigma2"], r["msdr"][0], r["msdr"][1]) for r in rows if r[param] == v)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=2, label=f"{param}={v}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("σ²")
        ax.set_ylabel("MSDR")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    if results["tau2"]:
        t = [r["tau2"] for r in results["tau2"]]
        for key, label in (("msdr_similar", "similar"), ("msdr_dissimilar", "dissimilar")):
            ax.errorbar(t, [r[key][0] for r in results["tau2"]], yerr=[r[key][1] for r in results["tau2"]],
                        marker="o", capsize=2, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("τ² (σ² = 4)")
        ax.set_ylabel("MSDR")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ncfast.experiments.gmm", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="runs per point (the paper: 10)")
    p.add_argument("--out", default="runs/gmm")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 sigma^2 values, 1 seed, 100 steps")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        results = study(1, sigma2=(0.5, 8.0), sweeps={"dim": (8, 32)}, tau2=(0.1, 4.0),
                        defaults=dict(DEFAULTS, steps=100))
    else:
        results = study(a.seeds)
    text = table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(text + "\n")
    plot(results, out / "msdr.png")
    print(text)
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {out / 'msdr.png'} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
