"""The train and evaluate CLIs end to end, into a real SQLite MLflow store in a temp folder."""

import json
import re
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raysemi.errors import run_cli
from raysemi.train import main as train_main

TINY = ["--labeled-patients", "2", "--patch-size", "32", "32", "--batch-size", "4", "--labeled-bs", "2",
        "--max-iterations", "6", "--eval-interval", "3", "--log-interval", "2", "--device", "cpu"]


def test_train_cli_logs_to_the_default_sqlite_store(tiny_phantom, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "base.yaml").write_text("method: mean_teacher\nema_decay: 0.95\nbase_lr: 0.02\n")
    code = run_cli(train_main, ["--config", "base.yaml", "--data", str(tiny_phantom), *TINY,
                                "--base-lr", "0.03", "--output", "runs/mt", "--mt-warmup", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "val split, best checkpoint" in out and "test split" in out and "hd95" in out
    # 6 iterations of a ramp set for 30,000: said before training, with the values for this budget
    assert out.splitlines()[0].startswith("note: in 6 iterations the consistency weight reaches at most 1% of "
                                          "--consistency by the last iteration (mean_teacher; ")
    assert ": --rampup-interval 1 --consistency-rampup 6; or --schedules budget" in out.splitlines()[0]
    run_dir = tmp_path / "runs" / "mt"
    for name in ("config.yaml", "best.pt", "last.pt", "train.log", "results.json"):
        assert (run_dir / name).is_file(), name
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["ema_decay"] == 0.95 and resolved["base_lr"] == 0.03 and resolved["method"] == "mean_teacher"
    results = json.loads((run_dir / "results.json").read_text())
    assert 0.0 <= results["test"]["dice"] <= 1.0

    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("raysemi")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "mean_teacher" and run.data.params["ema_decay"] == "0.95"
    assert run.data.params["base_lr"] == "0.03" and run.data.params["patch_size"] == "32 32"
    assert "fault_nan_at" not in run.data.params and "fault_nan_at" not in resolved  # the tests' switch, off
    assert run.data.tags["strategy"] == "mean_teacher"
    assert run.data.tags["cuda_graphs"] == "off"  # CPU: the op-by-op step (a GPU run says on, or failed: why)
    assert run.data.tags["compiled"] == "off"  # compile: auto compiles long CUDA runs only
    # the ramp unit and warm-up it trained with, in iterations (here as given: --schedules reference)
    assert (run.data.params["effective/rampup_interval"], run.data.params["effective/mt_warmup"]) == ("150", "0")
    dice = client.get_metric_history(run.info.run_id, "val/dice")
    assert [m.step for m in dice] == [3, 6]
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == [2, 4, 6]
    for name in ("train/consistency", "train/consistency_weight", "lr", "val/hd95", "val/dice_lv", "test_best/dice"):
        assert client.get_metric_history(run.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "best.pt", "results.json", "train.log"} <= artifacts


def test_resume_continues_from_last_checkpoint(tiny_phantom, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--data", str(tiny_phantom), *TINY, "--no-mlflow", "--method", "supervised"]
    assert run_cli(train_main, [*args, "--output", "a", "--max-iterations", "3"]) == 0
    assert run_cli(train_main, [*args, "--output", "a", "--resume", "a/last.pt"]) == 0
    log = (tmp_path / "a" / "train.log").read_text()
    assert "6 iterations from 3" in log


def test_resume_alone_takes_the_checkpoints_config_and_folder(tiny_phantom, tmp_path, monkeypatch, capsys):
    """`--resume run/last.pt` and nothing else: the strategy, its settings and the folder are the
    run's own (not the defaults' supervised), and flags still override them."""
    monkeypatch.chdir(tmp_path)
    first = ["--data", str(tiny_phantom), *TINY, "--no-mlflow", "--method", "mean_teacher", "--ema-decay", "0.95",
             "--output", "a", "--max-iterations", "3"]
    assert run_cli(train_main, first) == 0
    assert run_cli(train_main, ["--resume", "a/last.pt", "--no-mlflow", "--max-iterations", "6"]) == 0
    resumed = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert resumed["method"] == "mean_teacher" and resumed["ema_decay"] == 0.95 and resumed["max_iterations"] == 6
    assert "6 iterations from 3" in (tmp_path / "a" / "train.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no new run folder
    # a budget below what the checkpoint has trained is refused, and the run's config stays as it was
    before = (tmp_path / "a" / "config.yaml").read_text()
    capsys.readouterr()
    assert run_cli(train_main, ["--resume", "a/last.pt", "--no-mlflow", "--max-iterations", "4"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --max-iterations: 4 is below the 6 iterations a/last.pt has "
                                               "trained; expected at least 6")
    assert (tmp_path / "a" / "config.yaml").read_text() == before
    # the run's folder stands for its last.pt
    assert run_cli(train_main, ["--resume", "a", "--no-mlflow", "--max-iterations", "8"]) == 0
    assert "8 iterations from 6" in (tmp_path / "a" / "train.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_budget_schedules_train_without_the_short_budget_note_and_are_saved(tiny_phantom, tmp_path, monkeypatch,
                                                                             capsys):
    """`--schedules budget`: the reference's ramp and warm-up scaled to the 6 iterations (nothing to
    say before training), the consistency weight at its full value by the end, the mode in the
    run's config.yaml, so a retrain at another --max-iterations scales them again, and the scaled
    values on the console and in MLflow (a resume to a longer budget rescales them: a tag says so)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert run_cli(train_main, ["--data", str(tiny_phantom), *TINY, "--method", "mean_teacher",
                                "--schedules", "budget", "--output", "a"]) == 0
    out = capsys.readouterr().out
    assert "note: in 6 iterations" not in out and "Short budgets" not in out
    assert ("6 iterations from 0; schedules scaled to the budget: ramp units of 0.03 iterations, warm-up 1 "
            "iteration\n") in out
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["schedules"] == "budget"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raysemi").experiment_id])
    assert (run.data.params["effective/rampup_interval"], run.data.params["effective/mt_warmup"]) == ("0.03", "1")
    assert run_cli(train_main, ["--resume", "a/last.pt", "--max-iterations", "12"]) == 0
    (run,) = client.search_runs([client.get_experiment_by_name("raysemi").experiment_id])
    assert run.data.tags["resumed/effective/rampup_interval"] == "0.06"
    assert "resumed/effective/mt_warmup" not in run.data.tags  # still 1 at 12 iterations: unchanged, no tag
    # the weight logged at iteration 2 of 6 is the scaled ramp's (0.0031), not the reference's
    # 0.1 * exp(-5) = 0.00067 that 150-iteration units would give
    weights = re.findall(r"consistency_weight ([0-9.]+)", (tmp_path / "a" / "train.log").read_text())
    assert weights and float(weights[0]) > 0.002
    # the quick start's hand-scaled values under budget would be scaled again: said before training
    capsys.readouterr()
    assert run_cli(train_main, ["--data", str(tiny_phantom), *TINY, "--method", "mean_teacher", "--no-mlflow",
                                "--schedules", "budget", "--rampup-interval", "2", "--mt-warmup", "10",
                                "--output", "b"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("note: --schedules budget counts --rampup-interval 2 --mt-warmup 10 as set for 30,000 "
                            "iterations and scales them: in 6 iterations the consistency weight is at its full "
                            "value by iteration 1 and the warm-up is 1 iteration.")
    assert run_cli(train_main, ["--data", str(tiny_phantom), *TINY, "--no-mlflow", "--schedules", "bugdet"]) == 2
    assert "schedules: 'bugdet' is invalid; expected 'reference' or 'budget'" in capsys.readouterr().err


def test_a_runs_saved_config_reads_its_data_from_any_folder(tiny_phantom, tmp_path, monkeypatch):
    """`--data` typed relative to the folder a run started in is saved absolute, so the run's
    config.yaml and its checkpoint go on from another folder (they said 'data folder not found'
    there when the relative path was saved)."""
    from pathlib import Path

    monkeypatch.chdir(tiny_phantom.parent)
    run = tmp_path / "a"
    assert run_cli(train_main, ["--data", tiny_phantom.name, *TINY, "--no-mlflow", "--method", "supervised",
                                "--output", str(run), "--max-iterations", "3"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert Path(saved).is_absolute() and Path(saved).resolve() == tiny_phantom.resolve()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run_cli(train_main, ["--resume", str(run / "last.pt"), "--no-mlflow", "--max-iterations", "6"]) == 0
    assert "6 iterations from 3" in (run / "train.log").read_text()
    assert run_cli(train_main, ["--config", str(run / "config.yaml"), "--no-mlflow", "--output", "b",
                                "--max-iterations", "2", "--eval-interval", "2"]) == 0
    assert (tmp_path / "elsewhere" / "b" / "best.pt").is_file()


def test_resume_with_another_strategy_names_the_checkpoints(tiny_phantom, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--data", str(tiny_phantom), *TINY, "--no-mlflow", "--output", "a"]
    assert run_cli(train_main, [*args, "--method", "mean_teacher", "--max-iterations", "3"]) == 0
    capsys.readouterr()
    assert run_cli(train_main, [*args, "--method", "supervised", "--resume", "a/last.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: a/last.pt: networks.teacher: not a network of supervised; the checkpoint was trained "
                   "with mean_teacher: expected its config (leave out --config and --method to take the "
                   "checkpoint's)")


def _interrupt_at(monkeypatch, iteration: int):
    """Ctrl-C once training reaches `iteration`; returns the real `Trainer.train_until`, to put back
    before the resume."""
    from raysemi.loop import Trainer

    original = Trainer.train_until

    def interrupted(self, stop):
        original(self, iteration)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_until", interrupted)
    return original


def _runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name("raysemi").experiment_id])


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def test_a_resumed_run_goes_on_in_its_own_mlflow_run(tiny_phantom, tmp_path, monkeypatch, mlflow_store):
    from raysemi.loop import Trainer

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = mlflow_store(tmp_path / "m.db")
    args = ["--method", "supervised", "--data", str(tiny_phantom), *TINY, "--output", "a"]
    # validated (last.pt) at 3, losses logged at 2 and 4: the resume from 3 goes over 4 again
    original = _interrupt_at(monkeypatch, 4)
    assert run_cli(train_main, [*args, "--tracking-uri", uri]) == 130
    (run,) = _runs(uri)
    assert run.info.status == "KILLED" and _steps(uri, run.info.run_id, "train/loss") == [2, 4]
    record = json.loads((tmp_path / "a" / "mlflow_run.json").read_text())
    assert record == {"run_id": run.info.run_id, "tracking_uri": uri, "experiment": "raysemi"}
    monkeypatch.setattr(Trainer, "train_until", original)

    assert run_cli(train_main, [*args, "--tracking-uri", uri, "--resume", "a/last.pt"]) == 0
    (resumed,) = _runs(uri)  # the same run, its curves continuous, no step twice
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert _steps(uri, run.info.run_id, "val/dice") == [3, 6]
    assert _steps(uri, run.info.run_id, "train/loss") == [2, 4, 6]
    assert _steps(uri, run.info.run_id, "test_best/dice") == [6]

    # a finished run resumed: re-evaluated into the same run, nothing logged twice; without
    # --tracking-uri, in the store the run was logged to (mlflow_run.json), not ./mlflow.db
    assert run_cli(train_main, [*args, "--resume", "a/last.pt"]) == 0
    assert not (tmp_path / "mlflow.db").exists()
    (again,) = _runs(uri)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    for key in ("val/dice", "best/val_dice", "test_best/dice", "test/dice", "val_best/hd95"):
        assert _steps(uri, run.info.run_id, key) == ([3, 6] if key == "val/dice" else [6]), key

    # trained further with a changed flag: the param keeps its first value, the new one is a tag
    assert run_cli(train_main, [*args, "--resume", "a/last.pt", "--max-iterations", "9"]) == 0
    (longer,) = _runs(uri)
    assert longer.info.run_id == run.info.run_id and longer.info.status == "FINISHED"
    assert _steps(uri, run.info.run_id, "val/dice") == [3, 6, 9]
    assert longer.data.params["max_iterations"] == "6" and longer.data.params["tracking_uri"] == uri
    # (tracking_uri, not given on resume, is "" in the config now: where a run is logged is no setting
    # of what it trains, so it gets no tag)
    assert {k: v for k, v in longer.data.tags.items() if k.startswith("resumed/")} == {
        "resumed/max_iterations": "9"}
    assert not any(k.startswith("history/") for k in longer.data.tags)  # no speed path changed

    # resumed on another speed path (as `compile: auto` does past 10,000 iterations on CUDA): the
    # tag says the latest session's, `history/<tag>` from which iteration each held
    assert run_cli(train_main, [*args, "--resume", "a/last.pt", "--max-iterations", "12", "--amp", "bf16"]) == 0
    (mixed,) = _runs(uri)
    assert mixed.data.tags["amp"] == "bf16" and mixed.data.tags["history/amp"] == "off from 0; bf16 from 9"
    assert [k for k in mixed.data.tags if k.startswith("history/")] == ["history/amp"]


def test_a_resume_from_another_folder_keeps_the_runs_folder_and_store_in_its_config(tiny_phantom, tmp_path,
                                                                                     monkeypatch, mlflow_store):
    """A resume is the same run: its config.yaml keeps `output` and `tracking_uri` as the run
    first wrote them (not relative to the resume's folder, not blank), so a later `--config` of
    the file means what it meant; what the resume changed (the budget) is saved."""
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    monkeypatch.chdir(tmp_path / "A")
    uri = mlflow_store(tmp_path / "m.db")
    first = ["--method", "supervised", "--data", str(tiny_phantom), *TINY, "--output", "runs/b1", "--tracking-uri",
             uri, "--run-name", "b1", "--max-iterations", "3"]
    assert run_cli(train_main, first) == 0
    saved = yaml.safe_load((tmp_path / "A" / "runs" / "b1" / "config.yaml").read_text())
    monkeypatch.chdir(tmp_path / "B")
    assert run_cli(train_main, ["--resume", "../A/runs/b1/last.pt", "--max-iterations", "6"]) == 0
    resumed = yaml.safe_load((tmp_path / "A" / "runs" / "b1" / "config.yaml").read_text())
    assert (resumed["output"], resumed["tracking_uri"], resumed["run_name"]) == ("runs/b1", uri, "b1")
    # (device and compile are the machine's choices, made again by a resume: `auto` here)
    assert resumed == {**saved, "max_iterations": 6, "device": "auto", "compile": "auto"}
    (run,) = _runs(uri)  # the same run went on, in the store it was logged to
    assert _steps(uri, run.info.run_id, "val/dice") == [3, 6]
    assert sorted(p.name for p in (tmp_path / "B").iterdir()) == []


@pytest.mark.parametrize("gone", ["other_store", "deleted"])
def test_resume_without_its_mlflow_run_opens_a_new_one_with_a_warning(gone, tiny_phantom, tmp_path, monkeypatch,
                                                                        capsys, mlflow_store):
    from raysemi.loop import Trainer

    monkeypatch.chdir(tmp_path)
    uri = mlflow_store(tmp_path / "m.db")
    args = ["--method", "supervised", "--data", str(tiny_phantom), *TINY, "--output", "a"]
    original = _interrupt_at(monkeypatch, 4)
    assert run_cli(train_main, [*args, "--tracking-uri", uri]) == 130
    (old,) = _runs(uri)
    monkeypatch.setattr(Trainer, "train_until", original)
    if gone == "deleted":
        MlflowClient(tracking_uri=uri).delete_run(old.info.run_id)
    else:  # a fresh store
        uri = mlflow_store(tmp_path / "fresh.db")
    capsys.readouterr()

    assert run_cli(train_main, [*args, "--tracking-uri", uri, "--resume", "a/last.pt"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert old.info.run_id in warnings[0] and "new run" in warnings[0]
    assert ("was deleted" if gone == "deleted" else "is not in") in warnings[0]
    (new,) = _runs(uri)
    assert new.info.run_id != old.info.run_id and new.info.status == "FINISHED"
    # the checkpoint's history comes first, so the new run holds the whole curve
    assert _steps(uri, new.info.run_id, "val/dice") == [3, 6]
    assert _steps(uri, new.info.run_id, "train/loss") == [2, 4, 6]
    assert json.loads((tmp_path / "a" / "mlflow_run.json").read_text())["run_id"] == new.info.run_id


def test_output_folder_with_a_run_is_not_overwritten(tiny_phantom, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code = run_cli(train_main, ["--data", str(tiny_phantom), *TINY, "--no-mlflow", "--output", "taken"])
    assert code == 2 and "taken: output folder exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_module_entry_points_and_evaluate_round_trip(tiny_phantom, tmp_path, mlflow_store):
    """As a user runs them: python -m raysemi.train, then python -m raysemi.evaluate on its checkpoint."""
    env_uri = mlflow_store(tmp_path / "m.db")
    train = subprocess.run([sys.executable, "-m", "raysemi.train", "--method", "supervised", "--data", str(tiny_phantom),
                            *TINY, "--output", str(tmp_path / "run"), "--tracking-uri", env_uri],
                           capture_output=True, text=True, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    csv_path = tmp_path / "per_volume.csv"
    ev = subprocess.run([sys.executable, "-m", "raysemi.evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"),
                         "--split", "test", "--device", "cpu", "--out", str(csv_path)],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert "dice" in ev.stdout and "lv" in ev.stdout
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("case,class,dice,hd95,asd,jaccard")
    assert len(rows) == 1 + 6 * 3  # 3 test patients x 2 volumes x 3 classes
    # the evaluate CLI reproduces the training run's own test numbers for the same checkpoint
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    mean_line = [line for line in ev.stdout.splitlines() if line.startswith("mean")][0]
    assert float(mean_line.split()[1]) == pytest.approx(results["test"]["dice"], abs=1e-4)
    help_text = subprocess.run([sys.executable, "-m", "raysemi.train", "--help"], capture_output=True, text=True)
    assert "--ema-decay" in help_text.stdout and "--list-methods" in help_text.stdout


def test_list_methods_shows_all_seven_with_hyperparameters(capsys):
    assert run_cli(train_main, ["--list-methods"]) == 0
    out = capsys.readouterr().out
    for name in ("supervised", "mean_teacher", "uncertainty_aware_mean_teacher", "interpolation_consistency",
                 "entropy_minimization", "pyramid_consistency", "adversarial"):
        assert name in out
    assert "ict_alpha=0.2" in out and "dan_lr=0.0001" in out and "uncertainty_passes=8" in out


def test_teacher_evaluation_for_a_strategy_without_teacher_is_refused_at_start(tiny_phantom, tmp_path, capsys):
    code = run_cli(train_main, ["--data", str(tiny_phantom), *TINY, "--no-mlflow", "--method", "supervised",
                                "--eval-model", "teacher", "--output", str(tmp_path / "run")])
    assert code == 2 and "eval_model: 'teacher' but supervised has no EMA teacher" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_all_patients_labeled_is_a_clear_error_for_a_semi_supervised_strategy(tiny_phantom, tmp_path, capsys):
    code = run_cli(train_main, ["--data", str(tiny_phantom), *TINY, "--no-mlflow", "--method", "mean_teacher",
                                "--labeled-patients", "8", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "labeled_patients labels every patient" in err and "--method supervised" in err


@pytest.mark.parametrize("module", ["raysemi.retrain", "raysemi.visualize"])
def test_library_modules_that_sound_like_commands_say_which_command_to_use(module):
    # `python -m raysemi.retrain --help` printed nothing and exited 0, as if it had worked
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"{module} is a library module, not a command")
