"""Seeds for the data streams: keys from named entropy, and per-index seeds counted off a key.

A resumed stream must draw the same numbers as an uninterrupted one without replaying what it
skipped, so every random draw is seeded by *where* it is (sample i of an epoch, batch i of a run),
not by how many draws came before it. SeedSequence mixes the identifying integers well but costs
~50 us a call, too much per sample; so it makes one key per (stream, rank, worker, epoch) and a
splitmix64 finalizer, vectorized over a block of indices, turns (key, index) into each seed.
"""

from __future__ import annotations

import numpy as np

# Tags mixed into the entropy so the shuffle and the augmentation of one reader never share a stream.
SHUFFLE_TAG, AUGMENT_TAG = 0, 1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def seed_key(*entropy: int) -> int:
    """A 64-bit key from non-negative integers (a run seed, rank, worker, epoch, a tag, ...)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0])


def counter_seeds(key: int, start: int, count: int) -> np.ndarray:
    """Seeds for indices start .. start + count - 1 of `key`: splitmix64(key + (index + 1) * golden).

    Index i's seed does not depend on `start`, which is what lets a stream resume at any index.
    torch's CPU generator keeps only the low 32 bits of a seed; splitmix64 mixes into all of them.
    """
    index = np.arange(start + 1, start + 1 + count, dtype=np.uint64)
    x = np.uint64(key) + index * _GOLDEN  # uint64 arrays wrap around silently, as splitmix64 needs
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))
