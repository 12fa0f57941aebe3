"""LayerProbe: per-layer metrics from hooks equal nc_metrics on the same features."""

import pytest
import torch
from torch import nn

import ncfast
from helpers import assert_close
from ncfast import reference as ref


class Net(nn.Module):
    def __init__(self, d_in=12, c=4):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3, padding=1)  # output (B, 3, d_in): 36 flattened features
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(3 * d_in, 9), nn.Tanh())
        self.head = nn.Linear(9, c)

    def forward(self, x):
        return self.head(self.hidden(self.conv(x.unsqueeze(1))))


def _data(n=240, d_in=12, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    x = torch.randn(c, d_in, generator=g)[y] * 2 + torch.randn(n, d_in, generator=g)
    y_orig = y + c * ((torch.arange(n) // c) % 2)  # two original classes per training class
    return x, y, y_orig


def _batches(x, y, y_orig=None, size=50):
    out = []
    for lo in range(0, x.shape[0], size):
        b = (x[lo : lo + size], y[lo : lo + size])
        out.append(b + ((y_orig[lo : lo + size],) if y_orig is not None else ()))
    return out


def _features(model, x, name):
    store = {}
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: store.__setitem__("o", o))
    with torch.no_grad():
        logits = model(x)
    h.remove()
    return store["o"], logits


@pytest.mark.parametrize("max_dim", [4096, 10])
def test_probe_equals_nc_metrics_per_layer(max_dim):
    torch.manual_seed(0)
    model = Net().eval()
    x, y, y_orig = _data()
    probe = ncfast.LayerProbe(
        model,
        ["conv", "hidden"],
        num_classes=4,
        head=model.head,
        penultimate="hidden",
        num_original_classes=8,
        max_dim=max_dim,
    )
    got = probe.measure(_batches(x, y, y_orig))
    for name in ("conv", "hidden"):
        out, logits = _features(model, x, name)
        flat = out.reshape(x.shape[0], -1)
        weight = model.head.weight.detach() if name == "hidden" else None
        bias = model.head.bias.detach() if name == "hidden" else None
        want = ncfast.nc_metrics(flat, y, num_classes=4, weight=weight, bias=bias, logits=logits)
        pooled = name == "conv" and flat.shape[1] > max_dim
        if pooled:  # D x D metrics from the channel means
            want_dxd = ncfast.nc_metrics(out.mean(dim=2), y, num_classes=4)
        assert got[name].dxd_features == ("channel_pooled" if pooled else "full")
        for k, v in want.items():
            expect = want_dxd[k] if pooled and k in ncfast.metrics.SCATTER_METRICS else v
            # effective_rank leaves out the eigenvalues the rank rule cuts (the conv layer's 36
            # features have rank 12), so their rounding no longer moves it with the batch order
            assert_close(got[name].metrics[k], expect, rtol=1e-9, atol=1e-12, what=f"{name}.{k}")
        decisions = logits.argmax(1)
        nearest = ncfast.ncc_assign(flat, ncfast.class_moments(flat, y, scatter=False).means)
        assert got[name].metrics["ncc_mismatch"] == pytest.approx(float((nearest != decisions).double().mean()), abs=0)
        # original labels: class distance and MSDR inside the training labels
        assert_close(
            got[name].class_distance.numpy(),
            ref.class_distance(flat.numpy(), y_orig.numpy()),
            rtol=1e-9,
            what="class_distance",
        )
        superclass = (torch.arange(8) % 4).numpy()
        assert got[name].metrics["msdr"] == pytest.approx(ref.msdr(flat.numpy(), y_orig.numpy(), superclass), rel=1e-9)


def test_probe_counts_imbalanced_labels_itself_and_restores_mode():
    model = Net().train()
    x, y, _ = _data(n=203)  # 203 = 50+51+51+51: imbalanced, so balanced Sigma_W needs the counts
    probe = ncfast.LayerProbe(model, ["hidden"], num_classes=4)
    got = probe.measure(_batches(x, y))
    assert model.training  # measure runs in eval mode and puts the mode back
    with torch.no_grad():
        assert got.accuracy == float((model.eval()(x).argmax(1) == y).double().mean())
    out, logits = _features(model.eval(), x, "hidden")
    want = ncfast.nc_metrics(out, y, num_classes=4, logits=logits)
    assert_close(got["hidden"].metrics["nc1"], want["nc1"], rtol=1e-9, what="nc1")


def test_probe_rejects_bad_arguments():
    model = Net()
    with pytest.raises(ValueError, match="layers"):
        ncfast.LayerProbe(model, ["nope"], num_classes=4)
    with pytest.raises(ValueError, match="penultimate"):
        ncfast.LayerProbe(model, ["conv"], num_classes=4, head=model.head, penultimate="hidden")
    with pytest.raises(ValueError, match="head and penultimate"):
        ncfast.LayerProbe(model, ["hidden"], num_classes=4, head=model.head)
    with pytest.raises(ValueError, match="loader"):
        ncfast.LayerProbe(model, ["hidden"], num_classes=4, class_counts=[1, 1, 1, 1]).measure([])


def test_probe_leaves_out_msdr_when_original_classes_are_split():
    """Fine labels: an original class under two training labels has no super-class, so no MSDR;
    the class distance on the original labels is still there."""
    model = Net(c=8).eval()
    x, y_orig, _ = _data(c=4)
    y = y_orig + 4 * ((torch.arange(x.shape[0]) // 4) % 2)  # every original class split in two
    probe = ncfast.LayerProbe(model, ["hidden"], num_classes=8, num_original_classes=4)
    got = probe.measure(_batches(x, y, y_orig))
    assert "msdr" not in got["hidden"].metrics
    out, _ = _features(model, x, "hidden")
    assert_close(
        got["hidden"].class_distance.numpy(),
        ref.class_distance(out.numpy(), y_orig.numpy()),
        rtol=1e-9,
        what="class_distance",
    )


def test_held_out_loader_scored_against_the_train_means():
    """measure(test, class_means=train.class_means) scores NCC on the test features against
    the train split's class means of each layer (paper 003 def. 6), equal to nc_metrics with those
    means; every other metric is the test split's own. logits_norm is the norm of the logits the
    loss sees (logit_scale times the network's), logits_norm_raw the network's."""
    torch.manual_seed(1)
    model = Net().eval()
    x_tr, y_tr, _ = _data(n=240, seed=0)
    x_te, y_te, _ = _data(n=120, seed=7)
    probe = ncfast.LayerProbe(
        model, ["conv", "hidden"], num_classes=4, head=model.head, penultimate="hidden", logit_scale=10.0
    )
    train_means = probe.measure(_batches(x_tr, y_tr)).class_means
    assert set(train_means) == {"conv", "hidden"}
    got = probe.measure(_batches(x_te, y_te), class_means=train_means)
    own_means = got.class_means
    for name in ("conv", "hidden"):
        out_tr, _ = _features(model, x_tr, name)
        out, logits = _features(model, x_te, name)
        flat = out.reshape(x_te.shape[0], -1)
        want_means = ncfast.class_moments(out_tr.reshape(x_tr.shape[0], -1), y_tr).means
        assert_close(train_means[name].numpy(), want_means.numpy(), rtol=1e-12, what="train means")
        assert_close(
            own_means[name].numpy(), ncfast.class_moments(flat, y_te).means.numpy(), rtol=1e-12, what="own means"
        )
        want = ncfast.nc_metrics(flat, y_te, num_classes=4, logits=logits, class_means=want_means)
        assert got[name].metrics["ncc_accuracy"] == want["ncc_accuracy"]
        assert got[name].metrics["ncc_mismatch"] == want["ncc_mismatch"]
        assert got[name].metrics["ncc_accuracy"] == ref.ncc_accuracy(flat, y_te, 4, class_means=want_means)
        assert_close(
            got[name].metrics.per_class["ncc_accuracy"].numpy(),
            want.per_class["ncc_accuracy"].numpy(),
            rtol=0,
            what="per class accuracy",
        )
        assert_close(
            got[name].metrics.per_class["ncc_mismatch"].numpy(),
            want.per_class["ncc_mismatch"].numpy(),
            rtol=0,
            what="per class mismatch",
        )
        assert_close(got[name].metrics["nc1"], want["nc1"], rtol=1e-9, what="nc1 of the test features")
        assert_close(
            got[name].train_class_distance.numpy(),
            ref.class_distance(flat, y_te, 4),
            rtol=1e-9,
            what="class distance over the training labels",
        )
        # the logits of the probe's own batches: float32 BLAS rounds a batch of 50 rows differently
        # from one of 120 (2e-10 relative on an AMD EPYC)
        with torch.no_grad():
            seen = torch.cat([model(b[0]) for b in _batches(x_te, y_te)])
        assert got[name].metrics["logits_norm_raw"] == pytest.approx(ref.logits_norm(seen), rel=1e-12)
        assert got[name].metrics["logits_norm"] == pytest.approx(10.0 * ref.logits_norm(seen), rel=1e-12)
    with pytest.raises(ValueError, match="class_means"):
        probe.measure(_batches(x_te, y_te), class_means={"conv": train_means["conv"]})
    with pytest.raises(ValueError, match="class_means"):
        probe.measure(
            _batches(x_te, y_te), class_means={"conv": train_means["conv"][:, :3], "hidden": train_means["hidden"]}
        )
    with pytest.raises(ValueError, match="logit_scale"):
        ncfast.LayerProbe(model, ["hidden"], num_classes=4, logit_scale=0.0)


def test_degenerate_is_judged_on_the_features_the_dxd_metrics_used():
    """A batch of 8 samples: the 36 flattened conv features are affinely independent (rank 7 =
    N - 1: degenerate), but with max_dim below 36 the D x D metrics come from the 3 channel means,
    where rank 3 < N - 1 is no artefact of the sample size."""
    torch.manual_seed(2)
    model = Net().eval()
    x, y, _ = _data(n=8)
    full = ncfast.LayerProbe(model, ["conv"], num_classes=4).measure(_batches(x, y))
    pooled = ncfast.LayerProbe(model, ["conv"], num_classes=4, max_dim=10).measure(_batches(x, y))
    out, _ = _features(model, x, "conv")
    assert (
        full["conv"].metrics.degenerate == ref.degenerate(out.reshape(8, -1), y, 4) == ("vci", "rank", "effective_rank")
    )
    assert pooled["conv"].metrics.degenerate == ref.degenerate(out.mean(dim=2), y, 4) == ()


class _Counted(Net):
    """Net that counts its forward calls (one per batch)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def _numbers(result):
    """Every number of a ProbeResult, as plain Python values and tensors."""
    out = {"accuracy": result.accuracy}
    for name, r in result.items():
        out[name] = (
            {k: v for k, v in r.metrics.items()},
            {k: v.clone() for k, v in r.metrics.per_class.items()},
            r.metrics.ranks,
            r.metrics.degenerate,
            r.class_means.clone(),
            r.moments.state_dict(),
            None if r.class_distance is None else r.class_distance.clone(),
        )
    return out


def _identical(a, b, what=""):
    """Equal bit for bit (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            _identical(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b)):
            _identical(u, v, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(torch.isnan(a), torch.isnan(b)) if a.is_floating_point() else True, what
        assert torch.equal(
            a.nan_to_num(0.0) if a.is_floating_point() else a, b.nan_to_num(0.0) if b.is_floating_point() else b
        ), what
    elif isinstance(a, float) and a != a:
        assert b != b, what
    else:
        assert a == b, what


@pytest.mark.parametrize("n", [240, 203])  # balanced, and imbalanced (50, 51, 51, 51)
def test_cached_train_split_takes_one_forward_pass_and_equals_two_passes_bit_for_bit(n):
    """The train split (no class_means): with the layers' outputs kept (cache_bytes) the second pass
    reads them and the model runs once per batch; with cache_bytes=0 it runs twice. Both give the
    same numbers bit for bit, and the reference's."""
    torch.manual_seed(3)
    model = _Counted().eval()
    x, y, y_orig = _data(n=n)
    batches = _batches(x, y, y_orig)
    kw = dict(num_classes=4, head=model.head, penultimate="hidden", num_original_classes=8, max_dim=10)
    model.calls = 0
    cached = ncfast.LayerProbe(model, ["conv", "hidden"], **kw).measure(batches)
    assert model.calls == len(batches)
    assert cached.cached_layers == ["conv", "hidden"]
    model.calls = 0
    twice = ncfast.LayerProbe(model, ["conv", "hidden"], cache_bytes=0, **kw).measure(batches)
    assert model.calls == 2 * len(batches)
    assert twice.cached_layers == []
    _identical(_numbers(cached), _numbers(twice))
    out, _ = _features(model, x, "hidden")
    assert_close(cached["hidden"].metrics["nc1"], ref.nc1(out, y, 4), rtol=1e-9, what="nc1")
    assert_close(cached["hidden"].metrics["vci"], ref.vci(out, y, 4), rtol=1e-9, what="vci")


def test_held_out_split_with_train_means_takes_one_forward_pass():
    """With class_means every statistic comes from one forward pass; without class_counts under
    balanced weighting the labels are counted first, by a pass that does not run the model."""
    torch.manual_seed(4)
    model = _Counted().eval()
    x_tr, y_tr, _ = _data(n=240, seed=0)
    x_te, y_te, _ = _data(n=118, seed=9)  # 30, 30, 29, 29: imbalanced
    probe = ncfast.LayerProbe(model, ["conv", "hidden"], num_classes=4, max_dim=10)
    means = probe.measure(_batches(x_tr, y_tr)).class_means
    test = _batches(x_te, y_te)
    for counts in (None, torch.bincount(y_te, minlength=4)):
        model.calls = 0
        got = ncfast.LayerProbe(model, ["conv", "hidden"], num_classes=4, max_dim=10, class_counts=counts).measure(
            test, class_means=means
        )
        assert model.calls == len(test)
        assert got.cached_layers == []
        out, logits = _features(model, x_te, "hidden")
        want = ncfast.nc_metrics(out, y_te, num_classes=4, logits=logits, class_means=means["hidden"])
        for k in ("nc1", "vci", "rank", "ncc_accuracy", "ncc_mismatch", "cdnv"):
            assert_close(got["hidden"].metrics[k], want[k], rtol=1e-9, atol=1e-12, what=k)


def test_cache_budget_is_filled_over_the_layers_in_order():
    """A budget that holds the hidden layer's batches but not the conv layer's as well: conv, given
    first, is kept while it fits and dropped when it no longer does; the hidden layer stays; the
    second forward pass runs for conv alone and the numbers equal the uncached ones bit for bit."""
    torch.manual_seed(5)
    model = _Counted().eval()
    x, y, _ = _data(n=240)
    batches = _batches(x, y)
    # per row: conv 36 float32 + 3 pooled = 156 bytes, hidden 9 float32 = 36 bytes; labels and
    # decisions 16 bytes. 240 rows: conv 37,440, hidden 8,640, shared 3,840.
    budget = 20_000
    model.calls = 0
    got = ncfast.LayerProbe(model, ["conv", "hidden"], num_classes=4, max_dim=10, cache_bytes=budget).measure(batches)
    assert got.cached_layers == ["hidden"]
    assert model.calls == 2 * len(batches)
    plain = ncfast.LayerProbe(model, ["conv", "hidden"], num_classes=4, max_dim=10, cache_bytes=0).measure(batches)
    _identical(_numbers(got), _numbers(plain))
    # the order given decides: hidden first takes its share, conv then never fits
    got = ncfast.LayerProbe(model, ["hidden", "conv"], num_classes=4, max_dim=10, cache_bytes=budget).measure(batches)
    assert got.cached_layers == ["hidden"]
    with pytest.raises(ValueError, match="cache_bytes"):
        ncfast.LayerProbe(model, ["hidden"], num_classes=4, cache_bytes=-1)
