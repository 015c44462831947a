"""ResNet / ResNeXt backbones ending in one or two linear heads (Mean Teacher "logit distance")."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class HeadedNet(nn.Module):
    """Base for every model: subclasses provide `forward_features`; this adds dropout and the heads.

    Head 1 (`head_cls`) drives the supervised loss, evaluation and the teacher's target; head 2
    (`head_cons`) is the student's consistency head. Both read the same pooled features.
    """

    def _init_heads(self, feature_dim: int, num_classes: int, two_heads: bool, dropout: float) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.two_heads = two_heads
        self.head_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head_cls = nn.Linear(feature_dim, num_classes)
        self.head_cons = nn.Linear(feature_dim, num_classes) if two_heads else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.head_dropout(self.forward_features(x))
        logits = self.head_cls(feats)
        if self.head_cons is None:
            # Same tensor twice so the training loop never needs to branch on the head count.
            return logits, logits
        return logits, self.head_cons(feats)


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, cin: int, planes: int, stride: int, downsample: nn.Module | None, inner: int, groups: int
    ):
        super().__init__()
        if groups != 1 or inner != planes:
            raise ValueError("BasicBlock supports neither groups nor a changed inner width")
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (grouped for ResNeXt) -> 1x1; the stride sits on the 3x3 ("v1.5")."""

    expansion = 4

    def __init__(
        self, cin: int, planes: int, stride: int, downsample: nn.Module | None, inner: int, groups: int
    ):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = _conv1x1(cin, inner)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = _conv3x3(inner, inner, stride, groups)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = _conv1x1(inner, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(HeadedNet):
    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],
        num_classes: int,
        *,
        groups: int = 1,
        width_per_group: int = 64,
        two_heads: bool = True,
        small_input: bool = False,
        in_channels: int = 3,
        dropout: float = 0.0,
        width: int = 64,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.stem = _stem(in_channels, width, small_input)
        # The inner (3x3) width is planes * groups * width_per_group / 64, as in the ResNeXt paper;
        # for 32x4d that is 128 in the first stage at width 64.
        inner_ratio = groups * width_per_group / 64
        self.groups = _scaled_groups(groups, width, int(width * inner_ratio))
        cin = width
        stages = []
        for i, depth in enumerate(layers):
            planes = width * 2**i
            stages.append(self._make_stage(block, cin, planes, depth, 1 if i == 0 else 2, inner_ratio))
            cin = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._init_heads(cin, num_classes, two_heads, dropout)
        self._init_weights(zero_init_residual)

    def _make_stage(
        self, block: Block, cin: int, planes: int, depth: int, stride: int, inner_ratio: float
    ) -> nn.Sequential:
        cout = planes * block.expansion
        inner = int(planes * inner_ratio)
        downsample = None
        if stride != 1 or cin != cout:
            downsample = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        blocks = [block(cin, planes, stride, downsample, inner, self.groups)]
        blocks += [block(cout, planes, 1, None, inner, self.groups) for _ in range(depth - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block then starts as the identity, which helps very deep nets early in training.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


def _stem(in_channels: int, width: int, small_input: bool) -> nn.Sequential:
    if small_input:
        # 28x28/32x32 images: downsampling 4x at the stem would leave too little spatial extent.
        return nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


def _scaled_groups(groups: int, width: int, first_inner: int) -> int:
    """Cardinality for a width-scaled net: exact at width 64; scaled down with the width otherwise
    (keeping the per-group width) so tiny test models stay valid; always divides every stage's width."""
    if groups == 1 or width == 64:
        return groups
    return math.gcd(max(1, groups * width // 64), first_inner)


_SPECS: dict[str, tuple[Block, tuple[int, int, int, int], int, int]] = {
    # arch: (block, layers, groups, width_per_group)
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "resnext152_32x4d": (Bottleneck, (3, 8, 36, 3), 32, 4),
}

RESNET_ARCHS: tuple[str, ...] = tuple(_SPECS)


def build_resnet(arch: str, num_classes: int, **kwargs: Any) -> ResNet:
    block, layers, groups, width_per_group = _SPECS[arch]
    return ResNet(block, layers, num_classes, groups=groups, width_per_group=width_per_group, **kwargs)
