"""`mtdist report`: PNG plots of a real short run's metrics; missing metrics and files handled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, run_python, shard_overrides
from PIL import Image

from mtdist.report import PLOTS, load_series, write_report

CURVE_BLUE = (31, 119, 180)  # matplotlib's first line colour (C0)


def curve_pixels(path: Path) -> int:
    """Pixels drawn in the first line colour: > 0 means a curve (or its markers) is on the image."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(rgb - np.array(CURVE_BLUE)).sum(axis=2) < 40).sum())


@pytest.fixture(scope="module")
def short_run(mnist_shards, tmp_path_factory) -> Path:
    """10 optimizer steps of the tiny config in one real `mtdist train` process (DeepSpeed, gloo)."""
    run_dir = tmp_path_factory.mktemp("report_run")
    overrides = [
        *shard_overrides(mnist_shards),
        f"logging.run_dir={run_dir}",
        "schedule.max_steps=10",
        "logging.log_interval_steps=2",
        "logging.eval_interval_steps=5",
        "checkpoint.interval_steps=0",
    ]
    run_python(["-m", "mtdist", "train", "--config", str(TINY), *overrides])
    return run_dir


def test_report_of_a_real_run_draws_every_plot(short_run):
    lines = write_report(short_run)
    assert all(line.startswith("wrote") for line in lines), lines
    for plot in PLOTS:
        path = short_run / "report" / plot.file
        with Image.open(path) as img:
            img.verify()  # a valid PNG
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] >= 600 and img.size[1] >= 350
            gray = np.asarray(img.convert("L"))
        assert gray.std() > 10, f"{plot.file} looks blank"
        assert curve_pixels(path) > 50, f"{plot.file}: no curve drawn"


def test_report_reads_every_logged_series(short_run):
    series = load_series(short_run)
    steps, _ = series["train/loss_total"]
    assert steps == [2, 4, 6, 8, 10]
    for name in (
        "train/loss_class",
        "train/loss_consistency",
        "train/loss_logit_distance",
        "train/lr",
        "train/ema_decay",
    ):
        assert len(series[name][0]) == 5, name
    assert series["eval/teacher/top1"][0] == [5, 10]


def test_missing_metrics_skip_plots_with_a_note(tmp_path):
    rows = [{"step": s, "time": 0.0, "train/loss_class": 2.0 / s, "train/lr": 0.1 * s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = write_report(tmp_path)
    losses = next(line for line in lines if "losses.png" in line)
    assert (
        losses.startswith("wrote")
        and "not logged: train/loss_consistency, train/loss_logit_distance" in losses
    )
    skipped = [line for line in lines if line.startswith("skipped")]
    assert {line.split()[1].rstrip(":") for line in skipped} == {
        "consistency_weight.png",
        "ema_decay.png",
        "accuracy.png",
        "images_per_s.png",
    }
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["losses.png", "lr.png"]


def test_resumed_steps_keep_the_later_value_in_step_order(tmp_path):
    rows = [
        {"step": 2, "train/loss_total": 1.0},
        {"step": 4, "train/loss_total": 0.9},
        {"step": 2, "train/loss_total": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_series(tmp_path)["train/loss_total"] == ([2, 4], [0.5, 0.9])


def test_no_metrics_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.jsonl")):
        write_report(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "mtdist", "report", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2
    assert f"{tmp_path / 'metrics.jsonl'} does not exist" in proc.stderr


def test_truncated_metrics_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss_total": 1.0}\n{"step": 2, "train/lo')
    with pytest.raises(ValueError, match="line 2"):
        write_report(tmp_path)
