"""Files the trainer writes, written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path, what: str, write) -> None:
    """``write(tmp)`` to path + ".tmp", then renamed over path: a reader sees the old file or the new
    one, never part of one. A failed write (a full disk, ENOSPC; no permission; any OSError) removes
    the temp file, leaves the old file as it was and raises a ValueError naming the path, what it
    holds and the cause: "<path>: could not write the checkpoint: No space left on device"."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise ValueError(f"{path}: could not write the {what}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
