"""BatchPool: loader workers stack train batches into shared memory they reuse (mtdist/data/pool.py).

Real DataLoader workers (from mtdist's fork server), real shared memory: the batches must be what the
stream made even when the workers run ahead of a slow consumer, the memory must be reused, and a
protocol that stops handing slots back must fail with a reason instead of hanging.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtdist.data.loader import worker_context
from mtdist.data.pool import BatchPool

BATCH, SHAPE = 4, (3, 8, 8)


class Counting(IterableDataset):
    """Sample i of worker w: views filled with (w, i) and its negative, label i, key, dropped 0."""

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        for i in itertools.count():
            value = float(worker * 100_000 + i)
            yield torch.full(SHAPE, value), torch.full(SHAPE, -value), i, f"w{worker}-{i}", 0


def _loader(pool: BatchPool | None, workers: int = 2) -> DataLoader:
    return DataLoader(
        Counting(), batch_size=BATCH, num_workers=workers, collate_fn=pool,
        multiprocessing_context=worker_context(), persistent_workers=True, prefetch_factor=2,
    )  # fmt: skip


def _expected(n: int, workers: int) -> torch.Tensor:
    """The values of batch n: worker n % workers, its (n // workers)-th batch."""
    worker, k = n % workers, n // workers
    return torch.tensor([worker * 100_000 + k * BATCH + j for j in range(BATCH)], dtype=torch.float32)


@pytest.mark.parametrize("slots", [1, 4])  # 1: each worker waits for every slot; 4 (the default): never
def test_batches_stay_intact_while_the_workers_run_ahead_and_the_memory_is_reused(slots: int) -> None:
    pool = BatchPool(2, views=2, context=worker_context(), slots=slots)
    storages = set()
    for n, (view1, view2, labels, keys, dropped) in enumerate(itertools.islice(_loader(pool), 24)):
        time.sleep(0.02)  # a slow consumer: both workers fill every slot they may before it copies out
        copy1, copy2 = view1.clone(), view2.clone()
        pool.release(n, (view1, view2))
        assert torch.equal(copy1[:, 0, 0, 0], _expected(n, 2)) and torch.equal(copy2, -copy1)
        assert (copy1 == copy1[:, :1, :1, :1]).all()  # every pixel of a sample, not only the first
        assert labels.tolist() == [n // 2 * BATCH + j for j in range(BATCH)] and len(keys) == BATCH
        assert dropped.tolist() == [0] * BATCH
        storages.add(view1.untyped_storage().data_ptr())
    assert len(storages) <= 2 * pool.slots  # each worker's ring, not a new mapping per batch


def test_the_default_collate_makes_new_memory_for_every_batch() -> None:
    # The comparison the pool is for: torch's collate maps every batch anew (here 24 distinct storages,
    # kept alive so that no address is reused).
    batches = list(itertools.islice(_loader(None), 24))
    assert len({b[0].untyped_storage().data_ptr() for b in batches}) == 24


def test_slots_never_handed_back_fail_the_loader_with_a_reason() -> None:
    pool = BatchPool(1, views=2, context=worker_context(), slots=2, acquire_timeout_s=1.0)
    batches = iter(_loader(pool, workers=1))
    next(batches), next(batches)  # two slots taken, none released
    with pytest.raises(RuntimeError, match="no batch slot handed back in 1 s; the main process holds all 2"):
        next(batches)


def test_without_workers_it_is_the_default_collate() -> None:
    pool = BatchPool(1, views=2, context=worker_context())
    samples = [(torch.ones(2), torch.zeros(2), 1, "k", 0)] * 3
    view1, view2, labels, keys, dropped = pool(samples)
    assert view1.shape == (3, 2) and labels.tolist() == [1, 1, 1] and list(keys) == ["k"] * 3
    with pytest.raises(ValueError, match="needs num_workers, views and slots >= 1"):
        BatchPool(0, views=2, context=worker_context())
