"""Benchmarks smoke: gpu_step.py runs end to end on CPU with tiny settings; the runner's ratio table.

No timing is asserted (speed goes in benchmarks/RESULTS.md); only that the figures come out.
"""

from __future__ import annotations

import re

from conftest import run_python

from benchmarks.run import data_ratios, ratio_table


def test_gpu_step_runs_on_cpu_with_tiny_settings():
    args = ["--device", "cpu", "--arch", "resnet18", "--size", "64", "--batch", "8", "--steps", "3"]
    proc = run_python(["-m", "benchmarks.gpu_step", *args], threads=2, timeout=300)
    out = proc.stdout
    # resnet18 at 64x64: (64/224)^2 of its 3.6 GFLOP at 224 (two heads of 1000 classes)
    gflop = float(re.search(r"forward ([\d.]+) GFLOP/image", out).group(1))
    assert 0.25 < gflop < 0.35
    for phase in ("Mean Teacher", "supervised"):
        found = re.search(rf"^\s*{phase}\s+([\d.]+) student images/s.*process max RSS", out, re.MULTILINE)
        assert found and float(found.group(1)) > 0, out
    ratio = float(re.search(r"MT / supervised \(student images/s\): ([\d.]+)", out).group(1))
    assert 0 < ratio < 1.5


def test_data_ratios_apply_the_goal_to_the_main_ratio_only():
    rows = data_ratios({"ratio": 2.5, "ratio_vs_pillow_hue": 3.0, "images": 300, "label": "x"})
    assert [(r["value"], r["met"]) for r in rows] == [(2.5, True), (3.0, None)]
    table = "\n".join(ratio_table(rows + [{"name": "(c) x", "value": 1.2, "goal": "<= 1.05", "met": False}]))
    assert "MISSED" in table and table.count("met") >= 1


def test_ema_benchmark_prints_every_figure_with_a_small_model():
    from benchmarks import ema

    res = ema.run("resnet18", rounds=1)
    lines = "\n".join(ema.report_lines(res))
    for label in (
        "fused teacher update",
        "authors' loop",
        "memory copy",
        "SGD step, fused",
        "SGD step, foreach",
    ):
        assert re.search(rf"{label}.*\d+\.\d\d ms", lines), lines
    assert [r["met"] is None for r in res["ratios"]] == [False, False, True]
    assert all(r["value"] > 0 for r in res["ratios"])


def test_data_benchmark_runs_each_pipeline_in_its_own_process_and_reports_the_goals():
    from benchmarks import data

    res = data.run(num_images=12, rounds=1, batch=4)
    assert all(res["images_per_cpu_s"][k] > 0 for k in (*data.PIPELINES, "device_half_cpu"))
    assert [r["goal"] for r in res["ratios"]] == [">= 0.7", ">= 3.5", ">= 3.5"]
    assert res["share_of_decode"] == res["ratios"][0]["value"] and res["ratio"] == res["ratios"][1]["value"]
    assert res["ratio_in_worker"] == res["ratios"][2]["value"] > 0  # both pipelines in a real loader worker
    assert all(res["in_worker_images_per_cpu_s"][k] > 0 for k in data.IN_WORKER)
    assert 0 <= res["fidelity"]["train_mean"] <= res["fidelity"]["train_p99"] + 1
    text = "\n".join(data.report_lines(res))
    assert "mtdist worker half / decode only" in text and "fidelity, fused vs reference views" in text
    assert "in a real loader worker" in text
