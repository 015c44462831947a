"""Config loading, overrides, validation errors, and the flagship recipe as printed by --dry-run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtdist.cli import dry_run
from mtdist.config import ConfigError, load_config
from mtdist.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
FLAGSHIP = ROOT / "configs" / "imagenet_resnet152_10pct.yaml"


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_overrides_are_typed_and_dotted():
    cfg = load_config(
        FLAGSHIP,
        [
            "optim.lr=0.1",
            "schedule.epochs=3",
            "optim.weight_decay=1e-4",
            "model.two_heads=false",
            "mean_teacher.logit_distance_cost=0",
        ],
    )
    assert cfg.optim.lr == 0.1 and cfg.schedule.epochs == 3.0 and cfg.optim.weight_decay == 1e-4
    assert cfg.model.two_heads is False


BAD = [
    (["data.batchsize=4"], "data.batchsize"),
    (["data.labeled_batch_size=500"], "data.labeled_batch_size"),
    (["mean_teacher.ema_decay=1.0"], "mean_teacher.ema_decay"),
    (["mean_teacher.ema_decay=-0.1"], "mean_teacher.ema_decay"),
    (["deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
    (["deepspeed.fp16=true"], "deepspeed.fp16"),
    (["optim.lr=fast"], "optim.lr"),
    (["optim.name=lamb"], "optim.name"),
    (["mean_teacher.consistency=l1"], "mean_teacher.consistency"),
    (["data.batch_size=0"], "data.batch_size"),
    (["schedule.rampdown_epochs=10"], "schedule.rampdown_epochs"),
    (["model.two_heads=false"], "mean_teacher.logit_distance_cost"),
    (["model.two_heads=3"], "model.two_heads"),
    (["data.labeled_batch_size=400"], "data.labeled_batch_size"),
    (["cluster.setup=module load x"], "cluster.setup"),
    (["nonsense=1"], "nonsense"),
    (["optim=1"], "optim"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD, ids=[b[1] + ":" + b[0][0] for b in BAD])
def test_bad_config_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(FLAGSHIP, overrides)
    message = str(err.value)
    assert "\n" not in message
    assert key in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_batch_that_does_not_split_over_ranks_names_the_key():
    """A fixed global batch (no data.batch_size_per_gpu) that 16 ranks cannot split: one line naming the
    key, the sizes and the nearest world sizes that work (tests/test_scaling.py has more)."""
    cfg = load_config(FLAGSHIP, ["data.batch_size_per_gpu=0"])
    with pytest.raises(ConfigError, match="data.labeled_batch_size: 200 does not split over 16 ranks") as err:
        make_plan(cfg, 16, 128000, 1153167)
    assert "nearest 16: 10 and 20" in str(err.value) and "\n" not in str(err.value)


def test_flagship_dry_run_prints_the_recipe():
    """`mtdist train --config <flagship> --dry-run` as a user runs it: every row of the paper's table."""
    out = subprocess.run(
        [sys.executable, "-m", "mtdist", "train", "--config", str(FLAGSHIP), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    doc = yaml.safe_load(out)
    c, d, ds = doc["config"], doc["derived"], doc["deepspeed_config"]
    assert (c["data"]["batch_size"], c["data"]["labeled_batch_size"], d["unlabeled_batch_size"]) == (
        400,
        200,
        200,
    )
    assert c["model"]["arch"] == "resnet152" and c["model"]["two_heads"] is True
    assert c["optim"] == c["optim"] | {
        "name": "sgd",
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-5,
        "lr": 0.25,
    }
    assert c["schedule"] == c["schedule"] | {
        "warmup_epochs": 2.0,
        "warmup_start_lr": 0.1,
        "rampdown_epochs": 75.0,
        "epochs": 60.0,
    }
    mt = c["mean_teacher"]
    assert (mt["consistency"], mt["consistency_weight"], mt["consistency_rampup_epochs"]) == ("kl", 10.0, 5.0)
    assert (mt["logit_distance_cost"], mt["ema_decay"]) == (0.01, 0.9997)
    assert (d["steps_per_epoch"], d["total_steps"]) == (5765, 345900)
    assert (d["world_size"], d["micro_batch_per_gpu"], d["labeled_per_gpu"]) == (8, 50, 25)
    assert ds["train_batch_size"] == 400 and ds["train_micro_batch_size_per_gpu"] == 50
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert ds["zero_optimization"] == {"stage": 0}


def test_dry_run_for_other_world_sizes():
    cfg = load_config(ROOT / "configs" / "imagenet_resnext152_10pct_paper.yaml")
    doc = yaml.safe_load(dry_run(cfg, 4))  # 50 per GPU: batch 200, half the recipe's
    assert doc["derived"]["micro_batch_per_gpu"] == 50 and doc["derived"]["batch_size"] == 200
    assert doc["scaling"]["k"]["value"] == 0.5 and doc["scaling"]["lr"]["value"] == 0.125
    fixed = yaml.safe_load(dry_run(load_config(ROOT / "configs" / "imagenet_resnext152_10pct_paper.yaml",
                                               ["data.batch_size_per_gpu=0"]), 4))  # fmt: skip
    assert fixed["derived"]["micro_batch_per_gpu"] == 100 and fixed["scaling"]["k"]["value"] == 1.0
    assert doc["config"]["model"]["arch"] == "resnext152_32x4d"


def test_cli_config_error_exit_code_and_single_line():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtdist",
            "train",
            "--config",
            str(FLAGSHIP),
            "deepspeed.zero_stage=3",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "deepspeed.zero_stage" in proc.stderr
