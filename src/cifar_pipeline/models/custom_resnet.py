"""CustomResNet: the fast CIFAR-10 ResNet (prep, three layers, two residual blocks) made popular by DAWNBench.

Every conv is 3x3, padding 1, without bias (the BatchNorm after it has one). 6,573,130 parameters.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int, dropout: float, pool: bool = False) -> list[nn.Module]:
    """Conv 3x3 [-> MaxPool 2] -> BN -> ReLU -> Dropout: pooling first leaves BN and ReLU a quarter of the pixels."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return layers


class CustomResNet(nn.Module):
    residual_branches = ("res1", "res2")  # added to their input in forward(); the receptive-field table notes them

    def __init__(self, dropout: float = 0.0, num_classes: int = 10):
        super().__init__()
        self.prep = nn.Sequential(*conv_bn(3, 64, dropout))  # 64x32x32
        self.layer1 = nn.Sequential(*conv_bn(64, 128, dropout, pool=True))  # 128x16x16
        self.res1 = nn.Sequential(*conv_bn(128, 128, dropout), *conv_bn(128, 128, dropout))
        self.layer2 = nn.Sequential(*conv_bn(128, 256, dropout, pool=True))  # 256x8x8
        self.layer3 = nn.Sequential(*conv_bn(256, 512, dropout, pool=True))  # 512x4x4
        self.res2 = nn.Sequential(*conv_bn(512, 512, dropout), *conv_bn(512, 512, dropout))
        self.pool = nn.MaxPool2d(4)  # 512x1x1
        self.fc = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last spatial feature map (512x4x4 for a 32x32 input), before the final pooling."""
        x = self.layer1(self.prep(x))
        x = x + self.res1(x)
        x = self.layer3(self.layer2(x))
        return x + self.res2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
