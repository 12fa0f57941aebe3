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
import dataclasses
import sys

from .trainer import (
    Config,
    field_type,
    flag_of,
    init_distributed,
    is_flag,
    launched_by_torchrun,
    shown,
    train,
    value_type,
)


def parse_args(argv=None) -> Config:
    """The Config of a command line. Every field of Config is a flag (``trainer.option``); a value the
    Config refuses is argparse's one-line error, exit status 2."""
    p = argparse.ArgumentParser(
        prog="python -m ncfast.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    flags = [f for f in dataclasses.fields(Config) if is_flag(f)]
    for f in flags:
        meta = f.metadata
        into = p
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = p.add_mutually_exclusive_group()
            into = groups[meta["group"]]
        if isinstance(f.default, bool):  # the flag sets the value that is not the default
            into.add_argument(
                flag_of(f),
                dest=f.name,
                action="store_false" if f.default else "store_true",
                default=f.default,
                help=meta.get("help"),
            )
            continue
        text = meta.get("help") or ""
        if f.default is not None:  # a value: --help shows it
            text = f"{text} (default: {shown(f.default)})".lstrip()
        into.add_argument(
            flag_of(f),
            dest=f.name,
            type=meta.get("parse") or value_type(field_type(Config, f)),
            default=f.default,
            choices=meta.get("choices"),
            metavar=meta.get("metavar"),
            help=text,
        )
    a = p.parse_args(argv)
    try:
        return Config(**{f.name: getattr(a, f.name) for f in flags})
    except ValueError as e:
        p.error(str(e))


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
