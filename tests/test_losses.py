"""svsl_loss (paper 003 definition 10, docs/metrics.md §13) against a literal per-sample loop of the paper's
formula, hand-computed cases, the float64 reference, gradcheck and the bad-input contract."""

import pytest
import torch
import torch.nn.functional as F

import ncfast
from ncfast import reference as ref
from ncfast.losses import svsl_loss


def _paper_loss(layers, labels, alpha, num_classes, logits=None, reduction="mean"):
    """Paper 003 eq. (5) sample by sample, in Python floats (float64):
    L_i = CE_i + eta sum_j ||g_j(x_i) - mu_{c,B}^(j)||^2, eta = alpha / (C (k+1-gamma) |{i in B: y_i = c}|),
    then summed over the batch, or averaged for reduction="mean". CE_i is 0 without logits."""
    y = [int(v) for v in labels]
    rows = [[[float(v) for v in row] for row in g.detach().double().reshape(len(y), -1).tolist()] for g in layers]
    losses = []
    for i, c in enumerate(y):
        members = [u for u in range(len(y)) if y[u] == c]
        eta = alpha / (num_classes * len(layers) * len(members))
        reg = 0.0
        for g in rows:
            dim = len(g[i])
            mu = [sum(g[u][d] for u in members) / len(members) for d in range(dim)]
            reg += sum((g[i][d] - mu[d]) ** 2 for d in range(dim))
        ce = 0.0
        if logits is not None:
            z = [float(v) for v in logits[i].double().tolist()]
            top = max(z)
            ce = top + torch.tensor(z, dtype=torch.float64).sub(top).exp().sum().log().item() - z[c]
        losses.append(ce + eta * reg)
    return sum(losses) / len(y) if reduction == "mean" else sum(losses)


def _batch(dtype=torch.float64, seed=13):
    """An imbalanced batch (counts 4, 3, 0, 4, 1 over classes 0..4) and three layers of different
    shapes: a conv map, a flat layer and logits-like (N, 5)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 3, 1, 0, 3, 3, 1, 0, 4, 1, 0, 3])
    n = labels.shape[0]
    conv = torch.randn(n, 4, 3, 3, generator=gen, dtype=torch.float64)
    flat = 2.0 + torch.randn(n, 7, generator=gen, dtype=torch.float64)
    out = torch.randn(n, 5, generator=gen, dtype=torch.float64) * 3
    return [conv.to(dtype), flat.to(dtype), out.to(dtype)], labels


# ------------------------------------------------------------------------------------------ values


def test_hand_case():
    # y = 0, 0, 2, 2 with C = 3 (class 1 absent), L = 2 layers, n_0 = n_2 = 2: eta = alpha / 12.
    # layer 1: class means 1 and 7, squared deviations 1, 1, 4, 4; layer 2: means (0, 1) and (1, 1),
    # squared deviations 1, 1, 0, 0. Per-sample sums 2, 2, 4, 4: total 12 eta = alpha; mean alpha / 4.
    y = torch.tensor([0, 0, 2, 2])
    layer1 = torch.tensor([[0.0], [2.0], [5.0], [9.0]], dtype=torch.float64)
    layer2 = torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    layers = [layer1, layer2]
    assert svsl_loss(layers, y, alpha=0.75, num_classes=3, reduction="sum").item() == 0.75
    assert svsl_loss(layers, y, alpha=0.75, num_classes=3).item() == 0.1875
    assert ref.svsl_loss(layers, y, alpha=0.75, num_classes=3, reduction="sum") == 0.75
    assert ref.svsl_loss(layers, y, alpha=0.75, num_classes=3) == 0.1875


def test_hand_case_imbalanced():
    # y = 0, 0, 0, 1, C = 2, one layer: class 0 has mean 3 and squared deviations 9, 0, 9, weighted
    # by eta_0 = alpha / (2 * 1 * 3); class 1's lone sample sits on its mean. Sum = 18 alpha / 6.
    y = torch.tensor([0, 0, 0, 1])
    layer = torch.tensor([[0.0], [3.0], [6.0], [5.0]], dtype=torch.float64)
    assert svsl_loss([layer], y, alpha=2.0, num_classes=2, reduction="sum").item() == 6.0
    assert svsl_loss([layer], y, alpha=2.0, num_classes=2).item() == 1.5
    # a second copy of class 0 changes n_0 to 6 and the deviations' sum to 36: the class weighs the same
    y2 = torch.tensor([0, 0, 0, 1, 0, 0, 0])
    layer2 = torch.cat([layer, layer[:3]])
    assert svsl_loss([layer2], y2, alpha=2.0, num_classes=2, reduction="sum").item() == 6.0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_paper_loop_with_cross_entropy(reduction):
    """CE + svsl_loss under one reduction is the paper's per-sample loss L_i reduced the same way."""
    layers, labels = _batch()
    logits = layers[2]
    alpha, num_classes = 0.3, 5
    ours = F.cross_entropy(logits, labels, reduction=reduction) + svsl_loss(
        layers, labels, alpha=alpha, num_classes=num_classes, reduction=reduction
    )
    want = _paper_loss(layers, labels, alpha, num_classes, logits=logits, reduction=reduction)
    assert ours.item() == pytest.approx(want, rel=1e-13)
    term = svsl_loss(layers, labels, alpha=alpha, num_classes=num_classes, reduction=reduction)
    assert term.dim() == 0 and term.dtype == torch.float64
    assert term.item() == pytest.approx(_paper_loss(layers, labels, alpha, num_classes, reduction=reduction), rel=1e-13)
    assert term.item() > 0.01  # the check above is not 0 == 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("subset", [[0], [1], [0, 2], [0, 1, 2]])
def test_layer_subsets_match_paper_loop_and_reference(reduction, subset):
    layers, labels = _batch()
    chosen = [layers[j] for j in subset]
    value = svsl_loss(chosen, labels, alpha=0.7, num_classes=6, reduction=reduction).item()
    assert value == pytest.approx(_paper_loss(chosen, labels, 0.7, 6, reduction=reduction), rel=1e-13)
    assert ref.svsl_loss(chosen, labels, alpha=0.7, num_classes=6, reduction=reduction) == pytest.approx(
        value, rel=1e-13
    )


def test_mean_is_sum_over_batch_size():
    layers, labels = _batch()
    total = svsl_loss(layers, labels, alpha=0.3, num_classes=5, reduction="sum")
    mean = svsl_loss(layers, labels, alpha=0.3, num_classes=5)
    assert mean.item() == pytest.approx(total.item() / labels.shape[0], rel=1e-15)
    assert total.item() != pytest.approx(mean.item())


def test_num_classes_is_the_task_not_the_batch():
    """C counts every class of the task: classes absent from the batch still divide eta."""
    layers, labels = _batch()  # classes 0, 1, 3, 4 present
    five = svsl_loss(layers, labels, alpha=0.3, num_classes=5)
    for k in (1, 2, 3):  # C = 10, 20, 40: exactly 1 / 2^k of the value at C = 5
        value = svsl_loss(layers, labels, alpha=0.3, num_classes=5 * 2**k)
        assert value.item() == five.item() / 2**k
    # with the 4 classes present in the batch as C the value would be 5/4 of it
    assert five.item() == pytest.approx(_paper_loss(layers, labels, 0.3, 5), rel=1e-13)
    assert five.item() != pytest.approx(_paper_loss(layers, labels, 0.3, 4), rel=1e-3)


def test_alpha_scales_linearly_and_zero_is_zero():
    layers, labels = _batch()
    one = svsl_loss(layers, labels, alpha=1.0, num_classes=5).item()
    assert svsl_loss(layers, labels, alpha=0.25, num_classes=5).item() == pytest.approx(one / 4, rel=1e-15)
    assert svsl_loss(layers, labels, alpha=0.0, num_classes=5).item() == 0.0


def test_collapsed_classes_give_zero():
    labels = torch.tensor([2, 0, 2, 0, 1])
    means = torch.tensor([[1.0, -2.0], [4.0, 4.0], [0.5, 9.0]], dtype=torch.float64)
    assert svsl_loss([means[labels]], labels, alpha=3.0, num_classes=3).item() == 0.0


def test_non_contiguous_layers():
    layers, labels = _batch()
    strided = [layers[0].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), layers[1].t().contiguous().t()]
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    want = svsl_loss(layers[:2], labels, alpha=0.3, num_classes=5).item()
    assert svsl_loss(strided, labels, alpha=0.3, num_classes=5).item() == pytest.approx(want, rel=1e-14)


def test_numpy_labels_and_public_export():
    layers, labels = _batch()
    want = svsl_loss(layers, labels, alpha=0.3, num_classes=5).item()
    assert ncfast.svsl_loss(layers, labels.numpy(), alpha=0.3, num_classes=5).item() == want


# ------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    layers, labels = _batch(dtype)
    loss = svsl_loss(layers, labels, alpha=0.3, num_classes=5)
    assert loss.dtype == torch.float32
    # the loop sees the same rounded inputs, so only float32 accumulation differs: rel 1e-5, specific to
    # this loss (the tolerance table is for the kernels' float64 accumulations)
    assert loss.item() == pytest.approx(_paper_loss(layers, labels, 0.3, 5), rel=1e-5)


def test_float16_is_upcast_before_squaring():
    # deviations of 1000: their squares (1e6) overflow float16 (max 65504) but not float32
    labels = torch.tensor([0, 0, 1, 1])
    layer = torch.tensor([[0.0], [2000.0], [-1000.0], [1000.0]], dtype=torch.float16)
    loss = svsl_loss([layer], labels, alpha=1.0, num_classes=2, reduction="sum")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == 4e6 / 2 / 2  # eta = 1 / (2 * 1 * 2) on each of 4 squared deviations of 1e6


def test_mixed_dtypes_promote():
    layers, labels = _batch()
    mixed = [layers[0].float(), layers[1], layers[2].bfloat16()]
    loss = svsl_loss(mixed, labels, alpha=0.3, num_classes=5)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_paper_loss(mixed, labels, 0.3, 5), rel=1e-6)


# ------------------------------------------------------------------------------------------ gradient


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck(reduction):
    layers, labels = _batch()
    small = [
        layers[0][:, :2, :2, :1].clone().requires_grad_(),
        layers[1][:, :3].clone().requires_grad_(),
        layers[2].clone().requires_grad_(),
    ]
    assert torch.autograd.gradcheck(
        lambda a, b, c: svsl_loss([a, b, c], labels, alpha=0.7, num_classes=7, reduction=reduction), small
    )


def test_gradient_pulls_samples_to_their_class_mean():
    # d/dg_i = 2 eta_c (g_i - mu_c) (the batch mean's own gradient sums to zero over the class)
    labels = torch.tensor([0, 0, 0, 1, 1])
    g = torch.tensor([[0.0], [3.0], [9.0], [1.0], [5.0]], dtype=torch.float64, requires_grad=True)
    svsl_loss([g], labels, alpha=4.0, num_classes=2, reduction="sum").backward()
    mu = torch.tensor([[4.0], [4.0], [4.0], [3.0], [3.0]], dtype=torch.float64)
    eta = torch.tensor([[4.0 / 6], [4.0 / 6], [4.0 / 6], [1.0], [1.0]], dtype=torch.float64)
    torch.testing.assert_close(g.grad, 2 * eta * (g.detach() - mu), rtol=1e-15, atol=0)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input():
    layers, labels = _batch()
    ok = dict(alpha=0.1, num_classes=5)
    with pytest.raises(ValueError, match="reduction"):
        svsl_loss(layers, labels, **ok, reduction="none")
    with pytest.raises(ValueError, match="num_classes"):
        svsl_loss(layers, labels, alpha=0.1, num_classes=0)
    with pytest.raises(TypeError, match="num_classes"):
        svsl_loss(layers, labels, alpha=0.1, num_classes=5.0)
    with pytest.raises(TypeError, match="num_classes"):
        svsl_loss(layers, labels, alpha=0.1, num_classes=None)
    with pytest.raises(ValueError, match=r"labels: label 4 out of range \[0, 4\)"):
        svsl_loss(layers, labels, alpha=0.1, num_classes=4)
    with pytest.raises(ValueError, match="labels: negative label -1"):
        svsl_loss(layers, labels - 1, **ok)
    with pytest.raises(TypeError, match="labels"):
        svsl_loss(layers, labels.double(), **ok)
    with pytest.raises(ValueError, match="labels"):
        svsl_loss(layers, labels[None], **ok)
    with pytest.raises(ValueError, match="labels"):
        svsl_loss([g[:0] for g in layers], labels[:0], **ok)
    with pytest.raises(ValueError, match=r"layer_features\[1\]"):
        svsl_loss([layers[0], layers[1][:-1]], labels, **ok)
    with pytest.raises(ValueError, match=r"layer_features\[0\]"):
        svsl_loss([layers[0][:, :0]], labels, **ok)
    with pytest.raises(ValueError, match=r"layer_features\[2\]: on device meta"):
        svsl_loss([layers[0], layers[1], torch.empty(12, 3, device="meta")], labels, **ok)
    with pytest.raises(TypeError, match=r"layer_features\[1\]"):
        svsl_loss([layers[0], labels], labels, **ok)
    with pytest.raises(TypeError, match="layer_features"):
        svsl_loss(layers[0], labels, **ok)
    with pytest.raises(ValueError, match="layer_features"):
        svsl_loss([], labels, **ok)
    with pytest.raises(ValueError, match="alpha"):
        svsl_loss(layers, labels, alpha=-0.1, num_classes=5)
    with pytest.raises(ValueError, match="alpha"):
        svsl_loss(layers, labels, alpha=float("nan"), num_classes=5)
    with pytest.raises(TypeError, match="alpha"):
        svsl_loss(layers, labels, alpha="0.1", num_classes=5)
    with pytest.raises(TypeError):
        svsl_loss(layers, labels, alpha=0.1)  # num_classes is required


def test_reference_bad_input():
    layers, labels = _batch()
    with pytest.raises(ValueError, match="reduction"):
        ref.svsl_loss(layers, labels, alpha=0.1, num_classes=5, reduction="none")
    with pytest.raises(ValueError, match="num_classes"):
        ref.svsl_loss(layers, labels, alpha=0.1, num_classes=4)
    with pytest.raises(ValueError, match="alpha"):
        ref.svsl_loss(layers, labels, alpha=-1.0, num_classes=5)
    with pytest.raises(ValueError, match="layer_features"):
        ref.svsl_loss([], labels, alpha=0.1, num_classes=5)
