from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .layers import Normalize, PreActBlock


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016) for 32x32 inputs: wrn28-10, wrn34-10, wrn16-4."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, in_channels: int = 3,
                 mean=None, std=None):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6k + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = Normalize(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(PreActBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.blocks(self.conv1(self.normalize(x)))
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1))
