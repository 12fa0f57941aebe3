"""LayerProbe under torch.distributed: two gloo processes, each measuring a disjoint shard, get the
metrics of one process measuring all the data (to float64 rounding: rel 1e-9)."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ncfast
from test_probe import Net, _batches, _data

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

LAYERS = ["conv", "hidden"]
BATCH = 45
"""No shard ends in a one-row batch: the forward pass of a single row takes another BLAS path (gemv)
whose rounding differs from the same row's in a larger batch, and the test compares the merge, not
the forward pass. The model runs in float64 for the same reason: in float32 a row's outputs moved by
1e-9 relative with the rows batched beside it (MKL on an AMD EPYC)."""


def _probe(model, **kw):
    return ncfast.LayerProbe(
        model, LAYERS, num_classes=4, head=model.head, penultimate="hidden", num_original_classes=8, max_dim=10, **kw
    )


def _snapshot(result):
    """The numbers of a ProbeResult, as plain tensors and floats (picklable)."""
    out = {"accuracy": result.accuracy}
    for name in LAYERS:
        r = result[name]
        out[name] = {
            "metrics": dict(r.metrics),
            "per_class": dict(r.metrics.per_class),
            "degenerate": sorted(r.metrics.degenerate),
            "means": r.class_means,
            "class_distance": r.class_distance,
            "dxd": r.dxd_features,
        }
    return out


def _inputs():
    torch.manual_seed(0)
    model = Net().eval().double()
    # 243 train samples: uneven shards (122 / 121) and imbalanced classes (61, 61, 61, 60)
    perm = torch.randperm(243, generator=torch.Generator().manual_seed(3))
    x, y, y_orig = (t[perm] for t in _data(n=243, seed=0))
    x_te, y_te, yo_te = _data(n=101, seed=5)
    x, x_te = x.double(), x_te.double()
    # fine labels: original class c under training label c on the even rows (rank 0's shard) and c + 4
    # on the odd ones (rank 1's): within each shard every class has one training label, so only the
    # merge can tell that c has no super-class (no MSDR)
    y_fine = y + 4 * (torch.arange(x.shape[0]) % 2)
    return model, (x, y, y_orig), (x_te, y_te, yo_te), y_fine


def _measure_all(model, train, test, y_fine, shard, test_shard, **kw):
    x, y, y_orig = (t[shard] for t in train)
    x_te, y_te, yo_te = (t[test_shard] for t in test)
    probe = _probe(model, **kw)
    tr = probe.measure(_batches(x, y, y_orig, size=BATCH))
    te = probe.measure(_batches(x_te, y_te, yo_te, size=BATCH), class_means=tr.class_means)
    fine = ncfast.LayerProbe(model, ["hidden"], num_classes=8, num_original_classes=4, **kw)
    fi = fine.measure(_batches(x, y_fine[shard], y, size=BATCH))
    return {"train": _snapshot(tr), "test": _snapshot(te), "fine": dict(fi["hidden"].metrics)}


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, train, test, y_fine = _inputs()
        n, n_te = train[0].shape[0], test[0].shape[0]
        assert list(ncfast.shard_indices(n, rank, world)) == list(range(rank, n, world))
        shard = torch.tensor(list(ncfast.shard_indices(n, rank, world)))
        test_shard = torch.tensor(list(ncfast.shard_indices(n_te, rank, world)))
        got = _measure_all(model, train, test, y_fine, shard, test_shard)
        torch.save(got, f"{out_file}.{rank}")
        # process_group=False: this process's shard alone
        alone = _probe(model, process_group=False).measure(_batches(*(t[shard] for t in train), size=BATCH))
        torch.save(_snapshot(alone), f"{out_file}.alone.{rank}")
    finally:
        dist.destroy_process_group()


def _close(a, b, what):
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape, what
        assert torch.equal(torch.isnan(a), torch.isnan(b)), what
        keep = ~torch.isnan(a)
        assert torch.allclose(a[keep].double(), b[keep].double(), rtol=1e-9, atol=1e-12), what
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), what
    else:
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), what


def _compare(got, want, what):
    assert set(got) == set(want), what
    for k in want:
        if isinstance(want[k], dict):
            _compare(got[k], want[k], f"{what}.{k}")
        elif isinstance(want[k], (list, str)) or want[k] is None:
            assert got[k] == want[k], f"{what}.{k}"
        else:
            _close(got[k], want[k], f"{what}.{k}")


def test_two_gloo_processes_on_disjoint_shards_equal_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        mp.spawn(_worker, args=(2, init_file, out_file), nprocs=2, join=True)
        got = [torch.load(f"{out_file}.{r}") for r in range(2)]
        alone = [torch.load(f"{out_file}.alone.{r}") for r in range(2)]
    model, train, test, y_fine = _inputs()
    want = _measure_all(model, train, test, y_fine, torch.arange(train[0].shape[0]), torch.arange(test[0].shape[0]))
    for r in range(2):
        _compare(got[r], want, f"rank {r}")
    # the fine labels put class c under two training labels: no super-class, no MSDR, on every rank
    assert "msdr" not in want["fine"] and "msdr" in want["train"]["hidden"]["metrics"]
    # process_group=False measures the shard alone: counts differ from the whole
    shard0 = torch.arange(0, train[0].shape[0], 2)
    own = _snapshot(_probe(model, process_group=False).measure(_batches(*(t[shard0] for t in train), size=BATCH)))
    _compare(alone[0], own, "alone")
    assert alone[0]["hidden"]["per_class"]["count"].sum() == shard0.numel()


def test_shard_indices_cover_every_sample_once():
    for n, world in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        seen = sorted(i for r in range(world) for i in ncfast.shard_indices(n, r, world))
        assert seen == list(range(n))
    with pytest.raises(ValueError, match="rank"):
        ncfast.shard_indices(5, 2, 2)
