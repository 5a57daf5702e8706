"""DilatedNet: a small CIFAR-10 net (< 200k parameters) without max-pooling, ending in global average pooling.

C1..C3 each end in a transition that shrinks the resolution. With downsample="stride" it is a stride-2 3x3 conv.
With downsample="dilation" nothing is ever strided or pooled: the transition is a dilated conv and every later conv
has its dilation doubled instead, which widens the receptive field like a stride would (the "atrous" trick), at the
cost of running every layer at 32x32. C3 and C4 use depthwise-separable convs, C2 one dilated conv in both variants.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar_pipeline.params import DOWNSAMPLE_MODES


def conv_bn(
    in_channels: int,
    out_channels: int,
    dropout: float,
    *,
    stride: int = 1,
    dilation: int = 1,
    separable: bool = False,
) -> list[nn.Module]:
    """A 3x3 conv (plain, or depthwise + 1x1 pointwise) -> BN -> ReLU -> Dropout; the padding keeps the size."""
    if separable:
        convs = [
            nn.Conv2d(in_channels, in_channels, 3, stride, dilation, dilation, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        ]
    else:
        convs = [nn.Conv2d(in_channels, out_channels, 3, stride, dilation, dilation, bias=False)]
    return [*convs, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.Dropout(dropout)]


class DilatedNet(nn.Module):
    def __init__(self, dropout: float = 0.0, downsample: str = "stride", num_classes: int = 10):
        super().__init__()
        if downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {downsample!r}")
        # Dilation multiplier of each block: the dilation variant doubles it where the stride variant halves the size.
        r1, r2, r3, r4 = (1, 2, 4, 8) if downsample == "dilation" else (1, 1, 1, 1)

        def transition(in_channels: int, out_channels: int, next_rate: int, separable: bool = False) -> list[nn.Module]:
            if downsample == "stride":
                return conv_bn(in_channels, out_channels, dropout, stride=2, separable=separable)
            return conv_bn(in_channels, out_channels, dropout, dilation=next_rate, separable=separable)

        self.c1 = nn.Sequential(
            *conv_bn(3, 32, dropout, dilation=r1),
            *conv_bn(32, 32, dropout, dilation=r1),
            *transition(32, 32, r2),
        )  # 32x16x16 in the stride variant; the dilation variant stays at 32x32 throughout
        self.c2 = nn.Sequential(
            *conv_bn(32, 64, dropout, dilation=r2),
            *conv_bn(64, 64, dropout, dilation=2 * r2),
            *transition(64, 64, r3),
        )  # 64x8x8
        self.c3 = nn.Sequential(
            *conv_bn(64, 128, dropout, dilation=r3, separable=True),
            *conv_bn(128, 128, dropout, dilation=r3, separable=True),
            *transition(128, 128, r4, separable=True),
        )  # 128x4x4
        self.c4 = nn.Sequential(
            *conv_bn(128, 128, dropout, dilation=r4, separable=True),
            *conv_bn(128, 128, dropout, dilation=r4, separable=True),
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last spatial feature map (128x4x4, or 128x32x32 in the dilation variant), before the pooling."""
        return self.c4(self.c3(self.c2(self.c1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.gap(self.features(x)), 1))
