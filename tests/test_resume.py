"""Checkpoints: atomic saves, bitwise-exact resume after SIGKILL, stop signals -> checkpoint + requeue status.

Real DeepSpeed, 2 processes on CPU, tiny config on real shards, loader workers > 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, shard_overrides

from mtdist import checkpoint
from mtdist.dist import free_port
from mtdist.logger import read_metrics
from mtdist.preempt import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow
TOTAL_STEPS = 12


def overrides(shards: dict[str, str], run_dir: Path) -> list[str]:
    return [
        *shard_overrides(shards),
        f"logging.run_dir={run_dir}",
        f"schedule.max_steps={TOTAL_STEPS}",
        "checkpoint.interval_steps=3",
        "checkpoint.keep_last=10",
        "logging.log_interval_steps=1",
        "data.num_workers=1",
        "logging.eval_interval_steps=6",
    ]


def launch(args: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "mtdist",
        "train",
        "--config",
        str(TINY),
        *args,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, finish(proc)[1][-4000:]
        rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        if rows and rows[-1]["step"] >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def final_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Student, optimizer and teacher of the last checkpoint, every rank."""
    folder = checkpoint.latest(run_dir / "checkpoints")
    assert folder is not None and folder.name == checkpoint.tag_for(TOTAL_STEPS)
    model = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    out = {"student": model["module"], "optimizer": _tensors(model["optimizer"])}
    for r in range(2):
        out[f"rank{r}"] = checkpoint.load_rank_state(folder, r)["teacher"]["module"]
    return out


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return {k: v for key, val in items for k, v in _tensors(val, f"{prefix}/{key}").items()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}:{k} differs"


@pytest.fixture(scope="module")
def uninterrupted_dir(mnist_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run_a")
    code, out = finish(launch(overrides(mnist_shards, run_dir)))
    assert code == 0, out[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_dir) -> dict:
    return final_state(uninterrupted_dir)


def test_eval_command_on_a_checkpoint(uninterrupted_dir):
    """`mtdist eval --checkpoint DIR`: one process evaluates a checkpoint written by two."""
    folder = checkpoint.latest(uninterrupted_dir / "checkpoints")
    proc = subprocess.run(
        [sys.executable, "-m", "mtdist", "eval", "--checkpoint", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["step"] == TOTAL_STEPS and result["val/count"] == 120
    assert 0 <= result["val/teacher/top1"] <= 100 and 0 <= result["val/student/top5"] <= 100


def test_checkpoint_of_another_model_is_refused(mnist_shards, uninterrupted_dir, tmp_path):
    folder = checkpoint.latest(uninterrupted_dir / "checkpoints")
    code, out = finish(
        launch(overrides(mnist_shards, tmp_path) + [f"checkpoint.resume={folder}", "model.width=8"])
    )
    assert code != 0
    assert "model.width: checkpoint 4 vs now 8" in out


@pytest.mark.parametrize("kill_after_step", [4, 7, 10])
def test_sigkill_then_resume_is_bitwise_exact(mnist_shards, tmp_path, uninterrupted, kill_after_step):
    """Killed after the checkpoint at step 3, 6 or 9 (mid-epoch; the labeled stream wraps at step 10)."""
    proc = launch(overrides(mnist_shards, tmp_path))
    ranks = _rank_pids(proc.pid)
    wait_for_step(tmp_path, kill_after_step, proc)
    for pid in ranks:  # torchrun starts each worker in its own session: kill them, not just the launcher
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = checkpoint.read_meta(checkpoint.latest(tmp_path / "checkpoints"))["train_state"]["step"]
    assert 3 <= done < TOTAL_STEPS
    code, out = finish(launch(overrides(mnist_shards, tmp_path)))
    assert code == 0, out[-4000:]
    assert f"resumed from {tmp_path / 'checkpoints' / checkpoint.tag_for(done)}" in out
    assert_bitwise_equal(final_state(tmp_path), uninterrupted)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_checkpoints_and_exits_for_requeue(mnist_shards, tmp_path, uninterrupted, sig):
    proc = launch(overrides(mnist_shards, tmp_path) + ["checkpoint.interval_steps=0"])
    wait_for_step(tmp_path, 2, proc)
    rank0 = _rank_pids(proc.pid)[0]
    sent = time.monotonic()
    os.kill(rank0, sig)
    code, out = finish(proc, timeout=120)
    assert time.monotonic() - sent < 60
    assert f"exit {REQUEUE_EXIT_CODE} = requeue me" in out and code != 0
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in out  # torchrun reports the ranks' status
    stopped = checkpoint.read_meta(checkpoint.latest(tmp_path / "checkpoints"))["train_state"]["step"]
    assert 2 <= stopped < TOTAL_STEPS
    code, out = finish(launch(overrides(mnist_shards, tmp_path) + ["checkpoint.interval_steps=0"]))
    assert code == 0, out[-4000:]
    assert_bitwise_equal(final_state(tmp_path), uninterrupted)


def _rank_pids(launcher_pid: int) -> list[int]:
    """The worker processes torchrun started, in rank order (children in start order)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
        if len(children) == 2:
            return sorted(int(c) for c in children)
        time.sleep(0.1)
    raise TimeoutError("torchrun did not start 2 workers")
