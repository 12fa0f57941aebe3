"""python -m ncfast.train: train a network on original, coarse, fine or randomly coarsened labels and
measure Neural Collapse at every probed layer as it trains (papers 000, 002, 003).

Examples::

    python -m ncfast.train                                   # ResNet-18 on digits, original labels
    python -m ncfast.train --arch resnet18 --coarse 5        # coarse digits: CLP vs linear probe
    python -m ncfast.train --dataset fashion-mnist --coarse 5 --epochs 50
    python -m ncfast.train --dataset cifar10 --data ~/data --download --coarse 5 --epochs 350
    python -m ncfast.train --dataset gmm --arch mlp --coarse 4

Writes to --out: metrics.jsonl (one line per evaluated epoch), class_distance/epoch_NNN.npy,
summary.json, figures/ and checkpoint.pt (atomic, each epoch; --resume continues from it).

Under torchrun the same command trains with DistributedDataParallel (gloo on CPU, nccl on CUDA):

    torchrun --nproc_per_node 2 -m ncfast.train --arch mlp --epochs 10 --resume
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \
        -m ncfast.train --dataset cifar10 --data ~/data --resume      # each node, its own --node_rank

Every rank measures its shard of each split and the statistics are merged exactly; rank 0 writes the
outputs and checkpoints. With --resume (and torchrun --max-restarts N) a run whose rank dies restarts
from the last checkpoint.
"""
from __future__ import annotations

import argparse
import math
import sys

from .data import DATASETS
from .models import ARCH_NAMES, INITS, MAX_WIDTH, resolve_arch
from .probes import EMBEDDINGS
from .trainer import (LEARNING_RATES, LOSSES, WEIGHT_DECAYS, Config, check_config, init_distributed,
                      launched_by_torchrun, train)


def _coarse(text: str):
    """--coarse K (an integer) or --coarse official."""
    if text == "official":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of super-classes K or 'official', got {text!r}") from None


def _epochs(text: str) -> list[int]:
    """--distance-epochs 0,10,60."""
    try:
        epochs = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        epochs = []
    if not epochs:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs such as 0,10,60, got {text!r}")
    return epochs


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(prog="python -m ncfast.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCH_NAMES, default="resnet18")
    p.add_argument("--depth", type=int, default=None,
                   help="ResNet 18 / 34, VGG 11 / 13 / 16 / 19, DenseNet 121 / 169 / 201 (overrides the --arch "
                        "name's); the MLP's number of hidden layers (default 2)")
    p.add_argument("--width", type=int, default=None,
                   help="base channels of ResNet / VGG (default 64), DenseNet's growth rate (32), the MLP's "
                        "hidden units (512)")
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits ships with scikit-learn (default); fashion-mnist reads the IDX files from --data "
                        "(default /usr/share/datasets/fashion-mnist, Debian package dataset-fashion-mnist)")
    p.add_argument("--data", default=None, help="directory of the data files")
    p.add_argument("--download", action="store_true", help="CIFAR: download into --data (MD5 checked) if missing")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--coarse", type=_coarse, metavar="K",
                        help="train on y mod K (paper 000 eq. 4); 'official': CIFAR-100's 20 super-classes")
    labels.add_argument("--fine", action="store_true", help="train on every class split in two (eq. 5)")
    labels.add_argument("--random-coarse", type=int, metavar="K", help="coarse labels after a seeded class shuffle")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on N training samples drawn with --seed (paper 002's 2,000-sample CIFAR-100)")
    p.add_argument("--no-augment", action="store_true",
                   help="train on the images as they are: no random crops or flips (Papyan et al.'s protocol)")
    p.add_argument("--lr", type=float, default=0.01,
                   help=f"SGD learning rate (the papers sweep {LEARNING_RATES}; default paper 000 config #1)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4,
                   help=f"(the papers sweep {WEIGHT_DECAYS}; default paper 000 config #1)")
    p.add_argument("--schedule", choices=("cosine", "step"), default="cosine")
    p.add_argument("--metrics-every", type=int, default=5,
                   help="measure every N epochs (and epochs 0, last, the interpolation epoch and --distance-epochs)")
    p.add_argument("--distance-epochs", type=_epochs, default=None, metavar="E1,E2,...",
                   help="epochs measured whatever --metrics-every says; the class-distance figure shows them")
    p.add_argument("--layers", default=None,
                   help="comma-separated module names to probe (default: the model's stages and pooled features)")
    p.add_argument("--logit-scale", type=float, default=1.0, metavar="T",
                   help="paper 002's temperature T: the loss sees T * logits (T = 100 means logits x 100); a "
                        "greater T gives a greater initial logits norm and more rank collapse. The network's "
                        "output itself is not scaled")
    p.add_argument("--loss", choices=LOSSES, default="ce",
                   help="ce: cross-entropy; mse: paper 002's MSE between softmax(T z) and the one-hot label")
    p.add_argument("--init", choices=INITS, default="default",
                   help="initial conv / linear weights: PyTorch's default, or kaiming (He normal, zero biases)")
    p.add_argument("--init-scale", type=float, default=1.0,
                   help="factor on the initial conv / linear weights (after --init)")
    p.add_argument("--output-norm", choices=("layernorm",), default=None,
                   help="affine-free LayerNorm on the penultimate features (paper 002)")
    p.add_argument("--svsl-alpha", type=float, default=0.0,
                   help="alpha of paper 003's SVSL (def. 10: eta = alpha / (C (k+1-gamma) n_c), C the number of "
                        "training classes); 0: off. Its Table 2 values mean the same here: 1e-5 from Layer 1 on "
                        "MNIST / Fashion-MNIST (--arch resnet18 --svsl-from layer1), 4e-6 from AvgPool on "
                        "CIFAR-10 (--arch resnet18 --svsl-from pool)")
    p.add_argument("--svsl-from", default=None, metavar="LAYER",
                   help="paper 003's gamma: the probed layer (a --layers name) SVSL starts at. SVSL covers the "
                        "probed layers from it on, in model order, and the output layer: the logits the loss "
                        "sees (after --logit-scale). Default: the first probed layer")
    p.add_argument("--clp-embed", choices=EMBEDDINGS, default="tsne", help="reduction before CLP's k-means")
    p.add_argument("--it-threshold", type=float, default=0.995,
                   help="train accuracy that marks the interpolation threshold")
    p.add_argument("--max-dim", type=int, default=1024,
                   help="layers with more flattened features get their D x D metrics (nc1, vci, rank, ...) "
                        "from channel-pooled features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="runs/latest")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error("--epochs must be >= 1")
    if a.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if a.metrics_every < 1:
        p.error("--metrics-every must be >= 1")
    if not (math.isfinite(a.logit_scale) and a.logit_scale > 0):
        p.error("--logit-scale must be a finite number > 0")
    if not (math.isfinite(a.svsl_alpha) and a.svsl_alpha >= 0):
        p.error("--svsl-alpha must be a finite number >= 0")
    if a.width is not None and not 1 <= a.width <= MAX_WIDTH:
        p.error(f"--width must be between 1 and {MAX_WIDTH:,}")
    if a.depth is not None:
        try:  # the MLP takes 1 to 10,000 hidden layers, the other families their listed depths
            resolve_arch(a.arch, a.depth)
        except ValueError as e:
            p.error(f"--depth {a.depth}: {str(e).removeprefix('depth: ')}")
    if a.layers is not None and not any(s.strip() for s in a.layers.split(",")):
        p.error(f"--layers: expected comma-separated module names, got {a.layers!r}")
    if isinstance(a.coarse, int) and a.coarse < 2:
        p.error("--coarse must be a number of super-classes >= 2, or 'official'")
    if a.random_coarse is not None and a.random_coarse < 2:
        p.error("--random-coarse must be a number of super-classes >= 2")
    if a.train_subset is not None and a.train_subset < 1:
        p.error("--train-subset must be >= 1")
    if a.max_dim < 1:
        p.error("--max-dim must be >= 1")
    cfg = Config(arch=a.arch, dataset=a.dataset, data=a.data, download=a.download, coarse=a.coarse, fine=a.fine,
                  random_coarse=a.random_coarse, epochs=a.epochs, batch_size=a.batch_size, augment=not a.no_augment,
                  train_subset=a.train_subset, lr=a.lr,
                  momentum=a.momentum, weight_decay=a.weight_decay, schedule=a.schedule,
                  metrics_every=a.metrics_every, layers=None if a.layers is None else
                  [s.strip() for s in a.layers.split(",") if s.strip()], logit_scale=a.logit_scale,
                  init_scale=a.init_scale, output_norm=a.output_norm, svsl_alpha=a.svsl_alpha,
                  svsl_from=a.svsl_from, clp_embed=a.clp_embed, it_threshold=a.it_threshold, width=a.width,
                  depth=a.depth, init=a.init, loss=a.loss, distance_epochs=a.distance_epochs,
                  max_dim=a.max_dim,
                  seed=a.seed, device=a.device, out=a.out, resume=a.resume, progress=not a.no_progress)
    try:  # --lr, --momentum, --weight-decay, --it-threshold, --init-scale, --seed: the trainer's own checks
        check_config(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    launched = launched_by_torchrun()
    try:
        if launched:  # torchrun --nproc_per_node N -m ncfast.train ...: DistributedDataParallel
            cfg.device = init_distributed(cfg.device)
        train(cfg)
    except (OSError, ValueError, RuntimeError) as e:  # OSError: FileNotFoundError, and any file the run cannot use
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if launched:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
