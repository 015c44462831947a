"""Values derived from the config and the world size: batches, the scaled recipe, steps, the DeepSpeed JSON.

Pure functions of (config, world size, dataset sizes); never written back into the config. The recipe
(optim.lr, mean_teacher.ema_decay) is stated for data.reference_batch_size; a run at another global
batch B trains at k = B / reference with the rules of mtdist.schedules (SCALE.md has the sources).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mtdist.config import Config, ConfigError
from mtdist.schedules import (
    ema_time_constant_images,
    lr_rule_for,
    lr_scale,
    scaled_ema_decay,
    warmup_start_scale,
)

LR_RULE_SOURCES = {
    "linear": "linear: optim.lr x k (Goyal et al. 2017, arXiv 1706.02677)",
    "sqrt": "square root: optim.lr x sqrt(k) (Malladi et al. 2022, SDEs of adaptive methods)",
    "none": "none: optim.lr as configured (optim.lr_scaling=none)",
}


@dataclass(frozen=True)
class Scaling:
    """The recipe at this run's global batch: k = batch / reference and what follows from it."""

    reference_batch_size: int
    k: float
    lr_rule: str  # linear | sqrt | none (optim.lr_scaling, 'auto' resolved by the optimizer)
    lr: float  # peak lr of this run
    warmup_start_lr: float
    ema_rule: str  # power | none (mean_teacher.ema_decay_scaling)
    ema_decay: float  # the teacher's decay cap of this run; its warm start counts steps of k x reference


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
    batch_size: int = 0  # global images per optimizer step, labeled + unlabeled (all ranks, accumulation)
    labeled_batch_size: int = 0  # of which labeled
    scaling: Scaling | None = None

    def epoch(self, step: int) -> float:
        """Fractional epoch at optimizer step `step` (0 before the first update)."""
        return step / self.steps_per_epoch


def global_batches(cfg: Config, world_size: int) -> tuple[int, int]:
    """(images, labeled images) per optimizer step over all ranks: data.batch_size_per_gpu x ranks x
    accumulation in the configured labeled share when it is set, else data.batch_size as configured."""
    d = cfg.data
    if not d.batch_size_per_gpu:
        return d.batch_size, d.labeled_batch_size
    batch = d.batch_size_per_gpu * world_size * cfg.deepspeed.grad_accum_steps
    return batch, batch * d.labeled_batch_size // d.batch_size  # whole: validate() checked the share


def splits(batch: int, labeled: int, world_size: int, accum: int) -> bool:
    parts = world_size * accum
    return batch % parts == 0 and labeled % parts == 0


def nearest_world_sizes(batch: int, labeled: int, world_size: int, accum: int) -> list[int]:
    """The closest world sizes below and above `world_size` that split both streams' batches."""
    below = next((n for n in range(world_size - 1, 0, -1) if splits(batch, labeled, n, accum)), None)
    above = next(
        (n for n in range(world_size + 1, batch // accum + 1) if splits(batch, labeled, n, accum)), None
    )
    return [n for n in (below, above) if n is not None]


def check_world_size(batch: int, labeled: int, world_size: int, accum: int) -> None:
    """Refuse, in one line, a world size that cannot split a stream's batch; name the nearest that can."""
    if splits(batch, labeled, world_size, accum):
        return
    parts = world_size * accum
    key, total = ("data.batch_size", batch) if batch % parts else ("data.labeled_batch_size", labeled)
    near = nearest_world_sizes(batch, labeled, world_size, accum)
    works = f"world sizes that work nearest {world_size}: {' and '.join(map(str, near))}"
    if not near:
        works = f"no world size works with {accum} accumulation steps"
    share = batch // math.gcd(batch, labeled)  # the smallest per-GPU batch that keeps the labeled share
    raise ConfigError(
        f"{key}: {total} does not split over {world_size} ranks x {accum} accumulation steps "
        f"({batch} images per step = {labeled} labeled + {batch - labeled} unlabeled); {works}; "
        f"or set data.batch_size_per_gpu (a multiple of {share}) to run on any world size"
    )


def steps_per_epoch(
    cfg: Config, batch: int, labeled_batch: int, labeled_size: int, unlabeled_size: int
) -> int:
    """An epoch is one pass over the unlabeled set (the paper); supervised-only: over the labeled set.
    `batch`, `labeled_batch`: the global batches (global_batches)."""
    unlabeled_batch = batch - labeled_batch
    if cfg.mean_teacher.enabled and unlabeled_batch > 0:
        size, batch, key = unlabeled_size, unlabeled_batch, "data.unlabeled_size"
    else:
        size, batch, key = labeled_size, labeled_batch, "data.labeled_size"
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


def batch_scaling(cfg: Config, batch: int) -> Scaling:
    """k = batch / reference and the recipe at it: lr by the optimizer's rule, EMA decay^k; schedules
    in epochs stay as they are (an epoch simply has fewer steps)."""
    reference = cfg.data.reference_batch_size or cfg.data.batch_size
    k = batch / reference
    rule = lr_rule_for(cfg.optim.name, cfg.optim.lr_scaling)
    factor = lr_scale(k, rule)
    mt = cfg.mean_teacher
    decay = scaled_ema_decay(mt.ema_decay, k) if mt.ema_decay_scaling == "power" else mt.ema_decay
    return Scaling(
        reference_batch_size=reference,
        k=k,
        lr_rule=rule,
        lr=cfg.optim.lr * factor,
        warmup_start_lr=cfg.schedule.warmup_start_lr * warmup_start_scale(factor),
        ema_rule=mt.ema_decay_scaling,
        ema_decay=decay,
    )


def check_sync_bn_group(cfg: Config, world_size: int) -> None:
    size = cfg.model.sync_bn_group_size
    if cfg.model.sync_bn and size and world_size % size:
        divisors = [n for n in range(1, world_size + 1) if world_size % n == 0]
        raise ConfigError(
            f"model.sync_bn_group_size: {size} does not divide {world_size} ranks into equal groups; use one "
            f"of {', '.join(map(str, divisors))} or 0 (all ranks)"
        )


def make_plan(cfg: Config, world_size: int, labeled_size: int, unlabeled_size: int) -> Plan:
    accum = cfg.deepspeed.grad_accum_steps
    batch, labeled_batch = global_batches(cfg, world_size)
    check_world_size(batch, labeled_batch, world_size, accum)
    check_sync_bn_group(cfg, world_size)
    micro, labeled = batch // (world_size * accum), labeled_batch // (world_size * accum)
    spe = steps_per_epoch(cfg, batch, labeled_batch, labeled_size, unlabeled_size)
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
        deepspeed_config=deepspeed_config(cfg, micro, batch),
        batch_size=batch,
        labeled_batch_size=labeled_batch,
        scaling=batch_scaling(cfg, batch),
    )


def scaling_report(cfg: Config, plan: Plan) -> dict[str, dict[str, Any]]:
    """k and every value derived from it, each with the rule that gave it (for --dry-run and mtdist plan)."""
    return _batch_rows(cfg, plan) | _recipe_rows(cfg, plan) | _step_rows(cfg, plan)


def _row(value: Any, rule: str) -> dict[str, Any]:
    return {"value": value, "rule": rule}


def _batch_rows(cfg: Config, plan: Plan) -> dict[str, dict[str, Any]]:
    d, accum, sc = cfg.data, cfg.deepspeed.grad_accum_steps, _scaling(plan)
    ranks = f"{plan.world_size} ranks x {accum} accumulation"
    by = (
        f"data.batch_size_per_gpu {d.batch_size_per_gpu} x {ranks}"
        if d.batch_size_per_gpu
        else "data.batch_size"
    )
    return {
        "batch_size": _row(plan.batch_size, by),
        "labeled_batch_size": _row(
            plan.labeled_batch_size,
            f"share data.labeled_batch_size / data.batch_size = {d.labeled_batch_size} / {d.batch_size}",
        ),
        "per_gpu": _row(
            f"{plan.labeled_per_gpu} labeled + {plan.unlabeled_per_gpu} unlabeled",
            f"{plan.batch_size} / ({ranks})",
        ),
        "k": _row(sc.k, f"batch {plan.batch_size} / data.reference_batch_size {sc.reference_batch_size}"),
    }


def _recipe_rows(cfg: Config, plan: Plan) -> dict[str, dict[str, Any]]:
    sc, decay = _scaling(plan), cfg.mean_teacher.ema_decay
    ema_rule = (
        f"power: mean_teacher.ema_decay {decay} ^ k (Busbridge et al., NeurIPS 2023)"
        if sc.ema_rule == "power"
        else "none: mean_teacher.ema_decay as configured (mean_teacher.ema_decay_scaling=none)"
    )
    reference_tau = round(ema_time_constant_images(decay, sc.reference_batch_size))
    return {
        "lr": _row(sc.lr, LR_RULE_SOURCES[sc.lr_rule]),
        "warmup_start_lr": _row(
            sc.warmup_start_lr,
            "schedule.warmup_start_lr kept for k >= 1 (Goyal et al. 2017 sec. 2.2: a gradual warm-up from "
            "the small-batch rate), scaled with the peak for k < 1",
        ),
        "ema_decay": _row(sc.ema_decay, ema_rule),
        "ema_warm_start": _row(
            f"min(1 - 1/(t + {1 / sc.k:.6g}), {sc.ema_decay:.6g})",
            "min(1 - 1/(t + 1/k), ema_decay): the paper's min(1 - 1/(t + 1), decay) with t counted in steps "
            "of the reference batch: the teacher's time constant in images is the reference's at every step",
        ),
        "ema_time_constant_images": _row(
            round(ema_time_constant_images(sc.ema_decay, plan.batch_size)),
            f"batch / (1 - ema_decay) once warm; at the reference {reference_tau}",
        ),
    }


def _step_rows(cfg: Config, plan: Plan) -> dict[str, dict[str, Any]]:
    s, rampup = cfg.schedule, cfg.mean_teacher.consistency_rampup_epochs
    epochs = (
        f"lr warm-up {s.warmup_epochs:g}, consistency ramp-up {rampup:g}, ramp-down {s.rampdown_epochs:g}"
    )
    return {
        "schedules_in_epochs": _row(
            f"{epochs}, stop at {s.epochs:g}", "unchanged by k: an epoch has fewer steps at a larger batch"
        ),
        "steps_per_epoch": _row(plan.steps_per_epoch, "images of the epoch's set // its images per step"),
        "total_steps": _row(
            plan.total_steps, "ceil(schedule.epochs x steps_per_epoch), or schedule.max_steps"
        ),
    }


def _scaling(plan: Plan) -> Scaling:
    if plan.scaling is None:
        raise ValueError("plan has no scaling: build it with make_plan")
    return plan.scaling


def _elastic(cfg: Config) -> dict[str, Any]:
    """data.order=global with ZeRO 1/2: optimizer state saved merged per group (DeepSpeed's elastic
    layout), so that a resume on another number of ranks can re-split it (engine.load_checkpoint)."""
    return {"elastic_checkpoint": True} if cfg.data.order == "global" and cfg.deepspeed.zero_stage else {}


def deepspeed_config(cfg: Config, micro_batch_per_gpu: int, batch_size: int = 0) -> dict[str, Any]:
    """The DeepSpeed JSON. Mixed precision is torch autocast: fp32 weights, BN in fp32 (convnets need it).
    `batch_size`: the global batch (global_batches); 0 = data.batch_size."""
    ds = cfg.deepspeed
    out: dict[str, Any] = {
        "train_batch_size": batch_size or cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_per_gpu,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "zero_optimization": {"stage": ds.zero_stage} | _elastic(cfg),
        # our SGD/AdamW are client optimizers; DeepSpeed tests ZeRO only with its own
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.bf16 or ds.fp16:
        # Gradients are all-reduced in fp32 at every ZeRO stage: DeepSpeed's default list of "lower
        # precision safe" modules (Linear, Conv) has ZeRO 1/2 reduce theirs in the autocast dtype, 8 bits
        # of mantissa summed over up to 128 ranks, where stage 0 reduces in fp32.
        dtype = "bfloat16" if ds.bf16 else "float16"
        out["torch_autocast"] = {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}
    # always explicit: DeepSpeed's default is 1.0, which clipped every run whose config said "off"
    out["gradient_clipping"] = cfg.optim.grad_clip
    return out
