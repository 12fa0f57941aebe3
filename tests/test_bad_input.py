"""The bad-input contract of docs/metrics.md §14.4: a clear error naming the argument, and no partial state change."""

import pytest
import torch

import ncfast
from helpers import make_data


@pytest.fixture
def data():
    x, y, c = make_data(n=200, d=6, c=4)
    return x, y, c


def _one_shot_calls(x, y, c):
    return [
        lambda: ncfast.nc_metrics(x, y, num_classes=c),
        lambda: ncfast.class_distance(x, y, num_classes=c),
        lambda: ncfast.class_moments(x, y, num_classes=c),
    ]


@pytest.mark.parametrize(
    "mutate, exc, name",
    [
        (lambda x, y: (x, y + 10), ValueError, "labels"),  # out of range
        (lambda x, y: (x, y - 5), ValueError, "labels"),  # negative
        (lambda x, y: (x, y.float()), TypeError, "labels"),  # float labels
        (lambda x, y: (x, y[:-1]), ValueError, "labels"),  # shape mismatch
        (lambda x, y: (x[:, :0], y), ValueError, "features"),  # D = 0
        (lambda x, y: (x[:0], y[:0]), ValueError, "features"),  # N = 0 one-shot
        (lambda x, y: (x.int(), y), TypeError, "features"),  # integer features
        (lambda x, y: (x[0], y), ValueError, "features"),  # 1-D features
        (lambda x, y: (x.index_put((torch.tensor([3]),), torch.tensor(float("nan"))), y), ValueError, "features"),
        (lambda x, y: (x.index_put((torch.tensor([5]),), torch.tensor(float("inf"))), y), ValueError, "features"),
    ],
)
def test_one_shot_functions_reject(data, mutate, exc, name):
    x, y, c = data
    bx, by = mutate(x, y)
    for call in _one_shot_calls(bx, by, c):
        with pytest.raises(exc, match=name):
            call()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bad_labels_are_named_with_their_value(data, backend, monkeypatch):
    """On the C++ path class_moments and update leave the label check to the kernel; either way
    the error names the argument and the offending value, and update changes nothing."""
    monkeypatch.setenv("NCFAST_BACKEND", backend)
    x, y, c = data
    for bad, message in (
        (y.clone().index_fill_(0, torch.tensor([150]), c + 3), f"label {c + 3} out of range"),
        (y.clone().index_fill_(0, torch.tensor([7]), -2), "negative label -2"),
    ):
        for call in (
            lambda: ncfast.class_moments(x, bad, num_classes=c),
            lambda: ncfast.class_moments(x, bad, num_classes=c, scatter=False, unit_sums=False),
            lambda: ncfast.class_distance(x, bad, num_classes=c),
        ):
            with pytest.raises(ValueError, match=f"^labels: {message}"):
                call()
        m = ncfast.ClassMoments(c, 6).update(x[:50], y[:50])
        before = _snapshot(m)
        with pytest.raises(ValueError, match=f"^labels: {message}"):
            m.update(x, bad)
        for k, v in before.items():
            assert torch.equal(m.state_dict()[k], v) if isinstance(v, torch.Tensor) else m.state_dict()[k] == v


def test_fewer_than_two_present_classes(data):
    x, y, c = data
    with pytest.raises(ValueError, match="2 present classes"):
        ncfast.nc_metrics(x, torch.zeros_like(y), num_classes=c)
    one = ncfast.class_moments(x, torch.zeros_like(y), num_classes=c)  # statistics themselves are fine
    with pytest.raises(ValueError, match="2 present classes"):
        ncfast.metrics_from_moments(one)


def test_bad_optional_arguments(data):
    x, y, c = data
    with pytest.raises(ValueError, match="weight"):
        ncfast.nc_metrics(x, y, weight=torch.randn(c, 5))
    with pytest.raises(TypeError, match="weight"):
        ncfast.nc_metrics(x, y, weight=torch.ones(c, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias"):
        ncfast.nc_metrics(x, y, weight=torch.randn(c, 6), bias=torch.randn(c + 1))
    with pytest.raises(ValueError, match="bias"):
        ncfast.nc_metrics(x, y, bias=torch.randn(c))
    with pytest.raises(ValueError, match="logits"):
        ncfast.nc_metrics(x, y, logits=torch.randn(10, c))
    with pytest.raises(ValueError, match="superclass"):
        ncfast.nc_metrics(x, y, superclass=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="weighting"):
        ncfast.nc_metrics(x, y, weighting="uniform")
    with pytest.raises(ValueError, match="nan_policy"):
        ncfast.nc_metrics(x, y, nan_policy="ignore")
    with pytest.raises(ValueError, match="means"):
        ncfast.ncc_assign(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="decisions"):
        ncfast.ncc_mismatch(x, torch.randn(3, 6), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="decisions"):
        ncfast.ncc_mismatch(x, torch.randn(3, 6), torch.zeros(200))


def test_devices_that_differ(data):
    x, y, c = data
    meta_labels = torch.zeros(200, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="labels"):
        ncfast.nc_metrics(x, meta_labels, num_classes=c)
    with pytest.raises(ValueError, match="weight"):
        ncfast.nc_metrics(x, y, weight=torch.randn(c, 6, device="meta"))
    with pytest.raises(ValueError, match="means"):
        ncfast.ncc_assign(x, torch.randn(c, 6, device="meta"))


def _snapshot(m):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()}


def test_failed_update_leaves_state_unchanged(data):
    x, y, c = data
    m = ncfast.ClassMoments(c, 6)
    m.update(x[:100], y[:100])
    before = _snapshot(m)
    nan_x = x[100:].clone()
    nan_x[7, 2] = float("nan")
    bad_calls = [
        lambda: m.update(nan_x, y[100:]),
        lambda: m.update(x[100:], y[100:] + c),
        lambda: m.update(x[100:], -y[100:] - 1),
        lambda: m.update(x[100:], y[100:].double()),
        lambda: m.update(x[100:, :5], y[100:]),
        lambda: m.update(x[100:], y[101:]),
        lambda: m.update(x[100:], y[100:], nan_policy="drop"),
        lambda: m.merge(ncfast.ClassMoments(c + 1, 6)),
        lambda: m.merge(ncfast.ClassMoments(c, 6, scatter=False)),
    ]
    for call in bad_calls:
        with pytest.raises((ValueError, TypeError)):
            call()
        after = _snapshot(m)
        for k, v in before.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(after[k], v), k
            else:
                assert after[k] == v, k


def test_omit_counts_rows_in_streaming(data):
    x, y, c = data
    bad = x.clone()
    bad[[0, 1], 0] = float("nan")
    m = ncfast.ClassMoments(c, 6).update(bad, y, nan_policy="omit")
    assert m.omitted_rows == 2 and m.num_samples == 198
    ref = ncfast.ClassMoments(c, 6).update(x[2:], y[2:])
    assert torch.equal(m.count, ref.count)


def test_empty_update_is_a_no_op(data):
    x, y, c = data
    m = ncfast.ClassMoments(c, 6).update(x, y)
    before = _snapshot(m)
    m.update(x[:0], y[:0])
    assert torch.equal(m.mean, before["mean"]) and torch.equal(m.count, before["count"])


def test_constructor_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        ncfast.ClassMoments(0, 4)
    with pytest.raises(ValueError, match="dim"):
        ncfast.ClassMoments(3, 0)
    with pytest.raises(ValueError, match="class_counts"):
        ncfast.ClassMoments(3, 4, class_counts=[1, 2])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("row", [0, 5])
def test_update_rejects_any_non_finite_value(value, row):
    """Row 0 is the only sample of class 3; row 5 shares class 0 with others: either way the
    class's M2 turns non-finite, which is what update checks."""
    x = torch.randn(8, 4)
    y = torch.tensor([3, 0, 1, 2, 1, 0, 2, 0])
    x[row, 2] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        ncfast.ClassMoments(4, 4).update(x, y)


def test_class_distance_takes_the_nan_policy_its_error_names(data):
    x, y, c = data
    bad = x.clone()
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="nan_policy='omit'"):
        ncfast.class_distance(bad, y, num_classes=c)
    keep = torch.arange(len(y)) != 3
    got = ncfast.class_distance(bad, y, num_classes=c, nan_policy="omit")
    assert torch.equal(got, ncfast.class_distance(x[keep], y[keep], num_classes=c))


def _classifier(c, d, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, d, generator=g), torch.randn(c, generator=g)


@pytest.mark.parametrize(
    "where, value",
    [("weight", float("nan")), ("weight", float("inf")), ("bias", float("nan")), ("bias", float("-inf"))],
)
def test_non_finite_classifier_is_named(data, where, value):
    """A NaN or Inf in the classifier would decide an argmax (a finite ncc_mismatch, or an internal
    error for an infinite bias): every entry point that takes one names it."""
    x, y, c = data
    w, b = _classifier(c, x.shape[1])
    (w if where == "weight" else b).view(-1)[1] = value
    calls = [
        lambda: ncfast.nc_metrics(x, y, num_classes=c, weight=w, bias=b),
        lambda: ncfast.classifier_decisions(x, w, b),
        lambda: ncfast.ncc_and_decisions(x, ncfast.class_moments(x, y).means, w, b),
    ]
    if where == "weight":
        calls.append(lambda: ncfast.metrics_from_moments(ncfast.class_moments(x, y), weight=w))
    for call in calls:
        with pytest.raises(ValueError, match=f"^{where}: contains NaN or Inf"):
            call()


def test_logits_must_be_finite_and_one_column_per_class(data):
    x, y, c = data
    z = torch.randn(x.shape[0], c)
    z[5, 2] = float("nan")
    with pytest.raises(ValueError, match="^logits: contains NaN or Inf"):
        ncfast.nc_metrics(x, y, num_classes=c, logits=z)
    with pytest.raises(ValueError, match=r"^logits: expected shape \(200, 4\)"):
        ncfast.nc_metrics(x, y, num_classes=c, logits=torch.randn(x.shape[0], c + 3))
    with pytest.raises(TypeError, match="^bias: expected a floating dtype"):
        ncfast.nc_metrics(x, y, num_classes=c, weight=torch.randn(c, x.shape[1]), bias=torch.arange(c))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_rows_get_no_nearest_centre(data, value, dtype):
    """ncc_assign, classifier_decisions, ncc_and_decisions and ncc_mismatch put a NaN or Inf row in
    class 0; now no precision certifies such a row and its exact tier refuses it, at no cost to
    finite input (one mean left: the argmin needs no scores, so the rows are checked)."""
    x, y, c = data
    x = x.to(dtype)
    means = ncfast.class_moments(x, y).means
    w, b = _classifier(c, x.shape[1])
    x[7, 3] = value
    calls = [
        lambda: ncfast.ncc_assign(x, means),
        lambda: ncfast.ncc_assign(x, means, mode="fast"),
        lambda: ncfast.classifier_decisions(x, w, b),
        lambda: ncfast.ncc_and_decisions(x, means, w, b),
        lambda: ncfast.ncc_mismatch(x, means, torch.zeros(x.shape[0], dtype=torch.int64)),
        lambda: ncfast.ncc_assign(
            x, torch.full_like(means, float("nan")).index_copy_(0, torch.tensor([1]), means[1:2])
        ),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="^features: contains NaN or Inf"):
            call()


@pytest.mark.parametrize("call", ["nc_metrics", "class_distance", "class_moments", "ClassMoments", "LayerProbe"])
def test_one_stray_label_allocates_nothing_by_it(data, call):
    """A single label of 2^40 (or num_classes of that size) asked for 2^40 x D float64 statistics: an
    allocator's traceback, or the machine's memory first. The classes' statistics are sized against
    the free memory before anything is allocated, and the error names num_classes."""
    x, y, _ = data
    y = y.clone()
    y[3] = 2**40
    with pytest.raises(ValueError, match=r"^num_classes: 1099511627777 classes .* GiB"):
        if call == "ClassMoments":
            ncfast.ClassMoments(2**40 + 1, x.shape[1])
        elif call == "LayerProbe":
            model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 5), torch.nn.Linear(5, 3))
            ncfast.LayerProbe(model, ["0"], 2**40 + 1).measure([(x, y % 3)])
        else:
            getattr(ncfast, call)(x, y)


@pytest.mark.parametrize(
    "key, bad, exc",
    [
        ("count", lambda t: -t, ValueError),  # negative counts
        ("count", lambda t: t.double(), TypeError),  # float counts
        ("mean", lambda t: t[:, :-1], ValueError),  # wrong shape
        ("m2", lambda t: t - 1e6, ValueError),  # negative sum of squares
        ("scatter", lambda t: t[:3], ValueError),
        ("unit_sum", lambda t: t.tolist(), TypeError),  # not a tensor
        ("omitted_rows", lambda t: -1, ValueError),
        ("mean", None, ValueError),  # missing key
    ],
)
def test_load_state_dict_checks_every_entry_and_changes_nothing_on_error(data, key, bad, exc):
    x, y, c = data
    m = ncfast.ClassMoments(c, x.shape[1]).update(x[:100], y[:100])
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()}
    state = ncfast.ClassMoments(c, x.shape[1]).update(x, y).state_dict()
    if bad is None:
        del state[key]
    else:
        state[key] = bad(state[key])
    with pytest.raises(exc, match="state"):
        m.load_state_dict(state)
    for k, v in m.state_dict().items():  # atomic: as it was
        assert torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k], k


@pytest.mark.parametrize(
    "labels, exc",
    [
        (lambda y: y.float(), TypeError),
        (lambda y: y - 2, ValueError),
        (lambda y: y + 10, ValueError),
        (lambda y: y.reshape(-1, 1), ValueError),
    ],
)
@pytest.mark.parametrize("held_out", [False, True])
def test_layer_probe_checks_labels_at_its_door(data, labels, exc, held_out):
    """LayerProbe.measure met float or negative labels with errors from inside torch (bincount's
    RuntimeError, NotImplementedError); now each batch's labels are checked as the one-shot API's
    are, on both kinds of split."""
    x, y, c = data
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 8), torch.nn.ReLU(), torch.nn.Linear(8, c))
    probe = ncfast.LayerProbe(model, ["1"], c)
    means = probe.measure([(x, y)]).class_means if held_out else None
    with pytest.raises(exc, match="labels"):
        probe.measure([(x, labels(y))], class_means=means)


def test_layer_probe_refuses_an_empty_loader(data):
    x, y, c = data
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], c))
    probe = ncfast.LayerProbe(model, ["0"], c)
    means = probe.measure([(x, y)]).class_means
    for kwargs in ({}, {"class_means": means}):
        with pytest.raises(ValueError, match="^loader: yielded no batch"):
            probe.measure([], **kwargs)


def test_layer_probe_names_the_layer_whose_output_is_not_finite(data):
    """A diverged network's NaN output: the error names the layer and no option LayerProbe lacks."""
    x, y, c = data
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 8), torch.nn.ReLU(), torch.nn.Linear(8, c))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    probe = ncfast.LayerProbe(model, ["1", "2"], c)
    with pytest.raises(ValueError, match="^layer '2': its output holds NaN or Inf") as err:
        probe.measure([(x, y)])
    assert "nan_policy" not in str(err.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_ood_features_and_ood_mean_are_named(data, value):
    """NaN in ood_features was reported as 'features: ... pass nan_policy=omit', an argument the
    OOD rows do not take; a non-finite ood mean given to metrics_from_moments was used as it is."""
    x, y, c = data
    xo = x[:20].clone()
    xo[3, 1] = value
    with pytest.raises(ValueError, match=r"^ood_features: contains NaN or Inf$"):
        ncfast.nc_metrics(x, y, ood_features=xo)
    mean = x.double().mean(0)
    mean[0] = value
    with pytest.raises(ValueError, match=r"^ood: contains NaN or Inf$"):
        ncfast.metrics_from_moments(ncfast.class_moments(x, y), ood=mean)


def test_layer_probe_sizes_max_dim_against_free_memory(data, monkeypatch):
    """max_dim decides which layers keep D x D float64 statistics: a layer of D = 8,192 measured in
    full needs 4 x 512 MiB. With 1 GiB free that is a ValueError naming max_dim and the layer,
    before any D x D matrix is allocated; under the default max_dim (4,096) the layer is measured
    from channel-pooled features and fits."""
    from ncfast import probe as probe_module

    x, y, c = data
    monkeypatch.setattr(probe_module, "available_bytes", lambda device: 1 << 30)
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 8192),
        torch.nn.Unflatten(1, (8, 32, 32)),
        torch.nn.Flatten(),
        torch.nn.Linear(8192, c),
    )
    with pytest.raises(
        ValueError, match=r"^max_dim: 10,000 keeps .* 2\.0 GiB on cpu \(the largest, '1', has D = 8,192\)"
    ):
        ncfast.LayerProbe(model, ["1", "3"], c, max_dim=10_000).measure([(x, y)])
    out = ncfast.LayerProbe(model, ["1", "3"], c).measure([(x, y)])  # (N, 8, 32, 32): 8 pooled channels
    assert out["1"].dxd_features == "channel_pooled" and out["3"].dxd_features == "full"
