"""The installed package's requirements: torch's range admits the releases in use (2.11 on the GPU image we
check on, 2.13 pinned on the CPU machines, 2.15 the newest), read from the installed metadata."""

from __future__ import annotations

from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.version import Version


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
