"""The ImageNet input path at speed: decode once (data/decode.py), one resampling pass per view
(data/views.py) in the loader workers, color jitter and normalization batched on the device.

A naive two-view pipeline decodes every JPEG at full size and then, per view, rotates, crops, resizes,
jitters and normalizes in float on the CPU: 10-15 cores per H100 (issue 3). Here a loader worker

1. reads only the JPEG header for the image size and draws every view's parameters from the sample's
   generator (the same draws in the same order as ImagenetTrainAugment, so the two compare one to one);
2. decodes once, at the smallest libjpeg-turbo DCT scale (1/8, 1/4, 1/2 or 1) at which every view's
   crop still has at least the output resolution, so nothing is upsampled that a full decode would not;
3. per view, composes crop, scale, rotation and flip into one affine map and warps the decoded pixels
   straight to the output size (bilinear; an integer area pre-reduction of the region it reads where
   the view shrinks it 2x or more, so nothing aliases): data/views.py;
4. packs the uint8 view and its drawn color-jitter parameters into one flat uint8 tensor (pack_view),
   so a batch, its pinning and the loader's resume semantics stay those of a plain tensor.

The main process copies the packed batch to the device (non_blocking from pinned memory) and there
applies each image's color jitter and the normalization, batched (`ImagenetTrainFast.__call__`). The
batch's augmentation depends only on its samples' own generators, never on earlier batches.

Grayscale JPEGs decode to RGB in libjpeg-turbo; CMYK/YCCK JPEGs, non-JPEG bytes (ImageNet has a PNG
named .JPEG) and JPEGs simplejpeg is strict about take the full `decode_array` path, also RGB.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from .decode import dct_scale_eighths, decode_rgbx, jpeg_size, keep_freed_pages, rgbx_from_rgb
from .transforms import (
    _GRAY_WEIGHTS,
    CROP_RATIO,
    CROP_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    ROTATION_DEG,
    TrainViewParams,
    TrainViewRecipe,
    _check_rgb,
    _need,
)
from .views import eval_view_matrix, resample, to_decoded, train_view_matrix

# Color jitter parameters packed after a view's pixels: the op order (0 brightness, 1 contrast,
# 2 saturation, 3 hue) then the brightness, contrast and saturation factors and the hue shift (turns).
JITTER_SLOTS = 8
_JITTER_STRUCT = struct.Struct(f"={JITTER_SLOTS}f")  # native-order float32, as unpack_views reads them


def rgbx_from_chw(image: torch.Tensor) -> np.ndarray:
    """uint8 RGB [3, H, W] (a decoded-cache image) -> C-contiguous numpy [H, W, 4], what views warp."""
    _check_rgb(image)
    return rgbx_from_rgb(image.permute(1, 2, 0).numpy())


def rgb_chw(view: np.ndarray) -> torch.Tensor:
    """uint8 [S, S, 4] numpy -> uint8 [3, S, S], a channel-permuted view of an RGB [S, S, 3] copy."""
    return torch.from_numpy(cv2.cvtColor(view, cv2.COLOR_RGBA2RGB)).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------- packing
def packed_length(size: int) -> int:
    """Bytes of one packed view: size^2 RGB pixels (HWC), padded to 4 bytes, then JITTER_SLOTS float32."""
    return _params_offset(size) + 4 * JITTER_SLOTS


def _params_offset(size: int) -> int:
    return -(-3 * size * size // 4) * 4  # float32-aligned, so the parameters view without a copy


def pack_view(pixels: np.ndarray, order: Sequence[int], factors: Sequence[float]) -> torch.Tensor:
    """uint8 [S, S, 4] (RGBX, as views are warped) or [S, S, 3] and its jitter draws (see
    transforms.draw_jitter) -> uint8 [packed_length(S)].

    The pixels stay in height-width-channel order: dropping the filler byte straight into the packed
    buffer is one OpenCV pass (~10 us), where a channel-first copy cost 50-200 us a view.
    """
    size = pixels.shape[0]
    pixel_bytes, offset = 3 * size * size, _params_offset(size)
    buffer = np.empty(packed_length(size), np.uint8)  # numpy, then one from_numpy: cheaper per view
    rgb = buffer[:pixel_bytes].reshape(size, size, 3)
    if pixels.shape[2] == 4:
        cv2.cvtColor(pixels, cv2.COLOR_RGBA2RGB, dst=rgb)
    else:
        rgb[...] = pixels
    buffer[pixel_bytes:offset] = 0
    _JITTER_STRUCT.pack_into(buffer, offset, *order, *factors)
    return torch.from_numpy(buffer)


def unpack_views(packed: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, packed_length(size)] -> (pixels uint8 [B, 3, S, S], jitter float32 [B, JITTER_SLOTS]),
    both views into `packed` on its device (the pixels channel-last in memory, as packed)."""
    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] != packed_length(size):
        raise ValueError(
            f"expected packed uint8 views [B, {packed_length(size)}] of size {size} (from "
            f"ImagenetTrainGeometry), got {packed.dtype} {tuple(packed.shape)}"
        )
    pixels = packed[:, : 3 * size * size].unflatten(1, (size, size, 3)).permute(0, 3, 1, 2)
    return pixels, packed[:, _params_offset(size) :].view(torch.float32)


# ---------------------------------------------------------------------------------------------- device
def color_jitter_batch(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-image color jitter of float RGB [B, 3, H, W] in [0, 1] (any device), in place where it can.

    order: [B, 4] op indices, factors: [B, 4], both on the CPU (the index work needs no device sync).
    Equals transforms.apply_jitter on each image. At each of the 4 positions the brightness, contrast
    and saturation images take one blend `x * f + target * (1 - f)` (target 0, the mean gray, the gray
    image; f = 1, the identity, for images whose op there is hue), and the hue images are processed
    as one sub-batch, so every image pays for each op once.
    """
    batch = x.shape[0]
    order, factors = order.long().cpu(), factors.float().cpu()
    for position in range(4):
        op = order[:, position]
        blend = op < 3
        if blend.any():
            f = torch.where(blend, factors.gather(1, op.clamp(max=2)[:, None])[:, 0], 1.0)
            weights = torch.stack([f, torch.where(op == 1, 1 - f, 0.0), torch.where(op == 2, 1 - f, 0.0)])
            f_d, contrast_d, saturation_d = weights.to(x.device, non_blocking=True).view(3, batch, 1, 1, 1)
            target = None
            if (op == 1).any() or (op == 2).any():
                gray = _gray_batch(x)
                target = gray.mul(saturation_d).add_(gray.mean((-2, -1), keepdim=True).mul_(contrast_d))
            x = x.mul_(f_d)
            x = (x.add_(target) if target is not None else x).clamp_(0.0, 1.0)
        hue_rows = (op == 3).nonzero()[:, 0]
        if len(hue_rows) == batch:
            x = adjust_hue_batch(x, factors[:, 3].to(x.device, non_blocking=True))
        elif len(hue_rows):
            rows = hue_rows.to(x.device, non_blocking=True)
            shifted = adjust_hue_batch(x.index_select(0, rows), factors[hue_rows, 3].to(x.device))
            x = x.index_copy_(0, rows, shifted)
    return x


def _gray_batch(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (r * _GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2])[:, None]


def adjust_hue_batch(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of float RGB [B, 3, H, W] in [0, 1] by shift [B] turns: transforms.adjust_hue's
    HSV round trip, in fewer passes over the batch.

    With the largest channel c (the first on ties, as rgb_to_hsv) and delta = max - min, the hue in
    sixths of a turn is 2c + (channel c+1 - channel c+2) / delta; back to RGB, channel n (5 R, 3 G,
    1 B) is max - delta * clamp(min(k, 4 - k), 0, 1) with k = (n + hue) mod 6, since v * s = delta.
    """
    maxc, channel = x.max(dim=-3)
    delta = maxc - x.amin(dim=-3)
    following = x.gather(-3, torch.stack([(channel + 1) % 3, (channel + 2) % 3], dim=-3))
    hue = (following[..., 0, :, :] - following[..., 1, :, :]).div_(delta.clamp_min(1e-12))
    hue = hue.add_(channel * 2).add_(shift.view(-1, 1, 1) * 6.0).remainder_(6.0)
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = (hue + n).remainder_(6.0)
        k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(maxc, k.mul_(delta), out=out[..., c, :, :])
    return out


def normalize_batch(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """ImageNet mean/std normalization of float RGB [B, 3, H, W] in [0, 1], in place, on x's device."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _to_device(x: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    # From pinned memory (the loader pins batches on CUDA machines) the copy is asynchronous.
    return x if device is None else x.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------- train
class ImagenetTrainGeometry:
    """The loader-worker half of ImagenetTrainFast: bytes -> packed uint8 views (see the module doc).

    `views_from_bytes` is what ShardStream calls (one decode for all views); `__call__` takes an
    already decoded uint8 [3, H, W] image (the decoded-cache path) and makes one view.
    """

    def __init__(
        self,
        size: int = 224,
        rotation_deg: float = ROTATION_DEG,
        jitter: tuple[float, float, float, float] = JITTER,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
    ) -> None:
        if size < 1 or rotation_deg < 0 or min(jitter) < 0:
            raise ValueError(
                f"need size >= 1, rotation_deg >= 0, jitter >= 0; got {size}, {rotation_deg}, {jitter}"
            )
        self.size = size
        self.recipe = TrainViewRecipe(rotation_deg, tuple(jitter), tuple(scale), tuple(ratio))

    def draw(self, height: int, width: int, gen: torch.Generator) -> TrainViewParams:
        """One view's parameters, drawn exactly as ImagenetTrainAugment draws them."""
        return self.recipe.draw(gen, height, width)

    def views_from_bytes(self, data: bytes, views: int, gen: torch.Generator | None) -> list[torch.Tensor]:
        """`views` packed views of one image, decoded once at the scale that the largest reduction
        allowed by every view's crop."""
        gen = _need(gen)
        keep_freed_pages()  # this runs in the loader worker: its buffers are the ones to keep
        jpeg_hw = jpeg_size(data)
        if jpeg_hw is None:  # not a plain JPEG: decode in full first, for its size
            image = decode_rgbx(data, None)
            full_hw = (image.shape[0], image.shape[1])
            params = [self.draw(*full_hw, gen) for _ in range(views)]
        else:
            full_hw = jpeg_hw
            params = [self.draw(*full_hw, gen) for _ in range(views)]
            eighths = dct_scale_eighths((side for p in params for side in p.box[2:]), self.size)
            image = decode_rgbx(data, jpeg_hw, eighths)
        return [self.view(image, full_hw, p) for p in params]

    def __call__(self, image: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        full_hw = (image.shape[1], image.shape[2])
        return self.view(rgbx_from_chw(image), full_hw, self.draw(*full_hw, _need(gen)))

    def view(self, image: np.ndarray, full_hw: tuple[int, int], p: TrainViewParams) -> torch.Tensor:
        """The packed view of `image` (uint8 [h, w, 4], a decode of the full_hw image at any scale):
        one warp from the decoded pixels to size x size."""
        matrix = train_view_matrix(full_hw, p.angle_deg, p.box, p.flip, self.size)
        pixels = resample(image, to_decoded(matrix, full_hw, image.shape[:2]), (self.size, self.size))
        return pack_view(pixels, p.order, p.factors)

    def __repr__(self) -> str:
        return (
            f"ImagenetTrainGeometry(size={self.size}, rotation_deg={self.recipe.rotation_deg}, "
            f"jitter={self.recipe.jitter})"
        )


class ImagenetTrainFast:
    """The paper's ImageNet train augmentation (as ImagenetTrainAugment) on the fast path.

    `batched` protocol (see data/loader.py): `prepare` (an ImagenetTrainGeometry) runs per sample in
    the loader workers and yields packed uint8 views; `__call__` on a packed batch [B, L] copies it to
    `device` (None: stay where it is) and applies color jitter and normalization there, returning float
    [B, 3, S, S] (channels_last memory if asked). Called on one decoded uint8 [3, H, W] image, or through
    `views_from_bytes`, it does both halves on the CPU: a per-sample transform like any other.
    """

    batched = True

    def __init__(
        self,
        size: int = 224,
        rotation_deg: float = ROTATION_DEG,
        jitter: tuple[float, float, float, float] = JITTER,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
        *,
        device: torch.device | str | None = None,
        channels_last: bool = False,
    ) -> None:
        self.prepare = ImagenetTrainGeometry(size, rotation_deg, jitter, scale, ratio)
        self.size = size
        self.device = None if device is None else torch.device(device)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() == 3:  # a decoded image, per sample on the CPU
            return self.finish(self.prepare(x, gen)[None], None)[0]
        return self.finish(x, self.device)

    def views_from_bytes(self, data: bytes, views: int, gen: torch.Generator | None) -> list[torch.Tensor]:
        return [self.finish(v[None], None)[0] for v in self.prepare.views_from_bytes(data, views, gen)]

    def finish(self, packed: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        """Packed uint8 views [B, L] -> normalized float [B, 3, S, S] on `device`: the device half."""
        _, params = unpack_views(packed, self.size)  # checks the layout; the parameters stay on the host
        pixels, _ = unpack_views(_to_device(packed, device), self.size)
        x = pixels.float().div_(255.0)
        x = color_jitter_batch(x, params[:, :4], params[:, 4:])
        return normalize_batch(x, self.channels_last)

    def __repr__(self) -> str:
        r = self.prepare.recipe
        return (
            f"ImagenetTrainFast(size={self.size}, rotation_deg={r.rotation_deg}, jitter={r.jitter}, "
            f"device={self.device}, channels_last={self.channels_last})"
        )


# ---------------------------------------------------------------------------------------------- eval
class ImagenetEvalGeometry:
    """The loader-worker half of ImagenetEvalFast: shorter side to `resize`, centre crop `crop`, uint8.

    The JPEG is decoded at the smallest DCT scale whose shorter side is still >= resize, then resized
    and cropped by one warp (data/views.py).
    """

    def __init__(self, resize: int = 256, crop: int = 224) -> None:
        if crop > resize:
            raise ValueError(f"crop {crop} is larger than resize {resize}")
        self.resize, self.crop = resize, crop

    def views_from_bytes(
        self, data: bytes, views: int, gen: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        keep_freed_pages()
        jpeg_hw = jpeg_size(data)
        eighths = 8 if jpeg_hw is None else dct_scale_eighths([min(jpeg_hw)], self.resize)
        image = decode_rgbx(data, jpeg_hw, eighths)
        full_hw = jpeg_hw if jpeg_hw is not None else (image.shape[0], image.shape[1])
        view = self.view(image, full_hw)
        return [view] * views

    def __call__(self, image: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        return self.view(rgbx_from_chw(image), (image.shape[1], image.shape[2]))

    def view(self, image: np.ndarray, full_hw: tuple[int, int]) -> torch.Tensor:
        """uint8 [3, crop, crop] of `image` (uint8 [h, w, 4], a decode of the full_hw image at any
        scale): resize and centre crop as one warp."""
        matrix = to_decoded(eval_view_matrix(full_hw, self.resize, self.crop), full_hw, image.shape[:2])
        return rgb_chw(resample(image, matrix, (self.crop, self.crop)))

    def __repr__(self) -> str:
        return f"ImagenetEvalGeometry(resize={self.resize}, crop={self.crop})"


class ImagenetEvalFast:
    """Resize the shorter side to `resize`, centre crop `crop`, ImageNet normalization: the fast path.

    `batched`: `prepare` (ImagenetEvalGeometry) makes uint8 [3, crop, crop] in the loader workers;
    `__call__` on a uint8 batch [B, 3, crop, crop] normalizes it on `device`. On one decoded uint8
    [3, H, W] image, or through `views_from_bytes`, it does both on the CPU.
    """

    batched = True

    def __init__(
        self,
        resize: int = 256,
        crop: int = 224,
        *,
        device: torch.device | str | None = None,
        channels_last: bool = False,
    ) -> None:
        self.prepare = ImagenetEvalGeometry(resize, crop)
        self.resize, self.crop = resize, crop
        self.device = None if device is None else torch.device(device)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() == 3:  # a decoded image, per sample on the CPU
            return self.finish(self.prepare(x)[None], None)[0]
        return self.finish(x, self.device)

    def views_from_bytes(
        self, data: bytes, views: int, gen: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        return [self.finish(v[None], None)[0] for v in self.prepare.views_from_bytes(data, views, gen)]

    def finish(self, batch: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        """uint8 [B, 3, crop, crop] -> normalized float on `device`: the device half."""
        if (
            batch.dim() != 4
            or batch.dtype != torch.uint8
            or tuple(batch.shape[1:]) != (3, self.crop, self.crop)
        ):
            raise ValueError(
                f"expected uint8 [B, 3, {self.crop}, {self.crop}] (from ImagenetEvalGeometry), "
                f"got {batch.dtype} {tuple(batch.shape)}"
            )
        return normalize_batch(_to_device(batch, device).float().div_(255.0), self.channels_last)

    def __repr__(self) -> str:
        return (
            f"ImagenetEvalFast(resize={self.resize}, crop={self.crop}, device={self.device}, "
            f"channels_last={self.channels_last})"
        )
