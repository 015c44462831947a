"""One Mean Teacher micro-step: forward student and teacher, the loss terms, backward, step.

The teacher is updated only at the gradient-accumulation boundary, right after the optimizer
step, so it averages optimizer states, never half-accumulated ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mtdist.ema import Teacher
from mtdist.losses import consistency_loss, logit_distance, supervised_loss


@dataclass(frozen=True)
class LossWeights:
    consistency_kind: str
    consistency_weight: float  # w(t) at this step, ramp-up applied
    logit_distance_cost: float


def compute_losses(
    student_out: tuple[torch.Tensor, torch.Tensor],
    teacher_cls: torch.Tensor | None,
    labels: torch.Tensor,
    weights: LossWeights,
) -> dict[str, torch.Tensor]:
    """All loss terms and their weighted sum; the teacher's class head is the target of head 2."""
    cls_logits, cons_logits = student_out
    terms = {"train/loss_class": supervised_loss(cls_logits, labels)}
    total = terms["train/loss_class"]
    if teacher_cls is not None:
        terms["train/loss_consistency"] = consistency_loss(weights.consistency_kind, cons_logits, teacher_cls)
        total = total + weights.consistency_weight * terms["train/loss_consistency"]
        if weights.logit_distance_cost > 0:
            terms["train/loss_logit_distance"] = logit_distance(cls_logits, cons_logits)
            total = total + weights.logit_distance_cost * terms["train/loss_logit_distance"]
    terms["train/loss_total"] = total
    return terms


def train_step(
    engine: Any,
    teacher: Teacher | None,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: LossWeights,
    step: int,
) -> tuple[dict[str, torch.Tensor], bool]:
    """One micro-batch through `engine` (a DeepSpeed engine or a stand-in with the same methods).

    Returns the detached loss terms and whether an optimizer step (and teacher update) happened.
    """
    view1, view2, labels = batch
    student_out = engine(view1)
    teacher_cls = teacher(view2)[0] if teacher is not None else None
    terms = compute_losses(student_out, teacher_cls, labels, weights)
    loss = terms["train/loss_total"]
    if not math.isfinite(loss.item()):
        raise FloatingPointError(
            f"non-finite loss at step {step}: "
            + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            + "; lower optim.lr, enable optim.grad_clip, or check the input data"
        )
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    if boundary and teacher is not None:
        teacher.update(engine.module)
    return {k: v.detach() for k, v in terms.items()}, boundary
