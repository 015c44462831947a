"""The fast ImageNet path (data/imagenet_fast.py) against the plain per-image transforms it replaces.

Real JPEG/PNG bytes written with Pillow; real webdataset shards for the loader tests.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtdist.data import build_eval_loader, build_train_loader, make_transforms, write_shards
from mtdist.data.decode import (
    cache_resident_buffer,
    dct_scale_eighths,
    decode_image,
    decode_rgbx,
    jpeg_size,
    simplejpeg,
)
from mtdist.data.imagenet_fast import (
    ImagenetEvalFast,
    ImagenetTrainFast,
    ImagenetTrainGeometry,
    adjust_hue_batch,
    color_jitter_batch,
    pack_view,
    packed_length,
    unpack_views,
)
from mtdist.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagenetEvalTransform,
    ImagenetTrainAugment,
    adjust_hue,
    apply_jitter,
    draw_jitter,
)
from mtdist.data.views import resample, to_decoded, train_view_matrix

NO_JITTER = (0.0, 0.0, 0.0, 0.0)


def _smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Slow sinusoids and a ramp: survives JPEG and DCT scaling, so pixel differences are the path's."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = seed * 0.7
    img = np.stack(
        [
            127 + 110 * np.sin(xx / (width / 9) + phase),
            127 + 110 * np.cos(yy / (height / 7) - phase),
            (xx + yy) * 255 / (height + width),
        ],
        axis=-1,
    )
    return img.clip(0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _jpeg(height: int, width: int, seed: int = 0) -> bytes:
    return _encode(Image.fromarray(_smooth(height, width, seed)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalization: float [..., 3, H, W] back to 0..255."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean) * 255


# ---------------------------------------------------------------------------------------------- scale
def test_dct_scale_is_the_smallest_that_keeps_every_side() -> None:
    assert dct_scale_eighths([1792, 1800], 224) == 1  # 1792 / 8 = 224 exactly
    assert dct_scale_eighths([1791, 1800], 224) == 2
    assert dct_scale_eighths([896], 224) == 2 and dct_scale_eighths([895], 224) == 4
    assert dct_scale_eighths([448], 224) == 4 and dct_scale_eighths([447], 224) == 8
    assert dct_scale_eighths([100], 224) == 8  # a crop smaller than the output: full size
    assert dct_scale_eighths([2000, 1500, 460], 224) == 4  # the smallest crop side decides
    assert dct_scale_eighths([1125], 256) == 2  # eval: the shorter side against the resize


def test_decode_at_the_chosen_scale_keeps_every_crop_at_the_output_size() -> None:
    height, width, size = 1200, 1600, 224
    data = _jpeg(height, width)
    geometry = ImagenetTrainGeometry(size)
    scales = set()
    for seed in range(12):
        params = [geometry.draw(height, width, _gen(seed)) for _ in range(2)]
        eighths = dct_scale_eighths((s for p in params for s in p.box[2:]), size)
        image = decode_rgbx(data, (height, width), eighths)
        assert image.shape[0] >= height * eighths / 8 and image.shape[1] >= width * eighths / 8
        assert image.shape[2] == 4 and image.flags.c_contiguous
        for p in params:  # no view is upsampled from the reduced decode: >= 1 source pixel per output pixel
            matrix = train_view_matrix((height, width), p.angle_deg, p.box, p.flip, size)
            decoded = to_decoded(matrix, (height, width), image.shape[:2])
            assert min(np.hypot(*decoded[:, :2].T)) >= 1 - 1e-9
        scales.add(eighths)
    assert scales & {1, 2, 4}  # the test exercises reduced decodes, not only full ones


def test_decode_into_an_unaligned_buffer_gives_the_plain_decode() -> None:
    # decode_rgbx decodes into cache_resident_buffer (rows off 16-byte alignment, so libjpeg-turbo's
    # SIMD writes stay in the cache): the pixels must be exactly those of simplejpeg's own array.
    for height, width in ((375, 500), (333, 500), (97, 131)):
        data = _jpeg(height, width)
        image = decode_rgbx(data, (height, width))
        plain = simplejpeg.decode_jpeg(data, colorspace="RGBX")
        assert image.ctypes.data % 16 == 4 and image.flags.c_contiguous
        assert np.array_equal(image[..., :3], plain[..., :3])
    half = decode_rgbx(_jpeg(480, 640), (480, 640), 4)  # a reduced scale in the full-size buffer
    assert half.shape == (240, 320, 4)
    assert cache_resident_buffer(10).ctypes.data % 64 == 4


# ---------------------------------------------------------------------------------------------- train
def test_views_are_deterministic_shaped_and_differ() -> None:
    data, train = _jpeg(375, 500), ImagenetTrainFast(size=64)
    views = train.prepare.views_from_bytes(data, 2, _gen(5))
    again = train.prepare.views_from_bytes(data, 2, _gen(5))
    other = train.prepare.views_from_bytes(data, 2, _gen(6))
    assert all(v.dtype == torch.uint8 and v.shape == (packed_length(64),) for v in views)
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[0], other[0])
    out = train(torch.stack(views), _gen(0))
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, train(torch.stack(again)))  # the batch half draws nothing: gen is unused


def test_full_scale_path_is_close_to_the_per_image_reference() -> None:
    """At scale 1 (a 500x375 JPEG, 224 output: no crop reaches 448) the fused path is within about a
    gray level of ImagenetTrainAugment on the decoded image with the same generator, jitter included
    (tests/test_views.py bounds the geometry's difference on harder content)."""
    data, fast, ref = _jpeg(375, 500, seed=1), ImagenetTrainFast(), ImagenetTrainAugment()
    image = decode_image(data, 3)
    for seed in range(4):
        out = fast(torch.stack(fast.prepare.views_from_bytes(data, 2, _gen(seed))))
        gen = _gen(seed)
        expected = torch.stack([ref(image, gen), ref(image, gen)])
        levels = (_to_pixels(out) - _to_pixels(expected)).abs()
        assert levels.mean() < 1.0 and torch.quantile(levels.flatten()[::7], 0.99) < 6.0


def test_dct_scaled_views_are_close_to_the_full_decode() -> None:
    """A 1600x1200 JPEG decoded at 1/2 or 1/4 for the crops that allow it: within about a gray level
    of RandomResizedCrop on the full decode with the same parameters."""
    height, width = 1200, 1600
    data = _jpeg(height, width, seed=2)
    fast, ref = ImagenetTrainFast(jitter=NO_JITTER), ImagenetTrainAugment(jitter=NO_JITTER)
    image = decode_image(data, 3)
    reduced = 0
    for seed in range(6):
        params = [fast.prepare.draw(height, width, _gen(seed)) for _ in range(2)]
        reduced += dct_scale_eighths((s for p in params for s in p.box[2:]), 224) < 8
        pixels, _ = unpack_views(torch.stack(fast.prepare.views_from_bytes(data, 2, _gen(seed))), 224)
        gen = _gen(seed)
        expected = torch.stack([_to_pixels(ref(image, gen)), _to_pixels(ref(image, gen))])
        assert (pixels.float() - expected).abs().mean() < 2.0  # gray levels of 255
    assert reduced >= 3


def test_decoded_image_path_equals_the_bytes_path_at_full_scale() -> None:
    """The decoded-cache path (one view per call on a decoded image) draws and crops as the bytes path."""
    data, geometry = _jpeg(96, 128), ImagenetTrainGeometry(64)  # no crop reaches 128: full-size decode
    from_bytes = geometry.views_from_bytes(data, 2, _gen(3))
    gen, image = _gen(3), decode_image(data, 3)
    assert all(torch.equal(a, geometry(image, gen)) for a in from_bytes)


# ---------------------------------------------------------------------------------------------- device half
def test_batched_jitter_and_normalize_equal_the_per_image_reference() -> None:
    batch, gen = 16, _gen(0)
    x = torch.rand(batch, 3, 12, 10, generator=gen)
    draws = [draw_jitter(gen, 0.4, 0.4, 0.4, 0.1) for _ in range(batch)]
    order = torch.tensor([o for o, _ in draws])
    factors = torch.tensor([f for _, f in draws])
    assert len({tuple(o) for o, _ in draws}) > 4  # several op orders in one batch
    out = color_jitter_batch(x.clone(), order, factors)
    expected = torch.stack([apply_jitter(x[i], *draws[i]) for i in range(batch)])
    assert torch.allclose(out, expected, atol=1e-5)
    shifts = torch.linspace(-0.5, 0.5, batch)
    hue = adjust_hue_batch(x, shifts)
    assert torch.allclose(
        hue, torch.stack([adjust_hue(x[i], float(shifts[i])) for i in range(batch)]), atol=1e-5
    )


def test_packed_views_round_trip_and_finish_like_the_reference() -> None:
    gen, size = _gen(1), 8
    pixels = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8, generator=gen)
    draws = [draw_jitter(gen, 0.4, 0.4, 0.4, 0.1) for _ in range(5)]
    rgbx = [
        np.ascontiguousarray(np.pad(p.permute(1, 2, 0).numpy(), ((0, 0), (0, 0), (0, 1)))) for p in pixels
    ]
    packed = torch.stack([pack_view(p, *d) for p, d in zip(rgbx, draws, strict=True)])
    got_pixels, params = unpack_views(packed, size)
    assert torch.equal(got_pixels, pixels)
    rgb = pack_view(np.ascontiguousarray(pixels[0].permute(1, 2, 0).numpy()), *draws[0])
    assert torch.equal(rgb, packed[0])  # RGB in, the same bytes as RGBX in
    assert torch.equal(params, torch.tensor([[*o, *f] for o, f in draws], dtype=torch.float32))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = torch.stack(
        [(apply_jitter(p.float() / 255, *d) - mean) / std for p, d in zip(pixels, draws, strict=True)]
    )
    fast = ImagenetTrainFast(size=size, device="cpu", channels_last=True)
    out = fast(packed)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, expected, atol=1e-4)
    with pytest.raises(ValueError, match=r"expected packed uint8 views \[B, 224\] of size 8"):
        fast(torch.zeros(2, 200, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- odd inputs
SMALL = Image.fromarray(_smooth(96, 128, seed=3))
ODD_INPUTS = {
    "jpeg-gray": _encode(SMALL.convert("L")),
    "jpeg-cmyk": _encode(SMALL.convert("CMYK")),
    "png-named-jpeg": _encode(SMALL, "PNG"),
    "png-gray": _encode(SMALL.convert("L"), "PNG"),
}


@pytest.mark.parametrize("kind", list(ODD_INPUTS))
def test_grayscale_cmyk_and_png_bytes_come_out_rgb(kind: str) -> None:
    data = ODD_INPUTS[kind]
    assert (jpeg_size(data) is None) == (kind != "jpeg-gray")  # only the gray JPEG takes the DCT path
    reference = decode_image(data, 3)  # RGB, Pillow's conversions
    geometry = ImagenetTrainGeometry(64)
    views = geometry.views_from_bytes(data, 2, _gen(0))
    gen = _gen(0)
    assert all(torch.equal(v, geometry(reference, gen)) for v in views)
    pixels, _ = unpack_views(torch.stack(views), 64)
    assert pixels.shape == (2, 3, 64, 64)
    if "gray" in kind:
        assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 1], pixels[:, 2])
    else:  # the colors survive: the three channels differ
        assert not torch.equal(pixels[:, 0], pixels[:, 2])
    evaluate = ImagenetEvalFast(resize=73, crop=64)
    (view,) = evaluate.prepare.views_from_bytes(data, 1)
    assert view.shape == (3, 64, 64) and view.dtype == torch.uint8
    assert torch.equal(view, evaluate.prepare(reference))  # the decoded-cache path: the same pixels
    levels = (
        _to_pixels(evaluate(view[None])[0]) - _to_pixels(ImagenetEvalTransform(73, 64)(reference))
    ).abs()
    assert levels.mean() < 1.0  # one warp vs antialiased resize + crop, on smooth content


def test_undecodable_bytes_raise_what_the_stream_counts_as_corrupt() -> None:
    truncated = _jpeg(96, 128)[:300]
    geometry = ImagenetTrainGeometry(64)
    with pytest.raises((OSError, ValueError)):
        geometry.views_from_bytes(truncated, 2, _gen(0))
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        geometry.views_from_bytes(b"not an image at all", 2, _gen(0))


# ---------------------------------------------------------------------------------------------- eval
def test_eval_dct_scaled_is_close_to_the_full_decode() -> None:
    for height, width in [(1200, 1600), (1600, 1200), (375, 500)]:
        data = _jpeg(height, width, seed=4)
        evaluate = ImagenetEvalFast()
        (view,) = evaluate.prepare.views_from_bytes(data, 1)
        expected = _to_pixels(ImagenetEvalTransform()(decode_image(data, 3)))
        assert view.shape == (3, 224, 224)
        # one warp vs antialiased resize + crop: a fraction of a level on this smooth content
        assert (view.float() - expected).abs().mean() < (1.5 if min(height, width) >= 512 else 0.3)
        assert torch.allclose(_to_pixels(evaluate(view[None])[0]), view.float(), atol=1e-3)


# ---------------------------------------------------------------------------------------------- loaders
@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("jpeg_shards")
    sizes = [(60, 80), (80, 60), (90, 120), (75, 100)]
    samples = [{"__key__": f"j{i:03d}", "jpg": _jpeg(*sizes[i % 4], seed=i), "cls": i % 3} for i in range(24)]
    samples[5]["jpg"] = ODD_INPUTS["jpeg-cmyk"]
    samples[7]["jpg"] = ODD_INPUTS["png-named-jpeg"]
    return [str(p) for p in write_shards(samples, out, "train", samples_per_shard=4)]


def _train_batches(urls: list[str], start_batch: int = 0) -> list[tuple[torch.Tensor, ...]]:
    train, _ = make_transforms("imagenet", 32, 3)
    loader = build_train_loader(
        urls[:3], urls[3:], labeled_per_gpu=2, unlabeled_per_gpu=3, rank=0, world_size=1, seed=7,
        transform=train, channels=3, num_workers=0, shuffle_buffer=5, start_batch=start_batch,
    )  # fmt: skip
    return list(itertools.islice(loader, 6 - start_batch))


def test_train_loader_gives_normalized_two_view_batches_and_resumes_exactly(jpeg_shards: list[str]) -> None:
    batches = _train_batches(jpeg_shards)
    for view1, view2, labels in batches:
        assert view1.shape == view2.shape == (5, 3, 32, 32) and view1.dtype == torch.float32
        assert labels[:2].ge(0).all() and labels[2:].eq(-1).all()
        assert not torch.equal(view1, view2)
    resumed = _train_batches(jpeg_shards, start_batch=4)
    for a, b in zip(batches[4:], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_eval_loader_normalizes_batches_like_the_per_image_transform(jpeg_shards: list[str]) -> None:
    _, evaluate = make_transforms("imagenet", 32, 3)
    reference = ImagenetEvalTransform(resize=evaluate.resize, crop=32)
    batches = build_eval_loader(
        jpeg_shards, batch_size=4, rank=0, world_size=1, transform=evaluate, channels=3, num_workers=2
    )
    seen = {}
    for x, labels, keys in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and len(labels) == len(keys)
        seen |= dict(zip(keys, x, strict=True))
    assert len(seen) == 24
    by_key = _samples_by_key(jpeg_shards)
    for key, x in seen.items():
        # workers + batch normalization = the per-sample path on the same bytes (CPU, one sample)
        assert torch.allclose(x, evaluate.views_from_bytes(by_key[key], 1)[0], atol=1e-6), key
        # most of these small images decode at 1/2 (short side >= 2 x 37): near the full-decode reference
        expected = reference(decode_image(by_key[key], 3))
        assert (_to_pixels(x) - _to_pixels(expected)).abs().mean() < 3.0, key


def _samples_by_key(urls: list[str]) -> dict[str, bytes]:
    from mtdist.data.stream import read_samples

    return {s["__key__"]: s["jpg"] for s in read_samples(urls)}


def test_make_transforms_gives_the_fast_pair(tmp_path: Path) -> None:
    train, evaluate = make_transforms("imagenet", 224, 3, device="cpu", channels_last=True)
    assert isinstance(train, ImagenetTrainFast) and isinstance(evaluate, ImagenetEvalFast)
    assert train.batched and evaluate.batched and train.device == torch.device("cpu")
    assert (evaluate.resize, evaluate.crop) == (256, 224) and train.channels_last


def test_train_wires_the_fast_pair_to_the_rank_device() -> None:
    from mtdist.config import load_config
    from mtdist.dist import DistEnv
    from mtdist.inputs import make_transforms as train_transforms

    cfg = load_config(None, ["data.augment=imagenet", "data.image_size=32", "model.channels_last=true"])
    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0)
    train, evaluate = train_transforms(cfg, env)
    assert isinstance(train, ImagenetTrainFast) and isinstance(evaluate, ImagenetEvalFast)
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert train.device == evaluate.device == expected
    assert train.channels_last == evaluate.channels_last == (expected.type == "cuda")  # NHWC on CUDA only


def test_plan_measures_the_fused_worker_half(jpeg_shards: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`mtdist plan --measure-decode N` times what a loader worker runs for the imagenet preset: the
    fused path, one warp per view (counted), on the run's own shards."""
    from mtdist import preflight
    from mtdist.config import load_config
    from mtdist.data import imagenet_fast

    warps = []
    monkeypatch.setattr(imagenet_fast, "resample", lambda *a: warps.append(a) or resample(*a))
    spec = ",".join(jpeg_shards)
    cfg = load_config(None, ["data.augment=imagenet", "data.image_size=32", f"data.labeled={spec}",
                             f"data.unlabeled={spec}"])  # fmt: skip
    rate, source = preflight.measure_decode_per_core(cfg, 12, warmup=2)
    assert rate > 0 and source.startswith("measured here: 12 samples of data.unlabeled (imagenet worker half")
    assert len(warps) == 2 * (12 + 2)  # two views a sample, each one warp
