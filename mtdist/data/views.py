"""Stage 2 of the image path: a decoded image -> one view, by one resampling pass.

A view is an affine map from the output square to the source image: the train view's crop box,
scale, rotation about the image centre and flip (the paper's RandomRotation + RandomResizedCrop +
horizontal flip) compose into one 2x3 matrix (`train_view_matrix`), the eval view's resize + centre
crop into another (`eval_view_matrix`). `resample` then makes the view with one OpenCV warpAffine
(bilinear, zero outside the source) straight from the decoded pixels to the output size: no rotated,
cropped or resized intermediate copy of the image.

Antialiasing: a view drawn from a large crop shrinks the source. Three things keep it from aliasing:
the JPEG is decoded at a reduced DCT scale when every view allows it (data/decode.py); then where the
remaining reduction is 2x or more, the source region the view reads (its bounding box, not the whole
image) is first reduced by a power of two with OpenCV's area filter in 2x steps (a box average: the
cheapest filter that removes what a k-fold reduction would alias); the warp's bilinear interpolation
covers the rest (a residual reduction under 2x along the less reduced axis).

Fidelity: the reference (transforms.reference_train_view, torchvision's semantics: nearest rotation,
then an antialiased bilinear resize) differs from one bilinear warp mostly where it rotates (nearest
vs bilinear sampling of fine detail); tests/test_views.py bounds the mean and 99th percentile of the
difference in uint8 levels, benchmarks/data.py measures them (benchmarks/RESULTS.md).

Coordinates: every matrix here maps *pixel edges* (pixel i covers [i, i + 1)), the convention of
transforms.rotated_crop and of torch's align_corners=False; `resample` converts to OpenCV's pixel
centres. All functions are pure (no randomness: the parameters are drawn by transforms.TrainViewRecipe).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# A loader worker is one process per core: OpenCV's own thread pool would only add contention (and
# CPU time: the benchmark counts a core's CPU seconds).
cv2.setNumThreads(1)

_MARGIN_PX = 2  # source pixels kept around a view's bounding box: bilinear reads one neighbour


# ---------------------------------------------------------------------------------------------- matrices
def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine map `outer` after `inner` (both 2x3)."""
    out = outer[:, :2] @ inner
    out[:, 2] += outer[:, 2]
    return out


def train_view_matrix(
    full_hw: tuple[int, int], angle_deg: float, box: tuple[int, int, int, int], flip: bool, size: int
) -> np.ndarray:
    """2x3 map from the size x size output (pixel edges) to the full-resolution source (pixel edges).

    The output resizes the box (top, left, h, w) of the source rotated counter-clockwise by angle_deg
    about its centre (the canvas not expanded), mirrored left-right if `flip`: what
    transforms.rotated_crop + resize + flip make, composed into one map.
    """
    height, width = full_hw
    top, left, box_h, box_w = box
    # output -> rotated canvas: scale into the box (mirrored first if flipped), shift to its corner
    sx, sy = (-box_w / size if flip else box_w / size), box_h / size
    tx = left + (box_w if flip else 0.0)
    # rotated canvas -> source: the inverse rotation about the image centre (y points down)
    a = math.radians(angle_deg)
    cos, sin = math.cos(a), math.sin(a)
    cx, cy = width / 2, height / 2
    ux, uy = cx - cos * cx + sin * cy, cy - sin * cx - cos * cy
    # the rotation after the box map, multiplied out: plain floats, one array (this runs per view)
    return np.array(
        [[cos * sx, -sin * sy, cos * tx - sin * top + ux], [sin * sx, cos * sy, sin * tx + cos * top + uy]]
    )


def eval_view_matrix(full_hw: tuple[int, int], resize: int, crop: int) -> np.ndarray:
    """2x3 map from the crop x crop output to the source (pixel edges): the shorter side resized to
    `resize` (the longer to int(resize * long / short), as transforms.ImagenetEvalTransform), then the
    centre crop."""
    resized_h, resized_w = eval_resized_hw(full_hw, resize)
    top, left = round((resized_h - crop) / 2), round((resized_w - crop) / 2)
    scale_y, scale_x = full_hw[0] / resized_h, full_hw[1] / resized_w
    return np.array([[scale_x, 0.0, left * scale_x], [0.0, scale_y, top * scale_y]])


def eval_resized_hw(full_hw: tuple[int, int], resize: int) -> tuple[int, int]:
    """The size the eval transform resizes an image to before its centre crop."""
    h, w = full_hw
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(resize * long / short)
    return (resize, new_long) if h <= w else (new_long, resize)


def to_decoded(matrix: np.ndarray, full_hw: tuple[int, int], decoded_hw: tuple[int, int]) -> np.ndarray:
    """The same map onto a decode of the full_hw image at another size (a reduced DCT scale)."""
    scale = np.array([[decoded_hw[1] / full_hw[1]], [decoded_hw[0] / full_hw[0]]])
    return matrix * scale


def shrink_factor(matrix: np.ndarray) -> int:
    """Area pre-reduction for a map: the largest power of two <= the source pixels per output pixel
    along the less reduced axis, where that is 2 or more (1 otherwise: the warp's bilinear handles a
    reduction under 2x). Powers of two because OpenCV's area filter is fast for 2x steps only (one 2x
    pass over a 960x720 region ~0.12 ms; a 3x pass ~0.8 ms, measured here)."""
    (a, b, _), (c, d, _) = matrix.tolist()
    per_x, per_y = math.hypot(a, b), math.hypot(c, d)
    fewest = min(per_x, per_y)
    return 1 if fewest < 2 else 1 << int(math.log2(fewest))


def source_bounds(matrix: np.ndarray, out_hw: tuple[int, int], margin: float) -> tuple[float, ...]:
    """(x0, y0, x1, y1): the source region (pixel edges) the output's corners map into, plus margin."""
    h, w = out_hw
    corners = matrix @ np.array([[0.0, w, 0.0, w], [0.0, 0.0, h, h], [1.0, 1.0, 1.0, 1.0]])
    xs, ys = corners
    return xs.min() - margin, ys.min() - margin, xs.max() + margin, ys.max() + margin


def _window(low: float, high: float, factor: int, limit: int) -> tuple[int, int]:
    """[start, stop) of whole source pixels covering [low, high), clamped to [0, limit); its length a
    multiple of `factor` where the image allows (OpenCV's area reduction then takes its integer path)."""
    start, stop = max(0, math.floor(low)), min(limit, math.ceil(high))
    length = -(-(stop - start) // factor) * factor
    if length <= limit:
        start = min(start, limit - length)
        stop = start + length
    return start, stop


# ---------------------------------------------------------------------------------------------- resample
def resample(image: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """The view of `image` (uint8 [h, w, C], C-contiguous) that `matrix` (output -> this image, pixel
    edges) describes: uint8 [*out_hw, C], bilinear, zero outside the image, area-reduced first where
    the view shrinks the source 2x or more."""
    factor = shrink_factor(matrix)
    if factor > 1:
        image, matrix = _area_reduce(image, matrix, out_hw, factor)
    if image.shape[0] == 0 or image.shape[1] == 0:  # the view lies wholly outside the image
        return np.zeros((*out_hw, *image.shape[2:]), np.uint8)
    # OpenCV samples at pixel centres: output centre u maps to source edge m(u + 0.5), centre - 0.5.
    (a, b, c), (d, e, f) = matrix.tolist()
    centred = np.array([[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(
        image, centred, (out_hw[1], out_hw[0]), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def _area_reduce(
    image: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int], factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """The view's source region reduced `factor`-fold by area averaging, and the map onto it."""
    x0, y0, x1, y1 = source_bounds(matrix, out_hw, _MARGIN_PX * factor)
    left, right = _window(x0, x1, factor, image.shape[1])
    top, bottom = _window(y0, y1, factor, image.shape[0])
    if right <= left or bottom <= top:
        return image[:0, :0], matrix
    reduced = image[top:bottom, left:right]
    if (right - left) % factor == 0 and (bottom - top) % factor == 0:
        for _ in range(factor.bit_length() - 1):  # 2x steps: OpenCV's fast path
            reduced = cv2.resize(
                reduced, (reduced.shape[1] // 2, reduced.shape[0] // 2), interpolation=cv2.INTER_AREA
            )
    else:  # a region the image cannot extend to a multiple of the factor: one (slower) exact area pass
        size = (-(-(right - left) // factor), -(-(bottom - top) // factor))
        reduced = cv2.resize(reduced, size, interpolation=cv2.INTER_AREA)
    # source edge x -> reduced edge (x - left) * reduced_w / (right - left): exact for the area filter
    kx, ky = reduced.shape[1] / (right - left), reduced.shape[0] / (bottom - top)
    onto = np.array([[kx, 0.0, -left * kx], [0.0, ky, -top * ky]])
    return reduced, compose(onto, matrix)
