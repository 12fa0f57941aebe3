"""Label transforms of paper 000: coarse (merged) and fine (split) classes."""

from __future__ import annotations

import numpy as np
import torch

from ._validation import as_tensor, check_labels


def _check(labels, num_classes=None) -> tuple[torch.Tensor, int]:
    """(labels as int64, num_classes) through the shared checks of every entry point."""
    y = as_tensor(labels, "labels")
    return check_labels(y, y.shape[0] if y.dim() == 1 else -1, y.device, num_classes)


def coarse_labels(labels, num_coarse: int) -> torch.Tensor:
    """y_coarse = y mod K (paper 000 eq. 4): classes c, c+K, c+2K, ... share a super-class."""
    y, _ = _check(labels)
    if int(num_coarse) < 1:
        raise ValueError(f"num_coarse: must be >= 1, got {num_coarse}")
    return y % int(num_coarse)


def fine_labels(labels, num_classes=None, *, seed: int = 0) -> torch.Tensor:
    """y_fine = y + beta * C with beta ~ Bernoulli(1/2) per sample (paper 000 eq. 5), seeded.

    Every class is split at random into two halves; the result has 2C classes and
    ``y_fine mod C`` recovers y.
    """
    y, c = _check(labels, num_classes)
    g = torch.Generator().manual_seed(int(seed))
    beta = torch.randint(0, 2, (y.numel(),), generator=g).to(y.device)
    return y + beta * c


def random_coarse_labels(labels, num_coarse: int, num_classes=None, *, seed: int = 0) -> torch.Tensor:
    """Coarse labels after a seeded shuffle of the class indices: perm[y] mod K.

    The super-classes then group arbitrary classes rather than every K-th one.
    """
    y, c = _check(labels, num_classes)
    if int(num_coarse) < 1:
        raise ValueError(f"num_coarse: must be >= 1, got {num_coarse}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(c, generator=g).to(y.device)
    return perm[y] % int(num_coarse)


def superclass_map(original, training, num_classes: int) -> np.ndarray:
    """The super-class (training label) of every original class, read off the data: s[c] is the
    one training label of the samples of original class c, -1 for a class with no sample.
    ``original`` and ``training`` are the two labels of the same samples; ``num_classes`` the
    number of original classes. ValueError when a class carries two training labels (fine
    labels are no coarsening)."""
    original, training = np.asarray(original), np.asarray(training)
    s = np.full(num_classes, -1, dtype=np.int64)
    for c in range(num_classes):
        labels = np.unique(training[original == c])
        if labels.size > 1:
            raise ValueError(
                f"labels: original class {c} carries {labels.size} training labels "
                f"{labels.tolist()}: not a coarse labelling"
            )
        if labels.size:
            s[c] = labels[0]
    return s
