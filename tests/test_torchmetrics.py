"""NeuralCollapse (ncfast.torchmetrics): the torchmetrics Metric over ClassMoments equals the one-shot
metrics, streamed and merged across (simulated) processes. The two-process gloo run is in
test_stats.py, beside ClassMoments.all_reduce, whose fold the metric shares."""

import pytest
import torch

import ncfast
from helpers import make_data

pytest.importorskip("torchmetrics")


def test_neural_collapse_metric_equals_nc_metrics():
    x, y, c = make_data(n=640, d=10, c=5, seed=8)
    w = torch.randn(c, 10, generator=torch.Generator().manual_seed(0))
    metric = ncfast.NeuralCollapse(c, 10, weight=w, class_counts=torch.bincount(y, minlength=c))
    for lo in range(0, 640, 128):
        metric.update(x[lo : lo + 128], y[lo : lo + 128])
    got = metric.compute()
    want = ncfast.nc_metrics(x, y, weight=w)
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    # the cross-process reduction: two metrics' packed states, stacked as torchmetrics gathers them
    # (merge_state applies the same reduction to [incoming, local])
    halves = [ncfast.NeuralCollapse(c, 10, weight=w, class_counts=torch.bincount(y, minlength=c)) for _ in range(2)]
    halves[0](x[:300], y[:300])
    halves[1].update(x[300:], y[300:])
    halves[0].merge_state(halves[1])
    again = halves[0].compute()
    for k in got:
        assert again[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k


def test_updates_merge_into_a_live_state_and_pack_only_when_read(monkeypatch):
    """Each update merges into the live ClassMoments; the packed vector torchmetrics syncs is written
    at compute / sync / merge_state / a device move, not per batch (it was unpacked and packed
    again, 3-4 copies of the D x D state, every batch). Reset, compute mid-stream and a move
    between batches keep the result the one-shot one."""
    x, y, c = make_data(n=640, d=10, c=5, seed=9)
    packs = []
    original = ncfast.ClassMoments._pack
    monkeypatch.setattr(ncfast.ClassMoments, "_pack", lambda self: packs.append(1) or original(self))
    metric = ncfast.NeuralCollapse(c, 10, weighting="sample")
    packs.clear()
    for lo in range(0, 320, 64):
        metric.update(x[lo : lo + 64], y[lo : lo + 64])
    assert packs == []
    first = metric.compute()
    assert len(packs) == 1
    want = ncfast.nc_metrics(x[:320], y[:320], weighting="sample")
    for k in first:
        assert first[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    metric = metric.to("cpu")  # a move between batches keeps the state
    for lo in range(320, 640, 64):
        metric.update(x[lo : lo + 64], y[lo : lo + 64])
    got = metric.compute()
    want = ncfast.nc_metrics(x, y, weighting="sample")
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    metric.reset()
    metric.update(x, y)
    again = metric.compute()
    for k in got:
        assert again[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
