"""Schedules as pure functions of the iteration (0-based, as the reference's `iter_num`).

Each one is what the SSL4MIS 2D scripts compute inline; here they are tested in one place.
"""

from __future__ import annotations

import math
from fractions import Fraction


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


def consistency_weight(iteration: int, consistency: float, rampup: float, interval: float | Fraction = 150) -> float:
    """`consistency * sigmoid_rampup(iteration // interval, rampup)` (the reference's `iter // 150`;
    an interval below 1, from `schedules: budget` on a short run, counts several units an iteration;
    a Fraction, as that mode gives, keeps the units' boundaries exact)."""
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
#: the reference's consistency ramp, in ramp units (its `consistency_rampup`)
REFERENCE_RAMPUP = 200.0
#: the reference's iterations per consistency ramp unit (its `iter_num // 150`)
REFERENCE_RAMPUP_INTERVAL = 150


def schedule_lengths(rampup_interval: float, mt_warmup: int, max_iterations: int,
                     mode: str = "reference") -> tuple[float | Fraction, int]:
    """The iterations per ramp unit and of mean teacher's warm-up a run uses. 'reference': as given;
    'budget': given for the reference's 30,000 iterations and scaled to `max_iterations`. A ramp
    unit may then be a fraction of an iteration (the ramp still spans the same share of the run);
    it is an exact Fraction, so unit k starts at the first iteration at or after k scaled units
    (where the reference's would, scaled), at every budget; a float product lands some a step
    late. A warm-up is at least 1 iteration when it is not 0, so a term the config delays is never
    on at the first step."""
    if mode == "reference":
        return rampup_interval, mt_warmup
    if mode != "budget":
        raise ValueError(f"schedules: {mode!r}; expected 'reference' or 'budget'")
    scale = Fraction(max_iterations, REFERENCE_ITERATIONS)
    warmup = max(1, round(mt_warmup * scale)) if mt_warmup > 0 else 0
    return Fraction(rampup_interval) * scale, warmup


def ramp_reached(max_iterations: int, rampup: float, interval: float | Fraction) -> float:
    """The fraction of the final consistency weight that a run of `max_iterations` reaches at its
    last iteration."""
    return sigmoid_rampup((max_iterations - 1) // interval, rampup)


def scaled_to_budget(iterations: int, max_iterations: int) -> int:
    """A schedule length the reference sets for 30,000 iterations, scaled to `max_iterations`
    (at least 1): mean teacher's 1000-iteration warm-up is 10 for a 300-iteration run (the quick
    start's value)."""
    return max(1, round(iterations * max_iterations / REFERENCE_ITERATIONS))


def short_budget_note(max_iterations: int, reached: dict[str, float], warmups: dict[str, int],
                      rampup: float = 200.0, mode: str = "reference", drawn: bool = False) -> str | None:
    """One line for a budget too short for the schedules, else None. `reached`: strategy -> the
    fraction of its final consistency weight reached by the last iteration (the most a search
    could draw); `warmups`: strategy -> iterations its consistency term is off at least; `rampup`:
    the run's --consistency-rampup; `drawn`: a search's spaces draw it (a flag would not set it;
    the suggestions then scale the reference's units). Said when a weight stays under half its final value, or a term is off for
    half the run or more (under 'budget', not for the 1-iteration floor of a scaled warm-up). It
    suggests the reference's schedules scaled to the budget (`suggested_schedules`); under
    'reference', also the values for `--schedules budget`."""
    weak = {m: r for m, r in reached.items() if r < 0.5}
    late = {m: w for m, w in warmups.items() if w >= max_iterations / 2 and (mode != "budget" or w > 1)}
    if not weak and not late:
        return None
    parts = []
    if weak:
        unit = ("iterations of the reference's 30,000, scaled to this run by --schedules budget" if mode == "budget"
                else "iterations")
        units = "--consistency-rampup units (drawn by the spaces)" if drawn else "--consistency-rampup units"
        parts.append(f"the consistency weight reaches at most {max(weak.values()):.0%} of --consistency by the last "
                     f"iteration ({', '.join(weak)}; its ramp is {units} of --rampup-interval {unit})")
    for m, w in late.items():
        span = "throughout" if w >= max_iterations else f"for the first {w:,} of them"
        parts.append(f"{m}'s consistency term is off {span}" + (f" (--mt-warmup {w})" if mode != "budget" else ""))
    said = f"note: in {max_iterations:,} iteration{'' if max_iterations == 1 else 's'} {'; '.join(parts)}. "
    fix = suggested_schedules(max_iterations, rampup, bool(weak), bool(late), mode, drawn)
    if mode == "budget":
        return (f"{said}The reference's schedules, which --schedules budget scales to this budget: {fix} "
                "(README: Short budgets)")
    # values scaled by hand would be scaled again: --schedules budget wants them as for 30,000 iterations
    scaled = suggested_schedules(max_iterations, rampup, bool(weak), bool(late), "budget", drawn)
    own = " ".join(([f"--rampup-interval {REFERENCE_RAMPUP_INTERVAL}"] if weak else []) +
                   ([f"--mt-warmup {REFERENCE_MT_WARMUP}"] if late else []))
    whose = ((" (the reference's values, the defaults)" if weak and late else " (the reference's value, the default)")
             if scaled == own else "")
    return (f"{said}The reference's schedules (set for {REFERENCE_ITERATIONS:,} iterations) scaled to this budget: "
            f"{fix}; or --schedules budget with {scaled}{whose}, which it scales to any --max-iterations "
            "(README: Short budgets)")


def scaled_again_note(max_iterations: int, rampup_interval: int | None, mt_warmup: int | None,
                      ramp: float) -> str | None:
    """One line for values that `--schedules budget` would scale a second time, else None. Under
    it a ramp (`ramp`: its units times `rampup_interval`, as set for 30,000 iterations; a search's
    longest) over under a tenth of the run, or a warm-up that is not 0 but under a tenth of the
    reference's, reads like one already scaled to a short run by hand (the quick start's 2 and 10:
    a ramp over 1% of the run, a warm-up of 1/100 of the reference's), which it scales again. The
    line says what they become in this run. None for a value not used or drawn by a search."""
    given, effects, defaults = [], [], []
    if rampup_interval is not None and 0 < ramp < REFERENCE_ITERATIONS / 10:
        # the first iteration i with i // (scaled interval) >= units, i.e. i >= the scaled ramp
        full = max(1, math.ceil(Fraction(ramp) * Fraction(max_iterations, REFERENCE_ITERATIONS)))
        given.append(f"--rampup-interval {rampup_interval}")
        effects.append(f"the consistency weight is at its full value by iteration {full:,}")
        defaults.append(f"--rampup-interval {REFERENCE_RAMPUP_INTERVAL}")
    if mt_warmup is not None and 0 < mt_warmup < REFERENCE_MT_WARMUP / 10:
        _, warmup = schedule_lengths(0, mt_warmup, max_iterations, "budget")
        given.append(f"--mt-warmup {mt_warmup}")
        effects.append(f"the warm-up is {warmup:,} iteration{'' if warmup == 1 else 's'}")
        defaults.append(f"--mt-warmup {REFERENCE_MT_WARMUP}")
    if not given:
        return None
    one = len(given) == 1
    return (f"note: --schedules budget counts {' '.join(given)} as set for {REFERENCE_ITERATIONS:,} iterations and "
            f"scales {'it' if one else 'them'}: in {max_iterations:,} iterations {' and '.join(effects)}. "
            f"If {'it was' if one else 'they were'} scaled to this budget by hand, give the reference's "
            f"{' '.join(defaults)} (the default{'' if one else 's'}) and let it scale {'it' if one else 'them'} "
            "(README: Short budgets)")


def suggested_schedules(max_iterations: int, rampup: float, ramp: bool, warmup: bool, mode: str,
                        drawn: bool = False) -> str:
    """The flags that give the reference's schedules at this budget: for the `ramp`, a
    --rampup-interval that makes `rampup` units (200 if 0) span the run, as 200 units of 150 span
    the reference's 30,000 (rounded, so up to 1.5 times it; with fewer iterations than units,
    units of 1 iteration and as many as the run has), and for the `warmup`, mean teacher's share
    of the run. Under 'budget' they are given for 30,000 iterations, which it scales. `drawn`: a
    search's spaces draw the units, so the interval is the reference's 150 scaled (each draw then
    spans the share of the run it would in the reference's) and no --consistency-rampup is given."""
    flags = []
    if ramp:
        units = REFERENCE_RAMPUP if drawn or rampup <= 0 else rampup
        span = REFERENCE_ITERATIONS if mode == "budget" else max_iterations  # what the ramp should span
        flags.append(f"--rampup-interval {max(1, round(span / units))}" if units <= span else
                     "--rampup-interval 1" if drawn else f"--rampup-interval 1 --consistency-rampup {span}")
    if warmup:
        scaled = REFERENCE_MT_WARMUP if mode == "budget" else scaled_to_budget(REFERENCE_MT_WARMUP, max_iterations)
        flags.append(f"--mt-warmup {scaled}")
    return " ".join(flags)
