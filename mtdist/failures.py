"""Failure records and the restart decision: what failed, where, and whether a restart can fix it.

Every rank that fails writes one record (rank, step, phase, kind, the error's line) into
`<run_dir>/failures/attempt-<id>/`; a rank killed outright writes none, and its absence names it.
`<id>` is MTDIST_ATTEMPT, which the launch layer sets per Slurm run (job id and restart count). The
launch layer then calls `settle()`, once per failed attempt: it reads the records, decides, and logs
the decision as one line of `<run_dir>/failures.jsonl`; only the first caller of an attempt decides
(an exclusive create), so every rank may ask. The rules, in order:
  - a config error, a non-finite loss or corrupt data past its bound would fail again: never requeued;
  - a run that already failed `cluster.max_failures` times is not requeued again;
  - a failure at the same step as the previous one is a deterministic bug, not bad luck: not requeued;
  - anything else (a crash, a lost rank, a hang, an OOM kill) is requeued, and the run resumes from
    its latest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

ATTEMPT_ENV = "MTDIST_ATTEMPT"
# Tests only: "KIND:RANK:STEP" (KIND kill | raise | hang | await_signal; RANK * for every rank) makes that
# rank fail (or wait for a stop signal) at that step, in every attempt; "KIND:RANK:STEP:once" only until
# it fired once in the run folder.
TEST_FAULT_ENV = "MTDIST_TEST_FAULT"
# EX_DATAERR: the input (config, data, hyperparameters) is at fault; a restart would fail the same way.
FATAL_EXIT_CODE = 65
CONFIG_ERROR_EXIT_CODE = 2  # mtdist.cli: a config error, before training started
# The record kinds, most telling first: the cause of a failure is its most telling record.
KINDS = ("fatal", "hang", "exception", "collective")
COLLECTIVE_ERROR_WORDS = ("gloo/transport", "NCCL", "ProcessGroup", "Connection closed by peer")
# Files in an attempt's folder: a rank ended the attempt on purpose (the run completed, or it stopped for a
# signal after its checkpoint), so a kill after that (srun --wait, a crash in teardown) is no failure; the
# deciding task's `scontrol requeue` succeeded (see launch.job.after_srun).
ENDED_FILE, REQUEUED_FILE = "ended", "requeued"
# Signals that end a task without a record: SIGKILL (the OOM killer, srun --wait) and the crashes SIGILL,
# SIGABRT, SIGBUS, SIGFPE, SIGSEGV. srun's status for such a task is 128 + the signal. SIGTERM, SIGINT
# and SIGHUP are left out (someone's stop); but a SIGTERM to the step alone that the loop cannot act on
# in time (in start-up or a save) ends in Slurm's SIGKILL, which reads as a kill.
KILLED_SIGNALS = (9, 4, 6, 7, 8, 11)


@dataclass(frozen=True)
class FailureRecord:
    rank: int
    world_size: int
    attempt: str
    step: int  # optimizer steps done when it failed
    phase: str  # what the rank was doing (the watchdog's last beat)
    kind: str  # one of KINDS
    error: str  # one line
    host: str = ""
    time: float = 0.0

    def describe(self) -> str:
        return f"rank {self.rank} ({self.kind} at step {self.step}, in {self.phase}): {self.error}"


@dataclass(frozen=True)
class Decision:
    requeue: bool
    step: int
    failures: int  # this run's failures, this one included
    cause: str  # one line: which rank, what, which step; the other ranks after it
    action: str  # one line: requeued, or why not


def attempt_id(environ: Mapping[str, str] | None = None) -> str:
    return (os.environ if environ is None else environ).get(ATTEMPT_ENV, "0")


def attempt_dir(run_dir: Path, attempt: str) -> Path:
    return Path(run_dir) / "failures" / f"attempt-{attempt}"


def mark_ended(run_dir: Path, environ: Mapping[str, str] | None = None) -> None:
    """Note in the attempt's folder that a rank ended it on purpose: the run completed, or it stopped for a
    signal (a preemption, the time limit) after its checkpoint. Only under a launcher (ATTEMPT_ENV set):
    a run started by hand has no batch script to read it."""
    environ = os.environ if environ is None else environ
    if ATTEMPT_ENV in environ:
        mark(run_dir, attempt_id(environ), ENDED_FILE)


def mark(run_dir: Path, attempt: str, name: str) -> None:
    folder = attempt_dir(run_dir, attempt)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).touch()


def marked(run_dir: Path, attempt: str, name: str) -> bool:
    return (attempt_dir(run_dir, attempt) / name).is_file()


def killed_outright(status: int) -> bool:
    """srun's exit status of a step whose worst task was killed (SIGKILL) or crashed: it left no record."""
    return status - 128 in KILLED_SIGNALS


def classify(exc: BaseException) -> str:
    """The record kind of an exception raised out of training."""
    from torch.distributed import DistError

    from mtdist.config import ConfigError
    from mtdist.data import DataError

    if isinstance(exc, (ConfigError, FloatingPointError, DataError)):
        return "fatal"
    # gloo reports a lost peer as a plain RuntimeError from its transport
    lost_peer = isinstance(exc, RuntimeError) and any(word in str(exc) for word in COLLECTIVE_ERROR_WORDS)
    return "collective" if isinstance(exc, DistError) or lost_peer else "exception"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"


def write_record(run_dir: Path, record: FailureRecord) -> Path:
    """Atomically (a reader sees a whole record or none)."""
    folder = attempt_dir(run_dir, record.attempt)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{record.rank:05d}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(record) | {"host": socket.gethostname(), "time": time.time()}))
    os.replace(tmp, path)
    return path


def read_records(run_dir: Path, attempt: str) -> list[FailureRecord]:
    folder = attempt_dir(run_dir, attempt)
    return [FailureRecord(**json.loads(p.read_text())) for p in sorted(folder.glob("rank-*.json"))]


def decisions(run_dir: Path) -> list[dict]:
    """Every decision about this run folder, oldest first (failures.jsonl)."""
    path = Path(run_dir) / "failures.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def history(run_dir: Path) -> list[dict]:
    """The decisions since the last one that stopped the run: a run resubmitted after a fix starts
    counting its failures again."""
    decisions_ = decisions(run_dir)
    stops = [i for i, d in enumerate(decisions_) if not d["requeue"]]
    return decisions_[stops[-1] + 1 :] if stops else decisions_


def decide(
    records: list[FailureRecord],
    world_size: int,
    previous: list[dict],
    max_failures: int,
    exit_status: int | None = None,
) -> Decision:
    """The restart decision for one failed attempt (pure: records and history in, decision out)."""
    step = max((r.step for r in records), default=-1)  # -1: no rank could say (all killed at once)
    cause = describe_cause(records, world_size, exit_status)
    failures = len(previous) + 1

    def stop(why: str) -> Decision:
        return Decision(False, step, failures, cause, f"not requeued: {why}")

    if any(r.kind == "fatal" for r in records) or exit_status in (FATAL_EXIT_CODE, CONFIG_ERROR_EXIT_CODE):
        return stop("a restart would fail the same way; fix the config or the data and resubmit")
    if len(previous) >= max_failures:
        return stop(f"failure {failures} of this run, over cluster.max_failures={max_failures}")
    if previous and step >= 0 and previous[-1]["step"] == step:
        return stop(
            f"it failed again at step {step}, as the previous attempt did: a deterministic bug, not bad "
            "luck; fix it and resubmit (the checkpoints are kept)"
        )
    return Decision(True, step, failures, cause, f"requeued (failure {failures} of at most {max_failures})")


def describe_cause(records: list[FailureRecord], world_size: int, exit_status: int | None = None) -> str:
    """The most telling record first, then the others, then the ranks that left none."""
    ordered = sorted(records, key=lambda r: (KINDS.index(r.kind), r.time))
    missing = sorted(set(range(world_size)) - {r.rank for r in records})
    parts = [r.describe() for r in ordered]
    if missing:
        ranks = ", ".join(map(str, missing))
        dead = f"rank(s) {ranks} left no record (killed, lost with a node, or still stuck)"
        # a rank killed outright is the likelier cause than the peers that lost it
        parts.insert(0 if all(r.kind == "collective" for r in records) else len(parts), dead)
    if exit_status is not None:
        parts.append(f"exit status {exit_status}")
    return "; ".join(parts) or "no record"


def wait_for_records(run_dir: Path, attempt: str, world_size: int, grace_s: float) -> list[FailureRecord]:
    """The attempt's records once one names a cause (anything but a lost peer) or every rank wrote one,
    else after `grace_s`: a rank killed outright never writes, and its peers only saw it go."""
    deadline = time.monotonic() + grace_s
    while True:
        records = read_records(run_dir, attempt)
        caused = any(r.kind != "collective" for r in records)
        if caused or len(records) >= world_size or time.monotonic() >= deadline:
            return records
        time.sleep(0.2)


def settle(
    run_dir: Path,
    attempt: str,
    world_size: int,
    max_failures: int,
    grace_s: float = 5.0,
    exit_status: int | None = None,
) -> tuple[Decision, bool]:
    """Decide for this attempt, once: (the decision, True if this caller made it and must act on it).

    A later caller gets the decision already made, and False.
    """
    claim = attempt_dir(run_dir, attempt) / "decision.json"
    text = _read_when_written(claim) if claim.is_file() else None
    if text:
        return Decision(**json.loads(text)), False
    orphaned = text == ""  # a claim its creator never wrote (killed between create and write)
    records = wait_for_records(run_dir, attempt, world_size, grace_s)
    decision = decide(records, world_size, history(run_dir), max_failures, exit_status)
    claim.parent.mkdir(parents=True, exist_ok=True)
    flags = (os.O_WRONLY | os.O_TRUNC) if orphaned else (os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    try:  # an orphaned claim is taken over
        fd = os.open(claim, flags)
    except FileExistsError:
        text = _read_when_written(claim)
        return (Decision(**json.loads(text)), False) if text else (decision, False)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(decision)))
    with (Path(run_dir) / "failures.jsonl").open("a") as f:
        f.write(json.dumps({"attempt": attempt, "time": time.time(), **asdict(decision)}) + "\n")
    return decision, True


def _read_when_written(path: Path, timeout_s: float = 5.0) -> str:
    """The claim file's text once its creator wrote it (created and written a moment apart)."""
    deadline = time.monotonic() + timeout_s
    while not (text := path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return text


def test_fault(run_dir: Path, rank: int, step: int, environ: Mapping[str, str] | None = None) -> str:
    """The fault TEST_FAULT_ENV asks of this rank at this step ("" for none); a `once` fault is marked
    fired in the run folder before it fires."""
    spec = (os.environ if environ is None else environ).get(TEST_FAULT_ENV, "")
    if not spec:
        return ""
    kind, at_rank, at_step, *once = spec.split(":")
    if int(at_step) != step or at_rank not in ("*", str(rank)):
        return ""
    marker = Path(run_dir) / "failures" / f"test-fault-{kind}-{rank}-{step}"
    if once:
        if marker.exists():
            return ""
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return kind
