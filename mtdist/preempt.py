"""Preemption and time-limit signals -> finish the step, checkpoint on every rank, exit for requeue.

The handler only records the signal (no I/O in a signal handler). The loop asks `requested()`
after each optimizer step; ranks agree through one all-reduce, because Slurm may signal only
some tasks. After the checkpoint, a handler that was installed before ours (submitit's, which
requeues the job) is called outside signal context; otherwise main() raises Preempted and the
CLI exits with REQUEUE_EXIT_CODE.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as torch_dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; slurm/train.sbatch requeues on it
# Every signal checkpoint.signals may name. Slurm sends them to every process of a task, loader
# workers included; only the main process acts on them.
STOP_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")


class Preempted(Exception):
    """Raised after the checkpoint written on a stop signal; the job should be requeued."""


class StopSignal:
    def __init__(self, names: list[str]) -> None:
        self.received = 0
        self.previous: dict[int, Any] = {}
        for name in names:
            signum = getattr(signal, name)
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self, device: torch.device) -> bool:
        """True on every rank if any rank had a stop signal when it entered this call.

        A signal that arrives during the all-reduce (a rank can wait in it for a slower peer for much
        of a step) is kept for the next call, not overwritten by the agreed value: the ranks then
        stop one step later, together, instead of never.
        """
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed:
            self.received = agreed  # a peer's signal, for hand_over
        return agreed != 0

    def hand_over(self) -> None:
        """Call the handler ours replaced (e.g. submitit's requeue), else raise Preempted."""
        previous: Callable | Any = self.previous.get(self.received)
        self.restore()
        if callable(previous):
            previous(self.received, None)
        raise Preempted(f"stopped by signal {signal.Signals(self.received).name} after a checkpoint")

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def ignore_stop_signals() -> None:
    """For DataLoader worker processes (their worker_init_fn), under any start method.

    A stop signal reaches the workers too (Slurm signals all of a task's processes; a terminal or
    `kill -- -PGID` the process group). Their default action, or torch's SIGTERM handler in the
    worker, would kill the worker, and the main process would then fail on the dead worker before
    the checkpoint the signal asked for. The main process stops the workers itself when it exits.
    """
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies; a no-op elsewhere.

    For the loader workers' fork server (its parent: the rank) and the workers (theirs: the server).
    Every child of a multiprocessing fork server holds the write end of the server's "alive" pipe, so a
    server whose rank was killed outright (SIGKILL, the OOM killer) never sees it close, and its workers,
    whose torch watchdog only checks that their parent (the server) lives, never see the rank go: all of
    them stayed, ~1 GB a rank, until the machine ran out of memory (found in session 5's test runs).
    """
    parent = os.getppid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: nothing to set
        return
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return
    if os.getppid() != parent:  # the parent died before the setting took effect
        os._exit(0)
