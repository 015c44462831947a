"""ShardStream: tar shards -> decoded samples -> augmented views, split over ranks and workers.

The split is explicit and deterministic (no webdataset node/worker splitters): in epoch e every rank
computes the same shard permutation from (seed, e), takes `order[rank::world_size]`, and each
DataLoader worker takes every num_workers-th of those.

Shuffling is by blocks, so a stream can be entered at any sample without replaying the ones before:
a reader's samples of the epoch (its shards in the seeded order, each in its own order) are cut into
blocks of `shuffle_buffer` consecutive samples, and each block is permuted by a generator seeded from
(seed, rank, worker, epoch, block). Each sample's augmentation generator is seeded from (seed, rank,
worker, epoch, the sample's index in the reader's epoch). Skipping n samples therefore passes over
whole shards by their sample counts (from the shard index, else counted by reading the tar once),
reads the rest of the shard up to the block holding sample n without decoding it, and drops the
block's samples before n, again without decoding them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import webdataset
from torch.utils.data import IterableDataset, get_worker_info

from .seeds import AUGMENT_TAG, SHUFFLE_TAG, counter_seeds, seed_key
from .shards import IMAGE_EXTENSIONS
from .transforms import Transform, decode_image

# Without shuffling the block size changes nothing seen; it only bounds the samples held at once.
_UNSHUFFLED_BLOCK = 64


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


def resume_worker(start_batch: int, worker: int, num_workers: int) -> tuple[int, int]:
    """(reader worker, batches to skip) for DataLoader worker `worker` of a loader resumed at `start_batch`.

    A DataLoader with W > 0 workers over an IterableDataset takes batch i of each new iterator from
    worker i % W (that worker's (i // W)-th batch). In an uninterrupted run, global batch i comes
    from worker i % W; in a run resumed at k, the same batch (its i - k) comes from worker (i - k) % W.
    So resumed worker w' must read as worker w = (w' + k) % W did, from the first of w's batches not
    yet consumed: those i < k with i % W == w, ceil((k - w) / W) of them. W = 0 is one reader (w = 0).
    """
    workers = max(num_workers, 1)
    reader_worker = (worker + start_batch) % workers
    return reader_worker, max(0, -((reader_worker - start_batch) // workers))


class ShardStream(IterableDataset):
    """Samples of tar shards as `(view1, ..., view_k, label, key)` tuples.

    `views` augmentations of one decoded image (Mean Teacher uses 2: student and teacher views).
    `label` is the sample's class, or -1 with `labeled=False`. With `infinite=True` the stream moves
    on to the next epoch when this reader's shards are exhausted, so the training loop, not the
    data, decides how many steps are run; with `infinite=False` it makes one pass (evaluation:
    every sample exactly once over all ranks and workers, no padding).

    `shuffle_buffer`: samples shuffled together (a block, see the module docstring), whose raw bytes
    are held in memory, per reader (each rank, worker process and stream has one). 0 or 1: each
    shard's samples in their stored order (the shards still come in the epoch's seeded order).
    `cache_decoded` keeps every shard read, its images decoded on first use (small datasets only).
    `sample_counts` (url -> samples, see `shard_sample_counts`) lets a resume pass over shards without
    reading them; a shard without a count is read (not decoded) once to count it.
    `start_batch`, `batch_size`: a DataLoader reads this stream in batches of `batch_size`; every
    iteration starts at the first sample of the loader's batch `start_batch` (0: the beginning), each
    worker process reading as the worker that made that batch did (see resume_worker).
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
        sample_counts: Mapping[str, int] | None = None,
        start_batch: int = 0,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("ShardStream needs at least one shard url")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if views < 1 or shuffle_buffer < 0 or seed < 0 or start_batch < 0 or batch_size < 1:
            raise ValueError(
                f"need views >= 1, shuffle_buffer >= 0, seed >= 0, start_batch >= 0, batch_size >= 1; got "
                f"{views}, {shuffle_buffer}, {seed}, {start_batch}, {batch_size}"
            )
        self.urls, self.rank, self.world_size, self.seed = list(urls), rank, world_size, seed
        self.transform, self.channels, self.views = transform, channels, views
        self.labeled, self.infinite, self.shuffle_buffer = labeled, infinite, shuffle_buffer
        self.start_batch, self.batch_size = start_batch, batch_size
        self.epoch = 0
        counts = sample_counts or {}
        # url -> samples: given ones, and (in each reader process) those learned by reading a shard
        self.counts: dict[str, int] = {url: int(counts[url]) for url in self.urls if url in counts}
        # url -> samples of every shard read, images decoded on first use (per reader process)
        self.cache: dict[str, list[dict]] | None = {} if cache_decoded else None

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at this epoch (set it before the DataLoader starts its workers)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple]:
        worker, num_workers = _worker()
        check_readers(len(self.urls), self.world_size, num_workers)
        worker, skip_batches = resume_worker(self.start_batch, worker, num_workers)
        reader, num_readers = self.rank + self.world_size * worker, self.world_size * num_workers
        skip = skip_batches * self.batch_size
        epoch = self.epoch
        while True:
            shards = reader_shards(self.urls, self.seed, epoch, reader, num_readers)
            if skip and skip >= (count := self._count(shards)):
                skip -= count  # an epoch wholly before the start: nothing is decoded, nothing read if counted
            else:
                yield from self._epoch(epoch, worker, shards, skip)
                skip = 0
            if not self.infinite:
                return
            epoch += 1

    def _epoch(self, epoch: int, worker: int, shards: list[str], skip: int) -> Iterator[tuple]:
        """The reader's samples of the epoch from its `skip`-th on. Shards before the block holding
        that sample are not read (given their counts); the block's samples before it are not decoded."""
        shuffle_key = seed_key(self.seed, self.rank, worker, epoch, SHUFFLE_TAG)
        augment_key = seed_key(self.seed, self.rank, worker, epoch, AUGMENT_TAG)
        size = self.shuffle_buffer if self.shuffle_buffer > 1 else _UNSHUFFLED_BLOCK
        samples = self._samples_from(shards, skip - skip % size)
        gen = torch.Generator()
        for block in itertools.count(skip // size):
            chunk = list(itertools.islice(samples, size))
            if not chunk:
                return
            first = max(skip - block * size, 0)
            order = self._order(len(chunk), shuffle_key, block, gen)[first:]
            # The epoch's sample index alone seeds a sample's augmentation, whatever was skipped.
            seeds = counter_seeds(augment_key, block * size + first, len(order)).tolist()
            for i, seed in zip(order, seeds, strict=True):
                # `chunk` is this block's own list: dropping a sample once used frees its bytes early.
                sample, chunk[i] = chunk[i], None
                yield self._views(sample, gen.manual_seed(seed))

    def _order(self, size: int, key: int, block: int, gen: torch.Generator) -> Sequence[int]:
        if self.shuffle_buffer <= 1:
            return range(size)
        # torch's randperm: a few us, where a numpy Generator seeded per block costs ~40 us.
        gen.manual_seed(int(counter_seeds(key, block, 1)[0]))
        return torch.randperm(size, generator=gen).tolist()

    def _samples_from(self, shards: list[str], start: int) -> Iterator[dict]:
        """Raw samples of the shards from the `start`-th on: the shards wholly before it are passed
        over by their counts (read only if unknown); the samples before it in its shard are read only."""
        for url in shards:
            if start and start >= (count := self._count([url])):
                start -= count
                continue
            yield from itertools.islice(self._shard_samples(url), start, None)
            start = 0

    def _shard_samples(self, url: str) -> Iterator[dict]:
        """A shard's raw samples, streamed; with cache_decoded kept once read to the end. Checks the
        shard's count against the index, and learns it where there is none."""
        if self.cache is not None and url in self.cache:
            yield from self.cache[url]
            return
        kept, count = [], 0
        for sample in read_samples([url]):
            count += 1
            if self.cache is not None:
                kept.append(sample)
            yield sample
        expected = self.counts.setdefault(url, count)
        if count != expected:
            raise ValueError(
                f"shard {url} has {count} samples but its index says {expected}: the index is stale "
                f"(a resume would start at the wrong sample); rewrite the shards and index with write_shards"
            )
        if self.cache is not None:
            self.cache[url] = kept

    def _count(self, shards: list[str]) -> int:
        """Samples in the shards: from the counts, else by reading (not decoding) each shard once."""
        for url in shards:
            if url not in self.counts:
                self.counts[url] = sum(1 for _ in self._shard_samples(url))
        return sum(self.counts[url] for url in shards)

    def _views(self, sample: dict, gen: torch.Generator) -> tuple:
        views_from_bytes = getattr(self.transform, "views_from_bytes", None)
        if views_from_bytes is not None and self.cache is None:
            # A transform that decodes for itself (e.g. at a reduced DCT scale fitting every view's crop).
            views = views_from_bytes(_image_bytes(sample), self.views, gen)
        else:
            image = self._image(sample)
            views = [self.transform(image, gen) for _ in range(self.views)]
        return (*views, self._label(sample), sample["__key__"])

    def _image(self, sample: dict) -> torch.Tensor:
        image = sample.get("__image__")
        if image is None:
            image = decode_image(_image_bytes(sample), self.channels)  # once, for all views
            if self.cache is not None:
                # The cached sample keeps the image in place of its bytes: decoded once, on first use.
                for ext in IMAGE_EXTENSIONS:
                    sample.pop(ext, None)
                sample["__image__"] = image
        return image

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
