"""Fault injection for the restart tests (tests/test_train_distributed.py), and nothing else.

Switched on only by the environment variable NCFAST_FAULT = "rank:epoch:step": that rank kills
itself (SIGKILL) before that optimizer step (1-based) of that epoch (1-based), on torchrun's first
attempt only, so that the restarted attempt resumes from the last checkpoint. Unset, a training
step pays one comparison with None.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "NCFAST_FAULT"


def planned(rank: int) -> tuple[int, int] | None:
    """(epoch, step) at which this rank is to die, or None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    where, epoch, step = (int(v) for v in spec.split(":"))
    return (epoch, step) if where == rank else None


def before_step(plan: tuple[int, int] | None, epoch: int, step: int) -> None:
    """Die here if this is the planned (epoch, step)."""
    if plan == (epoch, step):
        os.kill(os.getpid(), signal.SIGKILL)
