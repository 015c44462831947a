"""DataLoaders over ShardStreams: the endless labeled + unlabeled train batches and the eval pass.

Both also count the corrupt samples their streams dropped (see stream.py): each sample carries the
count its reader dropped just before it, so the counts follow the batches consumed, not the readers'
read-ahead, and the train batches' position (batches consumed + dropped per reader worker) resumes
exactly.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import multiprocessing.context
import multiprocessing.util  # its exit hook must be registered before ours (atexit runs last-in first)
import random
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mtdist.preempt import die_with_parent, ignore_stop_signals

from .ordered import GlobalStream
from .pool import PREFETCH_FACTOR, BatchPool
from .seeds import counter_seeds, seed_key
from .stream import ErrorBound, ShardStream
from .transforms import Transform

log = logging.getLogger(__name__)

# Loader workers are never forked from the training process. By the time a loader starts its workers,
# that process has threads (gloo's, other loaders' feeder and pin threads, tqdm's monitor); a fork
# copies any lock one of them holds at that instant, and the child can then block for ever right after
# the fork (CPython's PyOS_AfterFork_Child), its rank waiting for it and the other ranks in a collective
# (seen in 5 of 21 runs with frequent evaluations). A fork server is a fresh process (fork + exec) with
# one thread that only forks workers, so every worker starts clean. Preloading the data package there
# makes a worker cost a fork of a process that has torch imported, not a new interpreter (see
# benchmarks/RESULTS.md for the start-up cost); fork_server makes the server ignore stop signals.
WORKER_START_METHOD = "forkserver"
WORKER_PRELOAD = ["mtdist.data.fork_server", "mtdist.data"]


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context every mtdist DataLoader starts its workers with (see above)."""
    ctx = multiprocessing.get_context(WORKER_START_METHOD)
    ctx.set_forkserver_preload(WORKER_PRELOAD)  # read when the server starts (first use) only
    return ctx


# Stream ids mixed into the seed, so the labeled and unlabeled streams never share random draws.
LABELED_STREAM, UNLABELED_STREAM, BATCH_AUGMENT_STREAM = 0, 1, 2
STREAM_NAMES = {LABELED_STREAM: "labeled", UNLABELED_STREAM: "unlabeled"}
# data.order: "reader" = each (rank, worker) reads whole shards of its own (ShardStream); "global" = one
# order of the whole set cut into global steps, whatever the ranks and workers (GlobalStream, issue 13).
ORDERS = {"reader": ShardStream, "global": GlobalStream}


def stream_seed(seed: int, stream: int) -> int:
    """A seed for one stream, derived from the run seed (SeedSequence mixes the two well)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def build_train_loader(
    labeled_urls: list[str],
    unlabeled_urls: list[str],
    *,
    labeled_per_gpu: int,
    unlabeled_per_gpu: int,
    rank: int,
    world_size: int,
    seed: int,
    transform: Transform,
    channels: int,
    num_workers: int,
    pin_memory: bool = False,
    shuffle_buffer: int = 1000,
    cache_decoded: bool = False,
    sample_counts: Mapping[str, int] | None = None,
    start_batch: int = 0,
    skipped: Mapping[str, Sequence[int]] | None = None,
    num_classes: int | None = None,
    error_bound: ErrorBound | None = None,
    order: str = "reader",
    progress: Callable[[str], None] | None = None,
    moved: bool = False,
) -> TrainBatches:
    """Endless `(view1 [B, C, H, W], view2, labels [B])` with B = labeled_per_gpu + unlabeled_per_gpu.

    The labeled samples come first; unlabeled ones have label -1. `unlabeled_per_gpu == 0` gives
    labeled batches only (the supervised baseline). `shuffle_buffer`: samples shuffled together, held
    in memory per reader (see ShardStream). `cache_decoded` keeps decoded images in memory after their
    first read (small datasets: later epochs skip tar reading and decoding). Errors in the shard
    split surface here, at build time, not inside a worker process.

    Resume: the iterator built with `start_batch=k` yields exactly the batches k, k+1, ... of the one
    built with `start_batch=0` (any num_workers; a checkpoint stores only how many batches were
    consumed). Skipped samples are never decoded; with `sample_counts` (url -> samples, from
    `shard_sample_counts(spec)`) the shards wholly before the start are not even read.
    With corrupt data the position also needs `skipped`: `state_dict(k)["skipped"]` of the iterator
    that consumed those k batches (per stream, the samples each reader worker dropped).
    Labels outside [0, num_classes) are corrupt samples; `error_bound` stops a reader that drops too many.
    `order="global"`: the global order (GlobalStream): batch k holds the same samples whatever the
    world size and workers, so a position resumes on another allocation too (`skipped` then keeps
    only its total if the worker count changed; `moved`: it holds the totals of the saved ranks this
    rank inherits on another allocation, checkpoint.moved_position); either way they count in the
    totals and each reader's error bound restarts. `progress`: GlobalStream's, beaten per shard table.
    """
    if labeled_per_gpu < 1 or unlabeled_per_gpu < 0 or start_batch < 0:
        raise ValueError(
            f"need labeled_per_gpu >= 1, unlabeled_per_gpu >= 0, start_batch >= 0: {labeled_per_gpu}, "
            f"{unlabeled_per_gpu}, {start_batch}"
        )
    skipped = dict(skipped or {})
    _warn_uncounted(labeled_urls + (unlabeled_urls if unlabeled_per_gpu else []), sample_counts, start_batch)
    batch_transform = transform if getattr(transform, "batched", False) else None
    per_sample = transform.prepare if batch_transform is not None else transform
    common = {"rank": rank, "world_size": world_size, "transform": per_sample, "channels": channels}
    common |= {"views": 2, "infinite": True, "shuffle_buffer": shuffle_buffer, "cache_decoded": cache_decoded}
    common |= {"sample_counts": sample_counts, "start_batch": start_batch}
    common |= {"num_classes": num_classes, "error_bound": error_bound or ErrorBound(), "report_skipped": True}
    parts = [(labeled_urls, labeled_per_gpu, True, LABELED_STREAM)]
    if unlabeled_per_gpu > 0:
        parts.append((unlabeled_urls, unlabeled_per_gpu, False, UNLABELED_STREAM))
    loaders, pools = [], []
    stream_class = _stream_class(order)
    common["progress"] = progress
    for urls, batch_size, labeled, stream in parts:
        name = STREAM_NAMES[stream]
        stream_class.check_layout(len(urls), world_size, num_workers)
        skipped[name], stream_skipped = stream_class.resume_skipped(skipped.get(name, ()), num_workers, moved)
        dataset = stream_class(
            urls, seed=stream_seed(seed, stream), labeled=labeled, batch_size=batch_size,
            skipped=stream_skipped, **common,
        )  # fmt: skip
        # The workers stack the views into memory they reuse (BatchPool); _zip_batches' cat copies it out.
        pool = BatchPool(num_workers, views=2, context=worker_context()) if num_workers > 0 else None
        pools.append(pool)
        # Not pinned here: the cat of the two parts would drop the pinning; the final batch is pinned.
        seed_r = dataset.seed + rank
        loaders.append(_loader(dataset, batch_size, num_workers, pin_memory=False, seed=seed_r, collate=pool))
    names = [STREAM_NAMES[stream] for *_, stream in parts]
    record = BatchRecord(start_batch, {name: skipped.get(name, ()) for name in names}, num_workers)
    batches = _zip_batches(loaders, pools, pin=pin_memory and torch.cuda.is_available(), record=record)
    if batch_transform is not None and stream_class.places_by_step:
        key = seed_key(stream_seed(seed, BATCH_AUGMENT_STREAM))  # no rank: seeded by place, see below
        places = _global_places(rank, world_size, labeled_per_gpu, unlabeled_per_gpu)
        per_step = world_size * (labeled_per_gpu + unlabeled_per_gpu)
        batches = _augment_by_place(batches, batch_transform, key, start_batch, places, per_step)
    elif batch_transform is not None:
        key = seed_key(stream_seed(seed, BATCH_AUGMENT_STREAM), rank)
        batches = _augment_batches(batches, batch_transform, key, start_batch)
    return TrainBatches(batches, record, labeled_per_gpu + unlabeled_per_gpu, loaders)


@dataclass(frozen=True)
class DataCounts:
    """A rank's corrupt-sample counts at some consumed batch (see TrainBatches.report)."""

    errors: int  # samples dropped since the previous report
    errors_total: int  # since the run's start (restored on resume)
    samples_total: int  # raw samples behind the batches consumed: usable ones + dropped ones


class BatchRecord:
    """What the main process learns from the batches as they are zipped: per stream and reader worker,
    the samples dropped before each batch boundary, and the keys of the last batch (tests, debugging).

    Counts are kept as marks (batches zipped, counts) only where they changed, and a query may name any
    batch from the last one asked about on: exact while the iterator runs ahead of what the loop has
    consumed (a prefetching wrapper), with memory bounded by the batches between two queries.
    """

    def __init__(self, start_batch: int, skipped: Mapping[str, Sequence[int]], num_workers: int) -> None:
        self.names, self.workers = list(skipped), max(num_workers, 1)
        counts = {name: tuple(int(n) for n in (v or [0] * self.workers)) for name, v in skipped.items()}
        self.marks: list[tuple[int, dict[str, tuple[int, ...]]]] = [(start_batch, counts)]
        self.zipped = start_batch  # the batches zipped so far, from the stream's start
        self.keys: list[str] = []

    def add(self, dropped: Mapping[str, int], keys: list[str]) -> None:
        """Batch `self.zipped`: the samples dropped by each stream's reader worker that made it."""
        worker, self.zipped, self.keys = self.zipped % self.workers, self.zipped + 1, keys
        if any(dropped.values()):
            counts = {name: list(v) for name, v in self.marks[-1][1].items()}
            for name, n in dropped.items():
                counts[name][worker] += n
            self.marks.append((self.zipped, {name: tuple(v) for name, v in counts.items()}))

    def skipped_at(self, batches: int) -> dict[str, list[int]]:
        """Per stream and reader worker, the samples dropped in the first `batches` batches."""
        if not self.marks[0][0] <= batches <= self.zipped:
            raise ValueError(
                f"batch {batches} is outside {self.marks[0][0]}..{self.zipped}, the batches zipped since "
                f"the last query; ask about consumed batches, in order"
            )
        i = bisect.bisect_right([m[0] for m in self.marks], batches) - 1
        del self.marks[:i]  # earlier marks are never asked for again
        return {name: list(v) for name, v in self.marks[0][1].items()}


class TrainBatches(Iterator[tuple]):
    """The train batches (an iterator), and the data position and corrupt-sample counts behind them."""

    def __init__(
        self, batches: Iterator[tuple], record: BatchRecord, samples_per_batch: int, loaders: list[DataLoader]
    ) -> None:
        self.batches, self.record, self.samples_per_batch = batches, record, samples_per_batch
        self.reported = self._errors(record.marks[0][1])
        self.loaders = loaders

    def __next__(self) -> tuple:
        return next(self.batches)

    def close(self) -> None:
        """Stop the loader workers now (they would stop when the loaders are garbage)."""
        for loader in self.loaders:
            shut_down(loader)

    @property
    def keys(self) -> list[str]:
        """The sample keys of the batch made last (labeled first), for tests and debugging."""
        return self.record.keys

    def state_dict(self, batches: int) -> dict:
        """The data position after `batches` consumed batches (from the stream's start), for a checkpoint:
        resume with build_train_loader(start_batch=state["batches"], skipped=state["skipped"])."""
        return {"batches": batches, "skipped": self.record.skipped_at(batches)}

    def report(self, batches: int) -> DataCounts:
        """This rank's counts after `batches` consumed batches; `errors` counts since the last report."""
        total = self._errors(self.record.skipped_at(batches))
        errors, self.reported = total - self.reported, total
        return DataCounts(errors, total, total + batches * self.samples_per_batch)

    @staticmethod
    def _errors(skipped: Mapping[str, Sequence[int]]) -> int:
        return sum(sum(v) for v in skipped.values())


class EvalBatches:
    """`(x, labels, keys)` batches of one pass per iteration; `errors`: the samples dropped in the last."""

    def __init__(self, loader: DataLoader, finish: Transform | None = None) -> None:
        self.loader, self.errors, self.finish = loader, 0, finish

    def __iter__(self) -> Iterator[tuple]:
        self.errors = 0
        for *batch, dropped in self.loader:
            self.errors += int(dropped.sum())
            # a batched transform's second half, on the whole batch (e.g. normalization on the device)
            yield tuple(batch) if self.finish is None else (self.finish(batch[0]), *batch[1:])


def _warn_uncounted(urls: list[str], sample_counts: Mapping[str, int] | None, start_batch: int) -> None:
    missing = [url for url in urls if url not in (sample_counts or {})]
    if start_batch and missing:
        log.warning(
            "resuming at batch %d without sample counts for %d shards (e.g. %s): every reader reads each "
            "such shard it meets once to count it; pass sample_counts=shard_sample_counts(spec) from an "
            "*.index.json to skip them unread", start_batch, len(missing), missing[0],
        )  # fmt: skip


def build_eval_loader(
    urls: list[str],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    transform: Transform,
    channels: int,
    num_workers: int,
    num_classes: int | None = None,
    error_bound: ErrorBound | None = None,
    order: str = "reader",
    progress: Callable[[str], None] | None = None,
) -> EvalBatches:
    """One pass over `urls`: each usable sample exactly once over all ranks and workers; yields (x, labels,
    keys), and counts the corrupt samples dropped (`errors`). `order="global"` needs no shard per reader."""
    stream_class = _stream_class(order)
    stream_class.check_layout(len(urls), world_size, num_workers)
    batched = getattr(transform, "batched", False)  # as in build_train_loader: prepare per sample
    dataset = stream_class(
        urls, rank=rank, world_size=world_size, seed=0, channels=channels, batch_size=batch_size,
        transform=transform.prepare if batched else transform,
        views=1, labeled=True, infinite=False, num_classes=num_classes,
        error_bound=error_bound or ErrorBound(), report_skipped=True, progress=progress,
    )  # fmt: skip
    # Pinned on CUDA, so the finishing transform's copy to the device is asynchronous, as in training.
    pin = torch.cuda.is_available()
    loader = _loader(dataset, batch_size, num_workers, pin_memory=pin, seed=rank, drop_last=False)
    return EvalBatches(loader, transform if batched else None)


def _stream_class(order: str) -> type[ShardStream]:
    if order not in ORDERS:
        raise ValueError(f"data order {order!r} is not one of {', '.join(ORDERS)}")
    return ORDERS[order]


def _loader(
    dataset: ShardStream,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    seed: int,
    drop_last: bool = True,
    collate: Callable[[list], Any] | None = None,
) -> DataLoader:
    # The generator fixes torch's per-worker base seed, which would otherwise come from the global RNG.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
        worker_init_fn=_seed_worker_globals,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate,
        prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None,
    )


def _seed_worker_globals(worker_id: int) -> None:
    # ShardStream uses only its own generators; this pins down any library that reaches for the
    # global random/numpy RNGs. torch.initial_seed() here is base_seed + worker_id: deterministic.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    ignore_stop_signals()  # Slurm's stop signals reach workers too: the main process acts on them
    die_with_parent()  # their fork server, which dies with the rank (data/fork_server.py)


def shut_down(loader: DataLoader) -> None:
    """Stop a loader's workers now. After a worker raised, the loader's iterator sits in a reference
    cycle with the traceback, and its shutdown from the garbage collector waits 5 s per worker for
    workers that never got the stop message (torch 2.13)."""
    iterator = getattr(loader, "_iterator", None)  # persistent workers: the loader keeps its iterator
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def _kill_workers_at_exit() -> None:
    """Kill the daemonic children (loader workers) still alive when this process exits.

    Workers ignore SIGTERM (above), and after a worker raised (a DataError) torch's shutdown leaves
    them running; multiprocessing's own exit hook would send them SIGTERM and then join them forever,
    so a run stopped by an error would never exit. Daemonic children are ended at exit anyway.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a failure
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_workers_at_exit)


def _zip_batches(
    loaders: list[DataLoader], pools: list[BatchPool | None], pin: bool, record: BatchRecord
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for n, batches in enumerate(zip(*loaders, strict=False)):
        # Each batch is (view1, view2, labels, keys, dropped): the record takes the last two.
        dropped = {name: int(batch[-1].sum()) for name, batch in zip(record.names, batches, strict=True)}
        record.add(dropped, [key for batch in batches for key in batch[-2]])
        out = tuple(_cat([batch[i] for batch in batches], pin) for i in range(3))
        for pool, batch in zip(pools, batches, strict=True):
            if pool is not None:  # the cat copied its views out: the worker may write that slot again
                pool.release(n, batch[:2])
        yield out


def _augment_batches(
    batches: Iterator[tuple], transform: Transform, key: int, start_batch: int
) -> Iterator[tuple]:
    """A batched transform applied to each view in the main process.

    Batch i's generator is seeded from (key, i) alone, so a resumed iterator augments as the
    uninterrupted one did without replaying the batches before it.
    """
    gen = torch.Generator()
    for i, (view1, view2, labels) in enumerate(batches, start_batch):
        gen.manual_seed(int(counter_seeds(key, i, 1)[0]))
        yield transform(view1, gen), transform(view2, gen), labels


def _global_places(rank: int, world_size: int, labeled: int, unlabeled: int) -> np.ndarray:
    """Each sample's place in its global step (the global batch's labeled images first, then the
    unlabeled ones), the same for a sample whatever the world size."""
    lab = rank * labeled + np.arange(labeled)
    unl = world_size * labeled + rank * unlabeled + np.arange(unlabeled)
    return np.concatenate([lab, unl])


def _augment_by_place(
    batches: Iterator[tuple],
    transform: Transform,
    key: int,
    start_batch: int,
    places: np.ndarray,
    per_step: int,
) -> Iterator[tuple]:
    """A batched transform in the global order: each sample's draws from a generator seeded by its place
    (global step, place in it), so a sample is augmented alike on any allocation. One call per sample: a
    batched transform draws for the whole batch it is given (a batch of another size draws otherwise)."""
    gen = torch.Generator()
    for i, (view1, view2, labels) in enumerate(batches, start_batch):
        out1, out2 = [], []
        for j, seed in enumerate(counter_seeds(key, i * per_step, per_step)[places]):
            gen.manual_seed(int(seed))
            out1.append(transform(view1[j : j + 1], gen))
            out2.append(transform(view2[j : j + 1], gen))
        yield torch.cat(out1), torch.cat(out2), labels


def _cat(parts: list[torch.Tensor], pin: bool) -> torch.Tensor:
    if not pin:
        return torch.cat(parts)
    # cat straight into page-locked memory: the copy cat makes anyway, no extra pass to pin.
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    return torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=True))
