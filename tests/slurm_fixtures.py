"""A real Slurm 22.05 cluster of 2 nodes on this machine, for the Slurm tests (tests/slurm_cluster/).

The session fixture starts it (installing Debian's slurm packages on first use) and stops it at the
end. Pytest sessions running at the same time on one machine share the cluster: each registers
itself under a lock, and the last one to leave stops the daemons. A machine that cannot run it
(not root, no Slurm and no apt-get) FAILS the tests that need it: they are part of the acceptance.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "slurm_cluster"
NODES = 2
STATE_DIR = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/mtdist-slurm"))
START_TIMEOUT_S = 600  # a fresh machine downloads and installs the packages first
# no record yet in accounting right after sbatch counts as active too
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "RESIZING", "SUSPENDED")


@dataclass(frozen=True)
class SlurmCluster:
    nodes: int
    env: dict[str, str]  # for sbatch and launch: jobs inherit it (sbatch's default --export=ALL)

    def states(self, job_id: str) -> list[str]:
        """Every state the job went through (-D keeps the records of requeued runs), oldest first."""
        out = subprocess.run(
            ["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def running(self, job_id: str) -> bool:
        states = self.states(job_id)
        return not states or states[-1] in ACTIVE_STATES

    def wait(self, job_id: str, timeout_s: float = 600) -> str:
        """Poll accounting until the job has ended; its final state (sbatch --wait polls every 2-32 s)."""
        deadline = time.monotonic() + timeout_s
        while self.running(job_id):
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], timeout=30)
                raise AssertionError(f"job {job_id} still not finished after {timeout_s}s; cancelled it")
            time.sleep(0.5)
        return self.states(job_id)[-1]


def _why_unusable() -> str:
    if os.geteuid() != 0:
        return "it must run as root (it writes /etc/slurm and /etc/hosts and starts daemons)"
    if shutil.which("slurmd") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is missing to install it (Debian 12 expected)"
    return ""


@contextmanager
def _locked() -> Iterator[Path]:
    """Serialize start/stop across concurrent pytest sessions; yields the folder of registered users."""
    users = STATE_DIR / "users"
    users.mkdir(parents=True, exist_ok=True)
    with (STATE_DIR / "users.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _forget_dead(users)
        yield users


def _forget_dead(users: Path) -> None:
    """A session killed before its teardown must not keep the cluster alive for ever."""
    for entry in users.iterdir():
        try:
            os.kill(int(entry.name), 0)
        except (ProcessLookupError, ValueError):
            entry.unlink()


def _script(name: str) -> subprocess.CompletedProcess:
    env = os.environ | {"LOCAL_SLURM_NODES": str(NODES), "LOCAL_SLURM_DIR": str(STATE_DIR)}
    return subprocess.run(
        ["bash", str(SCRIPTS / name)], env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S
    )


def start_cluster() -> None:
    with _locked() as users:
        started = time.monotonic()
        proc = _script("start.sh")
        if proc.returncode != 0:
            pytest.fail(
                f"local Slurm cluster did not start (tests/slurm_cluster/start.sh):\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}",
                pytrace=False,
            )
        (users / str(os.getpid())).touch()
    print(f"\n[slurm] cluster ready in {time.monotonic() - started:.1f}s", file=sys.stderr)


def stop_cluster() -> None:
    with _locked() as users:
        (users / str(os.getpid())).unlink(missing_ok=True)
        if not any(users.iterdir()):
            proc = _script("stop.sh")
            assert proc.returncode == 0, f"stop.sh failed:\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The running cluster; jobs get OMP_NUM_THREADS=1 (one CPU per task on a 2-core machine)."""
    reason = _why_unusable()
    if reason:
        pytest.fail(f"the Slurm tests need a local Slurm cluster, and {reason}", pytrace=False)
    start_cluster()
    try:
        yield SlurmCluster(NODES, os.environ | {"OMP_NUM_THREADS": "1", "MTDIST_PYTHON": sys.executable})
    finally:
        stop_cluster()
