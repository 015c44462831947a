"""A run never hangs: no fork of a threaded process, a watchdog on every rank, no start-up lock to wait on.

Each multi-process test runs `mtdist train` under torchrun with a short dist.hang_timeout_s: a rank that
deadlocks ends with its stacks on stderr (and in the run folder) and the test fails showing them, instead
of hanging.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import forkserver
from pathlib import Path

import pytest
from conftest import ROOT, TINY, shard_overrides, torchrun_command

from mtdist import data as mtdata
from mtdist.failures import TEST_FAULT_ENV, read_records
from mtdist.logger import read_metrics
from mtdist.watchdog import HANG_EXIT_CODE, Watchdog

pytestmark = pytest.mark.slow
EVALUATIONS = 100


def torchrun_train(
    overrides: list[str], env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    cmd = [*torchrun_command(2), "-m", "mtdist", "train", "--config", str(TINY), *overrides]
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def overrides_for(shards: dict[str, str], run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        *shard_overrides(shards),
        f"logging.run_dir={run_dir}",
        f"schedule.max_steps={max_steps}",
        "dist.hang_timeout_s=60",
        *extra,
    ]


def test_two_ranks_two_workers_evaluate_a_hundred_times(mnist_shards, tmp_path):
    """The set-up that hung in 5 of 21 runs: 2 ranks x 2 loader workers, an evaluation after every step,
    the progress bar's monitor thread on. Loader workers come from a fork server (never forked from a
    rank, which has threads), and each split's eval loader is built once and reused."""
    run_dir = tmp_path / "run"
    overrides = overrides_for(
        mnist_shards,
        run_dir,
        EVALUATIONS,
        "data.num_workers=2",
        "logging.eval_interval_steps=1",
        "logging.log_interval_steps=10",
        "logging.progress_bar=true",
        "checkpoint.interval_steps=50",
        "schedule.epochs=4",  # 30 steps an epoch
        "schedule.rampdown_epochs=5",
    )
    proc = torchrun_train(overrides, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    evals = [r["step"] for r in read_metrics(run_dir) if "eval/teacher/top1" in r]
    assert evals == list(range(1, EVALUATIONS + 1))
    assert all(r["eval/count"] == 120 for r in read_metrics(run_dir) if "eval/count" in r)  # exactly once
    assert not list(run_dir.glob("hang-rank*.txt"))


def test_a_rank_without_progress_dumps_its_stacks_and_exits(mnist_shards, tmp_path):
    """Rank 1 stops making progress at step 3 (a test hook): its watchdog writes every thread's stack,
    naming the stuck frame, records the hang, and ends the rank with HANG_EXIT_CODE; rank 0, left in the
    step's all_reduce, ends too and names the same step, instead of waiting for ever."""
    run_dir = tmp_path / "run"
    overrides = overrides_for(mnist_shards, run_dir, 6, "dist.hang_timeout_s=5")
    proc = torchrun_train(overrides, env={TEST_FAULT_ENV: "hang:1:3"}, timeout=300)
    assert proc.returncode != 0
    stacks = (run_dir / "hang-rank00001.txt").read_text()
    assert stacks.startswith("mtdist watchdog: rank 1 made no progress for ")
    assert "at step 3, in train step" in stacks.splitlines()[0]
    assert "in _hang_for_the_test" in stacks and "in train_loop" in stacks
    assert f"exitcode  : {HANG_EXIT_CODE}" in proc.stderr  # torchrun's report of rank 1
    records = {r.rank: r for r in read_records(run_dir, "0")}
    assert records[1].kind == "hang" and records[1].step == 3
    assert records[1].error.startswith(f"no progress for 5 s, exit {HANG_EXIT_CODE}; stacks in ")
    # rank 0 waits for rank 1 in the step's all_reduce: its own watchdog fires too (or the collective
    # fails once rank 1 is gone), and it names the same step
    assert records[0].step == 3 and records[0].kind in ("hang", "collective", "exception")


def test_an_exception_on_one_rank_is_recorded_with_its_step(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = torchrun_train(overrides_for(mnist_shards, run_dir, 6), env={TEST_FAULT_ENV: "raise:1:2"})
    assert proc.returncode != 0
    records = {r.rank: r for r in read_records(run_dir, "0")}
    assert records[1].kind == "exception" and records[1].step == 2
    assert records[1].error == "RuntimeError: test fault: rank 1 raises at step 2"
    assert "mtdist: rank 1 failed at step 2, in train step" in proc.stderr


def test_a_stale_extension_build_lock_does_not_stop_the_next_start(mnist_shards, tmp_path):
    """A start-up killed while DeepSpeed built (or checked) its CPU comm op leaves torch's lock file; any
    later start waited for it for ever. mtdist builds no extension at start-up: the next run trains."""
    extensions = tmp_path / "torch_extensions"
    py = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    lock = extensions / py / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    # the owner: a process that created the lock, as torch's FileBaton does, and died holding it
    subprocess.run([sys.executable, "-c", f"import os; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)"])
    assert lock.is_file()
    run_dir = tmp_path / "run"
    env = {"TORCH_EXTENSIONS_DIR": str(extensions)}
    proc = torchrun_train(overrides_for(mnist_shards, run_dir, 2, "dist.hang_timeout_s=120"), env, 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert json.loads((run_dir / "final.json").read_text())["step"] == 2
    assert lock.is_file()  # left alone: not ours to remove, and no longer in anyone's way


def test_stop_signals_to_the_fork_server_leave_the_loader_workers_running(mnist_shards):
    """Slurm signals every process of a task: the fork server must survive SIGUSR1/SIGUSR2/SIGTERM, or the
    persistent workers it forked exit with it and the next batches fail before the signal's checkpoint."""
    labeled, unlabeled = (mtdata.resolve_shards(mnist_shards[k]) for k in ("labeled", "unlabeled"))
    batches = mtdata.build_train_loader(
        labeled, unlabeled, labeled_per_gpu=4, unlabeled_per_gpu=4, rank=0, world_size=1, seed=0,
        transform=mtdata.DigitsAugment(0, 0.0, mean=0.0, std=1.0), channels=1, num_workers=2,
    )  # fmt: skip
    with contextlib.closing(batches):
        next(batches)
        server = forkserver._forkserver._forkserver_pid
        assert server is not None
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            os.kill(server, sig)
        time.sleep(1.0)
        os.kill(server, 0)  # still alive (ProcessLookupError otherwise)
        assert len(list(itertools.islice(batches, 60))) == 60  # far past the workers' prefetch


def test_a_rank_waiting_in_a_collective_is_told_from_one_stuck_elsewhere(tmp_path: Path) -> None:
    """The watchdog's in_collective: a thread blocked under a torch.distributed (or DeepSpeed comm) frame
    is a peer waiting for the stuck rank, recorded as a lost peer so that the stuck rank's hang is the cause
    (whichever watchdog fires first)."""
    namespace: dict = {}
    fake = "/venv/site-packages/torch/distributed/distributed_c10d.py"  # where a real all_reduce blocks
    exec(compile("def all_reduce(event):\n    event.wait()\n", fake, "exec"), namespace)
    for blocker, expected in ((namespace["all_reduce"], True), (threading.Event.wait, False)):
        event, seen = threading.Event(), []

        def loop(block=blocker, event=event, seen=seen) -> None:
            dog = Watchdog(30, tmp_path, rank=0).start()  # watches this thread (stopped long before 30 s)
            seen.append(dog)
            block(event)

        thread = threading.Thread(target=loop)
        thread.start()
        while not seen or thread.ident not in sys._current_frames():
            time.sleep(0.01)
        time.sleep(0.05)  # inside the blocking call
        try:
            assert seen[0].in_collective() is expected
        finally:
            seen[0].stop()
            event.set()
            thread.join()


_LOADER_THEN_WAIT = """
import os, sys, time
import torch
from mtdist.data.loader import _loader

if __name__ == "__main__":
    batches = iter(_loader([torch.zeros(2)] * 64, 4, num_workers=2, pin_memory=False, seed=0))
    next(batches)
    print(os.getpid(), flush=True)
    time.sleep(300)
"""


def test_a_rank_killed_outright_takes_its_fork_server_and_loader_workers_with_it(tmp_path: Path) -> None:
    """Every child of a fork server holds its "alive" pipe open, so the server of a SIGKILLed rank never
    saw it go, and its workers (whose watchdog checks the server) stayed forever (preempt.die_with_parent)."""
    script = tmp_path / "loader_then_wait.py"
    script.write_text(_LOADER_THEN_WAIT)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        family = _descendants(pid)
        assert len(family) >= 3, family  # the fork server (and its resource tracker) and the 2 workers
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while (alive := [p for p in family if Path(f"/proc/{p}").exists() and not _zombie(p)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert not alive, [Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:80] for p in alive]
    finally:
        proc.kill()


def _descendants(pid: int) -> list[int]:
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return children + [d for c in children for d in _descendants(c)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
