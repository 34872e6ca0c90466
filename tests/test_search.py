"""The search end to end: real local Ray (num_cpus=2), real Optuna TPE, real ASHA, MLflow on a
SQLite store in a temp folder, data from the phantom generator."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raysemi.errors import UserError, run_cli
from raysemi.search import main as search_main
from raysemi.train import main as train_main

TINY = ["--labeled-patients", "3", "--patch-size", "32", "32", "--batch-size", "8", "--labeled-bs", "4",
        "--max-iterations", "40", "--eval-interval", "10", "--num-cpus", "2", "--cpus-per-trial", "2", "--gpus", "0",
        "--mt-warmup", "0", "--eval-batch-size", "16"]


def children(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, kids


@pytest.fixture(scope="module")
def search_run(tiny_phantom, tmp_path_factory, mlflow_store):
    """One search built to exercise everything: supervised with a good learning rate, entropy
    minimisation with a learning rate that cannot learn (ASHA must stop it once the other has set
    the bar), mean teacher with the NaN switch on (it must fail with its reason, and the search
    goes on)."""
    tmp = tmp_path_factory.mktemp("search")
    spaces = tmp / "spaces"
    spaces.mkdir()
    (spaces / "supervised.yaml").write_text("base_lr: {type: choice, values: [0.1]}\n")
    (spaces / "entropy_minimization.yaml").write_text("base_lr: {type: choice, values: [1.0e-9]}\n")
    (spaces / "mean_teacher.yaml").write_text("fault_nan_at: {type: choice, values: [15]}\n"
                                              "consistency: {type: loguniform, low: 0.01, high: 1.0}\n")
    uri = mlflow_store(tmp / "mlflow.db")
    cwd = os.getcwd()
    os.chdir(tmp)
    out = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
            warnings.simplefilter("always")
            code = run_cli(search_main, ["--method", "supervised,em,mt", "--data", str(tiny_phantom), *TINY,
                                         "--num-samples", "7", "--search-space", str(spaces), "--grace-period", "30",
                                         "--reduction-factor", "2", "--seed", "3", "--name", "s", "--storage",
                                         str(tmp / "runs"), "--tracking-uri", uri, "--max-failures", "0"])
    finally:
        os.chdir(cwd)
    return {"code": code, "dir": tmp / "runs" / "s", "uri": uri, "tmp": tmp, "out": out.getvalue(),
            "warnings": [w.category.__name__ for w in caught]}


def test_search_ends_by_saying_where_its_results_are(search_run):
    _, (parent,), _ = children(search_run["uri"], "raysemi-search")
    last = search_run["out"].strip().splitlines()[-2:]
    assert last[0] == (f"results: {search_run['dir']} (leaderboard.csv, best_config.yaml, best_checkpoint.pt, plots); "
                       f"MLflow: {search_run['uri']}, experiment 'raysemi-search', parent run {parent.info.run_id} "
                       f"(browse: mlflow ui --backend-store-uri {search_run['uri']})"), last
    assert last[1].startswith("best: supervised val dice ")
    assert "ExperimentalWarning" not in search_run["warnings"]  # Optuna's, for TPE options we rely on
    assert "timing one training step" not in search_run["out"]  # a short CPU search starts at once
    assert ("note: 7 of the 7 trials are drawn at random (TPE's first 10 are), 0 proposed from finished ones; "
            "--num-samples 20 or more lets TPE guide most of them") in search_run["out"].splitlines()
    # 40 iterations of ramps set for 30,000 (these spaces leave the ramp at its base): said before any trial
    assert ("note: in 40 iterations the consistency weight reaches at most 1% of --consistency by the last iteration "
            "(entropy_minimization, mean_teacher; its ramp is --consistency-rampup units of --rampup-interval "
            "iterations). The reference's schedules (set for 30,000 iterations) scaled to this budget: "
            "--rampup-interval 1 --consistency-rampup 40; or --schedules budget with --rampup-interval 150 (the "
            "reference's value, the default), which it scales to any --max-iterations (README: Short budgets)") \
        in search_run["out"].splitlines()
    spaces = search_run["tmp"] / "spaces"
    assert (f"search spaces: supervised from {spaces / 'supervised.yaml'}; entropy_minimization from "
            f"{spaces / 'entropy_minimization.yaml'}; mean_teacher from {spaces / 'mean_teacher.yaml'}"
            in search_run["out"].splitlines())


@pytest.mark.slow
def test_search_logs_parent_and_nested_trial_runs(search_run):
    assert search_run["code"] == 0
    client, parents, kids = children(search_run["uri"], "raysemi-search")
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "finished"
    assert len(kids) == 7
    assert all(k.data.tags["mlflow.parentRunId"] == parent.info.run_id for k in kids)
    assert {k.data.tags["strategy"] for k in kids} <= {"supervised", "entropy_minimization", "mean_teacher"}
    assert all(k.data.tags.get("cuda_graphs") == "off" for k in kids)  # reported by the trials (CPU)
    assert all(k.data.tags.get("compiled") == "off" for k in kids)  # compile: auto, on CPU
    assert all(k.data.tags.get("device") == "cpu" and k.data.tags.get("amp") == "off" for k in kids)
    assert not any(t.startswith("history/") for k in kids for t in k.data.tags)  # no trial changed its path
    for k in kids:
        # the trial's whole resolved config as params, and its identity as tags
        assert k.data.params["method"] == k.data.tags["strategy"]
        assert k.data.params["batch_size"] == "8" and k.data.params["patch_size"] == "32 32"
        assert k.data.tags["trial_id"] and k.data.tags["status"] in ("completed", "stopped_early", "failed")
        if k.data.tags["status"] != "failed" or client.get_metric_history(k.info.run_id, "val/dice"):
            steps = [m.step for m in client.get_metric_history(k.info.run_id, "val/dice")]
            assert steps == sorted(set(steps)) and steps[0] == 10
    sup = [k for k in kids if k.data.tags["strategy"] == "supervised"]
    assert sup and all(client.get_metric_history(k.info.run_id, "train/loss") for k in sup)
    assert all(client.get_metric_history(k.info.run_id, "val/dice_lv") for k in sup)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "best_config.yaml", "best_checkpoint.pt", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/val_dice_per_trial.png", "plots/best_dice_per_strategy.png"} <= plots


def test_the_callback_tune_restores_on_resume_logs_where_the_continuing_driver_says(tmp_path, mlflow_store):
    """`--resume` runs the callback Tune pickled at the search's first start, with that start's
    store URI and search folder. It must log to the store and keep its trial -> run map where the
    continuing driver says (the server's address or the folder may have changed), starting from
    the map as last written (Tune's saved copy lags it: a trial started just before a crash would
    get a second run)."""
    import ray.cloudpickle as cloudpickle

    from raysemi.config import TrainConfig
    from raysemi.tracking import MLflowRun, make_tune_callback

    base = TrainConfig(data="x", max_iterations=40).to_dict()
    first_uri, uri = f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}", mlflow_store(tmp_path / "mlflow.db")
    parent = MLflowRun(uri, "search-exp", "search")  # the same store, reached another way now
    saved = cloudpickle.dumps(make_tune_callback(first_uri, "search-exp", parent.run_id,
                                                 tmp_path / "gone" / "runs.json", base, 40))  # as Tune saves it
    earlier = MLflowRun(uri, "search-exp", "t0001", parent_run_id=parent.run_id)  # logged by the first driver
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "runs.json").write_text(json.dumps({"t0001": earlier.run_id}))

    make_tune_callback(uri, "search-exp", parent.run_id, moved / "runs.json", base, 40)  # the continuing driver
    restored = cloudpickle.loads(saved)
    assert (restored.uri, restored.state_file) == (uri, moved / "runs.json")

    class Trial:
        config = {"method": "supervised"}

        def __init__(self, trial_id):
            self.trial_id = trial_id

    restored.on_trial_result(0, [], Trial("t0001"), {"iteration": 30, "val/dice": 0.5})
    restored.on_trial_start(0, [], Trial("t0002"))
    client = MlflowClient(tracking_uri=uri)
    assert [m.step for m in client.get_metric_history(earlier.run_id, "val/dice")] == [30]  # no second run
    runs = json.loads((moved / "runs.json").read_text())
    assert runs["t0001"] == earlier.run_id and client.get_run(runs["t0002"]).data.tags["trial_id"] == "t0002"
    assert not (tmp_path / "gone").exists()


def test_a_trial_resumed_on_another_speed_path_gets_its_history(tmp_path, mlflow_store):
    """A trial retried or resumed where it runs differently (here compiling fails on the new node):
    its tag gives the latest session's path, `history/<tag>` each path with the iteration it began
    at, across a restarted driver too. (The Tune trial is a stand-in: CPU trials cannot change path.)"""
    from raysemi.config import TrainConfig
    from raysemi.tracking import MLflowRun, make_tune_callback

    uri = mlflow_store(tmp_path / "mlflow.db")
    parent = MLflowRun(uri, "search-exp", "search")
    base = TrainConfig(data="x", max_iterations=40).to_dict()
    state = tmp_path / "state.json"

    class Trial:
        trial_id = "t0001"
        config = {"method": "supervised"}

    first = {"device": "cuda", "amp": "bf16", "cuda_graphs": "on", "compiled": "on", "start_iteration": 0}
    callback = make_tune_callback(uri, "search-exp", parent.run_id, state, base, 40)
    callback.on_trial_start(0, [], Trial())
    for step in (10, 20):
        callback.on_trial_result(0, [], Trial(), {"iteration": step, "val/dice": 0.1, **first})
    run_id = callback.runs["t0001"]
    tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
    assert {k: tags[k] for k in first if k != "start_iteration"} == {k: v for k, v in first.items()
                                                                    if k != "start_iteration"}
    assert not any(k.startswith("history/") for k in tags)
    # the driver restarted (--resume); the trial goes on from its checkpoint at 20 on another node
    resumed = make_tune_callback(uri, "search-exp", parent.run_id, state, base, 40)
    failed = "failed: BackendCompilerFailed: no C++ compiler"
    resumed.on_trial_result(0, [], Trial(), {"iteration": 30, **first, "compiled": failed, "start_iteration": 20})
    resumed.on_trial_result(0, [], Trial(), {"iteration": 40, **first, "compiled": failed, "start_iteration": 20})
    tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
    assert tags["compiled"] == failed and tags["history/compiled"] == f"on from 0; {failed} from 20"
    assert [k for k in tags if k.startswith("history/")] == ["history/compiled"]  # the rest did not change
    # retried once more, where it compiles again
    resumed.on_trial_result(0, [], Trial(), {"iteration": 50, **first, "start_iteration": 40})
    tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
    assert tags["compiled"] == "on" and tags["history/compiled"] == f"on from 0; {failed} from 20; on from 40"


@pytest.mark.slow
def test_nan_trial_fails_with_its_reason_and_the_search_goes_on(search_run):
    client, _, kids = children(search_run["uri"], "raysemi-search")
    mt = [k for k in kids if k.data.tags["strategy"] == "mean_teacher"]
    assert mt, "the seed should sample mean_teacher at least once"
    for k in mt:
        assert k.data.tags["status"] == "failed" and k.info.status == "FAILED"
        assert "loss is nan" in k.data.tags["failure_reason"]
        # its curve holds its validations only (at 10), not the last one's values again where the NaN
        # (at 15) was seen (the log at 20)
        assert [m.step for m in client.get_metric_history(k.info.run_id, "val/dice")] == [10]
    # what Tune hands the searcher as a diverged config's score (its last result): 0, not the Dice
    # it had before diverging, which would pull TPE towards the divergence
    last = [reports_in(f)[-1] for f in search_run["dir"].glob("*/result.json")]
    diverged = [r for r in last if r.get("diverged") and r["iteration"] == 20]
    assert len(diverged) == len(mt) and all(r["val/dice"] == 0.0 for r in diverged)
    others = [k for k in kids if k.data.tags["strategy"] != "mean_teacher"]
    assert others and all(k.data.tags["status"] in ("completed", "stopped_early") for k in others)
    rows = list(csv.DictReader(open(search_run["dir"] / "leaderboard.csv")))
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == len(mt) and rows[-len(failed):] == failed and all(r["rank"] == "" for r in failed)


@pytest.mark.slow
def test_asha_stops_the_trial_that_cannot_learn(search_run):
    _, _, kids = children(search_run["uri"], "raysemi-search")
    stopped = [k for k in kids if k.data.tags["status"] == "stopped_early"]
    assert stopped and all(k.data.tags["strategy"] == "entropy_minimization" for k in stopped)
    rows = list(csv.DictReader(open(search_run["dir"] / "leaderboard.csv")))
    assert any(r["status"] == "stopped_early" and int(r["iterations"]) < 40 for r in rows)


@pytest.mark.slow
def test_tpe_is_told_which_trials_asha_stopped_and_which_diverged(search_run):
    """Optuna's TPE ranks COMPLETE trials above PRUNED ones, PRUNED ones by how far they got, and
    one without intermediate values last. A trial ASHA stopped must reach it as PRUNED with its Dice
    at every report (not as COMPLETE with the Dice of its lower budget); a completed trial as
    COMPLETE with its last Dice; a diverged one as PRUNED with nothing (as COMPLETE with Dice 0 it
    would outrank every stopped trial). Read from the searcher's state as Tune saved it."""
    import optuna

    from raysemi.searcher import AshaAwareOptunaSearch

    searcher = AshaAwareOptunaSearch(max_iterations=40, time_attr="iteration")
    searcher.restore_from_dir(str(search_run["dir"]))
    trials = {t.number: t for t in searcher._ot_study.trials}
    rows = {r["trial_id"]: r for r in csv.DictReader(open(search_run["dir"] / "leaderboard.csv"))}
    assert set(searcher._ot_trials) == set(rows) and not searcher.held  # every trial ended and was told
    states = {}
    for trial_id, row in rows.items():
        told = trials[searcher._ot_trials[trial_id].number]
        states[row["status"]] = states.get(row["status"], set()) | {told.state}
        reports = reports_in(search_run["dir"] / f"{row['method']}_{trial_id}" / "result.json")
        if row["status"] == "failed":  # diverged: nothing, so it ranks last
            assert told.intermediate_values == {}
        else:  # every report, the one ASHA stopped it at too
            assert list(told.intermediate_values.values()) == [r["val/dice"] for r in reports]
            assert told.value == reports[-1]["val/dice"]
    assert states == {"stopped_early": {optuna.trial.TrialState.PRUNED},
                      "completed": {optuna.trial.TrialState.COMPLETE},
                      "failed": {optuna.trial.TrialState.PRUNED}}


def reports_in(result_json) -> list[dict]:
    """One trial's reports, from Tune's result.json in its folder."""
    return [json.loads(line) for line in result_json.read_text().splitlines()]


def trial_reports(search_dir) -> list[list[dict]]:
    """Each trial's reports, trials in the order they started."""
    trials = [reports_in(f) for f in search_dir.glob("*/result.json")]
    return sorted(trials, key=lambda rows: rows[0]["timestamp"] - rows[0]["time_total_s"])


@pytest.mark.slow
def test_a_worker_whose_trial_ended_takes_the_next_one(search_run):
    """Tune's reuse_actors: the next trial skips the process start and the imports; a trial ASHA
    stopped and one that diverged hand their worker on too."""
    trials = trial_reports(search_run["dir"])
    pids = [rows[0]["pid"] for rows in trials]
    assert len(trials) == 7 and len(set(pids)) == 1, pids  # one trial at a time (--cpus-per-trial 2 of 2)
    ended_early = [k for k, rows in enumerate(trials[:-1]) if rows[-1]["iteration"] < 40]
    assert ended_early, "the search should stop or lose a trial before its last iteration"


@pytest.mark.slow
def test_a_reused_worker_trains_a_trial_as_a_fresh_process_does(search_run, tiny_phantom, tmp_path, mlflow_store):
    """The same search with a new process per trial: the same configs, and the same losses and
    validation metrics at every report, so nothing of an earlier trial leaks into the next."""
    code = run_cli(search_main, ["--method", "supervised,em,mt", "--data", str(tiny_phantom), *TINY,
                                 "--num-samples", "4", "--search-space", str(search_run["tmp"] / "spaces"),
                                 "--grace-period", "30", "--reduction-factor", "2", "--seed", "3", "--name", "fresh",
                                 "--storage", str(tmp_path / "runs"), "--tracking-uri",
                                 mlflow_store(tmp_path / "m.db"), "--max-failures", "0", "--no-reuse-actors"])
    assert code == 0
    fresh = trial_reports(tmp_path / "runs" / "fresh")
    assert len({rows[0]["pid"] for rows in fresh}) == 4  # each trial in its own worker
    reused = trial_reports(search_run["dir"])[:4]
    keys = ("iteration", "train/loss", "val/dice", "val/hd95", "diverged")
    for a, b in zip(reused, fresh):
        assert (a[0]["method"], a[0]["params"]) == (b[0]["method"], b[0]["params"])
        assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]


@pytest.mark.slow
def test_leaderboard_ranks_by_best_validation_dice_and_best_config_retrains(search_run, tiny_phantom):
    rows = [r for r in csv.DictReader(open(search_run["dir"] / "leaderboard.csv")) if r["rank"]]
    dice = [float(r["best_val_dice"]) for r in rows]
    assert dice == sorted(dice, reverse=True) and [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["method"] == "supervised" and dice[0] > 0.1
    best = search_run["dir"] / "best_config.yaml"
    text = best.read_text()
    assert "method: supervised" in text and "base_lr: 0.1" in text
    out = search_run["tmp"] / "retrain"
    # accepted unchanged by raysemi.train (only the budget shortened for the test)
    assert run_cli(train_main, ["--config", str(best), "--max-iterations", "2", "--eval-interval", "2",
                                "--no-mlflow", "--output", str(out), "--device", "cpu"]) == 0
    assert (out / "best.pt").is_file()
    from raysemi.evaluate import load_network

    net, cfg = load_network(search_run["dir"] / "best_checkpoint.pt", None, "cpu")
    assert cfg.method == "supervised"


@pytest.mark.parametrize("ending, code", [("returns", None), ("is stopped", 0), ("exits", 3)])
def test_an_ended_trial_leaves_nothing_alive_in_its_worker(tiny_phantom, ending, code):
    """A reused worker waits for its next trial with nothing of the last one held: its networks
    (with their GPU memory) are freed when it returns and when Tune stops it. Tune stops a trial by
    raising SystemExit(0) in its thread at a report, as `run` does here; another exit's code is
    passed on (Tune fails that trial). Automatic collection is off, as nothing makes it run
    between two trials."""
    import gc
    import weakref

    from raysemi.data import load_dataset
    from raysemi.loop import Trainer
    from raysemi.trainable import _KeepBest, run_then_release
    from tests.conftest import tiny_config

    held = []

    def run():
        keeper = _KeepBest()
        trainer = Trainer(tiny_config(tiny_phantom, method="mean_teacher", max_iterations=4),
                          load_dataset(str(tiny_phantom), 2, 4), [keeper])
        trainer.start()
        trainer.train_until(4)
        assert keeper.payload is not None  # the trial's best networks, copied, are held too
        held.extend([weakref.ref(trainer), weakref.ref(trainer.strategy), weakref.ref(keeper)])
        if code is not None:
            sys.exit(code)

    gc.collect()
    gc.disable()
    try:
        if code is not None:
            with pytest.raises(SystemExit) as stop:
                run_then_release(run, "cpu")
            assert stop.value.code == code  # passed on: Tune's own way of ending the thread, or another's
        else:
            run_then_release(run, "cpu")
        # checked while the stop is still held, as Ray's thread runner holds it
        assert held and all(ref() is None for ref in held)
    finally:
        gc.enable()


def test_best_so_far_is_the_best_mean_over_seeds_the_leaderboard_ranks_by():
    from types import SimpleNamespace

    from raysemi.trainable import best_so_far

    seeds = [SimpleNamespace(history=[{"val/dice": 0.2}, {"val/dice": 0.8}, {"val/dice": 0.5}]),
             SimpleNamespace(history=[{"val/dice": 0.4}, {"val/dice": 0.6}, {"val/dice": 0.7}])]
    # the evaluations' means are 0.3, 0.7, 0.6: the best is 0.7, not the last (0.6) nor the mean of
    # the per-seed maxima (0.75)
    assert best_so_far(seeds) == pytest.approx(0.7)
    assert best_so_far([seeds[0]]) == pytest.approx(0.8)  # one seed: its best, not its last 0.5
    assert math.isnan(best_so_far([SimpleNamespace(history=[])]))


def test_a_gpu_trial_where_torch_sees_no_cuda_fails_with_the_reason_instead_of_training_on_cpus():
    """The GPUs Ray gave the trial decide its device. Ray may give one on a node whose torch is a
    CPU build: the trial must fail saying so, not train for days on that node's CPUs."""
    import torch

    from raysemi.trainable import trial_device

    assert trial_device([]) == "cpu"
    if torch.cuda.is_available():
        assert trial_device(["0"]) == "cuda"
    else:
        with pytest.raises(UserError, match=r"node .+: Ray gave this trial GPU 0, but torch .+ there sees no CUDA "
                                            r"device; expected a CUDA build of torch on every GPU node"):
            trial_device(["0"])


@pytest.mark.parametrize("visible, gpu_ids, expected", [
    ("3", ["3"], "cuda"),                        # Ray narrowed the devices to the trial's GPU
    ("2,3", ["2", "3"], "cuda"),                  # a two-GPU trial trains on its first
    (None, ["2"], "cuda:2"),                      # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    ("4,5,6,7", ["6"], "cuda:2"),                 # the same, on a node started with four of eight
    ("GPU-aa,GPU-bb", ["GPU-bb"], "cuda:1"),      # ids as UUIDs
])
def test_a_gpu_trial_trains_on_the_gpu_ray_gave_it(monkeypatch, visible, gpu_ids, expected):
    """Each packed or parallel trial must land on its own GPU, also where Ray leaves every GPU
    visible; there plain 'cuda' would put all trials on the node's first GPU. (No GPU here: CUDA's
    presence is faked; the mapping is what is tested.)"""
    import torch

    from raysemi.trainable import trial_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert trial_device(gpu_ids) == expected


def test_a_search_says_when_tpe_can_guide_few_of_its_trials():
    """TPE's first 10 trials are random, and trials that start together see none of each other's
    results: 16 trials 16 at once (4 GPUs at 0.25) are a random search, and the search says so."""
    from raysemi.search import tpe_note

    assert tpe_note(16, 16).startswith("16 of the 16 trials are drawn at random (the first 16 start together, before "
                                       "any result), 0 proposed from finished ones; --num-samples 32 or more")
    assert tpe_note(16, 4).startswith("10 of the 16 trials are drawn at random (TPE's first 10 are), 6 proposed")
    assert tpe_note(32, 4) == tpe_note(32, 16) == tpe_note(20, 2) == ""  # half or more guided: nothing to say
    # --start-at-defaults: its first trials are among TPE's first ones, fixed rather than drawn
    assert tpe_note(6, 2, at_base=2) == ("4 of the 6 trials are drawn at random (TPE's first 10 are, the first 2 at "
                                         "the base config), 0 proposed from finished ones; --num-samples 20 or more "
                                         "lets TPE guide most of them")


def test_the_table_is_sorted_by_best_dice_only_when_every_ended_trial_has_it():
    from types import SimpleNamespace

    from raysemi.search import sortable_by_best

    ended = SimpleNamespace(status="TERMINATED", last_result={"val/dice": 0.5, "best_val_dice": 0.7})
    running = SimpleNamespace(status="RUNNING", last_result={"val/dice": 0.4})
    pending = SimpleNamespace(status="TERMINATED", last_result={})
    assert sortable_by_best([ended, running, pending])
    older = SimpleNamespace(status="TERMINATED", last_result={"val/dice": 0.6})  # a search resumed from before
    assert not sortable_by_best([ended, older])


def test_the_current_best_trial_line_gives_its_sampled_values():
    from types import SimpleNamespace

    from raysemi.search import with_best_params

    trials = [SimpleNamespace(trial_id="a1", last_result={"method": "mean_teacher", "params": "consistency=0.3"}),
              SimpleNamespace(trial_id="b2", last_result={})]
    table = ("== Status ==\nCurrent best trial: a1 with best_val_dice=0.81 and parameters={'method': 'mean_teacher'}\n"
             "Number of trials: 2/2")
    assert with_best_params(table, trials).split("\n")[1] == (
        "Current best trial: a1 with best_val_dice=0.81 and parameters: method=mean_teacher, consistency=0.3")
    unknown = table.replace("a1 with", "b2 with")  # no params reported yet: Tune's line stays
    assert with_best_params(unknown, trials) == unknown


@pytest.mark.parametrize("flags,message", [
    (["--gpus", "4"], "error: --gpus: 4 asked, but this machine has {gpus}; expected at most that many"),
    (["--gpus", "-1"], "error: --gpus: -1 is invalid; expected 0 or more"),
    (["--gpus-per-trial", "-0.5"], "error: --gpus-per-trial: -0.5 is invalid; expected 0 or more"),
    (["--cpus-per-trial", "0"], "error: --cpus-per-trial: 0 is invalid; expected an integer >= 1"),
    (["--cpus-per-trial", "5"], "error: --cpus-per-trial: 5 is invalid; expected 1 to 2 (the CPUs given to --num-cpus)"),
    (["--grace-period", "100"], "error: --grace-period: 100 is invalid; expected at most max_iterations (40)"),
    (["--data", "/nonexistent/acdc"], "error: /nonexistent/acdc: data folder not found"),
    (["--method", ","], "error: --method: ',' names no strategy; expected a strategy, a comma-separated list or 'all'"),
    (["--method", "mt,,foo"], "error: --method: unknown method 'foo'; known: supervised (baseline), mean_teacher (mt)"),
], ids=["more_gpus_than_here", "negative_gpus", "negative_gpus_per_trial", "zero_cpus_per_trial",
        "more_cpus_per_trial_than_ray", "grace_beyond_the_trial", "missing_data", "empty_method_list",
        "unknown_method_in_a_list"])
def test_flags_that_cannot_work_are_refused_before_data_ray_or_mlflow(flags, message, tiny_phantom, tmp_path, capsys):
    """One line, exit 2, nothing printed before it and nothing started: no search folder, no store."""
    code = run_cli(search_main, ["--method", "mean_teacher", "--data", str(tiny_phantom), *TINY[:-8],
                                 "--num-cpus", "2", *flags, "--storage", str(tmp_path / "st"), "--name", "x",
                                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    out, err = capsys.readouterr()
    import torch

    here = torch.cuda.device_count()
    message = message.format(gpus=f"{here} GPU{'' if here == 1 else 's'}")
    assert code == 2 and out == "" and err.startswith(message) and len(err.strip().splitlines()) == 1, (out, err)
    assert not (tmp_path / "st" / "x").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_cuda_graphs_on_with_cpu_trials_is_refused_before_any_trial(tiny_phantom, tmp_path, capsys):
    code = run_cli(search_main, ["--method", "supervised", "--data", str(tiny_phantom), *TINY[:-8],
                                 "--num-cpus", "2", "--gpus", "0", "--cuda-graphs", "on", "--storage", str(tmp_path),
                                 "--name", "g", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("error: cuda_graphs: 'on' needs GPU trials, but this search runs its trials on "
                                     "CPUs (--gpus 0, or no GPU in the cluster); expected 'auto' (graphs on CUDA "
                                     "trials only) or 'off'"), err
    assert not (tmp_path / "g").exists()  # nothing started, nothing to resume


@pytest.mark.parametrize("content,match", [
    ("learning_rate: {type: uniform, low: 0.1, high: 0.2}\n", "learning_rate: not a config field"),
    ("ema_decay: {type: uniform, low: 0.9}\n", "ema_decay: low/high"),
    ("consistency: {type: loguniform, low: 0, high: 1}\n", "expected > 0 for a loguniform"),
    ("uncertainty_passes: {type: uniform, low: 1, high: 8}\n", "uncertainty_passes is a int"),
    ("base_lr: {type: uniform, low: 0.01, high: 0.05, step: fine}\n", "base_lr: step: 'fine'; expected a number > 0"),
    ("base_lr: {type: uniform, low: 0.01, high: 0.05, step: 0}\n", "base_lr: step: 0; expected a number > 0"),
    ("base_lr: {type: loguniform, low: 0.01, high: 0.05, step: 0.01}\n", "base_lr: step: 0.01; a log scale takes"),
    ("uncertainty_passes: {type: int, low: 2, high: 8, step: 1.5}\n", "step: 1.5; expected a whole number > 0"),
    ("uncertainty_passes: {type: int, low: 1.5, high: 8}\n", "low/high: 1.5/8; expected whole numbers"),
    ("uncertainty_passes: {type: int, low: 2, high: 8, log: yes please}\n", "log: 'yes please'; expected true"),
    ("base_lr: {type: uniform, low: 0.01, high: 0.05, log: true}\n", "log: True; expected true or false, and only"),
])
def test_bad_search_space_names_file_and_field(tmp_path, capsys, content, match):
    path = tmp_path / "space.yaml"
    path.write_text(content)
    code = run_cli(search_main, ["--method", "mean_teacher", "--search-space", str(path), "--storage", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {path}: ") and match in err and "Traceback" not in err


@pytest.mark.parametrize("files,method,match", [
    ({"meanteacher.yaml": "base_lr: {type: choice, values: [0.01]}\n"}, "mt",
     "{d}/meanteacher.yaml: 'meanteacher' names no strategy; expected <strategy>.yaml, <strategy> one of: supervised "
     "(baseline), mean_teacher (mt)"),
    ({"mt.yaml": "", "mean_teacher.yml": ""}, "mt",
     "{d}/mean_teacher.yml and {d}/mt.yaml are both mean_teacher's space; expected one file per strategy"),
    ({"supervised.yaml": "base_lr: {type: choice, values: [0.01]}\n", "notes.txt": "x"}, "mt",
     "{d}: no space for mean_teacher (found: supervised.yaml); expected mean_teacher.yaml (a strategy without its "
     "file there keeps the shipped space)"),
    ({}, "mt,em", "{d}: no space for mean_teacher or entropy_minimization (found: no .yaml files); expected "
                  "mean_teacher.yaml"),
])
def test_a_search_space_folder_the_search_would_not_use_is_refused(tmp_path, capsys, files, method, match):
    folder = tmp_path / "spaces"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    code = run_cli(search_main, ["--method", method, "--search-space", str(folder), "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --search-space: {match.format(d=folder)}"), err
    assert not (tmp_path / "runs").exists()


def test_a_search_space_folder_takes_aliases_and_says_where_each_space_came_from(tmp_path):
    from raysemi.search_space import describe_sources, load_spaces, shipped_space_path

    folder = tmp_path / "spaces"
    folder.mkdir()
    (folder / "mt.yaml").write_text("base_lr: {type: loguniform, low: 0.001, high: 0.002}\n")
    (folder / "README.md").write_text("my spaces\n")  # not a space: left alone
    (folder / "._mt.yaml").write_text("\x00\x05")  # hidden (macOS's resource fork): left alone too
    spaces = load_spaces(["mean_teacher", "supervised"], str(folder))
    assert list(spaces["mean_teacher"]) == ["base_lr"] and spaces["mean_teacher"]["base_lr"].high == 0.002
    assert spaces["supervised"] == load_spaces(["supervised"])["supervised"]  # no file: the shipped space
    assert describe_sources(["mean_teacher", "supervised"], str(folder)) == (
        f"search spaces: mean_teacher from {folder / 'mt.yaml'}; supervised shipped")
    assert shipped_space_path("supervised").is_file()
    # one file named for another strategy than the one searched is refused; any other name is taken
    (tmp_path / "supervised.yaml").write_text("base_lr: {type: choice, values: [0.01]}\n")
    with pytest.raises(UserError, match=r"--search-space: .*supervised.yaml is named for supervised but "
                                        r"mean_teacher is searched; expected mean_teacher's space"):
        load_spaces(["mean_teacher"], str(tmp_path / "supervised.yaml"))
    assert list(load_spaces(["supervised"], str(tmp_path / "supervised.yaml"))["supervised"]) == ["base_lr"]
    (tmp_path / "mine.yaml").write_text("base_lr: {type: choice, values: [0.01]}\n")
    assert list(load_spaces(["mean_teacher"], str(tmp_path / "mine.yaml"))["mean_teacher"]) == ["base_lr"]


def test_a_continued_search_keeps_the_spaces_it_started_with(tmp_path):
    from raysemi.search_space import continued_spaces, load_spaces, spaces_to_json

    folder = tmp_path / "spaces"
    folder.mkdir()
    (folder / "mt.yaml").write_text("base_lr: {type: choice, values: [0.01, 0.02]}\n")
    started = load_spaces(["mean_teacher", "supervised"], str(folder))
    saved = json.loads(json.dumps({"search_space": str(folder), "spaces": spaces_to_json(started)}))
    (folder / "mt.yaml").write_text("base_lr: {type: choice, values: [0.5]}\n")  # edited since
    (folder / "typo.yaml").write_text("")  # would be refused as --search-space now
    assert continued_spaces(saved, ["mean_teacher", "supervised"]) == started
    # a search started by an older version saved only the folder: read by the rule it started with
    # (a folder's <strategy>.yaml only, nothing refused), so mt.yaml was never its space
    older = continued_spaces({"search_space": str(folder)}, ["mean_teacher", "supervised"])
    assert older == load_spaces(["mean_teacher", "supervised"])


def test_shipped_search_spaces_cover_every_strategy():
    from raysemi.methods import list_methods
    from raysemi.search_space import load_spaces

    spaces = load_spaces(list_methods())
    assert set(spaces) == set(list_methods())
    assert spaces["mean_teacher"]["consistency"].type == "loguniform"
    assert {"ema_decay", "base_lr", "consistency_rampup"} <= set(spaces["mean_teacher"])
    assert {"uncertainty_threshold_start", "uncertainty_threshold_end"} <= set(spaces["uncertainty_aware_mean_teacher"])
    assert "ict_alpha" in spaces["interpolation_consistency"] and "dan_lr" in spaces["adversarial"]
    assert "uncertainty_passes" in spaces["uncertainty_aware_mean_teacher"]  # T, searchable per METHODS.md


def test_every_shipped_space_can_draw_the_reference_defaults():
    """A search can land on the reference's own setting of every parameter it searches, so a
    tuned result is never worse by construction than the default it is meant to beat."""
    from raysemi.config import TrainConfig
    from raysemi.methods import list_methods
    from raysemi.search_space import load_spaces

    default = TrainConfig()
    for method, space in load_spaces(list_methods()).items():
        for name, dist in space.items():
            value = getattr(default, name)
            inside = value in dist.values if dist.type == "choice" else dist.low <= value <= dist.high
            assert inside, f"{method}: {name} = {value} (the default) cannot be drawn from {dist}"
            if dist.type == "int" and dist.step:
                assert (value - dist.low) % dist.step == 0, f"{method}: {name} = {value} is off the step of {dist}"


def test_unreachable_tracking_server_fails_before_any_trial(tmp_path, capsys):
    t0 = time.time()
    code = run_cli(search_main, ["--method", "mt", "--tracking-uri", "http://127.0.0.1:9", "--storage", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "tracking_uri: 'http://127.0.0.1:9' does not answer" in err
    assert time.time() - t0 < 30 and not any(tmp_path.iterdir())


def test_only_a_store_or_connection_error_stops_a_search_with_the_resume_line():
    """Followed as Python prints the chain: the MLflow error (not the connection error under it,
    which has lost the URL), and never a context the code suppressed; a bug is shown whole."""
    from mlflow.exceptions import MlflowException
    from ray.tune import TuneError

    from raysemi.search import store_failure

    def chained(make):
        try:
            make()
        except Exception as err:  # noqa: BLE001
            return err

    def refused():
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError:
            raise MlflowException("API request to http://tracking:5000/api/2.0/mlflow/runs/update failed")

    def wrapped(inner):
        def make():
            try:
                inner()
            except Exception:
                raise TuneError("Traceback (most recent call last): ...")
        return make

    def bug():
        {}["val/dice"]

    def suppressed():
        try:
            int("x")
        except ValueError:
            raise RuntimeError("the map file is locked") from None

    found = store_failure(chained(wrapped(refused)))
    assert isinstance(found, MlflowException) and "http://tracking:5000" in str(found)
    assert isinstance(store_failure(chained(refused)), MlflowException)  # unwrapped, as Ray re-raises some
    assert isinstance(store_failure(chained(wrapped(lambda: open("/nonexistent/dir/f", "w")))), FileNotFoundError)
    assert store_failure(chained(wrapped(bug))) is None
    assert store_failure(chained(wrapped(suppressed))) is None


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["log_metrics", "update_run"])
def test_a_tracking_store_that_stops_answering_stops_the_search_in_one_line_and_resume_goes_on(
        tiny_phantom, tmp_path, monkeypatch, capsys, failing, mlflow_store):
    """The driver logs every trial to MLflow; when the store stops answering (stood in for by the
    client's error: a server cannot be made to fail at a chosen moment), the search ends with one
    line naming the cause and the command that continues it, and that command, once the store
    answers again, finishes the search with every trial in its own run. The failing call is a
    trial's metrics (Tune wraps the error in TuneError) or the start of its run (Ray re-raises it
    as it is)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient as Client

    from raysemi.tracking import MLflowRun

    uri = mlflow_store(tmp_path / "m.db")
    owner = MLflowRun if failing == "log_metrics" else Client
    answering = getattr(owner, failing)

    def down(self, *args, **kwargs):
        raise MlflowException("API request to http://tracking:5000 failed: Connection refused (test)")

    monkeypatch.setattr(owner, failing, down)
    code = run_cli(search_main, ["--method", "supervised", "--data", str(tiny_phantom), *TINY, "--max-iterations", "20",
                                 "--num-samples", "2", "--name", "down", "--storage", str(tmp_path / "runs"),
                                 "--tracking-uri", uri])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, err[-3000:]
    assert "error: the search stopped: MlflowException: API request to http://tracking:5000 failed: Connection " \
           "refused (test); its finished trials and Tune's state are kept in" in errors[0]
    assert errors[0].endswith(f"continue with: python -m raysemi.search --name down --storage {tmp_path / 'runs'} "
                              "--resume")
    _, (parent,), _ = children(uri, "raysemi-search")
    assert parent.data.tags["status"] == "interrupted" and "Connection refused" in parent.data.tags["stopped_by"]
    assert parent.info.status == "KILLED"  # not RUNNING for ever (set_terminated is not the call that failed)

    if failing != "log_metrics":
        return  # the resume is the same whichever call failed
    monkeypatch.setattr(owner, failing, answering)
    code = run_cli(search_main, ["--name", "down", "--storage", str(tmp_path / "runs"), "--resume", "--num-cpus", "2",
                                 "--cpus-per-trial", "2", "--gpus", "0"])
    assert code == 0, capsys.readouterr().err[-3000:]
    client, parents, kids = children(uri, "raysemi-search")
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and len(kids) == 2
    for k in kids:
        assert k.info.status == "FINISHED" and client.get_metric_history(k.info.run_id, "val/dice")


@pytest.mark.slow
def test_a_search_stopped_before_tune_saved_a_trial_starts_its_trials_on_resume(tiny_phantom, tmp_path, capsys,
                                                                                  mlflow_store):
    """Its settings and MLflow parent run were saved, Tune's state was not (a crash in between):
    --resume starts its trials with those settings, in that parent run, instead of refusing."""
    from raysemi.config import TrainConfig, save_yaml

    uri = mlflow_store(tmp_path / "m.db")
    client = MlflowClient(tracking_uri=uri)
    # its artifacts in the temp folder, as the search itself places them (not ./mlruns under the cwd)
    experiment = client.create_experiment("raysemi-search", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent_id = client.create_run(experiment, run_name="h").info.run_id
    folder = tmp_path / "runs" / "h"
    folder.mkdir(parents=True)
    save_yaml(TrainConfig(method="mean_teacher", data=str(tiny_phantom), labeled_patients=3, patch_size=(32, 32),
                          batch_size=8, labeled_bs=4, max_iterations=20, eval_interval=10, mt_warmup=0,
                          eval_batch_size=16, tracking_uri=uri), folder / "base_config.yaml")
    (folder / "raysemi_search.json").write_text(json.dumps({
        "parent_run_id": parent_id, "methods": ["mean_teacher"], "tracking_uri": uri, "num_samples": 1, "seeds": 1,
        "experiment": "raysemi-search", "search_space": str(tmp_path / "gone"), "finished": False,
        "spaces": {"mean_teacher": {"base_lr": {"type": "choice", "values": [0.0123]}}}}))
    code = run_cli(search_main, ["--name", "h", "--storage", str(tmp_path / "runs"), "--resume", "--num-cpus", "2",
                                 "--cpus-per-trial", "2", "--gpus", "0"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert f"search h stopped before Tune saved any trial: starting its trials with its saved settings (MLflow " \
           f"parent run {parent_id})" in out
    _, parents, kids = children(uri, "raysemi-search")
    assert [p.info.run_id for p in parents] == [parent_id] and parents[0].info.status == "FINISHED"
    assert len(kids) == 1 and kids[0].data.tags["mlflow.parentRunId"] == parent_id
    # the saved space was searched (its --search-space folder is gone since: not read again)
    assert kids[0].data.params["base_lr"] == "0.0123"
    assert json.loads((folder / "raysemi_search.json").read_text())["finished"] is True


@pytest.mark.slow
def test_interrupted_search_resumes_without_losing_or_duplicating_trials(tiny_phantom, tmp_path, mlflow_store):
    uri = mlflow_store(tmp_path / "mlflow.db")
    args = [sys.executable, "-m", "raysemi.search", "--method", "mean_teacher", "--data", str(tiny_phantom), *TINY,
            "--num-samples", "3", "--name", "r", "--storage", str(tmp_path / "runs"), "--tracking-uri", uri]
    runs_file = tmp_path / "runs" / "r" / "mlflow_trial_runs.json"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait until the second trial has started: the first is done
            if runs_file.is_file() and len(json.loads(runs_file.read_text() or "{}")) >= 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the search did not start its second trial in time")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "--resume" in out
    before = json.loads(runs_file.read_text())
    client, parents, kids = children(uri, "raysemi-search")
    finished_before = {k.data.tags["trial_id"] for k in kids if k.data.tags["status"] == "completed"}
    assert finished_before
    # MLflow does not show the interrupted search as running: its parent and unfinished trials ended KILLED
    assert [(p.info.status, p.data.tags["status"]) for p in parents] == [("KILLED", "interrupted")]
    unfinished = [k for k in kids if k.data.tags["trial_id"] not in finished_before]
    assert unfinished and all((k.info.status, k.data.tags["status"]) == ("KILLED", "interrupted") for k in unfinished)

    # a store that does not hold the search's runs is refused in one line, before Ray starts
    other = f"sqlite:///{tmp_path / 'other.db'}"
    wrong = subprocess.run([sys.executable, "-m", "raysemi.search", "--name", "r", "--storage", str(tmp_path / "runs"),
                            "--resume", "--tracking-uri", other], capture_output=True, text=True, cwd=tmp_path,
                           timeout=120)
    parent_id = json.loads((tmp_path / "runs" / "r" / "raysemi_search.json").read_text())["parent_run_id"]
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1] == (
        f"error: --resume: the search's MLflow parent run {parent_id} is not there in {other}; expected the store it "
        f"was started with ({uri}): leave out --tracking-uri, or restore the run"), wrong.stderr[-2000:]
    assert "Traceback" not in wrong.stderr and "Ray cluster" not in wrong.stdout

    # as a user would type it: the name (the search's own settings were saved with it), here with
    # settings it cannot change any more (a config field; ASHA's factor and the actor reuse,
    # restored with Tune's state), which it says it ignores, and not the saved ones it was not given (--num-samples)
    again = subprocess.run([sys.executable, "-m", "raysemi.search", "--name", "r", "--storage", str(tmp_path / "runs"),
                            "--resume", "--base-lr", "0.5", "--reduction-factor", "2", "--no-reuse-actors"],
                           capture_output=True,
                           text=True, cwd=tmp_path, timeout=400,
                           env={**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///nowhere-else.db"})
    assert again.returncode == 0, again.stdout[-3000:]
    assert "continuing search 'r'" in again.stdout and "resuming search r" in again.stdout
    assert "warning: --base-lr, --reduction-factor, --no-reuse-actors: ignored; a continued search keeps the " \
           "settings it started with" in again.stdout
    assert not (tmp_path / "nowhere-else.db").exists()  # the saved tracking URI is used
    client, parents, kids = children(uri, "raysemi-search")
    assert len(parents) == 1 and len(kids) == 3  # nothing logged twice as a new run
    assert parents[0].info.status == "FINISHED" and all(k.info.status == "FINISHED" for k in kids)
    after = json.loads(runs_file.read_text())
    assert all(after[t] == run_id for t, run_id in before.items())
    # the map on disk holds every trial, those of the resumed session too (Tune's sync of its own
    # copy of the folder must not put back the first session's map)
    assert sorted(after.values()) == sorted(k.info.run_id for k in kids)
    for k in kids:
        steps = [m.step for m in client.get_metric_history(k.info.run_id, "val/dice")]
        assert steps == sorted(set(steps)), steps  # no step logged twice
        assert k.data.tags["status"] in ("completed", "stopped_early")
    rows = list(csv.DictReader(open(tmp_path / "runs" / "r" / "leaderboard.csv")))
    assert finished_before <= {r["trial_id"] for r in rows} and len(rows) == 3
    assert all(int(r["iterations"]) <= 40 for r in rows)  # the saved budget, not the default 30,000
    # a finished search is not silently re-entered by a rerun with the same name
    third = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert third.returncode == 2 and "search 'r'" in third.stderr and "is finished" in third.stderr


@pytest.mark.parametrize("address,match", [
    ("127.0.0.1:9", "--address: '127.0.0.1:9': no Ray cluster answers"),
    ("nonsense", "--address: 'nonsense' is invalid"),
])
def test_address_pointing_at_nothing_fails_fast(tiny_phantom, tmp_path, capsys, address, match):
    t0 = time.time()
    code = run_cli(search_main, ["--method", "mt", "--data", str(tiny_phantom), "--labeled-patients", "2",
                                 "--address", address, "--storage", str(tmp_path),
                                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err and time.time() - t0 < 30, err
    assert out == ""  # refused before the data is loaded


@pytest.mark.parametrize("extra,match", [
    (["--method", "mt", "--batch-size", "4", "--labeled-bs", "4"], "--labeled-bs: 4 is invalid"),
    (["--method", "dv", "--model", "unet"], "pyramid_consistency: model: 'unet' cannot be used"),
    (["--method", "supervised,mt", "--eval-model", "teacher"], "supervised: eval_model: 'teacher'"),
    (["--method", "ict", "--batch-size", "7", "--labeled-bs", "2"],
     "error: interpolation_consistency: the unlabeled slices per batch (batch_size - labeled_bs = 5) must be even"),
    (["--method", "mt", "--reduction-factor", "1"], "--reduction-factor: 1 is invalid"),
    (["--method", "all", "--num-samples", "6", "--start-at-defaults"],
     "--start-at-defaults: one first trial per strategy needs --num-samples 7 or more; --num-samples is 6"),
])
def test_settings_no_trial_could_run_with_are_refused_before_ray_starts(tiny_phantom, tmp_path, capsys, extra, match):
    t0 = time.time()
    code = run_cli(search_main, [*extra, "--data", str(tiny_phantom), "--labeled-patients", "2", "--storage",
                                 str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and match in err[-1] and time.time() - t0 < 20
    assert not any(tmp_path.iterdir())  # nothing written, no Ray started


def test_base_points_hold_the_base_values_each_space_can_draw():
    """--start-at-defaults' points, in the define-by-run names; a base value outside its space is left
    to the sampler (Optuna refuses a categorical value outside its choices), and said."""
    from raysemi.config import TrainConfig
    from raysemi.search_space import Dist, base_points

    base = TrainConfig(consistency=0.1, ema_decay=0.99, consistency_rampup=200.0, uncertainty_passes=8).to_dict()
    spaces = {"mean_teacher": {"consistency": Dist("loguniform", 0.01, 10.0),
                               "ema_decay": Dist("choice", values=(0.9, 0.99)),
                               "consistency_rampup": Dist("uniform", 20.0, 150.0)},
              "uncertainty_aware_mean_teacher": {"uncertainty_passes": Dist("int", 2, 10, step=2),
                                                 "ema_decay": Dist("choice", values=(0.9, 0.999))}}
    points, left_out = base_points(spaces, base)
    assert points == [{"method": "mean_teacher", "mean_teacher/consistency": 0.1, "mean_teacher/ema_decay": 0.99},
                      {"method": "uncertainty_aware_mean_teacher",
                       "uncertainty_aware_mean_teacher/uncertainty_passes": 8}]
    assert left_out == [
        "mean_teacher's base consistency_rampup 200.0 lies outside its search space (uniform 20..150): sampled instead",
        "uncertainty_aware_mean_teacher's base ema_decay 0.99 lies outside its search space (choice of 0.9, 0.999): "
        "sampled instead"]
    # one strategy: no 'method' to fix; off the int grid, or a bool for a number, is outside
    assert base_points({"mean_teacher": {"consistency": Dist("uniform", 0.0, 1.0, step=0.25)}}, base) == (
        [{}], ["mean_teacher's base consistency 0.1 lies outside its search space (uniform 0..1 in steps of 0.25): "
               "sampled instead"])
    assert not Dist("int", 2, 10, step=2).contains(7) and Dist("int", 2, 10, step=2).contains(6)
    assert not Dist("uniform", 0.0, 2.0).contains(True) and not Dist("choice", values=(1, 2)).contains(True)
    assert Dist("choice", values=(1, 2)).contains(1.0)  # Optuna takes 1.0 for the choice 1


def test_base_points_start_optunas_first_trials_at_the_shipped_defaults():
    """The reference defaults lie in every shipped space, and Optuna (through Tune's searcher)
    starts its first trials exactly there, one per strategy, then samples."""
    from raysemi.config import TrainConfig
    from raysemi.methods import list_methods
    from raysemi.searcher import AshaAwareOptunaSearch
    from raysemi.search_space import at_base_config, base_points, define_by_run, load_spaces, trial_values

    methods = list_methods()
    spaces = load_spaces(methods)
    base = TrainConfig().to_dict()
    points, left_out = base_points(spaces, base)
    assert left_out == [] and len(points) == len(methods)
    searcher = AshaAwareOptunaSearch(space=define_by_run(spaces), metric="val/dice", mode="max", max_iterations=10,
                                     time_attr="iteration", points_to_evaluate=points)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns at a fixed value outside its distribution
        configs = [searcher.suggest(f"t{i}") for i in range(len(methods) + 1)]
    firsts = [trial_values(c) for c in configs[:-1]]
    assert [m for m, _ in firsts] == methods
    assert all(values == {k: base[k] for k in spaces[m]} and at_base_config(values, base) for m, values in firsts)
    assert not at_base_config(trial_values(configs[-1])[1], base)  # then sampled


@pytest.mark.slow
def test_start_at_defaults_runs_the_base_config_first_and_the_leaderboard_marks_it(tiny_phantom, tmp_path, capsys,
                                                                                   mlflow_store):
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "supervised.yaml").write_text("base_lr: {type: choice, values: [0.01, 0.05]}\n")
    (spaces / "mean_teacher.yaml").write_text("consistency: {type: loguniform, low: 0.01, high: 1.0}\n"
                                              "ema_decay: {type: choice, values: [0.9, 0.99]}\n")
    args = ["--method", "supervised,mt", "--data", str(tiny_phantom), *TINY, "--max-iterations", "20",
            "--num-samples", "3", "--search-space", str(spaces), "--consistency", "0.2", "--start-at-defaults",
            "--seed", "5", "--name", "d", "--storage", str(tmp_path / "runs"), "--schedules", "budget",
            "--tracking-uri", mlflow_store(tmp_path / "m.db")]
    assert run_cli(search_main, args) == 0
    out = capsys.readouterr().out.splitlines()
    # --schedules budget: the reference's ramp and warm-up scaled to 20 iterations (nothing to say
    # before the trials), the mode in best_config.yaml, and the last line says nothing needs resetting
    assert not any(line.startswith("note: in 20 iterations") for line in out)
    assert yaml.safe_load((tmp_path / "runs" / "d" / "best_config.yaml").read_text())["schedules"] == "budget"
    assert out[-1].endswith("--seeds 3 (its --schedules budget scales the ramp and warm-up to that budget)")
    # the base config is the reference defaults with the flags' changes (--consistency 0.2)
    assert ("first trials at the base config: supervised (base_lr 0.01); mean_teacher (consistency 0.2, "
            "ema_decay 0.99)") in out
    assert any(line.startswith("note: 1 of the 3 trials are drawn at random (TPE's first 10 are, the first 2 at the "
                               "base config)") for line in out)
    trials = trial_reports(tmp_path / "runs" / "d")
    assert [(t[0]["method"], t[0]["params"]) for t in trials[:2]] == [
        ("supervised", "base_lr=0.01"), ("mean_teacher", "consistency=0.2, ema_decay=0.99")]
    assert "consistency=0.2," not in trials[2][0]["params"]  # then TPE samples
    rows = {r["trial_id"]: r for r in csv.DictReader(open(tmp_path / "runs" / "d" / "leaderboard.csv"))}
    marks = [rows[t[0]["trial_id"]]["at_base_config"] for t in trials]
    assert marks[:2] == ["true", "true"] and marks[2] == str(trials[2][0]["params"] == "base_lr=0.01").lower()
    assert sum(line.endswith("(base config)") for line in out) == marks.count("true")  # the printed leaderboard
    _, _, kids = children(f"sqlite:///{tmp_path / 'm.db'}", "raysemi-search")  # and MLflow, to filter by
    assert sorted(k.data.tags["at_base_config"] for k in kids) == sorted(marks)
    assert {(k.data.params["method"], k.data.params.get("effective/rampup_interval"),
             k.data.params.get("effective/mt_warmup")) for k in kids} >= {("mean_teacher", "0.1", "0")}  # TINY: --mt-warmup 0
    assert all("effective/rampup_interval" not in k.data.params for k in kids if k.data.params["method"] ==
               "supervised")  # nothing ramps
    assert json.loads((tmp_path / "runs" / "d" / "raysemi_search.json").read_text())["start_at_defaults"] is True


@pytest.mark.parametrize("content,match", [
    ("labeled_patients: {type: int, low: 1, high: 5}\n", "labeled_patients: cannot be searched"),
    ("ema_decay: {type: uniform, low: 0.9, high: 1.0}\n", "ema_decay: 1.0 is invalid"),
    ("ict_alpha: {type: choice, values: [0.2, 0]}\n", "ict_alpha: 0.0 is invalid"),
])
def test_search_space_values_are_checked_against_the_config(tmp_path, capsys, content, match):
    path = tmp_path / "space.yaml"
    path.write_text(content)
    code = run_cli(search_main, ["--method", "ict", "--search-space", str(path), "--storage", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(path) in err and match in err
    assert "fault_nan_at" not in err  # the test suite's switch is searchable, but not offered to users


def test_search_space_reads_exponent_numbers_as_numbers(tmp_path):
    """`low: 1e-4` (how learning rates are written) is a string to PyYAML's YAML 1.1; ours reads a number."""
    from raysemi.search_space import load_spaces

    path = tmp_path / "space.yaml"
    path.write_text("base_lr: {type: loguniform, low: 1e-4, high: 1e-1}\nconsistency: {type: choice, values: [1e-2, 1e-1]}\n")
    space = load_spaces(["mean_teacher"], str(path))["mean_teacher"]
    assert (space["base_lr"].low, space["base_lr"].high) == (1e-4, 0.1)
    assert list(space["consistency"].values) == [0.01, 0.1]
