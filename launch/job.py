"""What submitit runs on every Slurm task: the torch.distributed contract from Slurm, then training.

The callable is pickled by `mtdist submit` (mtdist.launch.submit) and unpickled on the cluster, so it
lives in this importable module (a class defined in a `python -m` script would be pickled by value).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths, UncompletedJobError
from submitit.helpers import Checkpointable, DelayedSubmission

from mtdist import failures
from mtdist.config import Config
from mtdist.launch.submit import tasks_per_node

log = logging.getLogger("mtdist")
# slurmctld answers in well under a second; a controller that does not answer in this long (a failover)
# must not keep a failed task alive past srun's --wait, which would kill it mid-decision.
REQUEUE_TIMEOUT_S = 30.0


def master_port(job_id: str) -> int:
    """Stable across requeues (the job id stays), and spread out so jobs sharing a node rarely collide."""
    return 29500 + int(job_id.split("_")[0]) % 20000


def dist_values(job: Any) -> dict[str, str]:
    """The torch.distributed contract for one task, from submitit's view of the Slurm variables."""
    return {
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": str(master_port(str(job.job_id))),
    }


def export_dist_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Overwrite RANK & co: sbatch copies the submitting shell's environment, which may hold stale ones.

    CUDA_VISIBLE_DEVICES is deliberately left as Slurm set it (submitit's own
    TorchDistributedEnvironment.export() would set it to the local rank, which names the wrong GPU when
    the allocation is not GPUs 0..n-1 of the node and devices are not cgroup-constrained).
    mtdist.dist.pick_device then takes cuda:LOCAL_RANK when the task sees all the node's GPUs, and
    cuda:0 when Slurm narrowed the task to one GPU (--gpus-per-task, --gpu-bind).
    """
    values = dist_values(submitit.JobEnvironment())
    (os.environ if environ is None else environ).update(values)
    return values


def attempt_of(job: Any) -> str:
    """This run of the job: its id and how often Slurm restarted it (failure records are kept per run)."""
    return attempt_of_job(str(job.job_id))


def attempt_of_job(job_id: str, environ: Mapping[str, str] = os.environ) -> str:
    return f"{job_id}.{environ.get('SLURM_RESTART_COUNT', '0')}"


def with_resume(cfg: Config) -> Config:
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))


def requeue_signal() -> signal.Signals:
    """The signal submitit asked Slurm for (`--signal=USR2@...` by default; SUBMITIT_PREEMPT_SIGNAL)."""
    return signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]


def _setup_logging(rank: int) -> None:
    """mtdist's logger only: a handler on the root logger would print submitit's lines a second time."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S"))
    log = logging.getLogger("mtdist")
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def resume_when_restarted(submitted_pickle: Path, cfg: Config) -> None:
    """The restarted job resumes the run folder, whatever checkpoint.resume it was submitted with; the
    submission keeps its time-out bookkeeping (as submitit's own checkpoint requeue does)."""
    from submitit.core.utils import temporary_save_path

    delayed = DelayedSubmission.load(submitted_pickle)
    delayed.function = TrainJob(with_resume(cfg))
    with temporary_save_path(submitted_pickle) as tmp:
        delayed.dump(tmp)


def requeue(job_id: str, timeout_s: float = REQUEUE_TIMEOUT_S) -> bool:
    """`scontrol requeue JOB`; False (logged, never raised) when it fails, is missing or hangs: the
    caller is about to end its task either way, and Slurm ends the others (srun --wait)."""
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired) as err:  # no scontrol here, or slurmctld not answering
        log.error("scontrol requeue %s failed: %s; the job is not requeued", job_id, err)
        return False
    if proc.returncode != 0:  # e.g. Slurm is requeueing it already (a preemption): say so, go on
        log.error("scontrol requeue %s failed: %s", job_id, proc.stderr.strip())
    return proc.returncode == 0


class TrainJob(Checkpointable):
    """`mtdist.train.main(cfg)` on every task; requeued with `checkpoint.resume=auto` when interrupted.

    submitit asks Slurm for `--signal=USR2@<delay>` and installs its handler (checkpoint() + scontrol
    requeue) before calling us. The training loop (mtdist.preempt, checkpoint.signals) installs its own
    handler on top: at the next step boundary every rank checkpoints, then the loop calls submitit's
    handler outside signal context: on rank 0 it calls checkpoint() below, requeues and exits; on the
    other ranks it returns and the loop raises Preempted. `mtdist submit` refuses a config whose
    checkpoint.signals leaves SIGUSR2 out (launch.submit.check_requeue_signal): submitit's handler would
    then run at once, on rank 0 only, and the other ranks' failed collectives would read as a failure.

    submitit requeues on those signals only. A failure (an exception on any rank; a hang, which the
    rank's watchdog ends; a rank killed outright, whose peers' collectives then fail) goes to recover():
    the job is requeued up to cluster.max_failures times and resumes from its latest complete
    checkpoint, unless mtdist.failures rules a restart out (a config error, a non-finite loss, the same
    step failing twice). Where no task is left to decide (the only task killed, every task killed at
    once), the batch script's lines after srun do (after_srun).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self) -> dict[str, float]:
        _setup_logging(int(export_dist_env()["RANK"]))
        os.environ[failures.ATTEMPT_ENV] = attempt_of(submitit.JobEnvironment())
        from mtdist import train  # torch and deepspeed: imported on the cluster only
        from mtdist.preempt import REQUEUE_EXIT_CODE, Preempted

        try:
            return train.main(self.cfg, on_hang=lambda _: self.recover())
        except Preempted as err:
            # Exit without a result file: an error result here would read as a failed task until
            # the requeued run overwrites it. Slurm's requeue (ours on rank 0, or its own after a
            # preemption) restarts every task.
            log.warning("%s; exiting for requeue", err)
            sys.exit(REQUEUE_EXIT_CODE)
        except UncompletedJobError:
            raise  # submitit's own end ("timed-out too many times"): not a failure to restart from
        except Exception:
            if not self.recover():
                raise  # submitit records the error: the job is over
            log.exception("failed; the job is requeued and resumes from its latest checkpoint")
            sys.exit(1)  # without a result file, as above

    def recover(self) -> bool:
        """After this rank failed: True if the job is requeued. The first failed rank to get here decides
        (mtdist.failures.settle), logs the decision and requeues; Slurm then ends every task."""
        job = submitit.JobEnvironment()
        run_dir, max_failures = Path(self.cfg.logging.run_dir), self.cfg.cluster.max_failures
        decision, mine = failures.settle(run_dir, attempt_of(job), job.num_tasks, max_failures)
        if mine:
            log.error("job %s failed: %s; %s", job.job_id, decision.cause, decision.action)
        if mine and decision.requeue:
            resume_when_restarted(job.paths.submitted_pickle, self.cfg)
            if requeue(str(job.job_id)):
                failures.mark(run_dir, attempt_of(job), failures.REQUEUED_FILE)
        return decision.requeue

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on rank 0 before it requeues: the restarted job resumes the run folder."""
        return DelayedSubmission(TrainJob(with_resume(self.cfg)))


# ---------------------------------------------------------------- after srun, in the batch script


def after_srun(status: int, folder: Path, environ: Mapping[str, str] = os.environ) -> bool:
    """submitit's batch script, after srun ended with `status` (its teardown, launch.submit): decide for an
    attempt that no task decided for, and requeue if the decision says so. True if this requeued the job.

    A task that fails decides in TrainJob.recover, and a peer does it for a task killed outright. No task
    is left to decide when the only task is killed (a one-task job, an OOM kill), when every task is
    killed at once, or when srun --wait kills a survivor still waiting on its lost peer (NCCL may wait).
    Only statuses of a killed or crashed step count here (failures.killed_outright): other endings are a
    success, a stop for a signal or a failure a task saw, and those are decided (or not) in the tasks.
    """
    if not failures.killed_outright(status):
        return False
    job_id = environ["SLURM_JOB_ID"]
    pickle = JobPaths(folder, job_id=job_id).submitted_pickle
    cfg = DelayedSubmission.load(pickle).function.cfg
    run_dir, attempt = Path(cfg.logging.run_dir), attempt_of_job(job_id, environ)
    if failures.marked(run_dir, attempt, failures.ENDED_FILE):  # completed, or stopped for a signal
        return False
    world_size = cfg.cluster.nodes * tasks_per_node(cfg.cluster)
    decision, mine = failures.settle(run_dir, attempt, world_size, cfg.cluster.max_failures, 0.0, status)
    if mine:
        print(f"mtdist: job {job_id} failed: {decision.cause}; {decision.action}", flush=True)
    # a task that decided to requeue may have been killed (srun --wait) before its scontrol, or that failed
    if not decision.requeue or failures.marked(run_dir, attempt, failures.REQUEUED_FILE):
        return False
    resume_when_restarted(pickle, cfg)
    requeued = requeue(job_id)
    if requeued:
        failures.mark(run_dir, attempt, failures.REQUEUED_FILE)
    return requeued


if __name__ == "__main__":  # the batch script's teardown line: python -m mtdist.launch.job STATUS FOLDER
    after_srun(int(sys.argv[1]), Path(sys.argv[2]))
