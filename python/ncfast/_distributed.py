"""This process's place among torch.distributed processes, and the few collectives ncfast needs.

One helper for LayerProbe, ``python -m ncfast.measure`` and the trainer: on one process (or when
torch.distributed is not initialised, or with ``process_group=False``) it is rank 0 of 1 and every
operation is the identity. ``init_distributed`` joins torchrun's process group for the two commands.
"""

from __future__ import annotations

import os

import torch


class Ranks:
    """The processes of a torch.distributed group (None: the default group; False: this process alone)."""

    def __init__(self, process_group=None):
        import torch.distributed as dist

        self.dist = dist
        self.group = None if process_group in (None, False) else process_group
        self.active = (
            process_group is not False
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.group) > 1
        )
        self.rank = dist.get_rank(self.group) if self.active else 0
        self.world = dist.get_world_size(self.group) if self.active else 1
        # nccl reduces CUDA tensors only: counts kept on the CPU travel through the rank's GPU
        self.device = None
        if self.active and dist.get_backend(self.group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def main(self) -> bool:
        return self.rank == 0

    def reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The elementwise sum (or max) of ``t`` over the processes, on ``t``'s device and dtype."""
        if not self.active:
            return t
        work = t.to(self.device or t.device).clone()
        ops = {"sum": self.dist.ReduceOp.SUM, "max": self.dist.ReduceOp.MAX}
        self.dist.all_reduce(work, op=ops[op], group=self.group)
        return work.to(t.device)

    def scalars(self, *values: float) -> list[float]:
        """The sums over the processes of a few numbers (float64)."""
        return self.reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier(group=self.group)

    def mine(self, items: list) -> list:
        """This process's share of a list dealt in turn: items rank, rank + world, ..."""
        return items[self.rank :: self.world]

    def part(self, n: int) -> slice:
        """This process's contiguous share of n rows (sizes differ by at most one)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)


def launched_by_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (its environment names a rank and a world)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_distributed(device: str = "auto") -> str:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) unless already joined; returns the
    device this rank trains on (cuda:LOCAL_RANK on a GPU machine)."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        device = device if ":" in device else f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=not agent and rank == 0
        )
        # a restarted attempt (torchrun --max-restarts) finds the previous attempt's keys in the same
        # store; its own prefix keeps the ranks from connecting to the dead processes' addresses
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            store=dist.PrefixStore(f"ncfast/attempt{attempt}", store),
            rank=rank,
            world_size=world,
        )
    return device
