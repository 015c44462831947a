"""Checkpoints: atomic saves, bitwise-exact resume after SIGKILL (also in the middle of a save), stop signals
-> checkpoint + requeue status (also sent to loader workers), the best checkpoint kept.

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
from checkpoint_state import assert_bitwise_equal
from checkpoint_state import final_state as _final_state
from conftest import ROOT, TINY, shard_overrides, torchrun_command
from torch.utils.data import DataLoader, IterableDataset

from mtdist import checkpoint
from mtdist.data import loader
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
        "checkpoint.keep_best=true",  # evaluations at steps 6 and 12
    ]


def launch(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [
        *torchrun_command(2),
        "-m",
        "mtdist",
        "train",
        "--config",
        str(TINY),
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}),
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
    return _final_state(run_dir, TOTAL_STEPS, world_size=2)


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


@pytest.mark.parametrize(
    "sig, whole_groups", [(signal.SIGUSR1, False), (signal.SIGTERM, True)], ids=["SIGUSR1", "SIGTERM"]
)
def test_stop_signal_checkpoints_and_exits_for_requeue(
    mnist_shards, tmp_path, uninterrupted, sig, whole_groups
):
    """SIGUSR1 to rank 0 alone (Slurm may signal some tasks only: the ranks agree through an all-reduce),
    or SIGTERM to each rank's whole process group, as Slurm and `kill -- -PGID` send it: the loader
    workers get it too and must not die of it. Either way every rank finishes its step, checkpoints and
    exits 75, and the resumed run ends bitwise equal to the uninterrupted one."""
    proc = launch(overrides(mnist_shards, tmp_path) + ["checkpoint.interval_steps=0"])
    wait_for_step(tmp_path, 2, proc)
    ranks = _rank_pids(proc.pid)
    sent = time.monotonic()
    for pid in ranks if whole_groups else ranks[:1]:
        if whole_groups:
            workers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            assert len(workers) == 2 and os.getpgid(pid) == pid  # a worker per stream; a group per rank
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    code, out = finish(proc, timeout=120)
    assert time.monotonic() - sent < 60
    assert f"exit {REQUEUE_EXIT_CODE} = requeue me" in out and code != 0
    # torchrun reports the first rank's status, then stops the others (as srun would not: --wait=60)
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in out, out[-4000:]
    assert "killed by signal" not in out and "exited unexpectedly" not in out  # no loader worker died
    stopped = checkpoint.read_meta(checkpoint.latest(tmp_path / "checkpoints"))["train_state"]["step"]
    assert 2 <= stopped < TOTAL_STEPS
    code, out = finish(launch(overrides(mnist_shards, tmp_path) + ["checkpoint.interval_steps=0"]))
    assert code == 0, out[-4000:]
    assert_bitwise_equal(final_state(tmp_path), uninterrupted)


def test_kill_during_a_save_leaves_the_previous_checkpoint(mnist_shards, tmp_path, uninterrupted):
    """Both ranks SIGKILLed inside the save of step 6, their files written into .tmp-step-00000006 and
    nothing renamed (the test hook blocks there): `latest` still names step 3, which loads; the next run
    resumes from it, replaces the half-written folder and ends bitwise equal to the uninterrupted run."""
    proc = launch(overrides(mnist_shards, tmp_path), env={checkpoint.HANG_IN_SAVE_ENV: "6"})
    ranks = _rank_pids(proc.pid)
    root = tmp_path / "checkpoints"
    partial = root / f".tmp-{checkpoint.tag_for(6)}"
    markers = [partial / f"hanging-rank{r:05d}" for r in range(2)]
    deadline = time.monotonic() + 300
    while not all(m.is_file() for m in markers):
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)[1][-4000:]
        time.sleep(0.05)
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the save was under way: every rank's files and DeepSpeed's were written, but never made visible
    assert {"rank00000.pt", "rank00001.pt", "mp_rank_00_model_states.pt"} <= {
        p.name for p in partial.iterdir()
    }
    assert not (partial / "meta.json").exists() and not (root / checkpoint.tag_for(6)).exists()
    previous = checkpoint.latest(root)
    assert previous == root / checkpoint.tag_for(3)
    assert checkpoint.read_meta(previous)["train_state"]["step"] == 3
    for r in range(2):
        assert checkpoint.load_rank_state(previous, r)["teacher"]["module"]  # weights_only load works

    code, out = finish(launch(overrides(mnist_shards, tmp_path)))
    assert code == 0, out[-4000:]
    assert f"resumed from {previous}" in out
    assert not list(root.glob(".tmp-*"))  # the half-written folder was replaced by the complete save
    assert (root / checkpoint.tag_for(6) / "meta.json").is_file()
    assert_bitwise_equal(final_state(tmp_path), uninterrupted)


class _SignalsItself(IterableDataset):
    """Each item: the worker sends itself one stop signal, then yields its number if still alive."""

    def __iter__(self):
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), sig)
            yield sig.value


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_loader_workers_ignore_stop_signals_under_every_start_method(start_method):
    """The train and eval loaders' worker_init_fn: without it a worker dies of the first signal (the
    defaults terminate, and torch's worker SIGTERM handler kills itself unless the parent sent it)."""
    batches = DataLoader(
        _SignalsItself(),
        batch_size=None,
        num_workers=1,
        multiprocessing_context=start_method,
        worker_init_fn=loader._seed_worker_globals,
    )
    got = [int(b) for b in batches]
    assert got == [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT]


def test_keep_best_names_the_checkpoint_of_the_best_teacher_evaluation(uninterrupted_dir):
    """checkpoint.keep_best: `best` names the step of the highest teacher top-1 (the first on a tie)."""
    evals = [
        (r["eval/teacher/top1"], -r["step"])
        for r in read_metrics(uninterrupted_dir)
        if "eval/teacher/top1" in r
    ]
    assert [-s for _, s in evals] == [6, 12]
    top1, step = max(evals)
    best = checkpoint.best(uninterrupted_dir / "checkpoints")
    assert best == uninterrupted_dir / "checkpoints" / checkpoint.tag_for(-step)
    state = checkpoint.read_meta(best)["train_state"]
    assert (state["best_step"], state["best_top1"]) == (-step, top1)


def _rank_pids(launcher_pid: int) -> list[int]:
    """The worker processes torchrun started, in rank order (children in start order)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
        if len(children) == 2:
            return sorted(int(c) for c in children)
        time.sleep(0.1)
    raise TimeoutError("torchrun did not start 2 workers")
