"""MLflow conventions in one place: the store, the experiment, run layout and metric names.

Metric names (stable, documented in the README): `train/loss`, `train/loss_sup`, `train/loss_ce`,
`train/loss_dice`, `train/consistency`, `train/consistency_weight`, `lr`, `it_per_s`; at each
validation `val/dice`, `val/hd95`, `val/asd`, `val/jaccard`, per class `val/dice_rv`,
`val/dice_myo`, `val/dice_lv` (and hd95/asd/jaccard likewise), `val/empty_pred`, `val/best_dice`;
after training `best/val_dice`, `best/iteration`, and `val_best/...`, `test_best/...` (the best
checkpoint on the validation and test splits). Params: the whole resolved config, also logged
as a `config.yaml` artifact on every run (read back by `raysemi.train --from-run`).

A retrain (`raysemi.train`, any --seeds) is tagged `role=retrain` with `strategy`, `seeds`, `data`,
`labeled_patients`, `labeled_set`, `test_split`, `num_classes` (the baseline lookup searches these);
its seeds, with several, are nested runs tagged `role=seed`. It logs `test/<m>`, `test_std_volumes/<m>`,
`test_std_seeds/<m>` (several seeds), `val_best/...` likewise, and `test_vs_baseline/<m>` (ours -
the supervised baseline's) with the tag `baseline_run_id` (raysemi.retrain).
Pictures (`PicturesCallback`): `overlays/best_iter_<iteration>.png` at new best validation Dice and
`plots/learning_curves.png` at the end, in the run folder and as artifacts.

A run folder records its run in `mlflow_run.json` (run id, tracking URI, experiment; `folder_run`),
a multi-seed retrain its parent run in `retrain.json`: a resumed training goes on in the same runs
(`MLflowRun.reopen`). Params keep the values they were first logged with (MLflow cannot change one):
a value a resume changes (`--max-iterations`, say) is the tag `resumed/<param>`; a speed path a
resume changes (`device`, `amp`, `cuda_graphs`, `compiled`) also gets `history/<tag>`, in search
trial runs too (resumed or retried by Tune).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from raysemi import checkpoint
from raysemi.config import WHERE_FIELDS, TrainConfig
from raysemi.errors import UserError
from raysemi.files import write_text_atomic
from raysemi.loop import Callback, LoopResult, Trainer, effective_schedules

DEFAULT_DB = "mlflow.db"
#: a run folder's record of its MLflow run, read by a resume
RUN_FILE = "mlflow_run.json"


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
        _check_server_accepts(uri, timeout)
        return
    if uri.startswith("file:") or "://" not in uri:
        raise UserError(f"tracking_uri: {uri!r}: MLflow 3 refuses file stores; expected sqlite:///path/mlflow.db "
                        "or http://host:port")


def _check_server_accepts(uri: str, timeout: float) -> None:
    """A server answers /health to anyone but may refuse the API: MLflow 3 only serves requests
    addressed to localhost or a private IP unless started with --allowed-hosts (so
    http://headnode:5000 fails where http://10.0.0.1:5000 works), and a server with auth wants
    credentials."""
    from urllib.parse import urlsplit

    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    try:
        urllib.request.urlopen(request, timeout=timeout).read()
    except urllib.error.HTTPError as err:
        host = urlsplit(uri).netloc
        credentials = any(os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN"))
        if err.code == 403:
            raise UserError(f"tracking_uri: {uri!r}: the MLflow server refuses requests addressed to {host!r} (403); "
                            f"expected its IP address, or a server started with --allowed-hosts {host}") from None
        if err.code == 401 and not credentials:
            raise UserError(f"tracking_uri: {uri!r}: the MLflow server wants credentials (401); expected "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or a token") from None
    except (urllib.error.URLError, OSError, ValueError):
        pass  # it answered /health: let MLflow itself report anything else


# a new SQLite store announces its table set-up at INFO ("Creating initial MLflow database tables...",
# "Updating database tables") in the middle of a run's output: only warnings from there
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


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


def effective_params(config: TrainConfig) -> dict[str, str]:
    """`effective/rampup_interval` and `effective/mt_warmup`: the ramp unit and warm-up in
    iterations that the run trains with (`raysemi.loop.effective_schedules`), to 6 digits."""
    return {f"effective/{k}": f"{v:.6g}" for k, v in effective_schedules(config).items()}


class MLflowRun:
    """One MLflow run written through `MlflowClient` (no global active-run state).

    A run `reopen`ed to go on with a resumed training logs nothing twice: `params` and `logged`
    hold what it had (None for a new run, which has nothing)."""

    params: dict[str, str] | None = None  # a reopened run's params and tags
    tags: dict[str, str] | None = None
    logged: dict[str, tuple[int, float] | None] | None = None  # metric -> its last (step, value), read lazily

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

    @classmethod
    def existing(cls, client: Any, uri: str, run_id: str, experiment_id: str | None = None) -> "MLflowRun":
        """A handle on a run that already exists (a resumed search's parent or trial run)."""
        run = cls.__new__(cls)
        run.client, run.uri, run.run_id, run.experiment_id = client, uri, run_id, experiment_id
        return run

    @classmethod
    def reopen(cls, uri: str, run_id: str) -> "MLflowRun":
        """An existing run set RUNNING again, to go on logging into it after a resume. LookupError
        saying why when the store has no such run (another store) or it was deleted."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        try:
            found = client.get_run(run_id)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise LookupError(f"is not in {uri}") from None
        if found.info.lifecycle_stage == "deleted":
            raise LookupError(f"was deleted from {uri}")
        client.update_run(run_id, status="RUNNING")
        run = cls.existing(client, uri, run_id, found.info.experiment_id)
        run.params, run.tags, run.logged = dict(found.data.params), dict(found.data.tags), {}
        return run

    @property
    def reopened(self) -> bool:
        return self.logged is not None

    def log_params(self, params: dict[str, Any]) -> None:
        """On a reopened run, params it has are not logged again: a changed value (MLflow refuses
        to change a param) is set as the tag `resumed/<param>`, kept up to date by later resumes."""
        from mlflow.entities import Param

        values = {k: str(v)[:6000] for k, v in params.items()}
        if self.params is not None:
            self.set_tags({f"resumed/{k}": v for k, v in values.items() if k in self.params and k not in WHERE_FIELDS
                           and (v != self.params[k] or f"resumed/{k}" in self.tags)})
            values = {k: v for k, v in values.items() if k not in self.params}
            self.params.update(values)
        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, curve: bool = False) -> None:
        self.log_steps([(step, metrics)], curve)

    def log_steps(self, rows: list[tuple[int, dict[str, float]]], curve: bool = False) -> None:
        """Log (step, metrics) rows in batches. A reopened run logs no step twice: a metric is not
        logged at a step before the last one it has; at that step, a `curve` metric (training
        losses, validation: what a resumed training replays from its checkpoint) is not logged
        again, any other only with a new value (a summary computed again, e.g. over more seeds)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = []
        for step, metrics in rows:
            for k, v in metrics.items():
                v = float(v)
                if self.logged is not None:
                    last = self._last_logged(k)
                    if last is not None and (step < last[0] or step == last[0] and (curve or _same(v, last[1]))):
                        continue
                    self.logged[k] = (step, v)
                items.append(Metric(k, v, ts, step))
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def _last_logged(self, key: str) -> tuple[int, float] | None:
        if key not in self.logged:
            history = self.client.get_metric_history(self.run_id, key)
            last = max(history, key=lambda m: (m.step, m.timestamp), default=None)
            self.logged[key] = (last.step, last.value) if last is not None else None
        return self.logged[key]

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v)[:5000])
            if self.tags is not None:
                self.tags[k] = str(v)[:5000]

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def reopen_run(uri: str, run_id: str, what: str) -> MLflowRun | None:
    """`MLflowRun.reopen`, or None after one warning line saying why it cannot be (`what` names
    the run's folder); the caller then opens a new run."""
    try:
        return MLflowRun.reopen(uri, run_id)
    except LookupError as why:
        print(f"warning: {what}: its MLflow run {run_id} {why}; logging to a new run", file=sys.stderr, flush=True)
        return None


def read_run_record(folder: Path) -> dict[str, Any]:
    """A run folder's `mlflow_run.json` ({} when it has none, or one that cannot be read)."""
    try:
        record = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def folder_run(folder: Path, uri: str, experiment: str, run_name: str, tags: dict[str, str], *, reopen: bool,
               parent_run_id: str | None = None) -> MLflowRun:
    """The MLflow run of a run folder, recorded in its `mlflow_run.json`. With `reopen` (training
    resumed from the folder's own last.pt), the recorded run goes on (`reopen_run`: a new one with
    a warning line when the store has it no more). Otherwise a new run; a recorded one still
    RUNNING (its process died) is marked KILLED first."""
    record = read_run_record(folder)
    old = record.get("run_id")
    run = reopen_run(uri, old, str(folder)) if reopen and old else None
    if run is not None:  # the tags as a new run would have them (the retrain's parent may itself be new)
        run.set_tags({**tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})
    else:
        if old and not reopen:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            try:
                if client.get_run(old).info.status == "RUNNING":
                    client.set_terminated(old, "KILLED")
            except MlflowException:  # in another store, or deleted: nothing to mark
                pass
        run = MLflowRun(uri, experiment, run_name, tags=tags, parent_run_id=parent_run_id)
        record = {"experiment": experiment}
    write_text_atomic(folder / RUN_FILE, json.dumps({"run_id": run.run_id, "tracking_uri": uri,
                                                     "experiment": record.get("experiment", experiment)}, indent=1))
    return run


#: the tags that say which speed path a run took; a resume may change them
SPEED_TAGS = ("device", "amp", "cuda_graphs", "compiled")


def path_history(old: dict[str, str], paths: dict[str, str], iteration: int) -> dict[str, str]:
    """For a run resumed at `iteration` whose speed path changed (a resume past 10,000 iterations
    that `compile: auto` now compiles, another card, a trial retried on a node where compiling
    fails): `history/<tag>`, e.g. 'off from 0; on from 5000', beside the tag, which gives the
    latest session's. `old` is the run's tags so far."""
    history = {}
    for tag, value in paths.items():
        if iteration > 0 and tag in old and old[tag] != value:  # the tag still holds the last session's
            before = old.get(f"history/{tag}", f"{old[tag]} from 0")
            history[f"history/{tag}"] = f"{before}; {value} from {iteration}"
    return history


class MLflowCallback(Callback):
    """Logs a training run: config as params, losses and validation metrics over iterations, and
    the resolved config.yaml as an artifact (`raysemi.train` adds the log, best checkpoint and
    results at the end)."""

    def __init__(self, run: MLflowRun, run_dir: Path | None = None) -> None:
        self.run, self.run_dir = run, run_dir
        self._graph_failure_tagged = False
        self._compile_failure_tagged = False

    def on_train_start(self, trainer: Trainer) -> None:
        self.run.log_params({**flat_params(trainer.config.saved_dict()),
                             **effective_params(trainer.config)})
        paths = trainer.speed_path
        self.run.set_tags({"strategy": trainer.config.method, "model": trainer.model_name, **paths,
                           **path_history(self.run.tags or {}, paths, trainer.iteration)})
        if self.run_dir is not None:
            self.run.log_artifact(self.run_dir / "config.yaml")
        if trainer.iteration > 0:  # resumed: the checkpoint's curves first (only what the run lacks)
            rows = [(int(h["iteration"]), {k: v for k, v in h.items() if k != "iteration"})
                    for h in trainer.train_history + trainer.history]
            self.run.log_steps(rows, curve=True)

    def on_log(self, trainer: Trainer, iteration: int, metrics: dict[str, float]) -> None:
        self.run.log_metrics(metrics, iteration, curve=True)

    def on_eval(self, trainer: Trainer, iteration: int, metrics: dict[str, float], is_best: bool) -> None:
        self.run.log_metrics({k: v for k, v in metrics.items() if k != "iteration"}, iteration, curve=True)
        if trainer.graph_failure and not self._graph_failure_tagged:
            self.run.set_tags({"cuda_graphs": trainer.graph_status})  # it fell back to eager training
            self._graph_failure_tagged = True
        if trainer.compile_failure and not self._compile_failure_tagged:
            self.run.set_tags({"compiled": trainer.compile_status[:250]})  # compile: auto gave up
            self._compile_failure_tagged = True

    def on_train_end(self, trainer: Trainer, result: LoopResult) -> None:
        self.run.log_metrics({"best/val_dice": result.best_dice, "best/iteration": result.best_iteration},
                             result.iterations)


def pick_slices(volumes: list, count: int) -> list[tuple[int, int]]:
    """(volume index, slice index) of `count` slices to picture, fixed for a run: evenly spread
    (centres of equal shares) over the slices whose label shows foreground, taken over all
    volumes in order, so they cover several volumes and levels; all slices if none shows any."""
    cands = [(v, z) for v, vol in enumerate(volumes) for z in range(vol.label.shape[0]) if vol.label[z].any()]
    if not cands:
        cands = [(v, z) for v, vol in enumerate(volumes) for z in range(vol.label.shape[0])]
    k = min(count, len(cands))
    return [cands[int((i + 0.5) * len(cands) / k)] for i in range(k)]


class PicturesCallback(Callback):
    """Pictures of a training run, written to `run_dir` and logged to MLflow when `run` is given.

    At a new best validation Dice: `overlays/best_iter_<iteration:06d>.png`, `slices` fixed
    validation slices as image | ground truth | prediction, at most one every `every_evals`
    evaluations (a best in between is kept as a copy of the network's weights, so the final best
    is always pictured at the end; one left pending by an interrupted run is drawn from best.pt at
    the end of the resumed one). Only those slices are predicted: no extra evaluation. At the
    end: `plots/learning_curves.png` (training losses, validation Dice and HD95). A drawing error
    is reported as a warning line and never stops training.
    """

    def __init__(self, run_dir: str | Path, run: MLflowRun | None = None, slices: int = 4, every_evals: int = 3,
                 stream=None) -> None:
        self.run_dir, self.run, self.slices = Path(run_dir), run, slices
        self.every_evals, self.stream = max(int(every_evals), 1), stream
        self.picked: list[tuple[int, int]] = []
        self.evals, self.last_drawn_eval = 0, None
        self.pending: tuple[int, float, dict[str, Any]] | None = None  # best not yet pictured
        self.written: list[Path] = []

    def _warn(self, what: str, err: BaseException) -> None:
        print(f"warning: {what} not drawn ({type(err).__name__}: {err})", file=self.stream or sys.stderr, flush=True)

    def _log(self, path: Path, artifact_path: str) -> None:
        self.written.append(path)
        if self.run is not None:
            self.run.log_artifact(path, artifact_path)

    def _overlay_path(self, iteration: int) -> Path:
        return self.run_dir / "overlays" / f"best_iter_{iteration:06d}.png"

    def on_train_start(self, trainer: Trainer) -> None:
        self.picked = pick_slices(trainer.data.val, self.slices) if self.slices > 0 else []

    def draw_overlay(self, trainer: Trainer, net, iteration: int, dice: float) -> Path:
        """Predict the picked slices with `net` and write their overlay; returns the PNG path."""
        from raysemi.inference import predict_volume
        from raysemi.metrics import class_names
        from raysemi.visualize import write_overlay_png

        vols = trainer.data.val
        images = [vols[v].image[z] for v, z in self.picked]
        preds: list[np.ndarray | None] = [None] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(im.shape, []).append(i)
        for idx in by_shape.values():  # one batch per slice size (ACDC volumes differ in size)
            out = predict_volume(net, np.stack([images[i] for i in idx]), trainer.config.patch_size,
                                 trainer.device, trainer.config.eval_batch_size, trainer.amp, trainer.channels_last)
            for j, i in enumerate(idx):
                preds[i] = out[j]
        c = trainer.config
        path = self._overlay_path(iteration)
        write_overlay_png(path, images, [vols[v].label[z] for v, z in self.picked], preds, c.num_classes,
                          names=class_names(c.num_classes),
                          row_titles=[f"{vols[v].name} z={z}" for v, z in self.picked],
                          title=f"{c.method} ({c.eval_model}), iteration {iteration}, val dice {dice:.4f}")
        self._log(path, "overlays")
        return path

    def on_eval(self, trainer: Trainer, iteration: int, metrics: dict[str, float], is_best: bool) -> None:
        self.evals += 1
        if not is_best or not self.picked:
            return
        net = trainer.eval_network()
        if self.last_drawn_eval is None or self.evals - self.last_drawn_eval >= self.every_evals:
            try:
                self.draw_overlay(trainer, net, iteration, metrics["val/dice"])
            except Exception as err:  # a picture is never worth a failed run
                self._warn("overlay", err)
            self.last_drawn_eval, self.pending = self.evals, None
        else:
            self.pending = (iteration, metrics["val/dice"],
                            {k: v.detach().clone() for k, v in net.state_dict().items()})

    def _unpictured_best(self, trainer: Trainer, result: LoopResult) -> tuple[int, float, dict[str, Any]] | None:
        """(iteration, dice, weights) of the best checkpoint (best.pt in the trainer's output folder)
        when the run folder has no overlay of it: a best that was pending when an earlier run of
        this folder was interrupted, as a resumed run starts with nothing pending. None when it is
        pictured, or there is no best.pt."""
        if not self.picked or trainer.output_dir is None or self._overlay_path(result.best_iteration).is_file():
            return None
        path = trainer.output_dir / "best.pt"
        if not path.is_file():
            return None
        ckpt = checkpoint.load(path)  # onto the CPU: the copy's load_state_dict moves them
        iteration = int(ckpt["best"]["iteration"])
        if self._overlay_path(iteration).is_file():
            return None
        return iteration, float(ckpt["best"]["dice"]), ckpt["networks"][trainer.config.eval_model]

    def on_train_end(self, trainer: Trainer, result: LoopResult) -> None:
        # a best pending now is this run's last, so best.pt holds the same weights: read it only without one
        try:
            final = self.pending if self.pending is not None else self._unpictured_best(trainer, result)
            if final is not None:
                iteration, dice, state = final
                net = copy.deepcopy(trainer.eval_network())  # the trainer's own networks stay untouched
                net.load_state_dict(state)
                self.draw_overlay(trainer, net, iteration, dice)
        except Exception as err:
            self._warn("overlay", err)
        self.pending = None
        try:
            from raysemi.metrics import class_names
            from raysemi.visualize import write_learning_curves_png

            c = trainer.config
            path = write_learning_curves_png(
                self.run_dir / "plots" / "learning_curves.png",
                [(int(h["iteration"]), {k: v for k, v in h.items() if k != "iteration"}) for h in trainer.train_history],
                trainer.history,
                names=class_names(c.num_classes),
                title=f"{c.method}: best val dice {result.best_dice:.4f} at iteration {result.best_iteration}")
            self._log(path, "plots")
        except Exception as err:
            self._warn("learning curves", err)


def read_trial_run_map(path: Path) -> dict[str, str]:
    """A search's trial id -> MLflow run id map as written so far ({} if none, or if it was caught
    half-written by Tune's sync of the search folder: the runs' `trial_id` tags rebuild it)."""
    try:
        return dict(json.loads(path.read_text())) if path.is_file() else {}
    except (ValueError, TypeError):
        return {}


def write_trial_run_map(uri: str, parent_run_id: str, path: Path) -> None:
    """`path` <- the search's trial id -> MLflow run id map, read from the parent run's children.
    Written by the driver once Tune has ended: Tune syncs its own copy of the search folder over
    it while it runs, which puts back the map of a resumed search's first session."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=50000)
    found = {r.data.tags["trial_id"]: r.info.run_id for r in runs if "trial_id" in r.data.tags}
    known = read_trial_run_map(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**known, **found}, indent=1))
    tmp.replace(path)


def end_interrupted_search(uri: str, parent_run_id: str, tags: dict[str, str]) -> None:
    """After Ctrl-C or a stop on error: the search's parent run and the trial runs still RUNNING
    end KILLED, tagged `status` = interrupted, so that MLflow does not show them running for ever
    (Tune does not tell the callback of trials it stops on the way out); `--resume` sets them
    RUNNING again."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    running = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                 "AND attributes.status = 'RUNNING'", max_results=50000)
    for run in running:
        client.set_tag(run.info.run_id, "status", "interrupted")
        client.set_terminated(run.info.run_id, "KILLED")
    for key, value in {"status": "interrupted", **tags}.items():
        client.set_tag(parent_run_id, key, value)
    client.set_terminated(parent_run_id, "KILLED")


#: parent run id -> (tracking URI, trial -> run map file) of the searches this driver runs: what a
#: callback restored by Tune on --resume logs with, instead of what it was pickled with
DRIVER_SEARCHES: dict[str, tuple[str, Path]] = {}


def make_tune_callback(uri: str, experiment: str, parent_run_id: str, state_file: Path, base: dict[str, Any],
                       max_iterations: int):
    """A Ray Tune callback that logs every trial as a nested MLflow run under the search's parent
    run, from the driver: one writer, so SQLite never sees concurrent writers and trials need no
    route to the tracking server (Ray's own MLflow callback cannot nest runs).

    Tags: `strategy`, `trial_id`, `status` (running, retrying, completed, stopped_early, failed),
    `failure_reason`, `at_base_config` (its searched values are the base config's: `--start-at-defaults`);
    where it ran: `node_id` and `node_ip` (of its latest result) and `node_ids`
    (the nodes it reported from, in order, one entry per move: `A,B` when a retry went on on B);
    `retries` and `last_error` once Tune retried it (FailureConfig, e.g. after a node was lost);
    params: the trial's whole resolved config plus `searched/<field>`, and the config as a
    `config.yaml` artifact (what `raysemi.train --from-run` reads); metrics:
    everything the trial reports, at step = iteration. The Tune trial id -> MLflow run id map is
    written to `state_file` on every change, so a resumed search (`--resume`) logs into the same
    child runs instead of opening new ones. (Defined in a function so that importing this module
    does not import Ray.)
    """
    import json

    from ray.tune import Callback as TuneCallback

    DRIVER_SEARCHES[parent_run_id] = (uri, Path(state_file))

    from raysemi.search_space import at_base_config, trial_values
    from raysemi.trainable import METRIC

    # `base` is the saved config, without the testing fields at their defaults: compared in full
    with_defaults = {**TrainConfig().to_dict(), **base}

    class MLflowTrialCallback(TuneCallback):
        def __init__(self) -> None:
            # where it logs and keeps its map: a copy restored by Tune on --resume takes this
            # driver's (see __setstate__)
            self.uri, self.state_file = uri, state_file
            self.runs: dict[str, str] = read_trial_run_map(state_file)
            self.logged_step: dict[str, int] = {}
            self.nodes: dict[str, list[str]] = {}  # trial id -> the nodes it reported from, one per move
            self.retries: dict[str, int] = {}
            self.paths: dict[str, dict[str, str]] = {}  # trial id -> its speed tags and their history, as set
            self._client = None

        @property
        def client(self):
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = experiment_id(self._client, experiment, self.uri)
            return self._client

        def __getstate__(self):  # Tune pickles its callbacks with the experiment state
            return {**self.__dict__, "_client": None}

        def __setstate__(self, state):
            """Tune's `--resume` brings back the callback pickled at the search's first start. It
            logs where this driver says (the store's URI and the search folder may have changed
            since) and goes on from the trial -> run map as last written: Tune's own saved state
            may lag it by the trials started just before a crash, which would get a second run."""
            import raysemi.tracking as here  # this process's module (a copy by value would be stale)

            self.__dict__.update(state)
            self.uri, self.state_file = here.DRIVER_SEARCHES.get(parent_run_id, (self.uri, self.state_file))
            self.runs = {**self.runs, **here.read_trial_run_map(self.state_file)}

        def _save(self) -> None:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.runs, indent=1))
            tmp.replace(self.state_file)

        def _run(self, trial) -> MLflowRun:
            client = self.client
            if trial.trial_id in self.runs:
                return MLflowRun.existing(client, self.uri, self.runs[trial.trial_id], self.experiment_id)
            method, values = trial_values(trial.config)
            run_id = client.create_run(self.experiment_id, run_name=f"{method}-{trial.trial_id}", tags={
                "mlflow.parentRunId": parent_run_id, "strategy": method, "trial_id": trial.trial_id,
                "status": "running", "at_base_config": str(at_base_config(values, with_defaults)).lower()}).info.run_id
            run = MLflowRun.existing(client, self.uri, run_id, self.experiment_id)
            self.runs[trial.trial_id] = run.run_id
            self.logged_step[trial.trial_id] = -1
            self._save()
            merged = {**base, **values, "method": method}
            run.log_params(flat_params(merged))
            run.log_params({f"searched/{k}": v for k, v in values.items()})
            self._log_config(run, merged)
            return run

        @staticmethod
        def _log_config(run: MLflowRun, values: dict[str, Any]) -> None:
            """The trial's resolved config as config.yaml, so `raysemi.train --from-run <trial run>`
            reads it back exactly (the params, strings, are its fallback); and the ramp unit and
            warm-up it trains with, as `effective/...` params, as a training run logs them."""
            import tempfile

            from raysemi.config import from_dict, save_yaml

            try:
                config = from_dict(values, source="trial config")
                run.log_params(effective_params(config))
                with tempfile.TemporaryDirectory() as d:
                    run.log_artifact(save_yaml(config, Path(d) / "config.yaml"))
            except Exception as err:  # never let a missing artifact stop the search
                print(f"warning: trial {run.run_id}: config.yaml or effective/ params not logged ({err})", flush=True)

        def _last_logged_step(self, trial_id: str, run: MLflowRun) -> int:
            """The last step logged to the trial's run, asked of MLflow once per driver: a driver
            restarted with --resume may see a trial resume from an older checkpoint than its last
            logged result (Tune's saved state lags), and must not log those steps twice."""
            if trial_id not in self.logged_step:
                history = self.client.get_metric_history(run.run_id, METRIC)
                self.logged_step[trial_id] = max((m.step for m in history), default=-1)
            return self.logged_step[trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            run = self._run(trial)
            self.client.update_run(run.run_id, status="RUNNING")
            run.set_tags({"status": "running"})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            run = self._run(trial)
            node = result.get("node_id")
            moves = self.nodes.setdefault(trial.trial_id, [])
            if node and (not moves or moves[-1] != node):  # its first result, or its first after a move
                moves.append(node)
                run.set_tags({"node_id": node, "node_ip": result.get("node_ip", ""), "node_ids": ",".join(moves)})
            step = int(result.get("iteration", 0))
            if step <= self._last_logged_step(trial.trial_id, run):
                return  # already logged (a restarted trial replays nothing twice)
            self.logged_step[trial.trial_id] = step
            metrics = {k: v for k, v in result.items() if isinstance(k, str) and ("/" in k or k in ("lr", "it_per_s"))
                       and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if result.get("diverged"):  # no validation ran at this step: its val/ values are the last one's
                metrics = {k: v for k, v in metrics.items() if not k.startswith("val/")}  # (val/dice: 0 for the searcher)
            run.log_metrics(metrics, step)
            self._tag_paths(trial.trial_id, run, result)
            if result.get("diverged"):
                run.set_tags({"status": "failed", "failure_reason": result.get("failure_reason", "diverged")})

        def _tag_paths(self, trial_id: str, run: MLflowRun, result: dict) -> None:
            """The trial's speed path as tags (`device`, `amp`, `cuda_graphs`, `compiled`), set when
            they change, with `history/<tag>` when a resumed or retried trial took another path."""
            paths = {tag: str(result[tag])[:250] for tag in SPEED_TAGS if result.get(tag)}
            if trial_id not in self.paths:  # first result seen by this driver: what the run has so far
                tags = self.client.get_run(run.run_id).data.tags
                self.paths[trial_id] = {k: v for k, v in tags.items() if k in SPEED_TAGS or k.startswith("history/")}
            old = self.paths[trial_id]
            changed = {**{k: v for k, v in paths.items() if old.get(k) != v},
                       **path_history(old, paths, int(result.get("start_iteration", 0)))}
            if changed:
                run.set_tags(changed)
                old.update(changed)

        def on_trial_complete(self, iteration, trials, trial, **info):
            run = self._run(trial)
            last = trial.last_result or {}
            if last.get("diverged"):
                status, mlflow_status = "failed", "FAILED"
            elif int(last.get("iteration", 0)) < max_iterations:
                status, mlflow_status = "stopped_early", "FINISHED"
            else:
                status, mlflow_status = "completed", "FINISHED"
            run.set_tags({"status": status})
            run.end(mlflow_status)

        def on_trial_recover(self, iteration, trials, trial, **info):
            """A failed trial that Tune retries (FailureConfig): it goes on in the same run."""
            run = self._run(trial)
            self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
            run.set_tags({"status": "retrying", "retries": self.retries[trial.trial_id],
                          "last_error": _last_error_line(trial) or "error (see the trial's error.txt)"})

        def on_trial_error(self, iteration, trials, trial, **info):
            run = self._run(trial)
            run.set_tags({"status": "failed",
                          "failure_reason": _last_error_line(trial) or "error (see the trial's error.txt)"})
            run.end("FAILED")

        def get_state(self):
            return {"runs": dict(self.runs), "nodes": {k: list(v) for k, v in self.nodes.items()},
                    "retries": dict(self.retries)}

        def set_state(self, state):
            self.runs.update(state.get("runs", {}))
            self.nodes.update(state.get("nodes", {}))
            self.retries.update(state.get("retries", {}))

    def _last_error_line(trial) -> str:
        """The last line of the trial's latest error. Tune writes it to the driver's copy of the
        trial folder first (`trial.error_file`); `trial.get_error()` reads storage, synced later."""
        try:
            text = Path(trial.error_file).read_text() if trial.error_file else ""
        except OSError:
            text = ""
        try:
            text = text or str(trial.get_error() or "")
        except Exception:
            pass
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return lines[-1].strip()[:500] if lines else ""

    return MLflowTrialCallback()
