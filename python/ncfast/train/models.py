"""Networks of the reference trainer: CIFAR-style ResNet-18/34, DenseNet-121/169/201, VGG-11/13/16/19
(BN) and an MLP of any depth and width.

Every model maps x to logits with ``forward(x)`` and exposes

- ``head``: the final ``nn.Linear``, so W = ``head.weight`` and b = ``head.bias`` (docs/metrics.md notation);
- ``penultimate_name``: the module whose output is the head's input, the features h of docs/metrics.md;
- ``default_probe_layers``: module names whose outputs the trainer records by default (each stage,
  then the penultimate features), all resolvable through ``dict(model.named_modules())``.

The convolutional models work for any input from 8 x 8 up (digits included): pooling ends in an
adaptive average pool, and VGG's max-pools and DenseNet's transition pools are skipped once the
feature map is 1 pixel high or wide.

The knobs of paper 002 (rank collapse driven by the logits norm; its Figures 1-4 and 7-12):

- ``init_scale`` (``build_model`` / ``scale_init_``): the weights of every conv and linear layer are
  multiplied by this factor after PyTorch's default initialisation (biases, BN and LayerNorm are left
  alone). The paper's "init sigma" sweeps the scale of the initial weights, and Figure 1 (top) shows
  the initial logits norm, and with it the final rank, following it almost linearly. Note that a
  convolution followed by batch norm is scale-invariant, so in the CNNs only the head changes the
  initial logits (in the MLP every layer does).
- ``output_norm="layernorm"``: a LayerNorm without affine parameters on the penultimate features,
  just before the head, so every feature vector has mean 0 and variance 1 over its D entries and
  ||h|| = sqrt(D). The paper applies "a normalization layer at the output of the network" that
  "prevents increasing the logits norm" (Figure 1 bottom, Figures 2-4); its text does not say more.
  With it, ``penultimate_name`` is "norm": the metrics see the normalised features the head sees.
- ``logit_scale``: not a model attribute; forward always returns the raw logits z = W h + b, so NC3 /
  NC4 computed from ``head`` agree with the model's decisions. The trainer computes the loss on
  ``logits_for_loss(z, T)`` = T * z, with T the "temperature" of paper 002's captions, which
  multiplies the logits (T = 100 means logits x 100; the figure titles show 1/T, as the captions
  note). A greater T gives a greater initial logits norm and more rank collapse (its Figures 7-12).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("resnet18", "densenet121", "vgg11", "mlp")  # the four families
OUTPUT_NORMS = (None, "layernorm")
INITS = ("default", "kaiming")
# every architecture name build_model takes: a family at its default depth, or a deeper sibling
ARCH_NAMES = ARCHS + ("resnet34", "densenet169", "densenet201", "vgg13", "vgg16", "vgg19")
MLP_DEPTH, MLP_WIDTH = 2, 512  # the MLP's default hidden layers and units
MLP_MAX_DEPTH = 10_000  # the most hidden layers the MLP takes (bounds what footprint() builds on the meta device)
MAX_WIDTH = 1 << 24  # the widest model taken: far beyond any machine's memory, and inside int64's element counts


def _attach_head(model: nn.Module, features_name: str, dim: int, num_classes: int, output_norm, stages: list[str]):
    """Add ``norm`` (LayerNorm or Identity) and ``head``, and the names every model exposes."""
    if output_norm not in OUTPUT_NORMS:
        raise ValueError(f"output_norm: must be one of {OUTPUT_NORMS}, got {output_norm!r}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
    if output_norm == "layernorm":
        model.norm = nn.LayerNorm(dim, elementwise_affine=False)
        model.penultimate_name = "norm"
    else:
        model.norm = nn.Identity()
        model.penultimate_name = features_name
    model.head = nn.Linear(dim, int(num_classes))
    model.default_probe_layers = [s for s in stages if s != model.penultimate_name]
    model.default_probe_layers.append(model.penultimate_name)


def _global_pool() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ------------------------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (or -34): 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2]
    ([3, 4, 6, 3] at depth 34) of widths width * (1, 2, 4, 8) at strides (1, 2, 2, 2), global average
    pool, linear head.

    Probe layers: layer1 .. layer4 (stage outputs), then the penultimate features.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64, output_norm=None, depth: int = 18):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        channels = width
        for i, (mult, stride, n) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2), RESNET_BLOCKS[depth]), start=1):
            blocks = [BasicBlock(channels, width * mult, stride)]
            blocks += [BasicBlock(width * mult, width * mult, 1) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            channels = width * mult
        self.pool = _global_pool()
        _attach_head(self, "pool", channels, num_classes, output_norm, ["layer1", "layer2", "layer3", "layer4"])

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.head(self.norm(self.pool(out)))


def resnet18(num_classes: int, in_channels: int = 3, width: int = 64, output_norm=None, depth: int = 18) -> ResNet18:
    return ResNet18(num_classes, in_channels, width, output_norm, depth)


# ----------------------------------------------------------------------------------------- DenseNet-121


class DenseLayer(nn.Module):
    """Bottleneck BN-ReLU-conv1x1 (4 * growth) then BN-ReLU-conv3x3 (growth), concatenated to x."""

    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compression) then a 2x2 average pool, skipped once the map is 1 pixel wide."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x):
        out = self.conv(F.relu(self.bn(x)))
        return F.avg_pool2d(out, 2) if min(out.shape[-2:]) >= 2 else out


DENSENET_BLOCKS = {121: (6, 12, 24, 16), 169: (6, 12, 32, 32), 201: (6, 12, 48, 32)}


class DenseNet121(nn.Module):
    """CIFAR-style DenseNet-121 (BC): growth 32, dense blocks (6, 12, 24, 16) (DENSENET_BLOCKS for
    169 and 201), bottleneck layers,
    compression 0.5, a 3x3 stem with 2 * growth channels and no initial pool, final BN-ReLU, global
    average pool, linear head (1024 features).

    Probe layers: trans1 .. trans3 (after each of the first three blocks), final (BN-ReLU after the
    last block), then the penultimate features.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        growth: int = 32,
        blocks=(6, 12, 24, 16),
        compression: float = 0.5,
        output_norm=None,
    ):
        super().__init__()
        channels = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        for i, n in enumerate(blocks, start=1):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            self.add_module(f"dense{i}", nn.Sequential(*layers))
            if i < len(blocks):
                out = int(math.floor(channels * compression))
                self.add_module(f"trans{i}", Transition(channels, out))
                channels = out
        self.final = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
        self.pool = _global_pool()
        self._num_blocks = len(blocks)
        _attach_head(
            self, "pool", channels, num_classes, output_norm, [f"trans{i}" for i in range(1, len(blocks))] + ["final"]
        )

    def forward(self, x):
        out = self.conv1(x)
        for i in range(1, self._num_blocks + 1):
            out = getattr(self, f"dense{i}")(out)
            if i < self._num_blocks:
                out = getattr(self, f"trans{i}")(out)
        return self.head(self.norm(self.pool(self.final(out))))


def densenet121(
    num_classes: int, in_channels: int = 3, output_norm=None, depth: int = 121, width: int = 32
) -> DenseNet121:
    """DenseNet-``depth`` (121, 169, 201) with growth rate ``width``."""
    return DenseNet121(num_classes, in_channels, growth=width, blocks=DENSENET_BLOCKS[depth], output_norm=output_norm)


# ----------------------------------------------------------------------------------------------- VGG-11


class MaxPoolIfLarger(nn.Module):
    """2x2 max-pool, skipped once the map is 1 pixel high or wide (so 8 x 8 inputs get through)."""

    def forward(self, x):
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


VGG_CONVS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


class VGG11(nn.Module):
    """VGG with batch norm (Simonyan & Zisserman's configurations A, B, D, E: depth 11, 13, 16, 19):
    five blocks of conv3x3-BN-ReLU layers of widths width * (1, 2, 4, 8, 8), VGG_CONVS[depth] layers
    per block (VGG-11: 64 | 128 | 256, 256 | 512, 512 | 512, 512), each block ending in a 2x2
    max-pool, then a global average pool and one linear head.

    Probe layers: block1 .. block5, then the penultimate features.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, output_norm=None, depth: int = 11, width: int = 64):
        super().__init__()
        channels = in_channels
        blocks = [(width * mult,) * n for mult, n in zip((1, 2, 4, 8, 8), VGG_CONVS[depth])]
        for i, widths in enumerate(blocks, start=1):
            layers = []
            for w in widths:
                layers += [nn.Conv2d(channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                channels = w
            layers.append(MaxPoolIfLarger())
            self.add_module(f"block{i}", nn.Sequential(*layers))
        self.pool = _global_pool()
        _attach_head(self, "pool", channels, num_classes, output_norm, [f"block{i}" for i in range(1, 6)])

    def forward(self, x):
        out = self.block5(self.block4(self.block3(self.block2(self.block1(x)))))
        return self.head(self.norm(self.pool(out)))


def vgg11(num_classes: int, in_channels: int = 3, output_norm=None, depth: int = 11, width: int = 64) -> VGG11:
    """VGG-``depth`` (11, 13, 16, 19) with batch norm and base width ``width``."""
    return VGG11(num_classes, in_channels, output_norm, depth, width)


# ------------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Flatten, then Linear-ReLU hidden layers layer1 .. layerL, then the linear head.

    Takes flat (N, D) or image (N, C, H, W) input (in_features = D or C * H * W). Paper 000
    appendix B's "2-layer MLP" is ``hidden=(h,)``. Probe layers: every hidden layer (the last one is
    the penultimate features unless output_norm adds ``norm`` after it).
    """

    def __init__(self, num_classes: int, in_features: int, hidden=(512, 512), output_norm=None):
        super().__init__()
        self.flatten = nn.Flatten()
        dim = int(in_features)
        self._hidden = []
        for i, h in enumerate(hidden, start=1):
            self.add_module(f"layer{i}", nn.Sequential(nn.Linear(dim, int(h)), nn.ReLU()))
            self._hidden.append(f"layer{i}")
            dim = int(h)
        _attach_head(
            self, self._hidden[-1] if self._hidden else "flatten", dim, num_classes, output_norm, list(self._hidden)
        )

    def forward(self, x):
        out = self.flatten(x)
        for name in self._hidden:
            out = getattr(self, name)(out)
        return self.head(self.norm(out))


def mlp(num_classes: int, in_features: int, hidden=(512, 512), output_norm=None) -> MLP:
    return MLP(num_classes, in_features, hidden, output_norm)


# -------------------------------------------------------------------------------------- paper 002 knobs


def scale_init_(model: nn.Module, init_scale: float) -> nn.Module:
    """Multiply the weight of every conv and linear layer by ``init_scale`` in place; returns model."""
    if not (math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"init_scale: must be a finite number > 0, got {init_scale}")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(init_scale)
    return model


def logits_for_loss(logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * z, the logits the softmax cross-entropy sees under paper 002's logit scale T = scale."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a finite number > 0, got {scale}")
    return logits if scale == 1 else logits * scale


def init_weights_(model: nn.Module, scheme: str = "default") -> nn.Module:
    """Re-initialise every conv and linear layer in place; returns model.

    "default" keeps PyTorch's initialisation (Kaiming-uniform with a = sqrt(5): weights of variance
    1 / (3 fan_in), which shrinks the signal layer after layer in a ReLU network); "kaiming" draws the
    weights from He et al.'s variance-preserving N(0, 2 / fan_in) (``kaiming_normal_``, fan_in, ReLU
    gain) and zeroes the biases (paper 002 fig. 6 compares the two)."""
    if scheme not in INITS:
        raise ValueError(f"init: must be one of {INITS}, got {scheme!r}")
    if scheme == "kaiming":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                    if m.bias is not None:
                        m.bias.zero_()
    return model


_FAMILY_DEPTHS = {"resnet": tuple(RESNET_BLOCKS), "densenet": tuple(DENSENET_BLOCKS), "vgg": tuple(VGG_CONVS)}


def resolve_arch(arch: str, depth: int | None = None) -> tuple[str, int]:
    """(family, depth) of an architecture name and an optional depth that overrides the name's:
    ("vgg11", 16) and ("vgg16", None) are both ("vgg", 16); ("mlp", None) is ("mlp", MLP_DEPTH)."""
    if arch not in ARCH_NAMES:
        raise ValueError(f"arch: unknown architecture {arch!r}; choose one of {', '.join(ARCH_NAMES)}")
    if arch == "mlp":
        d = MLP_DEPTH if depth is None else int(depth)
        if d < 1:
            raise ValueError(f"depth: the MLP needs at least 1 hidden layer, got {depth}")
        if d > MLP_MAX_DEPTH:
            raise ValueError(f"depth: the MLP takes at most {MLP_MAX_DEPTH:,} hidden layers, got {depth}")
        return "mlp", d
    family = arch.rstrip("0123456789")
    d = int(arch[len(family) :]) if depth is None else int(depth)
    if d not in _FAMILY_DEPTHS[family]:
        raise ValueError(f"depth: {family} comes in depths {_FAMILY_DEPTHS[family]}, got {depth}")
    return family, d


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    input_size=None,
    init_scale: float = 1.0,
    output_norm=None,
    depth: int | None = None,
    width: int | None = None,
    init: str = "default",
    hidden=None,
) -> nn.Module:
    """One of ``ARCH_NAMES`` for inputs (N, in_channels, H, W), or (N, in_channels) when input_size is None.

    Args:
        arch: "resnet18", "densenet121", "vgg11", "mlp", or a deeper sibling ("resnet34",
            "densenet169", "densenet201", "vgg13", "vgg16", "vgg19").
        num_classes: outputs of the head (the number of training labels: coarse, fine or original).
        in_channels: image channels, or the feature dimension D of flat input (input_size None).
        input_size: H (square) or (H, W) of image input; None for flat input (mlp only). The
            convolutional models accept any size from 8 x 8 up; the MLP needs it for in_features.
        init_scale: factor on the initial weights of every conv / linear layer (paper 002), applied
            after ``init``.
        output_norm: None or "layernorm" (affine-free LayerNorm on the penultimate features).
        depth: overrides the name's depth: ResNet 18 / 34, DenseNet 121 / 169 / 201, VGG 11 / 13 / 16
            / 19; the MLP's number of hidden layers (default 2).
        width: base channels of ResNet / VGG (64), DenseNet's growth rate (32), the MLP's hidden
            units (512); None: those defaults.
        init: "default" (PyTorch's) or "kaiming" (``init_weights_``).
        hidden: the MLP's hidden widths as a tuple, instead of depth x width.
    """
    family, d = resolve_arch(arch, depth)
    if width is not None and not 1 <= int(width) <= MAX_WIDTH:
        raise ValueError(f"width: must be between 1 and {MAX_WIDTH:,}, got {width}")
    if hidden is not None and family != "mlp":
        raise ValueError(f"hidden: applies to the mlp only, not {arch!r}")
    if input_size is None:
        size = None
    else:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"input_size: must be H or (H, W) with positive sizes, got {input_size}")
    if family == "mlp":
        in_features = in_channels if size is None else in_channels * size[0] * size[1]
        if hidden is None:
            hidden = (MLP_WIDTH if width is None else int(width),) * d
        model = mlp(num_classes, in_features, hidden=tuple(hidden), output_norm=output_norm)
    else:
        if size is None:
            raise ValueError(f"input_size: {arch} needs image input (N, C, H, W); use arch='mlp' for flat features")
        options = {} if width is None else {"width": int(width)}
        builder = {"resnet": resnet18, "densenet": densenet121, "vgg": vgg11}[family]
        model = builder(num_classes, in_channels, output_norm=output_norm, depth=d, **options)
    init_weights_(model, init)
    if init_scale != 1.0:
        scale_init_(model, init_scale)
    return model


def footprint(
    arch: str,
    num_classes: int,
    in_channels: int,
    input_size=None,
    output_norm=None,
    depth: int | None = None,
    width: int | None = None,
    hidden=None,
) -> tuple[int, int]:
    """(parameters, activation floats per sample) of the model ``build_model`` builds with these
    arguments, told without allocating it.

    The convolutional models are built on the meta device (tensors with shapes and no storage):
    their parameters are counted, and one sample is sent through them in eval mode with a forward
    hook on every leaf module that adds up the sizes of their outputs (``_meta_footprint``). The
    MLP, whose meta forward would cost a millisecond a layer at its 10,000 layers, is counted by
    formula instead, to the same numbers.

    The activation count is what autograd keeps of one sample's forward pass at the least: the
    outputs of the convolutions, norms, linear layers, ReLU modules and pools (an output that is its
    input, as an in-place ReLU's, and the views of Identity and Flatten are not counted; the
    functional ReLUs and sums between modules are not counted at all). The arguments are checked as
    ``build_model`` checks them (ValueError)."""
    family, d = resolve_arch(arch, depth)
    if family != "mlp":
        return _meta_footprint(arch, num_classes, in_channels, input_size, output_norm, depth, width, hidden)
    if width is not None and not 1 <= int(width) <= MAX_WIDTH:
        raise ValueError(f"width: must be between 1 and {MAX_WIDTH:,}, got {width}")
    if output_norm not in OUTPUT_NORMS:
        raise ValueError(f"output_norm: must be one of {OUTPUT_NORMS}, got {output_norm!r}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
    size = (
        (1, 1)
        if input_size is None
        else ((input_size, input_size) if isinstance(input_size, int) else tuple(input_size))
    )
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size: must be H or (H, W) with positive sizes, got {input_size}")
    widths = [int(in_channels) * size[0] * size[1]]
    widths += [int(h) for h in hidden] if hidden is not None else [MLP_WIDTH if width is None else int(width)] * d
    c = int(num_classes)
    params = sum(a * b + b for a, b in zip(widths, widths[1:])) + widths[-1] * c + c
    # every hidden layer: the Linear's and the ReLU's outputs; then the LayerNorm's (if any) and the head's
    floats = 2 * sum(widths[1:]) + (widths[-1] if output_norm == "layernorm" else 0) + c
    return params, floats


def _meta_footprint(
    arch, num_classes, in_channels, input_size=None, output_norm=None, depth=None, width=None, hidden=None
) -> tuple[int, int]:
    """``footprint`` from the model built on the meta device and one meta forward of a sample."""
    total = [0]

    def count(module, inputs, output):
        if isinstance(module, (nn.Identity, nn.Flatten)) or any(output is t for t in inputs):
            return
        total[0] += output.numel()

    with torch.device("meta"):
        model = build_model(
            arch, num_classes, in_channels, input_size, output_norm=output_norm, depth=depth, width=width, hidden=hidden
        )
    params = sum(p.numel() for p in model.parameters())
    size = (
        () if input_size is None else ((input_size, input_size) if isinstance(input_size, int) else tuple(input_size))
    )
    for m in model.modules():
        if next(m.children(), None) is None:
            m.register_forward_hook(count)
    model.eval()  # batch norm on one sample: the running statistics, as measure() does
    with torch.no_grad():
        model(torch.empty((1, int(in_channels), *size), device="meta"))
    return int(params), int(total[0])
