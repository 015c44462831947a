"""Values derived from the config and the world size: per-GPU batches, steps, the DeepSpeed JSON.

Pure functions of (config, world size, dataset sizes); never written back into the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mtdist.config import Config, ConfigError


@dataclass(frozen=True)
class Plan:
    world_size: int
    micro_batch_per_gpu: int  # images per forward on one rank, labeled + unlabeled
    labeled_per_gpu: int
    unlabeled_per_gpu: int
    labeled_size: int
    unlabeled_size: int
    steps_per_epoch: int  # optimizer steps per pass over the unlabeled set (labeled set if supervised-only)
    total_steps: int  # optimizer steps this run trains for
    deepspeed_config: dict[str, Any]

    def epoch(self, step: int) -> float:
        """Fractional epoch at optimizer step `step` (0 before the first update)."""
        return step / self.steps_per_epoch


def _per_gpu(total: int, world_size: int, accum: int, key: str) -> int:
    parts = world_size * accum
    if total % parts:
        raise ConfigError(
            f"{key}: {total} does not split over {world_size} ranks x {accum} accumulation steps; "
            f"use a multiple of {parts}"
        )
    return total // parts


def steps_per_epoch(cfg: Config, labeled_size: int, unlabeled_size: int) -> int:
    """An epoch is one pass over the unlabeled set (the paper); supervised-only: over the labeled set."""
    d = cfg.data
    unlabeled_batch = d.batch_size - d.labeled_batch_size
    if cfg.mean_teacher.enabled and unlabeled_batch > 0:
        size, batch, key = unlabeled_size, unlabeled_batch, "data.unlabeled_size"
    else:
        size, batch, key = labeled_size, d.labeled_batch_size, "data.labeled_size"
    if size < batch:
        raise ConfigError(f"{key}: {size} images is less than one batch ({batch}); check the shards")
    return size // batch


def dataset_size(spec: str, declared: int, key: str) -> int:
    """The declared size, else the sample count of the shard index."""
    if declared:
        return declared
    if spec.endswith(".index.json"):
        from mtdist.data import read_index

        return int(read_index(spec)["num_samples"])
    raise ConfigError(
        f"{key}: 0 (count from the index) but its shards '{spec}' are not an *.index.json; "
        "set the size or point to the index file written with the shards"
    )


def dataset_sizes(cfg: Config) -> tuple[int, int]:
    """(labeled, unlabeled) image counts; no unlabeled set for a supervised-only run."""
    d = cfg.data
    labeled = dataset_size(d.labeled, d.labeled_size, "data.labeled_size")
    if not cfg.mean_teacher.enabled:
        return labeled, 0
    return labeled, dataset_size(d.unlabeled, d.unlabeled_size, "data.unlabeled_size")


def make_plan(cfg: Config, world_size: int, labeled_size: int, unlabeled_size: int) -> Plan:
    d, accum = cfg.data, cfg.deepspeed.grad_accum_steps
    micro = _per_gpu(d.batch_size, world_size, accum, "data.batch_size")
    labeled = _per_gpu(d.labeled_batch_size, world_size, accum, "data.labeled_batch_size")
    spe = steps_per_epoch(cfg, labeled_size, unlabeled_size)
    total = math.ceil(cfg.schedule.epochs * spe)
    if cfg.schedule.max_steps:
        total = min(total, cfg.schedule.max_steps)
    return Plan(
        world_size=world_size,
        micro_batch_per_gpu=micro,
        labeled_per_gpu=labeled,
        unlabeled_per_gpu=micro - labeled,
        labeled_size=labeled_size,
        unlabeled_size=unlabeled_size,
        steps_per_epoch=spe,
        total_steps=total,
        deepspeed_config=deepspeed_config(cfg, micro),
    )


def deepspeed_config(cfg: Config, micro_batch_per_gpu: int) -> dict[str, Any]:
    """The DeepSpeed JSON. Mixed precision is torch autocast: fp32 weights, BN in fp32 (convnets need it)."""
    ds = cfg.deepspeed
    out: dict[str, Any] = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_per_gpu,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "zero_optimization": {"stage": ds.zero_stage},
        # our SGD/AdamW are client optimizers; DeepSpeed tests ZeRO only with its own
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.bf16 or ds.fp16:
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if ds.bf16 else "float16"}
    # always explicit: DeepSpeed's default is 1.0, which clipped every run whose config said "off"
    out["gradient_clipping"] = cfg.optim.grad_clip
    return out
