"""`mtdist plan`: the flagship's arithmetic checked exactly, the read rate from real shards, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_python, shard_overrides

from mtdist.config import ConfigError, load_config
from mtdist.preflight import DEFAULT_DECODE_PER_CORE, DEFAULT_SAMPLE_BYTES, estimate, mean_sample_bytes

FLAGSHIP = ROOT / "configs" / "imagenet_resnet152_10pct.yaml"


def test_flagship_arithmetic_exact():
    """5,765 steps/epoch x 60 epochs; 400 student images a step; 8 GPUs at 700 images/s each."""
    est = estimate(load_config(FLAGSHIP), images_per_s_per_gpu=700.0)
    assert est.steps_per_epoch == 5765 and est.total_steps == 345_900 == 5765 * 60
    assert est.student_images == 345_900 * 400 == 138_360_000
    assert est.world_size == 8 and est.gpus_per_node == 8
    assert est.hours == pytest.approx(138_360_000 / (700.0 * 8) / 3600, rel=1e-12)
    assert est.hours == pytest.approx(6.863095238095238, rel=1e-12)
    assert est.gpu_hours == pytest.approx(est.hours * 8, rel=1e-12)
    # no shards on this machine: the documented ImageNet JPEG default, 8 GPUs' worth per node
    assert est.sample_bytes == DEFAULT_SAMPLE_BYTES
    assert est.bytes_per_s_per_node == pytest.approx(700.0 * 8 * DEFAULT_SAMPLE_BYTES)
    assert est.cores_per_gpu == pytest.approx(700.0 / DEFAULT_DECODE_PER_CORE)


def test_flagship_on_five_nodes_and_user_rates():
    """More GPUs shorten the wall time, not the GPU-hours; the user's decode rate and sample size win."""
    cfg = load_config(FLAGSHIP, ["cluster.nodes=5"])  # 40 GPUs x 50 images: 2,000 a step, 1,153 steps
    est = estimate(cfg, 500.0, decode_per_core=250.0, default_sample_bytes=120_000)
    assert est.world_size == 40 and est.gpus_per_node == 8
    assert est.hours == pytest.approx(138_360_000 / (500.0 * 40) / 3600, rel=1e-12)
    assert est.gpu_hours == pytest.approx(138_360_000 / 500.0 / 3600, rel=1e-12)
    assert est.bytes_per_s_per_node == pytest.approx(500.0 * 8 * 120_000)
    assert est.cores_per_gpu == pytest.approx(2.0)


def test_sample_size_from_real_shards(mnist_shards):
    """With the shards on disk the mean sample size is their bytes over their samples."""
    index = Path(mnist_shards["labeled"])
    entries = json.loads(index.read_text())["shards"]
    expected = sum((index.parent / e["name"]).stat().st_size for e in entries) / sum(
        e["num_samples"] for e in entries
    )
    assert mean_sample_bytes(str(index)) == pytest.approx(expected)
    assert 500 < expected < 5000  # 28x28 PNG digits in tar records, not the ImageNet default
    cfg = load_config(TINY, shard_overrides(mnist_shards))
    est = estimate(cfg, 100.0, world=2)
    assert est.sample_bytes < 5000 and "shard index" in est.sample_bytes_source
    assert est.total_steps == 30 * 2  # 240 unlabeled / 8 per step = 30 steps per epoch, 2 epochs


def test_index_byte_counts_are_used(tmp_path):
    (tmp_path / "x.index.json").write_text(
        json.dumps(
            {
                "shards": [{"name": "a.tar", "num_samples": 10, "bytes": 1_000_000}],
                "num_samples": 10,
                "num_classes": 2,
            }
        )
    )
    assert mean_sample_bytes(str(tmp_path / "x.index.json")) == 100_000
    assert mean_sample_bytes(str(tmp_path / "absent.index.json")) is None


def test_bad_rates_are_refused_by_name():
    cfg = load_config(FLAGSHIP)
    with pytest.raises(ConfigError, match="--images-per-s"):
        estimate(cfg, 0.0)
    with pytest.raises(ConfigError, match="--decode-per-core"):
        estimate(cfg, 100.0, decode_per_core=-1)


def test_cli_plan_prints_the_figures():
    proc = run_python(["-m", "mtdist", "plan", "--config", str(FLAGSHIP), "--images-per-s", "700"])
    out = proc.stdout
    assert "345,900" in out and "138,360,000" in out
    assert "6.86 h" in out and "54.9" in out  # GPU-hours = 6.863 h x 8
    assert "616.0 MB/s" in out  # 700 x 8 x 110 KB
    assert "0.91 per GPU" in out and "assumed: benchmarks/data.py" in out  # 700 / 770, the benchmark's figure


@pytest.mark.slow
def test_cli_plan_measures_a_warm_up(mnist_shards):
    """--measure-steps: real synthetic steps of one rank of the planned run (DeepSpeed, gloo)."""
    args = ["--config", str(TINY), "--measure-steps", "2", *shard_overrides(mnist_shards)]
    proc = run_python(["-m", "mtdist", "plan", *args], timeout=300)
    assert "measured: 2 steps on cpu" in proc.stdout
    rate = float(proc.stdout.split("throughput")[1].split()[0].replace(",", ""))
    assert rate > 0
