"""Checkpoint save and load time against model size, through mtdist's checkpoint code path.

For each model: a Mean Teacher student in its DeepSpeed engine (SGD with momentum) and its fp32
teacher are saved with mtdist.checkpoint.save (DeepSpeed files + per-rank teacher/BN/RNG file,
written under .tmp-step-N and renamed into place) and loaded back as mtdist.train.resume does
(engine.load_checkpoint + the rank file). "save" returns when the files are written (the OS may
still hold them in its page cache); "fsync" then forces every file to disk, so save + fsync is the
durable time. The load reads files that were just written: from the page cache, not the disk
(dropping the cache needs root and would slow everyone else on a shared machine).

    .venv/bin/python -m benchmarks.checkpoint [--archs resnet18,resnet50,resnet152] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.step import bench_config
from mtdist import checkpoint
from mtdist.checkpoint import TrainState
from mtdist.preflight import SyntheticStep, init_single_process


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def time_one_model(arch: str, root: Path, repeats: int, device: torch.device) -> dict[str, Any]:
    """Median save, fsync and load seconds of one model's checkpoint, and its size on disk."""
    cfg = bench_config(arch, 64, 4, bf16=False, extra=(f"logging.run_dir={root}",))
    stepper = SyntheticStep(cfg, device)
    stepper(0)  # one optimizer step: SGD's momentum buffers exist, as in any real checkpoint
    engine, teacher = stepper.engine, stepper.teacher
    params = sum(p.numel() for p in engine.module.parameters())
    saves, syncs, loads, size = [], [], [], 0
    for step in range(1, repeats + 1):
        rank_state = {
            "teacher": teacher.state_dict(),
            "student_buffers": dict(engine.module.named_buffers()),
            "rng": checkpoint.rng_state(),
        }
        meta = checkpoint.make_meta(cfg, TrainState(step=step, wandb_run_id="bench"), 1)
        start = time.perf_counter()
        folder = checkpoint.save(root, engine, rank_state, meta, step, keep_last=1)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        fsync_tree(folder)
        syncs.append(time.perf_counter() - start)
        size = folder_bytes(folder)
        start = time.perf_counter()
        engine.load_checkpoint(str(folder.parent), tag=folder.name)
        teacher.load_state_dict(checkpoint.load_rank_state(folder, 0)["teacher"])
        loads.append(time.perf_counter() - start)
    shutil.rmtree(root, ignore_errors=True)
    return {
        "arch": arch,
        "params_M": params / 1e6,
        "size_MB": size / 1e6,
        "save_s": statistics.median(saves),
        "fsync_s": statistics.median(syncs),
        "load_s": statistics.median(loads),
    }


def run(archs: tuple[str, ...] = ("resnet18", "resnet50", "resnet152"), repeats: int = 3) -> dict[str, Any]:
    """(e): one row per model; throughput in MB/s of checkpoint bytes."""
    device = init_single_process()
    base = Path(tempfile.mkdtemp(prefix="mtdist-ckpt-bench-"))
    try:
        rows = [time_one_model(arch, base / arch, repeats, device) for arch in archs]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for r in rows:
        r["save_MBps"] = r["size_MB"] / r["save_s"]
        r["durable_MBps"] = r["size_MB"] / (r["save_s"] + r["fsync_s"])
        r["load_MBps"] = r["size_MB"] / r["load_s"]
    big, small = rows[-1], rows[0]
    return {
        "setup": f"{', '.join(archs)}; Mean Teacher state (student, SGD momentum, teacher); "
        f"median of {repeats}; in {base.parent}",
        "rows": rows,
        "ratios": [
            {
                "name": f"(e) save time {big['arch']} / {small['arch']} vs size ratio "
                f"{big['size_MB'] / small['size_MB']:.1f}",
                "value": big["save_s"] / small["save_s"],
                "goal": "~ the size ratio (time proportional to bytes)",
                "met": None,
            }
        ],
    }


def report_lines(res: dict[str, Any]) -> list[str]:
    lines = [
        f"  {res['setup']}",
        "  model       params   on disk    save (MB/s)       +fsync (MB/s)     load (MB/s)",
    ]
    for r in res["rows"]:
        lines.append(
            f"  {r['arch']:<10} {r['params_M']:6.1f} M {r['size_MB']:7.0f} MB"
            f" {r['save_s']:6.2f} s ({r['save_MBps']:5.0f})"
            f"  {r['save_s'] + r['fsync_s']:6.2f} s ({r['durable_MBps']:5.0f})"
            f"  {r['load_s']:6.2f} s ({r['load_MBps']:5.0f})"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="resnet18,resnet50,resnet152")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    res = run(tuple(args.archs.split(",")), args.repeats)
    print("\n".join(report_lines(res)))


if __name__ == "__main__":
    main()
