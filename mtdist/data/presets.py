"""Named transform presets: the (train, eval) pair a config's data.augment selects.

Apart from the transforms themselves, so the import order is one way: decode -> views, transforms
(reference) -> imagenet_fast -> presets.
"""

from __future__ import annotations

from typing import Any

import torch

from .imagenet_fast import ImagenetEvalFast, ImagenetTrainFast
from .transforms import DIGITS_MEAN, DIGITS_STD, DigitsAugment, Transform

_PRESET_OPTIONS = {"digits": ("shift_px", "noise_std", "mean", "std"), "imagenet": ("rotation_deg", "jitter")}


def make_transforms(
    preset: str,
    image_size: int,
    channels: int,
    *,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    **options: Any,
) -> tuple[Transform, Transform]:
    """(train augmentation, eval transform) for a named preset: "digits" or "imagenet".

    `options` tune the train augmentation (digits: shift_px, noise_std, mean, std; imagenet:
    rotation_deg, jitter); the eval transform takes only the normalization from them. "imagenet" gives
    the fast pair of data/imagenet_fast.py, whose batched halves run on `device` (None: where the batch
    is) and return channels_last memory if asked; "digits" ignores both.
    """
    if preset not in _PRESET_OPTIONS:
        raise ValueError(
            f"unknown transform preset {preset!r}; known: {', '.join(map(repr, _PRESET_OPTIONS))}"
        )
    unknown = set(options) - set(_PRESET_OPTIONS[preset])
    if unknown:
        raise ValueError(
            f"transform preset {preset!r} has no option {sorted(unknown)}; known: {_PRESET_OPTIONS[preset]}"
        )
    if preset == "digits":
        return _digits_transforms(image_size, **options)
    if channels != 3:
        raise ValueError(f"preset 'imagenet' needs channels=3, got {channels}")
    return _imagenet_transforms(image_size, device, channels_last, **options)


def _digits_transforms(
    size: int, shift_px: int = 2, noise_std: float = 0.15, mean: float = DIGITS_MEAN, std: float = DIGITS_STD
) -> tuple[Transform, Transform]:
    train = DigitsAugment(shift_px, noise_std, mean=mean, std=std, size=size)
    return train, DigitsAugment(0, 0.0, mean=mean, std=std, size=size)


def _imagenet_transforms(
    size: int, device: torch.device | str | None, channels_last: bool, **options: Any
) -> tuple[Transform, Transform]:
    eval_resize = round(size * 256 / 224)  # the standard 256/224 ratio at any crop size
    where = {"device": device, "channels_last": channels_last}
    return (
        ImagenetTrainFast(size=size, **options, **where),
        ImagenetEvalFast(resize=eval_resize, crop=size, **where),
    )
