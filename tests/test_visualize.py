"""Pictures of a run: the drawing functions, the callback's rate limit, and a real `raysemi.train`
run that logs overlays and learning curves to MLflow (and the run folder)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from raysemi import inference
from raysemi.data import load_dataset
from raysemi.errors import run_cli
from raysemi.loop import Trainer
from raysemi.tracking import PicturesCallback, pick_slices
from raysemi.visualize import label_rgba, write_learning_curves_png, write_overlay_png
from tests.conftest import tiny_config


def _slices(n: int, shape=(32, 40)):
    rng = np.random.default_rng(0)
    images = [rng.random(shape, dtype=np.float32) for _ in range(n)]
    labels = []
    for i in range(n):
        lab = np.zeros(shape, np.uint8)
        lab[5:15, 5:15], lab[18:26, 8:30], lab[2:6, 30:38] = 1, 2, 3
        labels.append(np.roll(lab, i, axis=1))
    return images, labels


def test_overlay_png_has_one_row_per_slice(tmp_path):
    images, labels = _slices(4)
    preds = [np.roll(lab, 2, axis=0) for lab in labels]
    path = write_overlay_png(tmp_path / "o" / "x.png", images, labels, preds, 4, row_titles=list("abcd"), title="t")
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]  # no temporary file left
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert w == 720 and 600 < h < 1200  # 3 columns of 2.4 in at 100 dpi; 4 rows
    _, h2 = Image.open(write_overlay_png(tmp_path / "y.png", images[:1], labels[:1], preds[:1], 4)).size
    assert h2 < h / 2.5
    with pytest.raises(ValueError, match="same 2D shape"):
        write_overlay_png(tmp_path / "z.png", images[:1], [labels[0][:4]], preds[:1], 4)
    with pytest.raises(ValueError, match="at least one"):
        write_overlay_png(tmp_path / "z.png", [], [], [], 4)
    assert not (tmp_path / "z.png").exists()


def test_label_colours_leave_background_clear():
    rgba = label_rgba(np.array([[0, 1], [2, 3]]), 4)
    assert rgba.shape == (2, 2, 4) and rgba[0, 0, 3] == 0 and (rgba[[0, 1, 1], [1, 0, 1], 3] > 0).all()
    assert len({tuple(rgba[i, j, :3]) for i, j in ((0, 1), (1, 0), (1, 1))}) == 3
    assert label_rgba(np.array([[0, 5]]), 6).shape == (1, 2, 4)  # other class counts: tab10 colours


def test_learning_curves_png(tmp_path):
    logs = [(i, {"train/loss": 1 / i, "train/loss_sup": 0.5 / i, "train/consistency_weight": 0.1})
            for i in range(1, 50)]
    history = [{"iteration": i, "val/dice": i / 60, "val/hd95": 60 - i, "val/dice_lv": i / 70} for i in (10, 20, 40)]
    path = write_learning_curves_png(tmp_path / "c.png", logs, history, names=["rv", "myo", "lv"])
    with Image.open(path) as im:
        assert im.size == (1500, 420)
    with Image.open(write_learning_curves_png(tmp_path / "empty.png", [], [])) as im:  # nothing logged yet
        assert im.size == (1500, 420)


def test_picked_slices_are_fixed_spread_and_show_foreground(tiny_phantom):
    vols = load_dataset(str(tiny_phantom), 2, 4).val
    picked = pick_slices(vols, 4)
    assert picked == pick_slices(vols, 4) and len(set(picked)) == 4
    assert all(vols[v].label[z].any() for v, z in picked)
    assert len({v for v, _ in picked}) == len(vols)  # the validation volumes are all represented
    assert len(pick_slices(vols, 1000)) == sum(int(v.label.any(axis=(1, 2)).sum()) for v in vols)


def test_callback_draws_at_most_every_n_evals_and_the_final_best(tiny_phantom, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_phantom, max_iterations=2, eval_interval=2)
    trainer = Trainer(cfg, load_dataset(cfg.data, cfg.labeled_patients, cfg.num_classes))

    def no_full_evaluation(*args, **kwargs):
        raise AssertionError("the pictures must not evaluate whole volumes")

    monkeypatch.setattr(trainer, "evaluate", no_full_evaluation)
    monkeypatch.setattr(inference, "evaluate_volumes", no_full_evaluation)
    calls = []
    real = inference.predict_volume
    monkeypatch.setattr(inference, "predict_volume", lambda net, image, *a, **k: calls.append(image.shape) or
                        real(net, image, *a, **k))
    cb = PicturesCallback(tmp_path, run=None, slices=3, every_evals=3)
    cb.on_train_start(trainer)
    for it, best in [(1, True), (2, True), (3, False), (4, True), (5, True), (6, True)]:
        cb.on_log(trainer, it, {"train/loss": 1.0 / it, "lr": 0.01})
        cb.on_eval(trainer, it, {"val/dice": it / 10}, best)
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["best_iter_000001.png",
                                                                        "best_iter_000004.png"]
    assert sum(s[0] for s in calls) == 2 * 3  # only the picked slices were predicted
    cb.on_train_end(trainer, type("R", (), {"best_dice": 0.6, "best_iteration": 6})())
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == [
        "best_iter_000001.png", "best_iter_000004.png", "best_iter_000006.png"]  # the final best, from its copy
    assert (tmp_path / "plots" / "learning_curves.png").is_file()


def test_a_drawing_error_is_a_warning_not_a_failed_run(tiny_phantom, tmp_path, monkeypatch, capsys):
    import raysemi.visualize

    cfg = tiny_config(tiny_phantom, max_iterations=2, eval_interval=2)
    trainer = Trainer(cfg, load_dataset(cfg.data, cfg.labeled_patients, cfg.num_classes), output_dir=tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(raysemi.visualize, "write_overlay_png", broken)
    monkeypatch.setattr(raysemi.visualize, "write_learning_curves_png", broken)
    trainer.callbacks.append(PicturesCallback(tmp_path, slices=2))
    result = trainer.fit()
    assert result.iterations == 2
    err = capsys.readouterr().err
    assert "warning: overlay not drawn (RuntimeError: no fonts)" in err and "warning: learning curves" in err


TINY = ["--labeled-patients", "2", "--patch-size", "32", "32", "--batch-size", "4", "--labeled-bs", "2",
        "--max-iterations", "6", "--eval-interval", "3", "--log-interval", "2", "--device", "cpu"]


def test_train_logs_pictures_to_mlflow_and_the_run_folder(tiny_phantom, tmp_path, monkeypatch, capsys):
    from raysemi.train import main as train_main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    code = run_cli(train_main, ["--method", "supervised", "--data", str(tiny_phantom), *TINY, "--output", "run",
                                "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert code == 0
    # the progress bar, in a non-terminal: plain lines, no carriage return, bounded
    assert "\r" not in out
    bar_lines = [line for line in out.splitlines() if line.startswith("train ")]
    assert 1 <= len(bar_lines) <= 3 and bar_lines[-1].startswith("train 6/6 (100%)")  # 3 logs
    assert "loss" in bar_lines[-1] and "best dice" in bar_lines[-1] and "it/s" in bar_lines[-1]
    assert any(line.startswith("test volumes 6/6") for line in out.splitlines())

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("raysemi").experiment_id])
    overlays = [a.path for a in client.list_artifacts(run.info.run_id, "overlays")]
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert plots == ["plots/learning_curves.png"]
    assert overlays and all(re.fullmatch(r"overlays/best_iter_\d{6}\.png", p) for p in overlays)
    assert 1 <= len(overlays) <= 2  # the first evaluation's, and the final best if it came later
    best = json.loads((tmp_path / "run" / "results.json").read_text())["best_iteration"]
    assert f"overlays/best_iter_{best:06d}.png" in overlays
    for rel in overlays + plots:
        local = client.download_artifacts(run.info.run_id, rel, str(tmp_path / "dl"))
        with Image.open(local) as im:
            im.verify()
        with Image.open(local) as im:
            w, h = im.size
        if rel.startswith("plots/"):
            assert (w, h) == (1500, 420)
        else:
            assert w == 720 and 800 < h < 1200  # 4 slices
        assert (tmp_path / "run" / rel).read_bytes() == open(local, "rb").read()  # also in the run folder


def test_learning_curves_after_resume_keep_the_losses_from_before(tiny_phantom, tmp_path, monkeypatch):
    import raysemi.visualize as visualize

    cfg = tiny_config(tiny_phantom, method="supervised", max_iterations=6, eval_interval=2, log_interval=1)
    data = load_dataset(cfg.data, cfg.labeled_patients, cfg.num_classes)
    first = Trainer(cfg, data, output_dir=tmp_path / "a")
    first.start()
    first.train_until(4)
    first.save(tmp_path / "last.pt")

    drawn = {}
    original = visualize.write_learning_curves_png

    def spy(path, train_logs, history, **kw):
        drawn["iterations"] = [it for it, _ in train_logs]
        drawn["val"] = [int(h["iteration"]) for h in history]
        return original(path, train_logs, history, **kw)

    monkeypatch.setattr(visualize, "write_learning_curves_png", spy)
    resumed = Trainer(cfg, data, [PicturesCallback(tmp_path / "b", None, slices=0)], output_dir=tmp_path / "b")
    resumed.load(tmp_path / "last.pt")
    resumed.fit()
    assert drawn["iterations"] == [1, 2, 3, 4, 5, 6]  # 1-4 from before the resume
    assert drawn["val"] == [2, 4, 6]
    assert (tmp_path / "b" / "plots" / "learning_curves.png").is_file()
