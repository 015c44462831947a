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

Corrupt data never shifts these raw positions. A sample whose image does not decode or whose label is
missing or outside [0, num_classes) keeps its place in its block and is dropped only when its turn
comes. A tar that breaks off (truncated, garbage, 0 bytes, no members) keeps the place of what it lost:
placeholder "lost" samples up to its index count (one placeholder where no count is known), each
dropped in its turn. So the raw sample sequence of a reader is a function of the shards alone, and a
position in it is exact whatever was corrupt. Each yielded sample can carry (`report_skipped`) the
count of raw samples its reader dropped since the sample before it; the main process adds these up
per reader worker (the batches of loader worker w are the ones with index % W == w), and a resumed
stream skips `yielded + dropped` raw samples of its reader: yielded = its batches consumed x
batch_size, dropped = that sum, stored in the checkpoint. Dropped samples are counted per reader from
the run's start (restored on resume), every one a logged or summarized error, and a reader stops the
run with a DataError naming the shard once its dropped fraction passes the ErrorBound (judged after
`min_samples` raw samples), or when a whole epoch of its shards yields no usable sample (never a
silent spin over bad shards).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import webdataset
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .seeds import AUGMENT_TAG, SHUFFLE_TAG, counter_seeds, seed_key
from .seek import RANGE_ERRORS, TarReader, current_offsets
from .shards import IMAGE_EXTENSIONS
from .transforms import Transform, decode_image

log = logging.getLogger(__name__)

# Without shuffling the block size changes nothing seen; it only bounds the samples held at once.
_UNSHUFFLED_BLOCK = 64
# What decoding, transforming or labelling one corrupt sample raises (Pillow's UnidentifiedImageError
# and "image file is truncated" are OSErrors); anything else is a bug and propagates.
SAMPLE_ERRORS = (OSError, EOFError, ValueError, Image.DecompressionBombError)
# What webdataset's tar reader raises on a broken tar (it re-raises tarfile's errors with the stream
# appended to the message; duplicate member names are a ValueError). Opening a missing file or a
# failing pipe: command are not among them; those stop the run.
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, ValueError)
# Corrupt samples logged one line each per reader; later ones go into the reader's epoch summary.
_LOGGED_PER_READER = 5


class DataError(ValueError):
    """Corrupt data past the configured bound, or shards with nothing usable; the message names the shard."""


class CorruptShardError(DataError):
    """A tar shard that breaks off mid-way (truncated, garbage, 0 bytes)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"shard {url} is corrupt: {reason}")
        self.url, self.reason = url, reason


@dataclass(frozen=True)
class ErrorBound:
    """How many corrupt samples a reader may drop: `max_fraction` of its raw samples since the run's
    start, judged once it has read `min_samples` (so the first bad sample does not stop a run)."""

    max_fraction: float = 0.01
    min_samples: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_fraction <= 1.0 or self.min_samples < 0:
            raise ValueError(
                f"need max_fraction in [0, 1] and min_samples >= 0: {self.max_fraction}, {self.min_samples}"
            )


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


class _Tally:
    """One reader's raw and dropped samples since the run's start, its error log and its bound.

    The first few corrupt samples are logged one line each, later ones in a summary per epoch.
    `pending` holds the samples dropped since the last yielded one (what that yielded sample reports).
    """

    def __init__(self, reader: str, bound: ErrorBound, raw: int, errors: int) -> None:
        self.reader, self.bound, self.raw, self.errors = reader, bound, raw, errors
        self.pending = self.epoch_errors = self.logged = 0
        self.last = ""  # the last error: shard, key and reason

    def good(self) -> None:
        self.raw += 1
        self._check()

    def error(self, url: str, key: str, reason: str, log_it: bool = True) -> None:
        self.raw += 1
        self.errors += 1
        self.pending += 1
        self.epoch_errors += 1
        self.last = f"shard {url}, sample {key!r}: {reason}"
        if log_it and self.logged < _LOGGED_PER_READER:
            self.logged += 1
            log.warning("%s skipped a corrupt sample: %s", self.reader, self.last)
        self._check()

    def take(self) -> int:
        taken, self.pending = self.pending, 0
        return taken

    def end_epoch(self, epoch: int, shards: list[str], usable: int, whole: bool) -> None:
        """Summarize the epoch's errors; a whole epoch without one usable sample is an error, not a spin."""
        if whole and not usable:
            raise DataError(
                f"{self.reader} read no usable sample in epoch {epoch} from its shards {shards} "
                f"({self.epoch_errors} corrupt samples; last: {self.last or 'none'}); check or rewrite "
                f"those shards, or spread them over fewer readers (fewer workers)"
            )
        if self.epoch_errors:
            log.warning(
                "%s skipped %d corrupt samples in epoch %d (%d of %d read since the start; last: %s)",
                self.reader, self.epoch_errors, epoch, self.errors, self.raw, self.last,
            )  # fmt: skip
        self.epoch_errors = 0

    def _check(self) -> None:
        if self.raw >= self.bound.min_samples and self.errors > self.bound.max_fraction * self.raw:
            raise DataError(
                f"{self.reader} skipped {self.errors} corrupt of {self.raw} samples read, a fraction of "
                f"{self.errors / self.raw:.4f} > data.max_error_fraction {self.bound.max_fraction}; last "
                f"error: {self.last}. Rewrite or remove that shard, or raise data.max_error_fraction "
                f"to train on without the lost samples"
            )


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

    Corrupt data (see the module docstring): `num_classes` bounds labels (None: any label >= 0);
    `error_bound` bounds the fraction dropped; `skipped[w]`: the raw samples that reader worker w
    dropped before batch `start_batch` (from the loader's state; empty: none); `report_skipped` appends
    to each sample the count its reader dropped just before it (a finite stream's last sample also
    carries those after it).
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
        num_classes: int | None = None,
        error_bound: ErrorBound = ErrorBound(),
        skipped: Sequence[int] = (),
        report_skipped: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        del progress  # nothing slow at construction here: shards are read (and counted) in the readers
        if not urls:
            raise ValueError("ShardStream needs at least one shard url")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if views < 1 or shuffle_buffer < 0 or seed < 0 or start_batch < 0 or batch_size < 1:
            raise ValueError(
                f"need views >= 1, shuffle_buffer >= 0, seed >= 0, start_batch >= 0, batch_size >= 1; got "
                f"{views}, {shuffle_buffer}, {seed}, {start_batch}, {batch_size}"
            )
        if (num_classes is not None and num_classes < 1) or any(n < 0 for n in skipped):
            raise ValueError(f"need num_classes >= 1 and skipped counts >= 0, got {num_classes}, {skipped}")
        self.urls, self.rank, self.world_size, self.seed = list(urls), rank, world_size, seed
        self.transform, self.channels, self.views = transform, channels, views
        self.labeled, self.infinite, self.shuffle_buffer = labeled, infinite, shuffle_buffer
        self.start_batch, self.batch_size = start_batch, batch_size
        self.num_classes, self.error_bound = num_classes, error_bound
        self.skipped, self.report_skipped = [int(n) for n in skipped], report_skipped
        self.epoch = 0
        counts = sample_counts or {}
        # url -> raw samples: given ones, and (in each reader process) those learned by reading a shard
        self.counts: dict[str, int] = {url: int(counts[url]) for url in self.urls if url in counts}
        # url -> samples of every shard read, images decoded on first use (per reader process)
        self.cache: dict[str, list[dict]] | None = {} if cache_decoded else None

    # Whether a global step's samples are placed by a world-size-free order (GlobalStream): the same at
    # any ranks and workers, so the batch half of a transform is seeded by place, not by rank.
    places_by_step: ClassVar[bool] = False

    @classmethod
    def check_layout(cls, num_shards: int, world_size: int, num_workers: int) -> None:
        """Refuse, at build time, a layout the stream cannot read: here every reader needs a shard."""
        check_readers(num_shards, world_size, num_workers)

    @classmethod
    def resume_skipped(
        cls, skipped: Sequence[int], num_workers: int, moved: bool
    ) -> tuple[list[int], Sequence[int]]:
        """(what the loader's record keeps, what the streams get) of a saved per-worker dropped count.
        A reader's position here depends on its own drops, so they must be for this worker count."""
        check_skipped(skipped, num_workers)
        return [int(n) for n in skipped], skipped

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at this epoch (set it before the DataLoader starts its workers)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple]:
        worker, num_workers = _worker()
        check_readers(len(self.urls), self.world_size, num_workers)
        check_skipped(self.skipped, num_workers)
        worker, skip_batches = resume_worker(self.start_batch, worker, num_workers)
        reader, num_readers = self.rank + self.world_size * worker, self.world_size * num_workers
        skipped = self.skipped[worker] if self.skipped else 0
        name = f"reader {reader} (rank {self.rank}, worker {worker})"
        # Its raw samples before the start: those yielded in the batches consumed, and those dropped.
        tally = _Tally(name, self.error_bound, raw=skip_batches * self.batch_size + skipped, errors=skipped)
        samples = self._reader_samples(reader, num_readers, worker, tally)
        yield from _with_skipped(samples, tally, self.infinite) if self.report_skipped else samples

    def _reader_samples(self, reader: int, num_readers: int, worker: int, tally: _Tally) -> Iterator[tuple]:
        skip, epoch = tally.raw, self.epoch
        while True:
            shards = reader_shards(self.urls, self.seed, epoch, reader, num_readers)
            if skip and skip >= (count := self._count(shards)):
                if not count:  # would pass over empty epochs forever
                    raise DataError(f"{tally.reader}: its shards {shards} hold no samples (by their counts)")
                skip -= count  # an epoch wholly before the start: nothing is decoded, nothing read if counted
            else:
                yield from self._epoch(epoch, worker, shards, skip, tally)
                skip = 0
            if not self.infinite:
                return
            epoch += 1

    def _epoch(self, epoch: int, worker: int, shards: list[str], skip: int, tally: _Tally) -> Iterator[tuple]:
        """The reader's usable samples of the epoch from its `skip`-th raw sample on. Shards before the
        block holding that sample are not read (given their counts); the block's samples before it are
        not decoded."""
        shuffle_key = seed_key(self.seed, self.rank, worker, epoch, SHUFFLE_TAG)
        augment_key = seed_key(self.seed, self.rank, worker, epoch, AUGMENT_TAG)
        size = self.shuffle_buffer if self.shuffle_buffer > 1 else _UNSHUFFLED_BLOCK
        samples = self._samples_from(shards, skip - skip % size)
        gen, usable = torch.Generator(), 0
        for block in itertools.count(skip // size):
            chunk = list(itertools.islice(samples, size))
            if not chunk:
                break
            first = max(skip - block * size, 0)
            order = self._order(len(chunk), shuffle_key, block, gen)[first:]
            # The epoch's raw sample index alone seeds a sample's augmentation, whatever was skipped.
            seeds = counter_seeds(augment_key, block * size + first, len(order)).tolist()
            for i, seed in zip(order, seeds, strict=True):
                # `chunk` is this block's own list: dropping a sample once used frees its bytes early.
                sample, chunk[i] = chunk[i], None
                out = self._checked_views(sample, gen.manual_seed(seed), tally)
                if out is not None:
                    usable += 1
                    yield out
        tally.end_epoch(epoch, shards, usable, whole=skip == 0)

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
        """A shard's raw samples, streamed, then a "lost" placeholder for each sample a broken tar lost;
        with cache_decoded kept once read to the end. Checks the shard's count against the index, and
        learns it where there is none."""
        if self.cache is not None and url in self.cache:
            yield from self.cache[url]
            return
        kept, count, broken = [], 0, ""
        try:
            for sample in read_samples([url]):
                count += 1
                if self.cache is not None:
                    kept.append(sample)
                yield sample
        except CorruptShardError as exc:
            broken = exc.reason
        expected = self.counts.get(url)
        if expected is not None and count > expected:
            raise ValueError(
                f"shard {url} has {count} samples but its index says {expected}: the index is stale "
                f"(a resume would start at the wrong sample); rewrite the shards and index with write_shards"
            )
        lost = _lost_samples(url, count, expected, broken)
        kept += lost if self.cache is not None else []
        yield from lost
        self.counts.setdefault(url, count + len(lost))  # a learned count includes the placeholder
        if self.cache is not None:
            self.cache[url] = kept

    def _count(self, shards: list[str]) -> int:
        """Raw samples in the shards: from the counts, else by reading (not decoding) each shard once."""
        for url in shards:
            if url not in self.counts:
                self.counts[url] = sum(1 for _ in self._shard_samples(url))
        return sum(self.counts[url] for url in shards)

    def _checked_views(self, sample: dict, gen: torch.Generator, tally: _Tally) -> tuple | None:
        """The sample's views, or None (counted, logged) for a corrupt or lost one."""
        reason = sample.get("__lost__")
        if reason is None:
            try:
                out = self._views(sample, gen)
            except SAMPLE_ERRORS as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                tally.good()
                return out
        # A lost sample's shard was logged once when read; its lost samples are in the epoch summary.
        tally.error(sample.get("__url__", "?"), sample["__key__"], reason, log_it="__lost__" not in sample)
        return None

    def _views(self, sample: dict, gen: torch.Generator) -> tuple:
        label = self._label(sample)  # first: a bad label costs no decode
        views_from_bytes = getattr(self.transform, "views_from_bytes", None)
        if views_from_bytes is not None and self.cache is None:
            # A transform that decodes for itself (e.g. at a reduced DCT scale fitting every view's crop).
            views = views_from_bytes(_image_bytes(sample), self.views, gen)
        else:
            image = self._image(sample)
            views = [self.transform(image, gen) for _ in range(self.views)]
        return (*views, label, sample["__key__"])

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
            raise ValueError("no 'cls' label")
        label = int(sample["cls"])  # bytes such as b"7"; anything else is a ValueError
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise ValueError(f"label {label} is outside [0, {self.num_classes or 'inf'})")
        return label


def check_skipped(skipped: Sequence[int], num_workers: int) -> None:
    """A resume's per-worker dropped counts must be for this loader's number of workers."""
    if skipped and len(skipped) != max(num_workers, 1):
        raise ValueError(
            f"{len(skipped)} per-worker skipped counts for {max(num_workers, 1)} loader workers: a data "
            f"position resumes only with the data.num_workers it was saved with"
        )


def _with_skipped(samples: Iterator[tuple], tally: _Tally, infinite: bool) -> Iterator[tuple]:
    """Each sample with the count its reader dropped just before it. A finite stream holds each sample
    back until the next one (or the end) is known, so that its last one also carries the samples
    dropped after it; an endless one carries those into the next epoch."""
    if infinite:
        for sample in samples:
            yield (*sample, tally.take())
        return
    held = None
    for sample in samples:
        if held is not None:
            yield held
        held = (*sample, tally.take())
    if held is not None:
        yield (*held[:-1], held[-1] + tally.take())


def _lost_samples(url: str, count: int, expected: int | None, broken: str) -> list[dict]:
    """Placeholders for what a broken shard lost: up to its index count; one where no count is known
    and the tar broke off or held nothing (the raw count a reader learns includes it)."""
    if expected is not None:
        lost = expected - count
        reason = broken or f"ends after {count} of its {expected} samples"
    else:
        lost = 1 if broken or not count else 0
        reason = broken or "holds no samples (an empty tar)"
    if broken and not lost:
        log.warning("shard %s: %s, after all its %d samples were read (none lost)", url, broken, count)
    if lost:
        log.warning(
            "shard %s: %s: %d samples read, %d lost (counted as corrupt samples)", url, reason, count, lost
        )
    what = f"lost with the rest of its shard ({reason})"
    return [{"__key__": f"<lost {count + i + 1}>", "__url__": url, "__lost__": what} for i in range(lost)]


def read_samples(shards: list[str], indexed: bool = True) -> Iterator[dict]:
    """Raw samples (`{"__key__", "__url__", ext: bytes}`) of the shards, in order.

    A shard with a current byte-offset table beside it (seek.py; write_shards and make-shards write
    one) is read a sample at a time by its table, unless `indexed` is False: one pread per sample and
    no tarfile parsing (25 against 73 us a sample, benchmarks/RESULTS.md), the same samples as the
    tar reader. Any other is read by webdataset's tar reader. A tar that breaks off raises
    CorruptShardError after its last whole sample; a file that cannot be opened (or a pipe: command
    that fails) raises as it is.
    """
    for url in shards:
        table = current_offsets(url) if indexed else None
        yield from _tar_samples(url) if table is None else _indexed_samples(url, table)


def _tar_samples(url: str) -> Iterator[dict]:
    # Opened here rather than by webdataset's url_opener, which leaves every shard's file (or
    # pipe) for the garbage collector; this closes it at the shard's end or when iteration stops.
    with contextlib.closing(webdataset.gopen(url, "rb")) as stream:
        files = webdataset.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        try:
            yield from webdataset.tariterators.group_by_keys(files)
        except _TAR_ERRORS as exc:
            raise CorruptShardError(url, _tar_reason(exc)) from exc


def _indexed_samples(url: str, table: np.ndarray) -> Iterator[dict]:
    """The samples of the table's byte ranges; a range that does not read as a sample (a damaged tar
    of the same size) is a "lost" placeholder in its place, as the global order treats it."""
    reader = TarReader()
    try:
        for index, (offset, size) in enumerate(table[1:].tolist()):
            try:
                yield reader.read(url, offset, size)
            except RANGE_ERRORS as exc:
                reason = f"its byte range does not read as a sample ({type(exc).__name__}: {exc})"
                yield {"__key__": f"<sample {index} of {url}>", "__url__": url, "__lost__": reason}
    finally:
        reader.close()
    if table[0, 1]:  # the scan that made the table found the tar broken off after these samples
        raise CorruptShardError(url, f"it breaks off after its {len(table) - 1} whole samples (offset table)")


def _tar_reason(exc: Exception) -> str:
    # webdataset appends " @ <stream>" to the message and the stream and url to the args.
    message = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"none of {IMAGE_EXTENSIONS} in the sample")


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
