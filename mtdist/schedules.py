"""Ramps and schedules as pure functions of the (fractional) epoch or the optimizer step.

Each follows the Mean Teacher paper (Tarvainen & Valpola 2017, arXiv 1703.01780) and the
authors' ramps.py / main.py, cited per function.
"""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - x/L)^2) for 0 <= x <= L, 1 past L and when L == 0.

    Laine & Aila 2017, used for the consistency weight (paper section 3; authors' ramps.py).
    """
    if rampup_length == 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), rampup_length) / rampup_length
    return math.exp(-5.0 * phase * phase)


def linear_rampup(current: float, rampup_length: float) -> float:
    """x / L clipped to [0, 1]; 1 when L == 0 (the lr warm-up in the authors' ramps.py)."""
    if rampup_length == 0:
        return 1.0
    return min(max(current / rampup_length, 0.0), 1.0)


def cosine_rampdown(current: float, rampdown_length: float) -> float:
    """0.5 (cos(pi x / L) + 1) for 0 <= x <= L (Loshchilov & Hutter 2016; authors' ramps.py)."""
    if not 0.0 <= current <= rampdown_length:
        raise ValueError(f"cosine_rampdown: epoch {current} outside [0, {rampdown_length}]")
    return 0.5 * (math.cos(math.pi * current / rampdown_length) + 1.0)


def learning_rate(
    epoch: float, *, lr: float, warmup_start_lr: float, warmup_epochs: float, rampdown_epochs: float
) -> float:
    """Linear warm-up from `warmup_start_lr` to `lr`, times a cosine ramp-down over `rampdown_epochs`.

    `epoch` is fractional (step / steps_per_epoch): the authors adjust the lr every iteration.
    """
    warm = warmup_start_lr + linear_rampup(epoch, warmup_epochs) * (lr - warmup_start_lr)
    return warm * cosine_rampdown(min(epoch, rampdown_epochs), rampdown_epochs)


def consistency_weight(epoch: float, *, weight: float, rampup_epochs: float) -> float:
    """w(t) = weight * sigmoid_rampup(floor(epoch), L): the authors evaluate the ramp at the integer epoch."""
    return weight * sigmoid_rampup(float(math.floor(epoch)), rampup_epochs)


def ema_decay(step: int, decay: float, batch_scale: float = 1.0) -> float:
    """min(1 - 1/(step + 1/k), decay), step counted from 1 at the first update, k = `batch_scale`.

    k = 1 is the paper's warm start min(1 - 1/(step + 1), decay) (section 3): early on the teacher is
    the plain average of all states so far, not a heavily biased EMA. That warm start counts optimizer
    steps; at k times the reference batch a step holds k times the images, so counted as is it would
    average over k times more images. With 1/k in place of 1 the warm-up time constant in images,
    batch / (1 - a) = images so far + reference batch, is the reference's at every step, and the weight
    left on the initial teacher after t steps is 1 / (k t + 1), exactly the reference's after k t steps
    (the product telescopes). `decay` is the already scaled cap (scaled_ema_decay).
    """
    if step < 1:
        raise ValueError(f"ema_decay: step {step} must be >= 1 (the first update is step 1)")
    if batch_scale <= 0:
        raise ValueError(f"ema_decay: batch_scale {batch_scale} must be > 0")
    return min(1.0 - 1.0 / (step + 1.0 / batch_scale), decay)


# ---------------------------------------------------------------- batch scaling rules (SCALE.md)

LR_RULES = ("linear", "sqrt", "none")


def lr_rule_for(optimizer: str, choice: str) -> str:
    """The lr scaling rule: `choice`, or for 'auto' the optimizer's own: SGD linear (Goyal et al. 2017,
    arXiv 1706.02677), Adam-type square root (Malladi et al. 2022, the SDE view of adaptive methods)."""
    if choice != "auto":
        return choice
    return "sqrt" if optimizer == "adamw" else "linear"


def lr_scale(k: float, rule: str) -> float:
    """The factor on the reference lr at k times the reference batch under `rule` (LR_RULES)."""
    if rule not in LR_RULES:
        raise ValueError(f"lr_scale: rule {rule!r} not one of {', '.join(LR_RULES)}")
    return {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[rule]


def warmup_start_scale(lr_factor: float) -> float:
    """The factor on the warm-up's start lr. Growing batches keep the recipe's start (Goyal et al. 2017,
    section 2.2: a gradual warm-up from the small-batch rate up to the scaled one); shrinking batches
    scale it with the peak, so the warm-up still rises and the whole schedule keeps its shape."""
    return min(1.0, lr_factor)


def scaled_ema_decay(decay: float, k: float) -> float:
    """decay^k: an EMA keeps its dynamics in images at k times the batch (Busbridge et al., NeurIPS 2023,
    "How to Scale Your EMA", arXiv 2307.13813), e.g. 0.9997^8 = 0.99760."""
    return decay**k


def ema_time_constant_images(decay: float, batch_size: int) -> float:
    """Images the teacher's memory spans at per-step decay `decay`: batch / (1 - decay)."""
    return batch_size / (1.0 - decay)
