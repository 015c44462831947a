"""One evaluate() for student and teacher: top-1/top-5 over a loader, reduced across ranks.

Each rank evaluates its own shards exactly once (no padding, no duplicates); the counts are
summed across ranks, so the result is exact whatever the shard sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as torch_dist
from torch import nn

from mtdist.losses import topk_correct


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Class-head top-1/top-5 (percent) and the sample count; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # top1 hits, top5 hits, samples
    for batch in batches:
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, autocast_dtype):
            logits = model(images)[0]
        top1, top5 = topk_correct(logits.float(), labels)
        counts += torch.tensor([top1, top5, labels.shape[0]], dtype=torch.float64)
    model.train(was_training)
    counts = _all_reduce_sum(counts, device)
    n = max(counts[2].item(), 1.0)
    return {
        "top1": 100.0 * counts[0].item() / n,
        "top5": 100.0 * counts[1].item() / n,
        "count": int(counts[2]),
    }


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return t
    # nccl needs a device tensor; float64 keeps counts exact
    t = t.to(device)
    torch_dist.all_reduce(t)
    return t.cpu()
