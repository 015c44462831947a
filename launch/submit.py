"""`mtdist submit --config FILE [key=value ...] [--dry-run] [--wait]`: train on Slurm via submitit.

The executor comes from the config's `cluster` section: nodes, tasks per node (one per GPU on GPU
nodes, `cluster.tasks_per_node` on CPU-only nodes), CPUs per task, memory, partition, account, qos,
time limit, constraint, exclusive, job name, log folder (default <run_dir>/slurm), extra sbatch
options and setup lines, and how long before the time limit Slurm signals the job (signal_delay_s).
The submitted callable (mtdist.launch.job.TrainJob) sets up torch.distributed from Slurm, runs
`mtdist.train.main(cfg)`, and requeues itself with `checkpoint.resume=auto` when Slurm signals a
preemption or the time limit, or after a failure (cluster.max_failures). Exit status: 0 submitted
(or, with --wait, completed), 1 refused by Slurm or failed, 2 a config error.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from mtdist.config import ClusterConfig, Config, ConfigError, load_config

# Once one task has ended, srun gives the others 60 s, then kills them: a crashed rank must not leave the
# rest blocked in a collective until its timeout (30 min), and ranks ending together keep their status.
SRUN_ARGS = ["--wait=60"]
# Run in the batch script before srun. A task uses the CPUs Slurm gave it, not one thread per core of
# the node (8 ranks x all cores would oversubscribe it); a value the user exported is kept.
JOB_SETUP = ['export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"']


class SubmitError(RuntimeError):
    """Slurm refused the job, or it failed: the message is one line with Slurm's reason."""


# ---------------------------------------------------------------- config


def parse_args(argv: list[str]) -> argparse.Namespace:
    about = "Train on Slurm with submitit; the job is built from the config's cluster section."
    p = argparse.ArgumentParser(prog="mtdist submit", description=about)
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/imagenet_resnet152_10pct.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script that would be submitted")
    p.add_argument("--wait", action="store_true", help="wait for the job; exit 1 if it failed")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. cluster.nodes=2 optim.lr=0.1")
    return p.parse_intermixed_args(argv)


def load(path: str, overrides: list[str]) -> Config:
    """load_config (which validates GPUs vs tasks), with run_dir made absolute (the folder we print)."""
    cfg = load_config(path, overrides)
    check_requeue_signal(cfg)
    run_dir = str(Path(cfg.logging.run_dir).resolve())
    return dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_dir=run_dir))


def check_requeue_signal(cfg: Config) -> None:
    """checkpoint.signals must hold the signal submitit asks Slurm to send before the time limit.

    Without it, submitit's own handler runs at the signal: task 0 requeues and exits at once, the other
    tasks keep training, their next collective fails, and the requeue is recorded as a failure of
    every other rank (counted against cluster.max_failures), with no checkpoint at that step.
    """
    from mtdist.launch.job import requeue_signal

    name = requeue_signal().name
    if name not in cfg.checkpoint.signals:
        raise ConfigError(
            f"checkpoint.signals: {cfg.checkpoint.signals} leaves out {name}, the signal submitit has Slurm "
            f"send before the time limit; add it (the default list has it), or every requeue reads as a "
            f"failure of the ranks other than 0"
        )


def tasks_per_node(cluster: ClusterConfig) -> int:
    """One task per GPU on GPU nodes; `cluster.tasks_per_node` on CPU-only nodes (gpus_per_node=0)."""
    return cluster.tasks_per_node or cluster.gpus_per_node


# ---------------------------------------------------------------- sbatch parameters and script


def log_folder(cfg: Config) -> Path:
    return Path(cfg.cluster.log_folder or Path(cfg.logging.run_dir) / "slurm").resolve()


def slurm_parameters(cfg: Config) -> dict[str, Any]:
    """Keyword arguments for submitit.SlurmExecutor.update_parameters (Slurm's own names)."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": c.job_name,
        "nodes": c.nodes,
        "ntasks_per_node": tasks_per_node(c),
        "cpus_per_task": c.cpus_per_task,
        "time": c.time_minutes,
        "signal_delay_s": c.signal_delay_s,  # time to finish the step and checkpoint before the limit
        "setup": [*JOB_SETUP, *c.setup],
        "srun_args": SRUN_ARGS,
        "teardown": after_srun_lines(log_folder(cfg)),
        "additional_parameters": _additional(c.sbatch_extra),
    }
    optional = {  # --gpus-per-node only when GPUs are asked for: Slurm rejects it on nodes without GRES
        "gpus_per_node": c.gpus_per_node,
        "mem": f"{c.mem_gb}GB" if c.mem_gb else "",
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "constraint": c.constraint,
        "exclusive": c.exclusive,
    }
    return params | {k: v for k, v in optional.items() if v}


def after_srun_lines(folder: Path) -> list[str]:
    """The batch script's lines after srun: a step that failed without a task deciding (a one-task job
    killed outright, every task killed at once) is decided and requeued there (launch.job.after_srun);
    the script still ends with srun's status, so Slurm records the failure."""
    python, logs = shlex.quote(sys.executable), shlex.quote(str(folder))
    after = f'{python} -u -m mtdist.launch.job "$mtdist_status" {logs}'
    return [
        "mtdist_status=$?",
        f'if [ "$mtdist_status" -ne 0 ]; then {after}; fi',
        'exit "$mtdist_status"',
    ]


def _additional(extra: dict[str, str]) -> dict[str, Any]:
    """--requeue lets submitit (and Slurm on node failure) requeue; an empty value means a bare flag."""
    return {"requeue": True} | {k.removeprefix("--"): v if v != "" else True for k, v in extra.items()}


def submitit_command(folder: Path) -> str:
    """The command submitit's SlurmExecutor puts after srun (submitit 1.5.4, `_submitit_command_str`)."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def sbatch_script(params: dict[str, Any], folder: Path) -> str:
    """The script SlurmExecutor would write, built by submitit's own function, without Slurm installed."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **params)


# ---------------------------------------------------------------- submission


def preflight(script: str, cfg: Config) -> None:
    """`sbatch --test-only`: also refuses what sbatch would accept but never run (more CPUs or nodes
    than the partition has, which otherwise pend forever on clusters without EnforcePartLimits)."""
    proc = _slurm(["sbatch", "--test-only"], script)
    if proc.returncode != 0:
        raise SubmitError(refusal(proc.stderr + proc.stdout, cfg))


def _slurm(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise SubmitError(f"{cmd[0]} not found: run on a Slurm login node (or see the script with --dry-run)")
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)


def slurm_reason(output: str) -> str:
    """Slurm's messages without their prefixes, one line: 'invalid partition specified: x; ...'."""
    reasons: list[str] = []
    for line in output.splitlines():
        for prefix in ("sbatch: error: ", "allocation failure: ", "Batch job submission failed: "):
            line = line.strip().removeprefix(prefix)
        if line and line.lower() not in (r.lower() for r in reasons):
            reasons.append(line)
    return "; ".join(reasons) or "no reason given"


def request_summary(cfg: Config) -> str:
    c = cfg.cluster
    mem = f"{c.mem_gb}GB" if c.mem_gb else "(default)"
    partition = c.partition or "(default)"
    return (
        f"asked for partition={partition} nodes={c.nodes} tasks/node={tasks_per_node(c)} "
        f"cpus/task={c.cpus_per_task} mem/node={mem} gpus/node={c.gpus_per_node}"
    )


@dataclasses.dataclass(frozen=True)
class Partition:
    """One partition as sinfo reports it; nodes of several sizes: the largest CPU and memory."""

    name: str
    default: bool
    nodes: int
    cpus: int
    mem_mb: int
    gres: str

    def __str__(self) -> str:
        star = "*" if self.default else ""
        return f"{self.name}{star}: {self.nodes} nodes, {self.cpus} CPUs, {self.mem_mb} MB, gres {self.gres}"


def partitions() -> list[Partition]:
    """From `sinfo` (one row per partition and node configuration); [] where sinfo cannot answer."""
    try:
        out = _slurm(["sinfo", "-h", "-o", "%P|%D|%c|%m|%G"]).stdout
    except (SubmitError, subprocess.SubprocessError):
        return []
    merged: dict[str, Partition] = {}
    for row in (line.split("|") for line in out.splitlines() if line.count("|") == 4):
        part = Partition(row[0].rstrip("*"), row[0].endswith("*"), *(_number(v) for v in row[1:4]), row[4])
        merged[part.name] = _merge(merged[part.name], part) if part.name in merged else part
    return list(merged.values())


def _merge(a: Partition, b: Partition) -> Partition:
    return dataclasses.replace(
        a, nodes=a.nodes + b.nodes, cpus=max(a.cpus, b.cpus), mem_mb=max(a.mem_mb, b.mem_mb)
    )


def _number(text: str) -> int:
    return int(text.rstrip("+") or 0)  # sinfo marks a range with '+': '4+' CPUs


def over_limits(cfg: Config, parts: list[Partition]) -> list[str]:
    """What exceeds the partition, in our terms: sbatch --test-only only says 'not available'."""
    c = cfg.cluster
    part = next((p for p in parts if p.name == c.partition or (not c.partition and p.default)), None)
    if part is None:
        return []
    cpus = tasks_per_node(c) * c.cpus_per_task
    checks = [
        (c.nodes > part.nodes, f"nodes {c.nodes} > {part.nodes} in partition {part.name}"),
        (cpus > part.cpus, f"{cpus} CPUs per node (tasks x cpus_per_task) > {part.cpus}"),
        (c.mem_gb * 1024 > part.mem_mb, f"memory {c.mem_gb}GB per node > {part.mem_mb} MB"),
        (c.gpus_per_node > gpus_in(part.gres), f"gpus {c.gpus_per_node} per node > {gpus_in(part.gres)}"),
    ]
    return [text for exceeded, text in checks if exceeded]


def gpus_in(gres: str) -> int:
    """GPUs per node in sinfo's GRES column: 'gpu:8', 'gpu:a100:4(S:0-1)'; '(null)' is none."""
    return sum(int(n) for n in re.findall(r"\bgpu(?::[^:,(]+)?:(\d+)", gres))


def refusal(output: str, cfg: Config) -> str:
    """One line: Slurm's reason, what exceeds the partition, what was asked and what the cluster has."""
    parts = partitions()
    reason = "; ".join([slurm_reason(output), *over_limits(cfg, parts)])
    offered = "; ".join(map(str, parts)) or "sinfo unavailable"
    return f"Slurm refused the job: {reason} ({request_summary(cfg)}; partitions: {offered})"


def submit(cfg: Config, params: dict[str, Any], folder: Path) -> Any:
    """One submitit job of nodes x tasks_per_node tasks running launch.job.TrainJob(cfg)."""
    import submitit
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from mtdist.launch.job import TrainJob

    _slurm(["sbatch", "--version"])  # a clear error where submitit would say 'could not detect srun'
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeues)
    executor.update_parameters(**params)
    try:
        return executor.submit(TrainJob(cfg))
    except (FailedJobError, FailedSubmissionError) as err:
        raise SubmitError(refusal(str(err), cfg)) from None


def describe(job: Any, cfg: Config) -> str:
    c = cfg.cluster
    return "\n".join(
        [
            f"submitted job {job.job_id}: {c.nodes} node(s) x {tasks_per_node(c)} task(s)",
            f"stdout: {job.paths.stdout}",
            f"stderr: {job.paths.stderr}",
            f"(task 0; task N logs to {job.job_id}_N_log.out/.err in the same folder)",
            f"run folder: {cfg.logging.run_dir}",
        ]
    )


def error_line(text: str) -> str:
    """The exception line of submitit's failure text: the last unindented line before its log hint."""
    lines = text.split("You can check full logs")[0].splitlines()
    lines = [line for line in lines if line.strip() and not line.startswith((" ", "-"))]
    return lines[-1] if lines else "no message"


def wait(job: Any) -> int:
    """Every task's result (job.result() asserts with several tasks); the error's last line on failure."""
    from submitit.core.utils import UncompletedJobError

    try:
        results = job.results()
    except UncompletedJobError as err:
        print(f"job {job.job_id} failed: {error_line(str(err))} (logs: {job.paths.stderr})", file=sys.stderr)
        return 1
    print(f"job {job.job_id} completed: {len(results)} task(s); rank 0 returned {results[0]}")
    return 0


# ---------------------------------------------------------------- command line


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config, args.overrides)
    folder = log_folder(cfg)
    params = slurm_parameters(cfg)
    script = sbatch_script(params, folder)
    if args.dry_run:
        print(script)
        return 0
    preflight(script, cfg)
    job = submit(cfg, params, folder)
    print(describe(job, cfg), flush=True)
    return wait(job) if args.wait else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except ConfigError as err:
        print(f"mtdist submit: config error: {err}", file=sys.stderr)
        return 2
    except SubmitError as err:
        print(f"mtdist submit: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
