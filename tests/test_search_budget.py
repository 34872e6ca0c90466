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
from raysemi.search_budget import asha_iterations, cpu_estimate, looks_long, seconds_per_step
from tests.conftest import tiny_config


def test_asha_iterations_follow_the_rungs():
    # 16 trials, rungs at 7,500 and 22,500 of 30,000, factor 3: all to 7,500, 16/3 on to 22,500, 16/9 to the end
    assert asha_iterations(16, 30000, 7500, 3) == pytest.approx(16 * 7500 + 16 / 3 * 15000 + 16 / 9 * 7500)
    # a grace period of the whole trial stops nothing; one trial is never cut below itself
    assert asha_iterations(5, 1000, 1000, 3) == 5 * 1000
    assert asha_iterations(1, 1000, 100, 3) == 1000


def test_only_searches_that_may_be_long_are_timed():
    sizes = dict(num_samples=16, seeds=1, concurrency=2, threads=1)
    assert looks_long(TrainConfig(), **sizes)  # the defaults: 30,000 iterations at 256x256
    quick = TrainConfig(patch_size=(64, 64), batch_size=8, labeled_bs=4, max_iterations=300)
    assert not looks_long(quick, **{**sizes, "num_samples": 6})  # the README's quick start


def test_a_step_is_timed_on_the_cpu_with_the_trials_threads(tiny_phantom):
    data = load_dataset(str(tiny_phantom), 2, 4)
    before = torch.get_num_threads()
    step = seconds_per_step(tiny_config(tiny_phantom, max_iterations=100), "mean_teacher", data, threads=1)
    assert 0 < step < 2 and torch.get_num_threads() == before


def test_the_estimate_warns_with_the_numbers_and_the_way_out(tiny_phantom):
    data = load_dataset(str(tiny_phantom), 2, 4)
    sizes = dict(num_samples=8, seeds=2, concurrency=2, threads=1, reduction_factor=3)
    long = tiny_config(tiny_phantom, max_iterations=10_000_000)
    line = cpu_estimate(long, ["supervised", "mean_teacher"], data, grace=2_500_000, **sizes)
    assert line.startswith("warning: one mean_teacher training step at 32x32, batch 4, took ")
    assert "8 trials x 2 seeds x 10,000,000 iterations, 2 at once, take about " in line and " days if it stops none" in line
    assert "--patch-size 64 64" in line and "--resume" in line and "\n" not in line
    short = tiny_config(tiny_phantom, max_iterations=20)
    line = cpu_estimate(short, ["supervised"], data, grace=10, **sizes)
    assert line.startswith("estimate: one supervised training step") and " minutes if ASHA stops trials" in line


def test_ctrl_c_while_timing_leaves_no_search_behind(tiny_phantom, tmp_path):
    # a step at 128x128, batch 24 takes a few seconds here: the interrupt lands while it is timed
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(x.startswith("timing one training step on this machine's CPU") for x in lines), "".join(lines)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "runs" / "long").exists()  # no search folder, so no search to resume by mistake
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("raysemi-search")
    assert exp is None or not MlflowClient(tracking_uri=uri).search_runs([exp.experiment_id])
