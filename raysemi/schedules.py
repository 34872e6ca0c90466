"""Schedules as pure functions of the iteration (0-based, as the reference's `iter_num`).

Each one is what the SSL4MIS 2D scripts compute inline; here they are tested in one place.
"""

from __future__ import annotations

import math


def poly_lr(iteration: int, max_iterations: int, base_lr: float, power: float = 0.9) -> float:
    """Poly decay: `base_lr * (1 - iteration / max_iterations) ** power`."""
    frac = min(max(iteration / max_iterations, 0.0), 1.0)
    return base_lr * (1.0 - frac) ** power


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """Laine & Aila's ramp: `exp(-5 (1 - t)^2)` with `t = clip(current / length, 0, 1)`; 1 if length is 0."""
    if rampup_length == 0:
        return 1.0
    t = min(max(current, 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def consistency_weight(iteration: int, consistency: float, rampup: float, interval: int = 150) -> float:
    """`consistency * sigmoid_rampup(iteration // interval, rampup)` (the reference's `iter // 150`)."""
    return consistency * sigmoid_rampup(iteration // interval, rampup)


def ema_alpha(iteration: int, decay: float) -> float:
    """Teacher EMA coefficient: `min(1 - 1 / (iteration + 1), decay)` (0 at the first step: a copy)."""
    return min(1.0 - 1.0 / (iteration + 1), decay)


def uncertainty_threshold(iteration: int, max_iterations: int, start: float = 0.75, end: float = 1.0) -> float:
    """UA-MT threshold: `(start + (end - start) * sigmoid_rampup(iteration, max_iterations)) * ln 2`."""
    return (start + (end - start) * sigmoid_rampup(iteration, max_iterations)) * math.log(2)
