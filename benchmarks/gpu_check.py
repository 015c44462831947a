"""`make gpu-check`: the whole GPU path in one command, its figures in one table (8 minutes at most).

1. the CUDA-marked tests (tests/test_cuda.py: flat buffers, NHWC activations, bf16 autocast student and
   teacher, the fp32 EMA, pinned uint8 input normalized on the device, fused optimizer, model.compile);
2. a real `mtdist train` of 100 steps on one GPU (nccl, bf16, channels_last, 4 loader workers) on JPEG
   shards it writes with `mtdist make-shards`: checkpoints every 25 steps, killed (SIGKILL) inside the
   save of step 75, resumed from step 50 to the end; the resumed steps 51..75 must repeat the losses the
   killed run logged for them, and the run must end at step 100 with 100 teacher updates;
3. benchmarks/gpu_step.py, ResNet-152 at 224, per-GPU batch 50 (the flagship's) and 128: student
   images/s, Mean Teacher / supervised, MFU, peak memory.

Every step runs even if an earlier one failed; the table is printed and written to WORK/gpu-check.md
(with WORK/gpu-check.json holding every figure), and to --out too. Exit 0 when every step passed.
`--cpu` runs the same steps, small, on the CPU (tests/test_gpu_check.py does, so this script is tested
where no GPU is): the tests on the CPU, 20 steps of a width-4 ResNet-18 at 32 px, ResNet-18 at 64 px
with batches 4 and 8.

    sh benchmarks/gpu_check.sh                  # on the GPU machine: installs .gpu-wheels/, then this
    python -m benchmarks.gpu_check --cpu        # here
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CUDA_TEST_FILES = ("tests/test_cuda.py",)
HANG_IN_SAVE_ENV = "MTDIST_TEST_HANG_IN_SAVE"  # mtdist.checkpoint's hook: block inside the save of step N


@dataclass(frozen=True)
class Profile:
    """The sizes of one mode: the GPU's, or the same steps small on the CPU."""

    device: str
    backend: str
    train_steps: int
    image_size: int
    batch: int
    width: int
    small_input: bool
    workers: int
    classes: int
    per_class: int
    labels_per_class: int
    val_per_class: int
    samples_per_shard: int
    loss_tolerance: float  # relative: a resumed step's loss against the killed run's
    bench_batches: tuple[int, ...]
    bench_args: tuple[str, ...]
    timeouts_s: dict[str, float]


GPU = Profile(
    device="cuda", backend="nccl", train_steps=100, image_size=64, batch=64, width=64, small_input=False,
    workers=4, classes=10, per_class=60, labels_per_class=10, val_per_class=10, samples_per_shard=25,
    # bf16 and cuDNN's autotuned kernels differ in rounding between two processes; CPU resumes are exact
    loss_tolerance=2e-2,
    bench_batches=(50, 128), bench_args=(),
    timeouts_s={"tests": 170, "train": 150, "bench": 75},  # 470 s: 8 minutes with the wheels' install
)  # fmt: skip
CPU = Profile(
    device="cpu", backend="gloo", train_steps=20, image_size=32, batch=16, width=4, small_input=True,
    workers=1, classes=4, per_class=20, labels_per_class=5, val_per_class=5, samples_per_shard=5,
    loss_tolerance=1e-6,
    bench_batches=(4, 8),
    bench_args=("--device", "cpu", "--arch", "resnet18", "--size", "64", "--steps", "3"),
    timeouts_s={"tests": 240, "train": 240, "bench": 240},
)  # fmt: skip


@dataclass
class Row:
    check: str
    ok: bool
    seconds: float
    figures: str
    detail: dict[str, Any] = field(default_factory=dict)


class CheckFailed(Exception):
    pass


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


def timed(check: str, fn: Callable[[], tuple[str, dict]]) -> Row:
    """Run one step; any failure becomes a FAILED row with its reason (the next steps still run)."""
    print(f"[gpu-check] {check} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        figures, detail = fn()
        ok = True
    except Exception as exc:  # noqa: BLE001  (a broken step is a FAILED row; the others still run)
        figures, detail, ok = f"{type(exc).__name__}: {exc}"[:600], {}, False
    row = Row(check, ok, time.perf_counter() - start, figures, detail)
    print(
        f"[gpu-check] {check}: {'ok' if ok else 'FAILED'} in {row.seconds:.0f} s", file=sys.stderr, flush=True
    )
    return row


def child_env(profile: Profile) -> dict[str, str]:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    if profile.device == "cpu":  # no GPU for torch or DeepSpeed, whatever the machine has; NHWC inputs
        from mtdist.dist import NHWC_ON_CPU_ENV  # here, not at the top: main sets the CPU's env first

        env |= {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
        env |= {NHWC_ON_CPU_ENV: "1"}  # the GPU's input layout, on the CPU
    return env


def python(
    args: list[str], profile: Profile, timeout: float, log: Path | None = None, **env: str
) -> subprocess.CompletedProcess:
    return run_group([sys.executable, *args], child_env(profile) | env, timeout, log)


def run_group(
    cmd: list[str], env: dict[str, str], timeout: float, log: Path | None = None
) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own, all of which is killed at the end: a timeout would
    otherwise kill only `cmd`, leaving what it started (pytest's children, torch.compile's workers) on
    the GPU through the next checks, their timings skewed or timed out too. The output goes to `log`
    too, also when the command timed out."""
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            out, err = _rest_of_output(proc)
            _write_log(log, out, err)
            raise CheckFailed(f"timed out after {timeout:.0f} s: {tail(out + err)}") from None
        finally:
            kill_group(proc.pid)  # what outlived the command
    _write_log(log, out, err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _rest_of_output(proc: subprocess.Popen) -> tuple[str, str]:
    """What a killed command wrote; a process that left the group (its own session) may still hold the
    pipes open: give up on it after a few seconds."""
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        return "", "(the output was lost: a process outside the command's group kept its pipes open)"


def _write_log(log: Path | None, out: str, err: str) -> None:
    if log is not None:
        log.write_text(out + err)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the session has ended
        pass


def tail(proc: subprocess.CompletedProcess | str, chars: int = 400) -> str:
    text = proc if isinstance(proc, str) else proc.stdout + proc.stderr
    return " ".join(text[-chars:].split())


# ---------------------------------------------------------------------------------------------- 1. tests
def check_tests(profile: Profile, work: Path) -> tuple[str, dict]:
    args = ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *CUDA_TEST_FILES]
    log = work / "tests.log"
    proc = python(args, profile, profile.timeouts_s["tests"], log, MTDIST_TEST_DEVICE=profile.device)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", proc.stdout)}
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary"
    expect(
        proc.returncode == 0 and counts.get("passed", 0) > 0, f"pytest exit {proc.returncode}: {tail(proc)}"
    )
    return summary, counts


# ---------------------------------------------------------------------------------------------- 2. train
def write_jpeg_tree(root: Path, profile: Profile, seed: int = 0) -> None:
    """An ILSVRC-2012-layout folder of real JPEGs: per class a color and stripe angle, per image noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(profile.classes):
        wnid = f"n{10_000_000 + c:08d}"
        color, angle = rng.uniform(40, 215, 3), rng.uniform(0, np.pi)
        for split, count in (("train", profile.per_class), ("val", profile.val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(profile.image_size, 2 * profile.image_size, 2)
                yy, xx = np.mgrid[0:h, 0:w]
                stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.3 + rng.uniform(0, 6.3))
                pixels = color * (0.7 + 0.3 * stripes[..., None]) + rng.normal(0, 12, (h, w, 3))
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(folder / f"{wnid}_{split}{i}.JPEG", "JPEG", quality=90)


def train_overrides(profile: Profile, shards: Path, run_dir: Path) -> list[str]:
    n, b = profile.train_steps, profile.batch
    return [
        f"data.labeled={shards / 'train-labeled.index.json'}",
        f"data.unlabeled={shards / 'train-unlabeled.index.json'}",
        f"data.val={shards / 'val.index.json'}",
        "data.channels=3",
        "data.augment=imagenet",
        f"data.num_classes={profile.classes}",
        f"data.image_size={profile.image_size}",
        f"data.batch_size={b}",
        f"data.labeled_batch_size={b // 2}",
        f"data.num_workers={profile.workers}",
        "data.eval_batch_size_per_gpu=50",
        "model.arch=resnet18",
        f"model.width={profile.width}",
        f"model.small_input={str(profile.small_input).lower()}",
        "model.channels_last=true",
        "deepspeed.bf16=true",
        f"deepspeed.backend={profile.backend}",
        "schedule.epochs=100",
        "schedule.rampdown_epochs=110",
        f"schedule.max_steps={n}",
        f"checkpoint.interval_steps={n // 4}",
        "checkpoint.keep_last=10",
        f"logging.run_dir={run_dir}",
        "logging.log_interval_steps=1",
        f"logging.eval_interval_steps={n // 2}",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
    ]


def loss_by_attempt(run_dir: Path) -> list[dict[int, float]]:
    """The train/loss_total rows of metrics.jsonl, one dict per process (a resume starts a new one)."""
    attempts: list[dict[int, float]] = []
    last = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss_total" not in row:
            continue
        if last is None or row["step"] <= last:
            attempts.append({})
        attempts[-1][row["step"]] = row["train/loss_total"]
        last = row["step"]
    return attempts


def check_train(profile: Profile, work: Path) -> tuple[str, dict]:
    deadline = time.monotonic() + profile.timeouts_s["train"]
    n = profile.train_steps
    hang, resume = 3 * n // 4, n // 2
    src, shards, run_dir = work / "jpeg-src", work / "shards", work / "run"
    for path in (src, shards, run_dir):
        shutil.rmtree(path, ignore_errors=True)
    write_jpeg_tree(src, profile)
    made = python(
        ["-m", "mtdist", "make-shards", "--src", str(src), "--out", str(shards),
         "--labels-per-class", str(profile.labels_per_class),
         "--samples-per-shard", str(profile.samples_per_shard), "--workers", str(max(1, profile.workers))],
        profile, deadline - time.monotonic(), work / "make-shards.log",
    )  # fmt: skip
    expect(made.returncode == 0, f"make-shards exit {made.returncode}: {tail(made)}")
    cmd = [
        sys.executable,
        "-m",
        "mtdist",
        "train",
        "--config",
        str(TINY),
        *train_overrides(profile, shards, run_dir),
    ]

    # attempt 1: killed inside the save of step `hang` (files written, not yet renamed into place)
    log1 = (work / "train-attempt1.log").open("w")
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(profile) | {HANG_IN_SAVE_ENV: str(hang)}, stdout=log1,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    marker = run_dir / "checkpoints" / f".tmp-step-{hang:08d}" / "hanging-rank00000"
    try:
        while not marker.exists():
            expect(first.poll() is None, f"attempt 1 exited {first.returncode} before step {hang}: "
                   f"{tail((work / 'train-attempt1.log').read_text())}")  # fmt: skip
            expect(time.monotonic() < deadline, f"attempt 1 did not reach the save of step {hang} in time")
            time.sleep(0.05)
        started_1 = time.monotonic()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log1.close()
    from mtdist import checkpoint

    latest = checkpoint.latest(run_dir / "checkpoints")
    expect(
        latest is not None and latest.name == checkpoint.tag_for(resume),
        f"after the kill, latest is {latest and latest.name}, not {checkpoint.tag_for(resume)}",
    )

    # attempt 2: the same command resumes from the latest complete checkpoint
    second = run_group(cmd, child_env(profile), deadline - time.monotonic(), work / "train-attempt2.log")
    expect(second.returncode == 0, f"attempt 2 exit {second.returncode}: {tail(second)}")
    expect(f"at step {resume}" in second.stderr, f"attempt 2 did not say it resumed at step {resume}")

    attempts = loss_by_attempt(run_dir)
    expect(len(attempts) == 2, f"{len(attempts)} attempts in metrics.jsonl, expected 2")
    killed, resumed = attempts
    expect(max(killed) == hang and min(resumed) == resume + 1 and max(resumed) == n, "unexpected step ranges")
    overlap = range(resume + 1, hang + 1)
    rel = [abs(resumed[s] - killed[s]) / max(abs(killed[s]), 1e-12) for s in overlap]
    expect(
        rel[0] <= profile.loss_tolerance,
        f"step {resume + 1} loss {resumed[resume + 1]} vs {killed[resume + 1]}",
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["step"] == n and "train/teacher_updates" in r][-1]
    expect(last["train/teacher_updates"] == n, f"teacher updates {last['train/teacher_updates']} at step {n}")
    final = json.loads((run_dir / "final.json").read_text())
    expect(final["step"] == n, f"final.json at step {final['step']}")
    speeds = [r["data/images_per_s"] for r in rows if "data/images_per_s" in r and r["step"] > resume + 5]
    detail = {
        "steps": n,
        "killed_in_save_of_step": hang,
        "resumed_at": resume,
        "rel_loss_diff_first_resumed_step": rel[0],
        "rel_loss_diff_max_resumed_steps": max(rel),
        "teacher_updates": last["train/teacher_updates"],
        "val_teacher_top1": final.get("val/teacher/top1"),
        "val_student_top1": final.get("val/student/top1"),
        "images_per_s_median": statistics.median(speeds) if speeds else None,
        "seconds_from_kill_to_end": time.monotonic() - started_1,
    }
    figures = (
        f"killed in the save of step {hang}, resumed at {resume}, ended at {n} ({n} teacher updates); "
        f"loss of step {resume + 1} vs killed run: rel {rel[0]:.1e} (max over {resume + 1}..{hang}: "
        f"{max(rel):.1e}); val top-1 teacher {final.get('val/teacher/top1', float('nan')):.1f} / student "
        f"{final.get('val/student/top1', float('nan')):.1f}; {detail['images_per_s_median'] or 0:.0f} "
        "img/s with JPEG decoding"
    )
    return figures, detail


# ---------------------------------------------------------------------------------------------- 3. bench
def check_bench(profile: Profile, work: Path, batch: int) -> tuple[str, dict]:
    out = work / f"gpu_step-batch{batch}.json"
    out.unlink(missing_ok=True)
    args = ["-m", "benchmarks.gpu_step", *profile.bench_args, "--batch", str(batch), "--json", str(out)]
    proc = python(args, profile, profile.timeouts_s["bench"], work / f"gpu_step-batch{batch}.log")
    expect(proc.returncode == 0 and out.is_file(), f"gpu_step exit {proc.returncode}: {tail(proc)}")
    res = json.loads(out.read_text())
    mt, sup, ratio = res["mean_teacher"], res["supervised"], res["ratios"][0]
    mfu = f"MFU {mt['mfu']:.1%} / {sup['mfu']:.1%}" if res["peak_tflops"] else "MFU n/a"
    memory = "peak GPU memory" if profile.device == "cuda" else "max RSS"
    figures = (
        f"MT {mt['images_per_s']:.0f} / supervised {sup['images_per_s']:.0f} student img/s; MT/sup "
        f"{ratio['value']:.3f} (goal {ratio['goal']}: {'met' if ratio['met'] else 'MISSED'}); {mfu}; "
        f"{memory} {mt['peak_gib']:.1f} / {sup['peak_gib']:.1f} GiB"
    )
    return figures, res


# ---------------------------------------------------------------------------------------------- table
def environment(profile: Profile) -> dict[str, str]:
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(0) if profile.device == "cuda" else "cpu"
    return {
        "device": name,
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})"
        if profile.device == "cuda"
        else torch.__version__,
        "python": sys.version.split()[0],
        "opencv": opencv_version(),
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "mode": "GPU" if profile.device == "cuda" else "--cpu (the same steps, small)",
    }


def opencv_version() -> str:
    """The GPU image's own opencv (gpu_wheels does not carry one): named in the table's first line."""
    try:
        import cv2
    except ImportError as err:
        return f"missing ({err})"
    return cv2.__version__


def table(rows: list[Row], env: dict[str, str], total_s: float) -> str:
    lines = [
        f"# mtdist gpu-check: {env['device']}, torch {env['torch']}, Python {env['python']}, opencv "
        f"{env['opencv']}, commit {env['commit']}, {env['date']}, {env['mode']}",
        "",
        "| check | result | seconds | figures |",
        "|---|---|---:|---|",
    ]
    for r in rows:
        figures = r.figures.replace("|", "/")
        lines.append(f"| {r.check} | {'ok' if r.ok else 'FAILED'} | {r.seconds:.0f} | {figures} |")
    passed = sum(r.ok for r in rows)
    lines += ["", f"{passed} of {len(rows)} checks passed in {total_s:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the same steps, small, on the CPU")
    p.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "gpu-check", help="scratch and results folder"
    )
    p.add_argument(
        "--out", type=Path, help="also copy the table here (e.g. $OUT/gpu-check.md), the logs' tails beside"
    )
    args = p.parse_args(argv)
    profile = CPU if args.cpu else GPU
    if args.cpu:
        os.environ |= {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}  # before torch looks
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device visible; --cpu runs the same steps small on the CPU", file=sys.stderr
        )
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    for stale in args.work.glob("*.log"):  # an earlier run's logs would pass for this one's
        stale.unlink()
    start = time.perf_counter()
    env = environment(profile)
    rows = [
        timed(
            "CUDA-marked tests" + (" (on CPU)" if args.cpu else ""), lambda: check_tests(profile, args.work)
        ),
        timed(
            f"mtdist train {profile.train_steps} steps, kill, resume",
            lambda: check_train(profile, args.work),
        ),
    ]
    arch = "ResNet-152 at 224" if not args.cpu else "ResNet-18 at 64"
    for batch in profile.bench_batches:
        rows.append(
            timed(f"gpu_step {arch}, batch {batch}", lambda b=batch: check_bench(profile, args.work, b))
        )
    text = table(rows, env, time.perf_counter() - start)
    print(text)
    (args.work / "gpu-check.md").write_text(text)
    record = {"environment": env, "profile": asdict(profile), "rows": [asdict(r) for r in rows]}
    (args.work / "gpu-check.json").write_text(json.dumps(record, indent=1, default=str))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        logs = args.out.with_name(args.out.stem + "-logs.txt")
        logs.write_text(log_tails(args.work))
    return 0 if all(r.ok for r in rows) else 1


def log_tails(work: Path, chars: int = 20_000) -> str:
    """The results record and the last `chars` of every step's log in one text: beside --out, so that a
    device tool which returns only a few files from $OUT brings back why a step failed."""
    parts = []
    for path in [work / "gpu-check.json", *sorted(work.glob("*.log"))]:
        if path.is_file():
            parts.append(f"===== {path.name}\n{path.read_text(errors='replace')[-chars:]}")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
