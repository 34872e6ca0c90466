"""The training run's console: start, validations and end on the terminal and in train.log, with
the progress bar of `raysemi.progress` (re-exported here) in place of periodic lines on request.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TextIO

from raysemi.config import TrainConfig
from raysemi.loop import Callback, LoopResult, Trainer, effective_schedules
from raysemi.progress import ProgressBar


def scaled_said(config: TrainConfig) -> str:
    """The start line's account of what `schedules: budget` made of the ramp and warm-up ('' if
    nothing was scaled)."""
    scaled = effective_schedules(config)
    if not scaled or config.schedules != "budget":
        return ""
    n = scaled.get("mt_warmup")
    warmup = f", warm-up {n} iteration{'' if n == 1 else 's'}" if n is not None else ""
    return f"; schedules scaled to the budget: ramp units of {scaled['rampup_interval']:.6g} iterations{warmup}"


class ConsoleCallback(Callback):
    """Prints the start of a training run, every validation and the end; appends the same lines,
    plus a progress line at most every `every_s` seconds, to `log_file` when given.

    With `progress`, the console shows a `ProgressBar` (iteration/max, it/s, ETA, last loss, best
    Dice) on `progress_stream` (default: `stream`) instead of the periodic progress lines; without
    it (the default), those lines go to `stream` as well. Ray trials use no ConsoleCallback at all.
    """

    def __init__(self, log_file: Path | None = None, every_s: float = 5.0, stream: TextIO | None = None,
                 progress: bool = False, progress_stream: TextIO | None = None) -> None:
        self.log_file, self.every_s, self.stream = log_file, every_s, stream or sys.stdout
        self.progress, self.progress_stream = progress, progress_stream
        self.bar: ProgressBar | None = None
        self._last = 0.0
        self._start = time.perf_counter()

    def _log(self, line: str) -> None:
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(line + "\n")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, self.stream)
        else:
            print(line, file=self.stream, flush=True)
        self._log(line)

    def close_progress(self) -> None:
        """End the progress bar's line (also on errors, so the next message starts a new line)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_start(self, trainer: Trainer) -> None:
        c = trainer.config
        d = trainer.data.train
        self.write(f"{c.method} on {trainer.data.root}: {len(d.labeled_idx)} labeled slices "
                   f"({len(d.labeled_patients)} patients), {len(d.unlabeled_idx)} unlabeled, "
                   f"{len(trainer.data.val)} validation volumes; model {trainer.model_name}, "
                   f"device {trainer.device}{', bf16' if trainer.amp else ''}"
                   f"{', CUDA graphs' if trainer.cuda_graphs else ''}{', compiled' if trainer.compiled else ''}; "
                   f"{c.max_iterations} iterations from {trainer.iteration}{scaled_said(c)}")
        if self.progress and trainer.iteration < c.max_iterations:
            self.bar = ProgressBar(c.max_iterations, "train", "it", self.progress_stream or self.stream,
                                   initial=trainer.iteration)

    def on_log(self, trainer: Trainer, iteration: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            best = trainer.best["dice"]
            self.bar.update(iteration, f"loss {metrics['train/loss']:.4f}, best dice "
                                       + (f"{best:.4f}" if math.isfinite(best) else "-"))
        now = time.perf_counter()
        if now - self._last < self.every_s and iteration < trainer.config.max_iterations:
            return
        self._last = now
        n = trainer.config.max_iterations
        extra = "".join(f" {k[6:]} {metrics[k]:.4f}" for k in ("train/consistency", "train/consistency_weight")
                        if k in metrics)
        line = (f"[{iteration:>{len(str(n))}}/{n}] loss {metrics['train/loss']:.4f} "
                f"sup {metrics.get('train/loss_sup', float('nan')):.4f}{extra} lr {metrics['lr']:.5f} "
                f"{metrics['it_per_s']:.1f} it/s, {now - self._start:.0f}s")
        if self.bar is None:
            self.write(line)
        else:
            self._log(line)

    def on_eval(self, trainer: Trainer, iteration: int, metrics: dict[str, float], is_best: bool) -> None:
        hd95 = metrics.get("val/hd95", math.nan)  # NaN when not computed (--no-eval-hd95): left out
        shown = "" if math.isnan(hd95) else f" hd95 {hd95:.2f}"
        self.write(f"[{iteration}] val dice {metrics['val/dice']:.4f}{shown} "
                   f"(best {metrics['val/best_dice']:.4f}){' *' if is_best else ''}")

    def on_train_end(self, trainer: Trainer, result: LoopResult) -> None:
        self.close_progress()
        self.write(f"done: {result.iterations} iterations in {result.seconds:.0f}s; best val dice "
                   f"{result.best_dice:.4f} at iteration {result.best_iteration}")
