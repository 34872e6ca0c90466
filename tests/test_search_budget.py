"""A CPU search says how long it takes before its trials start (raysemi.search_budget)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from raysemi.config import TrainConfig
from raysemi.data import load_dataset
from raysemi.search_budget import (ENOUGH_S, QUICK_START, QUICK_START_SCHEDULES, RELATIVE_COST, enough_timed,
                                   estimate_line, far_past, looks_long, rungs, scaled_steps, seconds_per_step,
                                   time_steps, wall_iterations)
from tests.conftest import tiny_config


def test_rungs_are_tunes_milestones_at_the_reports():
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(time_attr="iteration", max_t=30000, grace_period=7500, reduction_factor=3, metric="m",
                         mode="max")
    tune_milestones = sorted(m for m, _ in asha._brackets[0]._rungs)
    assert rungs(30000, 7500, 3, eval_interval=1) == [*tune_milestones, 30000] == [7500, 22500, 30000]
    # a milestone is judged at the first report at or past it: every 200 iterations, 7,600 and 22,600
    assert rungs(30000, 7500, 3, eval_interval=200) == [7600, 22600, 30000]
    assert rungs(100, 10, 2, eval_interval=50) == [50, 100]  # milestones 10, 20, 40, 80 meet at two reports


def test_wall_time_counts_the_slots_and_the_lone_survivor():
    points = [7500, 22500, 30000]
    # 16 trials on 2 slots: 8 waves to 7,500, 16/3 trials on to 22,500 (2.67 waves), 16/9 to the end (one)
    assert wall_iterations(16, 2, points, 3) == pytest.approx(8 * 7500 + 16 / 3 / 2 * 15000 + 7500)
    # more slots than trials: never shorter than one trial run whole
    assert wall_iterations(16, 16, points, 3) == pytest.approx(30000)
    assert wall_iterations(1, 2, points, 3) == pytest.approx(30000)


def test_only_searches_that_may_be_long_are_timed():
    sizes = dict(num_samples=16, seeds=1, concurrency=2, threads=1)
    assert looks_long(TrainConfig(), ["mean_teacher"], **sizes)  # the defaults: 30,000 iterations at 256x256
    quick = TrainConfig(patch_size=(64, 64), batch_size=8, labeled_bs=4, max_iterations=300)
    assert not looks_long(quick, ["mean_teacher", "supervised"], **{**sizes, "num_samples": 6})  # the quick start
    # a UA-MT search measured at 62 minutes on this machine's 2 cores is timed: its cost and threads count
    uamt = TrainConfig(patch_size=(96, 96), batch_size=24, labeled_bs=12, max_iterations=1350)
    assert looks_long(uamt, ["uncertainty_aware_mean_teacher"], num_samples=2, seeds=1, concurrency=1, threads=2)
    assert not looks_long(uamt.replace(max_iterations=200), ["supervised"], num_samples=2, seeds=1, concurrency=1,
                          threads=2)


def test_a_step_is_timed_on_the_cpu_with_the_trials_threads(tiny_phantom, monkeypatch):
    from raysemi.loop import Trainer

    data = load_dataset(str(tiny_phantom), 2, 4)
    seen = []
    real = Trainer.train_until
    monkeypatch.setattr(Trainer, "train_until", lambda self, stop: seen.append(torch.get_num_threads()) or
                        real(self, stop))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = seconds_per_step(tiny_config(tiny_phantom, max_iterations=100), "mean_teacher", data, threads=2)
        assert torch.get_num_threads() == 1  # put back
    finally:
        torch.set_num_threads(before)
    assert 0 < step < 2 and seen == [2, 2]  # the warm-up step, then three steps, with the trial's threads


def test_steps_are_timed_in_a_ray_task_for_each_strategy(tiny_phantom, capsys):
    import argparse

    import ray

    from raysemi.search import print_cpu_estimate

    data = load_dataset(str(tiny_phantom), 2, 4)
    base = tiny_config(tiny_phantom, max_iterations=100)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        steps, node = time_steps(base, ["supervised", "mean_teacher"], data, 1)
        # a search of weeks: the first strategy's step says so, the second is not timed
        weeks = base.replace(max_iterations=10**9)
        enough = enough_timed(weeks, ["supervised", "mean_teacher"], num_samples=4, seeds=1, concurrency=2,
                              grace=100, reduction_factor=3)
        first_only, _ = time_steps(weeks, ["supervised", "mean_teacher"], data, 1, enough)
        with pytest.raises(TimeoutError, match="not done in 0.001 s"):  # a cluster with no free CPU: no hang
            time_steps(base, ["supervised"], data, 1, limit_s=0.001)
        # a step that cannot run (mean teacher where every patient is labeled): one warning, the search goes on
        args = argparse.Namespace(num_samples=4, seeds=1, cpus_per_trial=1, grace_period=None, reduction_factor=3)
        print_cpu_estimate(args, base.replace(max_iterations=10_000_000, labeled_patients=8),
                           ["mean_teacher"], load_dataset(str(tiny_phantom), 8, 4), 2)
        # two strategies in a search of years: the first is timed, the second scaled from it, and said so
        print_cpu_estimate(args, weeks, ["supervised", "mean_teacher"], data, 2)
    finally:
        ray.shutdown()
    assert list(steps) == ["supervised", "mean_teacher"] and all(0 < s < 2 for s in steps.values())
    assert list(first_only) == ["supervised"] and 0 < first_only["supervised"] < 2
    assert node == ray.util.get_node_ip_address()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "timing one training step on a CPU where trials run, to estimate the search's time ..."
    assert out[1].startswith("warning: no time estimate: a training step could not be timed (UserError: ") and \
        "there are no unlabeled slices" in out[1] and len(out) == 4
    assert out[2] == ("timing one training step of each of the 2 strategies (fewer once those timed put the search "
                      "over 10 hours) on a CPU where trials run, to estimate the search's time ...")
    assert out[3].startswith("warning: a training step at 32x32") and \
        "(1 thread; timed for supervised, the other 1 scaled from it by their usual relative cost" in out[3]


def test_the_estimate_line_gives_the_numbers_and_the_way_out():
    sizes = dict(num_samples=16, seeds=2, concurrency=2, threads=1, grace=7500, reduction_factor=3)
    base = TrainConfig()  # 256x256, batch 24, 30,000 iterations, evaluated every 200
    line = estimate_line(base, {"mean_teacher": 19.0}, **sizes)
    assert line.startswith("warning: one mean_teacher training step at 256x256, batch 24, took 19.00 s on this "
                           "machine's CPU (1 thread); 16 trials x 2 seeds x 30,000 iterations, 2 at once, take "
                           "about 47.6 days if ASHA stops trials as designed (a floor), 105.6 days if it stops none")
    assert f"(the README's quick start: {QUICK_START} {QUICK_START_SCHEDULES})" in line
    assert QUICK_START_SCHEDULES == "--mt-warmup 10 --rampup-interval 2"
    # under --schedules budget the hand-scaled values would be scaled again: left out
    budget_line = estimate_line(base.replace(schedules="budget"), {"mean_teacher": 19.0}, **sizes)
    assert f"(the README's quick start: {QUICK_START})" in budget_line and "--mt-warmup" not in budget_line
    assert "--resume" in line and "\n" not in line
    # several strategies: the range, and their mean for the estimate
    line = estimate_line(base, {"supervised": 20.0, "uncertainty_aware_mean_teacher": 50.0, "mean_teacher": 20.0},
                         **sizes)
    assert ("took 20.00 s (supervised) to 50.00 s (uncertainty_aware_mean_teacher), 30.00 s on average over the 3 "
            "strategies, on this machine's CPU") in line
    short = TrainConfig(max_iterations=20, eval_interval=10)
    line = estimate_line(short, {"supervised": 2.0}, **{**sizes, "num_samples": 1, "seeds": 1, "grace": 10},
                         where="node 10.0.0.7")
    assert line == ("estimate: one supervised training step at 256x256, batch 24, took 2.00 s on node 10.0.0.7's CPU "
                    "(1 thread); 1 trial x 1 seed x 20 iterations, 2 at once, take about 1 minute if ASHA "
                    "stops trials as designed (a floor), 1 minute if it stops none (validations not counted)")


def test_every_registered_strategy_has_a_relative_cost():
    from raysemi.methods import list_methods

    assert set(RELATIVE_COST) == set(list_methods()) and RELATIVE_COST["supervised"] == 1.0


def test_strategies_are_timed_until_the_search_is_far_past_an_hour():
    methods = ["supervised", "mean_teacher", "uncertainty_aware_mean_teacher"]
    # the untimed are scaled from the timed by their usual cost relative to each other
    assert scaled_steps({"supervised": 10.0}, methods) == pytest.approx(
        {"supervised": 10.0, "mean_teacher": 10.0 * RELATIVE_COST["mean_teacher"],
         "uncertainty_aware_mean_teacher": 10.0 * RELATIVE_COST["uncertainty_aware_mean_teacher"]})
    assert scaled_steps({"supervised": 10.0, "mean_teacher": 10.0}, methods)["mean_teacher"] == 10.0  # timed: kept
    sizes = dict(num_samples=16, seeds=1, concurrency=2, grace=7500, reduction_factor=3)
    base = TrainConfig()  # 30,000 iterations: 10 s steps put it at days, 0.01 s ones under an hour
    assert far_past({"supervised": 10.0}, base=base, methods=methods, **sizes)
    assert not far_past({"supervised": 0.01}, base=base, methods=methods, **sizes)
    assert enough_timed(base, methods, **sizes)({"supervised": 10.0})
    # ENOUGH_S is the line between: a step that puts the floor just past it, and one just under
    relative_mean = (1 + RELATIVE_COST["mean_teacher"] + RELATIVE_COST["uncertainty_aware_mean_teacher"]) / 3
    floor_per_step = wall_iterations(16, 2, rungs(30000, 7500, 3, 200), 3) * relative_mean
    assert far_past({"supervised": ENOUGH_S / floor_per_step * 1.01}, base=base, methods=methods, **sizes)
    assert not far_past({"supervised": ENOUGH_S / floor_per_step * 0.99}, base=base, methods=methods, **sizes)
    # the line says which were timed and that the rest were scaled, with the scaled range and mean
    line = estimate_line(base, {"supervised": 10.0}, methods=methods, threads=2, **sizes)
    mean = 10.0 * relative_mean
    assert line.startswith(f"warning: a training step at 256x256, batch 24, takes 10.00 s (supervised) to 28.50 s "
                           f"(uncertainty_aware_mean_teacher), {mean:.2f} s on average over the 3 strategies, on this "
                           "machine's CPU (2 threads; timed for supervised, the other 2 scaled from it by their usual "
                           "relative cost, as the estimate was already over 10 hours); 16 trials x 1 seed"), line
    # all timed: no such words, the same figures as before
    line = estimate_line(base, {m: 10.0 for m in methods}, methods=methods, threads=2, **sizes)
    assert "took 10.00 s" in line and "scaled" not in line and "uncompiled" not in line
    # compile: on CPU trials: the step is timed uncompiled, which the line says
    line = estimate_line(base.replace(compile="on"), {"supervised": 10.0}, threads=2, **sizes)
    assert "(2 threads; timed uncompiled: compile: on trials first spend a compile warm-up" in line


def test_ctrl_c_while_timing_leaves_no_search_behind(tiny_phantom, tmp_path, mlflow_store):
    # a step at 128x128, batch 24 takes a few seconds here: the interrupt lands while it is timed
    uri = mlflow_store(tmp_path / "mlflow.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysemi.search", "--method", "supervised", "--data", str(tiny_phantom),
         "--labeled-patients", "3", "--patch-size", "128", "128", "--batch-size", "24", "--max-iterations", "100000",
         "--num-samples", "4", "--gpus", "0", "--num-cpus", "2", "--cpus-per-trial", "2", "--name", "long",
         "--storage", str(tmp_path / "runs"), "--tracking-uri", uri],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("timing one training step"):
                time.sleep(1)  # into the Ray task's step
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(x.startswith("timing one training step on a CPU where trials run") for x in lines), "".join(lines)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert "estimate" not in out and "warning: one supervised" not in out  # stopped while timing
    assert not (tmp_path / "runs" / "long").exists()  # no search folder, so no search to resume by mistake
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("raysemi-search")
    assert exp is None or not MlflowClient(tracking_uri=uri).search_runs([exp.experiment_id])
