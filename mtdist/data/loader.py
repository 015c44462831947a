"""DataLoaders over ShardStreams: the endless labeled + unlabeled train batches and the eval pass."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from .seeds import counter_seeds, seed_key
from .stream import ShardStream, check_readers
from .transforms import Transform

log = logging.getLogger(__name__)

# Stream ids mixed into the seed, so the labeled and unlabeled streams never share random draws.
LABELED_STREAM, UNLABELED_STREAM, BATCH_AUGMENT_STREAM = 0, 1, 2


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
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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
    """
    if labeled_per_gpu < 1 or unlabeled_per_gpu < 0 or start_batch < 0:
        raise ValueError(
            f"need labeled_per_gpu >= 1, unlabeled_per_gpu >= 0, start_batch >= 0: {labeled_per_gpu}, "
            f"{unlabeled_per_gpu}, {start_batch}"
        )
    _warn_uncounted(labeled_urls + (unlabeled_urls if unlabeled_per_gpu else []), sample_counts, start_batch)
    batch_transform = transform if getattr(transform, "batched", False) else None
    per_sample = transform.prepare if batch_transform is not None else transform
    common = {"rank": rank, "world_size": world_size, "transform": per_sample, "channels": channels}
    common |= {"views": 2, "infinite": True, "shuffle_buffer": shuffle_buffer, "cache_decoded": cache_decoded}
    common |= {"sample_counts": sample_counts, "start_batch": start_batch}
    parts = [(labeled_urls, labeled_per_gpu, True, LABELED_STREAM)]
    if unlabeled_per_gpu > 0:
        parts.append((unlabeled_urls, unlabeled_per_gpu, False, UNLABELED_STREAM))
    loaders = []
    for urls, batch_size, labeled, stream in parts:
        check_readers(len(urls), world_size, num_workers)
        dataset = ShardStream(
            urls, seed=stream_seed(seed, stream), labeled=labeled, batch_size=batch_size, **common
        )
        # Not pinned here: the cat of the two parts would drop the pinning; the final batch is pinned.
        loaders.append(_loader(dataset, batch_size, num_workers, pin_memory=False, seed=dataset.seed + rank))
    batches = _zip_batches(loaders, pin=pin_memory and torch.cuda.is_available())
    if batch_transform is None:
        return batches
    key = seed_key(stream_seed(seed, BATCH_AUGMENT_STREAM), rank)
    return _augment_batches(batches, batch_transform, key, start_batch)


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
) -> DataLoader:
    """One pass over `urls`: each sample exactly once over all ranks and workers; yields (x, labels, keys)."""
    check_readers(len(urls), world_size, num_workers)
    dataset = ShardStream(
        urls, rank=rank, world_size=world_size, seed=0, transform=transform, channels=channels,
        views=1, labeled=True, infinite=False,
    )  # fmt: skip
    return _loader(dataset, batch_size, num_workers, pin_memory=False, seed=rank, drop_last=False)


def _loader(
    dataset: ShardStream,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    seed: int,
    drop_last: bool = True,
) -> DataLoader:
    # The generator fixes torch's per-worker base seed, which would otherwise come from the global RNG.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker_globals,
        generator=torch.Generator().manual_seed(seed),
    )


def _seed_worker_globals(worker_id: int) -> None:
    # ShardStream uses only its own generators; this pins down any library that reaches for the
    # global random/numpy RNGs. torch.initial_seed() here is base_seed + worker_id: deterministic.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _zip_batches(
    loaders: list[DataLoader], pin: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for batches in zip(*loaders, strict=False):
        # Each batch is (view1, view2, labels, keys); keys are only for tests and debugging.
        yield tuple(_cat([batch[i] for batch in batches], pin) for i in range(3))


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


def _cat(parts: list[torch.Tensor], pin: bool) -> torch.Tensor:
    if not pin:
        return torch.cat(parts)
    # cat straight into page-locked memory: the copy cat makes anyway, no extra pass to pin.
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    return torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=True))
