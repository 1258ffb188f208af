from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .layers import Normalize


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet32(nn.Module):
    """CIFAR ResNet-32 (He et al. 2016, 3 stages of 5 blocks, widths 16/32/64), the
    Meta-Weight-Net backbone for noisy and long-tailed CIFAR."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, mean=None, std=None, blocks: int = 5):
        super().__init__()
        self.normalize = Normalize(mean, std, in_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(self.normalize(x)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))
