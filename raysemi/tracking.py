"""MLflow conventions in one place: the store, the experiment, run layout and metric names.

Metric names (stable, documented in the README): `train/loss`, `train/loss_sup`, `train/loss_ce`,
`train/loss_dice`, `train/consistency`, `train/consistency_weight`, `lr`, `it_per_s`; at each
validation `val/dice`, `val/hd95`, `val/asd`, `val/jaccard`, per class `val/dice_rv`,
`val/dice_myo`, `val/dice_lv` (and hd95/asd/jaccard likewise), `val/empty_pred`, `val/best_dice`;
after training `test/...` the same on the test split. Params: the whole resolved config.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from raysemi.errors import UserError
from raysemi.loop import Callback, LoopResult, Trainer

DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(uri: str = "") -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlflow.db` (an absolute path, so
    Ray workers started elsewhere write to the same file)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if not Path(rel).is_absolute():
            return f"sqlite:///{Path.cwd() / rel}"
    return uri


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with one line, when the store cannot be reached (before any training)."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"tracking_uri: {uri!r}: folder {folder} does not exist or is not writable")
        return
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"tracking_uri: {uri!r} does not answer ({reason}); expected a running "
                            "MLflow server (mlflow server ...) or a sqlite:/// store") from None
        return
    if uri.startswith("file:") or "://" not in uri:
        raise UserError(f"tracking_uri: {uri!r}: MLflow 3 refuses file stores; expected sqlite:///path/mlflow.db "
                        "or http://host:port")


def experiment_id(client: Any, name: str, uri: str) -> str:
    """Get or create the experiment; a sqlite store keeps its artifacts in `mlartifacts/` beside it."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    return {k: (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)) for k, v in config.items()}


class MLflowRun:
    """One MLflow run written through `MlflowClient` (no global active-run state)."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.experiment_id = experiment_id(self.client, experiment, uri)
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v)[:5000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class MLflowCallback(Callback):
    """Logs a training run: config as params, losses and validation metrics over iterations,
    the resolved config, log and best checkpoint as artifacts."""

    def __init__(self, run: MLflowRun, run_dir: Path | None = None) -> None:
        self.run, self.run_dir = run, run_dir

    def on_train_start(self, trainer: Trainer) -> None:
        self.run.log_params(flat_params(trainer.config.to_dict()))
        self.run.set_tags({"strategy": trainer.config.method, "model": trainer.model_name,
                           "device": str(trainer.device), "amp": "bf16" if trainer.amp else "off"})
        if self.run_dir is not None:
            self.run.log_artifact(self.run_dir / "config.yaml")

    def on_log(self, trainer: Trainer, iteration: int, metrics: dict[str, float]) -> None:
        self.run.log_metrics(metrics, iteration)

    def on_eval(self, trainer: Trainer, iteration: int, metrics: dict[str, float], is_best: bool) -> None:
        self.run.log_metrics({k: v for k, v in metrics.items() if k != "iteration"}, iteration)

    def on_train_end(self, trainer: Trainer, result: LoopResult) -> None:
        self.run.log_metrics({"best/val_dice": result.best_dice, "best/iteration": result.best_iteration},
                             result.iterations)
