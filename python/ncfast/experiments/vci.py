"""Paper 004, "Quantifying the Variability Collapse of Neural Networks": the Variability Collapse Index (VCI)
beside fuzziness, squared distance and cosine separation, over training, under linear maps of the features and
as a predictor of transfer.

    python -m ncfast.experiments.vci                 # digits, ResNet-18 (width 16)
    python -m ncfast.experiments.vci --quick         # a smoke run
    python -m ncfast.experiments.vci --preset cifar10 --data ~/data --device cuda
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from ..functional import nc_metrics
from ..labels import superclass_map
from ..metrics import DEFAULT_RTOL
from ..train.probes import linear_probe
from ..train.trainer import Trainer
from . import _common
from ._common import compact

NAME = "vci"
METRICS = ("fuzziness", "squared_distance", "cosine_separation", "vci")
LABELS = {
    "fuzziness": "fuzziness",
    "squared_distance": "squared distance",
    "cosine_separation": "cosine separation (R²)",
    "vci": "VCI",
}
# +1: a smaller value means more collapse; -1: a larger one does (class separation R^2)
COLLAPSE_SIGN = {"fuzziness": 1, "squared_distance": 1, "cosine_separation": -1, "vci": 1}
SAME_TOL = 1e-8  # relative change counted as rounding
CHANGE_TOL = 1e-3  # relative change counted as a real change
CONSISTENT_RHO = 0.8  # |Spearman rho| of a "consistent" trend

TRANSFORMS = ("invertible", "block", "orthogonal", "isotropic", "per-sample")
TRANSFORM_LABELS = {
    "invertible": "invertible A (cond 10)",
    "block": "block on span(Σ_B) ⊕ ⊥",
    "orthogonal": "orthogonal Q",
    "isotropic": "isotropic scaling",
    "per-sample": "per-sample scaling",
}
# What the paper says (Obs. 4.2-4.4, Cor. 5.4; orthogonal maps and isotropic scaling leave fuzziness unchanged by
# its definition): True = invariant, False = not invariant, None = no claim.
EXPECTED = {
    k: dict(zip(TRANSFORMS, wants))
    for k, wants in (
        ("fuzziness", (False, True, True, True, None)),
        ("squared_distance", (False, None, True, True, None)),
        ("cosine_separation", (False, None, True, True, True)),
        ("vci", (True, True, True, True, None)),
    )
}

# Paper 004, Appendix C, Table 2 (ResNet-50 pretrained on ImageNet): fuzziness, squared distance, cosine similarity,
# VCI, pretraining accuracy, MLOG. Rows 1-6: softmax temperature; rows 7-11: the within-class cosine regulariser
# (Fig. 7 top / bottom row).
PAPER_TABLE2 = (
    (15.93, 2.829, 0.4634, 0.796, 75.4, 0.3250),
    (15.64, 2.534, 0.4856, 0.7849, 76.64, 0.2704),
    (13.45, 2.141, 0.512, 0.7552, 77.53, 0.2029),
    (12.62, 1.923, 0.5371, 0.7406, 77.72, 0.1711),
    (11.83, 1.742, 0.5589, 0.728, 77.83, 0.1343),
    (11.46, 1.625, 0.5767, 0.7201, 77.88, 0.1161),
    (13.15, 2.78, 0.4097, 0.7216, 77.52, 0.0440),
    (14.31, 3.803, 0.3556, 0.719, 77.31, -0.0063),
    (14.51, 4.783, 0.3551, 0.7099, 77.29, -0.0507),
    (15.22, 7.287, 0.2794, 0.6936, 77.46, -0.1539),
    (13.92, 9.964, 0.172, 0.6652, 77.65, -0.2375),
)
PAPER_GROUPS = {"temperature": range(0, 6), "regularizer": range(6, 11), "all": range(0, 11)}

SCALES = (0.1, 0.3, 1.0, 3.0)  # the logit scales T of the transfer sweep
FASHION_SCALES = (0.5, 1.0, 2.0, 4.0)  # the range where 16 epochs on 5,000 Fashion-MNIST images fit the task
FITTED = 0.99  # train accuracy at which a pretraining run counts as having fit its task
COMMON = dict(arch="resnet18", layers=["pool"], clp_embed="none", momentum=0.9, schedule="cosine")
PRESETS = {
    "digits": dict(
        dataset="digits",
        width=16,
        epochs=30,
        metrics_every=2,
        lr=0.01,
        weight_decay=5e-4,
        batch_size=128,
        transfer_epochs=25,
        logit_scales=SCALES,
        transfer_seeds=2,
        coarse=5,
    ),
    "fashion-mnist": dict(
        dataset="fashion-mnist",
        width=8,
        train_subset=5000,
        augment=False,
        epochs=20,
        metrics_every=2,
        lr=0.01,
        weight_decay=5e-4,
        batch_size=128,
        transfer_epochs=16,
        logit_scales=FASHION_SCALES,
        transfer_seeds=1,
        coarse=5,
    ),
    "cifar10": dict(
        dataset="cifar10",
        width=64,
        epochs=300,
        metrics_every=20,
        lr=0.1,
        weight_decay=5e-4,
        batch_size=256,
        transfer_epochs=100,
        logit_scales=SCALES,
        transfer_seeds=1,
        coarse=5,
    ),
    "cifar100": dict(
        dataset="cifar100",
        width=64,
        epochs=300,
        metrics_every=20,
        lr=0.1,
        weight_decay=5e-4,
        batch_size=256,
        transfer_epochs=100,
        logit_scales=SCALES,
        transfer_seeds=1,
        coarse="official",
    ),
}
# --quick's 2-epoch pretraining fits nothing: there every run counts in the correlation (fitted=0)
QUICK = dict(
    width=4,
    epochs=4,
    metrics_every=1,
    train_subset=400,
    batch_size=64,
    transfer_epochs=2,
    logit_scales=(0.3, 1.0, 3.0),
    transfer_seeds=1,
    fitted=0.0,
)


# ------------------------------------------------------------------------------------ pure functions
def _class_stats(h: np.ndarray, y: np.ndarray, num_classes: int):
    """(present classes, class means (C_present, D), centred features) in float64, balanced weighting."""
    present = np.array([c for c in range(num_classes) if np.any(y == c)])
    means = np.stack([h[y == c].mean(axis=0) for c in present])
    index = np.searchsorted(present, y)
    return present, means, h - means[index]


def span_split(features, labels, num_classes: int, rtol: float = DEFAULT_RTOL) -> dict:
    """Sigma_W's trace inside and outside span(Sigma_B) (paper 004 Fig. 1), float64, balanced weighting.

    Sigma_W = (1/C) sum_c Cov_c and Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T (docs/metrics.md); P_B
    projects on the eigenvectors of Sigma_B with eigenvalue > rtol * lambda_max (taken from the SVD of the C x D
    matrix of centred class means, whose squared singular values are C times those eigenvalues). Returns inside =
    Tr(P_B Sigma_W), outside = Tr(Sigma_W) - inside (computed as Tr((I - P_B) Sigma_W) when P_B is small, never
    negative), share = inside / Tr(Sigma_W) and rank_b."""
    h = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    present, means, centred = _class_stats(h, y, num_classes)
    c = len(present)
    if c < 2:
        raise ValueError("labels: span_split needs at least 2 present classes")
    mt = means - means.mean(axis=0)
    _, s, vt = np.linalg.svd(mt, full_matrices=False)
    keep = s**2 > rtol * (s[0] ** 2) if s[0] > 0 else np.zeros_like(s, dtype=bool)
    basis = vt[keep]  # (rB, D) orthonormal rows
    index = np.searchsorted(present, y)
    counts = np.bincount(index, minlength=c).astype(np.float64)
    weight = 1.0 / (c * counts[index])  # each sample's share of the balanced average
    total = float(np.sum(weight * np.einsum("ij,ij->i", centred, centred)))
    proj = centred @ basis.T
    inside = float(np.sum(weight * np.einsum("ij,ij->i", proj, proj)))
    rest = centred - proj @ basis
    outside = float(np.sum(weight * np.einsum("ij,ij->i", rest, rest)))
    return {
        "inside": inside,
        "outside": outside,
        "total": total,
        "share_inside": inside / total if total > 0 else float("nan"),
        "rank_b": int(keep.sum()),
    }


def _haar(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _conditioned(d: int, rng: np.random.Generator, cond: float) -> np.ndarray:
    """U diag(s) V^T with Haar U, V and singular values spread log-uniformly over [1, cond]."""
    s = np.geomspace(1.0, cond, d) if d > 1 else np.ones(1)
    return (_haar(d, rng) * rng.permutation(s)) @ _haar(d, rng).T


def transforms(
    features, labels, num_classes: int, seed: int = 0, cond: float = 10.0, rtol: float = DEFAULT_RTOL
) -> dict[str, np.ndarray]:
    """The transformed features (float64) of every TRANSFORMS entry, seeded.

    invertible: H A^T with A = U diag(s) V^T, condition number ``cond``; block: A = B1 P + B2 (I - P) with P the
    projector on span(Sigma_B) and B1, B2 well-conditioned maps of that span and of its complement (Obs. 4.2);
    orthogonal: H Q^T, Q Haar; isotropic: 3.7 H; per-sample: h_i s_i with s_i log-uniform in [1/2, 2] (Obs. 4.4;
    not a linear map)."""
    h = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    d = h.shape[1]
    rng = np.random.default_rng(seed)
    _, means, _ = _class_stats(h, y, num_classes)
    mt = means - means.mean(axis=0)
    _, s, vt = np.linalg.svd(mt, full_matrices=True)
    r_b = int(np.sum(s**2 > rtol * s[0] ** 2)) if s.size and s[0] > 0 else 0
    inside, outside = vt[:r_b].T, vt[r_b:].T  # orthonormal bases (D, rB), (D, D - rB)
    block = np.zeros((d, d))
    if r_b:
        block += inside @ _conditioned(r_b, rng, cond) @ inside.T
    if d > r_b:
        block += outside @ _conditioned(d - r_b, rng, cond) @ outside.T
    return {
        "invertible": h @ _conditioned(d, rng, cond).T,
        "block": h @ block.T,
        "orthogonal": h @ _haar(d, rng).T,
        "isotropic": 3.7 * h,
        "per-sample": h * np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=(h.shape[0], 1))),
    }


def four_metrics(features, labels, num_classes: int) -> dict[str, float]:
    """fuzziness, squared_distance, cosine_separation and vci from ncfast.nc_metrics (float64)."""
    m = nc_metrics(
        torch.as_tensor(np.asarray(features, dtype=np.float64)),
        torch.as_tensor(np.asarray(labels).astype(np.int64)),
        num_classes=num_classes,
    )
    return {**{k: float(m[k]) for k in METRICS}, "degenerate": list(m.degenerate)}


def relative_change(new: float, old: float) -> float:
    """|new - old| / |old| (0 when both are 0; inf when only old is 0; NaN when either is NaN)."""
    if not (math.isfinite(new) and math.isfinite(old)):
        return float("nan")
    if old == 0:
        return 0.0 if new == 0 else float("inf")
    return abs(new - old) / abs(old)


def invariance(features, labels, num_classes: int, seed: int = 0) -> dict:
    """The four metrics on the features and on each transform of them, and the relative changes."""
    base = four_metrics(features, labels, num_classes)
    values, change = {}, {}
    for name, h in transforms(features, labels, num_classes, seed=seed).items():
        values[name] = four_metrics(h, labels, num_classes)
        change[name] = {k: relative_change(values[name][k], base[k]) for k in METRICS}
    return {"original": base, "transformed": values, "change": change, "seed": seed}


def invariance_verdicts(
    change: dict, expected: dict = EXPECTED, same_tol: float = SAME_TOL, change_tol: float = CHANGE_TOL
) -> dict:
    """Per metric: whether every expected invariance holds (relative change <= same_tol) and every expected
    non-invariance shows (change >= change_tol); None where a needed value is missing/NaN.

    Returns {metric: {"holds": bool | None, "max_same": worst change where invariance is expected,
    "min_changed": smallest change where a change is expected, "failed": [transforms]}}."""
    out = {}
    for metric, wants in expected.items():
        got = {t: change.get(t, {}).get(metric) for t, want in wants.items() if want is not None}
        ok = {t: v for t, v in got.items() if not (v is None or (isinstance(v, float) and math.isnan(v)))}
        failed = [t for t, v in ok.items() if not (v <= same_tol if wants[t] else v >= change_tol)]
        out[metric] = {
            "holds": None if len(ok) < len(got) else not failed,
            "max_same": max((v for t, v in ok.items() if wants[t]), default=None),
            "min_changed": min((v for t, v in ok.items() if not wants[t]), default=None),
            "failed": failed,
        }
    return out


def pearson(x, y) -> float:
    """Pearson's r over the finite pairs; NaN for fewer than 3 pairs or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / den) if den > 0 else float("nan")


def collapse_trend(epochs, values, sign: int = 1) -> dict:
    """How a metric moves over training: rho = Spearman(epoch, sign * value) (negative: towards collapse), first
    and last value, ``collapses`` (rho < 0 and the last value nearer collapse than the first) and ``consistent``
    (rho <= -CONSISTENT_RHO). NaN values are left out; with fewer than 3 points both verdicts are None."""
    pts = [(e, v) for e, v in zip(epochs, values) if v is not None and math.isfinite(v)]
    if len(pts) < 3:
        return {
            "rho": float("nan"),
            "first": None,
            "last": None,
            "epochs": [p[0] for p in pts],
            "collapses": None,
            "consistent": None,
        }
    e, v = zip(*pts)
    rho = _common.spearman(e, [sign * x for x in v])[0]
    return {
        "rho": rho,
        "first": v[0],
        "last": v[-1],
        "epochs": [e[0], e[-1]],
        "collapses": bool(rho < 0 and sign * v[-1] < sign * v[0]),
        "consistent": bool(rho <= -CONSISTENT_RHO),
    }


def logit(p: float, n: int) -> float:
    """log(p / (1 - p)) with p clipped to [1/(2n), 1 - 1/(2n)] (n samples scored it)."""
    lo = 0.5 / n
    p = min(max(p, lo), 1.0 - lo)
    return math.log(p / (1.0 - p))


def mlog(task_accuracies: dict, pretrain_accuracy: float, n_task: dict, n_pretrain: int) -> float:
    """Paper 004 eq. (6): mean over downstream tasks of logit(a_t), minus logit(P)."""
    if not task_accuracies:
        raise ValueError("task_accuracies: at least one downstream task is needed")
    mean = sum(logit(a, n_task[t]) for t, a in task_accuracies.items()) / len(task_accuracies)
    return mean - logit(pretrain_accuracy, n_pretrain)


def downstream_tasks(y_orig: np.ndarray, superclass_of: np.ndarray) -> dict[str, np.ndarray]:
    """The held-out tasks' labels from the original labels: fine (the classes themselves), within (a class's
    position inside its super-class, ordered by class index) and blocks (consecutive runs of C / K classes, K
    super-classes)."""
    y = np.asarray(y_orig).astype(np.int64)
    sup = np.asarray(superclass_of).astype(np.int64)
    c = sup.shape[0]
    position = np.zeros(c, dtype=np.int64)
    for s in np.unique(sup[sup >= 0]):
        members = np.flatnonzero(sup == s)
        position[members] = np.arange(members.size)
    k = len(np.unique(sup[sup >= 0]))
    size = max(1, math.ceil(c / k))
    return {"fine": y, "within": position[y], "blocks": y // size}


def transfer_correlations(rows: list[dict]) -> dict[str, float]:
    """Oriented Pearson r of each metric with MLOG across the runs of the sweep that fit their pretraining task
    (``fitted``, default True): r > 0 means less collapse goes with better transfer (the sign of
    cosine_separation's r flipped, as larger means more collapse). NaN with fewer than 3 such runs."""
    rows = [r for r in rows if r.get("fitted", True)]
    target = [r["mlog"] for r in rows]
    return {k: COLLAPSE_SIGN[k] * pearson([r["metrics"][k] for r in rows], target) for k in METRICS}


def paper_correlations() -> dict[str, dict[str, float]]:
    """The oriented correlations of paper 004's Table 2, per group of rows."""
    t = np.array(PAPER_TABLE2)
    return {
        group: {k: COLLAPSE_SIGN[k] * pearson(t[list(rows), i], t[list(rows), 5]) for i, k in enumerate(METRICS)}
        for group, rows in PAPER_GROUPS.items()
    }


def most_correlated(corr: dict[str, float]) -> str | None:
    """The metric with the largest oriented r (None if any is NaN)."""
    return None if any(not math.isfinite(v) for v in corr.values()) else max(corr, key=corr.__getitem__)


def curves(measured: list[dict], layer: str) -> dict:
    """{split: {"epoch": [...], metric: [...], "degenerate": {metric: [bool, ...]}}} from the trainer's measured
    records."""
    out = {}
    for split in ("train", "test"):
        entries = [r["layers"][layer][split] for r in measured]
        out[split] = {
            "epoch": [r["epoch"] for r in measured],
            **{k: [float("nan") if e.get(k) is None else float(e[k]) for e in entries] for k in METRICS},
            "degenerate": {k: [k in e.get("degenerate", ()) for e in entries] for k in METRICS},
        }
    return out


def _scales(text: str) -> tuple[float, ...]:
    """An argparse type: at least 3 distinct logit scales > 0, comma-separated, kept in their order."""
    scales = tuple(_common.positive_float(v) for v in text.split(",") if v.strip())
    if len(scales) < 3 or len(set(scales)) != len(scales):
        raise argparse.ArgumentTypeError(f"need at least 3 distinct values (a correlation), got {list(scales)}")
    return scales


# ---------------------------------------------------------------------------------------- training
class SpanTrainer(Trainer):
    """The reference trainer; every measured epoch also records ``span``: span_split of the
    penultimate features, {split: ...}, from a float64 pass over the features of that epoch's model."""

    def on_measured(self, record: dict) -> None:
        pen = self.model.penultimate_name
        record["span"] = {
            split: span_split(self.features(split, pen), self.y[split].cpu().numpy(), self.num_train_classes)
            for split in ("train", "test")
        }


def transfer_run(
    ctx: _common.Context, folder: Path, scale: float, seed: int, config: dict, fitted: float = FITTED
) -> dict:
    """Pretrain on the coarse labels at logit scale ``scale``; probe the frozen features on the
    downstream tasks; the row of the sweep (metrics, accuracies, MLOG)."""
    run = ctx.train(folder, logit_scale=scale, seed=seed, **config)
    tr = run.trainer
    pen = tr.model.penultimate_name
    last = run.measured[-1]
    feats = {s: tr.features(s, pen) for s in ("train", "test")}
    y_orig = {s: tr.y_orig[s].cpu().numpy() for s in ("train", "test")}
    sup = superclass_map(y_orig["train"], tr.y["train"].cpu().numpy(), tr.num_original)
    tasks = {s: downstream_tasks(y_orig[s], sup) for s in ("train", "test")}
    acc = {
        t: linear_probe(feats["train"], tasks["train"][t], feats["test"], tasks["test"][t], seed=seed, device=tr.device)
        for t in tasks["train"]
    }
    n_test = int(feats["test"].shape[0])
    m = last["layers"][pen]["train"]
    return {
        "logit_scale": scale,
        "seed": seed,
        "epochs": tr.epoch,
        "pretrain_train_accuracy": last["train_acc"],
        "pretrain_accuracy": last["test_acc"],
        "task_accuracy": acc,
        "mlog": mlog(acc, last["test_acc"], {t: n_test for t in acc}, n_test),
        "metrics": {k: m[k] for k in METRICS},
        "degenerate": list(m.get("degenerate", [])),
        "fitted": last["train_acc"] >= fitted,
        "num_pretrain_classes": tr.num_train_classes,
        "seconds": run.seconds,
    }


def run(ctx: _common.Context) -> dict:
    """1-3: training curves, Sigma_W's split and invariance on one run; 4: the transfer sweep."""
    s, out = ctx.settings, ctx.out
    base = dict(
        COMMON,
        dataset=s["dataset"],
        width=s["width"],
        lr=s["lr"],
        weight_decay=s["weight_decay"],
        batch_size=s["batch_size"],
        **{k: s[k] for k in ("train_subset", "augment") if k in s},
    )
    ctx.log(f"training run: {s['epochs']} epochs, metrics every {s['metrics_every']} -> {out / 'train'}")
    run = ctx.train(out / "train", trainer=SpanTrainer, epochs=s["epochs"], metrics_every=s["metrics_every"], **base)
    tr, measured = run.trainer, run.measured
    pen = tr.model.penultimate_name
    data = curves(measured, pen)
    span = {
        split: {
            "epoch": [r["epoch"] for r in measured],
            **{
                key: [r["span"][split][key] for r in measured]
                for key in ("inside", "outside", "total", "share_inside", "rank_b")
            },
        }
        for split in ("train", "test")
    }
    trends = {split: {} for split in ("train", "test")}
    for split, d in data.items():
        for k in METRICS:  # the untrained network and the degenerate (forced) values left out
            keep = [i for i, (e, f) in enumerate(zip(d["epoch"], d["degenerate"][k])) if e >= 1 and not f]
            trends[split][k] = collapse_trend([d["epoch"][i] for i in keep], [d[k][i] for i in keep], COLLAPSE_SIGN[k])
    span_trend = {
        split: {
            part: collapse_trend(
                [e for e in sp["epoch"] if e >= 1], [v for e, v in zip(sp["epoch"], sp[part]) if e >= 1]
            )
            for part in ("inside", "outside", "share_inside")
        }
        for split, sp in span.items()
    }
    feats, labels = tr.features("train", pen), tr.y["train"].cpu().numpy()
    np.savez(out / "features.npz", train=feats, labels=labels, num_classes=tr.num_train_classes)
    ctx.log("invariance check on the final train features")
    inv = invariance(feats, labels, tr.num_train_classes, seed=ctx.seed)

    rows = []
    points = [(scale, ctx.seed + j) for j in range(s["transfer_seeds"]) for scale in s["logit_scales"]]
    for i, (scale, seed) in enumerate(points, start=1):
        ctx.log(
            f"transfer sweep {i}/{len(points)}: pretraining on coarse labels at logit scale "
            f"T = {scale:g} (seed {seed}), {s['transfer_epochs']} epochs"
        )
        config = dict(base, epochs=s["transfer_epochs"], metrics_every=s["transfer_epochs"], coarse=s["coarse"])
        rows.append(
            transfer_run(ctx, out / "transfer" / f"T{scale:g}_s{seed}", scale, seed, config, s.get("fitted", FITTED))
        )
    corr = transfer_correlations(rows)
    return {
        "preset": ctx.preset,
        "quick": ctx.quick,
        "settings": dict(s),
        "training": {
            "layer": pen,
            "curves": data,
            "span": span,
            "trends": trends,
            "span_trends": span_trend,
            "interpolation_epoch": run.summary.get("interpolation_epoch"),
            "train_accuracy": run.summary["train_accuracy"],
            "test_accuracy": run.summary["test_accuracy"],
            "seconds": run.seconds,
        },
        "invariance": {
            **inv,
            "verdicts": invariance_verdicts(inv["change"]),
            "same_tol": SAME_TOL,
            "change_tol": CHANGE_TOL,
        },
        "transfer": {
            "rows": rows,
            "correlations": corr,
            "paper_correlations": paper_correlations(),
            "most_correlated": most_correlated(corr),
        },
        "_run": run,
    }


# ------------------------------------------------------------------------------------------- report
def claims(results: dict) -> list[_common.Claim]:
    """The claim rows, every verdict computed from the numbers of ``results``."""
    trends, span_trend = results["training"]["trends"], results["training"]["span_trends"]
    inv = results["invariance"]
    corr, paper_corr = results["transfer"]["correlations"], results["transfer"]["paper_correlations"]
    out = []

    def claim(text: str, paper: str, ours: str, holds: bool | None) -> None:
        out.append(_common.Claim(text, paper, ours, holds))

    def rho(t: dict) -> str:
        return (
            f"ρ = {compact(t['rho'], 2)}; {compact(t['first'])} → {compact(t['last'])} (epochs {t['epochs'][0]}-"
            f"{t['epochs'][-1]})"
            if t["first"] is not None
            else "too few epochs"
        )

    def r(v: float) -> str:
        return _common.number(v, ".3f")

    for k in ("vci", "fuzziness"):
        t = trends["train"][k]
        claim(
            f"{LABELS[k]} decreases over training (train)",
            "decreasing (Fig. 3, ResNet-18 / CIFAR-10)",
            rho(t),
            t["collapses"],
        )
    sq, cs = trends["train"]["squared_distance"], trends["train"]["cosine_separation"]
    cons = [sq["consistent"], cs["consistent"]]
    claim(
        f"squared distance and cosine separation show no consistent collapse trend (|ρ| < {CONSISTENT_RHO})",
        "no consistent trend (Fig. 3, CIFAR-10; consistent on ImageNet, Fig. 4)",
        f"squared distance {rho(sq)}; cosine separation {rho(cs)}",
        None if None in cons else not any(cons),
    )
    t = trends["test"]["vci"]
    claim("VCI decreases on the test features too", "decreasing (Fig. 6)", rho(t), t["collapses"])
    ins, outs, share = (span_trend["train"][k] for k in ("inside", "outside", "share_inside"))
    rhos = (ins["rho"], outs["rho"])
    claim(
        "Tr(P_B Σ_W) shrinks while Tr(P_B⊥ Σ_W) grows over training (train; Spearman ρ with the epoch)",
        "inside decreases, outside increases (Fig. 1, ResNet-50 / ImageNet)",
        f"inside ρ = {compact(ins['rho'], 2)}, {compact(ins['first'])} → {compact(ins['last'])}; outside ρ = "
        f"{compact(outs['rho'], 2)}, {compact(outs['first'])} → {compact(outs['last'])}",
        None if any(math.isnan(v) for v in rhos) else rhos[0] < 0 and rhos[1] > 0,
    )
    claim(
        "the share Tr(P_B Σ_W) / Tr(Σ_W) falls over training (train; scale-free)",
        "falls (follows from Fig. 1)",
        f"ρ = {compact(share['rho'], 2)}, {compact(share['first'])} → {compact(share['last'])}",
        None if math.isnan(share["rho"]) else share["rho"] < 0,
    )
    v = inv["verdicts"]["vci"]
    claim(
        "VCI is invariant to invertible linear maps",
        "exactly invariant (Cor. 5.4)",
        f"max relative change {compact(v['max_same'])} over invertible, block, orthogonal and scaling maps",
        v["holds"],
    )
    texts = {
        "fuzziness": (
            "invariant to block maps on span(Σ_B) ⊕ ⊥ (and orthogonal, isotropic), not to a general invertible map",
            "Obs. 4.2",
        ),
        "squared_distance": (
            "invariant to orthogonal maps and isotropic scaling, not to a general invertible map",
            "Obs. 4.3",
        ),
        "cosine_separation": (
            "invariant to orthogonal maps and per-sample scaling, not to a general invertible map",
            "Obs. 4.4",
        ),
    }
    for k, (text, where) in texts.items():
        v = inv["verdicts"][k]
        failed = f" (failed: {', '.join(v['failed'])})" if v["failed"] else ""
        claim(
            f"{LABELS[k]}: {text}",
            where,
            f"invariant cases ≤ {compact(v['max_same'])}; general invertible map: "
            f"{compact(inv['change']['invertible'][k])}{failed}",
            v["holds"],
        )
    pt, pr, pa = (paper_corr[g] for g in ("temperature", "regularizer", "all"))
    finite = all(math.isfinite(corr[k]) for k in METRICS)
    claim(
        "temperature sweep: less collapse goes with better transfer, for all four metrics (oriented r > 0)",
        "r = " + ", ".join(r(pt[k]) for k in METRICS) + " (Table 2 rows 1-6, in the order fuzziness, sq. distance, "
        "cosine, VCI)",
        ", ".join(f"{LABELS[k]} {r(corr[k])}" for k in METRICS),
        all(corr[k] > 0 for k in METRICS) if finite else None,
    )
    claim(
        "VCI correlates positively with transfer (MLOG)",
        f"r = {r(pt['vci'])} (temperature), {r(pr['vci'])} (regularizer)",
        f"r = {r(corr['vci'])}",
        corr["vci"] > 0 if math.isfinite(corr["vci"]) else None,
    )
    best = most_correlated(corr)
    claim(
        "VCI correlates with transfer more than the other metrics",
        f"VCI {r(pa['vci'])}, others ≤ {r(max(pa[k] for k in METRICS if k != 'vci'))} (both groups pooled; "
        f"temperature group alone: VCI {r(pt['vci'])}, sq. distance {r(pt['squared_distance'])})",
        f"most correlated: {LABELS[best] if best else _common.MISSING} (VCI {r(corr['vci'])}, best other "
        f"{r(max(corr[k] for k in METRICS if k != 'vci'))})",
        None if best is None else best == "vci",
    )
    return out


def sections(results: dict) -> list[tuple[str, str]]:
    """The training-curve trends, the invariance table, the transfer sweep and the settings."""
    tr, inv, tf, s, run = (results[k] for k in ("training", "invariance", "transfer", "settings", "_run"))
    yes_no = {True: "yes", False: "no", None: _common.MISSING}
    rows = []
    for split in ("train", "test"):
        for k in METRICS:
            t = tr["trends"][split][k]
            rows.append(
                [
                    split,
                    LABELS[k],
                    compact(t["first"]),
                    compact(t["last"]),
                    compact(t["rho"], 2),
                    yes_no[t["collapses"]],
                    yes_no[t["consistent"]],
                ]
            )
        for part, label in (
            ("inside", "Tr(P_B Σ_W)"),
            ("outside", "Tr(P_B⊥ Σ_W)"),
            ("share_inside", "Tr(P_B Σ_W) / Tr(Σ_W)"),
        ):
            t = tr["span_trends"][split][part]
            rows.append(
                [
                    split,
                    label,
                    compact(t["first"]),
                    compact(t["last"]),
                    compact(t["rho"], 2),
                    "",
                    "",
                ]
            )
    trend = (
        _common.table(
            [
                "split",
                "metric",
                "first (epoch ≥ 1)",
                "last",
                "Spearman ρ (collapse < 0)",
                "collapses",
                f"consistent (ρ ≤ -{CONSISTENT_RHO})",
            ],
            rows,
        )
        + "\n\nρ is Spearman's rank correlation of the epoch with the metric, oriented so that negative means "
        "towards collapse (cosine separation's sign flipped; for the two traces it is not flipped: negative = "
        "shrinking; nor for the share). Degenerate values (forced by the sample size) are left out."
    )

    mark = {True: " (=)", False: " (≠)", None: ""}
    rows = [["(original value)"] + [compact(inv["original"][k], 4) for k in METRICS]]
    rows += [
        [TRANSFORM_LABELS[t]] + [compact(inv["change"][t][k]) + mark[EXPECTED[k][t]] for k in METRICS]
        for t in TRANSFORMS
    ]
    invariant = (
        _common.table(["map"] + [LABELS[k] for k in METRICS], rows)
        + "\n\nRelative change of each metric under each map of the final train features (float64, "
        "ncfast.nc_metrics); (=) the paper says invariant, (≠) not invariant; blank: no claim. "
        f"Invariant: ≤ {SAME_TOL:g}; changed: ≥ {CHANGE_TOL:g}."
    )
    if inv["original"]["degenerate"]:
        invariant += f" Degenerate on these features: {inv['original']['degenerate']} (forced by the sample size)."

    sweep, fitted = tf["rows"], s.get("fitted", FITTED)
    tasks = list(sweep[0]["task_accuracy"]) if sweep else []
    rows = [
        [f"{x['logit_scale']:g}" + ("" if x.get("fitted", True) else "*"), str(x.get("seed", ""))]
        + [compact(x["metrics"][k], 4) for k in METRICS]
        + [compact(x["pretrain_accuracy"], 4)]
        + [compact(x["task_accuracy"][t], 4) for t in tasks]
        + [compact(x["mlog"], 3)]
        for x in sweep
    ]
    corr_rows = [["ours (logit-scale sweep)"] + [_common.number(tf["correlations"][k], ".3f") for k in METRICS]]
    for g, label in (
        ("temperature", "paper, temperature (Table 2 rows 1-6)"),
        ("regularizer", "paper, regularizer (rows 7-11)"),
        ("all", "paper, both groups"),
    ):
        corr_rows.append([label] + [_common.number(tf["paper_correlations"][g][k], ".3f") for k in METRICS])
    transfer = (
        f"Pretraining on the coarse labels ({s['coarse']} "
        f"{'super-classes' if s['coarse'] != 'official' else ''}), {s['transfer_epochs']} epochs per run, "
        f"{s['transfer_seeds']} run(s) per logit scale T (each run one point of the correlation); downstream "
        f"linear probes on fine / within / blocks (see {_common.DOCS}); metrics of the pretraining task's "
        "train features.\n\n"
        + _common.table(
            ["T", "seed"] + [LABELS[k] for k in METRICS] + ["pretrain acc"] + [f"{t} acc" for t in tasks] + ["MLOG"],
            rows,
        )
        + (
            f"\n\n* pretraining stopped below {fitted:.0%} train accuracy (not fitted: its collapse and "
            f"transfer mix in under-training); left out of r ({sum(x.get('fitted', True) for x in sweep)} of "
            f"{len(sweep)} runs count)."
            if not all(x.get("fitted", True) for x in sweep)
            else ""
        )
        + "\n\nOriented Pearson r of each metric with MLOG (r > 0: less collapse, better transfer):\n\n"
        + _common.table(["", *[LABELS[k] for k in METRICS]], corr_rows)
    )

    keys = (
        "dataset",
        "width",
        "epochs",
        "metrics_every",
        "lr",
        "weight_decay",
        "batch_size",
        "transfer_epochs",
        "logit_scales",
        "transfer_seeds",
        "coarse",
        "train_subset",
        "augment",
    )
    parts = [f"{k} = {s[k]}" for k in keys if k in s]
    summary = run.summary
    setting = (
        f"ResNet-18 ({', '.join(parts)}), seed {run.trainer.cfg.seed}, device {summary.get('device')}. "
        f"Training run: train accuracy {compact(summary['train_accuracy'], 4)}, test accuracy "
        f"{compact(summary['test_accuracy'], 4)}, interpolation epoch {summary.get('interpolation_epoch')}, "
        f"{run.seconds:.0f} s."
    )
    return [
        ("Training curves (penultimate features)", trend),
        ("Invariance", invariant),
        ("Transfer sweep", transfer),
        ("Settings", setting),
    ]


# ------------------------------------------------------------------------------------------ figures
def plot_curves(data: dict, path: Path, title: str, interpolation_epoch: int | None = None, dpi: int = 80) -> None:
    """Paper Fig. 3 (and 6): the four metrics over epochs, train (solid) and test (dashed); degenerate
    values hollow."""
    fig, axes = _common.pyplot().subplots(1, 4, figsize=(13, 3.1))
    any_forced = False
    for ax, k in zip(axes, METRICS):
        for split, style in (("train", "-"), ("test", "--")):
            ep, ys, forced = data[split]["epoch"], data[split][k], data[split]["degenerate"][k]
            kept = [float("nan") if f else v for v, f in zip(ys, forced)]
            line = ax.plot(ep, kept, style, marker="o", markersize=3, label=split)[0]
            if any(forced):
                any_forced = True
                ax.plot(
                    [e for e, f in zip(ep, forced) if f],
                    [v for v, f in zip(ys, forced) if f],
                    linestyle="none",
                    marker="o",
                    markerfacecolor="none",
                    color=line.get_color(),
                    label=f"{split} (degenerate)",
                )
        if interpolation_epoch is not None:
            ax.axvline(interpolation_epoch, color="grey", lw=0.8, ls=":", label="train acc ≥ 99.5%")
        positive = [v for s in ("train", "test") for v in data[s][k] if v == v]
        if k in ("fuzziness", "squared_distance") and positive and min(positive) > 0:
            ax.set_yscale("log")
        ax.set_title(LABELS[k] + (" (↑ = collapse)" if COLLAPSE_SIGN[k] < 0 else " (↓ = collapse)"), fontsize=9)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.suptitle(title + ("   hollow: forced by the sample size" if any_forced else ""), fontsize=10)
    fig.tight_layout()
    _common.save_figure(fig, path, dpi=dpi)


def plot_span(span: dict, path: Path, dpi: int = 80) -> None:
    """Paper Fig. 1: Tr(P_B Sigma_W) and Tr((I - P_B) Sigma_W) over epochs, and the share inside."""
    fig, axes = _common.pyplot().subplots(1, 2, figsize=(9, 3.1))
    for split, style in (("train", "-"), ("test", "--")):
        d = span[split]
        axes[0].plot(
            d["epoch"], d["inside"], style, marker="o", markersize=3, color="C0", label=f"Tr(P_B Σ_W), {split}"
        )
        axes[0].plot(
            d["epoch"], d["outside"], style, marker="s", markersize=3, color="C3", label=f"Tr(P_B⊥ Σ_W), {split}"
        )
        axes[1].plot(d["epoch"], d["share_inside"], style, marker="o", markersize=3, color="C2", label=split)
    axes[0].set_yscale("log")
    axes[1].set_ylim(0, 1)
    for ax, title in zip(axes, ("Σ_W inside / outside span(Σ_B)", "share inside: Tr(P_B Σ_W) / Tr(Σ_W)")):
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _common.save_figure(fig, path, dpi=dpi)


def plot_invariance(change: dict, path: Path, dpi: int = 80) -> None:
    """Heatmap of log10 relative change, transforms x metrics, with the paper's expectation marked."""
    grid = np.array([[change[t][k] for k in METRICS] for t in TRANSFORMS], dtype=np.float64)
    shown = np.log10(np.clip(grid, 1e-17, None))
    fig, ax = _common.pyplot().subplots(figsize=(7.2, 3.6))
    im = ax.imshow(shown, cmap="magma", vmin=-17, vmax=1, aspect="auto")
    for i, t in enumerate(TRANSFORMS):
        for j, k in enumerate(METRICS):
            mark = {True: " (=)", False: " (≠)", None: ""}[EXPECTED[k][t]]
            ax.text(
                j,
                i,
                f"{grid[i, j]:.0e}{mark}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shown[i, j] < -6 else "black",
            )
    ax.set_xticks(range(len(METRICS)), [LABELS[k].replace(" ", "\n", 1) for k in METRICS], fontsize=8)
    ax.set_yticks(range(len(TRANSFORMS)), [TRANSFORM_LABELS[t] for t in TRANSFORMS], fontsize=8)
    fig.colorbar(im, ax=ax, label="log10 relative change")
    ax.set_title("metric change under maps of the features; paper: (=) invariant, (≠) not", fontsize=9)
    fig.tight_layout()
    _common.save_figure(fig, path, dpi=dpi)


def plot_transfer(rows: list[dict], corr: dict, path: Path, dpi: int = 80) -> None:
    """Paper Fig. 7 (top row): each metric against MLOG across the logit-scale sweep."""
    fig, axes = _common.pyplot().subplots(1, 4, figsize=(13, 3.1))
    scales = sorted({r["logit_scale"] for r in rows})
    for ax, k in zip(axes, METRICS):
        seen = set()
        for r in rows:
            i = scales.index(r["logit_scale"])
            ax.plot(
                r["metrics"][k],
                r["mlog"],
                "o" if r.get("fitted", True) else "x",
                color=f"C{i}",
                markerfacecolor="none" if k in r.get("degenerate", ()) else None,
                label=f"T = {r['logit_scale']:g}" if i not in seen else None,
            )
            seen.add(i)
        ax.set_xlabel(LABELS[k])
        ax.set_title(f"oriented r = {_common.number(corr[k], '.3f')}", fontsize=9)
    axes[0].set_ylabel("MLOG (transfer)")
    axes[0].legend(
        fontsize=7, title="x: not fitted" if not all(r.get("fitted", True) for r in rows) else None, title_fontsize=7
    )
    fig.suptitle(
        "transfer vs collapse across the logit-scale sweep (r > 0: less collapse, better transfer)", fontsize=10
    )
    fig.tight_layout()
    _common.save_figure(fig, path, dpi=dpi)


def figures(results: dict, out: Path) -> list[tuple[str, str]]:
    """The training curves, Sigma_W's split, the invariance heatmap and the transfer sweep."""
    tr, tf, s = results["training"], results["transfer"], results["settings"]
    plot_curves(
        tr["curves"],
        out / "vci_metrics.png",
        f"ResNet-18 (width {s['width']}) on {s['dataset']}: penultimate features",
        tr["interpolation_epoch"],
    )
    plot_span(tr["span"], out / "vci_span.png")
    plot_invariance(results["invariance"]["change"], out / "vci_invariance.png")
    plot_transfer(tf["rows"], tf["correlations"], out / "vci_transfer.png")
    return [
        (
            "vci_metrics.png",
            "The four variability-collapse metrics over training, train (solid) and test (dashed) "
            "(paper Fig. 3 and 6).",
        ),
        ("vci_span.png", "Σ_W inside and outside span(Σ_B) over training (paper Fig. 1)."),
        (
            "vci_invariance.png",
            "Relative change of each metric under maps of the final train features (paper Obs. 4.2-4.4, Cor. 5.4).",
        ),
        (
            "vci_transfer.png",
            "Each metric against transfer (MLOG) across the logit-scale sweep (paper Fig. 7, top row).",
        ),
    ]


DRIVER = _common.Driver(
    name=NAME,
    title="Paper 004: the Variability Collapse Index",
    usage=textwrap.dedent(__doc__.partition("\n\n")[2]),
    presets=PRESETS,
    quick=QUICK,
    run=run,
    claims=claims,
    figures=figures,
    sections=sections,
    flags=[
        _common.flag("--epochs", type=_common.positive_int, help="epochs of the training-curve run"),
        _common.flag("--metrics-every", type=_common.positive_int, help="measure every N epochs"),
        _common.flag(
            "--transfer-epochs", type=_common.positive_int, help="epochs of each pretraining run of the sweep"
        ),
        _common.flag(
            "--logit-scales",
            type=_scales,
            help="comma-separated logit scales T of the transfer sweep (the loss sees T z), e.g. 0.1,1,10",
        ),
        _common.flag(
            "--transfer-seeds",
            type=_common.positive_int,
            help="pretraining runs per logit scale (seeds seed, seed+1, ...; each run is one point)",
        ),
        _common.flag("--width", type=_common.positive_int, help="ResNet-18 base width"),
    ],
)


def main(argv: list[str] | None = None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
