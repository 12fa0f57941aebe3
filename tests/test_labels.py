"""Label transforms of paper 000 (docs/metrics.md: coarse y mod K, fine y + beta*C, random coarse)."""

import pytest
import torch

import ncfast


def test_coarse_labels_are_y_mod_k():
    y = torch.arange(10)
    assert ncfast.coarse_labels(y, 5).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert ncfast.coarse_labels(y.numpy(), 3).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def test_fine_labels_split_each_class_in_two_reproducibly():
    y = torch.arange(10).repeat(200)
    f = ncfast.fine_labels(y, 10, seed=3)
    assert torch.equal(f % 10, y)
    assert set(f.tolist()) == set(range(20))
    share = (f >= 10).double().mean().item()
    assert 0.45 < share < 0.55  # Bernoulli(1/2)
    assert torch.equal(f, ncfast.fine_labels(y, 10, seed=3))
    assert not torch.equal(f, ncfast.fine_labels(y, 10, seed=4))


def test_random_coarse_labels_group_whole_classes():
    y = torch.arange(10).repeat(3)
    r = ncfast.random_coarse_labels(y, 5, 10, seed=1)
    mapping = {}
    for a, b in zip(y.tolist(), r.tolist()):
        assert mapping.setdefault(a, b) == b  # one super-class per class
    assert sorted(list(mapping.values()).count(k) for k in range(5)) == [2] * 5
    assert torch.equal(r, ncfast.random_coarse_labels(y, 5, 10, seed=1))


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda: ncfast.coarse_labels(torch.tensor([0.0, 1.0]), 2), TypeError),
        (lambda: ncfast.coarse_labels(torch.tensor([-1, 1]), 2), ValueError),
        (lambda: ncfast.coarse_labels(torch.tensor([0, 1]), 0), ValueError),
        (lambda: ncfast.fine_labels(torch.tensor([0, 5]), 3), ValueError),
    ],
)
def test_bad_label_arguments(call, exc):
    with pytest.raises(exc):
        call()
