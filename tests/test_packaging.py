"""The installed package's requirements: torch's range admits the releases in use (2.11 on the GPU image we
check on, 2.13 pinned on the CPU machines, 2.15 the newest), read from the installed metadata."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def requirement(name: str) -> Requirement:
    found = [Requirement(r) for r in requires("mtdist") or []]
    matches = [r for r in found if r.name == name and r.marker is None]
    assert len(matches) == 1, found
    return matches[0]


def test_torch_range_admits_the_releases_in_use():
    spec = requirement("torch").specifier
    for version in ("2.11.0", "2.13.0", "2.14.1", "2.15.0", "2.15.2"):
        assert spec.contains(Version(version)), (version, str(spec))
    assert not spec.contains(Version("2.3.1"))  # fused CPU optimizers need >= 2.4
    assert not spec.contains(Version("2.16.0"))  # not released when this was tested


def test_safetensors_is_a_dependency():
    assert requirement("safetensors").specifier.contains(Version("0.8.0"))


def test_the_wheel_installs_the_launch_layer_as_mtdist_launch_only(tmp_path):
    """launch/ is the launch layer's home in the repository, installed as mtdist.launch: no top-level
    `launch` package in the user's environment (a wheel built here, offline, without dependencies)."""
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    cmd += ["-w", str(tmp_path)]
    proc = subprocess.run([*cmd, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("mtdist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"mtdist", f"{wheel.name.split('-py')[0]}.dist-info"}
    assert {"mtdist/launch/job.py", "mtdist/launch/submit.py", "mtdist/data/loader.py"} <= set(names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mtdist = mtdist.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
