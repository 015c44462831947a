"""The run's data, from the config: train batches (labeled + unlabeled, resumable), eval batches, and
the checks that name a bad `data.*` key before training starts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mtdist import data as mtdata
from mtdist.config import Config, ConfigError
from mtdist.dist import DistEnv, nhwc_inputs, pick_device
from mtdist.plan import Plan


def build_train_batches(
    cfg: Config,
    env: DistEnv,
    plan: Plan,
    start_batch: int = 0,
    skipped: dict | None = None,
    progress: Callable[[str], None] | None = None,
    moved: bool = False,
) -> mtdata.TrainBatches:
    """The train batches from `start_batch` on; `skipped`: the corrupt samples dropped before it per
    stream and reader worker (the checkpoint's data position), so the resumed stream is exact (`moved`:
    inherited totals on another allocation, checkpoint.moved_position); `progress`: the watchdog's beat
    while the global order reads shards lacking an offset table."""
    d = cfg.data
    train_tf, _ = make_transforms(cfg, env)
    unlabeled = shard_urls(cfg, "unlabeled") if plan.unlabeled_per_gpu else []
    # per-shard counts from the index let a resume skip whole shards without reading them
    counts = mtdata.shard_sample_counts(d.labeled) | (
        mtdata.shard_sample_counts(d.unlabeled) if unlabeled else {}
    )
    return mtdata.build_train_loader(
        shard_urls(cfg, "labeled"),
        unlabeled,
        labeled_per_gpu=plan.labeled_per_gpu,
        unlabeled_per_gpu=plan.unlabeled_per_gpu,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.seed,
        transform=train_tf,
        channels=d.channels,
        num_workers=d.num_workers,
        shuffle_buffer=d.shuffle_buffer,
        cache_decoded=d.cache_decoded,
        pin_memory=torch.cuda.is_available(),
        start_batch=start_batch,
        sample_counts=counts,
        skipped=skipped,
        num_classes=d.num_classes,
        error_bound=error_bound(cfg),
        order=d.order,
        progress=progress,
        moved=moved,
    )


def error_bound(cfg: Config) -> mtdata.ErrorBound:
    return mtdata.ErrorBound(cfg.data.max_error_fraction, cfg.data.error_fraction_min_samples)


def make_transforms(cfg: Config, env: DistEnv) -> tuple[mtdata.Transform, mtdata.Transform]:
    """(train, eval) transforms. Batched ones finish each batch on this rank's device (ImageNet: the
    pinned uint8 batch is copied there and color-jittered and normalized, NHWC if model.channels_last)."""
    d, device = cfg.data, pick_device(env)
    where = {"device": device, "channels_last": nhwc_inputs(cfg.model.channels_last, device)}
    return mtdata.make_transforms(d.augment, d.image_size, d.channels, **where, **_augment_kwargs(cfg))


def _augment_kwargs(cfg: Config) -> dict[str, Any]:
    if cfg.data.augment == "digits":
        return {"shift_px": cfg.data.shift_px, "noise_std": cfg.data.noise_std}
    return {}


def eval_batches(
    cfg: Config, env: DistEnv, spec: str, progress: Callable[[str], None] | None = None
) -> mtdata.EvalBatches:
    d = cfg.data
    _, eval_tf = make_transforms(cfg, env)
    return mtdata.build_eval_loader(
        mtdata.resolve_shards(spec),
        batch_size=d.eval_batch_size_per_gpu,
        rank=env.rank,
        world_size=env.world_size,
        transform=eval_tf,
        channels=d.channels,
        num_workers=eval_workers(cfg),
        num_classes=d.num_classes,
        error_bound=error_bound(cfg),
        order=d.order,
        progress=progress,
    )


def eval_workers(cfg: Config) -> int:
    return min(cfg.data.num_workers, 2)


def check_eval_shards(cfg: Config, env: DistEnv) -> None:
    """Val and test shards exist and split over the eval readers: said now, not at the first evaluation."""
    for key in ("val", "test"):
        if getattr(cfg.data, key) and cfg.data.order == "reader":  # global: no shard per reader needed
            urls = shard_urls(cfg, key)
            try:
                mtdata.check_readers(len(urls), env.world_size, eval_workers(cfg))
            except ValueError as exc:
                raise ConfigError(f"data.{key}: {exc}") from None


def shard_urls(cfg: Config, key: str) -> list[str]:
    """The shards of `data.<key>`; a bad spec or a missing shard is a config error naming the key."""
    try:
        return mtdata.resolve_shards(getattr(cfg.data, key))
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"data.{key}: {exc}") from None


def check_shards_exist(cfg: Config) -> None:
    """Every local shard index and shard file the config names exists: the first thing a run checks, before
    the process group, DeepSpeed and the models start, naming the key and how to write the shards."""
    keys = ["labeled", *(["unlabeled"] if cfg.mean_teacher.enabled else []), "val", "test"]
    for key in keys:
        if getattr(cfg.data, key):
            shard_urls(cfg, key)
