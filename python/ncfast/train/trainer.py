"""The reference trainer behind ``python -m ncfast.train``: train a network on (transformed) labels and
measure its representations with ncfast every few epochs (see ``__main__.py`` for the options).

Every metric comes from ncfast's streaming statistics through ``ncfast.LayerProbe``: no layer's
features are stored whole while training. Only the end-of-run probes (CLP, linear probes) hold the
penultimate (and, channel-pooled where wide, each probed layer's) features of the train and test sets.

Under torch.distributed (``torchrun --nproc_per_node N -m ncfast.train ...``; ``init_distributed``)
the network trains with DistributedDataParallel: every rank draws the same global batch order and
augmentation from the shared seed and trains on its share of each global batch (the role
DistributedSampler plays for a DataLoader), the loss scaled so that DDP's average of the gradients
is the gradient of the global batch's mean loss; BatchNorm statistics stay per rank. Measurement
shards each split without padding (``shard_indices``) and merges the ranks' statistics exactly
(``LayerProbe``), so the metrics equal one process's over all the data. Rank 0 alone writes the
outputs and the (atomic) checkpoints and runs the end-of-run probes; ``--resume`` restarts every
rank from the last checkpoint, which is what a torchrun restart (``--max-restarts``) needs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..labels import coarse_labels, fine_labels, random_coarse_labels
from .._distributed import Ranks, init_distributed, launched_by_torchrun  # noqa: F401 (re-exported)
from .._validation import available_bytes
from ..losses import svsl_loss
from ..probe import LayerProbe, channel_pool, flatten, shard_indices
from . import _faults, figures
from ._files import atomic_write
from .data import augment_batch, batches, load_dataset
from .models import build_model, footprint, logits_for_loss
from .probes import clp, linear_probe

LEARNING_RATES = (0.1, 0.01, 0.001)
LOSSES = ("ce", "mse")
WEIGHT_DECAYS = (5e-3, 5e-4, 5e-5)


@dataclass
class Config:
    arch: str = "resnet18"
    dataset: str = "digits"
    data: str | None = None
    download: bool = False
    coarse: int | str | None = None  # K, or "official": the data set's own super-classes (CIFAR-100's 20)
    fine: bool = False
    random_coarse: int | None = None
    epochs: int = 60
    batch_size: int = 128
    augment: bool = True  # random crops (and flips where the data set has them) on image data
    train_subset: int | None = None  # train on this many training samples, drawn with the seed
    lr: float = 0.01  # paper 000 config #1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # paper 000 config #1
    schedule: str = "cosine"
    metrics_every: int = 5
    layers: list[str] | None = None
    logit_scale: float = 1.0  # paper 002's T: the loss sees T * logits
    init_scale: float = 1.0
    output_norm: str | None = None
    svsl_alpha: float = 0.0
    svsl_from: str | None = None  # paper 003's gamma, a probed layer; None: the first probed layer
    clp_embed: str = "tsne"
    it_threshold: float = 0.995
    width: int | None = None  # base channels (ResNet / VGG 64), growth rate (DenseNet 32), MLP hidden units (512)
    depth: int | None = None  # ResNet 18 / 34, VGG 11 / 13 / 16 / 19, DenseNet 121 / 169 / 201, MLP hidden layers (2)
    init: str = "default"  # "default" (PyTorch's) or "kaiming" (He normal, zero biases)
    loss: str = "ce"  # "ce" or "mse" (paper 002: MSE between softmax(T z) and the one-hot label)
    distance_epochs: list[int] | None = None  # epochs measured whatever metrics_every says, drawn as heatmaps
    seed: int = 0
    device: str = "auto"
    out: str = "runs/latest"
    resume: bool = False
    progress: bool = True
    max_dim: int = 1024  # wider layers: D x D metrics on channel-pooled features (eigh of 4096^2 x 3 per split is minutes)


# ----------------------------------------------------------------------------------------- helpers
def _device(name: str) -> torch.device:
    """--device: "auto" (cuda if available, else cpu) or a device torch can hold tensors on; anything
    else is a ValueError naming the flag."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--device {name}: not a device ({first}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "meta":
        raise ValueError(f"--device {name}: the meta device holds no data to train on; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (no CUDA build of torch, or no GPU "
                             f"visible); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
        return dev
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # noqa: BLE001 - any backend's refusal, in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--device {name}: not usable here ({first}); use auto, cpu, cuda or cuda:N") from None
    return dev


SEED_MAX = 2**32 - 1  # the largest seed every generator of a run takes (scikit-learn's random_state's)


def check_config(cfg: Config) -> None:
    """The numbers of a Config the command line checks too (``train(Config)`` is an API of its own):
    a ValueError naming the flag, before any data is loaded or any model built."""
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if not (math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1):
        raise ValueError(f"--momentum must be a finite number in [0, 1), got {cfg.momentum}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    if not 0 < cfg.it_threshold <= 1:
        raise ValueError(f"--it-threshold must be a train accuracy in (0, 1], got {cfg.it_threshold}")
    if not (math.isfinite(cfg.init_scale) and cfg.init_scale > 0):
        raise ValueError(f"--init-scale must be a finite number > 0, got {cfg.init_scale}")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ValueError(f"--seed must be in [0, {SEED_MAX}] (2^32 - 1), got {cfg.seed}")


def _gib(n: float) -> str:
    v = n / 2**30
    return f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def check_fits(cfg: Config, num_classes: int, in_channels: int, input_size, n_train: int, device,
               world: int = 1) -> None:
    """Refuse a model, or a batch, that cannot fit the memory free on ``device``, before any of it is
    allocated: a ValueError naming --width / --depth or --batch-size.

    The model is sized by ``models.footprint`` (built on the meta device: nothing allocated). Its
    parameters take 4 bytes four times over (the weights, their gradients, SGD's momentum and the
    checkpoint's copy); a training batch of min(--batch-size, training samples) samples (this rank's
    share of it under DDP) adds 4 bytes per activation float of each sample, counted at the least
    (``footprint``), so a run refused here cannot have fitted. Nothing is checked where the free
    memory cannot be told (``available_bytes`` None)."""
    free = available_bytes(device)
    if free is None:
        return
    params, floats = footprint(cfg.arch, num_classes, in_channels, input_size, output_norm=cfg.output_norm,
                               depth=cfg.depth, width=cfg.width)
    model_bytes = params * 4 * 4
    if model_bytes > free:
        flags = " ".join(f"--{k} {v}" for k, v in (("width", cfg.width), ("depth", cfg.depth)) if v is not None)
        raise ValueError(f"{flags or '--arch ' + cfg.arch}: {cfg.arch} has {params:.2g} parameters, "
                         f"{_gib(model_bytes)} GiB with gradients, momentum and a checkpoint copy, more than the "
                         f"{_gib(free)} GiB free on {torch.device(device)}; lower --width (or --depth)")
    batch = -(-min(cfg.batch_size, n_train) // max(1, world))
    batch_bytes = batch * floats * 4
    if model_bytes + batch_bytes > free:
        raise ValueError(f"--batch-size {cfg.batch_size}: a batch of {batch:,} samples x {floats:,} activation floats "
                         f"per sample of {cfg.arch} needs {_gib(batch_bytes)} GiB besides the model's "
                         f"{_gib(model_bytes)} GiB, more than the {_gib(free)} GiB free on {torch.device(device)}; "
                         f"lower --batch-size (or --width)")


def finite(obj):
    """JSON-safe copy: NaN / Inf become null, tuples lists, numpy scalars Python numbers, keys strings."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@torch.no_grad()
def layer_features(model, x: torch.Tensor, layers, max_dim: int, device, batch: int = 512) -> dict[str, np.ndarray]:
    """Flattened features of every module named in ``layers`` for the inputs x, in one eval-mode pass
    of ``batch`` rows at a time: float32 numpy, channel-pooled where wider than max_dim (as the
    probes' D x D metrics)."""
    modules = dict(model.named_modules())
    store = {name: [] for name in layers}

    def hook(name):
        def fn(m, i, o):
            flat = flatten(o)
            store[name].append((channel_pool(o) if flat.shape[1] > max_dim else flat).float().cpu())
        return fn

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    model.eval()
    try:
        for lo in range(0, x.shape[0], batch):
            model(x[lo:lo + batch].to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v).numpy() for name, v in store.items()}


def _digest(obj) -> str:
    """SHA-256 of a checkpoint's contents in a fixed order: every tensor's dtype, shape and bytes, every
    plain value's repr, dict keys sorted. Stored in the checkpoint and checked on --resume, so a
    flipped bit is not resumed silently."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[" if isinstance(o, list) else b"(")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def _atomic_write(path: Path, what: str, write) -> None:
    """``write(f)`` into a binary file that replaces path whole or not at all (``_files.atomic_write``)."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, what, to_file)


def _atomic_save(obj, path: Path, what: str = "checkpoint") -> None:
    # through a Python file: torch's own file writer reports a full disk as "unexpected pos", naming no cause
    _atomic_write(path, what, lambda f: torch.save(obj, f))


def _atomic_text(text: str, path: Path, what: str) -> None:
    _atomic_write(path, what, lambda f: f.write(text.encode()))


def _atomic_npy(path: Path, what: str, array=None, **arrays) -> None:
    """np.save (array) or np.savez (arrays) to path, atomically (``_atomic_write``)."""
    _atomic_write(path, what, lambda f: np.save(f, array) if array is not None else np.savez(f, **arrays))


class _Progress:
    """tqdm when installed and wanted, else nothing (the per-epoch summary line still prints)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, loss: float):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def transform_labels(cfg: Config, y_train: torch.Tensor, y_test: torch.Tensor, num_classes: int,
                     coarse_of: torch.Tensor | None = None):
    """(train labels, test labels, number of training classes) under --coarse / --fine / --random-coarse.

    ``--coarse official`` maps every class to the data set's own super-class ``coarse_of`` (CIFAR-100's
    20 super-classes of 5 classes each, paper 000 sec. 5)."""
    chosen = [cfg.coarse is not None, cfg.fine, cfg.random_coarse is not None]
    if sum(chosen) > 1:
        raise ValueError("--coarse, --fine and --random-coarse: choose at most one")
    if cfg.coarse == "official":
        if coarse_of is None:
            raise ValueError(f"--coarse official: the data set {cfg.dataset!r} has no official super-classes "
                             f"(cifar100 has 20)")
        present = coarse_of[coarse_of >= 0]
        return coarse_of[y_train], coarse_of[y_test], int(present.max()) + 1
    if isinstance(cfg.coarse, str):
        raise ValueError(f"--coarse: a number of super-classes K or 'official', got {cfg.coarse!r}")
    if cfg.coarse is not None:
        if not 2 <= cfg.coarse <= num_classes:
            raise ValueError(f"--coarse: must be in [2, {num_classes}] (the metrics need 2 training classes), "
                             f"got {cfg.coarse}")
        return coarse_labels(y_train, cfg.coarse), coarse_labels(y_test, cfg.coarse), cfg.coarse
    if cfg.random_coarse is not None:
        if not 2 <= cfg.random_coarse <= num_classes:
            raise ValueError(f"--random-coarse: must be in [2, {num_classes}] (the metrics need 2 training "
                             f"classes), got {cfg.random_coarse}")
        k = cfg.random_coarse
        return (random_coarse_labels(y_train, k, num_classes, seed=cfg.seed),
                random_coarse_labels(y_test, k, num_classes, seed=cfg.seed), k)
    if cfg.fine:
        return (fine_labels(y_train, num_classes, seed=cfg.seed), fine_labels(y_test, num_classes, seed=cfg.seed + 1),
                2 * num_classes)
    return y_train.clone(), y_test.clone(), num_classes


def _subset(n: int, size: int | None, seed: int) -> torch.Tensor | slice:
    """The training rows to keep: all (size None), or ``size`` of the n drawn without replacement with
    the run's seed, in their original order (paper 002 trains on a 2,000-sample subset). The data
    keep the normalisation of the whole training split."""
    if size is None:
        return slice(None)
    if not 1 <= size <= n:
        raise ValueError(f"--train-subset: must be between 1 and the {n} training samples, got {size}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def task_loss(scaled: torch.Tensor, labels: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """The training loss on the scaled logits T z, averaged over the batch.

    "ce": softmax cross-entropy. "mse": paper 002's "softmax and MSE loss" (its figs. 28-33), the
    squared distance between the softmax probabilities and the one-hot label,
    mean_i ||softmax(T z_i) - e_{y_i}||^2."""
    if loss == "ce":
        return F.cross_entropy(scaled, labels)
    if loss == "mse":
        target = F.one_hot(labels, scaled.shape[1]).to(scaled.dtype)
        return (scaled.softmax(1) - target).pow(2).sum(1).mean()
    raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")


# -------------------------------------------------------------------------------------------- run
class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        check_config(cfg)
        self.ranks = Ranks()
        self.device = _device(cfg.device)
        if self.ranks.active and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        ds = load_dataset(cfg.dataset, cfg.data, download=cfg.download, seed=cfg.seed)
        self.ds = ds
        self.num_original = ds.num_classes
        y_tr, y_te, self.num_train_classes = transform_labels(cfg, ds.train_y, ds.test_y, ds.num_classes,
                                                              coarse_of=ds.coarse_of)
        keep = _subset(ds.train_y.shape[0], cfg.train_subset, cfg.seed)
        if cfg.train_subset is not None and int(torch.unique(y_tr[keep]).numel()) < 2:
            raise ValueError(f"--train-subset {cfg.train_subset}: the samples drawn hold one training class; the "
                             f"metrics need at least 2 (draw more samples, or another --seed)")
        dev = self.device
        # the whole data set lives on the device: batches are index gathers, augmentation runs there too
        self.x = {"train": ds.train_x[keep].to(dev), "test": ds.test_x.to(dev)}
        self.y = {"train": y_tr[keep].to(dev), "test": y_te.to(dev)}
        self.y_orig = {"train": ds.train_y[keep].to(dev), "test": ds.test_y.to(dev)}
        image = ds.train_x.dim() == 4
        if cfg.arch != "mlp" and not image:
            raise ValueError(f"--arch {cfg.arch}: needs image data; {cfg.dataset} is flat (use --arch mlp)")
        if cfg.loss not in LOSSES:
            raise ValueError(f"--loss: expected one of {LOSSES}, got {cfg.loss!r}")
        self.distance_epochs = sorted(set(cfg.distance_epochs or ()))
        if any(not 0 <= e <= cfg.epochs for e in self.distance_epochs):
            raise ValueError(f"--distance-epochs: must lie in [0, --epochs = {cfg.epochs}], got {cfg.distance_epochs}")
        # sized on the meta device first: a model or batch that cannot fit is refused before it is allocated
        check_fits(cfg, self.num_train_classes, ds.train_x.shape[1], tuple(ds.train_x.shape[2:]) if image else None,
                   self.x["train"].shape[0], dev, self.ranks.world)
        self.model = build_model(cfg.arch, self.num_train_classes, ds.train_x.shape[1],
                                 tuple(ds.train_x.shape[2:]) if image else None,
                                 init_scale=cfg.init_scale, output_norm=cfg.output_norm, depth=cfg.depth,
                                 width=cfg.width, init=cfg.init).to(dev)
        self.layers = list(cfg.layers) if cfg.layers else list(self.model.default_probe_layers)
        modules = dict(self.model.named_modules())
        unknown = [name for name in self.layers if name not in modules]
        if unknown:
            raise ValueError(f"--layers: {unknown} are not modules of {cfg.arch}; it has "
                             f"{[n for n in modules if n][:40]}")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        if cfg.schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(1, cfg.epochs))
        elif cfg.schedule == "step":
            # the usual step schedule: / 10 at 1/2 and 3/4 of training
            self.sched = torch.optim.lr_scheduler.MultiStepLR(
                self.opt, milestones=[max(1, cfg.epochs // 2), max(1, 3 * cfg.epochs // 4)], gamma=0.1)
        else:
            raise ValueError(f"--schedule: expected cosine or step, got {cfg.schedule!r}")
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        height = ds.train_x.shape[2] if image else 0
        self.pad = 4 if height >= 28 else max(1, height // 8)  # 4 on 28 / 32 px, 1 on the 8 x 8 digits
        if not (math.isfinite(cfg.logit_scale) and cfg.logit_scale > 0):
            raise ValueError(f"--logit-scale: must be a finite number > 0, got {cfg.logit_scale}")
        # the loss's logits are the network's output times this (paper 002's T)
        self.logit_scale = float(cfg.logit_scale)
        self.svsl_layers = self._svsl_layers(modules)
        self.autocast = dev.type == "cuda"
        self.history: list[dict] = []
        self.epoch = 0
        self.epoch_seconds: list[float] = []
        self.measure_seconds: dict[int, float] = {}  # measured epoch -> seconds of its measure()
        self.counts = {s: torch.bincount(self.y[s].cpu(), minlength=self.num_train_classes) for s in self.y}
        self.train_model = self.model
        if self.ranks.active:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self._fault = _faults.planned(self.ranks.rank)  # None unless a restart test asks (train/_faults.py)

    def _svsl_layers(self, modules: dict) -> list[str]:
        """The probed modules whose outputs SVSL covers, shallowest first: from --svsl-from (paper
        003's gamma; default the first probed layer) on, in the model's module order (the forward
        order of every ARCHS model). The output layer k, the scaled logits the loss sees, is added
        to them in ``train_epoch``; the head module itself is therefore left out. Empty when
        --svsl-alpha is 0."""
        cfg = self.cfg
        if not (math.isfinite(cfg.svsl_alpha) and cfg.svsl_alpha >= 0):
            raise ValueError(f"--svsl-alpha: must be a finite number >= 0, got {cfg.svsl_alpha}")
        order = {name: i for i, name in enumerate(modules)}
        probed = sorted(self.layers, key=order.__getitem__)
        first = probed[0] if cfg.svsl_from is None else cfg.svsl_from
        if first not in probed:
            raise ValueError(f"--svsl-from: {first!r} is not a probed layer; the probed layers are {probed} "
                             f"(add it to --layers to use another module)")
        if cfg.svsl_alpha == 0:
            return []
        head = next(name for name, m in modules.items() if m is self.model.head)
        return [name for name in probed if order[name] >= order[first] and name != head]

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        """The checkpoint (rank 0 writes it atomically; every rank waits until it is on disk)."""
        if not self.ranks.main:
            self.ranks.barrier()
            return
        state = {
            "config": asdict(self.cfg), "epoch": self.epoch, "model": self.model.state_dict(),
            "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "gen": self.gen.get_state(),
            "history": self.history, "epoch_seconds": self.epoch_seconds, "measure_seconds": self.measure_seconds,
        }
        state["sha256"] = _digest(state)
        _atomic_save(state, self._checkpoint_path(), "checkpoint")
        self.ranks.barrier()

    def load(self) -> bool:
        path = self._checkpoint_path()
        if not path.exists():
            return False
        # weights_only: tensors and plain values only (what save() writes); a pickle that names any
        # other global, as a code-running payload must, is refused before anything of it runs
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's restricted unpickler names the global it refused ("Unsupported global: ...");
            # other complaints ("Unsupported operand") are bytes that are not a pickle at all
            detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("Unsupported")),
                          str(e).strip().splitlines()[0] if str(e).strip() else "")
            if "global" not in detail.lower():
                raise ValueError(f"--resume: {path} is not a readable checkpoint ({detail}); delete it to start "
                                 f"over") from None
            raise ValueError(f"--resume: {path} holds more than a checkpoint's tensors and plain values, so it "
                             f"is not loaded (a pickle can run code): {detail}") from None
        except Exception as e:  # noqa: BLE001 - empty, truncated, garbage: one line, not a traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--resume: {path} is not a readable checkpoint ({first}); delete it to start over") from None
        if not isinstance(state, dict):
            raise ValueError(f"--resume: {path} holds a {type(state).__name__}, not a checkpoint")
        missing = [k for k in ("epoch", "model", "opt", "sched", "gen", "history", "sha256") if k not in state]
        if missing:
            raise ValueError(f"--resume: {path} lacks {missing}; delete it to start over")
        if state["sha256"] != _digest({k: v for k, v in state.items() if k != "sha256"}):
            raise ValueError(f"--resume: {path} fails its integrity check (its contents no longer match the "
                             f"SHA-256 saved with them: a damaged file); delete it to start over")
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            self.gen.set_state(state["gen"].cpu())
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--resume: {path} does not fit this run's model and optimiser ({first})") from None
        self.history = state["history"]
        self.epoch = int(state["epoch"])
        self.epoch_seconds = state.get("epoch_seconds", [])
        self.measure_seconds = state.get("measure_seconds", {})
        return True

    # ---------------------------------------------------------------- one epoch
    def train_epoch(self) -> float:
        cfg, model = self.cfg, self.model
        model.train()
        captured: dict[str, torch.Tensor] = {}
        handles = [dict(model.named_modules())[name].register_forward_hook(
            lambda m, i, o, name=name: captured.__setitem__(name, o)) for name in self.svsl_layers]
        svsl = cfg.svsl_alpha > 0
        x, y = self.x["train"], self.y["train"]
        n = x.shape[0]
        steps = math.ceil(n / cfg.batch_size)
        ranks = self.ranks
        bar = _Progress(steps, f"epoch {self.epoch + 1}/{cfg.epochs}", cfg.progress and ranks.main)
        total, count = 0.0, 0
        try:
            for step, idx in enumerate(batches(n, cfg.batch_size, self.gen, shuffle=True), start=1):
                _faults.before_step(self._fault, self.epoch + 1, step)
                if idx.shape[0] < ranks.world:  # a global batch too small to give every rank a row
                    continue
                xb, yb = x[idx], y[idx]
                if cfg.augment and self.ds.augment:
                    # every rank draws the global batch's augmentation, so that the generator stays shared
                    xb = augment_batch(xb, self.gen, pad=self.pad, flip=self.ds.flip)
                part = ranks.part(idx.shape[0])
                xb, yb = xb[part], yb[part]
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    logits = self.train_model(xb)
                    scaled = logits_for_loss(logits.float(), self.logit_scale)
                    loss = task_loss(scaled, yb, cfg.loss)
                    if svsl:
                        # layers gamma..k of paper 003: the probed ones, then the output layer
                        layers = [captured[name] for name in self.svsl_layers] + [scaled]
                        loss = loss + svsl_loss(layers, yb, alpha=cfg.svsl_alpha,
                                                num_classes=self.num_train_classes)
                self.opt.zero_grad(set_to_none=True)
                # DDP averages the ranks' gradients: weight each rank's mean by its share of the batch
                (loss * (yb.shape[0] * ranks.world / idx.shape[0]) if ranks.active else loss).backward()
                self.opt.step()
                value = float(loss.detach())
                total += value * yb.shape[0]
                count += yb.shape[0]
                bar.update(value)
        finally:
            bar.close()
            for h in handles:
                h.remove()
        self.sched.step()
        total, count = ranks.scalars(total, count)
        return total / max(1, count)

    def _loader(self, split: str, batch: int = 512):
        """Batches of a split, in order; under DDP this rank's shard (rank, rank + world, ...)."""
        x, y, yo = self.x[split], self.y[split], self.y_orig[split]
        if self.ranks.active:
            keep = torch.as_tensor(shard_indices(x.shape[0], self.ranks.rank, self.ranks.world), device=x.device)
            x, y, yo = x[keep], y[keep], yo[keep]
        return [(x[lo:lo + batch], y[lo:lo + batch], yo[lo:lo + batch]) for lo in range(0, x.shape[0], batch)]

    @torch.no_grad()
    def accuracy(self, split: str) -> float:
        """The network's accuracy on a split (eval mode, no augmentation, float32 like the probes)."""
        self.model.eval()
        hits = 0
        for xb, yb, _ in self._loader(split):
            hits += int((self.model(xb).argmax(1) == yb).sum())
        return self.ranks.scalars(hits)[0] / self.x[split].shape[0]

    def measure(self) -> tuple[dict, dict, torch.Tensor | None, dict]:
        """{layer: {split: metrics}}, {(layer, split): class-distance matrix on the original labels},
        the penultimate layer's class-distance matrix over the training labels of the train split
        (relabelled runs only, else None) and {split: accuracy} (from the probe's own pass: no extra
        forward pass).

        The test split's NCC accuracy and mismatch are scored against the train split's class means
        of the same layer (paper 003 def. 6), not the test split's own; its other metrics describe
        the test features themselves."""
        layers: dict[str, dict] = {name: {} for name in self.layers}
        distances, train_label_distance = {}, None
        accuracy = {}
        pen = self.model.penultimate_name if self.model.penultimate_name in self.layers else None
        train_means = None
        for split in ("train", "test"):
            probe = LayerProbe(self.model, self.layers, self.num_train_classes,
                               head=self.model.head if pen else None, penultimate=pen,
                               num_original_classes=self.num_original, class_counts=self.counts[split],
                               max_dim=self.cfg.max_dim, logit_scale=self.logit_scale)
            try:
                result = probe.measure(self._loader(split), class_means=train_means)
            except ValueError as e:  # a diverged network: say where and when, and stop
                raise ValueError(f"measuring the {split} split after epoch {self.epoch}: {e}") from None
            if split == "train":
                train_means = result.class_means
                if self.relabelled and pen is not None:
                    train_label_distance = result[pen].train_class_distance
            accuracy[split] = result.accuracy
            for name, layer in result.items():
                entry = dict(layer.metrics)
                entry["dxd_features"] = layer.dxd_features
                entry["dim"] = layer.dim
                entry["degenerate"] = list(layer.metrics.degenerate)
                layers[name][split] = entry
                distances[(name, split)] = layer.class_distance
        return layers, distances, train_label_distance, accuracy

    @property
    def relabelled(self) -> bool:
        """Whether the training labels differ from the original ones (--coarse, --fine, --random-coarse)."""
        return self.cfg.coarse is not None or self.cfg.fine or self.cfg.random_coarse is not None

    # ---------------------------------------------------------------- the run
    def run(self) -> dict:
        cfg = self.cfg
        try:
            for folder in (self.out, self.out / "class_distance", self.out / "figures"):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {self.out}: could not create the output folder {e.filename or folder}: "
                             f"{e.strerror or e}") from None
        resumed = cfg.resume and self.load()
        if resumed:
            if self.ranks.main:
                print(f"resumed from {self._checkpoint_path()} at epoch {self.epoch}", file=sys.stderr)
        else:
            self._evaluate(0, float("nan"))  # epoch 0: the untrained network
            self.save()
        self._write_metrics()
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            loss = self.train_epoch()
            self.epoch += 1
            self.epoch_seconds.append(time.perf_counter() - t0)
            self._evaluate(self.epoch, loss)
            self._write_metrics()
            self.save()
        return self.finish()

    def _evaluate(self, epoch: int, loss: float) -> None:
        cfg = self.cfg
        self._sync_buffers()
        main = self.ranks.main
        record = {"epoch": epoch, "train_loss": loss, "lr": self.opt.param_groups[0]["lr"]}
        scheduled = epoch % cfg.metrics_every == 0 or epoch == cfg.epochs or epoch in self.distance_epochs
        if not scheduled:
            record["train_acc"], record["test_acc"] = self.accuracy("train"), self.accuracy("test")
            # the interpolation epoch is measured whatever metrics_every says (paper 003's IT)
            scheduled = epoch > 0 and record["train_acc"] >= cfg.it_threshold and not any(
                r["epoch"] > 0 and r["train_acc"] >= cfg.it_threshold for r in self.history)
        if scheduled:
            t0 = time.perf_counter()
            record["layers"], distances, train_label_distance, accuracy = self.measure()
            # beside the record, not in it: metrics.jsonl holds the numbers a rerun reproduces
            self.measure_seconds[epoch] = time.perf_counter() - t0
            record["train_acc"], record["test_acc"] = accuracy["train"], accuracy["test"]
            pen = self.model.penultimate_name
            folder = self.out / "class_distance"
            if main and distances.get((pen, "train")) is not None:
                _atomic_npy(folder / f"epoch_{epoch:03d}.npy", "class-distance matrix",
                            distances[(pen, "train")].cpu().numpy())
            if main and train_label_distance is not None:
                # over the training labels: with --fine the 2C x 2C matrix of paper 000 fig. 15
                _atomic_npy(folder / f"epoch_{epoch:03d}_train_labels.npy", "class-distance matrix",
                            train_label_distance.cpu().numpy())
            # every probed layer and split, original labels: arrays named "<layer>/<split>"
            if main:
                _atomic_npy(folder / f"epoch_{epoch:03d}_layers.npz", "class-distance matrices", **{
                    f"{name}/{split}": d.cpu().numpy() for (name, split), d in distances.items() if d is not None})
            self.on_measured(record)
        self.history.append(record)
        line = f"epoch {epoch:3d}  loss {loss:.4f}  train acc {record['train_acc']:.4f}  test acc {record['test_acc']:.4f}"
        if "layers" in record:
            m = record["layers"].get(self.model.penultimate_name, {}).get("train", {})
            line += "  " + "  ".join(f"{k} {m[k]:.4g}" for k in ("nc1", "nc2_etf", "ncc_mismatch", "msdr") if k in m)
        timing = [f"{self.epoch_seconds[-1]:.1f} s"] if self.epoch_seconds and epoch > 0 else []
        if epoch in self.measure_seconds and scheduled:
            timing.append(f"measured in {self.measure_seconds[epoch]:.1f} s")
        if timing:
            line += f"  ({', '.join(timing)})"
        if main:
            print(line, flush=True)

    def _sync_buffers(self) -> None:
        """Under DDP, every rank measures with rank 0's buffers (BatchNorm running statistics, which
        each rank updates from its own share of the batches)."""
        if self.ranks.active:
            for b in self.model.buffers():
                self.ranks.dist.broadcast(b, 0)

    def on_measured(self, record: dict) -> None:
        """Called after every measured epoch with that epoch's record (``epoch``, ``layers``, accuracies),
        the model in its state of that epoch. A subclass adds its own measurements as new keys of
        ``record``; they are written to metrics.jsonl with the rest (JSON-safe values). Does nothing here."""

    def _write_metrics(self) -> None:
        """metrics.jsonl (the measured epochs, every metric) and history.jsonl (every epoch: loss,
        learning rate, train and test accuracy, the epoch's training seconds and, on a measured
        epoch, ``measure_seconds``: the seconds of both splits' measure, null otherwise). Rank 0
        writes them."""
        if not self.ranks.main:
            return
        lines = [json.dumps(finite(r)) for r in self.history if "layers" in r]
        _atomic_text("\n".join(lines) + ("\n" if lines else ""), self.out / "metrics.jsonl", "metrics")
        keys = ("epoch", "train_loss", "lr", "train_acc", "test_acc")
        seconds = self.epoch_seconds
        rows = [{**{k: r[k] for k in keys}, "seconds": seconds[r["epoch"] - 1] if 0 < r["epoch"] <= len(seconds) else None,
                 "measure_seconds": self.measure_seconds.get(r["epoch"])}
                for r in self.history]
        _atomic_text("".join(json.dumps(finite(row)) + "\n" for row in rows), self.out / "history.jsonl", "history")

    def features(self, split: str, name: str) -> np.ndarray:
        """Flattened (channel-pooled when wider than max_dim) features of one layer on a split, float32 numpy."""
        return layer_features(self.model, self.x[split], [name], self.cfg.max_dim, self.device)[name]

    def finish(self) -> dict:
        """The end-of-run probes (CLP, linear probes), summary.json and the figures; under DDP rank 0
        does them on all the data while the others wait, then every rank returns the summary."""
        if self.ranks.active and not self.ranks.main:
            self.ranks.barrier()
            return json.loads((self.out / "summary.json").read_text())
        summary = self._finish()
        self.ranks.barrier()
        return summary

    def _finish(self) -> dict:
        cfg = self.cfg
        pen = self.model.penultimate_name
        y_sup = {s: self.y[s].cpu().numpy() for s in self.y}
        y_orig = {s: self.y_orig[s].cpu().numpy() for s in self.y}
        feats = {s: self.features(s, pen) for s in ("train", "test")}
        t0 = time.perf_counter()
        clp_acc, pictures = clp(feats["train"], y_sup["train"], y_orig["train"], feats["test"], y_sup["test"],
                                y_orig["test"], embedding=cfg.clp_embed, seed=cfg.seed, device=self.device)
        lin_acc = linear_probe(feats["train"], y_orig["train"], feats["test"], y_orig["test"], seed=cfg.seed,
                               device=self.device)
        per_layer = {}
        for name in self.layers:
            f = feats if name == pen else {s: self.features(s, name) for s in ("train", "test")}
            per_layer[name] = linear_probe(f["train"], y_orig["train"], f["test"], y_orig["test"], seed=cfg.seed,
                                           device=self.device)
        probe_seconds = time.perf_counter() - t0
        evaluated = [r for r in self.history if "layers" in r]
        it = next((r["epoch"] for r in self.history if r["epoch"] > 0 and r["train_acc"] >= cfg.it_threshold), None)
        last = self.history[-1]
        summary = {
            "command": " ".join(sys.argv) if sys.argv else "",
            "config": asdict(cfg),
            "train_accuracy": last["train_acc"],
            "test_accuracy": last["test_acc"],
            "clp_accuracy": clp_acc,
            "clp_embedding": cfg.clp_embed,
            "linear_probe_accuracy": lin_acc,
            "linear_probe_per_layer": per_layer,
            "interpolation_epoch": it,
            "terminal_phase_epochs": 0 if it is None else cfg.epochs - it,
            "num_train_classes": self.num_train_classes,
            "num_original_classes": self.num_original,
            "final_metrics": evaluated[-1]["layers"] if evaluated else {},
            "initial_logits_norm": (evaluated[0]["layers"].get(pen, {}).get("train", {}).get("logits_norm")
                                    if evaluated else None),
            "mean_epoch_seconds": float(np.mean(self.epoch_seconds)) if self.epoch_seconds else None,
            "probe_seconds": probe_seconds,
            "device": str(self.device),
            "world_size": self.ranks.world,
        }
        _atomic_text(json.dumps(finite(summary), indent=1), self.out / "summary.json", "summary")
        self._figures(evaluated, pictures)
        clp_text = "n/a (no training class holds two original classes)" if clp_acc is None else f"{clp_acc:.4f}"
        print(f"CLP accuracy on the {self.num_original} original classes: {clp_text}   "
              f"linear probe on the true original labels: {lin_acc:.4f}   "
              f"train acc {last['train_acc']:.4f}  test acc {last['test_acc']:.4f}  "
              f"interpolation epoch {it}", flush=True)
        return summary

    def _figures(self, evaluated: list[dict], pictures: dict) -> None:
        fig_dir = self.out / "figures"
        pen = self.model.penultimate_name
        distances = {int(p.stem.split("_")[1]): np.load(p)
                     for p in sorted((self.out / "class_distance").glob("epoch_[0-9][0-9][0-9].npy"))}
        if self.distance_epochs:
            distances = {e: d for e, d in distances.items() if e in self.distance_epochs}
        if distances:
            figures.class_distance_heatmaps(distances, fig_dir / "class_distance.png")
        relabelled = {int(p.stem.split("_")[1]): np.load(p)
                      for p in sorted((self.out / "class_distance").glob("epoch_[0-9][0-9][0-9]_train_labels.npy"))}
        if self.distance_epochs:
            relabelled = {e: d for e, d in relabelled.items() if e in self.distance_epochs}
        if relabelled:
            figures.class_distance_heatmaps(
                relabelled, fig_dir / "class_distance_train_labels.png",
                title=f"class distance D ({self.num_train_classes} training labels, penultimate layer, train)")
        if evaluated:
            # the penultimate features, or the deepest probed layer where --layers leaves them out
            order = list(dict(self.model.named_modules()))
            shown = pen if pen in self.layers else max(self.layers, key=order.index)
            figures.nc_curves(evaluated, shown, fig_dir / "nc_curves.png")
            figures.mismatch_per_layer(evaluated, self.layers, fig_dir / "ncc_mismatch_per_layer.png")
        figures.superclass_embeddings(pictures, fig_dir / f"{self.cfg.clp_embed}_superclasses.png")


def train(cfg: Config) -> dict:
    """Run (or resume) a training run; returns the summary written to ``cfg.out / summary.json``."""
    return Trainer(cfg).run()
