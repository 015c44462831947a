"""`mtdist plan`: what the configured run will cost, before it is submitted.

From a throughput per GPU (given, or measured here with a few synthetic steps of the real model
at the real per-GPU batch) it derives the wall time and GPU-hours of the run, the bytes each node
must read per second, and the CPU cores per GPU that decoding needs (at a decode rate given, measured
here on the run's own shards, or the benchmark's figure, each said as such). It prints the nodes x GPUs
and the recipe scaled to the run's batch (mtdist.plan). Evaluation, checkpoints, start-up and the
gradient all-reduce are not counted: the figures are a floor for the training loop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtdist.config import Config, ConfigError
from mtdist.plan import Plan, dataset_sizes, make_plan, scaling_report

if TYPE_CHECKING:  # torch loads only for a measurement: `mtdist plan --images-per-s` stays quick
    import torch

# Mean ImageNet-1k train JPEG: the ILSVRC-2012 train set is ~140 GB for 1,281,167 images.
DEFAULT_SAMPLE_BYTES = 110_000
# Two-view samples per second per CPU core that a loader worker turns out (tar read, one decode, each
# view one warp to 224, packed as uint8; colour jitter and normalisation run on the GPU). An assumption
# for any other machine: benchmarks/data.py measured this figure for mtdist's fused worker half on one
# core of the development VM (AMD EPYC, KVM, 2 vCPUs; ImageNet-like JPEGs of 113 KB, 0.22 MP): 802,
# 761 and 772 in three runs of session 5, see benchmarks/RESULTS.md. It was 690 before the decode was
# kept in the cache and the reader left tarfile (session 4), 168 before the fused views (Intel Xeon
# 2.5 GHz VM), and before that 600, a one-view estimate that left rotation out.
DEFAULT_DECODE_PER_CORE = 770.0
DEFAULT_DECODE_SOURCE = (
    "assumed: benchmarks/data.py's mtdist worker half on one AMD EPYC VM core (benchmarks/RESULTS.md); "
    "--measure-decode N measures it here on the run's shards"
)


@dataclass(frozen=True)
class Estimate:
    world_size: int
    nodes: int
    gpus_per_node: int  # on the fullest node (the last one may have fewer)
    total_steps: int
    steps_per_epoch: int
    student_images: int  # images through the student over the run (the teacher sees as many)
    images_per_s_per_gpu: float
    hours: float
    gpu_hours: float
    sample_bytes: float
    sample_bytes_source: str
    bytes_per_s_per_node: float
    decode_per_core: float
    cores_per_gpu: float
    cpus_per_task: int
    decode_source: str = DEFAULT_DECODE_SOURCE
    scaling: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # plan.scaling_report


def world_size(cfg: Config, override: int = 0) -> int:
    """GPUs (ranks) of the run: --world-size, else cluster.nodes x GPUs (or tasks) per node."""
    c = cfg.cluster
    return override or c.nodes * (c.tasks_per_node or c.gpus_per_node)


def node_layout(cfg: Config, world: int) -> tuple[int, int]:
    """(nodes, GPUs on the fullest node) for `world` ranks on nodes of cluster.gpus_per_node GPUs (or
    tasks_per_node): 64 on 8-GPU nodes are 8 x 8; fewer ranks than a node holds are one node."""
    per_node = cfg.cluster.tasks_per_node or cfg.cluster.gpus_per_node
    return math.ceil(world / per_node), min(world, per_node)


def mean_sample_bytes(spec: str) -> float | None:
    """Mean bytes per sample of a shard index: its own "bytes" counts, else the sizes of its shard files
    on disk. None when the spec is not a readable local index (the caller falls back to a default)."""
    if not spec.endswith(".index.json") or not Path(spec).is_file():
        return None
    from mtdist.data import read_index

    entries = read_index(spec)["shards"]
    if entries and all("bytes" in e for e in entries):
        return sum(e["bytes"] for e in entries) / max(sum(e["num_samples"] for e in entries), 1)
    base = Path(spec).parent
    present = [e for e in entries if (base / e["name"]).is_file()]
    samples = sum(e["num_samples"] for e in present)
    if not samples:
        return None
    return sum((base / e["name"]).stat().st_size for e in present) / samples


def sample_bytes(cfg: Config, default: float = DEFAULT_SAMPLE_BYTES) -> tuple[float, str]:
    """Mean bytes read per student image, weighting the labeled and unlabeled streams by their share
    of the batch; (bytes, where the figure came from)."""
    d = cfg.data
    parts = [(d.labeled, d.labeled_batch_size)]
    if cfg.mean_teacher.enabled:
        parts.append((d.unlabeled, d.batch_size - d.labeled_batch_size))
    total, sources = 0.0, []
    for spec, count in parts:
        measured = mean_sample_bytes(spec)
        total += (measured if measured is not None else default) * count
        sources.append(f"{spec or '(none)'}: " + ("shard index" if measured is not None else "default"))
    batch = sum(count for _, count in parts)
    return total / batch, "; ".join(sources)


def estimate(
    cfg: Config,
    images_per_s_per_gpu: float,
    world: int = 0,
    decode_per_core: float = DEFAULT_DECODE_PER_CORE,
    default_sample_bytes: float = DEFAULT_SAMPLE_BYTES,
    decode_source: str = DEFAULT_DECODE_SOURCE,
) -> Estimate:
    """The run's cost at `images_per_s_per_gpu` student images per second on each GPU."""
    if images_per_s_per_gpu <= 0:
        raise ConfigError(f"--images-per-s: {images_per_s_per_gpu} must be > 0 (student images/s per GPU)")
    if decode_per_core <= 0:
        raise ConfigError(f"--decode-per-core: {decode_per_core} must be > 0 (two-view images/s per core)")
    n = world_size(cfg, world)
    plan = make_plan(cfg, n, *dataset_sizes(cfg))
    images = plan.total_steps * plan.batch_size
    hours = images / (images_per_s_per_gpu * n) / 3600
    per_sample, source = sample_bytes(cfg, default_sample_bytes)
    nodes, gpus_per_node = node_layout(cfg, n)
    return Estimate(
        world_size=n,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        student_images=images,
        images_per_s_per_gpu=images_per_s_per_gpu,
        hours=hours,
        gpu_hours=hours * n,
        sample_bytes=per_sample,
        sample_bytes_source=source,
        bytes_per_s_per_node=images_per_s_per_gpu * gpus_per_node * per_sample,
        decode_per_core=decode_per_core,
        cores_per_gpu=images_per_s_per_gpu / decode_per_core,
        cpus_per_task=cfg.cluster.cpus_per_task,
        decode_source=decode_source,
        scaling=scaling_report(cfg, plan),
    )


def per_gpu_config(cfg: Config, plan: Plan) -> Config:
    """The config one rank of the planned run trains: its micro-batch, no accumulation."""
    data = dataclasses.replace(
        cfg.data, batch_size=plan.micro_batch_per_gpu, labeled_batch_size=plan.labeled_per_gpu
    )
    ds = dataclasses.replace(cfg.deepspeed, grad_accum_steps=1)
    return dataclasses.replace(cfg, data=data, deepspeed=ds)


def synthetic_batch(cfg: Config, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Two normalized views and labels (-1 = unlabeled, as the loaders mark them) of the configured shape."""
    import torch

    from mtdist.dist import nhwc_inputs

    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    shape = (d.batch_size, d.channels, d.image_size, d.image_size)
    labels = torch.randint(0, d.num_classes, (d.batch_size,), generator=g)
    labels[d.labeled_batch_size :] = -1
    views = [torch.randn(shape, generator=g).to(device) for _ in range(2)]
    if nhwc_inputs(cfg.model.channels_last, device):
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views[0], views[1], labels.to(device)


class SyntheticStep:
    """One optimizer step of the training loop (mtdist.train's models, loss weights and train_step)
    on a fixed synthetic batch: the data path is left out, the rest is the real step."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from mtdist.train import Window, build_models

        self.cfg = cfg
        self.plan = make_plan(cfg, 1, *_sizes_or_one_batch(cfg))
        self.engine, self.teacher = build_models(cfg, self.plan, device)
        if self.teacher is not None:
            self.teacher.train()
        self.batch = synthetic_batch(cfg, device)
        self.window = Window()

    def __call__(self, step: int) -> None:
        from mtdist.step import train_step
        from mtdist.train import loss_weights

        weights = loss_weights(self.cfg, self.plan.epoch(step))
        terms, _ = train_step(self.engine, self.teacher, self.batch, weights, step)
        self.window.add(terms)


def _sizes_or_one_batch(cfg: Config) -> tuple[int, int]:
    """Declared dataset sizes; a synthetic run needs only enough for one batch when none are declared."""
    d = cfg.data
    return max(d.labeled_size, d.batch_size), max(d.unlabeled_size, d.batch_size)


def init_single_process() -> torch.device:
    """A process group of one (nccl on CUDA, gloo on CPU), as `mtdist train` makes in one process."""
    import torch  # noqa: F401  (before DeepSpeed)

    from mtdist.dist import dist_env_from_environ, init_process_group
    from mtdist.engine import init_distributed
    from mtdist.train import set_backend_flags

    device = init_process_group(dist_env_from_environ())
    init_distributed("nccl" if device.type == "cuda" else "gloo")
    set_backend_flags(device)
    return device


def measure_images_per_s(cfg: Config, world: int, steps: int, warmup_steps: int = 3) -> tuple[float, str]:
    """Student images/s of one rank of the planned run, timed over `steps` synthetic steps here."""
    import torch

    if steps < 1:
        raise ConfigError(f"--measure-steps: {steps} must be >= 1")
    device = init_single_process()
    plan = make_plan(cfg, world_size(cfg, world), *dataset_sizes(cfg))
    one_rank = per_gpu_config(cfg, plan)
    step = SyntheticStep(one_rank, device)
    for i in range(warmup_steps):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(warmup_steps, warmup_steps + steps):
        step(i)
    _sync(device)
    seconds = time.perf_counter() - start
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    return one_rank.data.batch_size * steps / seconds, f"measured: {steps} steps on {where}, synthetic data"


def measure_decode_per_core(cfg: Config, samples: int, warmup: int = 5) -> tuple[float, str]:
    """Two-view samples per second that one core of this machine turns out from the run's own shards, as a
    loader worker does (the train transform's worker half: tar read, decode, both views), timed in this
    process's CPU seconds with one thread after `warmup` samples (file opening, lazy imports)."""
    import torch

    from mtdist import data as mtdata
    from mtdist.dist import DistEnv
    from mtdist.inputs import make_transforms, shard_urls

    if samples < 1:
        raise ConfigError(f"--measure-decode: {samples} must be >= 1 (samples to decode)")
    key = "unlabeled" if cfg.mean_teacher.enabled else "labeled"
    one_process = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="", master_port=0)
    train_tf, _ = make_transforms(cfg, one_process)
    worker_half = train_tf.prepare if getattr(train_tf, "batched", False) else train_tf
    stream = mtdata.ShardStream(
        shard_urls(cfg, key), rank=0, world_size=1, seed=cfg.seed, transform=worker_half,
        channels=cfg.data.channels, views=2, labeled=key == "labeled", infinite=True,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples_iter = iter(stream)
        for _ in range(warmup):
            next(samples_iter)
        start = time.process_time()
        for _ in range(samples):
            next(samples_iter)
        seconds = max(time.process_time() - start, 1e-9)
    finally:
        torch.set_num_threads(threads)
    where = f"{samples} samples of data.{key} ({cfg.data.augment} worker half, 1 thread, CPU time)"
    return samples / seconds, f"measured here: {where}"


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layout(est: Estimate) -> str:
    last = est.world_size - (est.nodes - 1) * est.gpus_per_node
    uneven = f", the last node {last}" if last != est.gpus_per_node else ""
    nodes = f"{est.nodes} node{'s' if est.nodes > 1 else ''}"
    return f"{est.world_size} = {nodes} x {est.gpus_per_node} GPUs{uneven}"


def _recipe_lines(est: Estimate) -> list[str]:
    """The batch and the recipe at it (k, lr, EMA decay), each with its rule, from plan.scaling_report."""
    sc = est.scaling
    if not sc:
        return []
    value = {name: row["value"] for name, row in sc.items()}
    return [
        f"batch           {value['batch_size']:,} images per step ({value['per_gpu']} per GPU); "
        f"k = {value['k']:g} ({sc['k']['rule']})",
        f"lr              {value['lr']:g} peak, warm-up from {value['warmup_start_lr']:g} "
        f"({sc['lr']['rule']})",
        f"EMA decay       {value['ema_decay']:.6g} ({sc['ema_decay']['rule']}); warm start "
        f"{value['ema_warm_start']}; time constant {value['ema_time_constant_images']:,} images",
    ]


def report(est: Estimate, source: str) -> str:
    """Readable lines; each figure with its unit and where it came from."""
    enough = est.cpus_per_task >= est.cores_per_gpu
    lines = [
        f"throughput      {est.images_per_s_per_gpu:,.1f} student images/s per GPU ({source})",
        f"GPUs            {_layout(est)}",
        *_recipe_lines(est),
        f"steps           {est.total_steps:,} ({est.steps_per_epoch:,} per epoch)",
        f"student images  {est.student_images:,} (the teacher forwards as many)",
        f"wall time       {est.hours:,.2f} h = {est.hours / 24:,.2f} days (training loop only)",
        f"GPU-hours       {est.gpu_hours:,.1f}",
        f"read per node   {est.bytes_per_s_per_node / 1e6:,.1f} MB/s "
        f"({est.sample_bytes / 1e3:,.1f} KB per sample; {est.sample_bytes_source})",
        f"decode cores    {est.cores_per_gpu:,.2f} per GPU at {est.decode_per_core:,.0f} two-view "
        f"images/s per core ({est.decode_source}); cluster.cpus_per_task = {est.cpus_per_task}"
        + ("" if enough else "  <- too few: the GPUs will wait"),
    ]
    return "\n".join(lines)


def as_dict(est: Estimate) -> dict[str, Any]:
    return dataclasses.asdict(est)
