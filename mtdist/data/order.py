"""Stage 1 of the global order (order -> seek.py -> decode -> views): which sample sits at each position.

A stream's positions 0, 1, 2, ... run through its epochs (epoch e holds positions e*N .. e*N + N - 1,
N = the set's raw samples). Which sample is at a position is a pure function of (seed, epoch, position
in the epoch), never of the number of ranks or loader workers:
1. the shards come in a seeded permutation of the epoch (`shard_order(num_shards, seed, epoch)`);
2. their samples, concatenated in that order (each shard in its stored order), are cut into blocks of
   `block` consecutive samples, and each block is permuted (seeded by (seed, epoch)).
So what mixes with what: a global batch draws from about block / (samples per shard) shards at once,
and the images of one shard land in the blocks its samples span: with shards no longer than a block,
one block or two neighbouring ones, at most 2 * block - 1 positions apart (only ids are permuted: a
block costs 8 bytes a sample, never the images, so a block can hold many shards).
`block <= 1` keeps each shard's stored order (the shards still come permuted, unless `shuffle=False`,
the evaluation order: shards as listed, each in its stored order).

Global step s of a stream with global batch G holds positions s*G .. s*G + G - 1; rank r of R takes
the r-th contiguous G/R of them (`step_positions`), so any R that divides G sees the same samples per
step, and a rank's loader workers take whole steps in turn (worker w makes the rank's batches
w, w + W, ...), so any worker count does too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .seeds import counter_seeds, seed_key

_BLOCK_TAG, _AUGMENT_TAG, _SUBSTITUTE_TAG = 10, 11, 12


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of shard indices; identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


@dataclass
class GlobalOrder:
    """Sample ids (index into the shards' samples concatenated in url order) at stream positions."""

    counts: tuple[int, ...]  # raw samples per shard, in url order
    seed: int
    block: int
    shuffle: bool = True
    _epochs: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.counts or min(self.counts) < 0 or sum(self.counts) < 1:
            raise ValueError(f"a global order needs shards with samples, got counts {self.counts[:8]}")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @property
    def num_samples(self) -> int:
        return int(self.starts[-1])

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """The sample id at each position of the epoch (kept for the last two epochs asked for)."""
        ids = self._epochs.get(epoch)
        if ids is None:
            ids = self._make_epoch(epoch)
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1} | {epoch: ids}
        return ids

    def at(self, position: int) -> tuple[int, int, int]:
        """(epoch, position in the epoch, sample id) of a stream position."""
        epoch, offset = divmod(position, self.num_samples)
        return epoch, offset, int(self.epoch_ids(epoch)[offset])

    def shard_of(self, sample_id: int) -> tuple[int, int]:
        """(shard index in url order, sample index in that shard)."""
        shard = int(np.searchsorted(self.starts, sample_id, side="right")) - 1
        return shard, sample_id - int(self.starts[shard])

    def augment_seed(self, epoch: int, offset: int) -> int:
        """A sample's augmentation seed: where it is in the epoch, not which rank or worker reads it."""
        return int(counter_seeds(seed_key(self.seed, epoch, _AUGMENT_TAG), offset, 1)[0])

    def substitute(self, epoch: int, offset: int, attempt: int) -> int:
        """The epoch position whose sample fills position `offset`'s place when that one is corrupt
        (attempt 1, 2, ...): seeded by the place, so every allocation fills it alike."""
        key = seed_key(self.seed, epoch, _SUBSTITUTE_TAG, attempt)
        return int(counter_seeds(key, offset, 1)[0] % np.uint64(self.num_samples))

    def _make_epoch(self, epoch: int) -> np.ndarray:
        shards = shard_order(len(self.counts), self.seed, epoch) if self.shuffle else range(len(self.counts))
        ids = np.concatenate([np.arange(self.starts[i], self.starts[i + 1]) for i in shards])
        if not self.shuffle or self.block <= 1:
            return ids
        # block index + a uniform in [0, 1): sorting permutes within each block, blocks stay in order
        noise = np.random.default_rng([self.seed, epoch, _BLOCK_TAG]).random(len(ids))
        keys = np.arange(len(ids)) // self.block + noise
        return ids[np.argsort(keys, kind="stable")]


def step_positions(step: int, per_rank: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s stream positions in global step `step` (global batch per_rank * world_size)."""
    start = step * per_rank * world_size + rank * per_rank
    return range(start, start + per_rank)


def eval_positions(num_samples: int, rank: int, world_size: int, batch_size: int, worker: int, workers: int):
    """Positions of one evaluation pass for a (rank, worker): the rank's contiguous share of the set,
    in batches of `batch_size`, the worker taking batches worker, worker + workers, ... (as the
    DataLoader hands them out); every position exactly once over all ranks and workers."""
    lo, hi = num_samples * rank // world_size, num_samples * (rank + 1) // world_size
    for start in range(lo + worker * batch_size, hi, workers * batch_size):
        yield from range(start, min(start + batch_size, hi))
