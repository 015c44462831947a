"""One typed config tree: dataclass sections, YAML loading, dotted overrides, validation.

Unknown keys and wrong types are errors that name the key. Derived values (per-GPU batch,
steps per epoch, the DeepSpeed JSON) are functions of the config (see `mtdist.derived`),
never written back into it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key, what is allowed and what to do."""


@dataclass
class DataConfig:
    labeled: str = ""  # shard spec: an *.index.json, a brace pattern, a glob or a comma list
    unlabeled: str = ""
    val: str = ""
    test: str = ""  # optional held-out split, evaluated once at the end
    num_classes: int = 1000
    channels: int = 3
    image_size: int = 224
    augment: str = "imagenet"  # transform preset: imagenet | digits
    shift_px: int = 2  # digits preset: random translation
    noise_std: float = 0.15  # digits preset: additive Gaussian noise on the normalized image
    batch_size: int = 400  # global images per optimizer step, labeled + unlabeled
    labeled_batch_size: int = 200  # of which labeled
    # > 0: images per GPU per micro-step instead; the global batch is then batch_size_per_gpu x ranks x
    # deepspeed.grad_accum_steps, labeled in the share labeled_batch_size / batch_size (any world size)
    batch_size_per_gpu: int = 0
    # the global batch optim.lr and mean_teacher.ema_decay are stated for; a run at k = batch / reference
    # scales them (optim.lr_scaling, mean_teacher.ema_decay_scaling); 0 = batch_size
    reference_batch_size: int = 0
    labeled_size: int = 0  # labeled images; 0 = count them from the shard index
    unlabeled_size: int = 0  # unlabeled images (one epoch = one pass); 0 = from the index
    num_workers: int = 4  # loader worker processes per stream and rank
    # reader: each rank x loader worker reads whole shards of its own (needs a shard per reader; a resume
    # needs the same world size and workers); global: one order of the set cut into global steps, the same
    # on any allocation, any shard count (README: the global order). shuffle_buffer: the shuffle block
    order: str = "reader"
    shuffle_buffer: int = 1000
    cache_decoded: bool = False  # keep decoded images in memory after their first read (small data only)
    eval_batch_size_per_gpu: int = 100
    # Corrupt samples (undecodable image, bad label, lost in a broken tar) are skipped and counted; a
    # reader dropping more than this fraction of its samples stops the run, judged after it read
    # error_fraction_min_samples (so the first bad sample does not stop a run). 1.0 = no bound (a reader
    # without one usable sample in a whole epoch still stops it).
    max_error_fraction: float = 0.01
    error_fraction_min_samples: int = 1000


@dataclass
class ModelConfig:
    arch: str = "resnet152"
    two_heads: bool = True
    small_input: bool = False
    dropout: float = 0.0
    width: int = 64
    channels_last: bool = False  # CUDA only: NHWC inputs and activations for tensor cores (weights NCHW)
    compile: bool = False  # torch.compile student and teacher in place (first step pays the compilation)
    # BN batch statistics over a group of ranks (student and teacher, train mode); off: each rank's own
    sync_bn: bool = False
    sync_bn_group_size: int = 0  # ranks per group (consecutive ranks, e.g. 8 = one node); 0 = all ranks


@dataclass
class MeanTeacherConfig:
    enabled: bool = True  # false = supervised-only baseline on the labeled part
    consistency: str = "kl"  # kl | mse
    consistency_weight: float = 10.0
    consistency_rampup_epochs: float = 5.0
    logit_distance_cost: float = 0.01
    ema_decay: float = 0.9997  # at data.reference_batch_size
    ema_decay_scaling: str = "power"  # power: ema_decay^k at k x the reference batch (Busbridge 2023) | none
    teacher_init: str = "independent"  # independent (the authors' code) | copy (of the student)
    teacher_bn: str = "own"  # own: the teacher keeps its own BN statistics per rank | average: across ranks


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.25  # peak lr at data.reference_batch_size (the global batch when that is 0)
    # the rule for lr at k x the reference batch: auto (sgd linear, adamw sqrt) | linear | sqrt | none
    lr_scaling: str = "auto"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    beta1: float = 0.9  # adamw
    beta2: float = 0.999
    grad_clip: float = 0.0  # 0 = off


@dataclass
class ScheduleConfig:
    epochs: float = 60.0
    warmup_epochs: float = 2.0
    warmup_start_lr: float = 0.1
    rampdown_epochs: float = 75.0  # cosine ramp-down length; may exceed epochs (the paper stops at 60 of 75)
    max_steps: int = 0  # stop at this optimizer step (the schedule still follows epochs); 0 = epochs


@dataclass
class DeepSpeedConfig:
    bf16: bool = True  # torch autocast bf16, fp32 weights
    fp16: bool = False  # torch autocast fp16 with a gradient scaler, fp32 weights
    zero_stage: int = 0  # 0, 1 or 2 (3 partitions the parameters the teacher averages)
    grad_accum_steps: int = 1
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo


@dataclass
class DistConfig:
    # A rank with no progress (optimizer step, eval batch, checkpoint write, start-up phase) for this long
    # writes every thread's stack to <run_dir>/hang-rank<r>.txt and exits 124, for the launch layer to
    # requeue (mtdist.watchdog). Long enough for the slowest legitimate gap on GPUs: torch.compile's first
    # step, a large checkpoint on a slow file system. 0 = off.
    hang_timeout_s: float = 600.0
    # The process group's timeout: a collective (or the start-up rendezvous) waiting this long for a
    # dead or stuck peer fails, instead of torch's 30-minute default. Longer than hang_timeout_s, so the
    # watchdog speaks first: NCCL's own timeout ends the process from a C++ thread, with no record, no
    # stacks and no requeue from the submitit job.
    collective_timeout_s: float = 900.0


@dataclass
class CheckpointConfig:
    interval_steps: int = 1000  # 0 = only at the end and on signals
    keep_last: int = 3
    resume: str = "auto"  # auto | never | a checkpoint folder
    keep_best: bool = False  # also keep the checkpoint of the best eval teacher top-1 (named in `best`)
    signals: list[str] = field(
        default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"]
    )  # -> checkpoint, exit


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval_steps: int = 50
    eval_interval_steps: int = 0  # 0 = once per epoch
    progress_bar: bool = True
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "mtdist"


@dataclass
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 8  # GPUs asked per node (--gpus-per-node); 0 = CPU-only nodes, no GPU request
    tasks_per_node: int = 0  # processes per node; 0 = gpus_per_node (one per GPU); set when gpus_per_node=0
    cpus_per_task: int = 10
    mem_gb: int = 0  # 0 = the partition's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_minutes: int = 1440
    constraint: str = ""
    exclusive: bool = False
    job_name: str = "mtdist"
    log_folder: str = ""  # "" = <run_dir>/slurm
    max_requeues: int = 20  # requeues after a signal (preemption, time limit)
    max_failures: int = 3  # requeues after a failure (a rank crashed, hung or was lost); see mtdist.failures
    signal_delay_s: int = 120  # Slurm signals the job this long before its time limit (--signal=USR2@N)
    sbatch_extra: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ...)


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mean_teacher: MeanTeacherConfig = field(default_factory=MeanTeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.augment": ("imagenet", "digits"),
    "data.order": ("reader", "global"),
    "mean_teacher.consistency": ("kl", "mse"),
    "mean_teacher.teacher_init": ("independent", "copy"),
    "mean_teacher.teacher_bn": ("own", "average"),
    "mean_teacher.ema_decay_scaling": ("power", "none"),
    "optim.lr_scaling": ("auto", "linear", "sqrt", "none"),
    "optim.name": ("sgd", "adamw"),
    "deepspeed.backend": ("auto", "nccl", "gloo"),
    "logging.wandb": ("offline", "online", "disabled"),
}


# ---------------------------------------------------------------- building from data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check one leaf value against its annotated type; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (list, dict):
        return _coerce_container(value, tp, origin, key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _coerce_container(value: Any, tp: Any, origin: type, key: str) -> Any:
    if not isinstance(value, origin):
        raise ConfigError(f"{key}: expected {origin.__name__}, got {type(value).__name__} {value!r}")
    args = typing.get_args(tp)
    if origin is list:
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key '{where}'; allowed here: {', '.join(sorted(hints))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = from_dict(tp, value, key) if dataclasses.is_dataclass(tp) else _coerce(value, tp, key)
    return cls(**kwargs)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node, parts = data, dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with the value read as YAML (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected key=value, e.g. optim.lr=0.1")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, then validated."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    return load_config_dict(data, overrides, source=str(path or "config"))


def load_config_dict(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "config"
) -> Config:
    """Defaults <- `data` (nested sections) <- dotted overrides, then validated."""
    data = copy.deepcopy(data)
    for text in overrides:
        _set_dotted(data, *parse_override(text))
    try:
        cfg = from_dict(Config, data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass one of configs/*.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------- validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in allowed, f"{key}: '{value}' is not one of {', '.join(allowed)}")


def _check_positive(cfg: Config) -> None:
    for key in (
        "data.batch_size",
        "data.num_classes",
        "data.image_size",
        "data.channels",
        "deepspeed.grad_accum_steps",
        "data.eval_batch_size_per_gpu",
        "cluster.nodes",
        "logging.log_interval_steps",
    ):
        section, name = key.split(".")
        _check(getattr(getattr(cfg, section), name) > 0, f"{key}: must be > 0")
    for key in (
        "data.labeled_size",
        "data.unlabeled_size",
        "data.num_workers",
        "data.shuffle_buffer",
        "data.error_fraction_min_samples",
        "data.batch_size_per_gpu",
        "data.reference_batch_size",
        "model.sync_bn_group_size",
        "schedule.max_steps",
        "checkpoint.interval_steps",
        "logging.eval_interval_steps",
        "cluster.max_failures",
        "dist.hang_timeout_s",
    ):
        section, name = key.split(".")
        _check(getattr(getattr(cfg, section), name) >= 0, f"{key}: must be >= 0")


def validate(cfg: Config) -> None:
    """Reject impossible combinations, one line each, naming the key."""
    _check_choices(cfg)
    _check_positive(cfg)
    d, mt, ds = cfg.data, cfg.mean_teacher, cfg.deepspeed
    _check(
        0 < d.labeled_batch_size <= d.batch_size,
        f"data.labeled_batch_size: {d.labeled_batch_size} must be in 1..data.batch_size ({d.batch_size})",
    )
    _check(
        d.labeled_batch_size < d.batch_size or not mt.enabled,
        "data.labeled_batch_size: equals data.batch_size, leaving no unlabeled images for Mean Teacher; "
        "lower it or set mean_teacher.enabled=false",
    )
    _check(0.0 <= mt.ema_decay < 1.0, f"mean_teacher.ema_decay: {mt.ema_decay} must be in [0, 1)")
    _check(mt.consistency_weight >= 0, "mean_teacher.consistency_weight: must be >= 0")
    _check(mt.logit_distance_cost >= 0, "mean_teacher.logit_distance_cost: must be >= 0")
    _check(mt.consistency_rampup_epochs >= 0, "mean_teacher.consistency_rampup_epochs: must be >= 0")
    _check(
        ds.zero_stage in (0, 1, 2),
        f"deepspeed.zero_stage: {ds.zero_stage} not supported; use 0, 1 or 2 (stage 3 partitions the "
        "student's parameters, which the teacher's EMA reads every step)",
    )
    _check(not (ds.bf16 and ds.fp16), "deepspeed.fp16: cannot be true together with deepspeed.bf16; pick one")
    _check(
        0.0 <= d.max_error_fraction <= 1.0,
        f"data.max_error_fraction: {d.max_error_fraction} must be in [0, 1] (1 = never stop on corrupt data)",
    )
    _check_schedule(cfg)
    _check_cluster(cfg)
    _check(
        cfg.dist.collective_timeout_s > cfg.dist.hang_timeout_s,
        f"dist.collective_timeout_s: {cfg.dist.collective_timeout_s:g} must be > dist.hang_timeout_s "
        f"({cfg.dist.hang_timeout_s:g}): a rank stuck in a collective must meet the watchdog (stacks, "
        "a failure record, a requeue) before the process group's own timeout ends it without them",
    )
    _check_batch_per_gpu(cfg)
    _check(
        cfg.model.sync_bn or not cfg.model.sync_bn_group_size,
        "model.sync_bn_group_size: set while model.sync_bn is false; turn sync_bn on or set the size to 0",
    )
    _check(cfg.optim.lr > 0, f"optim.lr: {cfg.optim.lr} must be > 0")
    _check(cfg.optim.weight_decay >= 0, "optim.weight_decay: must be >= 0")
    _check(0 <= cfg.optim.momentum < 1, f"optim.momentum: {cfg.optim.momentum} must be in [0, 1)")
    _check(
        not (cfg.optim.nesterov and cfg.optim.momentum == 0 and cfg.optim.name == "sgd"),
        "optim.nesterov: needs optim.momentum > 0",
    )
    _check(
        cfg.model.two_heads or cfg.mean_teacher.logit_distance_cost == 0 or not mt.enabled,
        "mean_teacher.logit_distance_cost: needs model.two_heads=true (or set the cost to 0)",
    )
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last: must be >= 1")
    _check(
        not cfg.checkpoint.keep_best or bool(d.val),
        "checkpoint.keep_best: needs data.val (the best checkpoint is chosen by its top-1 there)",
    )
    bad = [name for name in cfg.checkpoint.signals if name not in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")]
    _check(not bad, f"checkpoint.signals: {bad} not allowed; use SIGUSR1, SIGUSR2, SIGTERM or SIGINT")


def _check_batch_per_gpu(cfg: Config) -> None:
    """data.batch_size_per_gpu must split into whole labeled and unlabeled images in the configured share
    (a multiple of that smallest split has at least one of each, as batch_size has)."""
    d = cfg.data
    per_gpu = d.batch_size_per_gpu
    if not per_gpu:
        return
    step = d.batch_size // math.gcd(d.batch_size, d.labeled_batch_size)  # smallest whole split
    labeled = per_gpu * d.labeled_batch_size / d.batch_size
    _check(
        per_gpu % step == 0,
        f"data.batch_size_per_gpu: {per_gpu} images in the share data.labeled_batch_size:data.batch_size = "
        f"{d.labeled_batch_size}:{d.batch_size} gives {labeled:g} labeled per GPU; use a multiple of {step}",
    )


def _check_cluster(cfg: Config) -> None:
    c = cfg.cluster
    _check(c.gpus_per_node >= 0, "cluster.gpus_per_node: must be >= 0 (0 = CPU-only nodes)")
    _check(c.tasks_per_node >= 0, "cluster.tasks_per_node: must be >= 0 (0 = one task per GPU)")
    _check(
        not (c.gpus_per_node and c.tasks_per_node and c.tasks_per_node != c.gpus_per_node),
        f"cluster.tasks_per_node: {c.tasks_per_node} differs from cluster.gpus_per_node ({c.gpus_per_node}); "
        "mtdist runs one task per GPU: set it to 0 or to gpus_per_node",
    )
    _check(
        c.gpus_per_node > 0 or c.tasks_per_node > 0,
        "cluster.gpus_per_node is 0 (no GPUs): set cluster.tasks_per_node to the processes per node",
    )
    _check(
        0 <= c.signal_delay_s < c.time_minutes * 60,
        f"cluster.signal_delay_s: {c.signal_delay_s} must be in [0, cluster.time_minutes * 60) "
        f"({c.time_minutes * 60} s); it is how long before the time limit the job is told to checkpoint",
    )


def _check_schedule(cfg: Config) -> None:
    s = cfg.schedule
    _check(s.epochs > 0, f"schedule.epochs: {s.epochs} must be > 0")
    _check(
        0 <= s.warmup_epochs <= s.epochs, f"schedule.warmup_epochs: {s.warmup_epochs} must be in [0, epochs]"
    )
    _check(
        s.rampdown_epochs >= s.epochs,
        f"schedule.rampdown_epochs: {s.rampdown_epochs} must be >= schedule.epochs ({s.epochs}); the cosine "
        "would turn back up after it",
    )
    _check(
        0 <= s.warmup_start_lr <= cfg.optim.lr,
        f"schedule.warmup_start_lr: {s.warmup_start_lr} must be in [0, optim.lr]",
    )
