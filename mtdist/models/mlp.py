"""Small demo networks for 28x28 / 32x32 images: an MLP and a three-block CNN."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from mtdist.models.resnet import HeadedNet

MLP_HIDDEN = 512


class MLP(HeadedNet):
    """flatten -> [Linear -> BN -> ReLU -> Dropout] x 2 -> head(s); the second dropout is the head dropout."""

    def __init__(
        self,
        num_classes: int,
        *,
        two_heads: bool = True,
        in_channels: int = 1,
        input_size: int = 28,
        dropout: float = 0.0,
        hidden: int = MLP_HIDDEN,
    ):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(in_channels * input_size * input_size, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
        )
        self._init_heads(hidden, num_classes, two_heads, dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SmallCNN(HeadedNet):
    """Three [conv3x3 -> BN -> ReLU -> max-pool] blocks with width, 2*width, 4*width channels,
    then global average pooling; works at any input size >= 8."""

    def __init__(
        self,
        num_classes: int,
        *,
        two_heads: bool = True,
        in_channels: int = 1,
        dropout: float = 0.0,
        width: int = 64,
    ):
        super().__init__()
        chans = (in_channels, width, 2 * width, 4 * width)
        blocks = [_conv_block(cin, cout) for cin, cout in itertools.pairwise(chans)]
        self.body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self._init_heads(chans[-1], num_classes, two_heads, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )
