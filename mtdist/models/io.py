"""Exported weights (`mtdist export`): torchvision key names for the ResNets, and the one loader.

An export is two files: the weights (`.safetensors`, or a torch.save file) and a JSON beside it
(same name, suffix `.json`) holding the architecture, the class list and how inputs are prepared.
`load_exported(path)` reads both and returns the model, in eval mode, ready for inference.

ResNet keys are torchvision's (`torchvision.models.resnet152` etc.): our stem's `stem.0` / `stem.1`
become `conv1` / `bn1`, the classification head `head_cls` becomes `fc`, and every `layerN.M...`
name (`conv1..3`, `bn1..3`, `downsample.0/1`) is already torchvision's. The consistency head, only
kept with `--both-heads`, is `fc_cons` (torchvision has no such module: drop it there). A full-width
(`model.width=64`), 3-channel, 224-stem (`small_input: false`) resnet18/34/50/101/152 export therefore
loads into torchvision's model of that name with `num_classes` set, strict. Other models keep mtdist's
own names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXPORT_FORMAT = "mtdist-export/1"
# ours -> torchvision, by the first dotted component(s) of a key
_TORCHVISION_PREFIXES: tuple[tuple[str, str], ...] = (
    ("stem.0.", "conv1."),
    ("stem.1.", "bn1."),
    ("head_cls.", "fc."),
    ("head_cons.", "fc_cons."),
)


def uses_torchvision_names(arch: str) -> bool:
    """The ResNet / ResNeXt family: its exports use torchvision's key names."""
    from mtdist.models.resnet import RESNET_ARCHS

    return arch in RESNET_ARCHS


def to_torchvision_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ResNet state dict of ours with torchvision's key names (see the module docstring)."""
    return {_renamed(k, _TORCHVISION_PREFIXES): v for k, v in state.items()}


def from_torchvision_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of to_torchvision_names."""
    return {_renamed(k, tuple((b, a) for a, b in _TORCHVISION_PREFIXES)): v for k, v in state.items()}


def _renamed(key: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def info_path(weights: str | Path) -> Path:
    """The JSON that describes an exported weights file: the same path with the suffix `.json`."""
    return Path(weights).with_suffix(".json")


def read_export_info(weights: str | Path) -> dict[str, Any]:
    path = info_path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: it describes {weights} (written by `mtdist export`)")
    info = json.loads(path.read_text())
    if info.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: format {info.get('format')!r}, expected {EXPORT_FORMAT!r}")
    return info


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an export as stored (safetensors by its suffix, else a torch.save file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def build_from_info(info: dict[str, Any]) -> nn.Module:
    """The (untrained) model an export's JSON describes."""
    from mtdist.models import build_model

    a = info["model"]
    return build_model(
        a["arch"],
        a["num_classes"],
        two_heads=a["two_heads"],
        small_input=a["small_input"],
        in_channels=a["in_channels"],
        input_size=a["input_size"],
        width=a["width"],
    )


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a file written by `mtdist export` (and its JSON beside it) into an mtdist model.

    Returns the model in eval mode on `device` (BN uses the exported running statistics); its
    forward returns (class logits, consistency logits), the same tensor twice for a one-head export.
    The JSON's content is at `model.export_info` (classes, input normalization, source checkpoint).

        model = load_exported("teacher.safetensors")
        logits = model(images)[0]
    """
    info = read_export_info(path)
    state = read_weights(path)
    if info["key_names"] == "torchvision":
        state = from_torchvision_names(state)
    model = build_from_info(info)
    model.load_state_dict(state, strict=True)
    model.export_info = info
    return model.to(device).eval()
