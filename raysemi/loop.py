"""The method-agnostic training loop: the same code under `raysemi.train`, Ray Tune and tests.

It owns what the reference repeats in every script: SGD with the poly schedule, the teacher's
EMA update, the strategy's after-step hook, evaluation every `eval_interval` iterations,
best-checkpoint keeping, NaN detection and reporting through callbacks. No Ray or MLflow here:
those arrive as callbacks.
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raysemi import checkpoint
from raysemi.config import TrainConfig
from raysemi.cuda_graph import GraphedStep, set_capturable
from raysemi.data import BatchSampler, Dataset, TrainTensors
from raysemi.data.sampler import to_device
from raysemi.errors import UserError
from raysemi.inference import evaluate_volumes
from raysemi.methods import create_method, get_method
from raysemi.metrics import Summary
from raysemi.models import create_model
from raysemi.progress import ProgressBar
from raysemi.schedules import ema_alpha, poly_lr, schedule_lengths


#: strategy -> why `compile: auto` gave up compiling its networks in this process: the other
#: trainers of that strategy here (a trial's other seeds, a retrain's later ones) then train
#: uncompiled without paying for the same failed attempt again; other strategies still try
_compile_failed_here: dict[str, str] = {}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Callback:
    """Hooks the loop calls; override what you need. `trainer` is the running `Trainer`."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_log(self, trainer: "Trainer", iteration: int, metrics: dict[str, float]) -> None: ...
    def on_eval(self, trainer: "Trainer", iteration: int, metrics: dict[str, float], is_best: bool) -> None: ...
    def on_train_end(self, trainer: "Trainer", result: "LoopResult") -> None: ...


@dataclass
class LoopResult:
    iterations: int
    best_dice: float
    best_iteration: int
    best_metrics: dict[str, float]
    last_metrics: dict[str, float]
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _reason(err: BaseException) -> str:
    """A torch.compile error in one line: its type, and what the compiler itself raised (the
    first line of `BackendCompilerFailed` only names the backend)."""
    inner = getattr(err, "inner_exception", None)
    cause = inner if inner is not None else err
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    what = f"{type(cause).__name__}: {lines[0] if lines else ''}" if inner is not None else (lines[0] if lines else "")
    return f"{type(err).__name__}: {what}"[:300]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device: {name!r} is invalid; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {name!r} is not available on this machine (no CUDA); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device: {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                        "expected cuda:0 .. cuda:N-1")
    return device


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """`theta_t = alpha * theta_t + (1 - alpha) * theta_s` over parameters (not buffers, as the
    reference)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if hasattr(torch, "_foreach_lerp_"):
        torch._foreach_lerp_(t_params, s_params, 1.0 - alpha)
    else:  # pragma: no cover
        for t, s in zip(t_params, s_params):
            t.mul_(alpha).add_(s, alpha=1.0 - alpha)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_strategy(config: TrainConfig, source: str = "config") -> tuple[str, nn.Module]:
    """(model name, strategy) for a config; UserError when the strategy cannot run with it (a model
    it cannot use, ICT's odd unlabeled count, an EMA teacher asked of a strategy without one)."""
    cls = get_method(config.method)
    model_name = cls.models[0] if config.model == "auto" else config.model
    if model_name not in cls.models:
        raise UserError(f"{source}: model: {model_name!r} cannot be used by {cls.name}; "
                        f"expected one of {', '.join(cls.models)}")
    student = create_model(model_name, in_channels=config.in_channels, num_classes=config.num_classes)
    interval, warmup = schedule_lengths(config.rampup_interval, config.mt_warmup, config.max_iterations,
                                        config.schedules)
    try:
        strategy = create_method(config.method, student, **{**config.to_dict(), "rampup_interval": interval,
                                                             "mt_warmup": warmup})
    except ValueError as err:  # the strategy's messages start with its name, which may be `source`
        raise UserError(str(err) if str(err).startswith(f"{source}:") else f"{source}: {err}") from None
    if config.eval_model == "teacher" and strategy.teacher is None:
        raise UserError(f"{source}: eval_model: 'teacher' but {cls.name} has no EMA teacher; expected 'student'")
    return model_name, strategy


def effective_schedules(config: TrainConfig) -> dict[str, float]:
    """The strategy's ramp unit and warm-up in iterations (only those it uses; {} for one without
    unlabeled data), as `schedules` makes them of --rampup-interval and --mt-warmup: for the
    console and MLflow (`effective/...`, logged in either mode, so a resume that changes the mode
    or, under 'budget', --max-iterations is tagged `resumed/effective/...`)."""
    cls = get_method(config.method)
    if not cls.uses_unlabeled:
        return {}
    interval, warmup = schedule_lengths(config.rampup_interval, config.mt_warmup, config.max_iterations,
                                        config.schedules)
    return {"rampup_interval": float(interval), **({"mt_warmup": warmup} if "mt_warmup" in cls.hyperparameters else {})}


class Trainer:
    """Builds the strategy, its networks and optimisers from a config, and trains them."""

    def __init__(self, config: TrainConfig, data: Dataset, callbacks: list[Callback] | tuple = (),
                 output_dir: str | Path | None = None, device: torch.device | None = None) -> None:
        self.config = config
        self.data = data
        self.callbacks = list(callbacks)
        self.output_dir = Path(output_dir) if output_dir else None
        self.device = device or resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            # CUDA graph capture and compiled kernels use the current device's streams: make it
            # this run's (a trial on cuda:2, `--device cuda:1`), as multi-GPU scripts do
            torch.cuda.set_device(self.device)
        seed_everything(config.seed)
        cls = get_method(config.method)
        self.model_name, self.strategy = build_strategy(config)
        self.amp = config.amp == "bf16" or (config.amp == "auto" and self.device.type == "cuda")
        self.channels_last = config.channels_last == "on" or (
            config.channels_last == "auto" and self.amp and self.device.type == "cuda")
        if config.cuda_graphs == "on" and self.device.type != "cuda":
            raise UserError(f"config: cuda_graphs: 'on' needs a CUDA device (device is {self.device}); "
                            "expected 'auto' or 'off'")
        # the NaN test switch changes the loss on the host, which a replayed graph cannot do
        self.cuda_graphs = config.fault_nan_at < 0 and (
            config.cuda_graphs == "on" or (config.cuda_graphs == "auto" and self.device.type == "cuda"))
        self._graphed: GraphedStep | None = None
        self.strategy.to(self.device)
        if self.channels_last:
            self.strategy.to(memory_format=torch.channels_last)
        self.compiled = config.compiles(self.device.type)
        self.compile_failure: str | None = None  # why `compile: auto` gave up compiling, if it did
        self._compile_tried = False
        if self.compiled and config.compile == "auto" and config.method in _compile_failed_here:
            self.compiled, self.compile_failure = False, _compile_failed_here[config.method]
        if self.compiled:
            for net in self.strategy.networks().values():  # in place: parameter names and checkpoints stay
                net.compile()
        self.optimizer = torch.optim.SGD(self.strategy.student.parameters(), lr=config.base_lr,
                                         momentum=config.momentum, weight_decay=config.weight_decay)
        self.extra_optimizers = self.strategy.extra_optimizers()
        self.train_tensors = TrainTensors.from_slices(data.train, config.patch_size).to(self.device)
        unlabeled_bs = config.unlabeled_bs if cls.uses_unlabeled else 0
        labeled_bs = config.labeled_bs if cls.uses_unlabeled else config.batch_size
        try:
            self.sampler = BatchSampler(self.train_tensors, labeled_bs, unlabeled_bs, config.seed)
        except ValueError as err:
            raise UserError(f"{data.root}: {err}") from None
        self.iteration = 0
        self.best: dict[str, Any] = {"dice": -math.inf, "iteration": -1, "metrics": {}}
        self.history: list[dict[str, float]] = []  # validation metrics at each evaluation
        self.train_history: list[dict[str, float]] = []  # training losses at each log (for the curves)
        self.last_metrics: dict[str, float] = {}
        self.last_logs: dict[str, float] = {}
        # wall seconds in this process: training steps (graph capture and compile included) and
        # validations (with their checkpoints); a search's wall-time projection reads them apart
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self._start_time = time.perf_counter()
        self._t_log, self._it_log = self._start_time, 0

    # -- evaluation ------------------------------------------------------------------------
    def eval_network(self, which: str | None = None) -> nn.Module:
        which = which or self.config.eval_model
        if which == "teacher":
            if self.strategy.teacher is None:
                raise UserError(f"config: eval_model: 'teacher' but {self.config.method} has no teacher; expected 'student'")
            return self.strategy.teacher
        return self.strategy.student

    def evaluate(self, volumes=None, which: str | None = None, distances: bool | None = None,
                 bar: ProgressBar | None = None) -> Summary:
        """Per-volume metrics of the student (or teacher) on the validation volumes (or others);
        `bar` counts the volumes whose metrics are done. Evaluation compiles graphs of its own
        (eval mode, other batch sizes): if that fails under `compile: auto`, the run goes on
        uncompiled, as when the first step's compiling fails."""
        net = self.eval_network(which)

        def run() -> Summary:
            return evaluate_volumes(net, self.data.val if volumes is None else volumes, self.config.num_classes,
                                    self.config.patch_size, self.device, self.config.eval_batch_size,
                                    self.config.eval_hd95 if distances is None else distances, self.amp,
                                    self.channels_last, bar=bar)

        try:
            return run()
        except torch._dynamo.exc.TorchDynamoException as err:
            if not (self.compiled and self.config.compile == "auto"):
                raise
            self._stop_compiling(_reason(err), "at validation")
            return run()

    # -- state -----------------------------------------------------------------------------
    def checkpoint_payload(self, full: bool = True) -> dict[str, Any]:
        """Networks and config; with `full`, everything needed to resume bit-for-bit."""
        payload: dict[str, Any] = {
            "config": self.config.to_dict(), "model": self.model_name, "iteration": self.iteration,
            "best": {"dice": float(self.best["dice"]), "iteration": int(self.best["iteration"])},
            "networks": {name: m.state_dict() for name, m in self.strategy.networks().items()},
        }
        if full:
            payload.update(
                optimizer=self.optimizer.state_dict(),
                extra_optimizers={k: o.state_dict() for k, o in self.extra_optimizers.items()},
                sampler=self.sampler.state_dict(),
                rng={"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
                history=[{k: float(v) for k, v in h.items()} for h in self.history],
                train_history=[{k: float(v) for k, v in h.items()} for h in self.train_history],
                best_metrics={k: float(v) for k, v in self.best["metrics"].items()},
                timing={"train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds},
            )
        return payload

    def save(self, path: str | Path, full: bool = True) -> Path:
        return checkpoint.save(path, self.checkpoint_payload(full))

    def load(self, path: str | Path) -> None:
        """Resume from a full checkpoint written by `save`."""
        # onto the CPU first: load_state_dict moves tensors to the parameters' device, and the
        # sampler's generator state must stay a CPU ByteTensor
        self.restore(checkpoint.load(path, map_location="cpu"), path)

    def restore(self, ckpt: dict[str, Any], path: str | Path) -> None:
        """Take the state of a full checkpoint payload (`path` names it in errors)."""
        nets = self.strategy.networks()
        for name, state in ckpt["networks"].items():
            if name not in nets:
                saved = ckpt["config"].get("method", "another strategy")
                raise UserError(f"{path}: networks.{name}: not a network of {self.config.method}; the checkpoint "
                                f"was trained with {saved}: expected its config (leave out --config and --method "
                                "to take the checkpoint's)")
            checkpoint.load_network(nets[name], state, path, name)
        if "optimizer" not in ckpt:
            raise UserError(f"{path}: optimizer: missing; expected a full (resumable) checkpoint such as last.pt")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for k, state in ckpt.get("extra_optimizers", {}).items():
            self.extra_optimizers[k].load_state_dict(state)
            set_capturable(self.extra_optimizers[k], False, self.device)  # a graph sets it again at capture
        self._graphed = None  # the optimisers' state tensors are new: capture again
        self.sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if ckpt["rng"].get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), self.device)
        self.iteration = int(ckpt["iteration"])
        self.best = {"dice": ckpt["best"]["dice"], "iteration": ckpt["best"]["iteration"],
                     "metrics": dict(ckpt.get("best_metrics", {}))}
        self.history = list(ckpt.get("history", []))
        self.train_history = list(ckpt.get("train_history", []))
        timing = ckpt.get("timing", {})  # so that a resumed trial's seconds go on from where they were
        self.train_seconds = float(timing.get("train_seconds", 0.0))
        self.eval_seconds = float(timing.get("eval_seconds", 0.0))

    def forget_best(self) -> None:
        """Count the best checkpoint afresh (a run resumed into a folder without its best.pt)."""
        self.best = {"dice": -math.inf, "iteration": -1, "metrics": {}}

    # -- training --------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.device.type == "cuda":  # the queued training steps count as training, not validation
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            self._validate_and_keep()
        finally:
            self.eval_seconds += time.perf_counter() - t0

    def _validate_and_keep(self) -> None:
        summary = self.evaluate()
        metrics = {f"val/{k}": v for k, v in summary.means().items()}
        metrics["iteration"] = float(self.iteration)
        is_best = metrics["val/dice"] > self.best["dice"]
        if is_best:
            self.best = {"dice": metrics["val/dice"], "iteration": self.iteration, "metrics": metrics}
        metrics["val/best_dice"] = float(self.best["dice"])
        self.history.append(metrics)
        self.last_metrics = metrics
        if self.output_dir is not None:
            if is_best:
                self.save(self.output_dir / "best.pt", full=False)
            self.save(self.output_dir / "last.pt", full=True)
        for cb in self.callbacks:
            cb.on_eval(self, self.iteration, metrics, is_best)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def start(self) -> None:
        """Call the callbacks' `on_train_start` and put the networks in training mode."""
        self._start_time = time.perf_counter()
        self._t_log, self._it_log = time.perf_counter(), self.iteration
        for cb in self.callbacks:
            cb.on_train_start(self)
        self.strategy.train()

    def _eager_step(self, it: int, lr: float, inputs: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One iteration op by op: the CPU path, and CUDA with `cuda_graphs: off`."""
        batch = self.sampler.next()
        if self.channels_last:
            batch.image = batch.image.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        inputs = {k: to_device(v, self.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
        with self._autocast():
            out = self.strategy.losses(batch, inputs)
        if it == self.config.fault_nan_at:  # test switch: a trial that diverges
            out["loss"] = out["loss"] * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.optimizer.step()
        if self.strategy.teacher is not None:
            ema_update(self.strategy.teacher, self.strategy.student, ema_alpha(it, self.strategy.ema_decay))
        with self._autocast():
            extra = self.strategy.after_step(batch, inputs)
        return out, extra

    def _graphed_step(self, it: int, lr: float, inputs: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One iteration through `GraphedStep`: captured once on CUDA, then replayed."""
        if self._graphed is None:
            self._graphed = GraphedStep(self, capture=self.device.type == "cuda")
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # what a checkpoint records; the graph reads its own buffer
        out = self._graphed(self.sampler.draw(), inputs, it, lr)
        if self._graphed.failure and self.compiled and self.config.compile == "auto":
            # `auto` compiles only inside graphs: the compiled step without them measured slower than eager
            self._stop_compiling("not used, as the CUDA graph capture failed (compiled without graphs is slower "
                                 "than eager)", warn=False, recapture=False)
        return out

    @property
    def graph_failure(self) -> str | None:
        """Why capture failed (training then went on eagerly), or None."""
        return self._graphed.failure if self._graphed is not None else None

    @property
    def compile_status(self) -> str:
        """'on', 'off', or 'failed: <why>' (the value of the runs' `compiled` tag)."""
        if self.compile_failure:
            return f"failed: {self.compile_failure}"
        return "on" if self.compiled else "off"

    @property
    def graph_status(self) -> str:
        """'on', 'off', or 'failed: <why>' (the value of the runs' `cuda_graphs` tag)."""
        if self.graph_failure:
            return f"failed: {self.graph_failure}"
        return "on" if self.cuda_graphs else "off"

    @property
    def speed_path(self) -> dict[str, str]:
        """How this session trains: device, autocast, CUDA graphs, compile (the runs' speed tags)."""
        return {"device": str(self.device), "amp": "bf16" if self.amp else "off", "cuda_graphs": self.graph_status,
                "compiled": self.compile_status}

    def train_until(self, stop: int) -> None:
        """Train up to iteration `stop` (capped at max_iterations), validating on the way."""
        cfg = self.config
        stop = min(stop, cfg.max_iterations)
        step = self._graphed_step if self.cuda_graphs else self._eager_step
        t0, eval0 = time.perf_counter(), self.eval_seconds
        try:
            self._train_steps(stop, step)
            if self.device.type == "cuda":  # the time of the steps, not of their launches
                torch.cuda.synchronize(self.device)
        finally:
            self.train_seconds += time.perf_counter() - t0 - (self.eval_seconds - eval0)

    def _first_compiled_step(self, step: Callable, it: int, lr: float, inputs: dict):
        """The first step of a run that `compile: auto` compiled, where the compiling happens: if
        torch.compile cannot work on this machine (no C++ compiler, no triton, ...), one warning
        says why and the step runs again uncompiled, from the state before the attempt (the
        failure may come after the optimiser step, in an after-step hook, and the sampler has
        drawn its batch), so the run trains as an uncompiled one would. `compile: on` lets the
        error stop the run."""
        if self.config.method in _compile_failed_here:  # another trainer of this strategy here failed already
            self._stop_compiling(_compile_failed_here[self.config.method], warn=False)
            return step(it, lr, inputs)
        before = copy.deepcopy(self.checkpoint_payload(full=True))  # copies: the step changes tensors in place
        try:
            return step(it, lr, inputs)
        except torch._dynamo.exc.TorchDynamoException as err:
            self._stop_compiling(_reason(err), "on this machine")
            self.restore(before, "the state before compiling")
            return step(it, lr, inputs)

    def _stop_compiling(self, why: str, where: str = "", warn: bool = True, recapture: bool = True) -> None:
        """`compile: auto` gives up: the networks run uncompiled from now on (recorded in the
        `compiled` tag), and so do this strategy's other trainers in this process."""
        if self.device.type == "cuda":  # what the failed attempt queued (on a side stream) is done
            torch.cuda.synchronize(self.device)
        self.compile_failure = why
        if warn:
            warnings.warn(f"compile: auto: torch.compile failed {where} ({why}); training goes on uncompiled "
                          "(--compile off skips the attempt)", stacklevel=3)
        for net in self.strategy.networks().values():
            net._compiled_call_impl = None
        self.compiled = False
        if recapture:
            if not _compile_failed_here:
                torch._dynamo.reset()
            _compile_failed_here.setdefault(self.config.method, why)
            self._graphed = None  # capture again, uncompiled

    def _train_steps(self, stop: int, step: Callable) -> None:
        cfg = self.config
        while self.iteration < stop:
            it = self.iteration
            lr = poly_lr(it, cfg.max_iterations, cfg.base_lr)
            inputs = self.strategy.step_inputs(it)
            if self.compiled and cfg.compile == "auto" and not self._compile_tried:
                out, extra = self._first_compiled_step(step, it, lr, inputs)
                self._compile_tried = True
            else:
                out, extra = step(it, lr, inputs)
            loss = out["loss"]
            self.iteration += 1
            done = self.iteration >= cfg.max_iterations
            if self.iteration % cfg.log_interval == 0 or done:
                logs = {f"train/{k}": float(v.detach()) if isinstance(v, Tensor) else float(v)
                        for k, v in {**out, **extra}.items()}
                logs.update({f"train/{k}": float(v) for k, v in inputs.items() if not isinstance(v, Tensor)})
                logs["train/loss"] = float(loss.detach())
                if not math.isfinite(logs["train/loss"]):
                    raise TrainingDiverged(f"loss is {logs['train/loss']} at iteration {self.iteration} "
                                           f"({cfg.method}, base_lr={cfg.base_lr}, consistency={cfg.consistency})")
                now = time.perf_counter()
                logs["lr"] = lr
                logs["it_per_s"] = (self.iteration - self._it_log) / max(now - self._t_log, 1e-9)
                self._t_log, self._it_log = now, self.iteration
                self.last_logs = logs
                self.train_history.append({"iteration": float(self.iteration),
                                           **{k: v for k, v in logs.items() if k.startswith("train/")}})
                for cb in self.callbacks:
                    cb.on_log(self, self.iteration, logs)
            if self.iteration % cfg.eval_interval == 0 or done:
                self._validate()
                self.strategy.train()

    def finish(self) -> LoopResult:
        """Validate if nothing was validated yet; call `on_train_end`; return the result."""
        if not self.history:  # resumed at the end, or nothing trained
            self._validate()
        result = LoopResult(self.iteration, float(self.best["dice"]), int(self.best["iteration"]),
                            dict(self.best["metrics"]), dict(self.last_metrics),
                            time.perf_counter() - self._start_time, list(self.history))
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    def fit(self) -> LoopResult:
        """Train to `max_iterations` from the current iteration (0, or where `load` left it)."""
        self.start()
        self.train_until(self.config.max_iterations)
        return self.finish()
