"""ncfast.passes: the one orchestration of nc_metrics, LayerProbe.measure and ncfast.measure.

The three entry points measure the same features to the same numbers (rel 1e-9, NCC counts
exactly), on a train split and on a held-out split scored against the train means, and each goes
through passes.Plan; a stream's one-pass mode equals its two-pass mode."""

import numpy as np
import pytest
import torch
from torch import nn

import ncfast
from helpers import assert_close
from ncfast import measure as ms
from ncfast import passes
from ncfast import reference as ref

EXACT = ("ncc_accuracy", "ncc_mismatch", "rank")


def _data(n, d=9, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    y[:c] = torch.arange(c)  # every class present, counts imbalanced
    x = (torch.randn(c, d, generator=g, dtype=torch.float64) * 3)[y] + torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    return x, y


class _Head(nn.Module):
    """The features themselves as the probed layer ("feat"), then a float64 linear classifier."""

    def __init__(self, w, b):
        super().__init__()
        self.feat = nn.Identity()
        self.head = nn.Linear(w.shape[1], w.shape[0]).double()
        with torch.no_grad():
            self.head.weight.copy_(w)
            self.head.bias.copy_(b)

    def forward(self, x):
        return self.head(self.feat(x))


def _spy(monkeypatch):
    """Records every Plan.first call's stream names."""
    seen = []
    inner = passes.Plan.first
    monkeypatch.setattr(
        passes.Plan, "first", lambda self, block: seen.append(sorted(map(str, self.streams))) or inner(self, block)
    )
    return seen


def _compare(got, want, what):
    for k in want:
        if k in ("logits_norm", "logits_norm_raw"):
            continue
        if k in EXACT:
            assert got[k] == want[k], f"{what}.{k}"
        else:
            assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, what=f"{what}.{k}")
    for k, v in want.per_class.items():
        assert_close(got.per_class[k].numpy(), v.numpy(), rtol=1e-9, atol=1e-12, what=f"{what}.per_class.{k}")


def test_three_entry_points_agree_and_share_the_plan(tmp_path, monkeypatch):
    x, y = _data(301)
    x_te, y_te = _data(97, seed=1)
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    seen = _spy(monkeypatch)

    # one call per entry point and split
    one_shot = ncfast.nc_metrics(x, y, weight=w, bias=b)
    train_means = ncfast.class_moments(x, y).means
    one_shot_te = ncfast.nc_metrics(x_te, y_te, weight=w, bias=b, class_means=train_means)
    assert len(seen) == 2

    model = _Head(w, b).eval()
    probe = ncfast.LayerProbe(model, ["feat"], num_classes=4, head=model.head, penultimate="feat")
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 301, 64)]
    batches_te = [(x_te[i : i + 40], y_te[i : i + 40]) for i in range(0, 97, 40)]
    tr = probe.measure(batches)
    te = probe.measure(batches_te, class_means=tr.class_means)
    assert len(seen) == 2 + len(batches) + len(batches_te)

    for name, t in (("x", x), ("y", y), ("x_te", x_te), ("y_te", y_te), ("w", w), ("b", b), ("means", train_means)):
        np.save(tmp_path / f"{name}.npy", t.numpy())
    on_disk, _ = ms.measure(
        tmp_path / "x.npy", tmp_path / "y.npy", weight=tmp_path / "w.npy", bias=tmp_path / "b.npy", block_rows=50
    )
    on_disk_te, _ = ms.measure(
        tmp_path / "x_te.npy",
        tmp_path / "y_te.npy",
        weight=tmp_path / "w.npy",
        bias=tmp_path / "b.npy",
        train_means=tmp_path / "means.npy",
        block_rows=50,
    )
    assert len(seen) == 2 + len(batches) + len(batches_te) + 7 + 2

    for got, what in ((tr["feat"].metrics, "probe"), (on_disk, "measure")):
        _compare(got, one_shot, f"{what} train")
    for got, what in ((te["feat"].metrics, "probe"), (on_disk_te, "measure")):
        _compare(got, one_shot_te, f"{what} held-out")
    # and the numbers are the reference's
    assert_close(one_shot["vci"], ref.vci(x, y), rtol=1e-9, what="vci")
    assert one_shot_te["ncc_accuracy"] == ref.ncc_accuracy(x_te, y_te, 4, class_means=train_means)
    assert one_shot_te["ncc_mismatch"] == ref.ncc_mismatch(x_te, y_te, 4, weight=w, bias=b, class_means=train_means)


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
def test_one_pass_equals_two_passes(weighting):
    """Given the centres (and, for balanced weighting on imbalanced counts, the class counts), the
    first pass takes everything (the scatter streamed by Chan's merge); without, the second pass
    takes the scatter about the final means. Same metrics (rel 1e-9), same NCC counts."""
    x, y = _data(250, seed=3)
    centres = ncfast.class_moments(*_data(300, seed=4)).means
    counts = torch.bincount(y, minlength=4)
    backend = ncfast.backends.for_tensor(x)
    out = {}
    for one_pass in (True, False):
        s = passes.Stream(
            4,
            9,
            device="cpu",
            weighting=weighting,
            centres=centres,
            one_pass=one_pass,
            class_counts=counts,
            decisions=True,
        )
        plan = passes.Plan({"f": s}, cache_bytes=0)
        blocks = [
            passes.Block({"f": x[i : i + 60]}, y[i : i + 60], (x[i : i + 60] @ centres.T).argmax(1))
            for i in range(0, 250, 60)
        ]
        for blk in blocks:
            plan.first(blk)
        plan.end_first()
        assert plan.pending == ([] if one_pass else ["f"])
        for blk in blocks if plan.pending else []:
            plan.second(blk)
        plan.end()
        out[one_pass] = s.metrics(backend, rtol=1e-10)
    _compare(out[True], out[False], "one pass")
    want = ncfast.nc_metrics(x, y, weighting=weighting, class_means=centres)
    for k in ("nc1", "vci", "effective_rank", "ncc_accuracy"):
        assert_close(out[False][k], want[k], rtol=1e-9, what=k)


def test_announced_counts_only_where_the_balanced_scatter_needs_them():
    assert passes.announced_counts(torch.tensor([3, 3, 0, 3]), "balanced") is None
    assert passes.announced_counts(torch.tensor([3, 4, 0, 3]), "sample") is None
    c = torch.tensor([3, 4, 0, 3])
    assert passes.announced_counts(c, "balanced") is c


def test_one_pass_needs_the_centres():
    with pytest.raises(ValueError, match="one_pass"):
        passes.Stream(3, 2, device="cpu", one_pass=True)
