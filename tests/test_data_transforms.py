"""Decoding and augmentation: channels, determinism, geometry and colour maths against references."""

from __future__ import annotations

import colorsys
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mtdist.data import (
    DigitsAugment,
    ImagenetEvalTransform,
    ImagenetTrainAugment,
    decode_image,
    make_transforms,
)
from mtdist.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIEW_DRAWS,
    TrainViewRecipe,
    adjust_hue,
    color_jitter,
    hsv_to_rgb,
    random_resized_crop_box,
    rgb_to_hsv,
    rotated_crop,
    translate,
)


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    # Smooth gradients survive JPEG well enough to compare decoded pixels with a tolerance.
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (h + w - 2)], axis=-1)
    return img.astype(np.uint8)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- decode
RGB = Image.fromarray(_rgb())
SOURCES = {
    "jpeg-gray": (RGB.convert("L"), "JPEG"),
    "jpeg-rgb": (RGB, "JPEG"),
    "jpeg-cmyk": (RGB.convert("CMYK"), "JPEG"),
    "png-gray": (RGB.convert("L"), "PNG"),
    "png-rgb": (RGB, "PNG"),
    "png-rgba": (RGB.convert("RGBA"), "PNG"),
    "png-palette": (RGB.convert("P"), "PNG"),
    "png-gray16": (Image.fromarray(np.asarray(RGB.convert("L")).astype(np.uint16) * 257), "PNG"),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("channels", [1, 3])
def test_decode_gives_the_asked_channels(name: str, channels: int) -> None:
    img, fmt = SOURCES[name]
    out = decode_image(_encode(img, fmt), channels)
    assert out.dtype == torch.uint8 and out.shape == (channels, 24, 32) and out.is_contiguous()
    # Compare with Pillow's own conversion of the source; JPEG and palettes are lossy.
    source = RGB.convert("L") if name == "png-gray16" else img  # 16-bit values are 8-bit ones x 257
    ref = np.asarray(source.convert("L" if channels == 1 else "RGB"))
    ref = ref[None] if channels == 1 else ref.transpose(2, 0, 1)
    mean_abs_error = np.abs(out.numpy().astype(int) - ref.astype(int)).mean()
    assert mean_abs_error <= (3.0 if fmt == "JPEG" else 0.0)
    if channels == 3 and "gray" in name:
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_decode_rejects_other_channel_counts() -> None:
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        decode_image(_encode(RGB, "PNG"), 4)


# ---------------------------------------------------------------------------------------------- digits
def test_digits_augment_normalizes_shifts_and_adds_noise() -> None:
    img = torch.randint(0, 256, (1, 12, 12), generator=_gen(), dtype=torch.uint8)
    plain = DigitsAugment(0, 0.0, mean=0.5, std=0.25)(img)
    assert torch.allclose(plain, (img.float() / 255 - 0.5) / 0.25, atol=1e-5)
    shifted = DigitsAugment(2, 0.0, mean=0.5, std=0.25)(img, _gen(1))
    assert any(
        torch.allclose(shifted, translate(plain, dy, dx), atol=1e-5)
        for dy in range(-2, 3)
        for dx in range(-2, 3)
    )
    noisy = DigitsAugment(0, 0.15, mean=0.5, std=0.25)(img, _gen(2))
    assert 0.12 < (noisy - plain).std().item() < 0.18


def test_digits_augment_is_reproducible_and_needs_a_generator() -> None:
    img = torch.randint(0, 256, (1, 12, 12), generator=_gen(), dtype=torch.uint8)
    aug = DigitsAugment(2, 0.15, mean=0.1, std=0.3)
    assert torch.equal(aug(img, _gen(5)), aug(img, _gen(5)))
    assert not torch.equal(aug(img, _gen(5)), aug(img, _gen(6)))
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        aug(img, None)


def test_translate_moves_pixels_and_zero_fills() -> None:
    x = torch.arange(1, 17, dtype=torch.float32).view(1, 4, 4)
    out = translate(x, 1, -2)  # down 1, left 2
    assert out[0, 1:, :2].tolist() == x[0, :3, 2:].tolist()
    assert out[0, 0].abs().sum() == 0 and out[0, :, 2:].abs().sum() == 0


# ---------------------------------------------------------------------------------------------- imagenet
def test_imagenet_train_augment_shape_range_and_determinism() -> None:
    img = torch.from_numpy(_rgb(60, 80)).permute(2, 0, 1).contiguous()
    aug = ImagenetTrainAugment(size=32)
    out = aug(img, _gen(3))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (out >= lo.view(3, 1, 1) - 1e-5).all() and (out <= hi.view(3, 1, 1) + 1e-5).all()
    assert torch.equal(out, aug(img, _gen(3))) and not torch.equal(out, aug(img, _gen(4)))


def test_imagenet_eval_transform_resizes_short_side_and_center_crops() -> None:
    for h, w in [(60, 80), (80, 60)]:
        img = torch.full((3, h, w), 128, dtype=torch.uint8)
        out = ImagenetEvalTransform(resize=36, crop=32)(img)
        assert out.shape == (3, 32, 32)
        expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        assert torch.allclose(out.mean((1, 2)), expected, atol=1e-3)


def test_rotated_crop_matches_rot90_and_plain_crop() -> None:
    img = torch.randint(0, 256, (3, 6, 6), generator=_gen(), dtype=torch.uint8)
    assert torch.equal(rotated_crop(img, 0.0, 1, 2, 3, 4), img[:, 1:4, 2:6])
    # Counter-clockwise on screen, as np.rot90 / torch.rot90 on the (H, W) axes.
    assert torch.equal(rotated_crop(img, 90.0, 0, 0, 6, 6), torch.rot90(img, 1, (1, 2)))
    corner = rotated_crop(torch.full((1, 9, 9), 255, dtype=torch.uint8), 45.0, 0, 0, 9, 9)
    assert corner[0, 0, 0] == 0 and corner[0, 4, 4] == 255  # rotated-in corners are zero-filled


def test_random_resized_crop_box_stays_inside_with_valid_area() -> None:
    gen = _gen()
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(50, 70, (0.08, 1.0), (3 / 4, 4 / 3), gen)
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 70
        assert 0.07 * 50 * 70 <= h * w <= 50 * 70


def test_view_draws_cover_their_ranges_and_use_a_fixed_share_of_the_generator() -> None:
    """One torch call per view: VIEW_DRAWS numbers whatever the crop's retries, so streams stay aligned."""
    gen, orders, flips, corners = _gen(), set(), 0, set()
    for _ in range(3000):
        p = TrainViewRecipe(10.0, (0.4, 0.4, 0.4, 0.1), (0.08, 1.0), (3 / 4, 4 / 3)).draw(gen, 6, 5)
        assert -10.0 <= p.angle_deg < 10.0 and sorted(p.order) == [0, 1, 2, 3]
        assert all(0.6 <= f < 1.4 for f in p.factors[:3]) and -0.1 <= p.factors[3] < 0.1
        top, left, h, w = p.box
        assert 0 <= top <= 6 - h and 0 <= left <= 5 - w
        orders.add(p.order)
        flips += p.flip
        corners.add(("top", top) if h == 3 else ("left", left) if w == 3 else None)
    assert len(orders) == 24 and 1300 < flips < 1700  # every op order; mirrored about half the time
    # every offset of a 3-pixel side is drawn, the last ones included (inclusive upper bounds)
    assert {("top", t) for t in range(4)} | {("left", x) for x in range(3)} <= corners
    a, b = _gen(7), _gen(7)
    TrainViewRecipe(10.0, (0.4, 0.4, 0.4, 0.1), (0.99, 1.0), (0.1, 0.2)).draw(a, 6, 5)  # all ten tries fail
    torch.rand(VIEW_DRAWS, generator=b)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_hsv_round_trip_and_hue_shift_match_colorsys() -> None:
    x = torch.rand(3, 5, 7, generator=_gen())
    assert torch.allclose(hsv_to_rgb(*rgb_to_hsv(x)), x, atol=1e-5)
    shifted = adjust_hue(x, 0.13)
    for r, g, b, out in zip(*x.reshape(3, -1), shifted.reshape(3, -1).T, strict=True):
        h, s, v = colorsys.rgb_to_hsv(r.item(), g.item(), b.item())
        assert np.allclose(colorsys.hsv_to_rgb((h + 0.13) % 1, s, v), out.tolist(), atol=1e-5)


def test_color_jitter_identity_at_zero_strength_and_stays_in_range() -> None:
    x = torch.rand(3, 8, 8, generator=_gen())
    assert torch.allclose(color_jitter(x, 0.0, 0.0, 0.0, 0.0, gen=_gen()), x, atol=1e-6)
    out = color_jitter(x, 0.4, 0.4, 0.4, 0.1, gen=_gen(1))
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)


def test_make_transforms_presets() -> None:
    train, evaluate = make_transforms("digits", 14, 1)
    img = torch.zeros((1, 28, 28), dtype=torch.uint8)
    assert train(img, _gen()).shape == evaluate(img).shape == (1, 14, 14)
    train, evaluate = make_transforms("imagenet", 64, 3)
    assert evaluate(torch.zeros((3, 90, 120), dtype=torch.uint8)).shape == (3, 64, 64)
    assert math.isclose(evaluate.resize, 73, abs_tol=0.5)
    train, evaluate = make_transforms("digits", 28, 1, shift_px=0, noise_std=0.0, mean=0.5, std=0.5)
    img = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    assert torch.equal(train(img, _gen()), torch.ones(1, 28, 28)) and torch.equal(
        evaluate(img), train(img, None)
    )
    with pytest.raises(ValueError, match=r"preset 'digits' has no option \['rotation_deg'\]"):
        make_transforms("digits", 28, 1, rotation_deg=3)
    with pytest.raises(ValueError, match="unknown transform preset 'cifar'"):
        make_transforms("cifar", 32, 3)
    with pytest.raises(ValueError, match="needs channels=3"):
        make_transforms("imagenet", 64, 1)
