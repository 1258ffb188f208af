from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .layers import Normalize, PreActBlock


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (He et al. 2016) for 32x32 inputs, as used by TRADES/FRL/CAAT."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, mean=None, std=None):
        super().__init__()
        self.normalize = Normalize(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layers(self.conv1(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)
