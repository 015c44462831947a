"""BatchNorm whose train-mode batch statistics are taken over a group of ranks (`model.sync_bn`).

torch.nn.SyncBatchNorm refuses CPU tensors (torch 2.13: "SyncBatchNorm expected input tensor to be on
GPU or XPU ..."), so mtdist has its own, in plain torch ops and one collective each way, that runs on
every device and backend (gloo on CPU, where it is tested, as NCCL on CUDA):

- forward: each rank's per-channel mean and variance (fp32, torch.var_mean), combined over the group
  as sums of n * mean and n * (var + mean^2) in fp64 (one all-reduce of 2C + 1 numbers per layer);
- backward: autograd through that all-reduce, whose gradient is the all-reduce of the gradients
  (the loss of every rank depends on every rank's images through the shared statistics), so an
  input's gradient is the one a single process would compute over the whole group's batch.

The layer is a _BatchNorm with the same parameters and buffers (state_dict keys unchanged, so
checkpoints of a synced and an unsynced run are interchangeable); eval mode and a group of one rank
use the plain BatchNorm path. It holds only its group size, not the process group (the groups live in
a registry here), so deepcopy (the teacher's teacher_init=copy) and pickling work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# group size (0 = all ranks) -> this rank's group; new_subgroups is collective, so each size once
_GROUPS: dict[int, Any] = {}


def sync_group(group_size: int) -> Any | None:
    """This rank's group of `group_size` consecutive ranks (0 = all), made on first use; None without a
    process group of more than one rank. Collective: every rank must call it at the same point."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return None
    world = torch_dist.get_world_size()
    size = group_size or world
    if world % size:
        raise ValueError(f"sync_bn: group size {size} does not divide the {world} ranks")
    if size not in _GROUPS:
        # a group of its own, even for all ranks: its all-reduces never interleave with DeepSpeed's
        _GROUPS[size], _ = torch_dist.new_subgroups(size)
    return _GROUPS[size]


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: d(sum_r x_r)/dx_r = 1 on every rank, so the gradient of the
    group's total loss is the all-reduce of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        torch_dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.clone(memory_format=torch.contiguous_format)
        torch_dist.all_reduce(out, group=ctx.group)
        return out, None


class GroupSyncBatchNorm(_BatchNorm):
    """BatchNorm over any input of >= 2 dims whose train-mode statistics are the group's (see the module)."""

    def __init__(self, num_features: int, group_size: int = 0, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.group_size = group_size

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = sync_group(self.group_size) if self.training else None
        if group is None or torch_dist.get_world_size(group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        mean, var, count = self._group_stats(x, group)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), count)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        # in fp32, then back to the input's dtype, as F.batch_norm does under autocast
        return (x.float() * scale.float().view(shape) + shift.float().view(shape)).to(x.dtype)

    def _group_stats(self, x: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, biased variance, image count) per channel over the group's whole batch; the count stays a
        tensor (no .item(): on CUDA that would wait for the device at every layer)."""
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        mean, var = mean.double(), var.double()
        n = x.numel() // x.shape[1]
        # fp64 sums: the second moment minus the squared mean loses nothing that matters at this size
        local = torch.cat([mean * n, (var + mean * mean) * n, mean.new_full((1,), float(n))])
        total = _SumOverGroup.apply(local, group)
        c, count = x.shape[1], total[-1]
        g_mean = total[:c] / count
        g_var = (total[c : 2 * c] / count - g_mean * g_mean).clamp_min(0.0)
        return g_mean.float(), g_var.float(), count.detach()

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """As _BatchNorm does: momentum (or a cumulative average), the unbiased variance of the group."""
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        unbiased = var * (count / (count - 1.0).clamp_min(1.0)).float()
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert_sync_batchnorm(module: nn.Module, group_size: int = 0) -> nn.Module:
    """Every BatchNorm layer of `module` replaced by a GroupSyncBatchNorm that reuses its Parameter and
    buffer objects (so flatten_parameters_, the optimizer and checkpoints see the same tensors); returns
    the module (a new one only if `module` itself is a BatchNorm). Also makes the group (collective).

    Run it before flatten_parameters_ and before building the DeepSpeed engine, as place_model does.
    """
    sync_group(group_size)
    if isinstance(module, _BatchNorm) and not isinstance(module, (GroupSyncBatchNorm, nn.SyncBatchNorm)):
        return _converted(module, group_size)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, group_size)
        if new is not child:
            setattr(module, name, new)
    return module


def _converted(bn: _BatchNorm, group_size: int) -> GroupSyncBatchNorm:
    out = GroupSyncBatchNorm(
        bn.num_features,
        group_size,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device="meta",  # its own tensors are replaced right away
    )
    if bn.affine:
        out.weight, out.bias = bn.weight, bn.bias
    out.running_mean, out.running_var = bn.running_mean, bn.running_var
    out.num_batches_tracked = bn.num_batches_tracked
    out.train(bn.training)
    return out
