"""`make gpu-check`'s script, tested where no GPU is: `--cpu` runs the same steps small on the CPU (the
CUDA-marked tests on the CPU, a real train killed inside a save and resumed, gpu_step at two batches) and
must pass, printing its one table and writing it; the GPU wrapper refuses clearly without its wheels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from benchmarks import gpu_check, gpu_wheels

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_mode_passes_and_writes_its_table(tmp_path):
    out = tmp_path / "copy" / "table.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--work", str(tmp_path), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "gpu-check.md").read_text()
    assert out.read_text() == table and table in proc.stdout
    logs = (tmp_path / "copy" / "table-logs.txt").read_text()  # beside --out: why a step failed, if one did
    steps = ("tests", "make-shards", "train-attempt1", "train-attempt2", "gpu_step-batch4")
    for name in ("gpu-check.json", *steps):
        assert f"===== {name}" in logs, name
    assert "| check | result | seconds | figures |" in table and "4 of 4 checks passed" in table
    record = json.loads((tmp_path / "gpu-check.json").read_text())
    rows = {r["check"]: r for r in record["rows"]}
    assert all(r["ok"] for r in rows.values()), rows
    tests = rows["CUDA-marked tests (on CPU)"]["detail"]
    assert tests["passed"] >= 6 and tests.get("failed", 0) == 0
    train = rows["mtdist train 20 steps, kill, resume"]["detail"]
    assert (train["killed_in_save_of_step"], train["resumed_at"], train["teacher_updates"]) == (15, 10, 20)
    assert train["rel_loss_diff_max_resumed_steps"] == 0.0  # on the CPU a resume repeats the losses exactly
    for batch in gpu_check.CPU.bench_batches:
        bench = rows[f"gpu_step ResNet-18 at 64, batch {batch}"]["detail"]
        assert bench["mean_teacher"]["images_per_s"] > 0 and bench["supervised"]["images_per_s"] > 0


def test_a_step_that_times_out_takes_every_process_it_started_with_it(tmp_path):
    """A timed-out step (a cold torch.compile in the CUDA tests, say) must not leave its children on the
    GPU for the next steps: the step's whole session is killed."""
    spawn = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(child.pid, flush=True); time.sleep(60)"
    )
    log = tmp_path / "step.log"
    with pytest.raises(gpu_check.CheckFailed, match="timed out after 2 s") as failed:
        gpu_check.run_group([sys.executable, "-c", spawn], dict(os.environ), timeout=2, log=log)
    assert log.read_text().split() == [str(failed.value).split(": ")[1].split()[0]]  # kept on a timeout
    grandchild = int(str(failed.value).split(": ")[1].split()[0])
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    """Running (a zombie, killed and waiting for its reaper, counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_gpu_profile_is_the_issue_s():
    g = gpu_check.GPU
    assert (g.device, g.backend, g.train_steps, g.bench_batches) == ("cuda", "nccl", 100, (50, 128))
    overrides = gpu_check.train_overrides(g, ROOT / "shards", ROOT / "run")
    for wanted in ("model.channels_last=true", "deepspeed.bf16=true", "deepspeed.backend=nccl"):
        assert wanted in overrides
    assert sum(g.timeouts_s[k] for k in ("tests", "train")) + 2 * g.timeouts_s["bench"] <= 8 * 60


def test_gpu_wrapper_says_where_its_wheels_come_from(tmp_path):
    proc = subprocess.run(
        ["sh", "benchmarks/gpu_check.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"MTDIST_GPU_WHEELS": str(tmp_path / "none")},
    )
    assert proc.returncode == 2 and "make gpu-wheels" in proc.stderr


def test_wheel_list_pins_the_versions_tested_here():
    for name in gpu_wheels.PACKAGES:
        assert "==" in gpu_wheels.pinned(name), name
    assert "wandb" not in gpu_wheels.PACKAGES  # too large to carry; disabled in the check
