"""What submitit runs on every Slurm task: the torch.distributed contract from Slurm, then training.

The callable is pickled by `launch.submit` and unpickled on the cluster, so it lives in this importable
module (a class defined in a `python -m` script would be pickled by value).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from collections.abc import MutableMapping
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from mtdist.config import Config


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


class TrainJob(Checkpointable):
    """`mtdist.train.main(cfg)` on every task; requeued with `checkpoint.resume=auto` when interrupted.

    submitit asks Slurm for `--signal=USR2@<delay>` and installs its handler (checkpoint() + scontrol
    requeue) before calling us. The training loop (mtdist.preempt, checkpoint.signals) installs its own
    handler on top: at the next step boundary every rank checkpoints, then the loop calls submitit's
    handler outside signal context: on rank 0 it calls checkpoint() below, requeues and exits; on the
    other ranks it returns and the loop raises Preempted. With SIGUSR2 left out of checkpoint.signals,
    submitit's handler runs at once instead and the run resumes from its last periodic checkpoint.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self) -> dict[str, float]:
        _setup_logging(int(export_dist_env()["RANK"]))
        from mtdist import train  # torch and deepspeed: imported on the cluster only
        from mtdist.preempt import REQUEUE_EXIT_CODE, Preempted

        try:
            return train.main(self.cfg)
        except Preempted as err:
            # Exit without a result file: an error result here would read as a failed task until
            # the requeued run overwrites it. Slurm's requeue (ours on rank 0, or its own after a
            # preemption) restarts every task.
            logging.getLogger("mtdist").warning("%s; exiting for requeue", err)
            sys.exit(REQUEUE_EXIT_CODE)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on rank 0 before it requeues: the restarted job resumes the run folder."""
        return DelayedSubmission(TrainJob(with_resume(self.cfg)))
