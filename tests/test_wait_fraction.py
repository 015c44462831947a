"""data/wait_fraction: the share of each step a rank waits for its next batch, mean and worst over ranks.

Two gloo ranks read real shards through the real train loader and time it as train_loop does
(Window.next_batch), with a stand-in step that all-reduces as a gradient would; then one rank's reader
is made slow on purpose, and its share, the worst-rank figure and the worst rank's index must show it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from mtdist.data import DigitsAugment, build_train_loader, write_array_dataset
from mtdist.dist import free_port
from mtdist.train import Window, wait_metrics

STEPS = 6
STEP_S = 0.02  # the stand-in step's compute
SLOW_SAMPLE_S = 0.004  # per view of a sample on the slow rank's reader: 2 x 8 x 4 ms = 64 ms a batch


class SlowReader:
    """A per-sample transform that sleeps first when `slow` (the reader's work made slow on purpose)."""

    def __init__(self, slow: bool) -> None:
        self.slow, self.inner = slow, DigitsAugment(0, 0.0, mean=0.5, std=0.5)

    def __call__(self, img: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if self.slow:
            time.sleep(SLOW_SAMPLE_S)
        return self.inner(img, gen)


def _measure(rank: int, urls: list[str], slow_rank: int | None) -> tuple[float, dict[str, float]]:
    """(this rank's wait fraction, wait_metrics) over STEPS steps of the loop's shape."""
    loader = build_train_loader(
        urls, urls, labeled_per_gpu=4, unlabeled_per_gpu=4, rank=rank, world_size=2, seed=0,
        transform=SlowReader(rank == slow_rank), channels=1, num_workers=0, shuffle_buffer=8,
    )  # fmt: skip
    batches = iter(loader)
    window = Window()
    for _ in range(STEPS):
        window.next_batch(batches)
        time.sleep(STEP_S)
        torch_dist.all_reduce(torch.zeros(4))  # the gradient all_reduce: the fast rank waits here
    fraction = window.waited_s / (time.perf_counter() - window.start)
    return fraction, wait_metrics(fraction, torch.device("cpu"))


def _rank_main(rank: int, port: int, urls: list[str], out: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = {}
        for phase, slow_rank in (("even", None), ("rank1_slow", 1)):
            fraction, metrics = _measure(rank, urls, slow_rank)
            result[phase] = {"mine": fraction, **metrics}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch_dist.destroy_process_group()


def test_a_slow_reader_shows_on_its_rank_and_in_the_worst_rank_figure(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8), dtype=np.uint8)
    labels = np.arange(64) % 4
    urls = [
        str(p) for p in write_array_dataset(images, labels, [f"s{i}" for i in range(64)], tmp_path, "d", 8)
    ]
    mp.spawn(_rank_main, args=(free_port(), urls, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    even, slow = [r["even"] for r in ranks], [r["rank1_slow"] for r in ranks]
    # every rank computes the same reduced figures
    for key in ("data/wait_fraction", "data/wait_fraction_worst", "data/wait_worst_rank"):
        assert even[0][key] == even[1][key] and slow[0][key] == slow[1][key]
    assert max(r["mine"] for r in even) < 0.5  # an input that keeps up: the step dominates
    # the slow rank's share rises, the fast rank's does not (it waits in the all_reduce, as step time)
    assert slow[1]["mine"] > 0.6 and slow[1]["mine"] > even[1]["mine"] + 0.3
    assert slow[0]["mine"] < 0.5
    assert slow[0]["data/wait_fraction_worst"] == slow[1]["mine"] and slow[0]["data/wait_worst_rank"] == 1
    assert slow[0]["data/wait_fraction_worst"] > even[0]["data/wait_fraction_worst"] + 0.3
    mean = slow[0]["data/wait_fraction"]
    assert abs(mean - (slow[0]["mine"] + slow[1]["mine"]) / 2) < 1e-12


def test_one_rank_reports_its_own_share() -> None:
    assert wait_metrics(0.25, torch.device("cpu")) == {
        "data/wait_fraction": 0.25,
        "data/wait_fraction_worst": 0.25,
        "data/wait_worst_rank": 0,
    }
