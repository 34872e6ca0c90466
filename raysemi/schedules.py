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



#: the budget the reference's schedule lengths are set for (its 2D scripts' max_iterations)
REFERENCE_ITERATIONS = 30_000
#: mean teacher's warm-up in the reference: iterations before its consistency term starts
REFERENCE_MT_WARMUP = 1000


def ramp_reached(max_iterations: int, rampup: float, interval: int) -> float:
    """The fraction of the final consistency weight that a run of `max_iterations` reaches at its
    last iteration."""
    return sigmoid_rampup((max_iterations - 1) // interval, rampup)


def scaled_to_budget(iterations: int, max_iterations: int) -> int:
    """A schedule length the reference sets for 30,000 iterations, scaled to `max_iterations`
    (at least 1): mean teacher's 1000-iteration warm-up is 10 for a 300-iteration run (the quick
    start's value)."""
    return max(1, round(iterations * max_iterations / REFERENCE_ITERATIONS))


def short_budget_note(max_iterations: int, reached: dict[str, float], warmups: dict[str, int],
                      rampup: float = 200.0) -> str | None:
    """One line for a budget too short for the schedules, else None. `reached`: strategy -> the
    fraction of its final consistency weight reached by the last iteration (the most a search
    could draw); `warmups`: strategy -> iterations its consistency term is off at least; `rampup`:
    the run's --consistency-rampup. Said when a weight stays under half its final value, or a term
    is off for half the run or more. It suggests the reference's schedules scaled to the budget:
    a ramp of `rampup` units that spans the run (as 200 units of 150 span its 30,000; with fewer
    iterations than units, units of 1 iteration, as many as the run has), and the warm-up's share."""
    weak = {m: r for m, r in reached.items() if r < 0.5}
    late = {m: w for m, w in warmups.items() if w >= max_iterations / 2}
    if not weak and not late:
        return None
    parts, fix = [], []
    if weak:
        parts.append(f"the consistency weight reaches at most {max(weak.values()):.0%} of --consistency by the last "
                     f"iteration ({', '.join(weak)}; its ramp is --consistency-rampup units of --rampup-interval "
                     "iterations)")
        interval = round(max_iterations / (rampup if rampup > 0 else 200.0))
        fix.append(f"--rampup-interval {interval}" if interval >= 1 else
                   f"--rampup-interval 1 --consistency-rampup {max_iterations}")
    for m, w in late.items():
        span = "throughout" if w >= max_iterations else f"for the first {w:,} of them"
        parts.append(f"{m}'s consistency term is off {span} (--mt-warmup {w})")
    if late:
        fix.append(f"--mt-warmup {scaled_to_budget(REFERENCE_MT_WARMUP, max_iterations)}")
    return (f"note: in {max_iterations:,} iterations {'; '.join(parts)}. The reference's schedules (set for "
            f"{REFERENCE_ITERATIONS:,} iterations) scaled to this budget: {' '.join(fix)} (README: Short budgets)")
