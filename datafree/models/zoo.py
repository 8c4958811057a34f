"""The model zoo: one registry of classifiers by name.

Every model is a :class:`Classifier`: ``forward_features(x)`` gives the penultimate features,
``head`` maps them to logits, and ``forward(x) == head(forward_features(x))``, so synthesis can
look inside any of them without surgery.

Names: ``lenet5``, ``lenet5_half``, ``lenet5_nobn``, ``convnet`` (the dataset-condensation ConvNet),
``resnet8``, ``resnet20``, ``resnet18``, ``resnet34`` (CIFAR-style), and ``tv:NAME`` for any
torchvision classification model (random init, input channels and classes adapted; never
downloaded weights).

Example:
    >>> model = create_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datafree.base.errors import UserError
from datafree.base.registry import Registry

MODELS = Registry("architecture")
register_model = MODELS.register  # decorator for constructors fn(num_classes, in_channels, image_size, **kwargs)


def model_names() -> list[str]:
    return MODELS.names() + ["tv:<torchvision name>"]


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs) -> "Classifier":
    """Build a zoo model by name.

    Example:
        >>> create_model("convnet", 10, 1, 28, width=32, depth=3, norm="instance").head.in_features
        288
    """
    if name.startswith("tv:"):
        return TorchvisionClassifier(name[3:], num_classes, in_channels, **kwargs)
    if name not in MODELS:
        raise UserError(f"unknown architecture {name!r}; known: {', '.join(model_names())}")
    return MODELS.create(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Classifier(nn.Module):
    """Base class: subclasses define ``forward_features`` and a linear ``head``."""

    head: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# --- LeNet-5 ---------------------------------------------------------------------------------


class LeNet5(Classifier):
    """LeNet-5 as in DAFL: conv 5x5 (6) -> pool -> conv 5x5 (16) -> pool -> conv 5x5 (120) -> fc 84 -> fc.

    At 28x28 the first convolution pads by 2, which is LeNet-5 on 32x32 MNIST without a resize.
    ``width`` scales every layer (0.5 gives ``lenet5_half``); ``bn`` adds BatchNorm after each conv
    and the hidden fc.
    """

    def __init__(self, num_classes=10, in_channels=1, image_size=28, width=1.0, bn=True):
        super().__init__()
        c1, c2, c3, f = (max(1, round(v * width)) for v in (6, 16, 120, 84))
        norm = (lambda n: nn.BatchNorm2d(n)) if bn else (lambda n: nn.Identity())
        pad = 2 if image_size == 28 else 0
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=pad), norm(c1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), norm(c2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 5), norm(c3), nn.ReLU(inplace=True), nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.body(torch.zeros(2, in_channels, image_size, image_size)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, f), nn.BatchNorm1d(f) if bn else nn.Identity(), nn.ReLU(inplace=True))
        self.head = nn.Linear(f, num_classes)

    def forward_features(self, x):
        return self.fc(self.body(x))


@register_model("lenet5")
def lenet5(num_classes=10, in_channels=1, image_size=28):
    return LeNet5(num_classes, in_channels, image_size, width=1.0, bn=True)


@register_model("lenet5_half")
def lenet5_half(num_classes=10, in_channels=1, image_size=28):
    return LeNet5(num_classes, in_channels, image_size, width=0.5, bn=True)


@register_model("lenet5_nobn")
def lenet5_nobn(num_classes=10, in_channels=1, image_size=28):
    return LeNet5(num_classes, in_channels, image_size, width=1.0, bn=False)


@register_model("lenet5_half_nobn")
def lenet5_half_nobn(num_classes=10, in_channels=1, image_size=28):
    return LeNet5(num_classes, in_channels, image_size, width=0.5, bn=False)


# --- the dataset-condensation ConvNet ----------------------------------------------------------


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "instance":  # as in the DC code: GroupNorm with one group per channel, affine
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise UserError(f"unknown norm {kind!r}; use instance, batch or none")


class ConvNet(Classifier):
    """The ConvNet of dataset condensation: ``depth`` x [conv3x3(width), norm, ReLU, avgpool 2] -> linear.

    ``first_padding`` pads the first convolution; :func:`reference_padding` gives the reference
    code's choice (3 for 1-channel 28-pixel images, which then run at 32 x 32).
    """

    def __init__(self, num_classes=10, in_channels=1, image_size=28, width=128, depth=3, norm="instance", first_padding=1):
        super().__init__()
        layers, c, size = [], in_channels, image_size + 2 * (first_padding - 1)
        for d in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=first_padding if d == 0 else 1), _norm2d(norm, width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, size = width, size // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(width * size * size, num_classes)

    def forward_features(self, x):
        return self.body(x)

    def block_features(self, x) -> list[torch.Tensor]:
        """The output of every [conv, norm, ReLU, pool] block, flattened per image; the last is
        :meth:`forward_features`.

        Example:
            >>> [f.shape[1] for f in ConvNet(width=8).block_features(torch.zeros(2, 1, 28, 28))]
            [1568, 392, 72]
        """
        outputs = []
        for start in range(0, len(self.body) - 1, 4):
            x = self.body[start:start + 4](x)
            outputs.append(x.flatten(1))
        return outputs


register_model("convnet")(ConvNet)


def reference_padding(channels: int, size: int) -> int:
    """The first-layer padding of the reference DC/DSA/DM ConvNet (VICO-UoE/DatasetCondensation,
    ``networks.ConvNet``): 3 for 1-channel 28 x 28 inputs (MNIST-like, run as 32 x 32, so three
    poolings keep 4 x 4 features where 28 x 28 gives 3 x 3, the 7 -> 3 pooling dropping a row and a column), 1 otherwise.

    Example:
        >>> reference_padding(1, 28), reference_padding(3, 32)
        (3, 1)
    """
    return 3 if channels == 1 and size == 28 else 1


# --- CIFAR-style ResNets --------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(Classifier):
    """ResNet for small images: a 3x3 stem (no max-pool), stages of basic blocks, global average pool."""

    def __init__(self, blocks, widths, num_classes=10, in_channels=3, image_size=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, c = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stages.append(BasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, num_classes)

    def forward_features(self, x):
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)


@register_model("resnet8")
def resnet8(num_classes=10, in_channels=3, image_size=32):
    return CifarResNet([1, 1, 1], [16, 32, 64], num_classes, in_channels, image_size)


@register_model("resnet20")
def resnet20(num_classes=10, in_channels=3, image_size=32):
    return CifarResNet([3, 3, 3], [16, 32, 64], num_classes, in_channels, image_size)


@register_model("resnet18")
def resnet18(num_classes=10, in_channels=3, image_size=32):
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, image_size)


@register_model("resnet34")
def resnet34(num_classes=10, in_channels=3, image_size=32):
    return CifarResNet([3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels, image_size)


# --- any torchvision classifier -----------------------------------------------------------------


class TorchvisionClassifier(Classifier):
    """A torchvision classification model, randomly initialised, with its first convolution taking
    ``in_channels`` and its last linear layer split off as ``head`` with ``num_classes`` outputs."""

    def __init__(self, name, num_classes=10, in_channels=3, image_size=None, **kwargs):
        super().__init__()
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise UserError(f"unknown torchvision classification model {name!r}")
        self.body = torchvision.models.get_model(name, weights=None, **kwargs)
        _replace_first_conv(self.body, in_channels)
        path, last = _last_linear(self.body)
        _set_module(self.body, path, nn.Identity())
        self.head = nn.Linear(last.in_features, num_classes)

    def forward_features(self, x):
        return self.body(x)


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("this torchvision model has no final linear layer to use as the classifier head")
    return linears[-1]


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    path, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups if conv.groups == 1 else in_channels, conv.bias is not None)
    _set_module(model, path, new)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
