"""The fused views (data/views.py): the composed maps against the reference geometry, antialiasing, and
the fidelity bound of the fused train and eval views against the torchvision-semantics reference."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtdist.data.decode import rgbx_from_rgb
from mtdist.data.transforms import TrainViewParams, reference_eval_view, reference_train_view, rotated_crop
from mtdist.data.views import (
    _window,
    eval_resized_hw,
    eval_view_matrix,
    resample,
    shrink_factor,
    to_decoded,
    train_view_matrix,
)

DATA = Path(__file__).resolve().parents[1] / "mtdist" / "data"
# The bounds of the fidelity test (uint8 levels); the measured figures are in benchmarks/RESULTS.md.
TRAIN_MEAN_MAX, TRAIN_P99_MAX = 4.5, 20.0
EVAL_MEAN_MAX, EVAL_P99_MAX = 3.0, 14.0


def _rgbx(image: torch.Tensor) -> np.ndarray:
    return rgbx_from_rgb(image.permute(1, 2, 0).numpy())


def _chw(view: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(view[..., :3])).permute(2, 0, 1)


def test_train_map_samples_where_the_reference_rotated_crop_does() -> None:
    """At one source pixel per output pixel, the map sends each output pixel centre to the source
    pixel transforms.rotated_crop gathers (nearest), for rotations, boxes and flips."""
    height, width, size = 90, 120, 40
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        angle = float(torch.empty(()).uniform_(-10, 10, generator=gen))
        top = int(torch.randint(0, height - size, (), generator=gen))
        left = int(torch.randint(0, width - size, (), generator=gen))
        flip = bool(torch.rand((), generator=gen) < 0.5)
        m = train_view_matrix((height, width), angle, (top, left, size, size), flip, size)
        v, u = np.mgrid[0:size, 0:size] + 0.5
        src_x, src_y = np.floor(m[:, :2] @ np.stack([u.ravel(), v.ravel()]) + m[:, 2:]).astype(int)
        # the reference gathers an image whose pixels are their own coordinates
        coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"))
        ref = rotated_crop(coords + 1, angle, top, left, size, size)  # 0 marks rotated-in corners
        ref = ref.flip(-1) if flip else ref
        inside = ref[0].ravel() > 0
        agree = (ref[0].ravel() - 1 == torch.from_numpy(src_y)) & (
            ref[1].ravel() - 1 == torch.from_numpy(src_x)
        )
        assert agree[inside].float().mean() > 0.995  # float rounding on exact pixel edges


def test_flip_mirrors_the_view_and_outside_is_zero() -> None:
    image = np.random.default_rng(0).integers(1, 256, (80, 100, 4), dtype=np.uint8)
    box = (10, 20, 50, 60)
    plain = resample(image, train_view_matrix((80, 100), 7.0, box, False, 32), (32, 32))
    flipped = resample(image, train_view_matrix((80, 100), 7.0, box, True, 32), (32, 32))
    assert np.abs(plain[:, ::-1].astype(int) - flipped).max() <= 1  # fixed-point rounding only
    outside = resample(image, np.array([[1.0, 0, 500], [0, 1.0, 500]]), (8, 8))
    assert outside.shape == (8, 8, 4) and not outside.any()
    corners = resample(image, train_view_matrix((80, 100), 10.0, (0, 0, 80, 100), False, 64), (64, 64))
    assert not corners[0, 0].any() and corners[32, 32].any()  # rotated-in corners are zero, as the reference


def test_a_large_reduction_does_not_alias() -> None:
    """One-pixel stripes shrunk 4.6x: the area pre-reduction averages them to gray, as the reference's
    antialiased resize does; bilinear alone samples stripes (std ~73 levels)."""
    stripes = np.zeros((1024, 1024, 4), np.uint8)
    stripes[:, ::2, :3] = 255
    m = train_view_matrix((1024, 1024), 0.0, (0, 0, 1024, 1024), False, 224)
    assert shrink_factor(m) == 4 and shrink_factor(m * 1.9) == 8 and shrink_factor(m / 3) == 1
    view = resample(stripes, m, (224, 224))[..., :3].astype(float)
    whole = TrainViewParams(0.0, (0, 0, 1024, 1024), False, (0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0))
    ref = reference_train_view(torch.from_numpy(stripes[..., :3]).permute(2, 0, 1).contiguous(), whole, 224)
    assert abs(view.mean() - 127.5) < 3 and view[8:-8, 8:-8].std() < 8
    assert ref.float()[:, 8:-8, 8:-8].std() < 8  # the reference's own output is gray too


def test_area_window_covers_the_view_and_takes_whole_factors() -> None:
    assert _window(10.2, 30.7, 4, 100) == (10, 34)  # length 24: a multiple of 4
    assert _window(-3.0, 99.5, 4, 100) == (0, 100)  # clamped, 100 = 25 x 4
    assert _window(90.0, 99.5, 4, 100) == (88, 100)  # shifted left rather than cut
    start, stop = _window(0.0, 101.0, 3, 101)  # no multiple of 3 fits 101: the whole image
    assert (start, stop) == (0, 101)


def test_eval_map_is_the_reference_resize_and_centre_crop() -> None:
    assert eval_resized_hw((375, 500), 256) == (256, 341) and eval_resized_hw((500, 333), 256) == (384, 256)
    m = eval_view_matrix((375, 500), 256, 224)
    # output edge 0 is resized column round((341 - 224) / 2) = 58, i.e. source x = 58 * 500 / 341
    assert math.isclose(m[0, 2], 58 * 500 / 341) and math.isclose(m[1, 2], 16 * 375 / 256)
    assert math.isclose(to_decoded(m, (375, 500), (188, 250))[0, 0], m[0, 0] * 250 / 500)


def test_fused_views_stay_within_the_fidelity_bound(tmp_path: Path) -> None:
    """For the same drawn parameters, the fused train and eval views (the real path, DCT scale
    included) against the reference on the full decode, on the benchmark's natural-ish images (noise
    and grain: harder than photos): mean and 99th percentile of |difference| in uint8 levels."""
    from benchmarks.data import fidelity, write_benchmark_shards

    urls = write_benchmark_shards(tmp_path, 16, seed=1)
    fid = fidelity(urls, seed=1)
    assert fid["train_mean"] <= TRAIN_MEAN_MAX and fid["train_p99"] <= TRAIN_P99_MAX, fid
    assert fid["eval_mean"] <= EVAL_MEAN_MAX and fid["eval_p99"] <= EVAL_P99_MAX, fid


@pytest.mark.parametrize("size", [224, 32])
def test_unrotated_views_are_close_to_the_reference(size: int) -> None:
    """Without rotation only the resampling differs (the reference's nearest rotation is the larger
    part of the fidelity figure): upsampled and reduced views within about a level on smooth content."""
    yy, xx = np.mgrid[0:300, 0:400].astype(np.float32)
    smooth = np.stack([127 + 100 * np.sin(xx / 23), 127 + 100 * np.cos(yy / 17), (xx + yy) / 2.8], -1)
    image = torch.from_numpy(smooth.clip(0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()
    for box in [(10, 20, 100, 120), (0, 0, 300, 400), (50, 60, 200, 150)]:
        p = TrainViewParams(0.0, box, False, (0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0))
        fused = _chw(
            resample(_rgbx(image), train_view_matrix((300, 400), 0.0, box, False, size), (size, size))
        )
        diff = (fused.int() - reference_train_view(image, p, size).int()).abs().float()
        assert diff.mean() < 1.0, (box, size)
    fused = _chw(resample(_rgbx(image), eval_view_matrix((300, 400), 256, 224), (224, 224)))
    assert (fused.int() - reference_eval_view(image, 256, 224).int()).abs().float().mean() < 0.5


def test_the_image_path_imports_one_way() -> None:
    """decode -> views, transforms (the reference) -> imagenet_fast -> presets: no module of the image
    path imports one that comes after it (the files read as the stages they are)."""
    stages = ["decode", "views", "transforms", "imagenet_fast", "presets"]
    for i, name in enumerate(stages):
        tree = ast.parse((DATA / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        later = set(stages[i + 1 :]) & imported
        assert not later, f"data/{name}.py imports {sorted(later)}, which come after it"
