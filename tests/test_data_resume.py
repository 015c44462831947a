"""Exact resume of the training stream: start_batch=k yields batch k on of an uninterrupted iterator.

Real webdataset shards of unequal sizes in tmp_path; runs cross epoch boundaries of every reader.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import mtdist.data.stream as stream_module
from mtdist.data import (
    DigitsAugment,
    ShardStream,
    build_train_loader,
    resolve_shards,
    shard_sample_counts,
    write_array_dataset,
)
from mtdist.data.seeds import counter_seeds
from mtdist.data.stream import resume_worker

SIZE = 8
TRAIN = DigitsAugment(2, 0.15, mean=0.0, std=1.0)  # batched: exercises the per-batch seeding


class PerSampleNoise:
    """A per-sample random transform (module level, so worker processes can use it)."""

    def __call__(self, img: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        return img.float() + torch.rand(img.shape, generator=gen)


def _write(out: Path, n: int, per_shard: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, SIZE, SIZE), dtype=np.uint8)
    keys = [f"s{seed}i{i:03d}" for i in range(n)]
    write_array_dataset(images, np.arange(n) % 3, keys, out, f"d{seed}", per_shard)
    return str(out / f"d{seed}.index.json")


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Unlabeled: 46 samples in shards of 7 x 6 + 4; labeled: 11 in shards of 4, 4, 3."""
    out = tmp_path_factory.mktemp("resume")
    return {"unlabeled": _write(out, 46, 7, seed=0), "labeled": _write(out, 11, 4, seed=1)}


def _loader(specs: dict[str, str], start_batch: int = 0, **overrides) -> Iterator[tuple]:
    counts = shard_sample_counts(specs["labeled"]) | shard_sample_counts(specs["unlabeled"])
    kw = dict(labeled_per_gpu=3, unlabeled_per_gpu=5, rank=0, world_size=1, seed=7, transform=TRAIN)
    kw |= dict(channels=1, num_workers=0, shuffle_buffer=10, sample_counts=counts, start_batch=start_batch)
    return build_train_loader(
        resolve_shards(specs["labeled"]), resolve_shards(specs["unlabeled"]), **(kw | overrides)
    )


def _assert_same(resumed: list[tuple], reference: list[tuple]) -> None:
    assert len(resumed) == len(reference)
    for i, (got, want) in enumerate(zip(resumed, reference, strict=True)):
        for name, a, b in zip(("view1", "view2", "labels"), got, want, strict=True):
            assert torch.equal(a, b), f"batch {i}: {name} differs"


# 46 unlabeled samples / 5 per batch: with num_workers=0 epoch 1 starts inside batch 9 and epoch 2
# inside batch 18; the labeled stream (11 samples / 3 per batch) starts epoch 3 right at batch 11.
# With 2 workers a reader's epoch holds 18 to 28 samples: the spans cross epochs of both workers.
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_batches_equal_the_uninterrupted_ones(specs: dict[str, str], num_workers: int) -> None:
    starts, span = (4, 9, 11, 18, 27), 6
    reference = list(itertools.islice(_loader(specs, num_workers=num_workers), max(starts) + span))
    for k in starts:
        resumed = list(itertools.islice(_loader(specs, k, num_workers=num_workers), span))
        _assert_same(resumed, reference[k : k + span])


def test_resume_with_a_per_sample_random_transform(specs: dict[str, str]) -> None:
    # Each sample's generator is seeded by its index in the reader's epoch, not by what came before.
    reference = list(itertools.islice(_loader(specs, transform=PerSampleNoise(), num_workers=2), 30))
    for k in (1, 13, 24):
        resumed = itertools.islice(_loader(specs, k, transform=PerSampleNoise(), num_workers=2), 6)
        _assert_same(list(resumed), reference[k : k + 6])


def test_resume_without_counts_and_with_the_decoded_cache(
    specs: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    reference = list(itertools.islice(_loader(specs), 26))
    # No counts: the stream counts shards by reading them, and says so. cache_decoded: order unchanged.
    _assert_same(list(itertools.islice(_loader(specs, 20, sample_counts=None), 6)), reference[20:])
    assert "without sample counts for 10 shards" in caplog.text
    _assert_same(list(itertools.islice(_loader(specs, cache_decoded=True), 26)), reference)
    _assert_same(list(itertools.islice(_loader(specs, 20, cache_decoded=True), 6)), reference[20:])


def _stream(specs: dict[str, str], **overrides) -> ShardStream:
    urls = resolve_shards(specs["unlabeled"])
    kw = dict(rank=0, world_size=1, seed=3, transform=PerSampleNoise(), channels=1, views=2, labeled=True)
    kw |= dict(infinite=True, shuffle_buffer=10, sample_counts=shard_sample_counts(specs["unlabeled"]))
    return ShardStream(urls, **(kw | overrides))


def test_stream_resumes_at_every_sample_of_three_epochs(specs: dict[str, str]) -> None:
    full = list(itertools.islice(_stream(specs), 46 * 3 + 3))
    for start in range(46 * 3):
        got = list(itertools.islice(_stream(specs, start_batch=start), 3))
        for (*a, label_a, key_a), (*b, label_b, key_b) in zip(got, full[start:], strict=False):
            assert key_a == key_b and label_a == label_b, f"start {start}"
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"start {start}"


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls = [0]
    original = getattr(stream_module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(stream_module, name, counted)
    return calls


@pytest.mark.parametrize("cache_decoded", [False, True])
def test_skipped_samples_are_not_decoded(
    specs: dict[str, str], monkeypatch: pytest.MonkeyPatch, cache_decoded: bool
) -> None:
    decodes = _count_calls(monkeypatch, "decode_image")
    next(_loader(specs, 1000, cache_decoded=cache_decoded))  # 272 labeled and 108 unlabeled epochs in
    assert decodes[0] == 3 + 5  # one batch of each stream, nothing before it


def test_shards_before_the_start_are_not_read(specs: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _count_calls(monkeypatch, "read_samples")  # called once per shard read
    next(iter(_stream(specs, start_batch=46 * 50 + 20)))
    assert reads[0] <= 3  # the block of samples 20..29 spans 2 or 3 shards; earlier ones are passed over
    reads[0] = 0
    next(iter(_stream(specs, start_batch=46 * 50 + 20, sample_counts=None)))
    assert reads[0] <= 7 + 3  # without counts: every shard is read once to count it, never decoded


def test_a_stale_index_count_is_an_error(specs: dict[str, str]) -> None:
    urls = resolve_shards(specs["unlabeled"])
    stream = _stream(specs, sample_counts={url: 6 for url in urls}, shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"has 7 samples but its index says 6: the index is stale"):
        next(iter(stream))


def test_block_shuffle_permutes_runs_of_consecutive_samples(specs: dict[str, str]) -> None:
    plain = [key for *_, key in _stream(specs, infinite=False, shuffle_buffer=0)]
    mixed = [key for *_, key in _stream(specs, infinite=False)]
    assert sorted(mixed) == sorted(plain)
    for start in range(0, 46, 10):  # blocks of 10 samples (the last one 6), across shard boundaries
        block, unshuffled = mixed[start : start + 10], plain[start : start + 10]
        assert sorted(block) == sorted(unshuffled) and block != unshuffled


def test_shard_sample_counts_match_the_resolved_names(specs: dict[str, str]) -> None:
    urls = resolve_shards(specs["unlabeled"])
    counts = shard_sample_counts(f"{specs['unlabeled']},{urls[0]}")
    assert list(counts) == urls and list(counts.values()) == [7] * 6 + [4]


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_resume_worker_plays_the_worker_that_made_each_batch(num_workers: int) -> None:
    workers = max(num_workers, 1)
    for start in range(12):
        plays = [resume_worker(start, w, num_workers) for w in range(workers)]
        for j in range(10):  # batch j of the resumed loader: its worker j % W's (j // W)-th batch
            reader_worker, skipped = plays[j % workers]
            # ... must be batch start + j of the uninterrupted loader, from worker (start + j) % W
            assert (reader_worker, skipped + j // workers) == ((start + j) % workers, (start + j) // workers)


def test_counter_seeds_depend_only_on_the_index() -> None:
    assert np.array_equal(counter_seeds(5, 0, 10)[4:], counter_seeds(5, 4, 6))
    assert len(set(counter_seeds(5, 0, 1000).tolist())) == 1000
    assert not np.array_equal(counter_seeds(5, 0, 4), counter_seeds(6, 0, 4))
