"""Progress output for long work: a line every few seconds while training, one per validation."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from raysemi.loop import Callback, LoopResult, Trainer


class ConsoleCallback(Callback):
    """Prints training progress (at most every `every_s` seconds) and every validation; also
    appends the same lines to `log_file` when given."""

    def __init__(self, log_file: Path | None = None, every_s: float = 5.0, stream: TextIO | None = None) -> None:
        self.log_file, self.every_s, self.stream = log_file, every_s, stream or sys.stdout
        self._last = 0.0
        self._start = time.perf_counter()

    def write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(line + "\n")

    def on_train_start(self, trainer: Trainer) -> None:
        c = trainer.config
        d = trainer.data.train
        self.write(f"{c.method} on {trainer.data.root}: {len(d.labeled_idx)} labeled slices "
                   f"({len(d.labeled_patients)} patients), {len(d.unlabeled_idx)} unlabeled, "
                   f"{len(trainer.data.val)} validation volumes; model {trainer.model_name}, "
                   f"device {trainer.device}{', bf16' if trainer.amp else ''}; "
                   f"{c.max_iterations} iterations from {trainer.iteration}")

    def on_log(self, trainer: Trainer, iteration: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        if now - self._last < self.every_s and iteration < trainer.config.max_iterations:
            return
        self._last = now
        n = trainer.config.max_iterations
        extra = "".join(f" {k[6:]} {metrics[k]:.4f}" for k in ("train/consistency", "train/consistency_weight")
                        if k in metrics)
        self.write(f"[{iteration:>{len(str(n))}}/{n}] loss {metrics['train/loss']:.4f} "
                   f"sup {metrics.get('train/loss_sup', float('nan')):.4f}{extra} lr {metrics['lr']:.5f} "
                   f"{metrics['it_per_s']:.1f} it/s, {now - self._start:.0f}s")

    def on_eval(self, trainer: Trainer, iteration: int, metrics: dict[str, float], is_best: bool) -> None:
        self.write(f"[{iteration}] val dice {metrics['val/dice']:.4f} hd95 {metrics['val/hd95']:.2f} "
                   f"(best {metrics['val/best_dice']:.4f}){' *' if is_best else ''}")

    def on_train_end(self, trainer: Trainer, result: LoopResult) -> None:
        self.write(f"done: {result.iterations} iterations in {result.seconds:.0f}s; best val dice "
                   f"{result.best_dice:.4f} at iteration {result.best_iteration}")
