"""Plain-PyTorch reference models (no torchvision).

Every ``forward`` is free of data-dependent Python control flow, so each model
traces with :func:`torch.fx.symbolic_trace` (the graph-based hooks and the
pruning integration rely on this).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._checks import bool_arg, positive_int

__all__ = ["ACTIVATIONS", "MLP", "SmallCNN", "ResNet", "BasicBlock", "VGG", "resnet18", "vgg11", "vgg16"]

#: Activation names accepted by :class:`MLP`, mapped to their module classes.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


def _activation(name: object) -> nn.Module:
    if not isinstance(name, str) or name.strip().lower() not in ACTIVATIONS:
        allowed = ", ".join(repr(k) for k in ACTIVATIONS)
        raise ValueError(f"Expected activation to be one of {allowed}, but got activation={name!r}")
    return ACTIVATIONS[name.strip().lower()]()


class MLP(nn.Sequential):
    """Fully connected classifier: ``Flatten → (Linear → act) × len(widths) → Linear``.

    With widths ``(h_1, …, h_L)`` the model computes
    ``f(x) = W_{L+1} σ(W_L … σ(W_1 x + b_1) … + b_L) + b_{L+1}``; the head
    ``W_{L+1}`` has no activation (it returns logits).

    Args:
        in_features: input dimension after flattening.
        widths: hidden widths, possibly empty (then the model is a linear classifier).
        num_classes: number of output logits.
        activation: one of ``"relu"``, ``"gelu"``, ``"silu"``, ``"mish"``,
            ``"hardswish"``, ``"tanh"``, ``"leaky_relu"``.
        bias: whether every Linear layer has a bias.

    Example:
        >>> model = MLP(64, (64, 64), 10)
        >>> model(torch.zeros(5, 64)).shape
        torch.Size([5, 10])
        >>> model.head.out_features
        10
    """

    def __init__(
        self,
        in_features: int = 64,
        widths: Sequence[int] = (256, 256),
        num_classes: int = 10,
        activation: str = "relu",
        bias: bool = True,
    ) -> None:
        in_features = positive_int(in_features, "in_features")
        num_classes = positive_int(num_classes, "num_classes")
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
            raise TypeError(
                f"Expected widths to be a sequence of positive integers, but got widths={widths!r}"
            )
        widths = tuple(positive_int(w, f"widths[{i}]") for i, w in enumerate(widths))
        _activation(activation)  # validate before building anything
        bias = bool_arg(bias, "bias")

        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_features
        for w in widths:
            layers += [nn.Linear(fan_in, w, bias=bias), _activation(activation)]
            fan_in = w
        layers.append(nn.Linear(fan_in, num_classes, bias=bias))
        super().__init__(*layers)

    @property
    def head(self) -> nn.Linear:
        """The final (logit) Linear layer."""
        return self[-1]


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head, for 8×8 digits or 32×32 images.

    ``x → [conv3×3 → BN → ReLU → maxpool 2×2] (width ch) → [same] (2·width ch)
    → flatten → Linear(2·width·(input_size/4)², num_classes)``. The pools do not
    overlap (kernel = stride = 2), and each BN directly follows its conv, so it
    can be folded into the conv weight.

    Args:
        in_channels: input channels (1 for digits, 3 for CIFAR).
        num_classes: number of output logits.
        width: channels of the first block (the second has ``2·width``).
        batch_norm: insert BatchNorm2d after each conv (the convs then have no bias).
        input_size: height = width of the square input, a multiple of 4.

    Example:
        >>> model = SmallCNN(in_channels=1, input_size=8)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        batch_norm: bool = True,
        input_size: int = 32,
    ) -> None:
        in_channels = positive_int(in_channels, "in_channels")
        num_classes = positive_int(num_classes, "num_classes")
        width = positive_int(width, "width")
        batch_norm = bool_arg(batch_norm, "batch_norm")
        input_size = positive_int(input_size, "input_size")
        if input_size % 4:
            raise ValueError(
                f"Expected input_size to be a multiple of 4 (two 2×2 pools), but got input_size={input_size}"
            )
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            return nn.Sequential(*layers)

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width))
        self.flatten = nn.Flatten()
        self.head = nn.Linear(2 * width * (input_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.features(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``.

    The shortcut is the identity when the shape is kept, else a 1×1 strided
    conv followed by BN (the "option B" projection of He et al., 2016).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem (no max-pool), four stages of basic blocks,
    global average pool, Linear head. Build it with :func:`resnet18`."""

    def __init__(self, blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(self.flatten(self.pool(x)))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """The CIFAR ResNet-18 (He et al., 2016; the common 32×32 variant), ≈11.17M parameters.

    Stem ``conv3×3(64) → BN → ReLU`` with no max-pool, then basic blocks
    ``[2, 2, 2, 2]`` with 64, 128, 256, 512 channels (stride 2 at the start of
    stages 2–4, 1×1 conv + BN projection shortcuts there), adaptive average
    pool and ``Linear(512, num_classes)``. Any input size ≥ 8 works; it is
    designed for 32×32.

    Args:
        num_classes: number of output logits.
        in_channels: input channels.

    Returns:
        A :class:`ResNet` (``model.head`` is the final Linear).

    Example:
        >>> model = resnet18()
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    num_classes = positive_int(num_classes, "num_classes")
    in_channels = positive_int(in_channels, "in_channels")
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


# Channel plans of Simonyan & Zisserman (2015); "M" is a 2×2 max-pool.
_VGG_CFG: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """CIFAR-style VGG: 3×3 conv stack with five non-overlapping 2×2 max-pools
    (32×32 → 1×1), flatten, ``Linear(512, num_classes)``. Build it with
    :func:`vgg11` or :func:`vgg16`."""

    def __init__(
        self, cfg: Sequence[int | str], num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(nn.Conv2d(cin, int(v), 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(int(v)))
                layers.append(nn.ReLU())
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.features(x)))


def _vgg(name: str, num_classes: int, in_channels: int, batch_norm: bool) -> VGG:
    num_classes = positive_int(num_classes, "num_classes")
    in_channels = positive_int(in_channels, "in_channels")
    batch_norm = bool_arg(batch_norm, "batch_norm")
    return VGG(_VGG_CFG[name], num_classes=num_classes, in_channels=in_channels, batch_norm=batch_norm)


def vgg11(num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True) -> VGG:
    """VGG-11 for 32×32 inputs: 8 conv layers (64, M, 128, M, 256×2, M, 512×2, M, 512×2, M)
    and a Linear head, ≈9.2M parameters.

    Five 2×2 pools take 32×32 to 1×1, which the ``Linear(512, ·)`` head expects;
    inputs of 64×64 or more leave more features than that and fail.

    Args:
        num_classes: number of output logits.
        in_channels: input channels.
        batch_norm: BatchNorm2d after every conv (the convs then have no bias).

    Returns:
        A :class:`VGG` (``model.head`` is the final Linear).

    Example:
        >>> vgg11()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return _vgg("vgg11", num_classes, in_channels, batch_norm)


def vgg16(num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True) -> VGG:
    """VGG-16 for 32×32 inputs: 13 conv layers (64×2, M, 128×2, M, 256×3, M, 512×3, M,
    512×3, M) and a Linear head, ≈14.7M parameters.

    Args:
        num_classes: number of output logits.
        in_channels: input channels.
        batch_norm: BatchNorm2d after every conv (the convs then have no bias).

    Returns:
        A :class:`VGG` (``model.head`` is the final Linear).

    Example:
        >>> vgg16()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return _vgg("vgg16", num_classes, in_channels, batch_norm)
