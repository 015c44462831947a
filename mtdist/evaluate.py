"""One evaluate() for student and teacher together: top-1/top-5 in one pass, reduced across ranks.

Each rank evaluates its own shards exactly once (no padding, no duplicates); the counts are
summed across ranks, so the result is exact whatever the shard sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from mtdist.dist import sum_over_ranks
from mtdist.losses import topk_correct


@torch.no_grad()
def evaluate(
    models: Mapping[str, nn.Module],
    batches: Iterable,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, dict[str, float]]:
    """Class-head top-1/top-5 (percent) and the sample count of each model, all on the same batches: one
    pass over the data (decoded once) for student and teacher. Each model's train/eval mode is restored."""
    modes = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    counts = torch.zeros(len(models), 3, dtype=torch.float64)  # per model: top1 hits, top5 hits, samples
    for batch in batches:
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for i, model in enumerate(models.values()):
            with _autocast(device, autocast_dtype):
                logits = model(images)[0]
            top1, top5 = topk_correct(logits.float(), labels)
            counts[i] += torch.tensor([top1, top5, labels.shape[0]], dtype=torch.float64)
    for name, model in models.items():
        model.train(modes[name])
    counts = sum_over_ranks(counts, device)
    return {name: _scores(row) for name, row in zip(models, counts, strict=True)}


def _scores(counts: torch.Tensor) -> dict[str, float]:
    n = max(counts[2].item(), 1.0)
    top1, top5 = (100.0 * counts[i].item() / n for i in (0, 1))
    return {"top1": top1, "top5": top5, "count": int(counts[2])}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
