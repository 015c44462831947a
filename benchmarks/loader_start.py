"""What fork-safe loader workers cost: one evaluation pass with 2 workers, measured side by side.

    .venv/bin/python -m benchmarks.loader_start

- fork, new loader: what every evaluation did before (forked workers: can deadlock, see
  mtdist/data/loader.py), the reference;
- forkserver, first loader: the fork server starts and imports the data package once per process;
- forkserver, new loader: a later loader's workers, forked from the warm server;
- forkserver, reused loader: what an evaluation costs now (Run.eval_batches keeps one loader per split).
Each is the median of ROUNDS passes over the same 600 MNIST images in 6 shards; the pass itself (decode
and batches) is in every figure, so the differences are the start-up costs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mtdist import data as mtdata
from mtdist.data import loader

ROUNDS = 5
WORKERS = 2


def shards(folder: Path) -> list[str]:
    images, labels = mtdata.load_mnist5k()
    keys = [f"s{i:04d}" for i in range(600)]
    mtdata.write_array_dataset(images[:600], labels[:600], keys, folder, "val", 100)
    return mtdata.resolve_shards(str(folder / "val.index.json"))


def new_loader(urls: list[str]) -> mtdata.EvalBatches:
    tf = mtdata.DigitsAugment(0, 0.0, mean=0.0, std=1.0)
    return mtdata.build_eval_loader(
        urls, batch_size=100, rank=0, world_size=1, transform=tf, channels=1, num_workers=WORKERS
    )


def one_pass(batches: mtdata.EvalBatches) -> float:
    start = time.perf_counter()
    count = sum(len(b[1]) for b in batches)
    assert count == 600, count
    return time.perf_counter() - start


def fresh_pass(urls: list[str]) -> float:
    batches = new_loader(urls)
    seconds = one_pass(batches)
    loader.shut_down(batches.loader)
    return seconds


def median_ms(measure: Callable[[], float]) -> float:
    return 1000 * statistics.median(measure() for _ in range(ROUNDS))


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        urls = shards(Path(tmp))
        loader.WORKER_START_METHOD = "fork"
        fork_ms = median_ms(lambda: fresh_pass(urls))
        loader.WORKER_START_METHOD = "forkserver"
        first_ms = 1000 * fresh_pass(urls)  # starts the server: once per process
        server_ms = median_ms(lambda: fresh_pass(urls))
        kept = new_loader(urls)
        one_pass(kept)  # its workers start here, as at a run's first evaluation
        reused_ms = median_ms(lambda: one_pass(kept))
    return {"fork_new_ms": fork_ms, "forkserver_first_ms": first_ms, "forkserver_new_ms": server_ms,
            "forkserver_reused_ms": reused_ms}  # fmt: skip


def main() -> None:
    np.random.seed(0)
    res = run()
    print(f"one evaluation pass, {WORKERS} workers, 600 images (median of {ROUNDS}):")
    print(f"  fork, new loader each time (before):     {res['fork_new_ms']:7.0f} ms")
    print(f"  forkserver, first loader of the process: {res['forkserver_first_ms']:7.0f} ms")
    print(f"  forkserver, new loader:                  {res['forkserver_new_ms']:7.0f} ms")
    print(f"  forkserver, reused loader (now):         {res['forkserver_reused_ms']:7.0f} ms")


if __name__ == "__main__":
    main()
