"""Real Slurm (2 nodes on localhost), real submitit, real DeepSpeed over gloo: the tiny config trains.

The cluster comes from tests/slurm_fixtures.py (started once per session). Every job writes into a
fresh folder under tmp_path. The teacher-identical-on-every-rank check is mtdist's own: every
evaluation hashes the teacher on all ranks and raises on a mismatch, so a completed job with
evaluations every 2 steps passed it. One uninterrupted 2-node job (the module fixture) is the
reference that the interrupted jobs (a preemption signal, a time limit, the sbatch script) must
end equal to, bitwise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from checkpoint_state import assert_bitwise_equal, final_state
from conftest import ROOT, TINY, shard_overrides

from mtdist.checkpoint import tag_for as checkpoint_tag
from mtdist.failures import TEST_FAULT_ENV, decisions
from mtdist.launch.job import requeue_signal
from mtdist.logger import read_metrics
from mtdist.train import TEST_KEYS_ENV

if TYPE_CHECKING:
    from slurm_fixtures import SlurmCluster

pytest_plugins = ["slurm_fixtures"]  # the session fixture slurm_cluster
pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 600  # the first DeepSpeed start on a fresh machine JIT-compiles an op (about 2 min)
SIGNAL_STEPS = 12  # signalled after step 2; the tiny steps take ~30 ms when the machine is idle, so
# every rank holds step 4 until the signal has arrived (AWAIT_SIGNAL) and the run stops after step 5
AWAIT_SIGNAL = {TEST_FAULT_ENV: "await_signal:*:4:once"}


def train_overrides(shards: dict[str, str], run_dir: Path, max_steps: int = 4) -> list[str]:
    return [
        *shard_overrides(shards),
        f"logging.run_dir={run_dir}",
        f"schedule.max_steps={max_steps}",
        "data.num_workers=0",
        "logging.eval_interval_steps=2",
    ]


def cluster_overrides(tasks_per_node: int, **extra: object) -> list[str]:
    """CPU-only nodes: no GPUs asked for, tasks given explicitly, one CPU each."""
    keys = {"nodes": 2, "gpus_per_node": 0, "tasks_per_node": tasks_per_node, "cpus_per_task": 1} | extra
    return [f"cluster.{k}={v}" for k, v in keys.items()]


def launch(
    args: list[str], cluster: SlurmCluster, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mtdist", "submit", "--config", str(TINY), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=cluster.env | (env or {}), timeout=JOB_TIMEOUT_S
    )


def step_keys(folder: Path) -> dict[int, list[str]]:
    """Every rank's train keys (MTDIST_TEST_KEYS_DIR), merged per step and sorted: the global batch."""
    steps: dict[int, list[str]] = {}
    for path in folder.glob("keys-rank*.jsonl"):
        for row in map(json.loads, path.read_text().splitlines()):
            steps.setdefault(row["step"], []).extend(row["keys"])
    return {step: sorted(keys) for step, keys in steps.items()}


def check_trained(run_dir: Path, world_size: int, max_steps: int = 4, redone: tuple[int, ...] = ()) -> None:
    """Every step logged once (a restart from scratch would log the first steps again), except the steps
    `redone` after a failure (those since the last checkpoint), logged again with the same values."""
    rows = [_without_timings(r) for r in read_metrics(run_dir)]
    train = [r for r in rows if "train/loss_total" in r]
    expected = sorted([*range(2, max_steps + 1, 2), *redone])
    assert [r["step"] for r in train] == expected
    assert {r["system/world_size"] for r in train} == {world_size}
    evals = [r for r in rows if "eval/teacher/top1" in r]  # the teacher's rank-sync is checked at each
    assert [r["step"] for r in evals] == expected
    for step in redone:  # exact resume: the redone steps repeat their losses and scores bitwise
        assert len({json.dumps(r, sort_keys=True) for r in train + evals if r["step"] == step}) == 2
    final = json.loads((run_dir / "final.json").read_text())
    assert final["step"] == max_steps and final["val/count"] == 120  # every val image once across ranks


def _without_timings(row: dict) -> dict:
    timings = ("time", "data/images_per_s", "system/step_time_s", "system/rss_gb")
    return {k: v for k, v in row.items() if k not in timings and not k.startswith("data/wait")}


def job_id_of(stdout: str) -> str:
    match = re.search(r"^submitted job (\d+): \d node\(s\)", stdout, re.M)
    assert match, stdout
    return match.group(1)


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, mnist_shards, tmp_path_factory) -> Path:
    """An uninterrupted job of SIGNAL_STEPS steps on 2 nodes x 1 task: the 1-task launch test checks
    it, and every interrupted job of the same shape must end with its weights."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    args = [*train_overrides(mnist_shards, run_dir, max_steps=SIGNAL_STEPS), *cluster_overrides(1)]
    check_launched(launch([*args, "--wait"], slurm_cluster), args, run_dir, 1, slurm_cluster)
    check_trained(run_dir, world_size=2, max_steps=SIGNAL_STEPS)
    return run_dir


def test_launch_trains_on_two_nodes_one_task_each(uninterrupted):
    assert final_state(uninterrupted, SIGNAL_STEPS, world_size=2)  # checked by the fixture


def test_launch_trains_on_two_nodes_two_tasks_each(slurm_cluster, mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [*train_overrides(mnist_shards, run_dir), *cluster_overrides(2)]
    check_launched(launch([*args, "--wait"], slurm_cluster), args, run_dir, 2, slurm_cluster)
    check_trained(run_dir, world_size=4)


def check_launched(
    proc: subprocess.CompletedProcess,
    args: list[str],
    run_dir: Path,
    tasks_per_node: int,
    cluster: SlurmCluster,
) -> None:
    """What mtdist submit --wait prints, where the job ran, and that --dry-run shows what was submitted."""
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    job_id = job_id_of(proc.stdout)
    assert f"stdout: {run_dir / 'slurm' / job_id}_0_log.out" in proc.stdout
    assert f"stderr: {run_dir / 'slurm' / job_id}_0_log.err" in proc.stdout
    assert f"run folder: {run_dir}" in proc.stdout
    assert f"job {job_id} completed: {2 * tasks_per_node} task(s)" in proc.stdout
    sacct = ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "NodeList"]
    assert subprocess.run(sacct, capture_output=True, text=True).stdout.split() == ["node[1-2]"]
    dry = launch([*args, "--dry-run"], cluster)
    assert dry.stdout == (run_dir / "slurm" / f"{job_id}_submission.sh").read_text() + "\n"


def test_sbatch_script_trains_and_requeues_itself_after_a_signal(
    slurm_cluster, mnist_shards, tmp_path, uninterrupted
):
    """slurm/train.sbatch on 2 nodes; Slurm's pre-time-limit SIGUSR1 mid-run: the tasks checkpoint and
    exit 75, the script requeues the job, the restarted job resumes and completes, with the weights of
    the uninterrupted job."""
    run_dir = tmp_path / "run"
    cmd = [
        "sbatch",
        "--parsable",
        *("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"),
        "--gpus-per-node=0",  # the script's #SBATCH lines are for 8-GPU nodes; the command line wins
        f"--output={tmp_path}/%j.out",
        "slurm/train.sbatch",
        str(TINY),
        *train_overrides(mnist_shards, run_dir, max_steps=SIGNAL_STEPS),
    ]
    env = slurm_cluster.env | AWAIT_SIGNAL
    submitted = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    interrupt_when_training(slurm_cluster, run_dir, job_id, "SIGUSR1", tmp_path / f"{job_id}.out")
    state = slurm_cluster.wait(job_id, JOB_TIMEOUT_S)
    log = (tmp_path / f"{job_id}.out").read_text()
    assert state == "COMPLETED", log[-5000:]
    assert slurm_cluster.states(job_id) == ["REQUEUED", "COMPLETED"]
    assert f"mtdist: job {job_id} (restart 0) on node[1-2], 2 tasks, master node1:" in log
    assert f"mtdist: checkpointed after a signal; requeueing job {job_id}" in log
    assert f"mtdist: job {job_id} (restart 1) on node[1-2]" in log and "resumed from " in log
    check_trained(run_dir, world_size=2, max_steps=SIGNAL_STEPS)
    assert_bitwise_equal(final_state(run_dir, SIGNAL_STEPS, 2), final_state(uninterrupted, SIGNAL_STEPS, 2))


def test_submitit_signal_checkpoints_requeues_and_resumes(
    slurm_cluster, mnist_shards, tmp_path, uninterrupted
):
    """Slurm's signal before a preemption or the time limit (submitit's USR2, what job._interrupt() sends)
    mid-run: every rank checkpoints at the step boundary, submitit calls TrainJob.checkpoint() and
    requeues, and the restarted job (resume=auto, although submitted with never) continues from the
    checkpoint and ends with the uninterrupted job's student, optimizer and teacher, bitwise."""
    run_dir = tmp_path / "run"
    overrides = [*train_overrides(mnist_shards, run_dir, max_steps=SIGNAL_STEPS), "checkpoint.resume=never"]
    proc = launch([*overrides, *cluster_overrides(1)], slurm_cluster, AWAIT_SIGNAL)
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_of(proc.stdout)
    rank0_log = run_dir / "slurm" / f"{job_id}_0_log.err"
    interrupt_when_training(slurm_cluster, run_dir, job_id, requeue_signal().name, rank0_log)
    assert slurm_cluster.wait(job_id, JOB_TIMEOUT_S) == "COMPLETED", rank0_log.read_text()[-5000:]
    assert slurm_cluster.states(job_id) == ["REQUEUED", "COMPLETED"]
    assert _submitted(run_dir, job_id).function.cfg.checkpoint.resume == "auto"
    assert "resumed from " in rank0_log.read_text()
    check_trained(run_dir, world_size=2, max_steps=SIGNAL_STEPS)
    assert_bitwise_equal(final_state(run_dir, SIGNAL_STEPS, 2), final_state(uninterrupted, SIGNAL_STEPS, 2))


def test_time_limit_requeues_the_job_and_it_completes(slurm_cluster, mnist_shards, tmp_path, uninterrupted):
    """A 1-minute job that cannot finish in time: Slurm itself sends USR2 cluster.signal_delay_s before
    the limit (slurmctld looks every 30 s, so 20-50 s after the start), every rank checkpoints, submitit
    requeues the job as timed out, and the requeued job resumes and completes with the uninterrupted
    job's weights. The test sends no signal: it only holds the training processes stopped (SIGSTOP)
    until Slurm's signal is pending, as if the steps were that slow, so no machine is fast enough to
    finish in the first allocation."""
    run_dir = tmp_path / "run"
    overrides = [
        *train_overrides(mnist_shards, run_dir, max_steps=SIGNAL_STEPS),
        *cluster_overrides(1, time_minutes=1, signal_delay_s=10),
    ]
    proc = launch(overrides, slurm_cluster)
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_of(proc.stdout)
    rank0_log = run_dir / "slurm" / f"{job_id}_0_log.err"
    assert "#SBATCH --signal=USR2@10" in (run_dir / "slurm" / f"{job_id}_submission.sh").read_text()
    wait_until_training(slurm_cluster, run_dir, job_id, rank0_log)
    hold_until_signalled(task_pids(run_dir / "slurm"), signal.SIGUSR2)
    assert slurm_cluster.wait(job_id, JOB_TIMEOUT_S) == "COMPLETED", rank0_log.read_text()[-5000:]
    states = slurm_cluster.states(job_id)  # one requeue; a second only if Slurm signalled before training
    assert states[-1] == "COMPLETED" and set(states[:-1]) == {"REQUEUED"}, states
    log = rank0_log.read_text()
    assert re.search(r"Caught signal SIGUSR2 on \S+: this job is timed-out\.", log), log[-5000:]
    assert "resumed from " in log
    check_trained(run_dir, world_size=2, max_steps=SIGNAL_STEPS)
    assert_bitwise_equal(final_state(run_dir, SIGNAL_STEPS, 2), final_state(uninterrupted, SIGNAL_STEPS, 2))


def task_pids(log_folder: Path) -> list[int]:
    """The job's task processes on this machine: python -u -m submitit.core._submit LOG_FOLDER."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode().split("\0")[:-1]
        except OSError:  # the process ended meanwhile
            continue
        task = (
            len(argv) > 3 and Path(argv[0]).name.startswith("python") and argv[-2] == "submitit.core._submit"
        )
        if task and Path(argv[-1]).resolve() == log_folder.resolve():
            pids.append(int(cmdline.parent.name))
    assert pids, f"no task of {log_folder} running"
    return pids


def hold_until_signalled(pids: list[int], sig: signal.Signals, timeout_s: float = 120) -> None:
    """SIGSTOP the processes, wait until `sig` is pending for each (or it ended), SIGCONT them."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout_s
        while not all(_pending(pid, sig) for pid in pids):
            assert time.monotonic() < deadline, f"no {sig.name} from Slurm within {timeout_s}s"
            time.sleep(0.2)
    finally:
        for pid in pids:
            _signal_if_alive(pid, signal.SIGCONT)


def _pending(pid: int, sig: signal.Signals) -> bool:
    """True if `sig` waits for delivery to the process (or the process is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    masks = [
        int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("ShdPnd", "SigPnd"))
    ]
    return any(mask >> (sig.value - 1) & 1 for mask in masks)


def _signal_if_alive(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def interrupt_when_training(
    cluster: SlurmCluster, run_dir: Path, job_id: str, sig_name: str, log: Path
) -> None:
    """Signal every task (as Slurm does before the time limit) once the first metrics row exists:
    the loop runs, with most of its steps to go."""
    wait_until_training(cluster, run_dir, job_id, log)
    subprocess.run(["scancel", f"--signal={sig_name}", job_id], check=True)


def wait_until_training(cluster: SlurmCluster, run_dir: Path, job_id: str, log: Path) -> None:
    """Until the first metrics row exists (step 2 done)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (run_dir / "metrics.jsonl").is_file() or not read_metrics(run_dir):
        tail = log.read_text()[-5000:] if log.is_file() else "no log"
        assert cluster.running(job_id) and time.monotonic() < deadline, tail
        time.sleep(0.2)


def _submitted(run_dir: Path, job_id: str) -> Any:
    from submitit.core.utils import DelayedSubmission

    return DelayedSubmission.load(run_dir / "slurm" / f"{job_id}_submitted.pkl")


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (["cluster.partition=nope"], "invalid partition specified: nope"),
        (["cluster.mem_gb=100000"], "not available; memory 100000GB per node > "),
        (["cluster.cpus_per_task=64"], "not available; 64 CPUs per node (tasks x cpus_per_task) > 4"),
        (["cluster.nodes=3"], "not available; nodes 3 > 2 in partition debug"),
        (["cluster.gpus_per_node=1", "cluster.tasks_per_node=0"], "Invalid generic resource (gres)"),
    ],
    ids=["partition", "memory", "cpus", "nodes", "gpus"],
)
def test_impossible_request_is_refused_with_slurms_reason(
    slurm_cluster, mnist_shards, tmp_path, overrides, reason
):
    args = [*train_overrides(mnist_shards, tmp_path / "run"), *cluster_overrides(1), *overrides]
    proc = launch(args, slurm_cluster)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtdist submit: Slurm refused the job: "), proc.stderr
    assert reason in lines[0] and "partitions: debug*: 2 nodes, 4 CPUs" in lines[0]
    assert not list((tmp_path / "run").glob("slurm/*_submission.sh"))  # refused before submission


# ---------------------------------------------------------------- failures: requeued by the job itself

FAULT_STEP = 6  # after the checkpoint of step 4 (checkpoint.interval_steps=4), before the one of step 8
# name: (launcher, MTDIST_TEST_FAULT); "once" faults fire in the first run of the job only
FAULTS = {
    "kill": ("submit", f"kill:1:{FAULT_STEP}:once"),
    "raise": ("submit", f"raise:1:{FAULT_STEP}:once"),
    "hang": ("submit", f"hang:1:{FAULT_STEP}:once"),
    "repeat": ("submit", f"raise:1:{FAULT_STEP}"),
    "sbatch_kill": ("sbatch", f"kill:1:{FAULT_STEP}:once"),
    "single_kill": ("submit_one_task", f"kill:0:{FAULT_STEP}:once"),
}


@dataclass(frozen=True)
class FaultJob:
    job_id: str
    run_dir: Path
    log: Path  # rank 0's log (submitit) or the batch script's output (sbatch)


def fault_overrides(shards: dict[str, str], run_dir: Path, name: str) -> list[str]:
    # the hang job's watchdog fires after 30 s without progress; the others' must not fire at all,
    # however slow the loaded machine makes a start-up phase
    hang_s = 30 if name == "hang" else 300
    return [
        *train_overrides(shards, run_dir, max_steps=SIGNAL_STEPS),
        "checkpoint.interval_steps=4",
        f"dist.hang_timeout_s={hang_s}",
    ]


def submit_fault_job(name: str, folder: Path, shards: dict[str, str], cluster: SlurmCluster) -> FaultJob:
    launcher, fault = FAULTS[name]
    run_dir, env = folder / "run", cluster.env | {TEST_FAULT_ENV: fault}
    if launcher.startswith("submit"):
        nodes = 1 if launcher == "submit_one_task" else 2
        cmd = [sys.executable, "-m", "mtdist", "submit", "--config", str(TINY)]
        cmd += [*fault_overrides(shards, run_dir, name), *cluster_overrides(1, nodes=nodes)]
    else:
        cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"]
        cmd += ["--gpus-per-node=0", f"--output={folder}/%j.out", "slurm/train.sbatch", str(TINY)]
        cmd += fault_overrides(shards, run_dir, name)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    if launcher.startswith("submit"):
        job_id = job_id_of(proc.stdout)
        return FaultJob(job_id, run_dir, run_dir / "slurm" / f"{job_id}_0_log.err")
    job_id = proc.stdout.strip()
    return FaultJob(job_id, run_dir, folder / f"{job_id}.out")


@pytest.fixture(scope="module")
def fault_jobs(slurm_cluster, mnist_shards, tmp_path_factory) -> dict[str, FaultJob]:
    """Every failure job, submitted at once: they run side by side on the two nodes and their requeue
    delays overlap (one after the other they took 4-5 minutes); each test waits for its own."""
    return {
        name: submit_fault_job(name, tmp_path_factory.mktemp(name), mnist_shards, slurm_cluster)
        for name in FAULTS
    }


def check_recovered(job: FaultJob, cluster: SlurmCluster, uninterrupted: Path) -> dict:
    """The job requeued itself once after the failure, resumed from step 4 and ended with the weights of
    the uninterrupted job; returns the decision it logged."""
    state = cluster.wait(job.job_id, JOB_TIMEOUT_S)
    assert state == "COMPLETED", job.log.read_text()[-6000:] if job.log.is_file() else state
    assert cluster.states(job.job_id) == ["REQUEUED", "COMPLETED"]
    (decision,) = decisions(job.run_dir)
    assert decision["requeue"] and decision["step"] == FAULT_STEP, decision
    assert decision["attempt"] == f"{job.job_id}.0"
    assert "resumed from " in job.log.read_text() and checkpoint_tag(4) in job.log.read_text()
    check_trained(job.run_dir, world_size=2, max_steps=SIGNAL_STEPS, redone=(FAULT_STEP,))
    final = final_state(job.run_dir, SIGNAL_STEPS, 2)
    assert_bitwise_equal(final, final_state(uninterrupted, SIGNAL_STEPS, 2))
    report_recovery_times(job, decision)
    return decision


def report_recovery_times(job: FaultJob, decision: dict) -> None:
    """Printed for the record (pytest -s): the failure -> the job's end -> the resumed run's first step.
    The jobs run side by side here: one job alone is faster (README, "When things go wrong")."""
    failed_at = min(p.stat().st_mtime for p in (job.run_dir / "failures").glob("test-fault-*"))
    out = subprocess.run(
        ["sacct", "-n", "-X", "-D", "-P", "-j", job.job_id, "-o", "End"], capture_output=True, text=True
    ).stdout.split()
    ended = time.mktime(time.strptime(out[0], "%Y-%m-%dT%H:%M:%S"))
    resumed = min(r["time"] for r in read_metrics(job.run_dir) if r["time"] > decision["time"])
    print(
        f"\n[recovery] job {job.job_id}: failure -> decision {decision['time'] - failed_at:.1f} s, "
        f"-> job end {ended - failed_at:.0f} s (sacct, 1 s resolution), "
        f"-> first metrics row of the resumed run {resumed - failed_at:.1f} s"
    )


def test_submitit_job_requeues_itself_after_a_rank_is_killed(slurm_cluster, fault_jobs, uninterrupted):
    """SIGKILL of rank 1's training process between two checkpoints (an OOM kill): rank 0's next
    collective fails, rank 0 finds no record from rank 1, decides and requeues the job; the restarted
    job resumes from the checkpoint of step 4 and ends with the uninterrupted job's weights, bitwise."""
    decision = check_recovered(fault_jobs["kill"], slurm_cluster, uninterrupted)
    assert decision["cause"].startswith("rank(s) 1 left no record"), decision


def test_submitit_job_requeues_itself_after_an_exception_on_one_rank(
    slurm_cluster, fault_jobs, uninterrupted
):
    decision = check_recovered(fault_jobs["raise"], slurm_cluster, uninterrupted)
    assert decision["cause"].startswith(f"rank 1 (exception at step {FAULT_STEP}, in train step"), decision
    assert "RuntimeError: test fault: rank 1 raises at step 6" in decision["cause"]


def test_submitit_job_requeues_itself_after_a_rank_hangs(slurm_cluster, fault_jobs, uninterrupted):
    """Rank 1 stops making progress: its watchdog writes the stacks (naming the stuck frame), records the
    hang and the job is requeued; the restarted job ends with the uninterrupted job's weights."""
    job = fault_jobs["hang"]
    decision = check_recovered(job, slurm_cluster, uninterrupted)
    assert f"rank 1 (hang at step {FAULT_STEP}" in decision["cause"], decision
    stacks = (job.run_dir / "hang-rank00001.txt").read_text()
    assert "in _hang_for_the_test" in stacks and "in train_loop" in stacks


def test_a_one_task_submitit_job_requeues_itself_after_its_task_is_killed(slurm_cluster, fault_jobs):
    """The only task is SIGKILLed between two checkpoints: no peer sees it go, so the batch script's
    lines after srun (launch.job.after_srun) decide and requeue; the restarted job resumes from the
    checkpoint of step 4 and repeats steps 5-6 bitwise."""
    job = fault_jobs["single_kill"]
    state = slurm_cluster.wait(job.job_id, JOB_TIMEOUT_S)
    assert state == "COMPLETED", job.log.read_text()[-6000:] if job.log.is_file() else state
    assert slurm_cluster.states(job.job_id) == ["REQUEUED", "COMPLETED"]
    (decision,) = decisions(job.run_dir)
    assert decision["requeue"] and decision["step"] == -1, decision  # no rank was left to say which step
    assert decision["attempt"] == f"{job.job_id}.0"
    assert decision["cause"].startswith("rank(s) 0 left no record") and "exit status 137" in decision["cause"]
    out = (job.run_dir / "slurm" / f"{job.job_id}_0_log.out").read_text()
    assert f"mtdist: job {job.job_id} failed: {decision['cause']}; requeued (failure 1 of at most 3)" in out
    assert "resumed from " in job.log.read_text() and checkpoint_tag(4) in job.log.read_text()
    check_trained(job.run_dir, world_size=1, max_steps=SIGNAL_STEPS, redone=(FAULT_STEP,))


def test_a_failure_at_the_same_step_twice_ends_the_job(slurm_cluster, fault_jobs):
    """Rank 1 raises at step 6 in every run (a deterministic bug): requeued once, then the job ends with
    the decision's message instead of looping."""
    job = fault_jobs["repeat"]
    assert slurm_cluster.wait(job.job_id, JOB_TIMEOUT_S) == "FAILED", job.log.read_text()[-5000:]
    assert slurm_cluster.states(job.job_id) == ["REQUEUED", "FAILED"]
    first, second = decisions(job.run_dir)
    assert first["requeue"] and not second["requeue"]
    assert second["action"].startswith(f"not requeued: it failed again at step {FAULT_STEP}, as the previous")
    logs = "".join(p.read_text() for p in (job.run_dir / "slurm").glob(f"{job.job_id}_*_log.err"))
    assert f"job {job.job_id} failed: rank 1 (exception at step {FAULT_STEP}" in logs
    assert "a deterministic bug, not bad luck" in logs


def test_sbatch_script_requeues_the_job_after_a_rank_is_killed(slurm_cluster, fault_jobs, uninterrupted):
    """slurm/train.sbatch: rank 1 SIGKILLed between two checkpoints; srun ends the tasks, `mtdist
    recover` decides, the script requeues, and the restarted job ends with the uninterrupted weights."""
    job = fault_jobs["sbatch_kill"]
    decision = check_recovered(job, slurm_cluster, uninterrupted)
    assert "rank(s) 1 left no record" in decision["cause"], decision
    text = job.log.read_text()
    assert f"mtdist: run failed: {decision['cause']}; requeued (failure 1 of at most 3)" in text
    assert f"mtdist: requeueing job {job.job_id} after a failure" in text


def test_a_two_task_per_node_checkpoint_resumes_as_one_task_per_node(slurm_cluster, mnist_shards, tmp_path):
    """data.order=global (issue 13): a job checkpointed as 2 nodes x 2 tasks (world 4) at step 2 resumes as
    2 nodes x 1 task (world 2) and completes; rank 0 logs the move, the steps after it are logged once each
    at world size 2, and the final evaluation still sees every val image once."""
    moved = ["data.order=global", "checkpoint.interval_steps=2", "checkpoint.keep_last=5"]
    source = tmp_path / "source"
    args = [*train_overrides(mnist_shards, source), *moved, *cluster_overrides(2)]
    keys_env = {TEST_KEYS_ENV: str(tmp_path / "source-keys")}
    (tmp_path / "source-keys").mkdir()
    check_launched(launch([*args, "--wait"], slurm_cluster, keys_env), args, source, 2, slurm_cluster)
    run_dir = tmp_path / "moved"
    (run_dir / "checkpoints").mkdir(parents=True)
    tag = checkpoint_tag(2)
    subprocess.run(["cp", "-r", str(source / "checkpoints" / tag), str(run_dir / "checkpoints")], check=True)
    (run_dir / "checkpoints" / "latest").write_text(tag)
    args = [*train_overrides(mnist_shards, run_dir), *moved, *cluster_overrides(1)]
    (tmp_path / "moved-keys").mkdir()
    proc = launch([*args, "--wait"], slurm_cluster, {TEST_KEYS_ENV: str(tmp_path / "moved-keys")})
    check_launched(proc, args, run_dir, 1, slurm_cluster)
    # the same samples in each global step after the move, on half the ranks
    source_keys, moved_keys = step_keys(tmp_path / "source-keys"), step_keys(tmp_path / "moved-keys")
    assert sorted(moved_keys) == [2, 3] and sorted(source_keys) == [0, 1, 2, 3]
    assert all(moved_keys[s] == source_keys[s] for s in (2, 3))
    assert all(len(source_keys[s]) == 16 for s in source_keys)  # every rank's share: the whole global batch
    rows = [r for r in read_metrics(run_dir) if "train/loss_total" in r]
    assert [r["step"] for r in rows] == [4] and {r["system/world_size"] for r in rows} == {2}
    assert json.loads((run_dir / "final.json").read_text())["val/count"] == 120
    logs = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_0_log.*"))
    assert "on another allocation: ranks 4 -> 2; global batch and schedule unchanged" in logs
