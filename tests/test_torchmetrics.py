"""NeuralCollapse (ncfast.torchmetrics): the torchmetrics Metric over ClassMoments equals the one-shot
metrics, streamed and merged across (simulated) processes. The two-process gloo run is in
test_stats.py, beside ClassMoments.all_reduce, whose fold the metric shares."""
import pytest
import torch

import ncfast
from conftest import make_data

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
    halves = [ncfast.NeuralCollapse(c, 10, weight=w, class_counts=torch.bincount(y, minlength=c)) for _ in range(2)]
    halves[0](x[:300], y[:300])
    halves[1].update(x[300:], y[300:])
    reduce = halves[0]._reductions["packed"]
    halves[0].packed = reduce(torch.stack([halves[0].packed, halves[1].packed]))
    again = halves[0].compute()
    for k in got:
        assert again[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
