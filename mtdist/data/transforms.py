"""Augmentation in plain torch: the digits preset and the ImageNet reference transforms.

ImagenetTrainAugment / ImagenetEvalTransform follow the paper's torchvision semantics and stay the
ground truth the fast path (data/imagenet_fast.py) is measured against; TrainViewRecipe draws every
view's parameters for both. Decoding is data/decode.py's (decode_image is re-exported here).

Every transform is a callable `(img_uint8 [C, H, W], gen) -> float [C, H, W]`. All randomness comes
from the `torch.Generator` passed in, never from the global RNG, so a data stream seeded per
(seed, rank, worker, epoch) reproduces its augmentations exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decode import decode_image  # noqa: F401  (re-exported: the stream and make_shards decode through here)

Transform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The paper's ImageNet train augmentation (RECIPE.md): rotation, RandomResizedCrop, color jitter.
ROTATION_DEG = 10.0
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
CROP_SCALE = (0.08, 1.0)  # area fraction of the image
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio
CROP_TRIES = 10  # RandomResizedCrop's tries at a box that fits, before the center crop
CROP_DRAWS = 2 * CROP_TRIES + 2  # uniforms a crop box is drawn from: each try's area and aspect, top, left
JITTER_DRAWS = 8  # uniforms color jitter is drawn from: the op order's four ranks, four factors
VIEW_DRAWS = 2 + CROP_DRAWS + JITTER_DRAWS  # angle, flip, crop box, jitter
# MNIST's pixel statistics; close enough for any white-on-black digit set at 0..255.
DIGITS_MEAN = 0.1307
DIGITS_STD = 0.3081
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as Pillow's convert("L")


# ---------------------------------------------------------------------------------------------- random
def _need(gen: torch.Generator | None) -> torch.Generator:
    if gen is None:
        raise ValueError("this transform is random: pass an explicit torch.Generator (no global RNG)")
    return gen


def _uniforms(gen: torch.Generator, n: int) -> list[float]:
    """n uniform draws in [0, 1) from one torch call: a call costs ~12 us, and a view used to make
    eleven of them (~150 us, 5% of an ImageNet sample's loader time)."""
    return torch.rand(n, generator=gen).tolist()


def _between(u: float, low: float, high: float) -> float:
    """Uniform in [low, high) from u uniform in [0, 1)."""
    return low + (high - low) * u


def _int_between(u: float, low: int, high: int) -> int:
    """Uniform integer in [low, high], both included, from u uniform in [0, 1)."""
    return min(low + int(u * (high - low + 1)), high)  # min: float rounding can make u * n reach n


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of [C, H, W] (uint8 stays uint8: torch has a fast uint8 kernel)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


# ---------------------------------------------------------------------------------------------- digits
class DigitsAugment:
    """Normalize, translate by up to +-shift_px (zero padding), add Gaussian noise.

    The augmentation measured for MNIST-5k in FACTS.md; `shift_px=0, noise_std=0` is the eval
    transform (deterministic, gen may be None). With `size` set, images of another size are resized
    first (bilinear, antialiased). `batched`: it also takes a [B, C, H, W] uint8 batch and draws an
    independent shift and noise per image; on 28x28 images a torch call costs more than its work,
    so the train loader calls it once per batch (after `prepare` per sample) rather than per image.
    """

    batched = True

    def __init__(
        self, shift_px: int = 2, noise_std: float = 0.15, *, mean: float, std: float, size: int | None = None
    ) -> None:
        if shift_px < 0 or noise_std < 0 or std <= 0:
            raise ValueError(
                f"need shift_px >= 0, noise_std >= 0, std > 0; got {shift_px}, {noise_std}, {std}"
            )
        self.shift_px, self.noise_std, self.mean, self.std, self.size = shift_px, noise_std, mean, std, size

    def prepare(self, img: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """The per-sample part: the uint8 image at the configured size."""
        return img if self.size is None else _resize(img, (self.size, self.size))

    def __call__(self, img: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x = self.prepare(img) if img.dim() == 3 else img
        x = torch.sub(x if x.dim() == 4 else x[None], self.mean * 255.0).mul_(1.0 / (255.0 * self.std))
        if self.shift_px:
            shifts = torch.randint(-self.shift_px, self.shift_px + 1, (x.shape[0], 2), generator=_need(gen))
            x = translate_batch(x, shifts)
        if self.noise_std:
            x.add_(torch.randn(x.shape, generator=_need(gen)), alpha=self.noise_std)
        return x if img.dim() == 4 else x[0]

    def __repr__(self) -> str:
        return f"DigitsAugment(shift_px={self.shift_px}, noise_std={self.noise_std}, size={self.size})"


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift [C, H, W] down by dy and right by dx pixels, filling with zeros."""
    return translate_batch(x[None], torch.tensor([[dy, dx]]))[0]


def translate_batch(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Shift each image of [B, C, H, W] by its (dy, dx) row of `shifts`, filling with zeros; one gather."""
    b, c, h, w = x.shape
    pad = int(shifts.abs().max()) if shifts.numel() else 0
    if pad >= min(h, w):
        raise ValueError(f"shift of {pad} px does not fit an image of {h}x{w}")
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (pad - shifts[:, 0, None]) + torch.arange(h)  # output row y reads padded row y - dy + pad
    cols = (pad - shifts[:, 1, None]) + torch.arange(w)
    return padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


# ---------------------------------------------------------------------------------------------- imagenet
class ImagenetTrainAugment:
    """The paper's ImageNet train transform: rotation (nearest, zero fill), RandomResizedCrop
    (scale (0.08, 1), ratio (3/4, 4/3)), horizontal flip, color jitter, ImageNet normalization.

    The crop box is drawn on the rotated canvas (same size as the image) and only its pixels are
    rotated, which gives the same result as rotating the whole image first, for less work.
    """

    def __init__(
        self,
        size: int = 224,
        rotation_deg: float = ROTATION_DEG,
        jitter: tuple[float, float, float, float] = JITTER,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
    ) -> None:
        self.size = size
        self.recipe = TrainViewRecipe(rotation_deg, tuple(jitter), tuple(scale), tuple(ratio))

    def __call__(self, img: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        gen = _need(gen)
        _check_rgb(img)
        p = self.recipe.draw(gen, img.shape[1], img.shape[2])
        x = reference_train_view(img, p, self.size).float().div_(255.0)
        x = apply_jitter(x, p.order, p.factors)
        return _normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def __repr__(self) -> str:
        return (
            f"ImagenetTrainAugment(size={self.size}, rotation_deg={self.recipe.rotation_deg}, "
            f"jitter={self.recipe.jitter})"
        )


def reference_train_view(img: torch.Tensor, p: TrainViewParams, size: int) -> torch.Tensor:
    """The uint8 geometry of one train view, torchvision's way: rotate (nearest, zero fill), crop the
    box, resize to size x size (antialiased bilinear), flip. The ground truth of the fused path."""
    x = _resize(rotated_crop(img, p.angle_deg, *p.box), (size, size))
    return x.flip(-1) if p.flip else x


def reference_eval_view(img: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """uint8 [3, crop, crop]: the shorter side resized to `resize` (antialiased bilinear), centre crop."""
    h, w = img.shape[1:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(resize * long / short)
    x = _resize(img, (resize, new_long) if h <= w else (new_long, resize))
    top, left = round((x.shape[1] - crop) / 2), round((x.shape[2] - crop) / 2)
    return x[:, top : top + crop, left : left + crop]


class ImagenetEvalTransform:
    """Resize the shorter side to `resize`, center crop `crop`, ImageNet normalization."""

    def __init__(self, resize: int = 256, crop: int = 224) -> None:
        if crop > resize:
            raise ValueError(f"crop {crop} is larger than resize {resize}")
        self.resize, self.crop = resize, crop

    def __call__(self, img: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        _check_rgb(img)
        x = reference_eval_view(img, self.resize, self.crop).float().div_(255.0)
        return _normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def __repr__(self) -> str:
        return f"ImagenetEvalTransform(resize={self.resize}, crop={self.crop})"


def _check_rgb(img: torch.Tensor) -> None:
    if img.ndim != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 RGB image [3, H, W], got {img.dtype} {tuple(img.shape)}")


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with a random area fraction and aspect ratio (log-uniform).

    Ten tries to fit the box in the image, then a center crop clamped to the ratio range: the
    standard RandomResizedCrop recipe.
    """
    return _crop_box(_uniforms(gen, CROP_DRAWS), height, width, scale, ratio)


def _crop_box(
    u: Sequence[float], height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """random_resized_crop_box from CROP_DRAWS uniforms: each try's area and aspect, then top and left."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(CROP_TRIES):
        area = height * width * _between(u[2 * i], *scale)
        aspect = math.exp(_between(u[2 * i + 1], *log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _int_between(u[-2], 0, height - h), _int_between(u[-1], 0, width - w), h, w
    return _center_box(height, width, ratio)


@dataclass(frozen=True)
class TrainViewParams:
    """One view's random draws; the box in full-resolution pixels (top, left, height, width)."""

    angle_deg: float
    box: tuple[int, int, int, int]
    flip: bool
    order: tuple[int, ...]  # color jitter op order (0 brightness, 1 contrast, 2 saturation, 3 hue)
    factors: tuple[float, ...]  # brightness, contrast, saturation factors, hue shift


@dataclass(frozen=True)
class TrainViewRecipe:
    """The ranges of the paper's ImageNet train view: rotation, RandomResizedCrop box, color jitter."""

    rotation_deg: float = ROTATION_DEG
    jitter: tuple[float, float, float, float] = JITTER
    scale: tuple[float, float] = CROP_SCALE
    ratio: tuple[float, float] = CROP_RATIO

    def draw(self, gen: torch.Generator, height: int, width: int) -> TrainViewParams:
        """All of one view's random draws, from VIEW_DRAWS uniforms drawn in one torch call (a call
        costs ~12 us; drawing each number by itself cost ~150 us a view, 5% of a sample's time in a
        loader worker). ImagenetTrainAugment and the fast path both draw through here."""
        u = _uniforms(gen, VIEW_DRAWS)
        angle = _between(u[0], -self.rotation_deg, self.rotation_deg)
        box = _crop_box(u[2 : 2 + CROP_DRAWS], height, width, self.scale, self.ratio)
        order, factors = _jitter(u[2 + CROP_DRAWS :], *self.jitter)
        return TrainViewParams(angle, box, u[1] < 0.5, tuple(order), tuple(factors))


def _center_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    h, w = height, width
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


def rotated_crop(img: torch.Tensor, angle_deg: float, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """Box (top, left, h, w) of `img` rotated counter-clockwise by angle_deg about its center.

    Nearest neighbour, zero outside the source, canvas the size of the input (no expansion).
    Works on uint8 by gathering source pixels, so no float copy of the full image is made.
    """
    c, height, width = img.shape
    a = math.radians(angle_deg)
    # Pixel centres relative to the image centre; y points down.
    ys = torch.arange(top, top + h, dtype=torch.float32).add_(0.5 - height / 2)[:, None]
    xs = torch.arange(left, left + w, dtype=torch.float32).add_(0.5 - width / 2)[None, :]
    # Inverse rotation: where in the source each output pixel comes from.
    src_x = (math.cos(a) * xs - math.sin(a) * ys).add_(width / 2).floor_().long()
    src_y = (math.sin(a) * xs + math.cos(a) * ys).add_(height / 2).floor_().long()
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    flat = src_y.clamp_(0, height - 1) * width + src_x.clamp_(0, width - 1)
    out = img.reshape(c, -1)[:, flat.reshape(-1)].reshape(c, h, w)
    return out * inside


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(0)
    return _GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b


def _blend(x: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (x * factor + other * (1.0 - factor)).clamp_(0.0, 1.0)


def color_jitter(
    x: torch.Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    *,
    gen: torch.Generator,
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue changes on float RGB in [0, 1], in a random order.

    Factors are drawn uniformly from [max(0, 1 - v), 1 + v] (hue: [-hue, hue]), all before applying.
    """
    return apply_jitter(x, *draw_jitter(gen, brightness, contrast, saturation, hue))


def draw_jitter(
    gen: torch.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> tuple[list[int], list[float]]:
    """(op order, [brightness, contrast, saturation factors, hue shift]): color_jitter's random draws.

    Separate from applying them so a loader worker can draw them and the device apply them to a batch.
    """
    return _jitter(_uniforms(gen, JITTER_DRAWS), brightness, contrast, saturation, hue)


def _jitter(
    u: Sequence[float], brightness: float, contrast: float, saturation: float, hue: float
) -> tuple[list[int], list[float]]:
    """draw_jitter from JITTER_DRAWS uniforms: four rank the ops (a uniformly random order), four factors."""
    order = sorted(range(4), key=lambda i: u[i])
    factors = [
        _between(u[4 + i], max(0.0, 1 - v), 1 + v) for i, v in enumerate((brightness, contrast, saturation))
    ]
    factors.append(_between(u[7], -hue, hue))
    return order, factors


def apply_jitter(x: torch.Tensor, order: Sequence[int], factors: Sequence[float]) -> torch.Tensor:
    """Apply drawn jitter (see draw_jitter) to float RGB [3, H, W] in [0, 1]: the per-image reference."""
    for op in order:
        if op == 0:
            x = _blend(x, 0.0, factors[0])
        elif op == 1:
            x = _blend(x, _gray(x).mean().item(), factors[1])
        elif op == 2:
            x = _blend(x, _gray(x)[None], factors[2])
        else:
            x = adjust_hue(x, factors[3])
    return x


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of float RGB [3, H, W] in [0, 1] by `shift` turns."""
    if shift == 0.0:
        return x
    h, s, v = rgb_to_hsv(x)
    return hsv_to_rgb(torch.remainder(h + shift, 1.0), s, v)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(0)
    maxc, minc = x.amax(0), x.amin(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return h, s, maxc


# For sector i = floor(6h), which of (v, q, p, t) each of r, g, b takes.
_HSV_SECTORS = torch.tensor([[0, 1, 2, 2, 3, 0], [3, 0, 0, 1, 2, 2], [2, 2, 3, 0, 0, 1]])


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sector = (h * 6.0).floor()
    f = h * 6.0 - sector
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    choice = _HSV_SECTORS[:, sector.long().remainder_(6)]  # [3, H, W]
    return torch.stack([v, q, p, t]).gather(0, choice)
