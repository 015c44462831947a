"""The data path end to end: label splits, real webdataset shards in tmp_path, streams and loaders."""

from __future__ import annotations

import hashlib
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtdist.data import (
    DigitsAugment,
    ShardStream,
    build_eval_loader,
    build_train_loader,
    fraction_per_class,
    load_digits,
    load_mnist5k,
    make_transforms,
    read_index,
    resolve_shards,
    shard_order,
    split_per_class,
    write_array_dataset,
    write_shards,
)
from mtdist.data.transforms import translate

NUM_IMAGES, SIZE = 60, 10
EVAL = DigitsAugment(0, 0.0, mean=0.0, std=1.0)
SHIFT_ONLY = DigitsAugment(2, 0.0, mean=0.0, std=1.0)
TRAIN = DigitsAugment(2, 0.15, mean=0.0, std=1.0)


def _images(n: int = NUM_IMAGES, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, SIZE, SIZE), dtype=np.uint8)
    return images, np.arange(n) % 3, [f"img{i:04d}" for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """60 images in 9 shards of unequal size (7 x 8 + 4), their index, and the arrays."""
    out = tmp_path_factory.mktemp("shards")
    images, labels, keys = _images()
    paths = write_array_dataset(images, labels, keys, out, "train", samples_per_shard=7)
    by_key = dict(zip(keys, images, strict=True))
    return {"dir": out, "paths": paths, "urls": [str(p) for p in paths], "by_key": by_key, "labels": labels}


def _stream(urls: list[str], **overrides) -> ShardStream:
    kw = dict(rank=0, world_size=1, seed=0, transform=EVAL, channels=1, views=1, labeled=True, infinite=False)
    return ShardStream(urls, **(kw | overrides))


# ---------------------------------------------------------------------------------------------- split
def test_split_per_class_exact_disjoint_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [10, 12, 9, 30])
    chosen, rest = split_per_class(labels, per_class=5, seed=1)
    assert np.bincount(labels[chosen]).tolist() == [5, 5, 5, 5]
    assert len(np.intersect1d(chosen, rest)) == 0 and len(chosen) + len(rest) == len(labels)
    assert np.array_equal(chosen, split_per_class(labels, 5, seed=1)[0])
    assert not np.array_equal(chosen, split_per_class(labels, 5, seed=2)[0])


def test_split_per_class_names_the_short_class() -> None:
    labels = np.repeat(np.arange(3), [10, 3, 10])
    with pytest.raises(ValueError, match="class 1 has 3 samples"):
        split_per_class(labels, per_class=4, seed=0)


def test_fraction_per_class_rounds_per_class() -> None:
    labels = np.repeat(np.arange(3), [10, 14, 25])
    chosen, rest = fraction_per_class(labels, 0.1, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [1, 1, 2]  # round(1.0), round(1.4), round(2.5)
    assert sorted(np.concatenate([chosen, rest]).tolist()) == list(range(len(labels)))


def test_load_mnist5k_is_uint8_28x28_balanced() -> None:
    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [500] * 10


def test_load_digits_is_uint8_8x8() -> None:
    pytest.importorskip("sklearn")  # an optional dependency of load_digits only
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))


# ---------------------------------------------------------------------------------------------- shards
def test_index_counts_and_sha256_match_files(data: dict) -> None:
    index = read_index(data["dir"] / "train.index.json")
    assert [s["num_samples"] for s in index["shards"]] == [7] * 8 + [4]
    assert index["num_samples"] == NUM_IMAGES and index["num_classes"] == 3
    assert [s["name"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(9)]
    for entry, path in zip(index["shards"], data["paths"], strict=True):
        assert entry["name"] == path.name and entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(data["dir"].glob("*.tmp"))


def test_writing_is_reproducible(tmp_path: Path) -> None:
    images, labels, keys = _images(10)
    first = write_array_dataset(images, labels, keys, tmp_path / "a", "x", samples_per_shard=4)
    second = write_array_dataset(images, labels, keys, tmp_path / "b", "x", samples_per_shard=4)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_write_shards_accepts_numpy_labels_and_jpg(tmp_path: Path) -> None:
    samples = [{"__key__": f"k{i}", "jpg": b"not decoded here", "cls": np.int64(i)} for i in range(5)]
    write_shards(samples, tmp_path, "np", samples_per_shard=2)
    index = read_index(tmp_path / "np.index.json")
    assert index["num_classes"] == 5 and [s["num_samples"] for s in index["shards"]] == [2, 2, 1]


def test_write_shards_rejects_bad_samples(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without '.'"):
        write_shards([{"__key__": "a.b", "png": b"x", "cls": 0}], tmp_path, "bad", 10)
    with pytest.raises(ValueError, match="duplicate sample key 'a'"):
        write_shards([{"__key__": "a", "png": b"x", "cls": 0}] * 2, tmp_path, "bad", 10)
    with pytest.raises(ValueError, match="integer 'cls'"):
        write_shards([{"__key__": "a", "jpg": b"x"}], tmp_path, "bad", 10)


def test_resolve_shards_index_brace_glob_and_list(data: dict) -> None:
    d, urls = data["dir"], data["urls"]
    assert resolve_shards(str(d / "train.index.json")) == urls
    assert resolve_shards(str(d / "train-{000000..000008}.tar")) == urls
    assert resolve_shards(str(d / "train-*.tar")) == urls
    assert resolve_shards(f"{urls[3]},{d}/train-{{000000,000001}}.tar") == [urls[3], urls[0], urls[1]]
    assert resolve_shards("pipe:cat a.tar") == ["pipe:cat a.tar"]


def test_resolve_shards_errors_name_the_file_and_spec(data: dict, tmp_path: Path) -> None:
    spec = str(data["dir"] / "train-{000000..000009}.tar")
    with pytest.raises(FileNotFoundError, match=r"train-000009\.tar does not exist .*000009\}"):
        resolve_shards(spec)
    with pytest.raises(ValueError, match="names no shards"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="missing.index.json"):
        resolve_shards(str(tmp_path / "missing.index.json"))
    (tmp_path / "broken.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.index.json"):
        read_index(tmp_path / "broken.index.json")


# ---------------------------------------------------------------------------------------------- streams
def test_eval_loader_reads_every_sample_once_over_ranks_and_workers(data: dict) -> None:
    keys, labels = [], []
    for rank in range(2):
        loader = build_eval_loader(
            data["urls"], batch_size=5, rank=rank, world_size=2, transform=EVAL, channels=1, num_workers=2
        )
        rank_keys = []
        for x, y, k in loader:
            assert x.shape[1:] == (1, SIZE, SIZE) and x.dtype == torch.float32
            rank_keys += k
            labels += y.tolist()
        # The workers persist; the next evaluation reads the same samples again.
        assert sorted(k for *_, batch_keys in loader for k in batch_keys) == sorted(rank_keys)
        keys += rank_keys
    assert sorted(keys) == sorted(data["by_key"]) and len(keys) == NUM_IMAGES
    assert labels == [int(data["labels"][int(k[3:])]) for k in keys]


def test_eval_pixels_match_the_written_images(data: dict) -> None:
    for x, _, key in itertools.islice(_stream(data["urls"]), 10):
        assert torch.allclose(x, torch.from_numpy(data["by_key"][key]).float()[None] / 255, atol=1e-6)


def test_two_views_are_different_translations_of_one_image(data: dict) -> None:
    stream = _stream(data["urls"], transform=SHIFT_ONLY, views=2)
    differ = 0
    for view1, view2, label, key in itertools.islice(stream, 20):
        base = torch.from_numpy(data["by_key"][key]).float()[None] / 255
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.allclose(view1, translate(base, *s), atol=1e-6) for s in shifts)
        assert any(torch.allclose(view2, translate(base, *s), atol=1e-6) for s in shifts)
        assert label == int(data["labels"][int(key[3:])])
        differ += not torch.equal(view1, view2)
    assert differ >= 15  # 1 in 25 pairs get the same shift by chance


def test_jpeg_shards_through_the_imagenet_preset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)) for i in range(4)]
    samples = [{"__key__": f"j{i}", "jpg": _jpeg(im), "cls": i} for i, im in enumerate(images)]
    urls = [str(p) for p in write_shards(samples, tmp_path, "rgb", samples_per_shard=2)]
    train, evaluate = make_transforms("imagenet", 32, 3)
    for view1, view2, label, key in _stream(urls, transform=train, channels=3, views=2):
        assert view1.shape == view2.shape == (3, 32, 32) and label == int(key[1:])
    assert [x.shape for x, *_ in _stream(urls, transform=evaluate, channels=3)] == [(3, 32, 32)] * 4


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    return buf.getvalue()


def test_pipe_urls_read_like_files(data: dict) -> None:
    files = [s[-1] for s in _stream(data["urls"][:2])]
    assert [s[-1] for s in _stream([f"pipe:cat {u}" for u in data["urls"][:2]])] == files
    partial = _stream([f"pipe:cat {u}" for u in data["urls"][:2]])
    assert [s[-1] for s in itertools.islice(partial, 3)] == files[:3]  # stopping early closes the pipe


def test_unlabeled_stream_gives_minus_one(data: dict) -> None:
    assert {s[1] for s in _stream(data["urls"], labeled=False)} == {-1}


def test_shard_order_is_a_seeded_permutation_per_epoch() -> None:
    assert np.array_equal(shard_order(9, seed=3, epoch=0), shard_order(9, seed=3, epoch=0))
    assert sorted(shard_order(9, 3, 1).tolist()) == list(range(9))
    assert not np.array_equal(shard_order(9, 3, 0), shard_order(9, 3, 1))


def test_set_epoch_changes_the_order_and_shuffle(data: dict) -> None:
    stream = _stream(data["urls"], shuffle_buffer=10)
    first = [s[-1] for s in stream]
    assert first == [s[-1] for s in stream]
    stream.set_epoch(1)
    second = [s[-1] for s in stream]
    assert sorted(first) == sorted(second) and first != second


def test_too_few_shards_for_readers_is_a_clear_error(data: dict) -> None:
    with pytest.raises(ValueError, match=r"2 shards for 4 readers .*fewer data loader workers"):
        next(iter(_stream(data["urls"][:2], rank=3, world_size=4)))
    with pytest.raises(ValueError, match=r"9 shards for 10 readers \(world_size 5 x 2 workers\)"):
        build_eval_loader(
            data["urls"], batch_size=4, rank=0, world_size=5, transform=EVAL, channels=1, num_workers=2
        )


# ---------------------------------------------------------------------------------------------- train loader
def _train(data: dict, labeled_urls: list[str], **overrides):
    kw = dict(labeled_per_gpu=4, unlabeled_per_gpu=6, rank=0, world_size=1, seed=0, transform=TRAIN)
    return build_train_loader(
        labeled_urls, data["urls"], **(kw | dict(channels=1, num_workers=0) | overrides)
    )


@pytest.fixture(scope="module")
def labeled_urls(data: dict, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A labeled subset (3 per class) in shards of 4, 4 and 1 samples."""
    images, labels, keys = _images()
    chosen, _ = split_per_class(labels, per_class=3, seed=0)
    out = tmp_path_factory.mktemp("labeled")
    keys = [keys[i] for i in chosen]
    return [str(p) for p in write_array_dataset(images[chosen], labels[chosen], keys, out, "lab", 4)]


def test_train_loader_runs_past_epochs_with_labeled_part_first(data: dict, labeled_urls: list[str]) -> None:
    # 9 labeled and 60 unlabeled samples: 40 steps are 17 labeled epochs and 4 unlabeled ones.
    for view1, view2, labels in itertools.islice(_train(data, labeled_urls, num_workers=2), 40):
        assert view1.shape == view2.shape == (10, 1, SIZE, SIZE)
        assert labels.dtype == torch.int64 and labels.shape == (10,)
        assert (labels[:4] >= 0).all() and (labels[4:] == -1).all()
        assert not torch.equal(view1, view2)


def test_supervised_baseline_has_labeled_batches_only(data: dict, labeled_urls: list[str]) -> None:
    view1, _, labels = next(_train(data, labeled_urls, unlabeled_per_gpu=0))
    assert view1.shape[0] == 4 and (labels >= 0).all()


def test_train_batches_are_seeded_per_rank(data: dict, labeled_urls: list[str]) -> None:
    def batches(**kw) -> list[torch.Tensor]:
        return [torch.cat([v1, v2, y[:, None, None, None].float().expand_as(v1)]) for v1, v2, y in
                itertools.islice(_train(data, labeled_urls, **kw), 8)]  # fmt: skip

    same = batches(world_size=2)
    assert all(torch.equal(a, b) for a, b in zip(same, batches(world_size=2), strict=True))
    other_rank = batches(world_size=2, rank=1)
    assert not any(torch.equal(a, b) for a, b in zip(same, other_rank, strict=True))
    other_seed = batches(world_size=2, seed=1)
    assert not any(torch.equal(a, b) for a, b in zip(same, other_seed, strict=True))


def test_train_loader_checks_readers_at_build_time(data: dict, labeled_urls: list[str]) -> None:
    # 3 labeled shards cannot feed 2 ranks x 2 workers; say so before any worker starts.
    with pytest.raises(ValueError, match=r"3 shards for 4 readers"):
        _train(data, labeled_urls, world_size=2, num_workers=2)
