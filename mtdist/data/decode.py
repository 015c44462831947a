"""Stage 1 of the image path: bytes -> uint8 pixels, decoded once per sample.

`decode_image` is the general decoder (JPEG, PNG, grayscale, CMYK, 16-bit) every preset can use. The
ImageNet fast path (data/views.py, data/imagenet_fast.py) reads the JPEG header first, so that it can
decode at the smallest libjpeg-turbo DCT scale that still keeps every view sharp (`dct_scale_eighths`,
`decode_rgbx`).
"""

from __future__ import annotations

import ctypes
import io
import math
from collections.abc import Iterable

import cv2
import numpy as np
import torch
from PIL import Image

try:  # libjpeg-turbo straight into numpy: ~10% faster than Pillow and no PIL.Image round trip
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is optional
    simplejpeg = None

_DCT_EIGHTHS = (1, 2, 4)  # libjpeg-turbo's reduced scales that save time (see dct_scale_eighths)
# glibc mallopt parameters, and the values keep_freed_pages sets (32 MiB: glibc's largest mmap threshold).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES = 32 << 20, 256 << 20
_heap_kept = False
_LINE_BYTES, _OFF_ALIGNMENT_BYTES = 64, 4  # see cache_resident_buffer


def keep_freed_pages() -> None:
    """Keep this process's freed pixel buffers in its heap (glibc), once per process.

    A two-view ImageNet sample allocates and frees ~0.5 MB of decoded pixels, views and batch slots,
    and glibc hands blocks that size back to the kernel (mmap/munmap, heap trimming): every reuse then
    page-faults, which on a VM cost as much as warping the views (the collate's torch.stack of fresh
    buffers fell from ~7 ms to ~0.6 ms a batch of 32 without it). A loader worker's working set is a
    few batches, so keeping up to 256 MiB of freed heap costs little. No-op off glibc.
    """
    global _heap_kept
    if _heap_kept:
        return
    _heap_kept = True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Decode PNG/JPEG bytes to uint8 [channels, H, W]; channels 1 (grayscale) or 3 (RGB)."""
    array = decode_array(data, channels)
    if array.ndim == 2:
        return torch.from_numpy(array)[None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def decode_array(data: bytes, channels: int) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 numpy: [H, W] for channels 1, [H, W, 3] RGB for channels 3."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    array = _decode_jpeg_fast(data, channels) if data[:2] == b"\xff\xd8" else None
    return _decode_pillow(data, channels) if array is None else array


def _decode_jpeg_fast(data: bytes, channels: int) -> np.ndarray | None:
    if simplejpeg is None:
        return None
    try:
        # libjpeg-turbo cannot convert CMYK/YCCK to RGB: leave those to Pillow.
        if simplejpeg.decode_jpeg_header(data)[2] in ("CMYK", "YCCK"):
            return None
        out = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB")
    except ValueError:  # a recoverable corruption simplejpeg is strict about; Pillow may still read it
        return None
    return out[..., 0] if out.ndim == 3 and channels == 1 else out


def _decode_pillow(data: bytes, channels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale PNG: convert("L") would clip at 255 instead of scaling.
            gray = (np.asarray(img, dtype=np.float32) * (255.0 / 65535.0)).round().astype(np.uint8)
            return gray if channels == 1 else np.repeat(gray[..., None], 3, axis=2)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # Pillow warns when converting such palettes straight to RGB
        mode = "L" if channels == 1 else "RGB"
        return np.array(img if img.mode == mode else img.convert(mode))  # convert() copies even when a no-op


# ---------------------------------------------------------------------------------------------- DCT scale
def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that libjpeg-turbo decodes straight to RGB, from its header alone.

    None for everything else, which takes the full decode_image path: non-JPEG bytes, CMYK/YCCK JPEGs
    (libjpeg-turbo cannot convert them to RGB) and headers simplejpeg cannot read.
    """
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return None if colorspace in ("CMYK", "YCCK") else (height, width)


def dct_scale_eighths(sides_px: Iterable[int], min_side_px: int) -> int:
    """The smallest JPEG decode scale, in eighths (1, 2, 4 or 8), that keeps every side >= min_side_px.

    libjpeg-turbo decodes at M/8 of full size for any M, but only 1/8, 1/4 and 1/2 are cheaper than a
    full decode: 3/8 costs as much as 1/2, and 5/8 to 7/8 more than 8/8 (measured on 500x375 and
    1000x750 JPEGs). A side of s pixels decodes to at least s * M / 8 (libjpeg rounds up).
    """
    sides = list(sides_px)
    for eighths in _DCT_EIGHTHS:
        if all(side * eighths >= min_side_px * 8 for side in sides):
            return eighths
    return 8


def decode_rgbx(data: bytes, jpeg_hw: tuple[int, int] | None, eighths: int = 8) -> np.ndarray:
    """uint8 [h, w, 4]: RGB and a filler byte, C-contiguous numpy (what data/views.py warps from:
    OpenCV warps 4-byte pixels in about half the time of 3-byte ones, and libjpeg-turbo writes them at
    no extra cost).

    A JPEG from jpeg_size is decoded at eighths/8 of its size (or a little more: libjpeg rounds up);
    anything else, or a JPEG simplejpeg is strict about (a recoverable corruption Pillow may still
    read), at full size through decode_array.
    """
    if jpeg_hw is not None:
        height, width = jpeg_hw
        min_h, min_w = math.ceil(height * eighths / 8), math.ceil(width * eighths / 8)
        buffer = cache_resident_buffer(height * width * 4)  # the full size: enough at any scale
        try:
            return simplejpeg.decode_jpeg(
                data, colorspace="RGBX", min_height=min_h, min_width=min_w, buffer=buffer
            )
        except ValueError:
            pass
    return rgbx_from_rgb(decode_array(data, 3))


def cache_resident_buffer(nbytes: int) -> np.ndarray:
    """A new uint8 buffer for libjpeg-turbo to decode into, whose pixels stay in the CPU cache.

    libjpeg-turbo's x86 SIMD color converters write a row with non-temporal stores (straight to
    DRAM, evicting it from the cache) when the row starts on a 16-byte boundary, as numpy's arrays
    do. The views read the decoded pixels right away, so those stores made the first warp of every
    image read them back from DRAM: ~140 us where the second warp of the same image took ~75 us,
    and the decode was no faster for it (measured on 500x375 to 500x333 JPEGs, benchmarks/RESULTS.md).
    Starting the buffer 4 bytes past a 64-byte boundary keeps most rows unaligned (all of them where
    the row's bytes are a multiple of 16); RGBX pixels stay 4-byte aligned, as OpenCV wants them.
    """
    raw = np.empty(nbytes + _LINE_BYTES, np.uint8)
    start = (_OFF_ALIGNMENT_BYTES - raw.ctypes.data) % _LINE_BYTES
    return raw[start : start + nbytes]


def rgbx_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> C-contiguous [H, W, 4] (the 4th byte is 255, never read back)."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2RGBA)
