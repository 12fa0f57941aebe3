"""The reference trainer behind ``python -m ncfast.train``: train a network on (transformed) labels and
measure its representations with ncfast every few epochs (``Config`` holds the options).

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

import argparse
import functools
import hashlib
import json
import math
import numbers
import os
import pickle
import sys
import time
import types
import typing
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._distributed import Ranks, init_distributed, launched_by_torchrun  # noqa: F401 (re-exported)
from .._validation import available_bytes
from ..labels import coarse_labels, fine_labels, random_coarse_labels
from ..losses import svsl_loss
from ..probe import LayerProbe, channel_pool, flatten, shard_indices
from . import _faults, figures
from ._files import atomic_write
from .data import DATASETS, augment_batch, batches, load_dataset
from .models import ARCH_NAMES, INITS, MAX_WIDTH, build_model, footprint, logits_for_loss, resolve_arch
from .probes import EMBEDDINGS, clp, linear_probe

LEARNING_RATES = (0.1, 0.01, 0.001)
LOSSES = ("ce", "mse")
SCHEDULES = ("cosine", "step")
WEIGHT_DECAYS = (5e-3, 5e-4, 5e-5)
SEED_MAX = 2**32 - 1  # the largest seed every generator of a run takes (scikit-learn's random_state's)


# ----------------------------------------------------------------------------- fields that are flags
# ``option`` declares a dataclass field with its default and the metadata ``python -m ncfast.train`` builds
# the field's flag from; ``check_fields`` checks every field's value against its type and choices; the
# ``*_arg`` functions read the flags whose text is not a single int, float or string.
def option(
    default,
    help: str = "",
    *,
    choices=None,
    metavar: str | None = None,
    parse=None,
    flag: str | None = None,
    group: str | None = None,
    cli: bool = True,
):
    """A dataclass field with ``default`` and, in its metadata, what its command-line flag needs.

    Args:
        help: the flag's help text; ``--help`` adds the default where it is a value.
        choices: the values the field takes (on the command line and in the dataclass).
        metavar: the value's name in ``--help`` (argparse's default: the name in capitals).
        parse: a function from the flag's text to the value, raising ``argparse.ArgumentTypeError``; an int,
            float or str field (or one of these or None) reads its text with its type.
        flag: the spelling where it is not ``--`` and the name with ``-`` for ``_``. A bool field's flag sets
            the value that is not its default: a field True by default is turned off (``--no-augment``).
        group: fields of one group are mutually exclusive on the command line.
        cli: False for a field that is no flag.
    """
    metadata = {
        "help": help,
        "choices": choices,
        "metavar": metavar,
        "parse": parse,
        "flag": flag,
        "group": group,
        "cli": cli,
    }
    return field(default=default, metadata=metadata)


def flag_of(f: Field) -> str:
    """The command line's spelling of a field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def is_flag(f: Field) -> bool:
    """Whether a field is a command-line flag (``option(..., cli=False)``: not)."""
    return f.metadata.get("cli", True)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def field_type(cls, f: Field):
    """The field's annotation as a type (``int | None``, ``list[str] | None``, ...)."""
    return _hints(cls)[f.name]


def value_type(tp):
    """The function that reads a flag's text for a field of type ``tp`` (int, float or str, alone or with
    None), or None for any other type (whose field names its own ``parse``)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    return args[0] if len(args) == 1 and args[0] in (int, float, str) else None


def shown(value) -> str:
    """A default as it is written on the command line."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _matches(value, tp) -> bool:
    if _is_union(tp):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    return isinstance(value, tp)


_NAMES = {
    bool: ("True or False", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    type(None): ("None", "None"),
}


def _describe(tp, plural: bool = False) -> str:
    if _is_union(tp):
        parts = [_describe(a, plural) for a in typing.get_args(tp)]
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if typing.get_origin(tp) is list:
        return "a list of " + _describe(typing.get_args(tp)[0], plural=True)
    return _NAMES[tp][plural] if tp in _NAMES else getattr(tp, "__name__", str(tp))


def check_fields(obj) -> None:
    """Every field of the dataclass instance ``obj`` holds a value of its type (an int passes for a float, a
    tuple for a list) and, where the field lists choices, one of them (or its default None): else a
    ValueError naming the flag."""
    cls = type(obj)
    for f in fields(obj):
        value, tp = getattr(obj, f.name), field_type(cls, f)
        if not _matches(value, tp):
            raise ValueError(f"{flag_of(f)}: expected {_describe(tp)}, got {value!r}")
        choices = f.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ValueError(f"{flag_of(f)}: expected one of {', '.join(map(str, choices))}, got {value!r}")


# ------------------------------------------------------------------- flags of their own syntax
def coarse_arg(text: str) -> int | str:
    """--coarse K (an integer) or --coarse official."""
    if text == "official":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of super-classes K or 'official', got {text!r}") from None


def epochs_arg(text: str) -> list[int]:
    """--distance-epochs 0,10,60."""
    try:
        epochs = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        epochs = []
    if not epochs:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs such as 0,10,60, got {text!r}")
    return epochs


def names_arg(text: str) -> list[str]:
    """--layers layer1,layer2: names stripped of surrounding spaces."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated module names, got {text!r}")
    return names


@dataclass
class Config:
    """One training run. Every field is a flag of ``python -m ncfast.train``: ``--`` and the name with ``-`` for
    ``_`` unless its metadata names another spelling (``option``); its help, choices and parsing are in that
    metadata, its default here only.

    A Config is validated when it is made (``Config(...)``, ``dataclasses.replace``; ``validate``): a bad
    value is a ValueError that names the flag. What needs the data, the model or the device (--coarse K
    beyond the classes, --layers / --svsl-from names, --device, memory) ``Trainer`` checks."""

    arch: str = option("resnet18", "network architecture (a family's name, or a deeper sibling's)", choices=ARCH_NAMES)
    depth: int | None = option(
        None,
        "ResNet 18 / 34, VGG 11 / 13 / 16 / 19, DenseNet 121 / 169 / 201 (overrides "
        "the --arch name's); the MLP's number of hidden layers (default 2)",
    )
    width: int | None = option(
        None, "base channels of ResNet / VGG (default 64), DenseNet's growth rate (32), the MLP's hidden units (512)"
    )
    dataset: str = option(
        "digits",
        "digits ships with scikit-learn; fashion-mnist reads the IDX files "
        "from --data (default /usr/share/datasets/fashion-mnist, Debian package "
        "dataset-fashion-mnist)",
        choices=DATASETS,
    )
    data: str | None = option(None, "directory of the data files")
    download: bool = option(False, "CIFAR: download into --data (MD5 checked) if missing")
    # K, or "official": the data set's own super-classes (CIFAR-100's 20)
    coarse: int | str | None = option(
        None,
        "train on y mod K (paper 000 eq. 4); 'official': CIFAR-100's 20 super-classes",
        metavar="K",
        parse=coarse_arg,
        group="labels",
    )
    fine: bool = option(False, "train on every class split in two (eq. 5)", group="labels")
    random_coarse: int | None = option(None, "coarse labels after a seeded class shuffle", metavar="K", group="labels")
    epochs: int = option(60, "training epochs")
    batch_size: int = option(128, "samples per SGD step (all ranks' together under torchrun)")
    train_subset: int | None = option(
        None, "train on N training samples drawn with --seed (paper 002's 2,000-sample CIFAR-100)", metavar="N"
    )
    augment: bool = option(
        True,
        "train on the images as they are: no random crops or flips (Papyan et al.'s protocol)",
        flag="--no-augment",
    )
    lr: float = option(
        0.01, f"SGD learning rate (the papers sweep {LEARNING_RATES}; the default is paper 000's config #1)"
    )
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(
        5e-4, f"SGD weight decay (the papers sweep {WEIGHT_DECAYS}; the default is paper 000's config #1)"
    )
    schedule: str = option(
        "cosine",
        "learning rate over the epochs: cosine annealing to 0, or step (/ 10 at 1/2 and 3/4 of --epochs)",
        choices=SCHEDULES,
    )
    metrics_every: int = option(
        5, "measure every N epochs (and epochs 0, last, the interpolation epoch and --distance-epochs)"
    )
    # option() returns a dataclasses.field: no default list is shared between Configs
    distance_epochs: list[int] | None = option(  # noqa: RUF009
        None,
        "epochs measured whatever --metrics-every says; the class-distance figure shows them",
        metavar="E1,E2,...",
        parse=epochs_arg,
    )
    layers: list[str] | None = option(  # noqa: RUF009
        None, "comma-separated module names to probe (default: the model's stages and pooled features)", parse=names_arg
    )
    logit_scale: float = option(
        1.0,
        "paper 002's temperature T: the loss sees T * logits (T = 100 means logits x "
        "100); a greater T gives a greater initial logits norm and more rank "
        "collapse. The network's output itself is not scaled",
        metavar="T",
    )
    loss: str = option(
        "ce", "ce: cross-entropy; mse: paper 002's MSE between softmax(T z) and the one-hot label", choices=LOSSES
    )
    init: str = option(
        "default",
        "initial conv / linear weights: PyTorch's default, or kaiming (He normal, zero biases)",
        choices=INITS,
    )
    init_scale: float = option(1.0, "factor on the initial conv / linear weights (after --init)")
    output_norm: str | None = option(
        None, "affine-free LayerNorm on the penultimate features (paper 002)", choices=("layernorm",)
    )
    svsl_alpha: float = option(
        0.0,
        "alpha of paper 003's SVSL (def. 10: eta = alpha / (C (k+1-gamma) n_c), C the "
        "number of training classes); 0: off. Its Table 2 values mean the same here: "
        "1e-5 from Layer 1 on MNIST / Fashion-MNIST (--arch resnet18 --svsl-from "
        "layer1), 4e-6 from AvgPool on CIFAR-10 (--arch resnet18 --svsl-from pool)",
    )
    svsl_from: str | None = option(
        None,
        "paper 003's gamma: the probed layer (a --layers name) SVSL starts at. "
        "SVSL covers the probed layers from it on, in model order, and the output "
        "layer: the logits the loss sees (after --logit-scale). Default: the first "
        "probed layer",
        metavar="LAYER",
    )
    clp_embed: str = option("tsne", "reduction before CLP's k-means", choices=EMBEDDINGS)
    it_threshold: float = option(0.995, "train accuracy that marks the interpolation threshold")
    # wider layers: D x D metrics on channel-pooled features (eigh of 4096^2 x 3 per split is minutes)
    max_dim: int = option(
        1024,
        "layers with more flattened features get their D x D metrics (nc1, vci, rank, ...) "
        "from channel-pooled features",
    )
    seed: int = option(0, f"seed of every random draw of the run, in [0, {SEED_MAX}]")
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    out: str = option("runs/latest", "output folder")
    resume: bool = option(False, "continue from --out/checkpoint.pt")
    progress: bool = option(True, "no per-epoch progress bar", flag="--no-progress")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (``Trainer`` calls it again for fields assigned after the Config was made): a
        ValueError naming the flag as the command line spells it."""
        check_fields(self)  # each field's type, and its choices
        if self.depth is not None:
            try:  # the MLP takes 1 to 10,000 hidden layers, the other families their listed depths
                resolve_arch(self.arch, self.depth)
            except ValueError as e:
                raise ValueError(f"--depth {self.depth}: {str(e).removeprefix('depth: ')}") from None
        if self.width is not None and not 1 <= self.width <= MAX_WIDTH:
            raise ValueError(f"--width must be between 1 and {MAX_WIDTH:,}, got {self.width}")
        if isinstance(self.coarse, str):
            if self.coarse != "official":
                raise ValueError(f"--coarse: a number of super-classes K or 'official', got {self.coarse!r}")
        elif self.coarse is not None and self.coarse < 2:
            raise ValueError(f"--coarse must be a number of super-classes >= 2, or 'official', got {self.coarse}")
        if self.random_coarse is not None and self.random_coarse < 2:
            raise ValueError(f"--random-coarse must be a number of super-classes >= 2, got {self.random_coarse}")
        if (self.coarse is not None) + self.fine + (self.random_coarse is not None) > 1:
            raise ValueError("--coarse, --fine and --random-coarse: choose at most one")
        for flag, value in (
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--metrics-every", self.metrics_every),
            ("--max-dim", self.max_dim),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"--train-subset must be >= 1, got {self.train_subset}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"--momentum must be a finite number in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.distance_epochs is not None and any(not 0 <= e <= self.epochs for e in self.distance_epochs):
            raise ValueError(
                f"--distance-epochs: must lie in [0, --epochs = {self.epochs}], got {self.distance_epochs}"
            )
        if self.layers is not None and not (self.layers and all(name.strip() for name in self.layers)):
            raise ValueError(f"--layers: expected comma-separated module names, got {self.layers!r}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"--logit-scale must be a finite number > 0, got {self.logit_scale}")
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"--init-scale must be a finite number > 0, got {self.init_scale}")
        if not (math.isfinite(self.svsl_alpha) and self.svsl_alpha >= 0):
            raise ValueError(f"--svsl-alpha must be a finite number >= 0, got {self.svsl_alpha}")
        if self.svsl_from is not None and not self.svsl_from.strip():
            raise ValueError(f"--svsl-from: expected a probed layer's name, got {self.svsl_from!r}")
        if not 0 < self.it_threshold <= 1:
            raise ValueError(f"--it-threshold must be a train accuracy in (0, 1], got {self.it_threshold}")
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"--seed must be in [0, {SEED_MAX}] (2^32 - 1), got {self.seed}")


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
            raise ValueError(
                f"--device {name}: CUDA is not available here (no CUDA build of torch, or no GPU "
                f"visible); use --device cpu"
            )
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


def _gib(n: float) -> str:
    v = n / 2**30
    return f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def check_fits(
    cfg: Config, num_classes: int, in_channels: int, input_size, n_train: int, device, world: int = 1
) -> None:
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
    params, floats = footprint(
        cfg.arch, num_classes, in_channels, input_size, output_norm=cfg.output_norm, depth=cfg.depth, width=cfg.width
    )
    model_bytes = params * 4 * 4
    if model_bytes > free:
        flags = " ".join(f"--{k} {v}" for k, v in (("width", cfg.width), ("depth", cfg.depth)) if v is not None)
        raise ValueError(
            f"{flags or '--arch ' + cfg.arch}: {cfg.arch} has {params:.2g} parameters, "
            f"{_gib(model_bytes)} GiB with gradients, momentum and a checkpoint copy, more than the "
            f"{_gib(free)} GiB free on {torch.device(device)}; lower --width (or --depth)"
        )
    batch = -(-min(cfg.batch_size, n_train) // max(1, world))
    batch_bytes = batch * floats * 4
    if model_bytes + batch_bytes > free:
        raise ValueError(
            f"--batch-size {cfg.batch_size}: a batch of {batch:,} samples x {floats:,} activation floats "
            f"per sample of {cfg.arch} needs {_gib(batch_bytes)} GiB besides the model's "
            f"{_gib(model_bytes)} GiB, more than the {_gib(free)} GiB free on {torch.device(device)}; "
            f"lower --batch-size (or --width)"
        )


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
            model(x[lo : lo + batch].to(device))
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


def transform_labels(
    cfg: Config, y_train: torch.Tensor, y_test: torch.Tensor, num_classes: int, coarse_of: torch.Tensor | None = None
):
    """(train labels, test labels, number of training classes) under --coarse / --fine / --random-coarse.

    ``--coarse official`` maps every class to the data set's own super-class ``coarse_of`` (CIFAR-100's
    20 super-classes of 5 classes each, paper 000 sec. 5). ``cfg`` is valid (``Config.validate``: at most one
    transform, K >= 2); what is checked here is what depends on the data."""
    if cfg.coarse == "official":
        if coarse_of is None:
            raise ValueError(
                f"--coarse official: the data set {cfg.dataset!r} has no official super-classes (cifar100 has 20)"
            )
        present = coarse_of[coarse_of >= 0]
        return coarse_of[y_train], coarse_of[y_test], int(present.max()) + 1
    if cfg.coarse is not None:
        if not 2 <= cfg.coarse <= num_classes:
            raise ValueError(
                f"--coarse: must be in [2, {num_classes}] (the metrics need 2 training classes), got {cfg.coarse}"
            )
        return coarse_labels(y_train, cfg.coarse), coarse_labels(y_test, cfg.coarse), cfg.coarse
    if cfg.random_coarse is not None:
        if not 2 <= cfg.random_coarse <= num_classes:
            raise ValueError(
                f"--random-coarse: must be in [2, {num_classes}] (the metrics need 2 training "
                f"classes), got {cfg.random_coarse}"
            )
        k = cfg.random_coarse
        return (
            random_coarse_labels(y_train, k, num_classes, seed=cfg.seed),
            random_coarse_labels(y_test, k, num_classes, seed=cfg.seed),
            k,
        )
    if cfg.fine:
        return (
            fine_labels(y_train, num_classes, seed=cfg.seed),
            fine_labels(y_test, num_classes, seed=cfg.seed + 1),
            2 * num_classes,
        )
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
        cfg.validate()  # again: fields may have been assigned since the Config was made
        self.ranks = Ranks()
        self.device = _device(cfg.device)
        if self.ranks.active and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        ds = load_dataset(cfg.dataset, cfg.data, download=cfg.download, seed=cfg.seed)
        self.ds = ds
        self.num_original = ds.num_classes
        y_tr, y_te, self.num_train_classes = transform_labels(
            cfg, ds.train_y, ds.test_y, ds.num_classes, coarse_of=ds.coarse_of
        )
        keep = _subset(ds.train_y.shape[0], cfg.train_subset, cfg.seed)
        if cfg.train_subset is not None and int(torch.unique(y_tr[keep]).numel()) < 2:
            raise ValueError(
                f"--train-subset {cfg.train_subset}: the samples drawn hold one training class; the "
                f"metrics need at least 2 (draw more samples, or another --seed)"
            )
        dev = self.device
        # the whole data set lives on the device: batches are index gathers, augmentation runs there too
        self.x = {"train": ds.train_x[keep].to(dev), "test": ds.test_x.to(dev)}
        self.y = {"train": y_tr[keep].to(dev), "test": y_te.to(dev)}
        self.y_orig = {"train": ds.train_y[keep].to(dev), "test": ds.test_y.to(dev)}
        image = ds.train_x.dim() == 4
        if cfg.arch != "mlp" and not image:
            raise ValueError(f"--arch {cfg.arch}: needs image data; {cfg.dataset} is flat (use --arch mlp)")
        self.distance_epochs = sorted(set(cfg.distance_epochs or ()))
        # sized on the meta device first: a model or batch that cannot fit is refused before it is allocated
        check_fits(
            cfg,
            self.num_train_classes,
            ds.train_x.shape[1],
            tuple(ds.train_x.shape[2:]) if image else None,
            self.x["train"].shape[0],
            dev,
            self.ranks.world,
        )
        self.model = build_model(
            cfg.arch,
            self.num_train_classes,
            ds.train_x.shape[1],
            tuple(ds.train_x.shape[2:]) if image else None,
            init_scale=cfg.init_scale,
            output_norm=cfg.output_norm,
            depth=cfg.depth,
            width=cfg.width,
            init=cfg.init,
        ).to(dev)
        self.layers = list(cfg.layers) if cfg.layers else list(self.model.default_probe_layers)
        modules = dict(self.model.named_modules())
        unknown = [name for name in self.layers if name not in modules]
        if unknown:
            raise ValueError(
                f"--layers: {unknown} are not modules of {cfg.arch}; it has {[n for n in modules if n][:40]}"
            )
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        if cfg.schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(1, cfg.epochs))
        else:  # "step", the usual step schedule: / 10 at 1/2 and 3/4 of training
            self.sched = torch.optim.lr_scheduler.MultiStepLR(
                self.opt, milestones=[max(1, cfg.epochs // 2), max(1, 3 * cfg.epochs // 4)], gamma=0.1
            )
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        height = ds.train_x.shape[2] if image else 0
        self.pad = 4 if height >= 28 else max(1, height // 8)  # 4 on 28 / 32 px, 1 on the 8 x 8 digits
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
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        self._fault = _faults.planned(self.ranks.rank)  # None unless a restart test asks (train/_faults.py)

    def _svsl_layers(self, modules: dict) -> list[str]:
        """The probed modules whose outputs SVSL covers, shallowest first: from --svsl-from (paper
        003's gamma; default the first probed layer) on, in the model's module order (the forward
        order of every ARCHS model). The output layer k, the scaled logits the loss sees, is added
        to them in ``train_epoch``; the head module itself is therefore left out. Empty when
        --svsl-alpha is 0."""
        cfg = self.cfg
        order = {name: i for i, name in enumerate(modules)}
        probed = sorted(self.layers, key=order.__getitem__)
        first = probed[0] if cfg.svsl_from is None else cfg.svsl_from
        if first not in probed:
            raise ValueError(
                f"--svsl-from: {first!r} is not a probed layer; the probed layers are {probed} "
                f"(add it to --layers to use another module)"
            )
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
            "config": asdict(self.cfg),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "gen": self.gen.get_state(),
            "history": self.history,
            "epoch_seconds": self.epoch_seconds,
            "measure_seconds": self.measure_seconds,
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
            detail = next(
                (ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("Unsupported")),
                str(e).strip().splitlines()[0] if str(e).strip() else "",
            )
            if "global" not in detail.lower():
                raise ValueError(
                    f"--resume: {path} is not a readable checkpoint ({detail}); delete it to start over"
                ) from None
            raise ValueError(
                f"--resume: {path} holds more than a checkpoint's tensors and plain values, so it "
                f"is not loaded (a pickle can run code): {detail}"
            ) from None
        except Exception as e:  # noqa: BLE001 - empty, truncated, garbage: one line, not a traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"--resume: {path} is not a readable checkpoint ({first}); delete it to start over"
            ) from None
        if not isinstance(state, dict):
            raise ValueError(f"--resume: {path} holds a {type(state).__name__}, not a checkpoint")
        missing = [k for k in ("epoch", "model", "opt", "sched", "gen", "history", "sha256") if k not in state]
        if missing:
            raise ValueError(f"--resume: {path} lacks {missing}; delete it to start over")
        if state["sha256"] != _digest({k: v for k, v in state.items() if k != "sha256"}):
            raise ValueError(
                f"--resume: {path} fails its integrity check (its contents no longer match the "
                f"SHA-256 saved with them: a damaged file); delete it to start over"
            )
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
        handles = [
            dict(model.named_modules())[name].register_forward_hook(
                lambda m, i, o, name=name: captured.__setitem__(name, o)
            )
            for name in self.svsl_layers
        ]
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
                        loss = loss + svsl_loss(layers, yb, alpha=cfg.svsl_alpha, num_classes=self.num_train_classes)
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
        return [(x[lo : lo + batch], y[lo : lo + batch], yo[lo : lo + batch]) for lo in range(0, x.shape[0], batch)]

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
            probe = LayerProbe(
                self.model,
                self.layers,
                self.num_train_classes,
                head=self.model.head if pen else None,
                penultimate=pen,
                num_original_classes=self.num_original,
                class_counts=self.counts[split],
                max_dim=self.cfg.max_dim,
                logit_scale=self.logit_scale,
            )
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
            raise ValueError(
                f"--out {self.out}: could not create the output folder {e.filename or folder}: {e.strerror or e}"
            ) from None
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
            scheduled = (
                epoch > 0
                and record["train_acc"] >= cfg.it_threshold
                and not any(r["epoch"] > 0 and r["train_acc"] >= cfg.it_threshold for r in self.history)
            )
        if scheduled:
            t0 = time.perf_counter()
            record["layers"], distances, train_label_distance, accuracy = self.measure()
            # beside the record, not in it: metrics.jsonl holds the numbers a rerun reproduces
            self.measure_seconds[epoch] = time.perf_counter() - t0
            record["train_acc"], record["test_acc"] = accuracy["train"], accuracy["test"]
            pen = self.model.penultimate_name
            folder = self.out / "class_distance"
            if main and distances.get((pen, "train")) is not None:
                _atomic_npy(
                    folder / f"epoch_{epoch:03d}.npy", "class-distance matrix", distances[(pen, "train")].cpu().numpy()
                )
            if main and train_label_distance is not None:
                # over the training labels: with --fine the 2C x 2C matrix of paper 000 fig. 15
                _atomic_npy(
                    folder / f"epoch_{epoch:03d}_train_labels.npy",
                    "class-distance matrix",
                    train_label_distance.cpu().numpy(),
                )
            # every probed layer and split, original labels: arrays named "<layer>/<split>"
            if main:
                _atomic_npy(
                    folder / f"epoch_{epoch:03d}_layers.npz",
                    "class-distance matrices",
                    **{f"{name}/{split}": d.cpu().numpy() for (name, split), d in distances.items() if d is not None},
                )
            self.on_measured(record)
        self.history.append(record)
        line = (
            f"epoch {epoch:3d}  loss {loss:.4f}  train acc {record['train_acc']:.4f}  test acc {record['test_acc']:.4f}"
        )
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
        rows = [
            {
                **{k: r[k] for k in keys},
                "seconds": seconds[r["epoch"] - 1] if 0 < r["epoch"] <= len(seconds) else None,
                "measure_seconds": self.measure_seconds.get(r["epoch"]),
            }
            for r in self.history
        ]
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
        clp_acc, pictures = clp(
            feats["train"],
            y_sup["train"],
            y_orig["train"],
            feats["test"],
            y_sup["test"],
            y_orig["test"],
            embedding=cfg.clp_embed,
            seed=cfg.seed,
            device=self.device,
        )
        lin_acc = linear_probe(
            feats["train"], y_orig["train"], feats["test"], y_orig["test"], seed=cfg.seed, device=self.device
        )
        per_layer = {}
        for name in self.layers:
            f = feats if name == pen else {s: self.features(s, name) for s in ("train", "test")}
            per_layer[name] = linear_probe(
                f["train"], y_orig["train"], f["test"], y_orig["test"], seed=cfg.seed, device=self.device
            )
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
            "initial_logits_norm": (
                evaluated[0]["layers"].get(pen, {}).get("train", {}).get("logits_norm") if evaluated else None
            ),
            "mean_epoch_seconds": float(np.mean(self.epoch_seconds)) if self.epoch_seconds else None,
            "probe_seconds": probe_seconds,
            "device": str(self.device),
            "world_size": self.ranks.world,
        }
        _atomic_text(json.dumps(finite(summary), indent=1), self.out / "summary.json", "summary")
        self._figures(evaluated, pictures)
        clp_text = "n/a (no training class holds two original classes)" if clp_acc is None else f"{clp_acc:.4f}"
        print(
            f"CLP accuracy on the {self.num_original} original classes: {clp_text}   "
            f"linear probe on the true original labels: {lin_acc:.4f}   "
            f"train acc {last['train_acc']:.4f}  test acc {last['test_acc']:.4f}  "
            f"interpolation epoch {it}",
            flush=True,
        )
        return summary

    def _figures(self, evaluated: list[dict], pictures: dict) -> None:
        fig_dir = self.out / "figures"
        pen = self.model.penultimate_name
        distances = {
            int(p.stem.split("_")[1]): np.load(p)
            for p in sorted((self.out / "class_distance").glob("epoch_[0-9][0-9][0-9].npy"))
        }
        if self.distance_epochs:
            distances = {e: d for e, d in distances.items() if e in self.distance_epochs}
        if distances:
            figures.class_distance_heatmaps(distances, fig_dir / "class_distance.png")
        relabelled = {
            int(p.stem.split("_")[1]): np.load(p)
            for p in sorted((self.out / "class_distance").glob("epoch_[0-9][0-9][0-9]_train_labels.npy"))
        }
        if self.distance_epochs:
            relabelled = {e: d for e, d in relabelled.items() if e in self.distance_epochs}
        if relabelled:
            figures.class_distance_heatmaps(
                relabelled,
                fig_dir / "class_distance_train_labels.png",
                title=f"class distance D ({self.num_train_classes} training labels, penultimate layer, train)",
            )
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
