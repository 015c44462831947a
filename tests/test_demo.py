"""`mtdist demo`, shortened: both arms train as real `mtdist train` processes, the table is printed and
saved, the monitor split gives eval rows during training, and `mtdist report` draws them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from PIL import Image

from mtdist.logger import read_metrics

pytestmark = pytest.mark.slow


def test_short_demo_prints_the_table_and_its_curves_can_be_drawn(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mtdist", "demo", "seeds=[0]", "schedule.max_steps=40",
           "logging.log_interval_steps=10", f"run_dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "supervised-only  MT student  MT teacher" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())["0"]
    for arm in ("supervised", "mean_teacher"):
        assert 0.0 <= results[arm]["test/student/top1"] <= 100.0
        assert results[arm]["step"] == 40
    assert "test/teacher/top1" in results["mean_teacher"]
    assert (run_dir / "results.md").read_text().splitlines()[1].split()[0] == "0"
    mt = run_dir / "seed0" / "mean_teacher"
    monitor = [r for r in read_metrics(mt) if "val/teacher/top1" in r]
    assert monitor and monitor[-1]["val/count"] == 500  # the monitor split, evaluated at the end
    report = subprocess.run([sys.executable, "-m", "mtdist", "report", str(mt)], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    with Image.open(mt / "report" / "accuracy.png") as png:
        assert png.size[0] > 200 and png.getextrema() != ((255, 255),) * len(png.getbands())
