"""The fast paths compute what the plain paths compute: batched validation equals slice-by-slice,
and a bf16 + channels_last step gives the fp32 losses within bf16 tolerance."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from raysemi.data import Batch, load_volumes
from raysemi.inference import evaluate_volumes, predict_volume
from raysemi.methods import create_method, get_method, list_methods
from raysemi.models import create_model

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_benchmark(script: Path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python <script> ARGS` as a user runs it (a fresh process); its exit code and output."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_batched_validation_equals_slice_by_slice(tiny_phantom):
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=4).eval()
    with torch.no_grad():  # an untrained net predicts one class; perturb it so every class appears
        model.head.bias.copy_(torch.tensor([0.0, 0.1, 0.05, 0.02]))
    volumes = load_volumes(tiny_phantom, "test", 4)[:2]
    for vol in volumes:
        batched = predict_volume(model, vol.image, (32, 32), torch.device("cpu"), batch_size=64)
        single = predict_volume(model, vol.image, (32, 32), torch.device("cpu"), batch_size=1)
        assert np.array_equal(batched, single) and batched.shape == vol.image.shape
    a = evaluate_volumes(model, volumes, 4, (32, 32), torch.device("cpu"), batch_size=64).table()
    b = evaluate_volumes(model, volumes, 4, (32, 32), torch.device("cpu"), batch_size=1).table()
    assert np.array_equal(a, b)


def test_a_failing_metric_stops_the_validation_pass_early(tiny_phantom, monkeypatch):
    import time

    from raysemi import inference

    model = create_model("unet", in_channels=1, num_classes=4).eval()
    volumes = load_volumes(tiny_phantom, "test", 4)
    segmented = []
    real = inference.predict_volume
    # each volume takes 50 ms more to segment, so the metric thread has long failed before the last
    monkeypatch.setattr(inference, "predict_volume",
                        lambda *a, **k: segmented.append(1) or time.sleep(0.05) or real(*a, **k))

    def broken(*a, **k):
        raise RuntimeError("metric failed")

    monkeypatch.setattr(inference, "case_metrics", broken)
    with pytest.raises(RuntimeError, match="metric failed"):
        evaluate_volumes(model, volumes, 4, (32, 32), torch.device("cpu"), workers=2)
    assert len(segmented) < len(volumes)  # it did not segment every volume before saying so


def test_validation_metrics_on_threads_equal_the_serial_pass(tiny_phantom, monkeypatch):
    """The host's surface distances run on worker threads while the next volumes are segmented;
    the result is the serial pass's, in the volumes' order."""
    import threading

    from raysemi import inference

    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=4).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.1, 0.05, 0.02]))
    volumes = load_volumes(tiny_phantom, "test", 4)
    threads = []
    real = inference.case_metrics
    monkeypatch.setattr(inference, "case_metrics",
                        lambda *a, **k: threads.append(threading.current_thread().name) or real(*a, **k))
    serial = evaluate_volumes(model, volumes, 4, (32, 32), torch.device("cpu"), workers=1)
    assert threads == [threading.current_thread().name] * len(volumes)
    threads.clear()
    pooled = evaluate_volumes(model, volumes, 4, (32, 32), torch.device("cpu"), workers=3)
    assert len(threads) == len(volumes) and all(t.startswith("raysemi-metrics") for t in threads)
    assert [name for name, _ in pooled.per_case] == [v.name for v in volumes] == [name for name, _ in serial.per_case]
    assert np.array_equal(pooled.table(), serial.table())
    assert not np.isnan(pooled.table()).any() and pooled.means()["hd95"] > 0  # the distances were computed


def test_the_validation_bar_counts_a_volume_when_its_metrics_are_done(tiny_phantom, monkeypatch):
    """Not when it is segmented: the last volumes' metrics can take seconds after the network is done."""
    import io
    import threading

    from raysemi import inference
    from raysemi.progress import ProgressBar

    model = create_model("unet", in_channels=1, num_classes=4).eval()
    volumes = load_volumes(tiny_phantom, "test", 4)
    n = len(volumes)
    seen: list = []
    shown_all = threading.Event()
    real = inference.case_metrics

    class Recording(ProgressBar):
        def update(self, done: int, info: str | None = None) -> None:
            seen.append((done, info))
            if info == f"{n} segmented":
                shown_all.set()
            super().update(done, info)

    def slow(*a, **k):  # every metric waits until the bar has shown all volumes segmented
        assert shown_all.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(inference, "case_metrics", slow)
    bar = Recording(n, "val", unit="vol", stream=io.StringIO(), tty=False)
    evaluate_volumes(model, volumes, 4, (32, 32), torch.device("cpu"), workers=2, bar=bar)
    segmenting = seen[:n]
    assert [info for _, info in segmenting] == [f"{k} segmented" for k in range(1, n + 1)]
    assert all(done == 0 for done, _ in segmenting)  # segmented, but no metric done yet: nothing counted
    assert [done for done, _ in seen[n:]] == sorted(done for done, _ in seen[n:]) and seen[-1][0] == n
    # one worker: each volume is counted once its metrics are done, in order
    monkeypatch.setattr(inference, "case_metrics", real)
    seen.clear()
    evaluate_volumes(model, volumes, 4, (32, 32), torch.device("cpu"), workers=1, bar=bar)
    assert [done for done, _ in seen] == list(range(1, n + 1))


@pytest.mark.parametrize("name", list_methods())
def test_bf16_channels_last_step_matches_fp32(name):
    cls = get_method(name)
    torch.manual_seed(0)
    image = torch.rand(4, 1, 32, 32)
    batch = Batch(image, torch.randint(0, 4, (2, 32, 32)))

    def losses(bf16: bool) -> dict:
        torch.manual_seed(1)
        student = create_model(cls.models[0], in_channels=1, num_classes=4)
        strategy = create_method(name, student, num_classes=4, batch_size=4, labeled_bs=2, mt_warmup=0,
                                 consistency_rampup=0.0, max_iterations=100).eval()
        b = batch
        if bf16:
            strategy.to(memory_format=torch.channels_last)
            b = Batch(batch.image.contiguous(memory_format=torch.channels_last), batch.label)
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = strategy.step(b, 50)
        return {k: float(v.detach()) for k, v in out.items()}

    fp32, bf16 = losses(False), losses(True)
    assert set(fp32) == set(bf16)
    for k in ("loss", "loss_sup"):
        assert bf16[k] == pytest.approx(fp32[k], rel=0.03, abs=0.01), k


def test_throughput_benchmark_cpu_smoke(tiny_phantom, tmp_path):
    script = BENCHMARKS / "throughput.py"
    out = tmp_path / "t.json"
    proc = run_benchmark(script, "--methods", "supervised,mt", "--data", str(tiny_phantom),
                         "--labeled-patients", "2", "--size", "32", "--batch-size", "16", "--device", "cpu",
                         "--warmup", "2", "--iterations", "3", "--repeats", "2", "--compare-reference-pipeline",
                         "--reference-iterations", "8", "--reference-workers", "1", "--profile", "2", "--compare-eager",
                         "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["supervised", "mean_teacher"]
    assert all(r["it_per_s_median"] > 0 and r["val_pass_s"] > 0 for r in rows)
    # --compare-eager timed the cuda_graphs-off path too (on CPU both are eager, so no gain claimed)
    for r in rows:
        assert r["cuda_graphs"] is False and r["eager_it_per_s_median"] > 0
        assert r["graph_gain"] == pytest.approx(r["it_per_s_median"] / r["eager_it_per_s_median"])
        assert r["val_pass_serial_metrics_s"] > 0  # the validation pass without metric threads, for comparison
        assert "compiled_it_per_s_median" not in r  # no --compare-compile, no compiled columns
    assert "it/s" in proc.stdout and "mean_teacher" in proc.stdout
    # the reference feed ran (several of its short epochs) and the ratios come from the same run
    for r in rows:
        assert r["ref_it_per_s"] > 0 and r["ref_epochs"] >= 2 and 0 <= r["ref_val_dice"] <= 1
        assert r["speedup"] == pytest.approx(r["it_per_s_median"] / r["ref_it_per_s"])
    profile = out.with_suffix(".profile.txt").read_text()
    assert "## supervised" in profile and "## mean_teacher" in profile and "convolution" in profile


# The compiling tests share one shape (mean teacher's networks at tiny_config's batch 4, 32x32), so
# after the first of them inductor's on-disk cache holds the compiled UNet: a cold compile costs
# about 40 s on 2 cores, a warm one about 10.

def test_throughput_benchmark_compare_compile_times_both_in_one_run(tiny_phantom, tmp_path):
    script = BENCHMARKS / "throughput.py"
    out = tmp_path / "t.json"
    proc = run_benchmark(script, "--methods", "mt", "--data", str(tiny_phantom), "--labeled-patients", "2",
                         "--size", "32", "--batch-size", "4", "--device", "cpu", "--warmup", "2", "--iterations", "2",
                         "--repeats", "1", "--compare-reference-pipeline", "--reference-iterations", "4",
                         "--reference-workers", "1", "--compare-compile", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["rows"]
    # --compare-compile timed compile: on too, and its ratios come from the same run
    assert r["compiled"] is False and r["compiled_it_per_s_median"] > 0 and r["compiled_compile_warmup_s"] > 0
    assert r["compile_gain"] == pytest.approx(r["compiled_it_per_s_median"] / r["it_per_s_median"])
    assert r["compiled_speedup"] == pytest.approx(r["compiled_it_per_s_median"] / r["ref_it_per_s"])


def test_throughput_benchmark_compiled_run_still_compares_with_the_reference(tiny_phantom, tmp_path):
    script = BENCHMARKS / "throughput.py"
    out = tmp_path / "c.json"
    proc = run_benchmark(script, "--methods", "supervised", "--data", str(tiny_phantom),
                         "--labeled-patients", "2", "--size", "32", "--batch-size", "4", "--device", "cpu",
                         "--warmup", "2", "--iterations", "2", "--repeats", "1", "--compile",
                         "--compare-reference-pipeline", "--reference-iterations", "4", "--reference-workers", "1",
                         "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["compiled"] is True and row["ref_it_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["it_per_s_median"] / row["ref_it_per_s"])


def test_throughput_benchmark_sets_config_values_for_every_row(tiny_phantom, tmp_path):
    # --set times a variant (here UA-MT's T passes in one teacher forward); a bad one is refused
    script = BENCHMARKS / "throughput.py"
    out = tmp_path / "s.json"
    common = ["--methods", "uamt", "--data", str(tiny_phantom), "--labeled-patients", "2",
              "--size", "32", "--batch-size", "8", "--device", "cpu", "--warmup", "1", "--iterations", "2",
              "--repeats", "1", "--out", str(out)]
    proc = run_benchmark(script, *common, "--set", "uncertainty_copies=8", "--set", "T=4",  # T: the reference's name
                         "--set", "uncertainty_with_target=true", "--compare-set", "uncertainty_copies=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["overrides"] == {"uncertainty_copies": 8, "uncertainty_passes": 4, "uncertainty_with_target": True}
    assert "every row with uncertainty_copies=8, uncertainty_passes=4, uncertainty_with_target=True" in proc.stdout
    # --compare-set: the same row timed again with one value changed, in the same process
    assert row["compared_overrides"] == {**row["overrides"], "uncertainty_copies": 2}
    assert row["compared_it_per_s_median"] > 0
    assert row["compared_gain"] == pytest.approx(row["compared_it_per_s_median"] / row["it_per_s_median"])
    assert "B: the same with uncertainty_copies=2" in proc.stdout
    bad = run_benchmark(script, *common, "--compare-set", "compile=fast", timeout=60)
    assert bad.returncode == 2 and "--compare-set: compile: 'fast' is invalid; expected 'auto', 'on' or 'off'" in bad.stderr
    for item, message in (("uncertainty_copy=8", "--set: 'uncertainty_copy=8' is invalid"),
                          ("uncertainty_copies=0", "--set: uncertainty_copies: 0 is invalid; expected an integer >= 1"),
                          ("base_lr=abc", "--set: argument --base-lr: invalid float value: 'abc'"),
                          ("uncertainty_with_target=ture", "--set: uncertainty_with_target: 'ture' is invalid; expected true or false")):
        bad = run_benchmark(script, *common, "--set", item, timeout=60)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_throughput_benchmark_packed_trials_through_the_search(tiny_phantom, tmp_path):
    script = BENCHMARKS / "throughput.py"
    out = tmp_path / "p.json"
    proc = run_benchmark(script, "--methods", "mt", "--data", str(tiny_phantom),
                         "--labeled-patients", "2", "--size", "32", "--batch-size", "4", "--device", "cpu",
                         "--packed", "2", "--packed-iterations", "30", "--packed-eval-interval", "10",
                         "--packed-cpus-per-trial", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    packed = json.loads(out.read_text())["packed"]
    assert len(packed["trials"]) == 2 and all(t["iterations"] == 30 and t["reports"] == 3 for t in packed["trials"])
    assert packed["total_steady_it_per_s"] == pytest.approx(sum(t["steady_it_per_s"] for t in packed["trials"]))
    # the trials' own compile reports (a short CPU run is not compiled), not the flag as given
    assert packed["compiled"] == "off" and [t["compiled"] for t in packed["trials"]] == ["off", "off"]
    assert "packed mean_teacher trials" in proc.stdout


def test_compile_switch_trains_like_eager_and_keeps_checkpoints_plain(tiny_phantom, tmp_path):
    """`compile: on` compiles the networks in place: the same losses as without it up to dropout
    (inductor draws its own dropout masks, which moves the loss by ~0.2% here), and checkpoints
    that an uncompiled trainer loads."""
    from raysemi.data import load_dataset
    from raysemi.loop import Trainer
    from tests.conftest import tiny_config

    data = load_dataset(str(tiny_phantom), 2, 4)
    runs, graphs = {}, {}
    for mode in ("off", "on"):
        graphs[mode] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        trainer = Trainer(tiny_config(tiny_phantom, method="mean_teacher", mt_warmup=0, compile=mode,
                                      max_iterations=3, eval_interval=3), data, output_dir=tmp_path / mode)
        losses = []
        trainer.callbacks.append(type("L", (), {"on_train_start": lambda *a: None, "on_eval": lambda *a: None,
                                                "on_train_end": lambda *a: None,
                                                "on_log": lambda self, t, i, m: losses.append(m["train/loss"])})())
        torch.manual_seed(3)
        trainer.fit()
        runs[mode] = (trainer, losses)
    (plain, plain_losses), (compiled, compiled_losses) = runs["off"], runs["on"]
    assert all(net._compiled_call_impl is not None for net in compiled.strategy.networks().values())
    assert graphs["on"] == graphs["off"]  # the uncompiled run traced nothing
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs["on"]  # the compiled one did
    # a copy of a compiled network runs its own weights, not the original's (the overlay of the best)
    student = compiled.strategy.student.eval()
    twin = copy.deepcopy(student)
    for p in twin.parameters():
        p.data.zero_()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.equal(twin(x), student(x))
    assert compiled_losses == pytest.approx(plain_losses, rel=1e-2)
    assert list(compiled.strategy.state_dict()) == list(plain.strategy.state_dict())
    again = Trainer(tiny_config(tiny_phantom, method="mean_teacher", mt_warmup=0, max_iterations=4), data)
    again.load(tmp_path / "on" / "last.pt")
    assert again.iteration == 3


def test_validation_metrics_benchmark_smoke(tiny_phantom, tmp_path):
    script = BENCHMARKS / "validation_metrics.py"
    out = tmp_path / "v.json"
    proc = run_benchmark(script, "--data", str(tiny_phantom), "--speckles", "0,0.01",
                         "--threads", "1,2", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["speckle"] for r in report["rows"]] == [0.0, 0.01] and report["volumes"] >= 1
    for r in report["rows"]:
        assert all(r[k] > 0 for k in ("medpy_s", "medpy_box_s", "raysemi_s", "raysemi_x1_s", "raysemi_x2_s"))
        assert r["speedup_vs_medpy"] == pytest.approx(r["medpy_s"] / r["raysemi_x2_s"])
    assert "vs medpy" in proc.stdout


def test_search_wall_benchmark_smoke_scales_the_trials_and_projects(tiny_phantom, tmp_path):
    script = BENCHMARKS / "search_wall.py"
    out = tmp_path / "w.json"
    proc = run_benchmark(script, "--device", "cpu", "--data", str(tiny_phantom),
                         "--labeled-patients", "2", "--size", "32", "--batch-size", "4", "--trials", "3",
                         "--iterations", "40", "--grace-period", "20", "--eval-interval", "20", "--scale", "0.5",
                         "--to-scale", "0.75", "--cpus-per-trial", "1", "--num-cpus", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    # --scale 0.5: 20-iteration trials, grace period and evaluation interval 10
    assert (r["trial_iterations"], r["grace_period"], r["eval_interval"]) == (20, 10, 10)
    assert len(r["trials"]) == 3 and r["completed"] + r["stopped_early"] == 3
    # two at a time: the third trial started in the worker of one that had ended (actor reuse)
    first, second, third = sorted(r["trials"], key=lambda t: t["start_unix"])
    assert r["reuse_actors"] is True and r["workers"] == 2 and third["pid"] in (first["pid"], second["pid"])
    assert len(r["slot_gaps_s"]) == 1 and 0 <= r["slot_gaps_s"][0] == r["slot_gap_median_s"] < 30
    assert r["outside_steps_later_in_worker_s"] == pytest.approx(third["seconds"] - third["steps_s"])
    assert r["outside_steps_first_in_worker_s"] == pytest.approx(
        (first["seconds"] - first["steps_s"] + second["seconds"] - second["steps_s"]) / 2)
    assert "2 worker processes for 3 trials (actor reuse on)" in proc.stdout
    assert r["iterations_total"] == sum(t["iterations"] for t in r["trials"]) and r["completed"] >= 1
    assert 0 < r["startup_s"] < r["wall_s"]
    # each trial reported its seconds of training steps and of validations; projected to scale 0.75
    # (--to-scale) only the steps (at the trial's steady rate) take 1.5 times as long, the rest
    # (start, validations) the same
    completed = next(t for t in r["trials"] if t["iterations"] == 20)
    assert completed["reports"] == 2 and completed["steady_it_per_s"] > 0
    assert 0 < completed["train_s"] < completed["seconds"] and 0 < completed["eval_s"] < completed["seconds"]
    # its steps alone: its iterations at its steady rate (capped by its training seconds)
    steps = completed["steps_s"]
    assert steps == pytest.approx(min(20 / completed["steady_it_per_s"], completed["train_s"]))
    assert completed["projected_seconds"] == pytest.approx(completed["seconds"] + 0.5 * steps)
    assert r["trial_seconds_projected"] == pytest.approx(sum(t["projected_seconds"] for t in r["trials"]))
    ratio = r["trial_seconds_projected"] / r["trial_seconds_measured"]
    assert 1 < ratio < 1.5  # not everything takes 1.5 times as long
    assert r["to_scale"] == 0.75 and r["full_scale_iterations"] == pytest.approx(r["iterations_total"] * 1.5)
    assert r["designed_iterations"] == pytest.approx(60)  # rung at 15 of 30: 3 * 15 + 1 * 15
    assert "projected wall, scale 0.75" in proc.stdout
    assert r["projected_full_wall_s"] == pytest.approx(r["startup_s"] + (r["wall_s"] - r["startup_s"]) * ratio)
    assert r["projected_full_wall_packed_s"] is None and "(no --packed-rate)" in proc.stdout
    # the GPU-bound projection to the full scale, recomputed from the saved result with a packed rate
    again = tmp_path / "w2.json"
    proc = run_benchmark(script, "--from-json", str(out), "--packed-rate", "10",
                         "--out", str(again), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r2 = json.loads(again.read_text())
    steps = sum(t["steps_s"] for t in r["trials"])
    for t in r["trials"]:  # a trial with one report takes the others' steady rate
        rate = t["steady_it_per_s"] or completed["steady_it_per_s"]
        assert t["steps_s"] == pytest.approx(min(t["iterations"] / rate, t["train_s"]))
    assert r2["full_scale_iterations"] == pytest.approx(r["iterations_total"] / 0.5)
    assert r2["projected_full_wall_packed_s"] == pytest.approx(
        r["startup_s"] + (r["trial_seconds_measured"] - steps) / 2 + r["iterations_total"] / 0.5 / 10)
    full_ratio = sum(t["seconds"] + t["steps_s"] for t in r["trials"]) / r["trial_seconds_measured"]
    assert r2["projected_full_wall_s"] == pytest.approx(r["startup_s"] + (r["wall_s"] - r["startup_s"]) * full_ratio)
    assert "at the packed rate" in proc.stdout
    # and with ASHA stopping trials as designed (a floor): all 3 trials to the rung at 20 of 40
    # full-scale iterations, then one (3 / factor 3) to the end: 3 * 20 + 1 * 20
    assert r["projected_full_wall_packed_designed_s"] is None and r2["designed_iterations"] == pytest.approx(80)
    assert r2["projected_full_wall_packed_designed_s"] == pytest.approx(
        r["startup_s"] + (r["trial_seconds_measured"] - steps) / 2 + 80 / 10)
    assert "as designed, a floor" in proc.stdout
    # --to-scale from the saved result: the live run's projections to 0.75 again, with a packed rate
    to = tmp_path / "w3.json"
    scaled = run_benchmark(script, "--from-json", str(out), "--packed-rate", "10", "--to-scale", "0.75",
                           "--out", str(to), timeout=120)
    assert scaled.returncode == 0, scaled.stderr[-2000:]
    r3 = json.loads(to.read_text())
    assert r3["to_scale"] == 0.75 and r2["to_scale"] == 1.0 and "projected wall, scale 0.75" in scaled.stdout
    assert r3["full_scale_iterations"] == pytest.approx(r["iterations_total"] * 1.5)
    assert r3["designed_iterations"] == pytest.approx(60)
    for t3, t in zip(r3["trials"], r["trials"]):
        assert t3["projected_seconds"] == pytest.approx(t["projected_seconds"])
    assert r3["projected_full_wall_s"] == pytest.approx(r["projected_full_wall_s"])
    assert r3["projected_full_wall_packed_s"] == pytest.approx(
        r["startup_s"] + (r["trial_seconds_measured"] - steps) / 2 + r["iterations_total"] * 1.5 / 10)
    assert r3["projected_full_wall_packed_designed_s"] == pytest.approx(
        r["startup_s"] + (r["trial_seconds_measured"] - steps) / 2 + 60 / 10)
    assert r2["projected_full_wall_s"] > r3["projected_full_wall_s"] > r["wall_s"]
    # a scale outside (0, 1], or below the run's own (nothing to project down to), is refused
    for scale_args, message in ((("--from-json", str(out), "--to-scale", "0"), "--to-scale: 0.0 is invalid"),
                                (("--from-json", str(out), "--to-scale", "0.25"), "expected the scale of"),
                                (("--scale", "0.5", "--to-scale", "0.25"), "expected a fraction from --scale (0.5)")):
        refused = run_benchmark(script, *scale_args, "--out", str(tmp_path / "r.json"), timeout=120)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-1000:]
    for bad, message in ((tmp_path / "missing.json", "cannot be read as JSON"), (again.with_name("t.json"), "missing")):
        if bad.name == "t.json":
            bad.write_text(json.dumps({"rows": []}))  # another benchmark's result
        refused = run_benchmark(script, "--from-json", str(bad), timeout=120)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
    assert "projected full-scale wall" in proc.stdout


def test_trainer_counts_training_and_validation_seconds_apart(tiny_phantom, monkeypatch, tmp_path):
    # a search's wall-time projection scales the steps' seconds alone: validations must not be in them
    import time

    from raysemi.data import load_dataset
    from raysemi.loop import Trainer

    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_phantom, max_iterations=4, eval_interval=2)
    trainer = Trainer(cfg, load_dataset(cfg.data, cfg.labeled_patients, cfg.num_classes))
    evaluate = trainer.evaluate

    def slow_evaluate(*a, **k):  # each validation takes at least 0.2 s more
        time.sleep(0.2)
        return evaluate(*a, **k)

    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    trainer.start()
    t0 = time.perf_counter()
    trainer.train_until(4)
    wall = time.perf_counter() - t0
    assert len(trainer.history) == 2
    assert trainer.eval_seconds >= 0.4 and trainer.train_seconds > 0
    assert trainer.train_seconds + trainer.eval_seconds == pytest.approx(wall, rel=0.05, abs=0.01)
    before = trainer.train_seconds
    trainer.train_until(4)  # nothing left to train: nothing added
    assert trainer.train_seconds == pytest.approx(before, abs=0.01)
    # a resumed run (a restored trial) goes on counting from its checkpoint
    resumed = Trainer(cfg, trainer.data)
    resumed.load(trainer.save(tmp_path / "last.pt"))
    assert (resumed.train_seconds, resumed.eval_seconds) == (trainer.train_seconds, trainer.eval_seconds)


def test_trajectory_benchmark_smoke(tiny_phantom, tmp_path):
    # the Dice-trajectory benchmark (speed must not change what is learned): both pipelines, one seed
    script = BENCHMARKS / "trajectory.py"
    out = tmp_path / "traj.json"
    proc = run_benchmark(script, "--methods", "mt", "--data", str(tiny_phantom), "--labeled-patients", "2",
                         "--size", "32", "--batch-size", "4", "--device", "cpu", "--iterations", "8", "--points", "2",
                         "--seeds", "2", "--reference-workers", "1", "--set", "ema_decay=0.95", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["iterations"] == [4, 8] and r["compile"] is False
    assert proc.stdout.splitlines()[0].split() == ["strategy", "pipeline", "it", "4", "it", "8"]
    # --set reaches our path's trainer only; the reference feed keeps the reference's value
    assert [row["set"] for row in r["rows"]] == [{"ema_decay": 0.95}, {"ema_decay": 0.99}]
    assert [(row["method"], row["pipeline"]) for row in r["rows"]] == [("mean_teacher", "ours"),
                                                                         ("mean_teacher", "reference")]
    for row in r["rows"]:
        assert len(row["curves"]) == 2 and all(len(c) == 2 for c in row["curves"])
        assert all(0 <= d <= 1 for c in row["curves"] for d in c)
    # the two pipelines compared point by point: the difference of the means against twice its
    # standard error over the seeds, worked out here from the curves
    ours, ref = (np.array(row["curves"]) for row in r["rows"])
    delta = ours.mean(0) - ref.mean(0)
    noise = 2 * (ours - ref).std(0, ddof=1) / np.sqrt(2)  # seeds 1337 and 1338 in both: paired
    [comparison] = r["comparisons"]
    assert comparison["method"] == "mean_teacher"
    assert [q["delta"] for q in comparison["points"]] == pytest.approx(delta.tolist(), abs=1e-12)
    assert [q["noise"] for q in comparison["points"]] == pytest.approx(noise.tolist(), abs=1e-12)
    assert [q["within"] for q in comparison["points"]] == (np.abs(delta) <= noise).tolist()
    assert proc.stdout.splitlines()[3].split()[0] == "ours-ref" and "points within" in proc.stdout
    # --from-json prints the same table again and writes the comparison, training nothing
    again = run_benchmark(script, "--from-json", str(out), "--out", str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.splitlines()[:4] == proc.stdout.splitlines()[:4]
    assert json.loads((tmp_path / "again.json").read_text())["comparisons"] == r["comparisons"]
    bad = run_benchmark(script, "--from-json", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and "--from-json" in bad.stderr and "missing.json" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    # --reference-from: a run of our path alone compared with another run's reference rows
    ours_only = tmp_path / "ours.json"
    ours_only.write_text(json.dumps({**r, "rows": r["rows"][:1], "comparisons": []}))
    paired = run_benchmark(script, "--from-json", str(ours_only), "--reference-from", str(out),
                           "--out", str(tmp_path / "paired.json"))
    assert paired.returncode == 0, paired.stderr[-2000:]
    assert json.loads((tmp_path / "paired.json").read_text())["comparisons"] == r["comparisons"]
    # a run that has reference rows of its own compares with the other run's instead
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps({**r, "rows": [r["rows"][0], {**r["rows"][1], "curves": [
        [d - 0.5 for d in c] for c in r["rows"][1]["curves"]]}]}))
    replaced = run_benchmark(script, "--from-json", str(out), "--reference-from", str(shifted),
                             "--out", str(tmp_path / "replaced.json"))
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    [points] = [c["points"] for c in json.loads((tmp_path / "replaced.json").read_text())["comparisons"]]
    assert [q["delta"] for q in points] == pytest.approx((delta + 0.5).tolist())
    assert [line.split()[1] for line in replaced.stdout.splitlines()[1:3]] == ["ours", "reference"]
    assert replaced.stdout.splitlines()[3].split()[0] == "ours-ref"  # its own reference row is not shown
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**r, "args": {**r["args"], "iterations": 16}}))
    refused = run_benchmark(script, "--from-json", str(ours_only), "--reference-from", str(other))
    assert refused.returncode == 2 and "iterations 8 against 16" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_trajectory_fp32_pipeline_is_ours_with_the_fast_switches_off(tiny_phantom, tmp_path):
    # 'fp32': our feed with bf16, channels_last, graphs and compile off, so a GPU run can tell what
    # those switches change without the reference's CPU-bound feed; on the CPU our path takes bf16
    # from --set, and the fp32 pipeline must train without it
    script = BENCHMARKS / "trajectory.py"
    out = tmp_path / "fp32.json"
    proc = run_benchmark(script, "--methods", "em", "--data", str(tiny_phantom), "--labeled-patients", "2",
                         "--size", "32", "--batch-size", "4", "--device", "cpu", "--iterations", "6", "--points", "2",
                         "--seeds", "2", "--pipelines", "fp32,ours,fp32", "--set", "amp=bf16", "--set", "channels_last=on",
                         "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    # ours first (the table compares it with the rest), each pipeline once however often named
    assert [(row["pipeline"], row["set"]) for row in r["rows"]] == [
        ("ours", {"amp": "bf16", "channels_last": "on"}), ("fp32", {"amp": "off", "channels_last": "off"})]
    [comparison] = r["comparisons"]
    ours, fp32 = (np.array(row["curves"]) for row in r["rows"])
    assert comparison["against"] == "fp32"
    assert [q["delta"] for q in comparison["points"]] == pytest.approx((ours.mean(0) - fp32.mean(0)).tolist(), abs=1e-12)
    lines = proc.stdout.splitlines()
    assert [line.split()[1] for line in lines[1:3]] == ["ours", "fp32"] and lines[3].split()[0] == "ours-fp32"
    assert "ours-fp32 " in lines[-1] and "ours-ref" not in proc.stdout
    # progress on stderr, one line per seed and pipeline, the table alone on stdout
    done = [line for line in proc.stderr.splitlines() if line.startswith("trajectory: entropy_minimization")]
    assert len(done) == 4 and all(" 6 iterations in " in line for line in done)
    assert any(line.startswith("trajectory: entropy_minimization fp32 seed 1338") for line in done)
    again = run_benchmark(script, "--from-json", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.splitlines() == lines[:4] + [lines[-1].split("; written")[0]]
    # with another run's reference rows: both comparisons, the rows in a run's own order
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({**r, "rows": [{**r["rows"][1], "pipeline": "reference",
                                              "curves": [[d - 0.25 for d in c] for c in r["rows"][1]["curves"]]}]}))
    both = run_benchmark(script, "--from-json", str(out), "--reference-from", str(ref), "--out", str(tmp_path / "b.json"))
    assert both.returncode == 0, both.stderr[-2000:]
    blines = both.stdout.splitlines()
    assert [line.split()[1] for line in blines[1:4]] == ["ours", "reference", "fp32"]
    assert [line.split()[0] for line in blines[4:6]] == ["ours-ref", "ours-fp32"]
    b = json.loads((tmp_path / "b.json").read_text())["comparisons"]
    assert [c["against"] for c in b] == ["reference", "fp32"] and b[1] == comparison
    assert [q["delta"] for q in b[0]["points"]] == pytest.approx((ours.mean(0) - fp32.mean(0) + 0.25).tolist())
    n_ref, n_fp32 = (sum(q["within"] for q in c["points"]) for c in b)
    assert f"'!' outside: ours-ref {n_ref} of 2, ours-fp32 {n_fp32} of 2 points within" in blines[-1]


def test_trajectory_frees_each_trainer_and_keeps_the_rows_it_finished(tiny_phantom, tmp_path, monkeypatch):
    # each run's trainer is gone before the next starts (a CUDA graph it held, freed later in a
    # reference feed's forked worker, warns there); a run stopped part way (a device call's time
    # limit) keeps the rows it finished
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import trajectory
    finally:
        sys.path.remove(str(BENCHMARKS))
    alive: list[weakref.ref] = []

    class Tracked(trajectory.Trainer):
        def __init__(self, config, *args, **kw):
            assert all(ref() is None for ref in alive), "the trainer of the run before is still alive"
            if config.amp == "off":  # the fp32 pipeline: stop here, as a time limit would
                raise KeyboardInterrupt
            super().__init__(config, *args, **kw)
            self.cycle = self  # a reference cycle, as a trainer's callbacks and graphs make: only gc frees it
            alive.append(weakref.ref(self))

    monkeypatch.setattr(trajectory, "Trainer", Tracked)
    out = tmp_path / "part.json"
    with pytest.raises(KeyboardInterrupt):
        trajectory.main(["--methods", "supervised", "--data", str(tiny_phantom), "--labeled-patients", "2",
                         "--size", "32", "--batch-size", "4", "--device", "cpu", "--iterations", "2", "--points", "1",
                         "--seeds", "2", "--pipelines", "ours,fp32", "--set", "amp=bf16", "--out", str(out)])
    assert len(alive) == 2
    saved = json.loads(out.read_text())
    assert [(row["pipeline"], len(row["curves"])) for row in saved["rows"]] == [("ours", 2)]


def test_trajectory_comparison_flags_a_shift_beyond_seed_noise():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from trajectory import compare
    finally:
        sys.path.remove(str(BENCHMARKS))
    ours = [[0.50, 0.80], [0.52, 0.82], [0.48, 0.78]]
    same = compare(ours, [[0.51, 0.80], [0.49, 0.79], [0.50, 0.81]])
    assert [q["within"] for q in same] == [True, True]
    # the same seeds on both sides: paired, the noise of the per-seed differences (0, 0.03, -0.03)
    assert same[0]["delta"] == pytest.approx(0.0) and same[1]["noise"] == pytest.approx(2 * 0.03 / np.sqrt(3))
    assert {q["test"] for q in same} == {"paired"}
    # a small shift that every seed shows is flagged although the seeds spread widely; unpaired
    # (other seed counts) the same spread hides it: Welch's form, each side's own variance
    steady = compare([[0.52], [0.72], [0.93]], [[0.50], [0.70], [0.90]])
    assert steady[0]["within"] is False and steady[0]["noise"] == pytest.approx(2 * 0.005773502 / np.sqrt(3))
    unpaired = compare([[0.52], [0.72], [0.93]], [[0.50], [0.90]])
    assert unpaired[0]["test"] == "welch" and unpaired[0]["within"] is True
    assert unpaired[0]["noise"] == pytest.approx(2 * np.sqrt(np.var([0.52, 0.72, 0.93], ddof=1) / 3 + np.var([0.50, 0.90], ddof=1) / 2))
    shifted = compare(ours, [[0.50, 0.70], [0.52, 0.72], [0.48, 0.68]])  # a tenth lower at the end
    assert [q["within"] for q in shifted] == [True, False] and shifted[1]["delta"] == pytest.approx(0.1)
    lower = compare([[0.50, 0.70], [0.52, 0.72], [0.48, 0.68]], ours)  # ours a tenth lower
    assert [q["within"] for q in lower] == [True, False] and lower[1]["delta"] == pytest.approx(-0.1)
    lone = compare([[0.5, 0.8]], [[0.4, 0.7]])  # one seed: no spread to judge by
    assert [q["within"] for q in lone] == [None, None] and lone[1]["delta"] == pytest.approx(0.1)


def test_gpu_check_stages_are_checked_and_mps_is_looked_for(tmp_path):
    # the prepared device check: a mistyped stage is refused before anything runs; the MPS stage
    # says so when the machine has no MPS control (this one), instead of timing plain packing
    script = BENCHMARKS / "gpu_check.sh"
    # from the repository root, with this interpreter as its python3, as a user runs it
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVICE": "cpu", "SMALL": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    root = BENCHMARKS.parent
    bad = subprocess.run(["bash", str(script)], env={**env, "STAGES": "packed mpss"}, capture_output=True,
                         text=True, timeout=60, cwd=root)
    assert bad.returncode == 2 and "unknown stage 'mpss'" in bad.stderr and not (tmp_path / "out").exists()
    if shutil.which("nvidia-cuda-mps-control"):
        pytest.skip("this machine has MPS: the stage would start its daemon")
    ok = subprocess.run(["bash", str(script)], env={**env, "STAGES": "mps"}, capture_output=True, text=True,
                        timeout=120, cwd=root)
    assert ok.returncode == 0, ok.stderr[-2000:]
    line = "mps: nvidia-cuda-mps-control is not on this machine; stage skipped"
    assert line in ok.stdout and line in (tmp_path / "out" / "log.txt").read_text()
    assert not list((tmp_path / "out").glob("*mps*.json"))  # no plain-packing numbers filed as MPS ones
    # an MPS control whose daemon cannot start (as in a container without the right IPC): skipped too
    fake = tmp_path / "bin" / "nvidia-cuda-mps-control"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"; exit 1\n")
    fake.chmod(0o755)
    failing = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, cwd=root,
                             env={**env, "STAGES": "mps", "PATH": f"{fake.parent}{os.pathsep}{env['PATH']}"})
    assert failing.returncode == 0, failing.stderr[-2000:]
    assert "mps: the MPS daemon did not start; stage skipped" in failing.stdout
    assert (fake.parent / "calls").read_text().split() == ["-d"]  # asked to start, nothing timed
    assert not list((tmp_path / "out").glob("*mps*.json"))


def test_gpu_check_trajectories_stage_brings_back_a_json_per_strategy(tmp_path):
    # the stage a device session runs for issue 7's "same trajectory" goal, dry on the CPU at a tiny
    # size: strategies side by side in lanes, each lane's threads capped, one JSON per strategy
    script = BENCHMARKS / "gpu_check.sh"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVICE": "cpu", "SMALL": "1", "STAGES": "trajectories",
           "TRAJ_METHODS": "em,supervised", "TRAJ_ITERATIONS": "4", "TRAJ_POINTS": "2", "LANES": "2",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    bad = subprocess.run(["bash", str(script)], env={**env, "LANES": "0"}, capture_output=True, text=True,
                         timeout=60, cwd=BENCHMARKS.parent)
    assert bad.returncode == 2 and "LANES: '0' is invalid" in bad.stderr and not (tmp_path / "out").exists()
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=BENCHMARKS.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores nproc counts, over 2 lanes
    assert f"against fp32: em supervised (4 iterations, 2 lanes of {threads} threads)" in proc.stdout
    for name, method in (("em", "entropy_minimization"), ("supervised", "supervised")):
        assert f"[{name}] trajectory exit: 0" in proc.stdout
        r = json.loads((tmp_path / "out" / f"trajectory_cpu_{name}.json").read_text())
        assert [(row["method"], row["pipeline"]) for row in r["rows"]] == [(method, "ours"), (method, "fp32")]
        assert r["iterations"] == [2, 4] and [c["against"] for c in r["comparisons"]] == ["fp32"]


def test_search_wall_time_limit_stops_the_search_and_keeps_what_trials_reported(tiny_phantom, tmp_path):
    """A device call has a hard end: past --time-limit the search is stopped as Ctrl-C stops it,
    and the trials' reports so far are written (finished: false, no projection), not lost."""
    script = BENCHMARKS / "search_wall.py"
    out, log = tmp_path / "w.json", tmp_path / "search.log"
    proc = run_benchmark(script, "--device", "cpu", "--data", str(tiny_phantom), "--labeled-patients", "2",
                         "--size", "32", "--batch-size", "4", "--trials", "2", "--iterations", "100000",
                         "--grace-period", "50000", "--eval-interval", "5", "--cpus-per-trial", "1",
                         "--num-cpus", "2", "--time-limit", "40", "--stop-grace", "30", "--progress", "5",
                         "--log", str(log), "--out", str(out))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "past --time-limit; stopping the search" in proc.stdout
    assert "did not finish within --time-limit 40 s" in proc.stdout and "no projection" in proc.stdout
    assert re.search(r"\[search_wall\] \d+ s: \d+ trials reported", proc.stdout)  # progress while it ran
    r = json.loads(out.read_text())
    assert r["finished"] is False and r["stopped_by"] == "time limit" and "projected_full_wall_s" not in r
    assert r["wall_s"] < 40 + 30 + 5 and r["stopped_early"] is None
    assert r["trials"], "no trial reported within 40 s (the search smoke test's trials end within 25 s)"
    assert r["completed"] == 0 and r["iterations_total"] == sum(t["iterations"] for t in r["trials"]) > 0
    assert all(t["iterations"] % 5 == 0 and t["reports"] == t["iterations"] // 5 for t in r["trials"])
    assert "Interrupted" in log.read_text() or "interrupted" in log.read_text()  # the search's own output
    assert not searches_running()
    # a partial result cannot be projected
    proc = run_benchmark(script, "--from-json", str(out), "--packed-rate", "10", "--out", str(tmp_path / "p.json"),
                         timeout=120)
    assert proc.returncode == 2 and "finished: false; expected a search that finished" in proc.stderr


def test_search_wall_designed_iterations_follow_ashas_rungs():
    """The floor of the search projection: issue 7's search (32 trials of 10,000 iterations, grace
    2,500, factor 3, reports every 500) stops 2/3 of its trials at 2,500 and 2/3 of the rest at
    7,500 when ASHA stops them as designed."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from search_wall import designed_iterations
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert designed_iterations(32, 10_000, 2_500, 3, 500) == pytest.approx(32 * 2500 + 32 / 3 * 5000 + 32 / 9 * 2500)
    # rungs fall on reports: grace 2,400 with reports every 500 stops trials at 2,500 and 7,500 too
    assert designed_iterations(32, 10_000, 2_400, 3, 500) == pytest.approx(32 * 2500 + 32 / 3 * 5000 + 32 / 9 * 2500)
    # few trials: at least one runs on to the end
    assert designed_iterations(2, 100, 10, 3, 10) == pytest.approx(2 * 10 + 1 * 20 + 1 * 70)


def searches_running() -> list[str]:
    """Command lines of search_wall's searches still running (its experiment is 'search-wall')."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"raysemi.search" in args and b"search-wall" in args:
            found.append(" ".join(a.decode(errors="replace") for a in args))
    return found


def test_search_wall_on_sigterm_stops_its_search_and_writes_what_it_has(tiny_phantom, tmp_path):
    """`timeout` sends SIGTERM: the search, in its own process session, must not outlive the
    script, and the result so far is written."""
    out = tmp_path / "w.json"
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / "search_wall.py"), "--device", "cpu", "--data",
                             str(tiny_phantom), "--labeled-patients", "2", "--size", "32", "--batch-size", "4",
                             "--trials", "2", "--iterations", "100000", "--cpus-per-trial", "1", "--num-cpus", "2",
                             "--stop-grace", "10", "--out", str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("the search's output: ")  # the search is being started
    time.sleep(3)
    assert searches_running()
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout
    assert "SIGTERM: stopping the search" in stdout and "was stopped by SIGTERM" in stdout
    r = json.loads(out.read_text())
    assert r["finished"] is False and r["stopped_by"] == "SIGTERM"
    assert not searches_running()
