"""The Ray Tune function trainable: a trial's values -> TrainConfig -> the same loop as
`raysemi.train`, reporting at every evaluation with a checkpoint, resuming from one.

With `seeds > 1` the trial trains one model per seed in lockstep and reports the mean validation
Dice (the reference's gains are within seed noise, so a config is scored on several seeds).
The dataset arrives through Ray's object store (`tune.with_parameters`), read once per search.
A worker process whose trial ended takes the next one (Tune's `reuse_actors`): it keeps its
imports, CUDA context and compiled code, and the trial frees everything else when it ends.
A loss that turns NaN ends the trial with `diverged = 1` and its reason (retrying from a
checkpoint would diverge again); any other error is left to Tune's FailureConfig to retry.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from raysemi import checkpoint
from raysemi.config import from_dict
from raysemi.data import Dataset
from raysemi.errors import UserError
from raysemi.loop import Callback, Trainer, TrainingDiverged
from raysemi.search_space import trial_values

#: the metric ASHA and the leaderboard rank by, and the time attribute
METRIC, TIME_ATTR = "val/dice", "iteration"
BEST = "best_val_dice"  # the trial's best METRIC so far: what the progress table ranks by


class _KeepBest(Callback):
    """Holds the best networks seen (on the CPU), so each checkpoint carries the best model."""

    def __init__(self) -> None:
        self.payload: dict[str, Any] | None = None

    def on_eval(self, trainer: Trainer, iteration: int, metrics: dict[str, float], is_best: bool) -> None:
        if is_best:
            payload = trainer.checkpoint_payload(full=False)
            payload["networks"] = {k: {n: t.detach().cpu().clone() for n, t in sd.items()}
                                   for k, sd in payload["networks"].items()}
            self.payload = copy.deepcopy(payload)


def trial_config(config: dict[str, Any], base: dict[str, Any], device: str):
    """The full TrainConfig of a trial: base config + the trial's sampled values."""
    method, values = trial_values(config)
    merged = {**base, **values, "method": method, "device": device}
    return from_dict(merged, source="trial config").validate(source="trial config")


def aggregate(trainers: list[Trainer]) -> dict[str, float]:
    """Mean over seeds of the last validation and training metrics; per-seed Dice too."""
    out: dict[str, float] = {}
    keys = set().union(*(t.last_metrics for t in trainers)) | set().union(*(t.last_logs for t in trainers))
    for k in sorted(keys):
        vals = [t.last_metrics.get(k, t.last_logs.get(k)) for t in trainers]
        vals = [v for v in vals if v is not None]
        if vals:
            out[k] = float(np.mean(vals))
    if len(trainers) > 1:
        for i, t in enumerate(trainers):
            out[f"val/dice_seed{i}"] = float(t.last_metrics.get("val/dice", float("nan")))
        out["val/dice_std"] = float(np.std([t.last_metrics.get("val/dice", 0.0) for t in trainers]))
    return out


def best_so_far(trainers: list[Trainer]) -> float:
    """The trial's best validation Dice so far, mean over seeds at each evaluation: what the
    leaderboard ranks by (Tune's own "best trial" would read the last value)."""
    means = [float(np.mean([h.get("val/dice", float("nan")) for h in row]))
             for row in zip(*(t.history for t in trainers))]
    return max((m for m in means if math.isfinite(m)), default=float("nan"))


def seconds(trainers: list[Trainer]) -> dict[str, float]:
    """The trial's seconds of training steps and of validations, all seeds together (resumed
    trials go on counting from their checkpoint)."""
    return {"time_train_s": sum(t.train_seconds for t in trainers),
            "time_eval_s": sum(t.eval_seconds for t in trainers)}


def trial_device(gpu_ids: list) -> str:
    """'cuda' for a trial Ray gave GPUs (or a share of one: `ray.get_gpu_ids()`), 'cpu' for one
    without; the GPUs Ray gave, not the flags, decide (a resumed trial keeps the resources it was
    started with). A GPU trial on a node whose torch sees no CUDA (a CPU build of torch there)
    fails with that reason: silently training on the node's CPUs would take days and look like a
    slow GPU. It fails as an error, not a result: Tune may retry it on another node, and the
    searcher is not told the config scored badly.

    Ray narrows CUDA_VISIBLE_DEVICES to the trial's GPUs, so its first GPU is torch's device 0:
    plain 'cuda'. With RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES set (as some clusters do, to
    let processes see every GPU) it does not, and plain 'cuda' would put every trial on the
    node's first GPU; the trial then gets 'cuda:N', N being where its GPU sits among those torch
    sees."""
    if not gpu_ids:
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError(f"node {os.uname().nodename}: Ray gave this trial GPU {', '.join(map(str, gpu_ids))}, but "
                        f"torch {torch.__version__} there sees no CUDA device; expected a CUDA build of torch on "
                        "every GPU node")
    index = torch_index(str(gpu_ids[0]), os.environ.get("CUDA_VISIBLE_DEVICES"))
    return "cuda" if index == 0 else f"cuda:{index}"


def torch_index(gpu_id: str, visible: str | None) -> int:
    """Torch's index of the GPU Ray calls `gpu_id`: its place in CUDA_VISIBLE_DEVICES when that is
    set (Ray's ids are then that list's entries, numbers or UUIDs), else the id itself."""
    if visible is not None:
        ids = [v.strip() for v in visible.split(",")]
        return ids.index(gpu_id) if gpu_id in ids else 0
    return int(gpu_id) if gpu_id.isdigit() else 0


def train_trial(config: dict[str, Any], *, base: dict[str, Any], dataset: Dataset, seeds: int = 1,
                cpus_per_trial: int = 1) -> None:
    """Tune entry point (wrapped by `tune.with_parameters` in the search driver).

    The search reuses a worker process for the next trial (Tune's `reuse_actors`), so a trial
    leaves nothing behind: its networks, optimisers and CUDA graphs are freed when it ends (one
    ASHA stopped waits at its last report until its worker is handed the next trial or ended), and
    their GPU memory goes back to the card (another trial's process may share it)."""
    import logging

    import ray

    for name in ("ray.train", "ray.tune"):  # no "Checkpoint successfully created" line per report
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(max(1, int(cpus_per_trial)))
    # how long Tune waits for a stopped trial to end before giving its worker to the next one
    # (else that trial errors): 2 s by default, and freeing a trial's memory may take longer
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    device = trial_device(ray.get_gpu_ids())
    run_then_release(lambda: _run_trial(config, base, dataset, seeds, device), device)


def run_then_release(run: Callable[[], None], device: str) -> None:
    """Runs a trial, then frees what its objects held (cycles among its modules, graphs and
    callbacks included) and hands its cached GPU memory back to the card, also when Tune stops
    it: a stopped trial's thread ends by SystemExit, whose traceback would keep its networks
    alive while the worker waits for the next trial."""
    stop: SystemExit | None = None
    try:
        run()
    except SystemExit as err:
        stop = SystemExit(err.code)  # a fresh one, without the trial's frames; Tune's code is 0, another's is kept
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_initialized():
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # one per stream the trial's matmuls ran on
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
    if stop is not None:
        raise stop


def _run_trial(config: dict[str, Any], base: dict[str, Any], dataset: Dataset, seeds: int, device: str) -> None:
    """One trial: build its trainers (or resume them from Tune's checkpoint), train, report at
    every evaluation."""
    from ray import tune

    try:  # a sampled config no strategy can run (e.g. ema_decay 1.0) fails once, with its reason
        cfg = trial_config(config, base, device)
        keepers = [_KeepBest() for _ in range(seeds)]
        trainers = [Trainer(cfg.replace(seed=cfg.seed + k), dataset, [keepers[k]]) for k in range(seeds)]
    except UserError as err:
        tune.report({"method": config.get("method", ""), TIME_ATTR: 0, "diverged": 1, METRIC: 0.0, BEST: 0.0,
                     "time_train_s": 0.0, "time_eval_s": 0.0, "failure_reason": f"invalid config: {err}"})
        return
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            for k, t in enumerate(trainers):
                t.load(Path(d) / f"seed{k}.pt")
                best = Path(d) / f"best_seed{k}.pt"
                if best.is_file():
                    keepers[k].payload = {key: v for key, v in checkpoint.load(best).items()
                                          if key not in ("format", "version")}
    for t in trainers:
        t.start()
    _, values = trial_values(config)
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items()))
    # start_iteration: where this session of the trial began (0, or a checkpoint's), for the tags' history
    base_metrics = {"method": cfg.method, "seeds": seeds, "node_id": _node_id(), "params": params,
                    "start_iteration": trainers[0].iteration}
    try:
        while trainers[0].iteration < cfg.max_iterations:
            target = (trainers[0].iteration // cfg.eval_interval + 1) * cfg.eval_interval
            for t in trainers:
                t.train_until(target)
            metrics = {**aggregate(trainers), **base_metrics, TIME_ATTR: trainers[0].iteration, "diverged": 0,
                       **seconds(trainers), BEST: best_so_far(trainers), **speed_paths(trainers)}
            with tempfile.TemporaryDirectory() as d:
                for k, t in enumerate(trainers):
                    t.save(Path(d) / f"seed{k}.pt", full=True)
                    if keepers[k].payload is not None:
                        checkpoint.save(Path(d) / f"best_seed{k}.pt", keepers[k].payload)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
    except TrainingDiverged as err:
        last = aggregate(trainers)
        best = best_so_far(trainers)  # every report has BEST: the progress table sorts by it
        # METRIC 0: a config that diverges is a bad one, for ASHA's rungs too (its last finite Dice
        # would rank it well); the searcher tells Optuna it as pruned with no result, last of all
        tune.report({**last, **base_metrics, TIME_ATTR: trainers[0].iteration, "diverged": 1, **seconds(trainers),
                     **speed_paths(trainers), BEST: best if math.isfinite(best) else 0.0,
                     "failure_reason": str(err), METRIC: 0.0})


def speed_paths(trainers: list[Trainer]) -> dict[str, str]:
    """The trial's device, autocast, CUDA graphs and compile status (the trial run's tags, as a
    training run's): a seed's failure wins."""
    return {**trainers[0].speed_path,
            "cuda_graphs": next((t.graph_status for t in trainers if t.graph_failure), trainers[0].graph_status),
            "compiled": next((t.compile_status for t in trainers if t.compile_failure), trainers[0].compile_status)}


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover - outside Ray
        return os.uname().nodename
