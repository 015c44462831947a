"""The restart decision (mtdist.failures) and the watchdog (mtdist.watchdog), without a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, TINY, shard_overrides

from mtdist import failures
from mtdist.config import ConfigError
from mtdist.data import DataError
from mtdist.failures import FailureRecord, decide, settle, write_record
from mtdist.watchdog import HANG_EXIT_CODE


def record(rank: int, kind: str = "exception", step: int = 6, attempt: str = "7.0", at: float = 0.0):
    return FailureRecord(rank, 2, attempt, step, "train step", kind, f"error of rank {rank}", time=at)


def test_a_crash_is_requeued_and_names_the_rank_step_and_error():
    d = decide([record(1), record(0, "collective", at=1.0)], 2, [], max_failures=3)
    assert d.requeue and d.step == 6 and d.failures == 1
    assert d.cause.startswith(
        "rank 1 (exception at step 6, in train step): error of rank 1; rank 0 (collective"
    )
    assert d.action == "requeued (failure 1 of at most 3)"


def test_a_rank_that_left_no_record_is_named_first_when_its_peers_only_lost_it():
    d = decide([record(0, "collective")], 2, [], max_failures=3, exit_status=137)
    assert d.requeue
    assert d.cause.startswith("rank(s) 1 left no record")
    assert d.cause.endswith("; exit status 137")


def test_a_hang_is_the_cause_before_the_collectives_it_broke():
    d = decide([record(0, "collective", at=0.0), record(1, "hang", at=5.0)], 2, [], max_failures=3)
    assert d.requeue and d.cause.startswith("rank 1 (hang at step 6")


@pytest.mark.parametrize("exit_status", [None, failures.FATAL_EXIT_CODE, failures.CONFIG_ERROR_EXIT_CODE])
def test_config_errors_non_finite_losses_and_bad_data_are_never_requeued(exit_status):
    records = [record(0, "fatal")] if exit_status is None else []
    d = decide(records, 2, [], max_failures=3, exit_status=exit_status)
    assert not d.requeue and d.action.startswith("not requeued: a restart would fail the same way")


def test_the_same_step_failing_twice_stops_the_run():
    d = decide([record(1, step=6)], 2, [{"step": 6, "requeue": True}], max_failures=3)
    assert not d.requeue and "failed again at step 6" in d.action and "deterministic bug" in d.action
    assert decide([record(1, step=9)], 2, [{"step": 6, "requeue": True}], max_failures=3).requeue


def test_a_failure_without_any_record_is_requeued_without_a_step():
    d = decide([], 2, [{"step": 6, "requeue": True}], max_failures=3, exit_status=137)
    assert d.requeue and d.step == -1 and d.cause.startswith("rank(s) 0, 1 left no record")


def test_max_failures_bounds_the_requeues():
    previous = [{"step": s, "requeue": True} for s in (2, 4, 6)]
    d = decide([record(1, step=8)], 2, previous, max_failures=3)
    assert not d.requeue and d.failures == 4 and "cluster.max_failures=3" in d.action


def test_exceptions_are_classified():
    assert failures.classify(ConfigError("x")) == "fatal"
    assert failures.classify(FloatingPointError("non-finite loss at step 3")) == "fatal"
    assert failures.classify(DataError("reader 0 dropped too many")) == "fatal"
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2956")
    assert failures.classify(lost) == "collective"
    assert failures.classify(RuntimeError("CUDA out of memory")) == "exception"


def test_settle_decides_once_per_attempt_and_logs_the_decision(tmp_path):
    write_record(tmp_path, record(1))
    first, mine = settle(tmp_path, "7.0", world_size=2, max_failures=3, grace_s=0.0)
    again, mine_again = settle(tmp_path, "7.0", world_size=2, max_failures=3, grace_s=0.0)
    assert mine and not mine_again and first == again and first.requeue
    (logged,) = failures.decisions(tmp_path)
    assert logged["attempt"] == "7.0" and logged["cause"] == first.cause
    # the next attempt fails at the same step: stopped, and a resubmitted run counts afresh
    write_record(tmp_path, record(1, attempt="7.1"))
    stopped, _ = settle(tmp_path, "7.1", world_size=2, max_failures=3, grace_s=0.0)
    assert not stopped.requeue and failures.history(tmp_path) == []


def test_settle_waits_for_the_cause_not_for_the_victims(tmp_path):
    """A record that names a cause ends the wait at once; only lost-peer records wait for the grace."""
    write_record(tmp_path, record(0, "collective", attempt="1.0"))
    write_record(tmp_path, record(1, "exception", attempt="1.0"))
    decision, _ = settle(tmp_path, "1.0", world_size=3, max_failures=3, grace_s=60.0)
    assert decision.cause.startswith("rank 1 (exception")
    assert "rank(s) 2 left no record" in decision.cause


def test_test_faults_fire_on_their_rank_and_step_once(tmp_path):
    env = {failures.TEST_FAULT_ENV: "raise:1:6:once"}
    assert failures.test_fault(tmp_path, 0, 6, env) == ""
    assert failures.test_fault(tmp_path, 1, 5, env) == ""
    assert failures.test_fault(tmp_path, 1, 6, env) == "raise"
    assert failures.test_fault(tmp_path, 1, 6, env) == ""  # fired already in this run folder
    always = {failures.TEST_FAULT_ENV: "hang:0:2"}
    assert [failures.test_fault(tmp_path, 0, 2, always) for _ in range(2)] == ["hang", "hang"]
    every = {failures.TEST_FAULT_ENV: "await_signal:*:4:once"}  # every rank, once each
    assert [failures.test_fault(tmp_path, r, 4, every) for r in (0, 1, 0)] == ["await_signal"] * 2 + [""]


def test_watchdog_dumps_every_thread_and_exits_with_its_status(tmp_path: Path):
    """A main thread stuck in a named frame: the stack file names it, the hook ran, the status is 124."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mtdist.watchdog import Watchdog

        def stuck_in_a_named_frame():
            while True:
                time.sleep(0.1)

        hook = lambda w: Path({str(tmp_path / "hook")!r}).write_text(f"{{w.step}} {{w.what}}")
        dog = Watchdog(0.5, Path({str(tmp_path)!r}), rank=3, on_hang=hook).start()
        dog.beat("evaluation batches", 41)
        stuck_in_a_named_frame()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == HANG_EXIT_CODE, proc.stderr
    stacks = (tmp_path / "hang-rank00003.txt").read_text()
    assert stacks.startswith("mtdist watchdog: rank 3 made no progress for 1 s (dist.hang_timeout_s=0.5)")
    assert "at step 41, in evaluation batches" in stacks
    assert "in stuck_in_a_named_frame" in stacks and "mtdist-watchdog" not in stacks.splitlines()[0]
    assert "in stuck_in_a_named_frame" in proc.stderr  # also in the log
    assert (tmp_path / "hook").read_text() == "41 evaluation batches"


def test_a_beating_watchdog_never_fires(tmp_path: Path):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mtdist.watchdog import Watchdog

        dog = Watchdog(0.5, Path({str(tmp_path)!r}), rank=0).start()
        for i in dog.beating(range(20), "steps"):
            time.sleep(0.1)  # 2 s in all, never 0.5 s without a beat
        dog.stop()
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert not list(tmp_path.glob("hang-rank*"))


def test_a_non_finite_loss_exits_65_and_mtdist_recover_refuses_a_restart(mnist_shards, tmp_path):
    """A run whose loss blows up (lr 1e30) ends with one line naming the step and exit 65, its record is
    fatal, and `mtdist recover` (what slurm/train.sbatch asks) says not to requeue it."""
    run_dir = tmp_path / "run"
    args = [*shard_overrides(mnist_shards), f"logging.run_dir={run_dir}", "optim.lr=1e30"]
    args += ["schedule.warmup_start_lr=1e30", "deepspeed.bf16=false", "schedule.max_steps=20"]
    train = [sys.executable, "-m", "mtdist", "train", "--config", str(TINY), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", failures.ATTEMPT_ENV: "5.0"}
    proc = subprocess.run(train, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == failures.FATAL_EXIT_CODE, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mtdist: FloatingPointError: non-finite loss at step "), last
    (rec,) = failures.read_records(run_dir, "5.0")
    assert rec.kind == "fatal" and rec.error.startswith("FloatingPointError: non-finite loss at step")
    recover = [sys.executable, "-m", "mtdist", "recover", "--config", str(TINY), *args]
    recover += ["--world-size", "1", "--exit-status", str(proc.returncode)]
    said = subprocess.run(recover, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert said.returncode == 1, said.stderr
    assert said.stdout.startswith("mtdist: run failed: rank 0 (fatal at step ")
    assert "not requeued: a restart would fail the same way" in said.stdout


def test_the_watchdog_must_speak_before_the_process_groups_timeout():
    from mtdist.config import load_config

    message = r"dist.collective_timeout_s: 600 must be > dist.hang_timeout_s \(900\)"
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, ["dist.hang_timeout_s=900", "dist.collective_timeout_s=600"])
    assert load_config(TINY, ["dist.hang_timeout_s=0"]).dist.collective_timeout_s == 900  # watchdog off


def test_a_claim_its_creator_never_wrote_is_taken_over(tmp_path):
    """A decider killed between creating decision.json and writing it leaves it empty: the next caller
    decides, writes it and acts (mine), instead of failing on the empty file."""
    claim = failures.attempt_dir(tmp_path, "7.0") / "decision.json"
    claim.parent.mkdir(parents=True)
    claim.touch()
    decision, mine = failures.settle(tmp_path, "7.0", 1, 3, grace_s=0.0, exit_status=137)
    assert mine and decision.requeue and json.loads(claim.read_text())["requeue"]
    assert failures.settle(tmp_path, "7.0", 1, 3, grace_s=0.0) == (decision, False)
