"""Model zoo. Inputs stay in pixel space [0, 1]: normalisation is the first layer of every
model, so attack budgets (eps) are in pixel units."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from .preact_resnet import PreActResNet18
from .resnet_cifar import ResNet32
from .small_cnn import SmallCNN
from .wide_resnet import WideResNet
from .layers import Normalize

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "wrn28-10": lambda **kw: WideResNet(depth=28, widen=10, **kw),
    "wrn34-10": lambda **kw: WideResNet(depth=34, widen=10, **kw),
    "wrn16-4": lambda **kw: WideResNet(depth=16, widen=4, **kw),
    "preact-resnet18": PreActResNet18,
    "resnet32": ResNet32,
    "small-cnn": SmallCNN,
}


def build_model(arch: str, *, num_classes: int = 10, in_channels: int = 3,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """`arch` from ARCHS, with a Normalize(mean, std) first layer (identity when both are None)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return ARCHS[arch](num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)


__all__ = ["ARCHS", "Normalize", "PreActResNet18", "ResNet32", "SmallCNN", "WideResNet", "build_model"]
