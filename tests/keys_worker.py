"""Run under torchrun by test_imagenet_train.py: real build_run + train_loop on ImageNet-layout shards,
recording the keys of every batch each rank trained on.

Writes <out>/keys-rank<r>.json: {"steps", "teacher_updates", "batches": [[key, ...] per micro-batch],
"labels": [[label, ...] per micro-batch], "rng": a digest of torch's global generator after the start
(what dropout draws from)}.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as torch_dist

from mtdist.cli import _setup_logging
from mtdist.config import load_config
from mtdist.train import build_run, train_loop


class RecordingBatches(Iterator[tuple]):
    """The run's train batches, unchanged, with the keys and labels of each one noted on the way."""

    def __init__(self, batches) -> None:  # noqa: ANN001 - mtdist.data.loader.TrainBatches
        self.inner, self.keys, self.labels = batches, [], []

    def __next__(self) -> tuple:
        batch = next(self.inner)
        self.keys.append(list(self.inner.keys))
        self.labels.append(batch[2].tolist())
        return batch

    def __getattr__(self, name: str):  # noqa: ANN204 - state_dict, report, close: the loader's own
        return getattr(self.inner, name)


def main(config: str, out: str, overrides: list[str]) -> None:
    _setup_logging()  # as `mtdist train` does: rank 0's resume line (what changed) reaches the output
    run = build_run(load_config(config, overrides))
    rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    run.train_batches = recorder = RecordingBatches(run.train_batches)
    train_loop(run)
    rank = torch_dist.get_rank()
    record = {
        "steps": run.state.step,
        "teacher_updates": run.teacher.updates,
        "batches": recorder.keys,
        "labels": recorder.labels,
        "rng": rng,
    }
    (Path(out) / f"keys-rank{rank}.json").write_text(json.dumps(record))
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
