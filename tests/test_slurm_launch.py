"""mtdist submit (launch/, installed as mtdist.launch) without a cluster: the sbatch script of --dry-run,
config errors, the Slurm environment.

The real submissions are in test_slurm.py (a local Slurm cluster, marked slow).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY

from mtdist.config import load_config
from mtdist.dist import dist_env_from_environ
from mtdist.launch import submit
from mtdist.launch.job import TrainJob, dist_values, export_dist_env

GPU_CLUSTER = [
    "cluster.nodes=2",
    "cluster.gpus_per_node=8",
    "cluster.tasks_per_node=0",  # = gpus_per_node
    "cluster.cpus_per_task=10",
    "cluster.mem_gb=480",
    "cluster.partition=gpu",
    "cluster.account=proj1",
    "cluster.qos=high",
    "cluster.time_minutes=90",
    "cluster.constraint=a100",
    "cluster.exclusive=true",
    "cluster.job_name=mt-flagship",
    "cluster.sbatch_extra={mail-type: END, '--hint': nomultithread, overcommit: ''}",
    "cluster.setup=['module load cuda/12.4']",
]


def dry_run(overrides: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert submit.main(["--config", str(TINY), *overrides, "--dry-run"]) == 0
    return capsys.readouterr().out


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_dry_run_prints_the_sbatch_script_of_the_cluster_section(tmp_path, capsys):
    script = dry_run([*GPU_CLUSTER, f"logging.run_dir={tmp_path}"], capsys)
    logs = tmp_path / "slurm"
    assert sbatch_lines(script) == [  # submitit sorts them by name
        "#SBATCH --account=proj1",
        "#SBATCH --constraint=a100",
        "#SBATCH --cpus-per-task=10",
        f"#SBATCH --error={logs}/%j_0_log.err",
        "#SBATCH --exclusive",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --hint=nomultithread",
        "#SBATCH --job-name=mt-flagship",
        "#SBATCH --mail-type=END",
        "#SBATCH --mem=480GB",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",  # one task per GPU
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={logs}/%j_0_log.out",
        "#SBATCH --overcommit",  # an empty sbatch_extra value is a bare flag
        "#SBATCH --partition=gpu",
        "#SBATCH --qos=high",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",  # submitit's signal, 120 s before the time limit
        "#SBATCH --time=90",
        "#SBATCH --wckey=submitit",
    ]
    setup = script.split("# setup\n")[1].split("\n\n")[0].splitlines()
    assert setup == [*submit.JOB_SETUP, "module load cuda/12.4"]
    command, teardown = script.split("# command\n")[1].split("# teardown\n")
    assert command.strip().splitlines()[-1] == (
        f"srun --unbuffered --output {logs}/%j_%t_log.out --error {logs}/%j_%t_log.err --wait=60 "
        f"{sys.executable} -u -m submitit.core._submit {logs}"
    )
    # after srun: a failed step no task decided for is decided there; the script keeps srun's status
    assert teardown.strip().splitlines() == [
        "mtdist_status=$?",
        f'if [ "$mtdist_status" -ne 0 ]; then {sys.executable} -u -m mtdist.launch.job "$mtdist_status" '
        f"{logs}; fi",
        'exit "$mtdist_status"',
    ]


def test_signal_delay_before_the_time_limit_comes_from_the_cluster_section(tmp_path, capsys):
    script = dry_run(
        ["cluster.time_minutes=1", "cluster.signal_delay_s=10", f"logging.run_dir={tmp_path}"], capsys
    )
    assert {"#SBATCH --signal=USR2@10", "#SBATCH --time=1"} <= set(sbatch_lines(script))


def test_cpu_only_nodes_ask_for_tasks_and_no_gpus(tmp_path, capsys):
    cpu = [
        "cluster.nodes=2",
        "cluster.gpus_per_node=0",
        "cluster.tasks_per_node=2",
        "cluster.cpus_per_task=1",
    ]
    script = dry_run([*cpu, f"logging.run_dir={tmp_path}", f"cluster.log_folder={tmp_path}/logs"], capsys)
    lines = sbatch_lines(script)
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --nodes=2" in lines
    assert not [line for line in lines if "gpu" in line or "--mem" in line or "--partition" in line]
    assert f"#SBATCH --output={tmp_path}/logs/%j_0_log.out" in lines


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster.gpus_per_node=8", "cluster.tasks_per_node=4"], "cluster.tasks_per_node: 4 differs from "),
        (
            ["cluster.gpus_per_node=0", "cluster.tasks_per_node=0"],
            "cluster.gpus_per_node is 0 (no GPUs): set",
        ),
        (["cluster.tasks_per_node=two"], "cluster.tasks_per_node: expected int, got str 'two'"),
        (["cluster.gpu_per_node=2"], "unknown key 'cluster.gpu_per_node'"),
        (["cluster.nodes=0"], "cluster.nodes: must be > 0"),
        (
            ["cluster.time_minutes=1", "cluster.signal_delay_s=60"],
            "cluster.signal_delay_s: 60 must be in [0, cluster.time_minutes * 60) (60 s)",
        ),
        (
            ["checkpoint.signals=[SIGUSR1, SIGTERM]"],
            "checkpoint.signals: ['SIGUSR1', 'SIGTERM'] leaves out SIGUSR2, the signal submitit has Slurm",
        ),
    ],
)
def test_bad_cluster_config_is_a_one_line_error_before_slurm(overrides, message, capsys):
    assert submit.main(["--config", str(TINY), *overrides, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtdist submit: config error: ") and message in err and err.count("\n") == 1, err


def test_missing_config_file_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    cmd = [sys.executable, "-m", "mtdist", "submit", "--config", str(missing), "cluster.nodes=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr
        == f"mtdist submit: config error: config file {missing} does not exist; pass one of configs/*.yaml\n"
    )


def test_without_slurm_submission_says_so(tmp_path):
    """No sbatch on PATH (a laptop): a clear error, not submitit's 'could not detect srun'."""
    cmd = [sys.executable, "-m", "mtdist", "submit", "--config", str(TINY), f"logging.run_dir={tmp_path}"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ | {"PATH": "/nonexistent"}
    )
    assert proc.returncode == 1
    assert (
        proc.stderr
        == "mtdist submit: sbatch not found: run on a Slurm login node (or see the script with --dry-run)\n"
    )


def test_slurm_reason_is_one_line_without_prefixes():
    out = "sbatch: error: invalid partition specified: nope\nallocation failure: Invalid partition name"
    assert submit.slurm_reason(out) == "invalid partition specified: nope; Invalid partition name"
    twice = "sbatch: error: Batch job submission failed: Requested node configuration is not available\n" * 2
    assert submit.slurm_reason(twice) == "Requested node configuration is not available"


def test_what_exceeds_the_partition_is_named():
    cluster = [
        "cluster.nodes=3",
        "cluster.gpus_per_node=2",
        "cluster.tasks_per_node=0",
        "cluster.cpus_per_task=3",
    ]
    cfg = submit.load(str(TINY), [*cluster, "cluster.mem_gb=64"])
    debug = submit.Partition("debug", True, nodes=2, cpus=4, mem_mb=9039, gres="(null)")
    assert submit.over_limits(cfg, [debug]) == [
        "nodes 3 > 2 in partition debug",
        "6 CPUs per node (tasks x cpus_per_task) > 4",  # 2 GPUs, so 2 tasks
        "memory 64GB per node > 9039 MB",
        "gpus 2 per node > 0",
    ]
    assert submit.gpus_in("gpu:a100:4(S:0-1)") == 4 and submit.gpus_in("(null)") == 0


SLURM_TASK = {  # task 3 of a 2-node job with 2 tasks per node, as slurmstepd sets it
    "SUBMITIT_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "1234",
    "SLURM_NTASKS": "4",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu-a[07-08]",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
}


def test_task_environment_comes_from_slurm_and_replaces_stale_values(monkeypatch):
    stale = {
        key: "0"
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    for key, value in (SLURM_TASK | stale).items():
        monkeypatch.setenv(key, value)  # also restores what export_dist_env overwrites
    values = export_dist_env()
    assert values == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu-a07", "MASTER_PORT": str(29500 + 1234),
    }  # fmt: skip
    env = dist_env_from_environ()  # what mtdist reads next
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (3, 4, 1, "gpu-a07")
    assert "CUDA_VISIBLE_DEVICES" not in values  # left as Slurm set it; see mtdist.dist.pick_device


def test_master_port_is_the_same_after_a_requeue():
    job = type("Job", (), {"global_rank": 0, "num_tasks": 2, "local_rank": 0, "num_nodes": 2,
                           "hostnames": ["node1", "node2"], "job_id": "77"})  # fmt: skip
    assert dist_values(job)["MASTER_PORT"] == dist_values(job)["MASTER_PORT"] == str(29500 + 77)


def test_checkpoint_resubmits_the_same_run_with_resume_auto(tmp_path):
    cfg = load_config(TINY, [f"logging.run_dir={tmp_path}", "checkpoint.resume=never"])
    job = TrainJob(cfg)
    delayed = job.checkpoint()
    again = delayed.function
    assert isinstance(again, TrainJob) and again is not job and not delayed.args and not delayed.kwargs
    assert again.cfg.checkpoint.resume == "auto" and job.cfg.checkpoint.resume == "never"
    assert again.cfg.logging == cfg.logging and again.cfg.cluster == cfg.cluster


def test_run_dir_is_made_absolute_for_the_job(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = submit.load(str(TINY), ["logging.run_dir=runs/x"])
    assert cfg.logging.run_dir == str(tmp_path / "runs" / "x")
    assert submit.log_folder(cfg) == Path(tmp_path / "runs" / "x" / "slurm")


def test_a_requeue_that_fails_hangs_or_has_no_scontrol_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    from mtdist.launch.job import requeue

    fake = tmp_path / "scontrol"
    monkeypatch.setenv("PATH", str(tmp_path))
    fake.write_text("#!/bin/sh\nexec /bin/sleep 30\n")
    fake.chmod(0o755)
    assert requeue("42", timeout_s=0.5) is False  # a controller that does not answer
    fake.write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    assert requeue("42") is False
    fake.write_text("#!/bin/sh\nexit 0\n")
    assert requeue("42") is True
    fake.unlink()
    assert requeue("42") is False  # no scontrol on this node
    messages = [r.getMessage() for r in caplog.records]
    assert any("timed out after 0.5 seconds" in m for m in messages)
    assert any("presently disabled" in m for m in messages)
    assert any("No such file" in m for m in messages)


def test_after_srun_decides_only_for_a_step_killed_without_a_decision(tmp_path, monkeypatch):
    """launch.job.after_srun (the batch script's teardown): requeues a killed step that no task decided for
    (the real one-task kill is in test_slurm.py); leaves alone a success, a failure a task saw (status 1),
    a scancel of the step (SIGTERM, 143), a stop for a signal, and an attempt a task already decided."""
    from submitit.core.utils import JobPaths
    from submitit.helpers import DelayedSubmission

    from mtdist import failures
    from mtdist.launch.job import after_srun

    cfg = load_config(
        TINY, [f"logging.run_dir={tmp_path / 'run'}", "cluster.nodes=1", "checkpoint.resume=never"]
    )
    folder, run_dir = tmp_path / "slurm", tmp_path / "run"
    folder.mkdir()
    DelayedSubmission(TrainJob(cfg)).dump(JobPaths(folder, job_id="42").submitted_pickle)
    calls = tmp_path / "scontrol-calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")

    def after(status: int, restart: int) -> bool:
        return after_srun(status, folder, {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": str(restart)})

    assert not any(after(status, 0) for status in (0, 1, 143, 255))  # not a kill
    failures.mark_ended(run_dir, {failures.ATTEMPT_ENV: "42.1"})
    assert not after(137, 1)  # killed after the run completed or stopped for a signal
    assert after(137, 2)  # killed outright, no task left: decided here and requeued
    assert not after(139, 2)  # the same attempt again: decided and requeued once
    (decision,) = failures.decisions(run_dir)
    assert decision["attempt"] == "42.2" and decision["requeue"] and "exit status 137" in decision["cause"]
    assert calls.read_text() == "requeue 42\n"
    # a task decided to requeue but was killed before its scontrol (no "requeued" mark): requeued here
    failures.settle(run_dir, "42.3", 1, cfg.cluster.max_failures, 0.0)
    assert after(137, 3) and calls.read_text() == "requeue 42\n" * 2 and len(failures.decisions(run_dir)) == 2
    resumed = DelayedSubmission.load(JobPaths(folder, job_id="42").submitted_pickle).function.cfg
    assert resumed.checkpoint.resume == "auto"  # the restarted job continues the run folder
