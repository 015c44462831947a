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


def ema_decay(step: int, decay: float) -> float:
    """min(1 - 1/(step + 1), decay), step counted from 1 at the first update (paper section 3).

    Early on the teacher is the plain average of all states so far, not a heavily biased EMA.
    """
    if step < 1:
        raise ValueError(f"ema_decay: step {step} must be >= 1 (the first update is step 1)")
    return min(1.0 - 1.0 / (step + 1), decay)
