"""W&B offline (real wandb, no network): run files hold the metrics; a resumed run continues the same id."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, shard_overrides
from wandb.proto import wandb_internal_pb2

pytestmark = pytest.mark.slow
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of checksummed records
API_KEY = "mtdist0test0sentinel0" + "0" * 19  # 40 characters like a real key; must never be printed or saved


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Our own reader (wandb 0.31 ships none): 7-byte file header, then records split across blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(records: list[wandb_internal_pb2.Record]) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in r.history.item
                }
            )
    return rows


def train(shards: dict[str, str], run_dir: Path, steps: int) -> str:
    cmd = [
        sys.executable,
        "-m",
        "mtdist",
        "train",
        "--config",
        str(TINY),
        *shard_overrides(shards),
        f"logging.run_dir={run_dir}",
        f"schedule.max_steps={steps}",
        "logging.wandb=offline",
        "data.labeled_batch_size=8",
        "data.batch_size=16",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_API_KEY": API_KEY, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_offline_run_holds_metrics_and_resume_continues_the_same_run(mnist_shards, tmp_path):
    printed = train(mnist_shards, tmp_path, steps=4)  # one plain process: rank 0 of 1, no launcher
    first = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(first) == 1
    run_id = first[0].name.rsplit("-", 1)[1]
    records = read_wandb_records(next(first[0].glob("run-*.wandb")))
    rows = history(records)
    steps = [r["step"] for r in rows if "train/loss_total" in r]
    assert steps == [2, 4]
    assert any("val/teacher/top1" in r for r in rows) and all("time" not in r for r in rows)
    # W&B makes a panel section of each name's first segment: these, plotted against the optimizer step
    keys = {k for r in rows for k in r}
    assert {k.split("/")[0] for k in keys if "/" in k} == {"train", "eval", "data", "system", "val"}
    assert {"eval/student/top1", "eval/teacher/top1", "data/images_per_s", "data/errors"} <= keys
    assert {"data/wait_fraction", "data/wait_fraction_worst", "data/wait_worst_rank"} <= keys
    assert {"system/step_time_s", "system/rss_gb", "system/world_size"} <= keys
    logged = {
        i.key: json.loads(i.value_json)
        for r in records
        if r.WhichOneof("record_type") == "run"
        for i in r.run.config.update
    }
    assert logged["optim"]["name"] == "sgd" and logged["mean_teacher"]["ema_decay"] == 0.99  # resolved config

    printed += train(mnist_shards, tmp_path, steps=6)  # resumes from the step-4 checkpoint
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {
        r.name.rsplit("-", 2)[-2] if r.name.endswith("-1") else r.name.rsplit("-", 1)[1] for r in runs
    } == {run_id}
    second = next(r for r in runs if r != first[0])
    resumed = [
        r["step"]
        for r in history(read_wandb_records(next(second.glob("run-*.wandb"))))
        if "train/loss_total" in r
    ]
    assert resumed == [6]
    # the key in the environment (as a user exports it) is neither printed nor written anywhere
    assert API_KEY not in printed
    saved = [p for p in tmp_path.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert not saved
