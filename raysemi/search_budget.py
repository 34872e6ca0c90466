"""How long a search's budget takes on CPUs, said before its trials start.

A search with the defaults (16 trials of 30,000 iterations at 256x256) is meant for GPUs; with
`--gpus 0` it would run for weeks without saying so. The driver first makes a cheap, optimistic
guess from the sizes; when that is over ten minutes it times a real training step on this
machine and prints the estimate, as a warning with the quick start's sizes when it is over an hour.
"""

from __future__ import annotations

import math
import time

import torch

from raysemi.config import TrainConfig
from raysemi.data import Dataset

#: pixel-samples (patch pixels x batch) per second per CPU thread, a few times what a 2-core EPYC
#: VM does (83,000 for mean teacher at 256x256, 170,000 for the supervised UNet at 64x64): a guess
#: that no CPU beats by much, so a search it puts under MEASURE_S is short anywhere
FAST_CPU_PIXELS_PER_S = 5.0e5
#: a guess at least this long times a real step (cheap at the sizes where the guess is wrong)
MEASURE_S = 600.0
#: an estimate at least this long is a warning
LONG_S = 3600.0


def asha_iterations(num_samples: int, max_iterations: int, grace: int, reduction_factor: float) -> float:
    """Iterations all trials together run when ASHA stops trials as designed: every trial reaches
    the first rung, 1/factor of them the next, and so on, to max_iterations (Tune's rungs are
    grace * factor**k below max_iterations). An estimate: early trials pass rungs more easily."""
    milestones, m = [], float(grace)
    while m < max_iterations:
        milestones.append(m)
        m *= reduction_factor
    milestones.append(float(max_iterations))
    total, previous = 0.0, 0.0
    for k, milestone in enumerate(milestones):
        total += max(1.0, num_samples / reduction_factor ** k) * (milestone - previous)
        previous = milestone
    return min(total, float(num_samples) * max_iterations)


def quick_guess_s(base: TrainConfig, num_samples: int, seeds: int, concurrency: int, threads: int) -> float:
    """An optimistic wall time from the sizes alone (no trial stopped early)."""
    pixels = base.patch_size[0] * base.patch_size[1] * base.batch_size
    return num_samples * seeds * base.max_iterations * pixels / (FAST_CPU_PIXELS_PER_S * threads * concurrency)


def seconds_per_step(base: TrainConfig, method: str, dataset: Dataset, threads: int) -> float:
    """Seconds of one training step of `method` on this machine's CPU with `threads` threads (the
    real step: sampling, losses, backward, optimiser, EMA). A first step over 2 s is the answer
    (at 256x256 a step can take 20 s, and its one-time costs are small beside that); a shorter
    one was the warm-up, and three more steps are timed."""
    from raysemi.loop import Trainer

    cfg = base.replace(method=method, device="cpu", compile="off", cuda_graphs="off",
                       eval_interval=base.max_iterations, log_interval=base.max_iterations)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainer = Trainer(cfg, dataset)
        trainer.start()
        t0 = time.perf_counter()
        trainer.train_until(1)
        first = time.perf_counter() - t0
        if first > 2.0:
            return first
        t0 = time.perf_counter()
        trainer.train_until(4)
        return (time.perf_counter() - t0) / 3
    finally:
        torch.set_num_threads(previous)


def format_long(seconds: float) -> str:
    """'40 minutes', '5.2 hours', '3.1 days'."""
    if seconds < 5400:
        return f"{max(1, round(seconds / 60))} minutes"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def looks_long(base: TrainConfig, *, num_samples: int, seeds: int, concurrency: int, threads: int) -> bool:
    """Whether a CPU search might take long enough to time a step and say so (`cpu_estimate`)."""
    return quick_guess_s(base, num_samples, seeds, concurrency, threads) >= MEASURE_S


def cpu_estimate(base: TrainConfig, methods: list[str], dataset: Dataset, *, num_samples: int, seeds: int,
                 concurrency: int, threads: int, grace: int, reduction_factor: float) -> str:
    """The line to print before a CPU search starts: a measured step and the estimated wall time,
    as a warning with the way out when it is over an hour."""
    method = "mean_teacher" if "mean_teacher" in methods else methods[0]
    step = seconds_per_step(base, method, dataset, threads)
    per_iteration = seeds * step / concurrency
    full = num_samples * base.max_iterations * per_iteration
    asha = asha_iterations(num_samples, base.max_iterations, grace, reduction_factor) * per_iteration
    h, w = base.patch_size
    what = (f"one {method} training step at {h}x{w}, batch {base.batch_size}, took {step:.2f} s on this machine's "
            f"CPU ({threads} thread{'s' if threads > 1 else ''}); {num_samples} trials x {seeds} seed"
            f"{'s' if seeds > 1 else ''} x {base.max_iterations:,} iterations, {concurrency} at once, take about "
            f"{format_long(asha)} if ASHA stops trials as designed, {format_long(full)} if it stops none "
            "(validations not counted)")
    if asha < LONG_S:
        return f"estimate: {what}"
    return (f"warning: {what}. For a first look on CPUs use small sizes (the README's quick start: "
            "--patch-size 64 64 --batch-size 8 --labeled-bs 4 --max-iterations 300), or GPUs (--gpus N); "
            "Ctrl-C stops the search and --resume continues it")
