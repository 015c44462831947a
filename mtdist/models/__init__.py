"""Model zoo: every model's forward returns (logits_cls, logits_cons), each [B, num_classes].

`load_exported(path)` loads the weights `mtdist export` wrote (mtdist/models/io.py)."""

from __future__ import annotations

from torch import nn

from mtdist.models.io import load_exported
from mtdist.models.mlp import MLP, SmallCNN
from mtdist.models.resnet import RESNET_ARCHS, HeadedNet, ResNet, build_resnet

ARCHS: tuple[str, ...] = (*RESNET_ARCHS, "mlp", "cnn_small")

__all__ = ["ARCHS", "MLP", "HeadedNet", "ResNet", "SmallCNN", "build_model", "load_exported"]


def build_model(
    arch: str,
    num_classes: int,
    *,
    two_heads: bool = True,
    small_input: bool = False,
    in_channels: int = 3,
    dropout: float = 0.0,
    input_size: int = 224,
    width: int = 64,
    zero_init_residual: bool = False,
) -> nn.Module:
    """Build `arch`. `input_size` only matters for "mlp" (its first Linear is sized by it);
    `small_input`, `width` and `zero_init_residual` only for the ResNets (`width` also for "cnn_small")."""
    if arch in RESNET_ARCHS:
        return build_resnet(
            arch,
            num_classes,
            two_heads=two_heads,
            small_input=small_input,
            in_channels=in_channels,
            dropout=dropout,
            width=width,
            zero_init_residual=zero_init_residual,
        )
    if arch == "mlp":
        return MLP(
            num_classes, two_heads=two_heads, in_channels=in_channels, input_size=input_size, dropout=dropout
        )
    if arch == "cnn_small":
        return SmallCNN(
            num_classes, two_heads=two_heads, in_channels=in_channels, dropout=dropout, width=width
        )
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
