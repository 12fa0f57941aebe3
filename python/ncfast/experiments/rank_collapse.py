"""Paper 002: the initial logits norm decides how far the rank of the representations collapses.

python -m ncfast.experiments.rank_collapse                    # digits, MLP-4 x 512
python -m ncfast.experiments.rank_collapse --quick            # a smoke run
python -m ncfast.experiments.rank_collapse --preset cifar10 --data DIR --ood-data SVHN_DIR
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..train.data import FASHION_MNIST_DIR, IDX_FILES, load_dataset
from ..train.probes import linear_probe
from ..train.trainer import layer_features
from . import _common
from ._common import number

OOD_KINDS = ("auto", "rotated", "fashion-mnist", "digits", "svhn")
P_VALUE = 0.05  # a Spearman correlation counts as shown when its two-sided p-value is below this
EARLY_FRACTION = 0.9  # "collapsed": this fraction of the drop from the initial to the final rank is done


@dataclass(frozen=True)
class Model:
    arch: str
    depth: int
    width: int | None  # None: the arch's default (MLP 512, ResNet / VGG 64)

    @property
    def label(self) -> str:
        if self.arch == "mlp":
            return f"MLP-{self.depth}x{self.width}"
        base = self.arch if self.arch.endswith(str(self.depth)) else f"{self.arch}{self.depth}"  # vgg19, not vgg1919
        return base + ("" if self.width is None else f"-w{self.width}")


# every setting of a preset; the flags of the same name replace them (--quick: QUICK)
_SHARED = dict(
    batch_size=128,
    lr=0.01,
    weight_decay=5e-4,
    init="kaiming",
    loss="ce",
    train_subset=None,
    groups=("init", "temperature", "layernorm"),
    init_scales=(0.5, 1.0, 1.5, 2.0),
    ood="auto",
)
PRESETS = {
    "digits": dict(
        _SHARED,
        dataset="digits",
        models=[Model("mlp", 4, 512)],
        epochs=30,
        metrics_every=5,
        temperatures=(1.0, 2.0, 5.0, 10.0),
        temperature_init="kaiming",
    ),
    "fashion-mnist": dict(
        _SHARED,
        dataset="fashion-mnist",
        models=[Model("mlp", 4, 512)],
        epochs=30,
        metrics_every=10,
        temperatures=(1.0, 2.0, 5.0, 10.0),
        temperature_init="kaiming",
        train_subset=5000,
    ),
    "cifar10": dict(
        _SHARED,
        dataset="cifar10",
        models=[Model("mlp", d, 2048) for d in (4, 6, 8)],
        epochs=100,
        metrics_every=10,
        temperatures=(1.0, 10.0, 100.0, 1000.0),
        temperature_init="default",
    ),
    "cifar100": dict(
        _SHARED,
        dataset="cifar100",
        models=[Model("vgg19", 19, None), Model("resnet18", 18, None)],
        epochs=200,
        metrics_every=10,
        init_scales=(),
        temperatures=(1.0, 10.0, 100.0, 1000.0),
        temperature_init="default",
        groups=("temperature",),
        train_subset=2000,
    ),
}
QUICK = dict(
    models=[Model("mlp", 2, 64)],
    epochs=3,
    metrics_every=1,
    batch_size=256,
    init_scales=(2.0,),
    temperatures=(1.0, 10.0),
    temperature_init="default",
    ood="rotated",
)


# ------------------------------------------------------------------------------------------ settings
@dataclass
class Setting:
    """One training run of the sweep; ``groups`` are the sweeps it belongs to."""

    model: Model
    init: str = "default"
    init_scale: float = 1.0
    temperature: float = 1.0
    layernorm: bool = False
    groups: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.model, self.init, self.init_scale, self.temperature, self.layernorm)

    @property
    def name(self) -> str:
        init = "default init" if self.init == "default" else f"{self.init} x{self.init_scale:g}"
        if self.init == "default" and self.init_scale != 1:
            init += f" x{self.init_scale:g}"
        return " ".join([self.model.label, init, f"T={self.temperature:g}"] + (["LN"] if self.layernorm else []))

    @property
    def folder(self) -> str:
        keep = "".join(c if c.isalnum() or c in "._=-" else "_" for c in self.name.replace(" ", "_"))
        return keep.replace("__", "_")


def build_settings(
    models, init: str, init_scales, temperatures, groups, temperature_init: str = "default"
) -> list[Setting]:
    """The runs of the sweep, each trained once even when it belongs to several groups (the T = 1
    run of the temperature group, initialised by ``temperature_init`` at scale 1, is also a run of
    the init group)."""
    runs: dict[tuple, Setting] = {}

    def add(s: Setting, group: str) -> None:
        s = runs.setdefault(s.key, s)
        if group not in s.groups:
            s.groups.append(group)

    for m in models:
        init_group = [Setting(m)] + [Setting(m, init=init, init_scale=float(v)) for v in init_scales]
        if init == "default":  # default x 1 is already there
            init_group = [init_group[0]] + [s for s in init_group[1:] if s.init_scale != 1.0]
        if "init" in groups:
            for s in init_group:
                add(replace(s, groups=[]), "init")
        if "temperature" in groups:
            for t in temperatures:
                add(Setting(m, init=temperature_init, temperature=float(t)), "temperature")
        if "layernorm" in groups:
            for s in init_group:
                add(replace(s, layernorm=True, groups=[]), "layernorm")
    return list(runs.values())


def rank_layer(setting: Setting, penultimate: str) -> str:
    """Where the rank is read: the last hidden layer of an MLP (the LayerNorm's input under
    layernorm), else the penultimate features."""
    return f"layer{setting.model.depth}" if setting.model.arch == "mlp" else penultimate


# ------------------------------------------------------------------------------------------ OOD data
@dataclass
class OOD:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _normalise(x01: torch.Tensor, ds) -> torch.Tensor:
    """Images on the [0, 1] scale, normalised with the in-distribution data set's channel statistics."""
    c = x01.shape[1]
    mean = ds.mean.float().view(1, c, 1, 1) if ds.mean is not None else 0.0
    std = ds.std.float().view(1, c, 1, 1) if ds.std is not None else 1.0
    return (x01 - mean) / std


def _seeded_rows(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(k, n)].sort().values


def resolve_ood(kind: str, preset: str, ood_data: str | None, quick: bool) -> str:
    """The OOD data set ``auto`` stands for on a preset: rotated under --quick; svhn on the cifar
    presets given --ood-data (else rotated); fashion-mnist for digits when its files are there (else
    rotated); digits for fashion-mnist."""
    if kind not in OOD_KINDS:
        raise ValueError(f"--ood: expected one of {OOD_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    if quick:
        return "rotated"
    if preset in ("cifar10", "cifar100"):
        return "svhn" if ood_data else "rotated"
    if preset == "digits":
        folder = Path(ood_data or FASHION_MNIST_DIR)
        have = all((folder / f).exists() or (folder / (f + ".gz")).exists() for f in IDX_FILES)
        return "fashion-mnist" if have else "rotated"
    return "digits"


def load_ood(
    kind: str,
    ds,
    id_train_x: torch.Tensor,
    id_test_x: torch.Tensor,
    ood_data: str | None,
    seed: int = 0,
    n_train: int = 2000,
    n_test: int = 1000,
) -> OOD:
    """The OOD set of ``kind`` ("rotated", "fashion-mnist", "digits", "svhn") shaped and normalised
    like the in-distribution images of ``ds``."""
    shape = tuple(id_train_x.shape[1:])
    if kind == "rotated":
        ytr = torch.zeros(0)  # labels come from the caller (the in-distribution ones)
        return OOD(
            "rotated", -torch.rot90(id_train_x.cpu(), 1, (-2, -1)), ytr, -torch.rot90(id_test_x.cpu(), 1, (-2, -1)), ytr
        )
    if len(shape) != 3:
        raise ValueError(f"--ood {kind}: needs image data, the in-distribution data are {shape}")
    if kind in ("fashion-mnist", "digits"):
        src = load_dataset("fashion-mnist", ood_data) if kind == "fashion-mnist" else load_dataset("digits", seed=seed)
        mean, std = src.mean.float().view(1, -1, 1, 1), src.std.float().view(1, -1, 1, 1)
        to01, ys = [x * std + mean for x in (src.train_x, src.test_x)], (src.train_y, src.test_y)
    elif kind == "svhn":
        to01, ys = _svhn(ood_data)
    else:
        raise ValueError(f"--ood: expected one of {OOD_KINDS}, got {kind!r}")
    out = []
    for x, y, n, s in zip(to01, ys, (n_train, n_test), (seed, seed + 1)):
        rows = _seeded_rows(x.shape[0], n, s)
        x, y = x[rows], y[rows]
        if x.shape[1] != shape[0]:  # grey <-> colour
            x = x.mean(1, keepdim=True).expand(-1, shape[0], -1, -1) if shape[0] > 1 else x.mean(1, keepdim=True)
        if tuple(x.shape[2:]) != shape[1:]:
            mode = "area" if x.shape[2] > shape[1] else "bilinear"
            x = F.interpolate(x, size=shape[1:], mode=mode, **({} if mode == "area" else {"align_corners": False}))
        out += [_normalise(x.contiguous(), ds), y]
    return OOD(kind, *out)


def _svhn(folder: str | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """SVHN's cropped digits (train_32x32.mat, test_32x32.mat) on the [0, 1] scale; label 10 is 0."""
    if folder is None:
        raise FileNotFoundError("--ood svhn: give --ood-data, the folder holding train_32x32.mat and test_32x32.mat")
    from scipy.io import loadmat

    xs, ys = [], []
    for split in ("train", "test"):
        path = Path(folder) / f"{split}_32x32.mat"
        if not path.exists():
            raise FileNotFoundError(f"--ood-data: {path} is missing (SVHN's cropped digits, format 2)")
        m = loadmat(path)
        xs.append(torch.from_numpy(np.ascontiguousarray(m["X"].transpose(3, 2, 0, 1))).float() / 255.0)
        ys.append(torch.from_numpy(m["y"].reshape(-1).astype(np.int64) % 10))
    return xs, ys


def ood_probes(trainer, ood: OOD, seed: int) -> dict[str, float]:
    """Linear probe accuracy per probed layer on the OOD set (fit on its train split, scored on its test)."""
    model = trainer.model
    ytr, yte = ood.train_y, ood.test_y
    if ood.name == "rotated":
        ytr, yte = trainer.y_orig["train"].cpu(), trainer.y_orig["test"].cpu()
    ftr = layer_features(model, ood.train_x, trainer.layers, trainer.cfg.max_dim, trainer.device)
    fte = layer_features(model, ood.test_x, trainer.layers, trainer.cfg.max_dim, trainer.device)
    return {
        name: linear_probe(ftr[name], ytr.numpy(), fte[name], yte.numpy(), seed=seed, device=trainer.device)
        for name in trainer.layers
    }


# ------------------------------------------------------------------------------------------ records
def _record(s: Setting, seconds: float, **numbers) -> dict:
    return {
        "name": s.name,
        "folder": s.folder,
        "groups": list(s.groups),
        "model": s.model.label,
        "arch": s.model.arch,
        "depth": s.model.depth,
        "width": s.model.width,
        "init": s.init,
        "init_scale": s.init_scale,
        "temperature": s.temperature,
        "layernorm": s.layernorm,
        **numbers,
        "seconds": seconds,
    }


def run_record(setting: Setting, run: _common.Run, ood_acc: dict | None, seconds: float) -> dict:
    """The numbers of one finished run that the claims and figures use (plain data)."""
    trainer, summary = run.trainer, run.summary
    pen = trainer.model.penultimate_name
    where = rank_layer(setting, pen)
    last = run.measured[-1]["layers"]
    final = last[where]["train"]
    layers = {}
    for name in trainer.layers:
        m = last[name]["train"]
        layers[name] = {
            "effective_rank": m.get("effective_rank"),
            "rank": m.get("rank"),
            "feature_norm": m.get("feature_norm"),
            "degenerate": m.get("degenerate", []),
            "linear_probe": summary["linear_probe_per_layer"].get(name),
            "ood_probe": None if ood_acc is None else ood_acc.get(name),
        }
    evolution = [
        {
            "epoch": r["epoch"],
            "effective_rank": r["layers"][where]["train"].get("effective_rank"),
            "rank": r["layers"][where]["train"].get("rank"),
            "logits_norm": r["layers"][where]["train"].get("logits_norm"),
            "train_acc": r["train_acc"],
        }
        for r in run.measured
    ]
    return _record(
        setting,
        seconds,
        rank_layer=where,
        penultimate=pen,
        num_classes=summary["num_train_classes"],
        initial_logits_norm=summary["initial_logits_norm"],
        final_logits_norm=final.get("logits_norm"),
        final_effective_rank=final.get("effective_rank"),
        final_rank=final.get("rank"),
        degenerate=list(final.get("degenerate", [])),
        final_effective_rank_penultimate=last[pen]["train"].get("effective_rank"),
        train_accuracy=summary["train_accuracy"],
        test_accuracy=summary["test_accuracy"],
        interpolation_epoch=summary["interpolation_epoch"],
        layers=layers,
        evolution=evolution,
        diverged=False,
    )


def diverged_record(setting: Setting, folder: Path, seconds: float) -> dict:
    """A run whose training blew up (NaN / Inf features: SGD with a large T): what its measured epochs
    before that say (the initial logits norm), no final numbers; the claims leave it out."""
    lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []
    measured = [json.loads(line) for line in lines if line.strip()]
    initial = None
    if measured and measured[0]["epoch"] == 0:
        initial = next(iter(measured[0]["layers"].values()))["train"].get("logits_norm")
    none = (
        "rank_layer",
        "penultimate",
        "num_classes",
        "final_logits_norm",
        "final_effective_rank",
        "final_rank",
        "final_effective_rank_penultimate",
        "train_accuracy",
        "test_accuracy",
        "interpolation_epoch",
    )
    return _record(
        setting,
        seconds,
        initial_logits_norm=initial,
        **dict.fromkeys(none),
        degenerate=[],
        layers={},
        evolution=[],
        diverged=True,
        diverged_after_epoch=measured[-1]["epoch"] if measured else None,
    )


# ------------------------------------------------------------------------------------------ claims
def _corr_claim(xs, ys, sign: int) -> dict:
    """rho, p, n and holds = (sign * rho > 0 and p < P_VALUE); holds None where rho is undefined."""
    rho, p = _common.spearman(xs, ys)
    n = int(np.sum(np.isfinite(np.asarray(xs, float)) & np.isfinite(np.asarray(ys, float))))
    holds = None if not math.isfinite(rho) else bool(sign * rho > 0 and p < P_VALUE)
    return {
        "rho": rho,
        "p": p,
        "n": n,
        "holds": holds,
        "ours": f"Spearman rho = {number(rho, '.2g')} (p = {number(p, '.2g')}, n = {n})",
    }


def _finished(records: list[dict]) -> list[dict]:
    return [r for r in records if not r.get("diverged")]


def _plain(records: list[dict]) -> list[dict]:
    return [r for r in _finished(records) if not r["layernorm"]]


def claim_rank_vs_initial_norm(records: list[dict]) -> dict:
    """Final effective rank against initial logits norm over the runs without layernorm: holds when
    the rank falls as the norm grows (Spearman rho < 0, p < P_VALUE)."""
    rs = _plain(records)
    return _corr_claim([r["initial_logits_norm"] for r in rs], [r["final_effective_rank"] for r in rs], -1)


def claim_rank_vs_final_norm(records: list[dict]) -> dict:
    """Final effective rank against final logits norm (Figs. 8/11), runs without layernorm."""
    rs = _plain(records)
    return _corr_claim([r["final_logits_norm"] for r in rs], [r["final_effective_rank"] for r in rs], -1)


def claim_init_scale_norm(records: list[dict]) -> dict:
    """Initial logits norm against the init scale, over the init group's runs of one scheme other
    than PyTorch's default (Fig. 1 top) and without layernorm, per model: holds when every model's
    rho > 0 with p < P_VALUE."""
    per_model = {}
    for r in records:
        if "init" in r["groups"] and not r["layernorm"] and r["init"] != "default":
            per_model.setdefault(r["model"], []).append(r)
    if not per_model:
        return {"rho": float("nan"), "p": float("nan"), "n": 0, "holds": None, "ours": "no init-scale sweep"}
    parts = {
        m: _corr_claim([r["init_scale"] for r in rs], [r["initial_logits_norm"] for r in rs], +1)
        for m, rs in per_model.items()
    }
    holds = None if any(c["holds"] is None for c in parts.values()) else all(c["holds"] for c in parts.values())
    worst = min(parts.values(), key=lambda c: c["rho"] if math.isfinite(c["rho"]) else -2)
    ours = "; ".join(f"{m}: {c['ours']}" for m, c in parts.items())
    return {
        "rho": worst["rho"],
        "p": worst["p"],
        "n": sum(c["n"] for c in parts.values()),
        "holds": holds,
        "per_model": parts,
        "ours": ours,
    }


def _ln_pairs(records: list[dict]) -> list[tuple[dict, dict]]:
    """(layernorm run, its twin without layernorm) for every layernorm run that has one."""
    records, key = _finished(records), lambda r: (r["model"], r["init"], r["init_scale"], r["temperature"])
    plain = {key(r): r for r in records if not r["layernorm"]}
    return [(r, plain[key(r)]) for r in records if r["layernorm"] and key(r) in plain]


def claim_layernorm_norm(records: list[dict]) -> dict:
    """Layernorm keeps the initial logits norm low: over the paired settings, the largest initial
    logits norm with layernorm is below the largest without."""
    pairs = _ln_pairs(records)
    if not pairs:
        return {"holds": None, "ours": "no layernorm runs", "n": 0}
    ln = max(a["initial_logits_norm"] for a, _ in pairs)
    plain = max(b["initial_logits_norm"] for _, b in pairs)
    return {
        "n": len(pairs),
        "max_ln": ln,
        "max_plain": plain,
        "holds": bool(ln < plain),
        "ours": f"largest initial logits norm {number(ln)} with layernorm vs {number(plain)} without "
        f"({len(pairs)} paired settings)",
    }


def claim_layernorm_rank(records: list[dict]) -> dict:
    """Layernorm prevents the collapse: its run ends with a higher effective rank than its twin
    without layernorm in more than half of the paired settings."""
    pairs = _ln_pairs(records)
    if not pairs:
        return {"holds": None, "ours": "no layernorm runs", "n": 0}
    diffs = [a["final_effective_rank"] - b["final_effective_rank"] for a, b in pairs]
    higher = sum(d > 0 for d in diffs)
    return {
        "n": len(pairs),
        "higher": higher,
        "mean_difference": float(np.mean(diffs)),
        "holds": bool(2 * higher > len(pairs)),
        "ours": f"higher effective rank with layernorm in {higher} of {len(pairs)} paired settings "
        f"(mean difference {number(float(np.mean(diffs)), '+.3g')})",
    }


def _temperature_runs(records: list[dict]) -> dict[str, list[dict]]:
    out = {}
    for r in _finished(records):
        if "temperature" in r["groups"]:
            out.setdefault(r["model"], []).append(r)
    return {m: sorted(rs, key=lambda r: r["temperature"]) for m, rs in out.items()}


def _mean_layers(r: dict, key: str) -> float:
    vals = [v[key] for v in r["layers"].values() if v.get(key) is not None]
    return float(np.mean(vals)) if vals else float("nan")


TEMPERATURE_CLAIMS = {
    # key: (value of a run, sign of the expected correlation with T, what it is)
    "rank": (lambda r: r["final_effective_rank"], -1, "final effective rank"),
    "logits_norm": (lambda r: r["final_logits_norm"], +1, "final logits norm"),
    "feature_norm": (lambda r: r["layers"][r["rank_layer"]]["feature_norm"], +1, "final feature norm"),
    "ood": (lambda r: _mean_layers(r, "ood_probe"), -1, "OOD probe accuracy (mean over layers)"),
}


def claim_temperature(records: list[dict], what: str) -> dict:
    """How ``what`` (a key of TEMPERATURE_CLAIMS) moves with T over each model's temperature runs:
    holds when, for every model, Spearman's rho with T has the expected sign and the value at the
    largest T is beyond the value at the smallest T in that direction (two temperatures: the end
    points alone). Not measured with fewer than two finished temperature runs or an undefined rho."""
    value, sign, label = TEMPERATURE_CLAIMS[what]
    groups = _temperature_runs(records)
    if not groups:
        return {"holds": None, "ours": "no temperature sweep", "n": 0}
    parts, texts, verdicts = {}, [], []
    for m, rs in groups.items():
        ts = [r["temperature"] for r in rs]
        vs = [value(r) for r in rs]
        rho, p = _common.spearman(ts, vs)
        ends = bool(sign * (vs[-1] - vs[0]) > 0) if len(vs) >= 2 and all(map(math.isfinite, (vs[0], vs[-1]))) else None
        if ends is None or (len(vs) >= 3 and not math.isfinite(rho)):
            holds = None
        else:  # two temperatures: the end points are all there is
            holds = ends if len(vs) == 2 else bool(sign * rho > 0 and ends)
        parts[m] = {"temperatures": ts, "values": vs, "rho": rho, "p": p, "holds": holds}
        verdicts.append(holds)
        texts.append(
            f"{m}: " + ", ".join(f"T={t:g}: {number(v)}" for t, v in zip(ts, vs)) + f" (rho = {number(rho, '.2g')})"
        )
    holds = None if any(v is None for v in verdicts) else all(verdicts)
    return {"holds": holds, "per_model": parts, "ours": f"{label}: " + "; ".join(texts), "n": len(records)}


def collapse_epoch(evolution: list[dict], fraction: float = EARLY_FRACTION) -> int | None:
    """First measured epoch at which ``fraction`` of the drop of the effective rank from epoch 0 to
    the end is done; None when the rank did not drop."""
    pts = [(e["epoch"], e["effective_rank"]) for e in evolution if e.get("effective_rank") is not None]
    if len(pts) < 2:
        return None
    first, final = pts[0][1], pts[-1][1]
    if not first > final:
        return None
    target = first - fraction * (first - final)
    return next(ep for ep, v in pts if v <= target)


def claim_early_collapse(records: list[dict]) -> dict:
    """The rank collapses early (Figs. 9/12): for the largest-T run of every model, the collapse
    epoch (``collapse_epoch``) is at or before the interpolation epoch; a run that never
    interpolates but collapsed counts as early."""
    groups = _temperature_runs(records)
    if not groups:
        return {"holds": None, "ours": "no temperature sweep", "n": 0}
    texts, verdicts, parts = [], [], {}
    for m, rs in groups.items():
        r = rs[-1]
        ce, it = collapse_epoch(r["evolution"]), r["interpolation_epoch"]
        holds = ce is not None and (it is None or ce <= it)
        parts[m] = {"temperature": r["temperature"], "collapse_epoch": ce, "interpolation_epoch": it, "holds": holds}
        verdicts.append(holds)
        texts.append(
            f"{m} T={r['temperature']:g}: {int(EARLY_FRACTION * 100)}% of the rank drop by epoch "
            f"{'n/a (no drop)' if ce is None else ce}, interpolation at epoch {'never' if it is None else it}"
        )
    return {"holds": all(verdicts), "per_model": parts, "ours": "; ".join(texts), "n": len(groups)}


CLAIMS = [
    (
        "rank_vs_initial_norm",
        "The final rank falls as the initial logits norm grows (no layernorm; Figs. 1-4)",
        '"almost a linear relationship" between logits norm and final rank (no coefficient given)',
        claim_rank_vs_initial_norm,
    ),
    (
        "init_scale_norm",
        "The initial logits norm grows with the init scale (Fig. 1 top)",
        '"almost a linear relationship" (no coefficient given)',
        claim_init_scale_norm,
    ),
    (
        "rank_vs_final_norm",
        "The greater the final logits norm, the lower the final rank (Figs. 8, 11)",
        "monotone, no number given",
        claim_rank_vs_final_norm,
    ),
    (
        "layernorm_norm",
        "Layer norm at the output keeps the initial logits norm low (Fig. 1 bottom)",
        '"prevents increasing the logits norm"',
        claim_layernorm_norm,
    ),
    (
        "layernorm_rank",
        "... and so prevents the rank collapse (Fig. 1 bottom, Figs. 2-4)",
        '"prevents the collapse of the model"',
        claim_layernorm_rank,
    ),
    (
        "temperature_rank",
        "A greater T gives a lower final rank (Figs. 7, 10, 17)",
        "CIFAR-100, 2,000 images: rank well below the 100 classes at large T",
        lambda r: claim_temperature(r, "rank"),
    ),
    (
        "temperature_logits_norm",
        "A greater T gives a greater final logits norm (Figs. 8, 11)",
        "monotone, no number given",
        lambda r: claim_temperature(r, "logits_norm"),
    ),
    (
        "temperature_feature_norm",
        "A greater T gives a greater norm of the representations (Fig. 17 bottom)",
        '"higher representations norm"',
        lambda r: claim_temperature(r, "feature_norm"),
    ),
    (
        "temperature_ood",
        "A greater T gives worse OOD linear probes (Fig. 17, SVHN)",
        '"worse OOD performance"',
        lambda r: claim_temperature(r, "ood"),
    ),
    (
        "early_collapse",
        "The rank collapses early, before the terminal phase (Figs. 9, 12)",
        '"the rank collapses at the beginning of the training"',
        claim_early_collapse,
    ),
]


def evaluate_claims(records: list[dict]) -> dict[str, dict]:
    """Every claim's statistics and verdict from the run records (pure)."""
    return {key: {"claim": claim, "paper": paper, **fn(records)} for key, claim, paper, fn in CLAIMS}


# ------------------------------------------------------------------------------------------ tables
def settings_table(records: list[dict]) -> str:
    """Markdown: one row per run."""
    rows = []
    for r in records:
        head = [r["name"], ", ".join(r["groups"]), number(r["initial_logits_norm"])]
        if r.get("diverged"):
            rows.append(head + [f"diverged (NaN / Inf) after epoch {r['diverged_after_epoch']}"] + ["-"] * 4)
            continue
        erank = number(r["final_effective_rank"], ".4g") + (
            " (degenerate)" if "effective_rank" in r["degenerate"] else ""
        )
        it = "never" if r["interpolation_epoch"] is None else r["interpolation_epoch"]
        rows.append(
            head + [number(r["final_logits_norm"]), erank, r["final_rank"], number(r["train_accuracy"], ".4g"), it]
        )
    return _common.table(
        [
            "run",
            "groups",
            "initial logits norm",
            "final logits norm",
            "final eff. rank",
            "final rank",
            "train acc",
            "interpolation epoch",
        ],
        rows,
    )


def layers_table(records: list[dict]) -> str:
    """Markdown: per layer of every temperature run, ID / OOD probe accuracy, effective rank, norm."""
    rows = [
        [
            r["name"],
            name,
            number(v["linear_probe"]),
            number(v["ood_probe"]),
            number(v["effective_rank"], ".4g"),
            number(v["feature_norm"], ".4g"),
        ]
        for rs in _temperature_runs(records).values()
        for r in rs
        for name, v in r["layers"].items()
    ]
    return _common.table(["run", "layer", "ID probe", "OOD probe", "eff. rank", "feature norm"], rows)


# ------------------------------------------------------------------------------------------ figures
GROUP_TITLES = {
    "init": "init scale (T = 1)",
    "temperature": "temperature T",
    "layernorm": "layernorm at the output (grey: the same without)",
}
MARKERS = "osD^v<>p"


def _short(r: dict) -> str:
    init = "default" if r["init"] == "default" else f"{r['init']} x{r['init_scale']:g}"
    return f"{init}, T={r['temperature']:g}" + (", LN" if r["layernorm"] else "")


def plot_scatter(records: list[dict], path: Path) -> bool:
    """Figs. 1-4 / 7-8 / 10-11: initial logits norm (x, log) against final effective rank (top row)
    and final logits norm (bottom row), one column per sweep group; colour = setting (legend),
    marker = model; hollow = effective rank listed as degenerate (forced by the sample size)."""
    plt = _common.pyplot()
    from matplotlib.ticker import NullFormatter

    groups = [g for g in ("init", "temperature", "layernorm") if any(g in r["groups"] for r in records)]
    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(2, len(groups), figsize=(4.3 * len(groups), 6.6), squeeze=False)
    pairs = {id(a): b for a, b in _ln_pairs(records)}
    for col, g in enumerate(groups):
        members = [r for r in _finished(records) if g in r["groups"]]
        labels = list(dict.fromkeys(_short(r) for r in members))  # in run order
        colours = {lab: plt.cm.viridis(i / max(1, len(labels) - 1)) for i, lab in enumerate(labels)}
        for row, key, ylabel in (
            (0, "final_effective_rank", "final effective rank"),
            (1, "final_logits_norm", "final logits norm"),
        ):
            ax = axes[row][col]
            if g == "layernorm":  # the twins without layernorm, for contrast
                twins = [pairs[id(r)] for r in members if id(r) in pairs]
                ax.scatter(
                    [t["initial_logits_norm"] for t in twins],
                    [t[key] for t in twins],
                    s=30,
                    c="lightgrey",
                    edgecolors="grey",
                    zorder=1,
                    label="without LN",
                )
            for r in members:
                lab, c = _short(r), colours[_short(r)]
                hollow = key == "final_effective_rank" and "effective_rank" in r["degenerate"]
                ax.scatter(
                    [r["initial_logits_norm"]],
                    [r[key]],
                    s=46,
                    marker=MARKERS[models.index(r["model"]) % 8],
                    facecolors="none" if hollow else [c],
                    edgecolors=[c],
                    linewidths=1.5,
                    zorder=2,
                    label=lab,
                )
                ax.annotate(
                    lab.replace(", T=1", "") if g != "temperature" else f"T={r['temperature']:g}",
                    (r["initial_logits_norm"], r[key]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ys = [r[key] for r in members if r[key] is not None and r[key] > 0]
            if row == 1 and ys and max(ys) > 20 * min(ys):
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("initial logits norm (epoch 0)")
            ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(GROUP_TITLES[g], fontsize=9)
            seen = {}
            for h, t in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(t, h)
            ax.legend(seen.values(), seen.keys(), fontsize=6, loc="best")
    note = ", ".join(f"{MARKERS[i % 8]}: {m}" for i, m in enumerate(models))
    fig.suptitle(
        f"rank collapse and the initial logits norm ({note}; rank of the last hidden layer, train; "
        f"hollow = degenerate)",
        fontsize=9,
    )
    fig.tight_layout()
    _common.save_figure(fig, path, dpi=80)
    return True


def plot_layers(records: list[dict], path: Path) -> bool:
    """Figs. 17/22/27: per layer, one curve per temperature: ID probe, OOD probe, effective rank,
    feature norm (a row per model). False (nothing drawn) without temperature runs."""
    plt = _common.pyplot()
    groups = _temperature_runs(records)
    if not groups:
        return False
    panels = (
        ("linear_probe", "ID linear probe acc."),
        ("ood_probe", "OOD linear probe acc."),
        ("effective_rank", "effective rank (train)"),
        ("feature_norm", "feature norm (train)"),
    )
    fig, axes = plt.subplots(len(groups), 4, figsize=(14, 3.0 * len(groups)), squeeze=False)
    for row, (m, rs) in enumerate(groups.items()):
        for col, (key, title) in enumerate(panels):
            ax = axes[row][col]
            for i, r in enumerate(rs):
                names = list(r["layers"])
                ys = [np.nan if r["layers"][n][key] is None else r["layers"][n][key] for n in names]
                colour = plt.cm.plasma(i / max(1, len(rs) - 1) * 0.85)
                ax.plot(range(len(names)), ys, marker="o", color=colour, label=f"T={r['temperature']:g}")
                if key == "effective_rank":
                    forced = [j for j, n in enumerate(names) if "effective_rank" in r["layers"][n]["degenerate"]]
                    ax.scatter(forced, [ys[j] for j in forced], s=60, facecolors="white", edgecolors=[colour], zorder=3)
                ax.set_xticks(range(len(names)))
                ax.set_xticklabels(names, rotation=30, fontsize=7)
            if key == "feature_norm":
                ax.set_yscale("log")
            ax.set_title(f"{m}: {title}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    _common.save_figure(fig, path, dpi=80)
    return True


def plot_evolution(records: list[dict], path: Path) -> bool:
    """Figs. 9/12: effective rank and logits norm of the rank layer over the epochs, one curve per T;
    a dotted line at each run's interpolation epoch. False (nothing drawn) without temperature runs."""
    plt = _common.pyplot()
    groups = _temperature_runs(records)
    if not groups:
        return False
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 5.5), squeeze=False)
    for col, (m, rs) in enumerate(groups.items()):
        for i, r in enumerate(rs):
            colour = plt.cm.plasma(i / max(1, len(rs) - 1) * 0.85)
            ep = [e["epoch"] for e in r["evolution"]]
            for row, key in ((0, "effective_rank"), (1, "logits_norm")):
                axes[row][col].plot(
                    ep,
                    [np.nan if e[key] is None else e[key] for e in r["evolution"]],
                    marker=".",
                    color=colour,
                    label=f"T={r['temperature']:g}",
                )
                if r["interpolation_epoch"] is not None:
                    axes[row][col].axvline(r["interpolation_epoch"], color=colour, linestyle=":", linewidth=1)
        axes[0][col].set_title(f"{m} ({rs[0]['rank_layer']}, train)", fontsize=9)
        axes[0][col].set_ylabel("effective rank")
        axes[1][col].set_ylabel("logits norm (T z)")
        axes[1][col].set_yscale("log")
        for row in (0, 1):
            axes[row][col].set_xlabel("epoch (dotted: interpolation epoch)")
            axes[row][col].legend(fontsize=7)
    fig.tight_layout()
    _common.save_figure(fig, path, dpi=80)
    return True


# ------------------------------------------------------------------------------------------ driver
def plan(ctx: _common.Context) -> dict:
    """The settings with the flags that are not settings applied (--depths, --width, --no-layernorm)
    and ``ood`` resolved; a ValueError naming the flag where they do not fit the preset."""
    cfg, a = dict(ctx.settings), ctx.args
    if a.depths is not None:
        if not all(m.arch == "mlp" for m in cfg["models"]):
            raise ValueError(f"--depths: the {a.preset} preset trains {[m.label for m in cfg['models']]}, not MLPs")
        if a.depths[0] < 1:
            raise ValueError(f"--depths: expected hidden layer counts >= 1, got {a.depths}")
        cfg["models"] = [Model("mlp", d, cfg["models"][0].width) for d in a.depths]
    if a.width is not None:
        cfg["models"] = [replace(m, width=a.width) for m in cfg["models"]]
    if a.no_layernorm:
        cfg["groups"] = tuple(g for g in cfg["groups"] if g != "layernorm")
    cfg["ood"] = resolve_ood(cfg["ood"], a.preset, a.ood_data, a.quick)
    return cfg


def run_config(s: Setting, cfg: dict) -> dict:
    """The trainer's Config fields of one run (data, device, seed and progress come from ``ctx.train``)."""
    return dict(
        arch=s.model.arch,
        depth=s.model.depth,
        width=s.model.width,
        dataset=cfg["dataset"],
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        metrics_every=cfg["metrics_every"],
        augment=False,
        train_subset=cfg["train_subset"],
        logit_scale=s.temperature,
        init=s.init,
        init_scale=s.init_scale,
        output_norm="layernorm" if s.layernorm else None,
        loss=cfg["loss"],
        clp_embed="none",
        max_dim=max(1024, s.model.width or 0) if s.model.arch == "mlp" else 1024,
    )


def run(ctx: _common.Context) -> dict:
    """Train every setting of the sweep (the trainer's run folders go to out/runs/) and evaluate the claims."""
    cfg = plan(ctx)
    settings = build_settings(
        cfg["models"], cfg["init"], cfg["init_scales"], cfg["temperatures"], cfg["groups"], cfg["temperature_init"]
    )
    records, ood = [], None
    t0 = time.perf_counter()
    for i, s in enumerate(settings, start=1):
        tag = f"[{i}/{len(settings)}] {s.name}"
        ctx.log(f"{tag} ({', '.join(s.groups)}) ...")
        t1 = time.perf_counter()
        # the trainer's per-epoch lines are progress: stderr, so stdout keeps the driver's summary
        try:
            with contextlib.redirect_stdout(sys.stderr if ctx.progress else io.StringIO()):
                trained = ctx.train(ctx.out / "runs" / s.folder, **run_config(s, cfg))
        except ValueError as e:
            if "NaN or Inf" not in str(e):
                raise
            records.append(diverged_record(s, ctx.out / "runs" / s.folder, time.perf_counter() - t1))
            ctx.log(f"{tag}: diverged (NaN / Inf features); left out of the claims")
            continue
        ood_acc = None
        if "temperature" in s.groups:
            if ood is None:
                tr = trained.trainer
                ood = load_ood(cfg["ood"], tr.ds, tr.x["train"], tr.x["test"], ctx.args.ood_data, seed=ctx.seed)
            ood_acc = ood_probes(trained.trainer, ood, ctx.seed)
        r = run_record(s, trained, ood_acc, time.perf_counter() - t1)
        records.append(r)
        ctx.log(
            f"{tag}: initial logits norm {number(r['initial_logits_norm'])}, final effective rank "
            f"{number(r['final_effective_rank'], '.4g')}, train acc {number(r['train_accuracy'], '.4g')} "
            f"({r['seconds']:.0f} s, {time.perf_counter() - t0:.0f} s in all)"
        )
        del trained
    config = {**{k: v for k, v in cfg.items() if k != "models"}, "models": [asdict(m) for m in cfg["models"]]}
    return {
        "preset": ctx.preset,
        "quick": ctx.quick,
        "seed": ctx.seed,
        "config": config,
        "runs": records,
        "claims": evaluate_claims(records),
    }


def claims(results: dict) -> list[_common.Claim]:
    return [_common.Claim(c["claim"], c["paper"], c["ours"], c["holds"]) for c in results["claims"].values()]


def figures(results: dict, out: Path) -> list[tuple[str, str]]:
    records, ood = results["runs"], results["config"]["ood"]
    drawn = [
        (
            "rank_collapse.png",
            plot_scatter,
            (
                "Initial logits norm (epoch 0) against the final effective rank (top) and final logits norm (bottom) "
                "of the last hidden layer, per sweep group (paper Figs. 1-4, 7-8, 10-11)"
            ),
        ),
        (
            "rank_collapse_layers.png",
            plot_layers,
            (
                f"Per layer at the end of training, one curve per T: ID linear probe, OOD linear probe "
                f"({ood}), effective rank, feature norm (paper Figs. 17, 22, 27)"
            ),
        ),
        (
            "rank_collapse_evolution.png",
            plot_evolution,
            "Effective rank and logits norm over the epochs, one curve per T (paper Figs. 9, 12)",
        ),
    ]
    return [(file, caption) for file, draw, caption in drawn if draw(records, out / file)]


def sections(results: dict) -> list[tuple[str, str]]:
    cfg, records = results["config"], results["runs"]
    models = ", ".join(Model(**m).label for m in cfg["models"])
    scales = ", ".join(number(v, "g") for v in cfg["init_scales"]) or "-"
    temperatures = ", ".join(number(v, "g") for v in cfg["temperatures"])
    setup = (
        f"{models} on {cfg['dataset']}"
        + (f" ({cfg['train_subset']} training images)" if cfg["train_subset"] else "")
        + f", {cfg['epochs']} epochs, SGD lr {number(cfg['lr'], 'g')}, momentum 0.9, "
        f"weight decay {number(cfg['weight_decay'], 'g')}, "
        f"batch {cfg['batch_size']}, cosine schedule, no augmentation, loss {cfg['loss']}. Sweep groups "
        f"{', '.join(cfg['groups'])}: init scales {scales} "
        f"({cfg['init']}), temperatures {temperatures} ({cfg['temperature_init']} init). "
        f"The rank is ncfast's `effective_rank` (exp of the entropy of the normalised singular values of Sigma_T) "
        f"of the last hidden layer on the train split; correlations are Spearman's (two-sided p < {P_VALUE} counts "
        f"as shown). OOD probes: {cfg['ood']}."
    )
    return [
        ("Setup", setup),
        ("Runs", settings_table(records)),
        ("Per layer (temperature runs)", layers_table(records)),
    ]


DRIVER = _common.Driver(
    name="rank_collapse",
    title="Paper 002: rank collapse driven by the initial logits norm",
    usage=textwrap.dedent((__doc__ or "").partition("\n\n")[2]),
    presets=PRESETS,
    quick=QUICK,
    run=run,
    claims=claims,
    figures=figures,
    sections=sections,
    flags=[
        _common.flag("--depths", type=_common.int_list, metavar="D1,D2", help="MLP hidden layers (digits 4)"),
        _common.flag("--width", type=_common.positive_int, help="MLP hidden units / CNN base channels (digits 512)"),
        _common.flag("--epochs", type=_common.positive_int, help="epochs per run (digits 30)"),
        _common.flag("--lr", type=_common.positive_float, help="SGD learning rate (0.01)"),
        _common.flag("--init", choices=("kaiming", "default"), help="scheme of the init-scale sweep (kaiming)"),
        _common.flag(
            "--init-scales", type=_common.positive_floats, metavar="S1,S2", help="init scales (digits 0.5,1,1.5,2)"
        ),
        _common.flag(
            "--temperatures", type=_common.positive_floats, metavar="T1,T2", help="temperatures T (digits 1,2,5,10)"
        ),
        _common.flag(
            "--temperature-init",
            choices=("kaiming", "default"),
            help="init of the temperature runs (digits kaiming, cifar default)",
        ),
        _common.flag("--no-layernorm", action="store_true", help="leave out the layernorm group"),
        _common.flag("--loss", choices=("ce", "mse"), help="ce, or mse: softmax + MSE (default ce)"),
        _common.flag("--train-subset", type=_common.positive_int, metavar="N", help="train on N training images"),
        _common.flag("--ood", choices=OOD_KINDS, help="out-of-distribution set of the OOD probes (default auto)"),
        _common.flag("--ood-data", help="folder of the OOD files (svhn: train_32x32.mat, test_32x32.mat)"),
    ],
)


def main(argv=None) -> int:
    return DRIVER.main(argv)


if __name__ == "__main__":
    sys.exit(main())
