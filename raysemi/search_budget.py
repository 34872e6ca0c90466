"""How long a search's budget takes on CPUs, said before its trials start.

A search with the defaults (16 trials of 30,000 iterations at 256x256) is meant for GPUs; with
`--gpus 0` it would run for weeks without saying so. The driver first makes a cheap, optimistic
guess from the sizes; when that is over ten minutes it times one real training step of each
searched strategy (in a Ray task, where trials run) and prints the estimate, as a warning with the
quick start's flags when it is over an hour. Once the strategies timed so far put the search over
ten hours (ENOUGH_S), the rest are scaled from them by their usual relative cost instead of timed.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable

import torch

from raysemi.config import TrainConfig
from raysemi.data import Dataset

#: pixel-samples (patch pixels x batch) per second of the supervised UNet's step on one CPU thread,
#: faster than a 2-core EPYC VM does (104,000 at 256x256, 165,000 at 64x64): a search guessed under
#: MEASURE_S at this speed takes under LONG_S on any CPU down to a sixth of it (25,000)
FAST_CPU_PIXELS_PER_S = 1.5e5
#: step time relative to the supervised UNet's (the CPU benchmark's ms/step, README "CPU smoke")
RELATIVE_COST = {"supervised": 1.0, "mean_teacher": 1.25, "uncertainty_aware_mean_teacher": 2.85,
                 "interpolation_consistency": 1.0, "entropy_minimization": 1.0, "pyramid_consistency": 1.15,
                 "adversarial": 1.75}
#: a guess at least this long times real steps (cheap at the sizes where the guess is wrong)
MEASURE_S = 600.0
#: an estimate at least this long is a warning
LONG_S = 3600.0
#: once the strategies timed so far put the estimate (the rest scaled by RELATIVE_COST) past this, the
#: rest are not timed: `--method all` at 256x256 would spend minutes timing a search of weeks
ENOUGH_S = 10 * LONG_S
#: the README's quick start, the way out of a long CPU search (QUICK_START_SCHEDULES: its
#: schedules scaled to 300 iterations by hand, left out under --schedules budget, which scales them)
QUICK_START = ("--patch-size 64 64 --batch-size 8 --labeled-bs 4 --labeled-patients 3 --max-iterations 300 "
               "--eval-interval 100")
QUICK_START_SCHEDULES = "--mt-warmup 10 --rampup-interval 2"


def rungs(max_iterations: int, grace: int, reduction_factor: float, eval_interval: int) -> list[int]:
    """Where ASHA can stop trials, and the end: Tune's milestones (grace * factor**k below
    max_iterations) fall at the first report at or past them, a multiple of eval_interval."""
    points, m = [], float(grace)
    while m < max_iterations:
        points.append(min(math.ceil(m / eval_interval) * eval_interval, max_iterations))
        m *= reduction_factor
    return sorted(set(points) | {max_iterations})


def wall_iterations(num_samples: int, concurrency: int, points: list[int], reduction_factor: float) -> float:
    """Iterations one slot runs in a row when ASHA stops trials as designed: every trial reaches
    the first rung, 1/factor of them the next, and so on; each stretch takes its trials' share of
    the slots, and at least one trial's length (a lone survivor runs alone). A floor: early
    trials pass rungs more easily, as few results are there to compare with."""
    total, previous = 0.0, 0
    for k, point in enumerate(points):
        trials = max(1.0, num_samples / reduction_factor ** k)
        total += max(trials / concurrency, 1.0) * (point - previous)
        previous = point
    return total


def quick_guess_s(base: TrainConfig, methods: list[str], num_samples: int, seeds: int, concurrency: int,
                  threads: int) -> float:
    """An optimistic wall time from the sizes alone (no trial stopped early, a fast CPU, threads that
    scale as their square root, the dearest searched strategy)."""
    pixels = base.patch_size[0] * base.patch_size[1] * base.batch_size
    cost = max(RELATIVE_COST.get(m, 1.0) for m in methods)
    waves = math.ceil(num_samples / concurrency)
    return waves * seeds * base.max_iterations * pixels * cost / (FAST_CPU_PIXELS_PER_S * math.sqrt(threads))


def scaled_steps(steps: dict[str, float], methods: list[str]) -> dict[str, float]:
    """A step time for each of `methods`: the timed ones as timed, the others from the timed ones
    by RELATIVE_COST (the mean over the timed of step / its relative cost, times the other's)."""
    unit = sum(s / RELATIVE_COST.get(m, 1.0) for m, s in steps.items()) / len(steps)
    return {m: steps[m] if m in steps else unit * RELATIVE_COST.get(m, 1.0) for m in methods}


def wall_seconds(base: TrainConfig, steps: dict[str, float], *, num_samples: int, seeds: int, concurrency: int,
                 grace: int, reduction_factor: float) -> tuple[float, float]:
    """(wall seconds if ASHA stops trials as designed, a floor; if it stops none), for steps of
    their mean (TPE picks the strategies as it goes); validations not counted."""
    step = sum(steps.values()) / len(steps)
    points = rungs(base.max_iterations, grace, reduction_factor, base.eval_interval)
    asha = wall_iterations(num_samples, concurrency, points, reduction_factor) * seeds * step
    full = math.ceil(num_samples / concurrency) * base.max_iterations * seeds * step
    return asha, full


def far_past(steps: dict[str, float], *, base: TrainConfig, methods: list[str], **sizes) -> bool:
    """Whether the strategies timed so far, the rest scaled from them, put the search past ENOUGH_S
    even if ASHA stops trials as designed (timing the rest would only refine a figure that is
    a warning either way)."""
    return wall_seconds(base, scaled_steps(steps, methods), **sizes)[0] >= ENOUGH_S


def enough_timed(base: TrainConfig, methods: list[str], **sizes) -> Callable[[dict[str, float]], bool]:
    """`far_past` for this search, to give `time_steps` (a partial: Ray pickles it by reference)."""
    return functools.partial(far_past, base=base, methods=methods, **sizes)


def seconds_per_step(base: TrainConfig, method: str, dataset: Dataset, threads: int, warm_up: bool = False) -> float:
    """Seconds of one training step of `method` on this process's CPU with `threads` threads (the
    real step: sampling, losses, backward, optimiser, EMA). `warm_up`: one untimed step first, for
    the first strategy timed in a fresh process (its one-time costs are up to 20% of a 2 s step).
    Then a step over 2 s is the answer (at 256x256 one takes 20-45 s); a shorter one is taken as
    the warm-up after all, and three more steps are timed."""
    from raysemi.loop import Trainer

    cfg = base.replace(method=method, device="cpu", compile="off", cuda_graphs="off",
                       eval_interval=base.max_iterations, log_interval=base.max_iterations)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainer = Trainer(cfg, dataset)
        trainer.start()
        if warm_up:
            trainer.train_until(1)
        start = trainer.iteration
        t0 = time.perf_counter()
        trainer.train_until(start + 1)
        first = time.perf_counter() - t0
        if first > 2.0:
            return first
        t0 = time.perf_counter()
        trainer.train_until(start + 4)
        return (time.perf_counter() - t0) / 3
    finally:
        torch.set_num_threads(previous)


def _step_seconds(base: TrainConfig, methods: list[str], dataset: Dataset, threads: int,
                  enough: Callable[[dict[str, float]], bool] | None) -> tuple[dict[str, float], str]:
    import ray

    steps: dict[str, float] = {}
    for i, method in enumerate(methods):
        steps[method] = seconds_per_step(base, method, dataset, threads, warm_up=i == 0)
        if enough is not None and len(steps) < len(methods) and enough(steps):
            break
    return steps, ray.util.get_node_ip_address()


#: the timing gives up after this long (a cluster whose CPUs are all taken would never start it)
TIMING_LIMIT_S = 600.0


def time_steps(base: TrainConfig, methods: list[str], dataset: Dataset, threads: int,
               enough: Callable[[dict[str, float]], bool] | None = None,
               limit_s: float = TIMING_LIMIT_S) -> tuple[dict[str, float], str]:
    """`seconds_per_step` of each strategy in order, and the address of the node that timed them, in
    one Ray task of `threads` CPUs, where trials run (on a cluster, a node that has them); the
    task's process ends with it, and its memory with it. Stops before the rest once `enough` of the
    steps so far is true (`enough_timed`). TimeoutError after `limit_s`."""
    import ray

    ref = ray.remote(max_calls=1)(_step_seconds).options(num_cpus=threads).remote(base, methods, dataset, threads,
                                                                                  enough)
    done, _ = ray.wait([ref], timeout=limit_s)
    if not done:
        ray.cancel(ref, force=True)
        raise TimeoutError(f"not done in {limit_s:g} s (are the cluster's CPUs taken by other work?)")
    return ray.get(ref)


def plural(n: float, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def format_long(seconds: float) -> str:
    """'40 minutes', '5.2 hours', '3.1 days'."""
    if seconds < 5400:
        return plural(max(1, round(seconds / 60)), "minute")
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def looks_long(base: TrainConfig, methods: list[str], *, num_samples: int, seeds: int, concurrency: int,
               threads: int) -> bool:
    """Whether a CPU search might take long enough to time its steps and say so (`estimate_line`)."""
    return quick_guess_s(base, methods, num_samples, seeds, concurrency, threads) >= MEASURE_S


def estimate_line(base: TrainConfig, steps: dict[str, float], *, num_samples: int, seeds: int, concurrency: int,
                  threads: int, grace: int, reduction_factor: float, where: str = "this machine",
                  methods: list[str] | None = None) -> str:
    """The line to print before a CPU search starts, from the strategies' timed steps (their mean:
    TPE picks the strategies as it goes) on `where`: the estimated wall time, as a warning with the
    way out when it is over an hour. `methods`: all the searched strategies, where `time_steps`
    stopped before timing them all (the rest are scaled from the timed ones)."""
    untimed = [m for m in methods or [] if m not in steps]
    timed_names = list(steps)
    steps = scaled_steps(steps, methods) if untimed else steps
    asha, full = wall_seconds(base, steps, num_samples=num_samples, seeds=seeds, concurrency=concurrency,
                              grace=grace, reduction_factor=reduction_factor)
    step = sum(steps.values()) / len(steps)
    h, w = base.patch_size
    if len(steps) == 1:
        (method,) = steps
        timed = f"one {method} training step at {h}x{w}, batch {base.batch_size}, took {step:.2f} s"
    else:
        fast, slow = min(steps, key=steps.get), max(steps, key=steps.get)
        timed = (f"a training step at {h}x{w}, batch {base.batch_size}, {'takes' if untimed else 'took'} "
                 f"{steps[fast]:.2f} s ({fast}) to {steps[slow]:.2f} s ({slow}), {step:.2f} s on average over the "
                 f"{len(steps)} strategies,")
    threads_said = plural(threads, "thread")
    if untimed:
        threads_said += (f"; timed for {', '.join(timed_names)}, the other {len(untimed)} scaled from "
                         f"{'it' if len(timed_names) == 1 else 'them'} by their usual relative cost, as the estimate "
                         f"was already over {ENOUGH_S / 3600:g} hours")
    if base.compiles("cpu"):
        threads_said += ("; timed uncompiled: compile: on trials first spend a compile warm-up, then run at a speed "
                         "not measured here")
    what = (f"{timed} on {where}'s CPU ({threads_said}); {plural(num_samples, 'trial')} x "
            f"{plural(seeds, 'seed')} x {plural(base.max_iterations, 'iteration')}, {concurrency} at once, take "
            f"about {format_long(asha)} if ASHA stops trials as designed (a floor), {format_long(full)} if it stops "
            "none (validations not counted)")
    if asha < LONG_S:
        return f"estimate: {what}"
    quick = QUICK_START if base.schedules == "budget" else f"{QUICK_START} {QUICK_START_SCHEDULES}"
    return (f"warning: {what}. For a first look on CPUs use small sizes (the README's quick start: {quick}), "
            "or GPUs (--gpus N); Ctrl-C stops the search and --resume continues it")
