"""A hang watchdog for one rank: no progress for `dist.hang_timeout_s` -> every thread's stack, then exit.

A rank that stops making progress (a deadlocked loader worker, a peer that vanished without closing its
sockets, a file system that stopped answering) would otherwise hold its whole allocation until Slurm's
time limit, and nothing would say where it stood. The loop calls `beat()` at every optimizer step, every
evaluation batch, around checkpoint writes and between the start-up phases; a daemon thread checks the
time since the last beat. When it runs out, the watchdog writes every thread's Python stack
(faulthandler, which needs no lock the stuck thread may hold) to `<run_dir>/hang-rank<r>.txt` and to
stderr, records the failure (mtdist.failures), and ends the process with HANG_EXIT_CODE: the launch
layer treats it as a failure to recover from by a restart. The exit is os._exit: the stuck main thread
cannot be asked to unwind.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import TypeVar

T = TypeVar("T")

HANG_EXIT_CODE = 124  # as timeout(1): "ran out of time"; slurm/train.sbatch and launch.job requeue on it
BACKSTOP_S = 60  # how long the watchdog itself may take to write the stacks and record the hang


class Watchdog:
    """Started by start(); beat(what, step) after each unit of progress; stop() when the run is over.

    `on_hang(watchdog)` runs in the watchdog thread after the stacks are written and before the exit
    (it records the failure; the submitit job also requeues there). timeout_s <= 0 disables it.
    """

    def __init__(
        self,
        timeout_s: float,
        run_dir: Path,
        rank: int,
        on_hang: Callable[[Watchdog], None] | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.timeout_s, self.run_dir, self.rank = timeout_s, Path(run_dir), rank
        self.on_hang, self.poll_s = on_hang, min(poll_s, max(timeout_s / 10, 0.05))
        self.what, self.step = "start-up", 0
        self.last_beat = time.monotonic()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._watched: int | None = None  # the thread that beats (start's caller)

    @property
    def stack_file(self) -> Path:
        return self.run_dir / f"hang-rank{self.rank:05d}.txt"

    def start(self) -> Watchdog:
        """Watch the calling thread (the training loop's): its beats, and where it waits when it hangs."""
        self._watched = threading.get_ident()
        if self.timeout_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="mtdist-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, what: str, step: int | None = None) -> None:
        """Progress: `what` the rank does next (named in a stack dump), at optimizer step `step`."""
        self.what, self.last_beat = what, time.monotonic()
        if step is not None:
            self.step = step

    def beating(self, items: Iterable[T], what: str) -> Iterator[T]:
        """`items`, with a beat as each one arrives (an evaluation pass: one beat per batch)."""
        for item in items:
            self.beat(what)
            yield item

    def stop(self) -> None:
        self._stopped.set()

    def in_collective(self) -> bool:
        """Whether the watched thread waits inside a collective (torch.distributed or DeepSpeed's comm):
        then it most likely waits for a peer that hangs elsewhere, and its hang is not the cause."""
        return waits_in_collective(sys._current_frames().get(self._watched))

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            idle_s = time.monotonic() - self.last_beat
            if idle_s > self.timeout_s:
                self._fire(idle_s)
                return

    def _fire(self, idle_s: float) -> None:
        # If anything below blocks too (a file system that stopped answering, a lock the stuck thread
        # holds), faulthandler's own C thread dumps the stacks to stderr once more and exits (status 1).
        faulthandler.dump_traceback_later(BACKSTOP_S, exit=True)
        try:
            header = (
                f"mtdist watchdog: rank {self.rank} made no progress for {idle_s:.0f} s "
                f"(dist.hang_timeout_s={self.timeout_s:g}) at step {self.step}, in {self.what}; "
                f"every thread's stack follows, then exit {HANG_EXIT_CODE}\n"
            )
            sys.stderr.write(header)  # the log first: the run folder may be what hangs
            sys.stderr.flush()
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
            self._write_stack_file(header)
            if self.on_hang is not None:
                self.on_hang(self)
        finally:
            os._exit(HANG_EXIT_CODE)

    def _write_stack_file(self, header: str) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with self.stack_file.open("w") as f:
                f.write(header)
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
        except OSError as err:
            sys.stderr.write(f"mtdist watchdog: could not write {self.stack_file}: {err}\n")


_COLLECTIVE_MODULES = ("/torch/distributed/", "/deepspeed/comm/")


def waits_in_collective(frame: FrameType | None) -> bool:
    """Whether any frame of this stack (innermost first) runs in a collective's module."""
    while frame is not None:
        if any(part in frame.f_code.co_filename.replace("\\", "/") for part in _COLLECTIVE_MODULES):
            return True
        frame = frame.f_back
    return False
