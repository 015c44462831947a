"""ShardStream: tar shards -> decoded samples -> augmented views, split over ranks and workers.

The split is explicit and deterministic (no webdataset node/worker splitters): in epoch e every rank
computes the same shard permutation from (seed, e), takes `order[rank::world_size]`, and each
DataLoader worker takes every num_workers-th of those. Shuffling and augmentation draw from
generators seeded by (seed, rank, worker, epoch), never from the global RNG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import webdataset
from torch.utils.data import IterableDataset, get_worker_info

from .shards import IMAGE_EXTENSIONS
from .transforms import Transform, decode_image


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of shard indices; identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def reader_shards(urls: list[str], seed: int, epoch: int, reader: int, num_readers: int) -> list[str]:
    """Shards of reader `rank + world_size * worker` (out of world_size * num_workers) in this epoch.

    `order[rank::world_size][worker::num_workers]` is `order[rank + world_size * worker :: world_size *
    num_workers]`, so one strided slice does both levels of the split.
    """
    order = shard_order(len(urls), seed, epoch)
    return [urls[i] for i in order[reader::num_readers]]


def check_readers(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every (rank, worker) pair needs at least one shard, or it would have nothing to read."""
    readers = world_size * max(num_workers, 1)
    if num_shards < readers:
        raise ValueError(
            f"{num_shards} shards for {readers} readers (world_size {world_size} x {max(num_workers, 1)} "
            f"workers): every reader needs at least one shard; write more shards (smaller "
            f"samples_per_shard) or use fewer data loader workers"
        )


class ShardStream(IterableDataset):
    """Samples of tar shards as `(view1, ..., view_k, label, key)` tuples.

    `views` augmentations of one decoded image (Mean Teacher uses 2: student and teacher views).
    `label` is the sample's class, or -1 with `labeled=False`. With `infinite=True` the stream moves
    on to the next epoch when this reader's shards are exhausted, so the training loop, not the
    data, decides how many steps are run; with `infinite=False` it makes one pass (evaluation:
    every sample exactly once over all ranks and workers, no padding).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        rank: int,
        world_size: int,
        seed: int,
        transform: Transform,
        channels: int,
        views: int,
        labeled: bool,
        infinite: bool,
        shuffle_buffer: int = 0,
        cache_decoded: bool = False,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("ShardStream needs at least one shard url")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if views < 1 or shuffle_buffer < 0 or seed < 0:
            raise ValueError(
                f"need views >= 1, shuffle_buffer >= 0, seed >= 0; got {views}, {shuffle_buffer}, {seed}"
            )
        self.urls, self.rank, self.world_size, self.seed = list(urls), rank, world_size, seed
        self.transform, self.channels, self.views = transform, channels, views
        self.labeled, self.infinite, self.shuffle_buffer = labeled, infinite, shuffle_buffer
        self.epoch = 0
        # url -> decoded samples, filled on a shard's first complete read (per reader process)
        self.cache: dict[str, list[dict]] | None = {} if cache_decoded else None

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at this epoch (set it before the DataLoader starts its workers)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple]:
        worker, num_workers = _worker()
        check_readers(len(self.urls), self.world_size, num_workers)
        reader, num_readers = self.rank + self.world_size * worker, self.world_size * num_workers
        epoch = self.epoch
        while True:
            yield from self._epoch(
                epoch, worker, reader_shards(self.urls, self.seed, epoch, reader, num_readers)
            )
            if not self.infinite:
                return
            epoch += 1

    def _epoch(self, epoch: int, worker: int, shards: list[str]) -> Iterator[tuple]:
        seeds = np.random.SeedSequence([self.seed, self.rank, worker, epoch]).generate_state(2)
        gen = torch.Generator().manual_seed(int(seeds[0]))
        rng = np.random.default_rng(int(seeds[1]))
        for sample in shuffled(self._samples(shards), self.shuffle_buffer, rng):
            image = sample.get("__image__")
            if image is None:
                image = decode_image(_image_bytes(sample), self.channels)  # once, for all views
            views = [self.transform(image, gen) for _ in range(self.views)]
            yield (*views, self._label(sample), sample["__key__"])

    def _samples(self, shards: list[str]) -> Iterator[dict]:
        """Raw samples, or with cache_decoded the decoded ones kept from the shard's first read.

        The sample order is the same either way, so caching never changes what a run sees.
        """
        if self.cache is None:
            yield from read_samples(shards)
            return
        for url in shards:
            if url in self.cache:
                yield from self.cache[url]
                continue
            decoded = []
            for sample in read_samples([url]):
                image = decode_image(_image_bytes(sample), self.channels)
                decoded.append({k: v for k, v in sample.items() if k.startswith("__") or k == "cls"}
                               | {"__image__": image})
                yield decoded[-1]
            self.cache[url] = decoded

    def _label(self, sample: dict) -> int:
        if not self.labeled:
            return -1
        if "cls" not in sample:
            raise ValueError(f"sample {sample['__key__']!r} in {sample.get('__url__')} has no 'cls' label")
        return int(sample["cls"])


def read_samples(shards: list[str]) -> Iterator[dict]:
    """Raw samples (`{"__key__", "__url__", ext: bytes}`) of the shards, in order."""
    for url in shards:
        # Opened here rather than by webdataset's url_opener, which leaves every shard's file (or
        # pipe) for the garbage collector; this closes it at the shard's end or when iteration stops.
        with contextlib.closing(webdataset.gopen(url, "rb")) as stream:
            files = webdataset.tariterators.tar_file_expander([{"url": url, "stream": stream}])
            yield from webdataset.tariterators.group_by_keys(files)


def shuffled(samples: Iterable[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle: once the buffer is full, each new sample replaces a random one."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = sample
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def _image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(
        f"sample {sample['__key__']!r} in {sample.get('__url__')} has none of {IMAGE_EXTENSIONS}"
    )


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
