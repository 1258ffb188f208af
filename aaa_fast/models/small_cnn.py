from __future__ import annotations

from torch import nn

from .layers import Normalize


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Four 3x3 conv layers (32, 32, 64, 64) with BatchNorm, two max-pools, a 200-unit hidden
    layer: the usual small network for 28x28 inputs (Fashion-MNIST); any input size works."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, mean=None, std=None, width: int = 32):
        super().__init__()
        self.normalize = Normalize(mean, std, in_channels)
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width), *_conv_bn(width, width), nn.MaxPool2d(2),
            *_conv_bn(width, 2 * width), *_conv_bn(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7),  # identity on 28x28 inputs; lets other sizes through
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 49, 200), nn.ReLU(inplace=True), nn.Linear(200, num_classes)
        )

    def forward(self, x):
        return self.head(self.features(self.normalize(x)))
