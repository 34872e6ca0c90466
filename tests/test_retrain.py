"""Retraining with several seeds, --from-run and the supervised-baseline comparison, end to end on
the tiny phantom with a SQLite MLflow store in a temp folder (raysemi.retrain, raysemi.train)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from raysemi.errors import run_cli
from raysemi.metrics import Summary
from raysemi.retrain import aggregate, config_from_run
from raysemi.train import main as train_main

TINY = ["--labeled-patients", "2", "--patch-size", "32", "32", "--batch-size", "4", "--labeled-bs", "2",
        "--max-iterations", "6", "--eval-interval", "3", "--log-interval", "2", "--device", "cpu"]


def train(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """One in-process `python -m raysemi.train` call: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_cli(train_main, [str(a) for a in args])
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def runs_by_name(uri: str, experiment: str = "raysemi") -> dict:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


@pytest.fixture(scope="module")
def store(tiny_phantom, tmp_path_factory, mlflow_store):
    """One store holding a supervised baseline (1 seed) and a mean teacher retrain with 2 seeds and
    a non-default consistency, both on the same data and labeled patients."""
    tmp = tmp_path_factory.mktemp("retrain")
    uri = mlflow_store(tmp / "mlflow.db")
    common = ["--data", tiny_phantom, *TINY, "--tracking-uri", uri]
    base = train([*common, "--method", "supervised", "--output", "base"], tmp)
    assert base[0] == 0, base[2]
    mt = train([*common, "--method", "mean_teacher", "--mt-warmup", "0", "--consistency", "0.37", "--seeds", "2",
                "--output", "mt"], tmp)
    assert mt[0] == 0, mt[2]
    return {"tmp": tmp, "uri": uri, "common": common, "base_out": base[1], "mt_out": mt[1]}


# ---- --seeds --------------------------------------------------------------------------------------
def test_two_seeds_give_two_run_folders_and_an_aggregate_over_them(store):
    out = store["tmp"] / "mt"
    for k in (0, 1):
        for name in ("config.yaml", "last.pt", "best.pt", "train.log", "results.json"):
            assert (out / f"seed{k}" / name).is_file(), f"seed{k}/{name}"
        assert yaml.safe_load((out / f"seed{k}" / "config.yaml").read_text())["seed"] == 1337 + k
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [1337, 1338]
    per_seed = [s["test"] for s in results["per_seed"]]
    for key in ("dice", "dice_lv", "hd95", "asd_rv", "jaccard"):
        values = [s[key] for s in per_seed]
        assert results["test"][key] == pytest.approx(np.mean(values)), key
        assert results["std_seeds"]["test"][key] == pytest.approx(np.std(values)), key
        if values[0] != values[1]:
            assert results["std_seeds"]["test"][key] > 0, key
    assert any(a[k] != b[k] for a, b in [per_seed] for k in a), "two seeds gave identical results"
    assert results["std_volumes"]["test"]["dice"] >= 0 and "std_note" in results
    # the table printed at the end names both stds
    assert "std over all 12 (seed, volume) pairs" in store["mt_out"]
    assert "std of the 2 per-seed means" in store["mt_out"]
    # the CSV: split x seed x volume x class
    rows = list(csv.DictReader((out / "results_per_volume.csv").open()))
    test_rows = [r for r in rows if r["split"] == "test"]
    assert len(test_rows) == 2 * 6 * 3 and {r["seed"] for r in rows} == {"1337", "1338"}
    seed0_lv = [float(r["dice"]) for r in test_rows if r["seed"] == "1337" and r["class"] == "lv"]
    assert np.mean(seed0_lv) == pytest.approx(per_seed[0]["dice_lv"], abs=1e-5)


def test_two_seeds_log_a_parent_run_with_two_nested_seed_runs(store):
    runs = runs_by_name(store["uri"])
    parent = runs["mt"]
    kids = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in kids) == ["mt-seed0", "mt-seed1"]
    assert parent.info.status == "FINISHED" and parent.data.tags["role"] == "retrain"
    assert parent.data.tags["seeds"] == "2" and parent.data.params["consistency"] == "0.37"
    for kid in kids:  # each seed: the usual training metrics
        assert kid.info.status == "FINISHED" and kid.data.tags["role"] == "seed"
        assert {"val/dice", "train/loss", "test_best/dice", "best/val_dice"} <= set(kid.data.metrics)
    results = json.loads((store["tmp"] / "mt" / "results.json").read_text())
    m = parent.data.metrics
    assert m["test/dice"] == pytest.approx(results["test"]["dice"])
    assert m["test_std_seeds/dice_lv"] == pytest.approx(results["std_seeds"]["test"]["dice_lv"])
    assert "test_std_volumes/hd95" in m and "val_best/dice" in m
    client = MlflowClient(tracking_uri=store["uri"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "results_per_volume.csv", "results.txt", "config.yaml"} <= artifacts


def test_one_seed_keeps_the_single_run_layout(store):
    out = store["tmp"] / "base"
    assert not (out / "seed0").exists() and (out / "best.pt").is_file()
    results = json.loads((out / "results.json").read_text())
    assert {"best_iteration", "val", "test"} <= set(results) and results["seeds"] == [1337]
    run = runs_by_name(store["uri"])["base"]
    assert run.data.metrics["test/dice"] == pytest.approx(run.data.metrics["test_best/dice"])
    assert run.data.tags["role"] == "retrain" and "mlflow.parentRunId" not in run.data.tags


# ---- the baseline ---------------------------------------------------------------------------------
def test_baseline_comparison_against_the_supervised_run_with_the_same_labels(store):
    runs = runs_by_name(store["uri"])
    base_id = runs["base"].info.run_id
    assert f"versus the supervised baseline (MLflow run {base_id}" in store["mt_out"]
    results = json.loads((store["tmp"] / "mt" / "results.json").read_text())
    assert results["baseline"]["run_id"] == base_id
    parent = runs["mt"]
    assert parent.data.tags["baseline_run_id"] == base_id
    for key in ("dice", "dice_rv", "hd95_lv", "jaccard"):
        diff = results["test"][key] - runs["base"].data.metrics[f"test/{key}"]
        assert parent.data.metrics[f"test_vs_baseline/{key}"] == pytest.approx(diff), key
    # the baseline itself says what it is
    assert "this is a supervised run" in store["base_out"]


def test_a_supervised_run_with_other_labeled_patients_is_not_a_baseline(store):
    code, out, err = train([*store["common"], "--method", "mean_teacher", "--labeled-patients", "3",
                            "--max-iterations", "2", "--eval-interval", "2", "--output", "mt3"], store["tmp"])
    assert code == 0, err
    notice = [line for line in out.splitlines() if line.startswith("baseline:")]
    assert len(notice) == 1 and "no finished supervised retrain" in notice[0]
    assert "python -m raysemi.train --method supervised" in notice[0] and "--labeled-patients 3" in notice[0]
    assert json.loads((store["tmp"] / "mt3" / "results.json").read_text())["baseline"] is None
    run = runs_by_name(store["uri"])["mt3"]
    assert "baseline_run_id" not in run.data.tags
    assert not [k for k in run.data.metrics if k.startswith("test_vs_baseline/")]


# ---- --from-run -----------------------------------------------------------------------------------
def test_from_run_retrains_the_logged_config_and_flags_override_it(store):
    parent_id = runs_by_name(store["uri"])["mt"].info.run_id
    code, out, err = train(["--from-run", parent_id, "--tracking-uri", store["uri"], "--max-iterations", "2",
                            "--eval-interval", "2", "--output", "again"], store["tmp"])
    assert code == 0, err
    saved = yaml.safe_load((store["tmp"] / "again" / "config.yaml").read_text())
    assert saved["consistency"] == 0.37 and saved["method"] == "mean_teacher" and saved["mt_warmup"] == 0
    assert saved["max_iterations"] == 2  # the flag wins
    assert saved["output"] == "again"  # not the old run's folder
    assert (store["tmp"] / "again" / "results.json").is_file() and not (store["tmp"] / "again" / "seed0").exists()


def test_from_run_falls_back_to_the_params_of_a_run_without_config_yaml(store):
    client = MlflowClient(tracking_uri=store["uri"])
    exp = client.get_experiment_by_name("raysemi")
    run_id = client.create_run(exp.experiment_id, run_name="params-only").info.run_id
    for k, v in {"method": "mean_teacher", "consistency": "0.37", "patch_size": "32 32", "eval_hd95": "False",
                 "mt_warmup": "0", "output": "/old/place", "searched/consistency": "0.37"}.items():
        client.log_param(run_id, k, v)
    values, source = config_from_run(run_id, store["uri"])
    assert "params" in source
    assert values["consistency"] == 0.37 and values["patch_size"] == [32, 32] and values["eval_hd95"] is False
    assert values["mt_warmup"] == 0 and values["output"] == "" and "searched/consistency" not in values


def test_search_trial_runs_log_their_config_for_from_run(store, tmp_path):
    """The Tune callback of raysemi.search logs each trial's config.yaml (no Ray run needed)."""
    from raysemi.config import TrainConfig
    from raysemi.tracking import MLflowRun, make_tune_callback

    parent = MLflowRun(store["uri"], "search-exp", "search")
    base = TrainConfig(data="x", max_iterations=40, schedules="budget").to_dict()
    callback = make_tune_callback(store["uri"], "search-exp", parent.run_id, tmp_path / "state.json", base, 40)

    class Trial:
        trial_id = "t0001"
        config = {"method": "mean_teacher", "mean_teacher": {"consistency": 0.37, "ema_decay": 0.95}}

    callback.on_trial_start(0, [], Trial())
    values, source = config_from_run(callback.runs["t0001"], store["uri"])
    assert source.endswith("(config.yaml)")
    assert values["consistency"] == 0.37 and values["ema_decay"] == 0.95 and values["max_iterations"] == 40
    # what --schedules budget made of the ramp and warm-up at 40 iterations: 150 x 40 / 30,000, and
    # 1000 x 40 / 30,000 rounded (at least 1)
    params = MlflowClient(tracking_uri=store["uri"]).get_run(callback.runs["t0001"]).data.params
    assert values["schedules"] == "budget"
    assert (params["effective/rampup_interval"], params["effective/mt_warmup"]) == ("0.2", "1")


# ---- resume ---------------------------------------------------------------------------------------


def interrupt_seed1(monkeypatch):
    """Ctrl-C in seed 1 (seed 1338) after its iteration 1, which validates and writes last.pt; returns
    the real `Trainer.train_until`, to put back before the resume."""
    from raysemi.loop import Trainer

    original = Trainer.train_until

    def interrupted_in_seed1(self, stop):
        if self.config.seed == 1338:
            original(self, 1)
            raise KeyboardInterrupt
        original(self, stop)

    monkeypatch.setattr(Trainer, "train_until", interrupted_in_seed1)
    return original


def test_resume_keeps_finished_seeds_and_continues_the_interrupted_one(tiny_phantom, tmp_path, monkeypatch,
                                                                        mlflow_store):
    from raysemi.loop import Trainer

    uri = mlflow_store(tmp_path / "mlflow.db")
    args = ["--data", tiny_phantom, *TINY, "--max-iterations", "2", "--eval-interval", "1", "--tracking-uri", uri,
            "--method", "supervised", "--seeds", "2", "--output", "r"]
    original = interrupt_seed1(monkeypatch)
    code, out, _ = train(args, tmp_path)
    assert code == 130 and f"--resume {Path('r')}" in out
    assert (tmp_path / "r" / "seed1" / "last.pt").is_file() and not (tmp_path / "r" / "seed1" / "results.json").exists()
    seed0_log = (tmp_path / "r" / "seed0" / "train.log").read_text()
    monkeypatch.setattr(Trainer, "train_until", original)

    code, out, err = train(["--resume", "r", "--tracking-uri", uri], tmp_path)  # config and seeds from the folder
    assert code == 0, err
    assert "seed0 (seed 1337): finished earlier" in out
    assert (tmp_path / "r" / "seed0" / "train.log").read_text() == seed0_log
    assert "2 iterations from 1" in (tmp_path / "r" / "seed1" / "train.log").read_text()
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["seeds"] == [1337, 1338] and results["test"]["dice"] == pytest.approx(
        np.mean([s["test"]["dice"] for s in results["per_seed"]]))
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("raysemi").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "r"]
    kids = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    # one parent and one run per seed: the interrupted seed went on in its own run
    assert parent.info.status == "FINISHED" and len(runs) == 3 and sorted(kids) == ["r-seed0", "r-seed1"]
    for kid in kids.values():
        assert kid.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "val/dice")] == [1, 2]
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "test_best/dice")] == [2]
    assert json.loads((tmp_path / "r" / "seed1" / "mlflow_run.json").read_text())["run_id"] == \
        kids["r-seed1"].info.run_id


def test_resume_in_a_store_without_the_retrains_runs_opens_new_ones_with_a_warning_each(tiny_phantom, tmp_path,
                                                                                        monkeypatch, mlflow_store):
    from raysemi.loop import Trainer

    args = ["--data", tiny_phantom, *TINY, "--max-iterations", "2", "--eval-interval", "1", "--method", "supervised",
            "--seeds", "2", "--output", "r", "--tracking-uri", mlflow_store(tmp_path / "mlflow.db")]
    original = interrupt_seed1(monkeypatch)
    assert train(args, tmp_path)[0] == 130
    state = json.loads((tmp_path / "r" / "retrain.json").read_text())
    old_seed1 = json.loads((tmp_path / "r" / "seed1" / "mlflow_run.json").read_text())["run_id"]
    monkeypatch.setattr(Trainer, "train_until", original)

    other = mlflow_store(tmp_path / "other.db")
    code, _, err = train(["--resume", "r", "--tracking-uri", other], tmp_path)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings  # the parent's and the interrupted seed's; seed0 is kept as it was
    assert state["parent_run_id"] in warnings[0] and old_seed1 in warnings[1]
    assert all("is not in" in w and "other.db" in w and "new run" in w for w in warnings)
    client = MlflowClient(tracking_uri=other)
    runs = client.search_runs([client.get_experiment_by_name("raysemi").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "r"]
    (seed1,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 2 and parent.info.status == "FINISHED" and seed1.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(seed1.info.run_id, "val/dice")] == [1, 2]


def test_resume_uses_the_retrains_store_and_refuses_changed_values(tiny_phantom, tmp_path, monkeypatch):
    from raysemi.loop import Trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--data", tiny_phantom, *TINY, "--max-iterations", "2", "--eval-interval", "1",
            "--method", "supervised", "--seeds", "2", "--output", "r"]  # the default store: ./mlflow.db
    original = interrupt_seed1(monkeypatch)
    assert train(args, tmp_path)[0] == 130
    monkeypatch.setattr(Trainer, "train_until", original)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = str(tmp_path / "r")

    # other values than the finished seed's: refused before anything is trained
    code, _, err = train(["--resume", r, "--max-iterations", "3"], elsewhere)
    _one_line(code, err, "seed0", "max_iterations: 2 there, 3 now")
    # from another folder, without --tracking-uri: the store the retrain was logged to; the speed
    # switches may change (the way out when compiling breaks halfway through a retrain on a GPU);
    # a retrain started on a GPU goes on on this machine's device, as a single run's resume does
    for path in (tmp_path / "r" / "config.yaml", tmp_path / "r" / "seed1" / "config.yaml"):
        path.write_text(path.read_text().replace("device: cpu", "device: cuda"))
        assert "device: cuda" in path.read_text()
    code, out, err = train(["--resume", r, "--compile", "off", "--cuda-graphs", "off"], elsewhere)
    assert code == 0, err
    assert not (elsewhere / "mlflow.db").exists()
    # the configs keep their folders as first written (relative to tmp_path), not the resume's path
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["output"] == "r"
    assert yaml.safe_load((tmp_path / "r" / "seed1" / "config.yaml").read_text())["output"] == str(Path("r", "seed1"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = [x for x in client.search_runs([client.get_experiment_by_name("raysemi").experiment_id])
                 if x.info.run_name == "r"]
    assert parent.info.status == "FINISHED"


def test_overwrite_then_resume_trains_every_seed_of_the_new_retrain(tiny_phantom, tmp_path, monkeypatch):
    """An --overwrite retrain into an older one's folder, interrupted: its --resume must not keep the
    older retrain's finished seeds as its own (nor refuse the seeds the interrupted run had not
    reached), and it keeps its base seed."""
    from raysemi.loop import Trainer

    common = ["--data", tiny_phantom, *TINY, "--eval-interval", "1", "--method", "supervised", "--no-mlflow"]
    assert train([*common, "--max-iterations", "2", "--seeds", "3", "--output", "r"], tmp_path)[0] == 0
    shutil.copytree(tmp_path / "r" / "seed1", tmp_path / "r" / "seed1.bak")  # the user's copy, kept whole
    backup = {p.name: p.read_bytes() for p in (tmp_path / "r" / "seed1.bak").iterdir() if p.is_file()}
    original = interrupt_seed1(monkeypatch)
    code, _, _ = train([*common, "--max-iterations", "3", "--seeds", "3", "--output", "r", "--overwrite"], tmp_path)
    assert code == 130
    assert not (tmp_path / "r" / "seed1" / "results.json").exists()
    assert not (tmp_path / "r" / "seed2" / "results.json").exists() and not (tmp_path / "r" / "seed2" / "last.pt").exists()
    monkeypatch.setattr(Trainer, "train_until", original)

    code, out, err = train(["--resume", "r", "--no-mlflow"], tmp_path)
    assert code == 0, err
    assert "seed0 (seed 1337): finished earlier" in out and "seed1 (seed 1338): finished earlier" not in out
    assert "=== seed1: seed 1338 (2 of 3), resumed from" in out and "=== seed2: seed 1339 (3 of 3) ===" in out
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [s["iterations"] for s in results["per_seed"]] == [3, 3, 3]
    assert {p.name: p.read_bytes() for p in (tmp_path / "r" / "seed1.bak").iterdir() if p.is_file()} == backup

    # another --seed would relabel the seeds (seed k is base + k): refused
    code, _, err = train(["--resume", "r", "--no-mlflow", "--seed", "42"], tmp_path)
    _one_line(code, err, "retrain.json", "seeds start at 1337, not 42", "expected --seed 1337")
    # fewer seeds: reported over those, saying which are left out
    code, out, err = train(["--resume", "r", "--no-mlflow", "--seeds", "2"], tmp_path)
    assert code == 0, err
    assert "was a 3-seed retrain; --seeds 2 reports seed0 .. seed1 and leaves seed2 out" in out
    assert json.loads((tmp_path / "r" / "results.json").read_text())["seeds"] == [1337, 1338]

    # a single run written over the retrain: its --resume is that run's, not the retrain's
    assert train([*common, "--max-iterations", "2", "--output", "r", "--overwrite"], tmp_path)[0] == 0
    assert not (tmp_path / "r" / "retrain.json").exists()
    code, out, err = train(["--resume", "r", "--no-mlflow", "--max-iterations", "3"], tmp_path)
    assert code == 0, err
    assert "=== seed" not in out and json.loads((tmp_path / "r" / "results.json").read_text())["iterations"] == 3


def test_a_run_resumed_into_another_folder(tiny_phantom, tmp_path):
    """--resume of another folder's last.pt: refused into a folder holding a run (without
    --overwrite), and into a new folder it brings its best.pt, which the final report evaluates."""
    common = ["--data", tiny_phantom, *TINY, "--max-iterations", "2", "--eval-interval", "1", "--no-mlflow"]
    assert train([*common, "--output", "a"], tmp_path)[0] == 0
    assert train([*common, "--output", "d", "--seed", "7"], tmp_path)[0] == 0
    d_files = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file()}

    code, _, err = train(["--resume", "a/last.pt", "--output", "d", "--no-mlflow"], tmp_path)
    _one_line(code, err, "d: output folder exists and is not empty", "--resume a/last.pt is another folder's",
              "expected a new or empty --output")
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file()} == d_files

    # the run's folder by another path (here a link) is the run's folder: resumed in place, nothing cleared
    (tmp_path / "alink").symlink_to(tmp_path / "a")
    a_files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.name in ("best.pt", "results.json")}
    code, _, err = train(["--resume", "alink/last.pt", "--output", "a", "--no-mlflow"], tmp_path)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.name in ("best.pt",)} == \
        {"best.pt": a_files["best.pt"]}

    # a lone last.pt, with no best.pt beside it and nothing left to train: refused, nothing made
    (tmp_path / "lone").mkdir()
    shutil.copy2(tmp_path / "a" / "last.pt", tmp_path / "lone" / "last.pt")
    code, _, err = train(["--resume", "lone/last.pt", "--output", "run2", "--no-mlflow"], tmp_path)
    _one_line(code, err, "lone/last.pt: no best.pt beside it and no iteration left to train (2 of --max-iterations 2)")
    assert not (tmp_path / "run2").exists()
    # ... and beside another run's best.pt (d's, seed 7): not that run's model in the report
    shutil.copy2(tmp_path / "d" / "best.pt", tmp_path / "lone" / "best.pt")
    code, _, err = train(["--resume", "lone/last.pt", "--output", "run2", "--no-mlflow"], tmp_path)
    _one_line(code, err, "lone/last.pt: the best.pt beside it is not its run's (written at iteration",
              "its run's best was at iteration", "and no iteration left to train (2 of --max-iterations 2)")
    assert not (tmp_path / "run2").exists()
    code, out, err = train(["--resume", "lone/last.pt", "--output", "run2", "--no-mlflow", "--max-iterations", "3"],
                           tmp_path)
    assert code == 0, err
    assert "the best.pt beside it is not its run's" in out and "the best checkpoint is counted afresh" in out
    assert (tmp_path / "run2" / "best.pt").read_bytes() != (tmp_path / "d" / "best.pt").read_bytes()
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["best_iteration"] == 3
    # a best.pt beside it that is not a checkpoint at all: left out the same way, not a stop
    (tmp_path / "lone" / "best.pt").write_bytes(b"not a checkpoint")
    code, out, err = train(["--resume", "lone/last.pt", "--output", "run3", "--no-mlflow", "--max-iterations", "3"],
                           tmp_path)
    assert code == 0, err
    assert "the best.pt beside it is not its run's (not a raysemi checkpoint that loads)" in out

    a_best = json.loads((tmp_path / "a" / "results.json").read_text())
    for out, extra in (("b", []), ("d", ["--overwrite"])):  # nothing left to train: the report is a's best
        code, _, err = train(["--resume", "a/last.pt", "--output", out, "--no-mlflow", *extra], tmp_path)
        assert code == 0, err
        assert (tmp_path / out / "best.pt").read_bytes() == (tmp_path / "a" / "best.pt").read_bytes()
        results = json.loads((tmp_path / out / "results.json").read_text())
        assert results["best_iteration"] == a_best["best_iteration"] and results["seed"] == 1337
        assert results["test"] == a_best["test"]


def test_the_baseline_budget_is_the_one_it_was_last_resumed_with(tiny_phantom, tmp_path, mlflow_store):
    uri = mlflow_store(tmp_path / "mlflow.db")
    common = ["--data", tiny_phantom, *TINY, "--eval-interval", "1", "--tracking-uri", uri]
    assert train([*common, "--method", "supervised", "--max-iterations", "2", "--output", "s"], tmp_path)[0] == 0
    code, _, err = train(["--resume", "s", "--max-iterations", "3", "--tracking-uri", uri], tmp_path)
    assert code == 0, err
    code, out, err = train([*common, "--method", "mean_teacher", "--max-iterations", "3", "--output", "m"], tmp_path)
    assert code == 0, err
    assert "1 seed(s), 3 iterations), ours - baseline:" in out and "different budget" not in out
    assert json.loads((tmp_path / "m" / "results.json").read_text())["baseline"]["max_iterations"] == "3"


def test_output_that_is_a_file_is_one_line(tiny_phantom, tmp_path):
    (tmp_path / "afile").write_text("mine")
    code, _, err = train(["--data", tiny_phantom, *TINY, "--no-mlflow", "--output", "afile"], tmp_path)
    _one_line(code, err, "afile", "is a file")
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_diverged_seed_is_left_out_and_the_retrain_fails(store, monkeypatch):
    from raysemi.loop import Trainer, TrainingDiverged

    original = Trainer.train_until

    def diverges_in_seed1(self, stop):
        if self.config.seed == 1338:
            raise TrainingDiverged("loss is nan at iteration 1 (test)")
        original(self, stop)

    monkeypatch.setattr(Trainer, "train_until", diverges_in_seed1)
    code, out, _ = train([*store["common"], "--max-iterations", "2", "--eval-interval", "2", "--method", "supervised",
                          "--seeds", "2", "--output", "diverged"], store["tmp"])
    assert code == 1 and "1 of 2 seeds failed" in out
    results = json.loads((store["tmp"] / "diverged" / "results.json").read_text())
    assert results["seeds"] == [1337] and results["failed_seeds"][0]["seed"] == 1338
    assert "loss is nan" in results["failed_seeds"][0]["failure"]
    parent = runs_by_name(store["uri"])["diverged"]
    assert parent.info.status == "FAILED" and "1338" in parent.data.tags["failure_reason"]

    # a resume does not train the diverged seed again (it would diverge the same way), unless its
    # folder is deleted
    monkeypatch.setattr(Trainer, "train_until", original)
    log = (store["tmp"] / "diverged" / "seed1" / "train.log").read_text()
    code, out, _ = train(["--resume", "diverged", "--tracking-uri", store["uri"]], store["tmp"])
    assert code == 1 and "seed1 (seed 1338): failed earlier (training diverged: loss is nan at iteration 1 (test)), " \
                         "kept as failed; to train it again, delete" in out
    assert (store["tmp"] / "diverged" / "seed1" / "train.log").read_text() == log
    shutil.rmtree(store["tmp"] / "diverged" / "seed1")
    code, out, err = train(["--resume", "diverged", "--tracking-uri", store["uri"]], store["tmp"])
    assert code == 0, err
    assert json.loads((store["tmp"] / "diverged" / "results.json").read_text())["seeds"] == [1337, 1338]
    assert runs_by_name(store["uri"])["diverged"].info.status == "FINISHED"


# ---- aggregation by hand --------------------------------------------------------------------------
def _summary(rows: list[tuple[float, float]]) -> Summary:
    """Two classes (a, b); each row is one volume's Dice of a and b (other metrics = Dice x 10)."""
    def m(d):
        return {"dice": d, "jaccard": d, "hd95": 10 * d, "asd": 10 * d, "empty_pred": 0.0, "empty_gt": 0.0}
    return Summary(["a", "b"], [(f"v{i}", [m(a), m(b)]) for i, (a, b) in enumerate(rows)])


@pytest.mark.parametrize("seeds,mean,std_seeds,std_volumes", [
    # one seed: std over seeds is 0, std over volumes of the per-volume class means (0.5, 0.7)
    ([[(0.4, 0.6), (0.6, 0.8)]], {"dice": 0.6, "dice_a": 0.5, "dice_b": 0.7}, {"dice": 0.0, "dice_a": 0.0},
     {"dice": 0.1, "dice_a": 0.1, "dice_b": 0.1}),
    # two seeds: per-seed means 0.6 and 0.4 -> std 0.1; pairs' class means 0.5, 0.7, 0.3, 0.5 -> std sqrt(0.02)
    ([[(0.4, 0.6), (0.6, 0.8)], [(0.2, 0.4), (0.4, 0.6)]], {"dice": 0.5, "dice_a": 0.4, "hd95_b": 6.0},
     {"dice": 0.1, "dice_a": 0.1, "hd95": 1.0}, {"dice": np.sqrt(0.02), "dice_a": np.sqrt(0.02)}),
], ids=["one_seed", "two_seeds"])
def test_aggregate_by_hand(seeds, mean, std_seeds, std_volumes):
    agg = aggregate([_summary(rows) for rows in seeds])
    for key, value in mean.items():
        assert agg["mean"][key] == pytest.approx(value), key
    for key, value in std_seeds.items():
        assert agg["std_seeds"][key] == pytest.approx(value), key
    for key, value in std_volumes.items():
        assert agg["std_volumes"][key] == pytest.approx(value), key


def test_aggregate_of_nothing_raises():
    with pytest.raises(ValueError, match="no seed"):
        aggregate([])


# ---- bad input: exit 2, one line ------------------------------------------------------------------
def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("extra,needles", [
    (["--seeds", "0"], ["--seeds", "0", ">= 1"]),
    (["--seeds", "-2"], ["--seeds", "-2"]),
    (["--from-run", "abc", "--config", "x.yaml"], ["--from-run and --config"]),
    (["--seeds", "2", "--resume", "somewhere/last.pt"], ["--resume", "retrain folder"]),
], ids=["seeds_zero", "seeds_negative", "from_run_and_config", "seeds_with_a_checkpoint_to_resume"])
def test_bad_flags(extra, needles, tiny_phantom, tmp_path):
    code, _, err = train(["--data", tiny_phantom, *TINY, "--no-mlflow", "--output", "run", *extra], tmp_path)
    _one_line(code, err, *needles)
    assert not (tmp_path / "run").exists()


def test_from_run_unknown_run_id(store, tmp_path):
    code, _, err = train(["--from-run", "0123456789abcdef", "--tracking-uri", store["uri"]], tmp_path)
    _one_line(code, err, "--from-run", "'0123456789abcdef'", "no such run")


def test_from_run_of_a_run_without_config(store, tmp_path):
    client = MlflowClient(tracking_uri=store["uri"])
    run_id = client.create_run(client.get_experiment_by_name("raysemi").experiment_id, run_name="empty").info.run_id
    code, _, err = train(["--from-run", run_id, "--tracking-uri", store["uri"]], tmp_path)
    _one_line(code, err, run_id, "has no config")


@pytest.mark.parametrize("uri,needles", [
    ("http://127.0.0.1:9", ["tracking_uri", "does not answer"]),
    ("sqlite:///{tmp}/missing.db", ["missing.db", "does not exist"]),
], ids=["server_not_answering", "no_such_sqlite_store"])
def test_from_run_with_a_store_that_is_not_there(uri, needles, tmp_path):
    code, _, err = train(["--from-run", "abc", "--tracking-uri", uri.format(tmp=tmp_path)], tmp_path)
    _one_line(code, err, *needles)
    assert not (tmp_path / "missing.db").exists()


def test_resume_of_a_folder_that_is_not_a_retrain(tmp_path):
    (tmp_path / "plain").mkdir()
    code, _, err = train(["--resume", "plain", "--no-mlflow"], tmp_path)
    _one_line(code, err, "plain", "not a multi-seed retrain folder")


def test_a_seed_saved_with_a_relative_data_path_resumes_from_its_folder(tmp_path, monkeypatch):
    """Seed folders saved before configs held `data` absolute have it as typed: resumed from the
    folder it was typed in, it is the same data; another dataset is still refused."""
    from raysemi.config import TrainConfig, absolute_data, save_yaml
    from raysemi.errors import UserError
    from raysemi.retrain import check_same_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "seed0").mkdir()
    save_yaml(TrainConfig(data="data/ACDC"), tmp_path / "seed0" / "config.yaml")
    check_same_config(tmp_path / "seed0", absolute_data(TrainConfig(data="data/ACDC")))
    with pytest.raises(UserError, match=r"data: '.*/data/ACDC' there, '.*/data/other' now"):
        check_same_config(tmp_path / "seed0", absolute_data(TrainConfig(data="data/other")))
