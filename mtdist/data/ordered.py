"""GlobalStream: the stages of the global order, one sample at a time, for one (rank, loader worker).

global order (order.py: the sample at each stream position, a pure function of seed, epoch, position)
-> shard seek (seek.py: one pread of the sample's byte range in its tar)
-> decode and views (ShardStream's: the image decoded once, `views` augmentations seeded by the
   sample's place in the epoch, never by the rank or worker that reads it).

Training (`infinite=True`): rank r's batch of global step s is positions s*G + r*b .. s*G + r*b + b - 1
(b = batch_size per rank, G = b * world_size); loader worker w of W makes the rank's batches w, w + W,
... counted from `start_batch`, as a DataLoader hands them out. A resume is the step alone, for any
world size dividing G and any worker count. A corrupt or lost sample keeps no hole: its place is filled
by the sample at a seeded substitute position of the same epoch (attempt 1, 2, ... up to
`_MAX_SUBSTITUTES`), so every step keeps its size and its samples stay a function of (seed, epoch, step)
and the data; each corrupt sample met is counted and bounded as in ShardStream (stream.py), and a
filled place makes its substitute appear twice in that epoch.
Evaluation (`infinite=False`): the set in its listed order, each rank a contiguous share, its workers
taking its batches in turn (order.eval_positions): every usable sample exactly once over all ranks and
workers whatever the number of shards; corrupt ones are dropped and counted.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from .order import GlobalOrder, eval_positions, step_positions
from .seek import RANGE_ERRORS, TarReader, has_offsets, load_offsets
from .shards import _is_remote
from .stream import DataError, ShardStream, _Tally, _with_skipped, _worker

log = logging.getLogger(__name__)

# A place whose sample and this many substitutes are all corrupt: the data is mostly corrupt, stop.
_MAX_SUBSTITUTES = 64


class GlobalStream(ShardStream):
    """ShardStream's samples (`(view1, ..., label, key[, dropped])`) in the global order (module docstring).

    Takes ShardStream's arguments; `shuffle_buffer` is the global order's block (samples permuted
    together, ids only). `batch_size` is the rank's batch (training) or the eval batch. Builds each
    shard's byte-offset table at construction (one read of a shard lacking it, see seek.py), in the
    main process, so loader workers only seek; `progress(what)` is called before each shard's table (the
    watchdog's beat: reading a large set's tars can take longer than its hang timeout).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        sample_counts: Mapping[str, int] | None = None,
        progress: Callable[[str], None] | None = None,
        **kw,
    ) -> None:
        super().__init__(urls, sample_counts=sample_counts, **kw)
        remote = [url for url in self.urls if _is_remote(url)]
        if remote:
            raise ValueError(
                f"shard {remote[0]} is a pipe: or url: the global order reads samples by byte offset from "
                f"local (or mounted) tar files; copy the shards, or use data.order=reader"
            )
        self.tables = self._tables(progress or (lambda what: None))
        counts = [self._raw_count(url, table) for url, table in zip(self.urls, self.tables, strict=True)]
        self.order = GlobalOrder(tuple(counts), self.seed, self.shuffle_buffer, shuffle=self.infinite)
        self.cache: dict[int, dict] | None = {} if self.cache is not None else None
        self.reader: TarReader | None = None

    places_by_step = True

    @classmethod
    def check_layout(cls, num_shards: int, world_size: int, num_workers: int) -> None:
        """Any number of shards serves any number of readers: nothing to refuse."""

    @classmethod
    def resume_skipped(
        cls, skipped: Sequence[int], num_workers: int, moved: bool
    ) -> tuple[list[int], Sequence[int]]:
        """The record keeps the (inherited) totals (take_skipped); the streams get the per-worker counts
        only on the same allocation (not `moved`), else each reader's error bound restarts."""
        return take_skipped(skipped, num_workers), () if moved else skipped

    def __iter__(self) -> Iterator[tuple]:
        return self.reader_samples(*_worker())

    def reader_samples(self, worker: int, num_workers: int) -> Iterator[tuple]:
        """The samples of loader worker `worker` of `num_workers` (what __iter__ gives in that worker)."""
        workers = max(num_workers, 1)
        self.reader = TarReader()
        # Per-worker dropped counts follow a worker only on the same allocation (the loader passes none on
        # another, checkpoint.moved_position) with the same worker count; else the
        # total is kept by the loader's record (take_skipped) and each reader's bound restarts: errors 0
        # against its own raw count, never the rank's inherited total against one worker's share.
        skipped = self.skipped[worker] if len(self.skipped) == workers else 0
        raw = self.start_batch // workers * self.batch_size + skipped
        tally = _Tally(f"rank {self.rank}, worker {worker}", self.error_bound, raw=raw, errors=skipped)
        samples = self._train(worker, workers, tally) if self.infinite else self._eval(worker, workers, tally)
        return _with_skipped(samples, tally, self.infinite) if self.report_skipped else samples

    def _train(self, worker: int, workers: int, tally: _Tally) -> Iterator[tuple]:
        gen = torch.Generator()
        for batch in itertools.count(self.start_batch + worker, workers):
            for position in step_positions(batch, self.batch_size, self.rank, self.world_size):
                yield self._filled(position, gen, tally)

    def _eval(self, worker: int, workers: int, tally: _Tally) -> Iterator[tuple]:
        gen, n = torch.Generator(), self.order.num_samples
        for position in eval_positions(n, self.rank, self.world_size, self.batch_size, worker, workers):
            out = self._checked_views(self._sample(position), gen.manual_seed(position), tally)
            if out is not None:
                yield out

    def _filled(self, position: int, gen: torch.Generator, tally: _Tally) -> tuple:
        """The views of the sample at `position`, or of its place's first usable substitute."""
        epoch, offset, sample_id = self.order.at(position)
        gen.manual_seed(self.order.augment_seed(epoch, offset))
        out = self._checked_views(self._sample(sample_id), gen, tally)
        for attempt in range(1, _MAX_SUBSTITUTES + 1):
            if out is not None:
                return out
            other = int(self.order.epoch_ids(epoch)[self.order.substitute(epoch, offset, attempt)])
            gen.manual_seed(self.order.augment_seed(epoch, offset))
            out = self._checked_views(self._sample(other), gen, tally)
        if out is None:
            raise DataError(
                f"{tally.reader}: position {offset} of epoch {epoch} and {_MAX_SUBSTITUTES} substitutes are "
                f"all corrupt (last: {tally.last}); check or rewrite the shards"
            )
        return out

    def _sample(self, sample_id: int) -> dict:
        """The raw sample: one seek into its shard (or the decoded cache), or a "lost" placeholder."""
        if self.cache is not None and sample_id in self.cache:
            return self.cache[sample_id]
        shard, index = self.order.shard_of(sample_id)
        url, table = self.urls[shard], self.tables[shard]
        if index >= len(table) - 1:
            sample = {"__key__": f"<lost {index + 1}>", "__url__": url, "__lost__": "lost with a broken tar"}
        else:
            offset, size = (int(v) for v in table[1 + index])
            try:
                sample = self.reader.read(url, offset, size)
            except RANGE_ERRORS as exc:
                reason = f"its byte range does not read as a sample ({type(exc).__name__}: {exc})"
                sample = {"__key__": f"<sample {index} of {url}>", "__url__": url, "__lost__": reason}
        if self.cache is not None:
            self.cache[sample_id] = sample
        return sample

    def _tables(self, progress: Callable[[str], None]) -> list:
        missing = [url for url in self.urls if not has_offsets(url)]
        if missing and self.rank == 0:
            log.warning(
                "%d of %d shards (%s, ...) have no current byte-offset table (.idx.npy): each is read once "
                "now, which for a large set takes a while; write them beforehand with `mtdist index-shards "
                "SPEC`",
                len(missing), len(self.urls), missing[0],
            )  # fmt: skip
        tables = []
        for i, url in enumerate(self.urls):
            progress(f"global order: byte-offset table of shard {i + 1} of {len(self.urls)} ({url})")
            tables.append(load_offsets(url))
        return tables

    def _raw_count(self, url: str, table) -> int:
        """Raw samples of a shard: the index count (a broken tar's lost ones included), else those in its
        table plus one placeholder for a tar that broke off or holds nothing, as ShardStream counts."""
        found, broken = len(table) - 1, bool(table[0, 1])
        expected = self.counts.get(url)
        if expected is not None and found > expected:
            raise ValueError(
                f"shard {url} has {found} samples but its index says {expected}: the index is stale; "
                f"rewrite the shards and index with write_shards"
            )
        return expected if expected is not None else found + (1 if broken or not found else 0)


def take_skipped(skipped: Sequence[int], num_workers: int) -> list[int]:
    """A resumed record's per-worker dropped counts: as saved with the same worker count, else the
    saved total on worker 0 (the total, what errors_total reports, stays exact). For the BatchRecord
    only: the streams get the saved list, so a reader's error bound restarts on another layout."""
    workers = max(num_workers, 1)
    if not skipped or len(skipped) == workers:
        return [int(n) for n in skipped]
    return [sum(int(n) for n in skipped)] + [0] * (workers - 1)
