"""The only module that imports deepspeed: the student inside a DeepSpeed engine.

Our optimizer (SGD with Nesterov as in the paper, or AdamW) and our lr schedule (a pure
function of the fractional epoch) are handed to DeepSpeed, which steps the schedule once per
optimizer step and saves both in its checkpoints.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from typing import Any

import deepspeed
import torch
from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE_STEP
from torch import nn

from mtdist.config import Config
from mtdist.plan import Plan
from mtdist.schedules import learning_rate

# DeepSpeed logs every config key at INFO on every rank; keep its warnings only.
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def build_optimizer(cfg: Config, student: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on all parameters, as in the paper; fused kernels where torch has them (CUDA, CPU)."""
    o = cfg.optim
    device_type = next(student.parameters()).device.type
    kernel = optimizer_kernel(device_type, torch.optim.SGD if o.name == "sgd" else torch.optim.AdamW)
    if o.name == "sgd":
        return torch.optim.SGD(
            student.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
            **kernel,
        )
    return torch.optim.AdamW(
        student.parameters(),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        weight_decay=o.weight_decay,
        **kernel,
    )


def optimizer_kernel(device_type: str, optimizer: type[torch.optim.Optimizer]) -> dict[str, bool]:
    """fused=True where this torch has a fused kernel for the device (CUDA; CPU too since torch 2.4):
    one pass over each parameter's bytes, 3.4x faster than foreach for ResNet-152 SGD on our CPU
    (benchmarks/ema.py: ~40 vs ~135 ms); else foreach=True (multi-tensor kernels, a pass each)."""
    has_fused = "fused" in inspect.signature(optimizer.__init__).parameters
    if has_fused and device_type in _fused_kernel_devices():
        return {"fused": True}
    return {"foreach": True}


def _fused_kernel_devices() -> list[str]:
    """The device types with fused optimizer kernels in this torch (a private helper; CUDA if absent)."""
    from torch.utils import _foreach_utils

    return getattr(_foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()


def lr_factor(cfg: Config, plan: Plan, step: int) -> float:
    """lr at optimizer step `step` as a fraction of optim.lr (LambdaLR multiplies the base lr).

    The schedule runs between the plan's scaled peak and warm-up start (the recipe at this run's batch,
    mtdist.plan.batch_scaling); optim.lr itself stays the base, so the config is never rewritten.
    """
    s, scaling = cfg.schedule, plan.scaling
    peak = scaling.lr if scaling is not None else cfg.optim.lr
    start = scaling.warmup_start_lr if scaling is not None else s.warmup_start_lr
    lr = learning_rate(
        plan.epoch(step),
        lr=peak,
        warmup_start_lr=start,
        warmup_epochs=s.warmup_epochs,
        rampdown_epochs=s.rampdown_epochs,
    )
    return lr / cfg.optim.lr


# DeepSpeed's comm layer JIT-builds (or checks) this op at every init_distributed, under torch's extension
# lock file (~/.cache/torch_extensions/<py>_cpu/deepspeed_shm_comm/lock). A process killed in that window
# leaves the file behind, and every later start on the machine (every node, with a shared home) waits for
# it for ever. The op only speeds up DeepSpeed's inference all-reduce, which training never calls, so
# mtdist does not build it: no extension is built at start-up, and no such lock can stop a start.
UNUSED_OPS = ("deepspeed_shm_comm",)
SHM_COMM_BUILDER = "ShareMemCommBuilder"  # its builder, which DeepSpeed's comm layer asks its accelerator for


def init_distributed(backend: str) -> None:
    """Let DeepSpeed's comm layer adopt the torch process group that mtdist.dist created."""
    skip_unused_ops()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def skip_unused_ops() -> None:
    """Mark UNUSED_OPS incompatible, so DeepSpeed neither builds nor loads them (it asks this table).

    Only where DeepSpeed's accelerator has the op (the CPU): on CUDA nothing would build it, and the
    table's first read probes every op DeepSpeed has (compiler runs, seconds in every process)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder(SHM_COMM_BUILDER) is None:
        return
    compatible = deepspeed.ops.__compatible_ops__  # probed once per process, then cached by DeepSpeed
    for name in UNUSED_OPS:
        compatible[name] = False


def engine_args(device: torch.device) -> argparse.Namespace | None:
    """deepspeed.initialize's `args`: the GPU the student is on. Unless told, DeepSpeed sets the device to
    cuda:LOCAL_RANK, which does not exist where Slurm gives each task one GPU (--gpus-per-task=1,
    --gpu-bind: that GPU is cuda:0 on every rank, as dist.pick_device found)."""
    return argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None


def build_engine(cfg: Config, student: nn.Module, plan: Plan) -> Any:
    optimizer = build_optimizer(cfg, student)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, plan, step))
    engine, _, _, _ = deepspeed.initialize(
        args=engine_args(next(student.parameters()).device),
        model=student,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=plan.deepspeed_config,
        dist_init_required=False,
    )
    if engine.dp_world_size == 1 and cfg.deepspeed.zero_stage == 0:
        # one rank: DeepSpeed would still flatten every gradient, all-reduce it with itself and copy it
        # back (~15% of a CPU step in benchmarks/step.py); the result is the same without it
        engine.enable_backward_allreduce = False
    return engine


def load_checkpoint(engine: Any, root: str, tag: str, saved_world_size: int, optimizer: bool = True) -> None:
    """Student, optimizer state, lr schedule and loss scaler of a checkpoint, on this or another number of
    ranks. ZeRO 1/2 on another data-parallel size: DeepSpeed's load_checkpoint refuses to re-split the
    optimizer state (ZeRORuntimeException, "Automatic adjustment of ZeRO's optimizer state partitioning
    with a new world size is not currently supported"), though its optimizer can merge and re-split a
    checkpoint saved in the elastic layout (plan._elastic, data.order=global). So: load the module, the
    schedule and the fp32 master weights (re-split) without the optimizer state, then hand the optimizer
    every saved partition's state to merge and cut for this rank. `optimizer=False` (evaluation): the
    student's weights only, from any checkpoint."""
    if not optimizer:
        engine.load_checkpoint(root, tag=tag, load_optimizer_states=False)
        return
    if not engine.zero_optimization() or not engine.zero_elastic_checkpoint():
        if engine.zero_optimization() and saved_world_size != engine.dp_world_size:
            raise ValueError(
                f"checkpoint {root}/{tag} partitions its ZeRO optimizer state over {saved_world_size} ranks, "
                f"this run has {engine.dp_world_size}: resume it on {saved_world_size} ranks (only "
                f"data.order=global runs save it in the layout another number of ranks can re-split)"
            )
        engine.load_checkpoint(root, tag=tag)
        return
    engine.load_checkpoint(root, tag=tag, load_optimizer_states=False)
    saved = engine._get_all_zero_checkpoints(root, tag)  # every saved rank's partition, in rank order
    rigid = saved is not None and isinstance(saved[0]["base_optimizer_state"], dict)
    if rigid and saved_world_size == engine.dp_world_size:
        engine.load_checkpoint(root, tag=tag)  # the same partitions: DeepSpeed loads a rigid save itself
        return
    if saved is None or rigid:
        raise ValueError(
            f"checkpoint {root}/{tag} holds ZeRO optimizer state in the rigid layout of its "
            f"{saved_world_size} ranks: resume it on {saved_world_size} ranks (only checkpoints of "
            f"data.order=global runs are saved in the layout another number of ranks can re-split)"
        )
    groups = engine.optimizer.optimizer.param_groups
    had_step = "step" in groups[0]
    for state in saved:  # the elastic merge asserts a group "step", which SGD's groups never have
        state.setdefault(BASE_OPTIMIZER_STATE_STEP, None)
    engine.optimizer.load_state_dict(
        state_dict_list=_Partitions(saved),
        load_optimizer_states=True,
        load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
        param_shapes=engine._get_zero_param_shapes(),
    )
    if not had_step:  # it wrote that placeholder into every group
        for group in groups:
            group.pop("step", None)
    # The elastic merge restores the state tensors only, not the groups' lr, which the rigid load takes
    # from the saved param_groups: set it from the restored schedule, as an uninterrupted run has it.
    for group, lr in zip(groups, engine.lr_scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


class _Partitions(list):
    """The saved partitions' states, in saved rank order. DeepSpeed reads the global part of a partition
    (loss scaler, clipping, layout) at index dp_rank, which a grown world's new ranks lack; that part is
    the same in every partition, so they read the first. Iteration (the merge) sees each one once."""

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - list's own signature
        if isinstance(index, int) and index >= len(self):
            index = 0
        return super().__getitem__(index)
