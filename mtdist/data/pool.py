"""Train batches stacked into shared memory that a loader worker reuses, instead of new memory per batch.

torch's default collate stacks each batch a worker makes into newly created shared memory, and every
page of it is a page fault in the worker (2.3-2.9 us per 4 KiB page on the development VM): ~190 us of
a two-view ImageNet sample's ~1.3 ms of worker time, 12% of the worker half (benchmarks/RESULTS.md).
A worker with a BatchPool stacks the views of its k-th batch into slot k % slots of its own ring of
shared-memory tensors, written before and so already mapped, and the main process hands a slot back
once it has copied the batch out (loader._zip_batches: the cat of the labeled and unlabeled parts
copies every batch anyway).

Protocol: worker w holds `slots` permits of its semaphore; it takes one before writing a batch, and the
main process returns one after copying out the n-th batch of the loader's iterator, which a DataLoader
over an IterableDataset takes from worker n % num_workers. So the slot a batch used is never sent:
each side counts. With slots = prefetch_factor + 2 a worker never waits (the main process holds one
batch while prefetch_factor more are in flight); a permit that never comes back (a bug) is an error
after ACQUIRE_TIMEOUT_S, not a hang. For loaders iterated once (the endless train streams): a second
iterator of persistent workers would drop its predecessor's batches without handing their slots back.
"""

from __future__ import annotations

import multiprocessing.context
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate, get_worker_info

ACQUIRE_TIMEOUT_S = 600.0  # never reached by design (see above); a stuck protocol fails, with a reason
PREFETCH_FACTOR = 2  # torch's default, which mtdist's loaders use


class BatchPool:
    """The collate_fn of a train loader with workers (its first `views` sample fields are the stacked
    tensors), and `release(n)`, called by the main process after batch n of the iterator is copied out."""

    def __init__(
        self,
        num_workers: int,
        views: int,
        context: multiprocessing.context.BaseContext,
        slots: int = PREFETCH_FACTOR + 2,
        acquire_timeout_s: float = ACQUIRE_TIMEOUT_S,
    ) -> None:
        if num_workers < 1 or views < 1 or slots < 1:
            raise ValueError(
                f"a BatchPool needs num_workers, views and slots >= 1: {num_workers}, {views}, {slots}"
            )
        self.num_workers, self.views, self.slots = num_workers, views, slots
        self.acquire_timeout_s = acquire_timeout_s
        self.permits = [context.Semaphore(self.slots) for _ in range(num_workers)]
        self._ring: dict[int, list[torch.Tensor]] = {}  # in a worker: slot -> its stacked views
        self._made = 0  # in a worker: batches stacked so far
        self._received: dict[tuple[int, int], Sequence[torch.Tensor]] = {}  # in the main process

    def __getstate__(self) -> dict[str, Any]:
        # To a worker: the semaphores; each process keeps its own ring and counts.
        return {**self.__dict__, "_ring": {}, "_made": 0, "_received": {}}

    def __call__(self, samples: list[tuple]) -> list:
        info = get_worker_info()
        if info is None:  # num_workers=0: nothing to reuse across processes
            return default_collate(samples)
        if not self.permits[info.id].acquire(timeout=self.acquire_timeout_s):
            raise RuntimeError(
                f"loader worker {info.id}: no batch slot handed back in {self.acquire_timeout_s:g} s; the "
                f"main process holds all {self.slots} (a second iterator over a pooled loader?)"
            )
        slot, self._made = self._made % self.slots, self._made + 1
        stacked = [self._stack([s[i] for s in samples], slot, i) for i in range(self.views)]
        return [*stacked, *default_collate([s[self.views :] for s in samples])]

    def release(self, batch_index: int, batch: Sequence[torch.Tensor]) -> None:
        """Batch `batch_index` of the iterator (its stacked views `batch`) is copied out: its worker may
        reuse the slot. Keeping the views referenced keeps their mapping, so that the next batch in the
        same slot arrives without a new mmap of it (torch's storage cache)."""
        worker = batch_index % self.num_workers
        self._received[(worker, batch_index // self.num_workers % self.slots)] = batch
        self.permits[worker].release()

    def _stack(self, tensors: list[torch.Tensor], slot: int, view: int) -> torch.Tensor:
        ring = self._ring.setdefault(slot, [])
        shape, dtype = (len(tensors), *tensors[0].shape), tensors[0].dtype
        if len(ring) <= view or ring[view].shape != shape or ring[view].dtype != dtype:
            out = torch.empty(shape, dtype=dtype).share_memory_()  # once per slot (and view)
            ring[view:] = [out, *ring[view + 1 :]]
        return torch.stack(tensors, out=ring[view])
