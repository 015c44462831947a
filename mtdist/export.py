"""`mtdist export`: a checkpoint's teacher (or student) as a plain weights file for downstream use.

    mtdist export --checkpoint runs/x/checkpoints/step-00345900 --out teacher.safetensors
    mtdist export --checkpoint runs/x/checkpoints --which student --out student.pt   # latest; torch.save

Writes the weights (`.safetensors`, or `.pt` / `.pth` for torch.save; fp32, as trained) and a JSON beside
them (`teacher.json`): architecture, classes, input preparation, which BN statistics the weights carry,
the source checkpoint and step. `mtdist.models.load_exported(FILE)` rebuilds the model from both;
ResNet keys are torchvision's (mtdist/models/io.py). Reads only the checkpoint's files: no DeepSpeed,
no process group, no GPU.

BN statistics: the teacher is updated as an EMA of the student's *parameters* only; its BN running
mean / variance are its own, accumulated by its train-mode forward passes (the paper runs the teacher
in train mode) on one rank's batches. With `mean_teacher.teacher_bn: own` every rank keeps its own set
and the export carries rank 0's (`--rank`); with `average` they were averaged over the ranks when the
checkpoint was saved. `mtdist eval` on one process evaluates the same rank-0 statistics. The student's
are its own running statistics of that rank, likewise.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from mtdist import checkpoint
from mtdist.config import Config, load_config_dict
from mtdist.models.io import (
    EXPORT_FORMAT,
    build_from_info,
    info_path,
    to_torchvision_names,
    uses_torchvision_names,
)
from mtdist.plan import batch_scaling, global_batches

SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
# ZeRO 0-2 (all mtdist supports) keep the whole module in this file
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder (runs/x/checkpoints/step-N), or a checkpoints/ folder for its latest",
    )
    p.add_argument("--which", choices=("teacher", "student"), default="teacher", help="default: teacher")
    p.add_argument(
        "--out",
        required=True,
        help="FILE.safetensors, or FILE.pt / FILE.pth for torch.save; FILE.json beside",
    )
    p.add_argument(
        "--both-heads",
        action="store_true",
        help="also keep the consistency head (fc_cons); by default only the class head (fc) is exported",
    )
    p.add_argument("--rank", type=int, default=0, help="whose BN statistics (teacher_bn: own); default 0")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return export_checkpoint(Path(args.checkpoint), Path(args.out), args.which, args.both_heads, args.rank)


def export_checkpoint(
    folder: Path, out: Path, which: str = "teacher", both_heads: bool = False, rank: int = 0
) -> dict[str, Any]:
    """Write `out` and its JSON (mtdist.models.io.info_path); returns the JSON's content."""
    fmt = SUFFIXES.get(out.suffix)
    if fmt is None:
        raise ValueError(f"--out {out}: name it *.safetensors, or *.pt / *.pth for torch.save")
    folder = resolve_checkpoint(folder)
    meta = checkpoint.read_meta(folder)
    cfg = load_config_dict(meta["config"])
    state = model_state(folder, cfg, which, rank)
    two_heads = cfg.model.two_heads and both_heads
    if not two_heads:
        state = {k: v for k, v in state.items() if not k.startswith("head_cons.")}
    info = export_info(cfg, folder, meta, which, two_heads, rank)
    build_from_info(info).load_state_dict(state, strict=True)  # the file will load: checked before writing
    if info["key_names"] == "torchvision":
        state = to_torchvision_names(state)
    # own storage per tensor (the checkpoint's share one flat buffer, which safetensors refuses), row-major
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    info["dtype"] = str(next(t.dtype for t in tensors.values() if t.is_floating_point())).removeprefix(
        "torch."
    )
    info["tensors"] = len(tensors)
    info["parameters"] = sum(p.numel() for p in build_from_info(info).parameters())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={"format": EXPORT_FORMAT, "info": json.dumps(info)})
    else:
        torch.save(tensors, tmp)
    os.replace(tmp, out)
    info_tmp = info_path(out).with_name(f".{info_path(out).name}.tmp")
    info_tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(info_tmp, info_path(out))
    return info


def resolve_checkpoint(folder: Path) -> Path:
    """A checkpoint folder as given, or the latest complete one of a checkpoints/ folder."""
    if (folder / "meta.json").is_file():
        return folder
    latest = checkpoint.latest(folder)
    if latest is None:
        raise FileNotFoundError(
            f"--checkpoint {folder}: not a complete checkpoint (no meta.json) nor a checkpoints/ folder "
            "holding one"
        )
    return latest


def model_state(folder: Path, cfg: Config, which: str, rank: int) -> dict[str, torch.Tensor]:
    """The teacher's state dict (its fp32 EMA weights and `rank`'s BN buffers), or the student's (DeepSpeed's
    module weights with `rank`'s BN buffers)."""
    rank_state = checkpoint.load_rank_state(folder, rank)
    if which == "teacher":
        if not cfg.mean_teacher.enabled or not rank_state["teacher"]:
            raise ValueError(
                f"{folder} has no teacher (mean_teacher.enabled: false, supervised only): use --which student"
            )
        return dict(rank_state["teacher"]["module"])
    path = folder / DEEPSPEED_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: not a DeepSpeed checkpoint written by mtdist (ZeRO 0-2)")
    module = torch.load(path, map_location="cpu", weights_only=True)["module"]
    return dict(module) | dict(rank_state["student_buffers"])


def bn_statistics(cfg: Config, which: str, rank: int) -> str:
    if which == "student":
        return (
            f"the student's own BN running mean/var of rank {rank}, from its train-mode forward passes on "
            "that rank's training batches (DeepSpeed keeps the weights equal across ranks, not BN buffers)"
        )
    own = (
        f"one set per rank (mean_teacher.teacher_bn: own): rank {rank}'s"
        if cfg.mean_teacher.teacher_bn == "own"
        else "averaged over all ranks when the checkpoint was saved (mean_teacher.teacher_bn: average)"
    )
    return (
        "the teacher's own BN running mean/var (the EMA averages the student's parameters only), accumulated "
        f"by its train-mode forward passes on the training batches; {own}"
    )


def input_spec(cfg: Config) -> dict[str, Any]:
    """How an image becomes the model's input, as mtdist's eval transform does it."""
    from mtdist.data import transforms

    d = cfg.data
    if d.augment == "imagenet":
        return {
            "channels": d.channels,
            "size": d.image_size,
            "resize_shorter_side": round(d.image_size * 256 / 224),
            "center_crop": d.image_size,
            "scale": "RGB pixels / 255",
            "mean": list(transforms.IMAGENET_MEAN),
            "std": list(transforms.IMAGENET_STD),
        }
    return {
        "channels": d.channels,
        "size": d.image_size,
        "scale": "grayscale pixels / 255" if d.channels == 1 else "pixels / 255",
        "mean": [transforms.DIGITS_MEAN] * d.channels,
        "std": [transforms.DIGITS_STD] * d.channels,
    }


def class_names(cfg: Config) -> tuple[list[str] | None, str]:
    """The class list of the first shard index that has one (make-shards writes the sorted wnids)."""
    from mtdist.data import read_index

    for key in ("labeled", "val", "test", "unlabeled"):
        spec = getattr(cfg.data, key)
        if spec.endswith(".index.json") and Path(spec).is_file():
            classes = read_index(spec).get("classes")
            if classes:
                return list(classes), f"data.{key}: {spec}"
    return None, "no shard index at hand lists class names: class i is index i"


def export_info(
    cfg: Config, folder: Path, meta: dict, which: str, two_heads: bool, rank: int
) -> dict[str, Any]:
    m, d = cfg.model, cfg.data
    classes, classes_source = class_names(cfg)
    return {
        "format": EXPORT_FORMAT,
        "which": which,
        "model": {
            "arch": m.arch,
            "num_classes": d.num_classes,
            "two_heads": two_heads,
            "small_input": m.small_input,
            "in_channels": d.channels,
            "input_size": d.image_size,
            "width": m.width,
        },
        "key_names": "torchvision" if uses_torchvision_names(m.arch) else "mtdist",
        "dtype": None,  # of the tensors written
        "classes": classes,
        "classes_source": classes_source,
        "input": input_spec(cfg),
        "bn_statistics": bn_statistics(cfg, which, rank),
        "source": {
            "checkpoint": str(folder.resolve()),
            "step": meta["train_state"]["step"],
            "rank": rank,
            "ema_decay": run_ema_decay(cfg, meta) if which == "teacher" else None,
        },
    }


def run_ema_decay(cfg: Config, meta: dict) -> float:
    """The teacher's decay the run trained with: mean_teacher.ema_decay scaled to its global batch
    (plan.batch_scaling), not the configured one."""
    batch, _ = global_batches(cfg, checkpoint.saved_world_size(meta, 1))
    return batch_scaling(cfg, batch).ema_decay
