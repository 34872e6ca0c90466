"""Pictures of a run: the drawing functions, the callback's rate limit, a real `raysemi.train`
run that logs overlays and learning curves to MLflow (and the run folder), and the final best's
overlay across an interruption and --resume."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from raysemi import checkpoint, inference
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


def test_train_logs_pictures_to_mlflow_and_the_run_folder(tiny_phantom, tmp_path, monkeypatch, capsys, mlflow_store):
    from raysemi.train import main as train_main

    monkeypatch.chdir(tmp_path)
    uri = mlflow_store(tmp_path / "m.db")
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


def test_the_end_pictures_an_unpictured_best_from_best_pt_leaving_the_trainer_alone(tiny_phantom, tmp_path, capsys):
    cfg = tiny_config(tiny_phantom, max_iterations=2, eval_interval=1)
    trainer = Trainer(cfg, load_dataset(cfg.data, cfg.labeled_patients, cfg.num_classes), output_dir=tmp_path)
    result = trainer.fit()
    cb = PicturesCallback(tmp_path, slices=2)  # a fresh callback, as after a resume: nothing pending
    cb.on_train_start(trainer)
    weights = {k: v.clone() for k, v in trainer.eval_network().state_dict().items()}
    rng, mode = torch.get_rng_state(), trainer.eval_network().training
    cb.on_train_end(trainer, result)
    assert [p.name for p in cb.written[:1]] == [f"best_iter_{result.best_iteration:06d}.png"]
    assert torch.equal(torch.get_rng_state(), rng) and trainer.eval_network().training == mode
    assert all(torch.equal(v, weights[k]) for k, v in trainer.eval_network().state_dict().items())
    cb.written.clear()
    cb.on_train_end(trainer, result)  # pictured already: not drawn again
    assert [p.parent.name for p in cb.written] == ["plots"]

    (tmp_path / "overlays" / f"best_iter_{result.best_iteration:06d}.png").unlink()
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    cb.on_train_end(trainer, result)  # an unreadable best.pt: a warning line, as any drawing error
    assert "warning: overlay not drawn (UserError: " in capsys.readouterr().err


def _count_overlays(monkeypatch) -> Counter:
    """How many times each overlay PNG is drawn, by path from the working folder (a second drawing
    would overwrite the first, so the files alone cannot tell)."""
    import raysemi.visualize as visualize

    drawn: Counter = Counter()
    original = visualize.write_overlay_png

    def spy(path, *args, **kwargs):
        drawn[os.path.relpath(path)] += 1
        return original(path, *args, **kwargs)

    monkeypatch.setattr(visualize, "write_overlay_png", spy)
    return drawn


def _interrupt_after(monkeypatch, iteration: int, seed: int | None = None):
    """Ctrl-C once training reaches `iteration` (in the run of `seed` only, when given); returns
    the real `Trainer.train_until`, to put back before the resume."""
    original = Trainer.train_until

    def interrupted(self, stop):
        if seed is None or self.config.seed == seed:
            original(self, iteration)
            raise KeyboardInterrupt
        original(self, stop)

    monkeypatch.setattr(Trainer, "train_until", interrupted)
    return original


# evaluations at 2, 4, 6, 8; one overlay every 3 evaluations: on the phantom the best is at 4 (drawn
# at 2, kept pending at 4) and nothing beats it after, so a Ctrl-C at 6 leaves it unpictured
PENDING = [*TINY, "--max-iterations", "8", "--eval-interval", "2"]


def _best_iteration(run_dir: Path) -> int:
    return int(checkpoint.load(run_dir / "best.pt")["best"]["iteration"])


def test_a_best_pending_at_an_interruption_is_drawn_after_the_resume(tiny_phantom, tmp_path, monkeypatch, capsys,
                                                                     mlflow_store):
    from raysemi.train import main as train_main

    monkeypatch.chdir(tmp_path)
    uri = mlflow_store(tmp_path / "m.db")
    args = ["--method", "supervised", "--data", str(tiny_phantom), *PENDING, "--tracking-uri", uri]
    drawn = _count_overlays(monkeypatch)
    original = _interrupt_after(monkeypatch, 6)
    assert run_cli(train_main, [*args, "--output", "a"]) == 130
    best = _best_iteration(tmp_path / "a")
    assert best == 4 and drawn == {"a/overlays/best_iter_000002.png": 1}  # the case: a best pending at the stop

    monkeypatch.setattr(Trainer, "train_until", original)
    assert run_cli(train_main, [*args, "--output", "a", "--resume", "a/last.pt"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "results.json").read_text())["best_iteration"] == best  # no new best
    assert drawn == {"a/overlays/best_iter_000002.png": 1, f"a/overlays/best_iter_{best:06d}.png": 1}
    assert (tmp_path / "a" / "overlays" / f"best_iter_{best:06d}.png").is_file()
    client = MlflowClient(tracking_uri=uri)
    (resumed,) = client.search_runs([client.get_experiment_by_name("raysemi").experiment_id])  # one run: resumed in it
    assert [a.path for a in client.list_artifacts(resumed.info.run_id, "overlays")] == [
        "overlays/best_iter_000002.png", f"overlays/best_iter_{best:06d}.png"]

    drawn.clear()  # a run not interrupted: its pending best drawn once at the end, no second copy from best.pt
    assert run_cli(train_main, [*args, "--output", "b"]) == 0
    best = _best_iteration(tmp_path / "b")
    assert drawn == {"b/overlays/best_iter_000002.png": 1, f"b/overlays/best_iter_{best:06d}.png": 1}


def test_each_seed_of_a_resumed_retrain_pictures_its_best_once(tiny_phantom, tmp_path, monkeypatch):
    from raysemi.train import main as train_main

    monkeypatch.chdir(tmp_path)
    drawn = _count_overlays(monkeypatch)
    # on the phantom, seed 1334's best is at 6 (pending until its end) and seed 1335's at 4: seed0 runs
    # whole, seed1 stops at 6 with its best pending
    original = _interrupt_after(monkeypatch, 6, seed=1335)
    args = ["--method", "supervised", "--data", str(tiny_phantom), *PENDING, "--no-mlflow", "--seeds", "2",
            "--seed", "1334", "--output", "r"]
    assert run_cli(train_main, args) == 130
    assert _best_iteration(tmp_path / "r" / "seed0") == 6 and _best_iteration(tmp_path / "r" / "seed1") == 4
    assert dict(drawn) == {f"r/seed{k}/overlays/best_iter_{it:06d}.png": 1 for k, it in ((0, 2), (0, 6), (1, 2))}
    monkeypatch.setattr(Trainer, "train_until", original)
    assert run_cli(train_main, ["--resume", "r", "--no-mlflow"]) == 0
    for k in (0, 1):
        folder = tmp_path / "r" / f"seed{k}"
        best = json.loads((folder / "results.json").read_text())["best_iteration"]
        assert best == _best_iteration(folder)
        assert (folder / "overlays" / f"best_iter_{best:06d}.png").is_file()
    assert set(drawn.values()) == {1} and "r/seed1/overlays/best_iter_000004.png" in drawn  # none twice


def _search_rows(method_dices: dict[str, list[float]]) -> list[dict]:
    from raysemi.search_space import load_spaces

    spaces = load_spaces(list(method_dices))
    rows, k = [], 0
    for method, dices in method_dices.items():
        for dice in dices:
            k += 1
            values = {name: d.values[k % len(d.values)] if d.type == "choice" else
                      d.low + (d.high - d.low) * ((k * 0.37) % 1) for name, d in spaces[method].items()}
            rows.append({"method": method, "status": "completed", "best_val_dice": dice, "values": values,
                         "curve": [(10, dice / 2), (20, dice)]})
    return rows


def test_search_plots_give_each_strategy_one_colour_in_both_plots(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raysemi.search_report import plot_best_per_strategy, plot_curves, strategy_colors

    # by the strategy's place among the registered ones: the same whatever else is searched
    assert strategy_colors(["mean_teacher"])["mean_teacher"] == \
        strategy_colors(["supervised", "mean_teacher", "adversarial"])["mean_teacher"]
    assert len(set(strategy_colors(["supervised", "mean_teacher", "adversarial"]).values())) == 3
    rows = _search_rows({"supervised": [0.5, 0.6], "mean_teacher": [0.7, 0.4]})
    colours = strategy_colors(["mean_teacher", "supervised"])
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))  # keep them to look at
    plot_curves(rows, tmp_path / "curves.png")
    plot_best_per_strategy(rows, tmp_path / "best.png")
    curves, best = figures
    rgb = matplotlib.colors.to_rgb
    drawn = {line.get_label(): rgb(line.get_color()) for line in curves.axes[0].get_lines()
             if not line.get_label().startswith("_")}
    assert drawn == {m: rgb(c) for m, c in colours.items()}  # the legend's colours
    ax = best.axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    bars = {names[round(p.get_x() + p.get_width() / 2)]: rgb(p.get_facecolor()) for p in ax.patches}
    dots = {names[int(c.get_offsets()[0][0])]: rgb(c.get_facecolor()[0]) for c in ax.collections}
    assert bars == dots == {m: rgb(c) for m, c in colours.items()}


def test_parameter_importance_leaves_out_what_too_few_trials_cannot_tell(recwarn):
    from raysemi.search_report import param_importances
    from raysemi.search_space import load_spaces

    spaces = load_spaces(["mean_teacher", "supervised"])
    # every supervised trial at the same Dice (stopped early, say): Optuna would warn that its
    # importances are all equal; they are left out instead, with no warning at the search's end
    rows = _search_rows({"mean_teacher": [0.7, 0.4, 0.5, 0.2], "supervised": [0.0, 0.0, 0.0]})
    out = param_importances(rows, spaces)
    assert "supervised" not in out and set(out["mean_teacher"]) == set(spaces["mean_teacher"])
    assert not [w for w in recwarn if "quantiles" in str(w.message)]
    rows = _search_rows({"mean_teacher": [0.7, 0.4, 0.5, 0.2], "supervised": [0.1, 0.3, 0.0]})
    assert set(param_importances(rows, spaces)["supervised"]) == {"base_lr"}
