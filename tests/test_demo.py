"""`mtdist demo`, shortened: both arms train as real `mtdist train` processes, the table is printed and
saved, the monitor split gives eval rows during training, and `mtdist report` draws them."""

from __future__ import annotations

import json

import pytest
from conftest import run_python
from PIL import Image

from mtdist.logger import read_metrics

pytestmark = pytest.mark.slow


def test_short_demo_prints_the_table_and_its_curves_can_be_drawn(tmp_path):
    run_dir = tmp_path / "demo"
    args = ["seeds=[0]", "schedule.max_steps=40", "logging.log_interval_steps=10", f"run_dir={run_dir}"]
    proc = run_python(["-m", "mtdist", "demo", *args])
    assert "supervised-only  MT student  MT teacher" in proc.stdout
    assert "resumed from" not in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())["0"]
    for arm in ("supervised", "mean_teacher"):
        assert 0.0 <= results[arm]["test/student/top1"] <= 100.0
        assert results[arm]["step"] == 40
    assert "test/teacher/top1" in results["mean_teacher"]
    assert (run_dir / "results.md").read_text().splitlines()[1].split()[0] == "0"
    mt = run_dir / "seed0" / "mean_teacher"
    monitor = [r for r in read_metrics(mt) if "val/teacher/top1" in r]
    assert monitor and monitor[-1]["val/count"] == 500  # the monitor split, evaluated at the end
    run_python(["-m", "mtdist", "report", str(mt)], timeout=300)
    with Image.open(mt / "report" / "accuracy.png") as png:
        assert png.size[0] > 200 and png.getextrema() != ((255, 255),) * len(png.getbands())

    # A second demo in the same folder resumes each finished arm (only re-tested) and says so.
    again = run_python(["-m", "mtdist", "demo", *args])
    for arm in ("supervised", "mean_teacher"):
        assert f"seed 0 {arm}" in again.stdout and f"{mt.parent / arm / 'checkpoints'}" in again.stdout
    assert again.stdout.count(f"delete {run_dir} to train from scratch") == 2
    assert json.loads((run_dir / "results.json").read_text())["0"] == results
