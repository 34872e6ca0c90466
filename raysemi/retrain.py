"""Retrain one config with K seeds and know how good it really is: the seeds loop, the aggregation,
the comparison with the supervised baseline, and reading a config back from an MLflow run.

`python -m raysemi.train --seeds K` trains seed, seed+1, ..., seed+K-1 one after the other, each
in `<output>/seed<k>/` (a complete run folder: config.yaml, last.pt, best.pt, train.log,
results.json), evaluates each seed's best checkpoint (by validation Dice) on the val and test
splits, and aggregates per class:

- mean: the mean over seeds of each seed's mean over volumes (every seed is evaluated on the same
  volumes, so it is also the mean over all (seed, volume) pairs);
- std over volumes (`std_volumes`): the std over all (seed, volume) pairs: how much the score
  varies from one case to the next;
- std over seeds (`std_seeds`): the std of the K per-seed means: how much a retrain of the same
  config varies; the number to hold against a difference between two strategies.
Both are population stds (ddof=0), as elsewhere in raysemi (the per-run tables, the search).

Outputs: `results.json`, `results_per_volume.csv` (split, seed, case, class, metrics) and
`results.txt` (the printed tables) in `<output>`; in MLflow one parent run (tag role=retrain) with
one nested run per seed (role=seed, the usual training metrics), and on the parent `test/<m>`,
`test_std_seeds/<m>`, `test_std_volumes/<m>` (likewise `val_best/...`) and the files above. With
K = 1 (the default) the run folder and the MLflow run are those of a single training, as before,
with the same extra files, the `test/<m>` metrics and the tags.

`--resume <output>` continues a multi-seed retrain: seed folders with a results.json are kept as
they are, a seed folder with a last.pt is resumed from it (in its own nested run, reopened, under
the same parent), the others are trained from scratch; more seeds than before may be asked. A
single run resumed from its folder's last.pt goes on in its own MLflow run too (raysemi.tracking:
`folder_run`).

Baseline: a retrain of any strategy other than `supervised` looks for the latest finished
supervised retrain in the same experiment with the same data folder, labeled patients (count and
ids) and test list (tags `data`, `labeled_patients`, `labeled_set`, `test_split`, `num_classes`),
preferring one with the same iteration budget, and reports ours - baseline per class and metric
(`test_vs_baseline/<m>`, tag `baseline_run_id`); or says in one line that there is none and how to
train one.
"""

from __future__ import annotations

import csv
import io
import hashlib
import json
import os
import re
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raysemi.config import FIELDS, WHERE_FIELDS, TrainConfig, save_yaml
from raysemi.errors import UserError
from raysemi.files import write_text_atomic
from raysemi.metrics import METRICS, Summary

STATE_FILE = "retrain.json"
#: what a run folder holds that a later command reads as that run's: a `--resume` (last.pt), a
#: multi-seed retrain's "finished" mark (results.json), the final report (best.pt)
RUN_FILES = ("last.pt", "best.pt", "results.json")
BASELINE_METHOD = "supervised"
#: tags that must be equal for a supervised run to be this retrain's baseline
MATCH_TAGS = ("data", "labeled_patients", "labeled_set", "test_split", "num_classes")
#: the config artifacts read back by --from-run, in order: a training run's, a search parent's
CONFIG_ARTIFACTS = ("config.yaml", "best_config.yaml")
#: fields that describe where and how the old run ran, not what it trained: not taken from a run
NOT_FROM_RUN = {"output": "", "run_name": "", "device": "auto", "tracking_uri": "", "compile": "auto"}
STD_NOTE = ("mean over seeds of each seed's mean over volumes; std_volumes: population std over all (seed, volume) "
            "pairs; std_seeds: population std of the per-seed means")


# ---- one seed's outcome -------------------------------------------------------------------------
def summary_to_json(summary: Summary) -> dict[str, Any]:
    return {"classes": list(summary.class_names),
            "cases": [{"case": name, "metrics": rows} for name, rows in summary.per_case]}


def summary_from_json(d: dict[str, Any]) -> Summary:
    return Summary(list(d["classes"]), [(c["case"], list(c["metrics"])) for c in d["cases"]])


@dataclass
class SeedResult:
    """One trained seed: its best checkpoint's per-volume metrics on each evaluated split."""

    index: int
    seed: int
    folder: Path
    summaries: dict[str, Summary] = field(default_factory=dict)
    best_iteration: int = -1
    iterations: int = 0
    run_id: str | None = None
    failure: str = ""
    run: Any = None  # the open MLflowRun when the caller ends it (K = 1)

    def means(self, split: str) -> dict[str, float]:
        return self.summaries[split].means() if split in self.summaries else {}

    def to_json(self, per_volume: bool = True) -> dict[str, Any]:
        """The run folder's results.json (its first three keys are those raysemi.train always wrote)."""
        out: dict[str, Any] = {"best_iteration": self.best_iteration, "val": self.means("val"),
                               "test": self.means("test"), "seed": self.seed, "iterations": self.iterations,
                               "mlflow_run_id": self.run_id, "folder": str(self.folder)}
        if per_volume:
            out["per_volume"] = {split: summary_to_json(s) for split, s in self.summaries.items()}
        return out

    @classmethod
    def read(cls, folder: Path, index: int) -> "SeedResult | None":
        """A finished seed folder's results (None when it has none, i.e. it is not finished)."""
        path = folder / "results.json"
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            summaries = {split: summary_from_json(s) for split, s in d["per_volume"].items()}
            return cls(index, int(d["seed"]), folder, summaries, int(d["best_iteration"]), int(d["iterations"]),
                       d.get("mlflow_run_id"))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: not a results file of a finished seed ({type(err).__name__}: {err}); "
                            "delete it to retrain that seed") from None


#: train one seed: (config, dataset, splits, folder, resume=last.pt or None, open_run=..., end_run=...)
TrainOne = Callable[..., SeedResult]


# ---- aggregation --------------------------------------------------------------------------------
def metric_keys(class_names: list[str]) -> list[str]:
    """dice, dice_rv, ..., hd95, hd95_rv, ...: the keys of Summary.means() that are metrics."""
    return [k for m in METRICS for k in [m] + [f"{m}_{c}" for c in class_names]]


def aggregate(summaries: list[Summary]) -> dict[str, dict[str, float]]:
    """{"mean", "std_volumes", "std_seeds"} of every metric key over seeds (one Summary per seed,
    all on the same volumes); `empty_pred` in "mean" is the mean count per seed."""
    if not summaries:
        raise ValueError("aggregate: no seed to aggregate")
    names = summaries[0].class_names
    per_seed = [s.means() for s in summaries]
    mean = {k: float(np.mean([m[k] for m in per_seed])) for k in per_seed[0]}
    std_seeds = {k: float(np.std([m[k] for m in per_seed])) for k in metric_keys(names)}
    table = np.concatenate([s.table() for s in summaries])  # (seeds x volumes, classes, metrics)
    std_volumes: dict[str, float] = {}
    for j, m in enumerate(METRICS):
        std_volumes[m] = float(np.std(table[:, :, j].mean(axis=1)))
        for c, name in enumerate(names):
            std_volumes[f"{m}_{name}"] = float(np.std(table[:, c, j]))
    return {"mean": mean, "std_volumes": std_volumes, "std_seeds": std_seeds}


def format_table(split: str, results: list[SeedResult]) -> str:
    """Per-class table over seeds: mean, +- std over (seed, volume) pairs, [+- std over seeds]."""
    summaries = [r.summaries[split] for r in results]
    agg = aggregate(summaries)
    names = summaries[0].class_names
    n = len(summaries[0].per_case)
    head = f"{'class':<8}" + "".join(f"{k:>29}" for k in METRICS)
    lines = [f"{split} split: {len(results)} seeds ({', '.join(str(r.seed) for r in results)}) x {n} volumes, "
             "each seed's best checkpoint by validation Dice", head, "-" * len(head)]
    for name in names + ["mean"]:
        cells = []
        for m in METRICS:
            key = m if name == "mean" else f"{m}_{name}"
            mean, sv, ss = agg["mean"][key], agg["std_volumes"][key], agg["std_seeds"][key]
            cells.append(f"{mean:>10.4f} ±{sv:>7.3f} [±{ss:>6.3f}]")
        lines.append(f"{name:<8}" + "".join(cells))
    lines.append(f"mean over seeds and volumes ± std over all {len(results) * n} (seed, volume) pairs "
                 f"[± std of the {len(results)} per-seed means]; population stds")
    lines.append("per-seed mean dice: " + ", ".join(f"seed {r.seed} {r.means(split)['dice']:.4f}" for r in results)
                 + f"; {agg['mean']['empty_pred']:g} class-volume pairs predicted empty per seed")
    return "\n".join(lines)


def write_per_volume_csv(path: Path, results: list[SeedResult]) -> Path:
    """One row per split, seed, volume and class."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["split", "seed", "case", "class", *METRICS, "empty_pred"])
    for r in results:
        for split, summary in r.summaries.items():
            for case, rows in summary.per_case:
                for name, m in zip(summary.class_names, rows):
                    w.writerow([split, r.seed, case, name] + [f"{m[k]:.6g}" for k in METRICS]
                               + [int(m["empty_pred"])])
    return write_text_atomic(path, buf.getvalue())


# ---- the baseline -------------------------------------------------------------------------------
def _digest(names: list[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]


def data_tags(config: TrainConfig, data: Any) -> dict[str, str]:
    """What a baseline must share with a retrain: data folder, labeled patients, test list, classes."""
    from raysemi.data import read_list

    try:
        test = read_list(data.root, "test")
    except UserError:
        test = []
    return {"data": str(Path(data.root).resolve()), "labeled_patients": str(config.labeled_patients),
            "labeled_set": _digest(list(data.train.labeled_patients)),
            "test_split": _digest(test) if test else "none", "num_classes": str(config.num_classes)}


def find_baseline(client: Any, experiment: str, tags: dict[str, str], max_iterations: int) -> Any:
    """The latest finished supervised retrain with the same data tags and test metrics (one with
    the same max_iterations first), or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.role = 'retrain' AND tags.strategy = '{BASELINE_METHOD}' AND attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=500)
    found = [r for r in runs if all(r.data.tags.get(k) == tags[k] for k in MATCH_TAGS)
             and "test/dice" in r.data.metrics]
    same_budget = [r for r in found if run_budget(r) == str(max_iterations)]
    return (same_budget or found or [None])[0]


def run_budget(run: Any) -> str:
    """A run's max_iterations: the param, or the value it was last resumed with (MLflow keeps a
    param's first value; a resume with another budget sets the tag `resumed/max_iterations`)."""
    return run.data.tags.get("resumed/max_iterations") or run.data.params.get("max_iterations", "?")


def baseline_command(config: TrainConfig, seeds: int) -> str:
    exp = f" --experiment {config.experiment}" if config.experiment != TrainConfig().experiment else ""
    return (f"python -m raysemi.train --method {BASELINE_METHOD} --data {config.data} --labeled-patients "
            f"{config.labeled_patients} --max-iterations {config.max_iterations} --seeds {seeds}{exp}")


def format_comparison(diff: dict[str, float], ours: dict[str, float], theirs: dict[str, float],
                      class_names: list[str], header: str) -> str:
    head = f"{'class':<8}" + "".join(f"{m:>12}" for m in METRICS)
    lines = [header, head, "-" * len(head)]
    for name in class_names + ["mean"]:
        lines.append(f"{name:<8}" + "".join(f"{diff[m if name == 'mean' else f'{m}_{name}']:>+12.4f}"
                                            for m in METRICS))
    lines.append(f"(Dice, Jaccard: higher is better; HD95, ASD: lower is better) mean dice: ours {ours['dice']:.4f}, "
                 f"baseline {theirs['dice']:.4f}")
    return "\n".join(lines)


def compare_with_baseline(client: Any, config: TrainConfig, tags: dict[str, str], ours: dict[str, float],
                          class_names: list[str], seeds: int) -> tuple[dict[str, Any] | None, str]:
    """(the comparison for results.json or None, the text to print)."""
    if config.method == BASELINE_METHOD:
        return None, ("baseline: this is a supervised run, the baseline that retrains of other strategies with the "
                      "same data, labeled patients and test split compare against")
    if not ours:
        return None, "baseline: no test split, nothing to compare"
    run = find_baseline(client, config.experiment, tags, config.max_iterations)
    if run is None:
        return None, (f"baseline: no finished supervised retrain in experiment {config.experiment!r} with the same "
                      f"data, labeled patients ({config.labeled_patients}) and test split; run one: "
                      f"{baseline_command(config, seeds)}")
    theirs = {k[len("test/"):]: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    diff = {k: ours[k] - theirs[k] for k in metric_keys(class_names) if k in theirs}
    b_seeds = run.data.tags.get("seeds", "1")
    b_iters = run_budget(run)
    budget = "" if b_iters == str(config.max_iterations) else \
        f"; note: a different budget from this run's {config.max_iterations} iterations"
    header = (f"test split versus the supervised baseline (MLflow run {run.info.run_id}: {b_seeds} seed(s), "
              f"{b_iters} iterations{budget}), ours - baseline:")
    info = {"run_id": run.info.run_id, "seeds": int(b_seeds) if b_seeds.isdigit() else b_seeds,
            "max_iterations": b_iters, "test": theirs, "difference": diff}
    return info, format_comparison(diff, ours, theirs, class_names, header)


# ---- a config from an MLflow run ----------------------------------------------------------------
def _param_value(name: str, text: str, source: str) -> Any:
    typ = typing.get_type_hints(TrainConfig)[name]
    try:
        if typ is bool:
            if text not in ("True", "False"):
                raise ValueError(text)
            return text == "True"
        if typ in (int, float):
            return typ(float(text)) if typ is int and float(text).is_integer() else typ(text)
        if typ is str:
            return text
        return [int(v) for v in text.replace(",", " ").strip("()[] ").split()]
    except ValueError:
        raise UserError(f"{source}: param {name}: {text!r} cannot be read as a {getattr(typ, '__name__', typ)}; "
                        "expected a run logged by raysemi.train or raysemi.search") from None


def config_from_run(run_id: str, uri: str) -> tuple[dict[str, Any], str]:
    """(config values, their source) of an MLflow run: its config.yaml artifact (a training run, a
    retrain, a search trial), else its best_config.yaml (a search's parent run), else its params
    named like config fields. Fields in NOT_FROM_RUN (output folder, run name, device, tracking
    URI, compile) are reset: they belong to the old run and its machine, and flags set them for
    the new one."""
    from raysemi.tracking import check_tracking_uri

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise UserError(f"--from-run: tracking store {uri!r} does not exist; expected the store that holds "
                            "the run (--tracking-uri or MLFLOW_TRACKING_URI)")
    else:
        check_tracking_uri(uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"--from-run: {run_id!r}: no such run in {uri}; expected the id of a run "
                        "(mlflow ui shows it; a search prints its parent run's)") from None
    source = f"MLflow run {run_id}"
    try:
        names = {a.path for a in client.list_artifacts(run_id)}
    except (MlflowException, OSError):
        names = set()
    values: dict[str, Any] | None = None
    for name in CONFIG_ARTIFACTS:
        if name not in names:
            continue
        import mlflow.artifacts

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a small YAML: no bar
        with tempfile.TemporaryDirectory() as d:
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=d,
                                                            tracking_uri=uri)
                values = yaml.safe_load(Path(local).read_text()) or {}
            except (MlflowException, OSError) as err:
                raise UserError(f"{source}: {name}: cannot be read from the artifact store ({err})") from None
            except yaml.YAMLError:
                raise UserError(f"{source}: {name}: not valid YAML") from None
        if not isinstance(values, dict):
            raise UserError(f"{source}: {name}: expected a mapping of config fields, got {type(values).__name__}")
        source = f"{source} ({name})"
        break
    if values is None:
        params = {k: v for k, v in run.data.params.items() if k in FIELDS}
        if not params:
            raise UserError(f"--from-run: {run_id}: the run has no config (no config.yaml or best_config.yaml "
                            "artifact, no config params); expected a run logged by raysemi.train or raysemi.search")
        source = f"{source} (params)"
        values = {k: _param_value(k, v, source) for k, v in params.items()}
    return {**values, **NOT_FROM_RUN}, source


# ---- the seeds loop -----------------------------------------------------------------------------
def read_state(folder: Path) -> dict[str, Any]:
    """The state file of a multi-seed retrain folder (for --resume DIR)."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise UserError(f"--resume: {folder}: not a multi-seed retrain folder (no {STATE_FILE}) nor a run folder "
                        "(no last.pt); expected a run's folder or last.pt, or a retrain folder")
    try:
        state = json.loads(path.read_text())
        int(state["seeds"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a raysemi retrain state file; expected one written by raysemi.train --seeds") \
            from None
    return state


#: fields a seed folder may differ in from the retrain's config when it is resumed: where it runs
#: and is written, and how fast it trains (compile and CUDA graphs change the speed, not what is
#: learned: `--compile off` must stay a way out when compiling breaks halfway through a retrain)
_PER_SEED = ("run_name", "output", "device", "tracking_uri", "compile", "cuda_graphs")


def check_same_config(folder: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a retrain whose seed folder was trained with other values (the seeds'
    results would be averaged over different configs)."""
    from raysemi.config import absolute_data, load_yaml

    path = folder / "config.yaml"
    if not path.is_file():
        return
    # a seed saved before configs held `data` absolute has it as typed, from the folder it was started in
    old, new = absolute_data(load_yaml(path)).to_dict(), cfg.to_dict()
    diff = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in new if k not in _PER_SEED and old.get(k) != new.get(k)]
    if diff:
        raise UserError(f"--resume: {path}: this seed was trained with other values ({'; '.join(diff)}); "
                        "expected the retrain's own values: resume without changing them, or start a new --output")


def retrain(config: TrainConfig, data: Any, splits: dict[str, list], out: Path, seeds: int, train_one: TrainOne, *,
            uri: str | None, resume: str | None = None) -> int:
    """Train `config` with `seeds` seeds into `out`, aggregate, compare, report; the exit code.

    `uri` None: no MLflow. `resume`: with one seed, a last.pt to continue; with several, the
    retrain folder (= `out`)."""
    name = config.run_name or out.name
    tags = {"role": "retrain", "strategy": config.method, "seeds": str(seeds), "run_dir": str(out.resolve()),
            **data_tags(config, data)}
    if seeds == 1:
        def open_single():
            if uri is None:
                return None
            from raysemi.tracking import folder_run

            return folder_run(out, uri, config.experiment, name, tags={**tags, "seed": str(config.seed)},
                              reopen=resumes_in_place(resume, out))

        res = train_one(config, data, splits, out, resume=resume, open_run=open_single, end_run=False)
        if res.failure:
            return 1
        return report(config, [res], [], out, seeds, res.run, tags)
    return _retrain_seeds(config, data, splits, out, seeds, train_one, uri, bool(resume), name, tags)


def resumes_in_place(resume: str | None, out: Path) -> bool:
    """Whether `--resume` continues the run in `out` (its own last.pt), so its MLflow run goes on;
    a checkpoint from another folder starts a new run there. The same folder by another path (a
    link, a bind mount, another letter case) is the same folder."""
    if resume is None:
        return False
    folder = Path(resume).resolve().parent
    try:
        return folder == out.resolve() or (out.exists() and os.path.samefile(folder, out))
    except OSError:
        return False


def as_first_saved(config: TrainConfig, path: Path) -> TrainConfig:
    """`config` as a resume in place saves it over `path`, the run's own config.yaml: `output` as
    the run first wrote it (it is the same folder), `run_name` and `tracking_uri` too unless the
    resume set them: a resume from another folder would write them relative to that folder, or
    blank, and a later `--config` of the file would train into another folder, logged to another
    store. The config the resume trains with is not changed."""
    from raysemi.config import read_yaml

    try:
        old = read_yaml(path)
    except UserError:  # none yet (an interrupted first save) or unreadable: this resume's values
        return config
    if not isinstance(old, dict):
        return config
    kept = {k: old[k] for k in WHERE_FIELDS
            if isinstance(old.get(k), str) and old[k] and (k == "output" or not getattr(config, k))}
    return config.replace(**kept)


def _retrain_seeds(config, data, splits, out: Path, seeds: int, train_one: TrainOne, uri: str | None, resuming: bool,
                   name: str, tags: dict[str, str]) -> int:
    from raysemi.tracking import MLflowRun, flat_params, folder_run, reopen_run

    state_path = out / STATE_FILE
    state = read_state(out) if resuming and state_path.is_file() else {}
    if state.get("base_seed", config.seed) != config.seed:  # seed k is base + k: another base relabels them
        raise UserError(f"--resume: {state_path}: this retrain's seeds start at {state['base_seed']}, not "
                        f"{config.seed}; expected --seed {state['base_seed']} (or none), or a new --output")
    if int(state.get("seeds", seeds)) > seeds:
        print(f"note: {out} was a {state['seeds']}-seed retrain; --seeds {seeds} reports seed0 .. seed{seeds - 1} "
              f"and leaves {', '.join(f'seed{k}' for k in range(seeds, int(state['seeds'])))} out", flush=True)
    state.update({"seeds": seeds, "base_seed": config.seed, "tracking_uri": uri, "experiment": config.experiment})
    state.setdefault("seed_runs", {})
    parent: MLflowRun | None = None
    base = config.replace(output=str(out))

    def save_state() -> None:
        write_text_atomic(state_path, json.dumps(state, indent=1))

    def open_parent() -> MLflowRun | None:
        """Written once the first seed's trainer has accepted the config: the retrain's own
        config.yaml, its state file and (with MLflow) the parent run."""
        nonlocal parent
        if parent is None:
            if not resuming:  # --overwrite: an earlier retrain's seeds must not be kept or resumed as this one's
                for folder in out.glob("seed*"):  # seed<k> only: seed0.bak may be the user's copy
                    if re.fullmatch(r"seed[1-9]\d*", folder.name) and folder.is_dir():  # seed0 has just started
                        for file in (*RUN_FILES, "config.yaml"):
                            (folder / file).unlink(missing_ok=True)
            save_yaml(as_first_saved(base, out / "config.yaml") if resuming else base, out / "config.yaml")
            if uri is not None:
                if state.get("parent_run_id"):
                    parent = reopen_run(uri, state["parent_run_id"], str(out))
                if parent is not None:
                    parent.set_tags({"seeds": seeds, "status": "running"})
                else:
                    parent = MLflowRun(uri, config.experiment, name, tags=tags)
                    parent.log_params({**flat_params(base.saved_dict()), "retrain/seeds": seeds})
                    parent.log_artifact(out / "config.yaml")
                    state["parent_run_id"] = parent.run_id
            save_state()
        return parent

    results: list[SeedResult] = []
    try:
        for k in range(seeds):
            folder = out / f"seed{k}"
            cfg = config.replace(seed=config.seed + k, run_name=f"{name}-seed{k}")
            if resuming:
                check_same_config(folder, cfg)
            done = SeedResult.read(folder, k) if resuming else None
            if done is not None:
                if done.seed != cfg.seed:
                    raise UserError(f"{folder}: trained with seed {done.seed}, but this retrain's seed{k} is "
                                    f"{cfg.seed}; resume with the same --seed ({done.seed - k})")
                print(f"seed{k} (seed {done.seed}): finished earlier (best iteration {done.best_iteration}), kept",
                      flush=True)
                results.append(done)
                continue
            failures = state.setdefault("failed", {})  # seed index -> why it failed
            if resuming and folder.is_dir() and failures.get(str(k)):
                # a diverged seed would diverge again, the same way: it stays failed
                print(f"seed{k} (seed {cfg.seed}): failed earlier ({failures[str(k)]}), kept as failed; to train it "
                      f"again, delete {folder} and resume", flush=True)
                results.append(SeedResult(k, cfg.seed, folder, failure=failures[str(k)]))
                continue
            if failures.pop(str(k), None) is not None:  # its folder was deleted: trained again
                save_state()
            last = folder / "last.pt"
            seed_resume = str(last) if resuming and last.is_file() else None
            resumed = f", resumed from {last}" if seed_resume else ""
            print(f"\n=== seed{k}: seed {cfg.seed} ({k + 1} of {seeds}){resumed} ===", flush=True)

            def open_seed_run(k: int = k, cfg: TrainConfig = cfg, folder: Path = folder,
                              reopen: bool = seed_resume is not None) -> MLflowRun | None:
                p = open_parent()
                if p is None:
                    return None
                run = folder_run(folder, uri, config.experiment, cfg.run_name, parent_run_id=p.run_id, reopen=reopen,
                                 tags={**tags, "role": "seed", "seed": str(cfg.seed), "seed_index": str(k),
                                       "run_dir": str(folder.resolve())})
                state["seed_runs"][str(k)] = run.run_id
                save_state()
                return run

            res = train_one(cfg, data, splits, folder, resume=seed_resume, open_run=open_seed_run)
            res.index = k
            results.append(res)
            if res.failure:
                failures[str(k)] = res.failure
                save_state()
    except BaseException as err:
        if parent is not None:
            interrupted = isinstance(err, KeyboardInterrupt)
            parent.set_tags({"status": "interrupted"} if interrupted else
                            {"status": "failed", "failure_reason": str(err)})
            parent.end("KILLED" if interrupted else "FAILED")
        if isinstance(err, KeyboardInterrupt) and (out / STATE_FILE).is_file():
            print(f"\ninterrupted; continue with: python -m raysemi.train --resume {out}", flush=True)
        raise
    open_parent()  # every seed was finished before (a resume with nothing left to train)
    finished = [r for r in results if not r.failure]
    failed = [r for r in results if r.failure]
    return report(config, finished, failed, out, seeds, parent, tags)


def report(config: TrainConfig, results: list[SeedResult], failed: list[SeedResult], out: Path, seeds: int,
           run: Any, tags: dict[str, str]) -> int:
    """results.json, the per-volume CSV, results.txt, the printed tables, the baseline comparison
    and the metrics of the retrain's MLflow run (ended here); the exit code."""
    single = seeds == 1
    failure = "; ".join(f"seed {r.seed}: {r.failure}" for r in failed)
    if not results:
        print(f"\nerror: every seed failed ({failure})", flush=True)
        if run is not None:
            run.set_tags({"status": "failed", "failure_reason": failure[:5000]})
            run.end("FAILED")
        return 1
    splits = [s for s in ("val", "test") if all(s in r.summaries for r in results)]
    aggs = {s: aggregate([r.summaries[s] for r in results]) for s in splits}
    class_names = results[0].summaries[splits[0]].class_names if splits else []
    texts = [] if single else [format_table(s, results) for s in splits]

    comparison, comparison_text = None, "baseline: not looked up (--no-mlflow)"
    if run is not None:
        ours = aggs["test"]["mean"] if "test" in aggs else {}
        comparison, comparison_text = compare_with_baseline(run.client, config, tags, ours, class_names, seeds)
    texts.append(comparison_text)

    summary: dict[str, Any] = results[0].to_json() if single else {}
    summary.update({
        "seeds": [r.seed for r in results],
        "val": aggs["val"]["mean"] if "val" in aggs else {},
        "test": aggs["test"]["mean"] if "test" in aggs else {},
        "std_volumes": {s: a["std_volumes"] for s, a in aggs.items()},
        "std_seeds": {} if single else {s: a["std_seeds"] for s, a in aggs.items()},
        "std_note": STD_NOTE,
        "per_seed": [r.to_json(per_volume=False) for r in results],
        "failed_seeds": [{"seed": r.seed, "folder": str(r.folder), "failure": r.failure} for r in failed],
        "baseline": comparison,
        "mlflow_run_id": run.run_id if run is not None else None,
    })
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1))
    write_per_volume_csv(out / "results_per_volume.csv", results)
    previous = [] if not single else [
        f"{s} split, best checkpoint (iteration {results[0].best_iteration}):\n{results[0].summaries[s].format()}"
        for s in splits]
    write_text_atomic(out / "results.txt", "\n\n".join(previous + texts) + "\n")
    print("\n" + "\n\n".join(texts), flush=True)
    if failed:
        print(f"\nwarning: {len(failed)} of {seeds} seeds failed and are left out ({failure})", flush=True)
    print(f"results: {out / 'results.json'}, {out / 'results_per_volume.csv'}", flush=True)

    if run is not None:
        step = max(r.iterations for r in results)
        metrics: dict[str, float] = {}
        for s, a in aggs.items():
            prefix = "test" if s == "test" else "val_best"
            if not (single and s == "val"):  # a single run logged val_best/ itself
                metrics.update({f"{prefix}/{k}": v for k, v in a["mean"].items()})
            metrics.update({f"{prefix}_std_volumes/{k}": v for k, v in a["std_volumes"].items()})
            if not single:
                metrics.update({f"{prefix}_std_seeds/{k}": v for k, v in a["std_seeds"].items()})
        if comparison:
            metrics.update({f"test_vs_baseline/{k}": v for k, v in comparison["difference"].items()})
            run.set_tags({"baseline_run_id": comparison["run_id"]})
        run.log_metrics(metrics, step)
        for name in ("results.json", "results_per_volume.csv", "results.txt"):
            run.log_artifact(out / name)
        run.set_tags({"status": "failed", "failure_reason": failure[:5000]} if failed else {"status": "finished"})
        run.end("FAILED" if failed else "FINISHED")
    return 1 if failed else 0


if __name__ == "__main__":  # the name sounds like a command; say which one it is instead of doing nothing
    from raysemi.errors import not_a_command

    raise SystemExit(not_a_command("raysemi.retrain", "retrain with `python -m raysemi.train --from-run RUN_ID "
                                   "--seeds K` or `--config runs/<search>/best_config.yaml --seeds K` (README: "
                                   "Retraining the winner)"))
