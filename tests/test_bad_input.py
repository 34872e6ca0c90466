"""Bad input through the real CLIs: exit code 2, one `error:` line naming the file or field and the
value, no traceback (unless --debug), and nothing lost or half-written.

The first cases run `python -m ...` in a subprocess exactly as a user would; the rest call the same
`main` through `raysemi.errors.run_cli` in-process (a subprocess costs seconds of torch import).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from raysemi.errors import UserError, run_cli

TINY = ["--labeled-patients", "2", "--patch-size", "32", "32", "--batch-size", "4", "--labeled-bs", "2",
        "--max-iterations", "2", "--eval-interval", "2", "--device", "cpu"]
KEEP = "precious user data\n"


# ---- helpers ---------------------------------------------------------------------------------------
def case(id_: str, *values, **kw):
    return pytest.param(*values, id=id_, **kw)


def train_args(data, out, *extra) -> list[str]:
    """The tiny control run; flags in `extra` come last, so they override the tiny ones."""
    return ["--data", str(data), *TINY, "--output", str(out), *map(str, extra)]


def run_module(module: str, args: list, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db")
    env.pop("RAYSEMI_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def call(main, args: list, capsys) -> tuple[int, str]:
    """`main` through run_cli in-process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        rc = run_cli(main, [str(a) for a in args])
    except SystemExit as exit_:  # argparse errors exit from inside main
        rc = exit_.code
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, stderr: str, *needles: str) -> str:
    """Exit 2 and exactly one non-blank `error:` line holding every needle (argparse's errors too).
    Returns the error line."""
    assert "Traceback" not in stderr, stderr
    assert rc == 2, f"exit code {rc}, stderr:\n{stderr}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[-1]
    assert line.startswith("error:"), stderr
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def seeded_output(tmp_path: Path) -> Path:
    """A run folder that already holds a user's file (the runs below pass --overwrite)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text(KEEP)
    return out


def assert_untouched(out: Path) -> None:
    """The seeded run folder still holds exactly the user's file, unchanged: nothing half-written."""
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == KEEP


def assert_no_run_folder(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), f"half-written run folder: {list(out.iterdir())}"


def running_runs(db: Path) -> int:
    """MLflow runs left in state RUNNING (a run started for a job that then refused to train)."""
    if not db.is_file():
        return 0
    with sqlite3.connect(db) as con:
        try:
            return con.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
        except sqlite3.OperationalError:  # no tables yet
            return 0


def rewrite_h5(path: Path, drop: str | None = None, **change) -> Path:
    """Rewrite an HDF5 case file with dataset `drop` removed and datasets replaced by
    `change[name](old_array)`; attributes (spacing) are kept."""
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f}
        attrs = dict(f.attrs)
    if drop:
        del data[drop]
    for name, fn in change.items():
        data[name] = fn(data[name])
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


def _list(root: Path, split: str) -> list[str]:
    return [s for s in (root / f"{split}.list").read_text().split() if s]


def labeled_slice(root: Path) -> Path:
    """A slice of the first patient of train_slices.list: labeled under --labeled-patients 2."""
    return root / "data" / "slices" / f"{_list(root, 'train_slices')[0]}.h5"


def unlabeled_slice(root: Path) -> Path:
    return root / "data" / "slices" / f"{_list(root, 'train_slices')[-1]}.h5"


def val_volume(root: Path) -> Path:
    return root / "data" / f"{_list(root, 'val')[0]}.h5"


def _with(fn):
    def edit(a):
        a = a.copy()
        fn(a)
        return a
    return edit


def _set_first(value):
    return _with(lambda a: a.__setitem__((0,) * a.ndim, value))


@pytest.fixture
def data_copy(tiny_phantom, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_phantom, tmp_path / "data"))


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> Path:
    """One sqlite store shared by the in-process runs, created up front so that MLflow's one-off
    'creating tables' log lines do not land in a case's stderr."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def in_process(monkeypatch, tmp_path, mlflow_db) -> Path:
    """Environment of an in-process CLI call: MLflow to the shared store, cwd in tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_db}")
    monkeypatch.delenv("RAYSEMI_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    return mlflow_db


@pytest.fixture(scope="module")
def trained_run(tiny_phantom, tmp_path_factory) -> Path:
    """A real 2-iteration run folder (best.pt, last.pt, config.yaml) for the checkpoint cases.

    It doubles as a control: one unlabeled slice of its data lacks `label`, which is allowed
    (only the labeled patients' slices need one)."""
    from raysemi.train import main

    base = tmp_path_factory.mktemp("trained")
    data = Path(shutil.copytree(tiny_phantom, base / "data"))
    rewrite_h5(unlabeled_slice(data), drop="label")
    out = base / "run"
    assert run_cli(main, train_args(data, out, "--no-mlflow")) == 0
    return out


# ---- true subprocess runs --------------------------------------------------------------------------
def test_missing_data_folder_subprocess(tmp_path):
    out = tmp_path / "run"
    r = run_module("raysemi.train", train_args("/nonexistent", out), tmp_path)
    assert_one_line_error(r.returncode, r.stderr, "/nonexistent", "data folder not found")
    assert_no_run_folder(out)
    assert running_runs(tmp_path / "mlflow.db") == 0


def test_missing_list_file_subprocess(data_copy, tmp_path):
    (data_copy / "val.list").unlink()
    out = tmp_path / "run"
    r = run_module("raysemi.train", train_args(data_copy, out), tmp_path)
    assert_one_line_error(r.returncode, r.stderr, str(data_copy / "val.list"), "not found")
    assert_no_run_folder(out)
    assert running_runs(tmp_path / "mlflow.db") == 0


def test_output_folder_with_other_content_is_refused_subprocess(tiny_phantom, tmp_path):
    out = seeded_output(tmp_path)
    r = run_module("raysemi.train", train_args(tiny_phantom, out), tmp_path)  # no --overwrite
    assert_one_line_error(r.returncode, r.stderr, str(out), "not empty")
    assert_untouched(out)


def test_yaml_unknown_key_subprocess(tiny_phantom, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("batch_sise: 8\n")
    out = tmp_path / "run"
    r = run_module("raysemi.train", ["--config", cfg, *train_args(tiny_phantom, out)], tmp_path)
    line = assert_one_line_error(r.returncode, r.stderr, str(cfg), "batch_sise", "unknown")
    assert "batch_size" in line  # the suggestion
    assert_no_run_folder(out)


def test_tracking_server_not_answering_fails_fast_subprocess(tiny_phantom, tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    r = run_module("raysemi.train", train_args(tiny_phantom, out, "--tracking-uri", "http://127.0.0.1:9"),
                   tmp_path)
    seconds = time.perf_counter() - start
    assert_one_line_error(r.returncode, r.stderr, "tracking_uri", "http://127.0.0.1:9")
    assert not out.exists(), "the tracking store must be checked before the run folder is made"
    assert seconds < 30, f"took {seconds:.0f}s; expected a fast failure before any training"


def test_evaluate_random_bytes_subprocess(tiny_phantom, tmp_path):
    ckpt = tmp_path / "random.pt"
    ckpt.write_bytes(random.Random(0).randbytes(4096))
    csv = tmp_path / "results.csv"
    csv.write_text(KEEP)
    r = run_module("raysemi.evaluate", ["--checkpoint", ckpt, "--data", tiny_phantom, "--split", "val",
                                        "--device", "cpu", "--out", csv], tmp_path)
    assert_one_line_error(r.returncode, r.stderr, str(ckpt), "not a raysemi checkpoint")
    assert csv.read_text() == KEEP


def test_phantom_refuses_folder_with_other_content_subprocess(tmp_path):
    out = seeded_output(tmp_path)
    r = run_module("raysemi.data", ["phantom", "--out", out, "--patients", "3", "--size", "32", "32"], tmp_path)
    assert_one_line_error(r.returncode, r.stderr, str(out), "not empty")
    assert_untouched(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")], "temp folder left behind"


def test_unknown_command_is_named_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "raysemi", "trian", "--method", "mt"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert_one_line_error(r.returncode, r.stderr, "'trian' is not a raysemi command",
                          "expected one of search, train, evaluate, predict, data")


def test_debug_shows_the_traceback_subprocess(tmp_path):
    r = run_module("raysemi.train", train_args("/nonexistent", tmp_path / "run", "--debug"), tmp_path)
    assert r.returncode == 2  # the same outcome for scripts, with or without --debug
    assert "Traceback" in r.stderr
    assert "UserError" in r.stderr and "/nonexistent" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: /nonexistent")


# ---- training: corrupted data sets (in-process) ----------------------------------------------------
DATA_CASES = [
    # id, corrupt(root) -> the file the message must name, needles
    case("missing_slice_file", lambda r: (unlabeled_slice(r).unlink(), unlabeled_slice(r))[1],
         ["listed in train_slices.list", "missing"]),
    case("labeled_slice_without_image", lambda r: rewrite_h5(labeled_slice(r), drop="image"), ["image", "missing"]),
    case("labeled_slice_without_label", lambda r: rewrite_h5(labeled_slice(r), drop="label"), ["label", "missing"]),
    case("val_volume_without_image", lambda r: rewrite_h5(val_volume(r), drop="image"), ["image", "missing"]),
    case("val_volume_without_label", lambda r: rewrite_h5(val_volume(r), drop="label"), ["label", "missing"]),
    case("labeled_slice_shape_mismatch", lambda r: rewrite_h5(labeled_slice(r), label=lambda a: a[:16]),
         ["label", "(16, 32)", "(32, 32)"]),
    case("val_volume_shape_mismatch", lambda r: rewrite_h5(val_volume(r), label=lambda a: a[:, :, :16]),
         ["label", "32, 16)", "32, 32)"]),
    case("label_value_7", lambda r: rewrite_h5(labeled_slice(r), label=_set_first(7)), ["label", "[7]", "[0, 4)"]),
    case("label_value_negative", lambda r: rewrite_h5(val_volume(r), label=lambda a: (a.astype(np.int16) - 1)),
         ["label", "-1", "[0, 4)"]),
    case("nan_in_labeled_slice", lambda r: rewrite_h5(labeled_slice(r), image=_set_first(np.nan)), ["image", "NaN"]),
    case("inf_in_unlabeled_slice", lambda r: rewrite_h5(unlabeled_slice(r), image=_set_first(np.inf)),
         ["image", "inf"]),
    case("inf_in_val_volume", lambda r: rewrite_h5(val_volume(r), image=_set_first(-np.inf)), ["image", "inf"]),
    case("not_hdf5", lambda r: (labeled_slice(r).write_bytes(b"not hdf5"), labeled_slice(r))[1], ["HDF5"]),
    case("image_of_strings", lambda r: rewrite_h5(labeled_slice(r), image=lambda a: np.full(a.shape, b"abc")),
         ["image", "are not numbers", "expected intensities"]),
    case("label_of_strings", lambda r: rewrite_h5(val_volume(r), label=lambda a: np.full(a.shape, b"rv")),
         ["label", "are not numbers", "expected integer classes in [0, 4)"]),
    case("image_a_group", lambda r: _image_group(labeled_slice(r)), ["image", "is a group, not a dataset"]),
    case("spacing_not_numbers", lambda r: _set_attr(val_volume(r), "spacing", "1.5 mm"),
         ["spacing", "'1.5 mm'", "not numeric"]),
    case("spacing_one_value", lambda r: _set_attr(val_volume(r), "spacing", 1.5),
         ["spacing: (1.5,) is invalid", "expected 3 finite numbers > 0"]),
    case("spacing_zero", lambda r: _set_attr(val_volume(r), "spacing", np.array([10.0, 0.0, 1.5])),
         ["spacing: (10.0, 0.0, 1.5) is invalid"]),
]


def _image_group(path: Path) -> Path:
    with h5py.File(path, "a") as f:
        del f["image"]
        f.create_group("image")
    return path


def _set_attr(path: Path, name: str, value) -> Path:
    with h5py.File(path, "a") as f:
        f.attrs[name] = value
    return path


@pytest.mark.parametrize("corrupt,needles", DATA_CASES)
def test_corrupt_data(corrupt, needles, data_copy, tmp_path, in_process, capsys):
    from raysemi.train import main

    bad_file = corrupt(data_copy)
    out = seeded_output(tmp_path)
    before = running_runs(in_process)
    rc, err = call(main, train_args(data_copy, out, "--overwrite"), capsys)
    assert_one_line_error(rc, err, str(bad_file), *needles)
    assert_untouched(out)
    assert running_runs(in_process) == before


def test_unlabeled_slice_without_label_is_fine(trained_run):
    """Control (the run is made by the `trained_run` fixture): it trained and reported."""
    assert {"config.yaml", "best.pt", "last.pt", "results.json", "train.log"} <= {p.name for p in trained_run.iterdir()}


# ---- training: bad values (in-process) -------------------------------------------------------------
VALUE_CASES = [
    # id, extra flags, needles
    case("labeled_patients_more_than_listed", ["--labeled-patients", "99"],
         ["train_slices.list", "labeled_patients: 99"]),
    case("labeled_patients_zero", ["--labeled-patients", "0"], ["--labeled-patients: 0 is invalid"]),
    case("labeled_bs_not_below_batch_size", ["--method", "mean_teacher", "--batch-size", "4", "--labeled-bs", "4"],
         ["--labeled-bs: 4 is invalid", "batch_size (4)"]),
    case("unknown_method", ["--method", "fixmatch"], ["--method: 'fixmatch' is invalid", "mean_teacher (mt)"]),
    case("ema_decay_one", ["--method", "mean_teacher", "--ema-decay", "1.0"], ["--ema-decay: 1.0 is invalid", "[0, 1)"]),
    case("ema_decay_negative", ["--method", "mean_teacher", "--ema-decay", "-0.1"], ["--ema-decay: -0.1 is invalid"]),
    case("consistency_negative", ["--method", "mean_teacher", "--consistency", "-1"], ["consistency: -1"]),
    case("consistency_rampup_negative", ["--method", "mean_teacher", "--consistency-rampup", "-5"],
         ["--consistency-rampup: -5.0 is invalid"]),
    case("ict_alpha_zero", ["--method", "ict", "--ict-alpha", "0"], ["--ict-alpha: 0.0 is invalid"]),
    case("ict_odd_unlabeled_count", ["--method", "ict", "--batch-size", "5", "--labeled-bs", "2"],
         ["batch_size - labeled_bs = 3", "even"]),
    case("uncertainty_passes_zero", ["--method", "uamt", "--uncertainty-passes", "0"],
         ["--uncertainty-passes: 0 is invalid", "T >= 1"]),
    case("dan_lr_zero", ["--method", "adversarial", "--dan-lr", "0"], ["--dan-lr: 0.0 is invalid"]),
    case("pyramid_consistency_with_unet", ["--method", "pyramid_consistency", "--model", "unet"],
         ["model", "'unet'", "pyramid_consistency", "unet_ds"]),
    case("mean_teacher_with_unet_ds", ["--method", "mean_teacher", "--model", "unet_ds"],
         ["model", "'unet_ds'", "mean_teacher"]),
    case("unknown_model", ["--model", "resnet"], ["--model", "'resnet'"]),
    case("patch_size_not_multiple_of_16", ["--patch-size", "30", "30"], ["--patch-size: (30, 30) is invalid", "multiples of 16"]),
    case("device_cuda_without_cuda", ["--device", "cuda"], ["device", "'cuda'"],
         marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
]


@pytest.mark.parametrize("extra,needles", VALUE_CASES)
def test_bad_value(extra, needles, tiny_phantom, tmp_path, in_process, capsys):
    from raysemi.train import main

    out = seeded_output(tmp_path)
    before = running_runs(in_process)
    rc, err = call(main, train_args(tiny_phantom, out, "--overwrite", *extra), capsys)
    assert_one_line_error(rc, err, *needles)
    assert_untouched(out)
    assert running_runs(in_process) == before, "an MLflow run was started and left RUNNING"


ARGPARSE_CASES = [
    case("unknown_flag", ["--bogus"], ["--bogus"]),
    case("not_an_integer", ["--batch-size", "big"], ["--batch-size", "'big'"]),
]


@pytest.mark.parametrize("extra,needles", ARGPARSE_CASES)
def test_argparse_errors(extra, needles, tiny_phantom, tmp_path, in_process, capsys):
    from raysemi.train import main

    out = seeded_output(tmp_path)
    rc, err = call(main, train_args(tiny_phantom, out, "--overwrite", *extra), capsys)
    assert_one_line_error(rc, err, *needles, "(see: python -m raysemi.train --help)")
    assert_untouched(out)


@pytest.mark.parametrize("module, args", [
    ("raysemi.train", ["--max-iteration", "100"]),
    ("raysemi.search", ["--max-iteration", "100"]),
    ("raysemi.search", ["--num-sample", "8"]),
    ("raysemi.evaluate", ["--checkpoint", "x.pt", "--batch", "8"]),
    ("raysemi.predict", ["--checkpoint", "x.pt", "--input", "in", "--out", "o", "--overwr"]),
])
def test_a_misspelled_flag_is_an_error_not_the_flag_it_starts(module, args, in_process, capsys):
    """argparse takes a flag's prefix for the flag by default: `--max-iteration 100` ran a search
    at the default 30,000 iterations per trial instead of refusing the typo."""
    import importlib

    rc, err = call(importlib.import_module(module).main, args, capsys)
    assert_one_line_error(rc, err, f"unrecognized arguments: {args[-2] if args[-1].isdigit() else args[-1]}")


# ---- training: YAML configs (in-process) -----------------------------------------------------------
@pytest.mark.parametrize("text,needles", [
    ("batch_size: big\n", ["batch_size", "'big'", "integer"]),
    ('batch_size: "big"\n', ["batch_size", "'big'", "integer"]),
    ("base_lr: [0.1]\n", ["base_lr", "[0.1]"]),
    ("patch_size: [32, 32, 32]\n", ["patch_size", "[32, 32, 32]"]),
    ("ema_decay: 1.5\nmethod: mean_teacher\n", ["ema_decay", "1.5"]),
    ("- just\n- a list\n", ["mapping"]),
    ("batch_size: [1\n", ["not valid YAML at line 2, column 1"]),
], ids=["wrong_type", "wrong_type_quoted", "float_as_list", "patch_size_three", "bad_value", "not_a_mapping",
        "not_yaml"])
def test_bad_yaml(text, needles, tiny_phantom, tmp_path, in_process, capsys):
    from raysemi.train import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    out = seeded_output(tmp_path)
    rc, err = call(main, ["--config", cfg, *train_args(tiny_phantom, out, "--overwrite")], capsys)
    assert_one_line_error(rc, err, str(cfg), *needles)
    assert_untouched(out)


def test_missing_yaml_file(tiny_phantom, tmp_path, in_process, capsys):
    from raysemi.train import main

    cfg = tmp_path / "nope.yaml"
    rc, err = call(main, ["--config", cfg, *train_args(tiny_phantom, tmp_path / "run")], capsys)
    assert_one_line_error(rc, err, str(cfg), "not found")
    assert_no_run_folder(tmp_path / "run")


def test_config_or_data_of_the_wrong_kind(tiny_phantom, tmp_path, in_process, capsys):
    """A folder given as --config, a file as --data: said so, not 'not found'."""
    from raysemi.train import main

    rc, err = call(main, ["--config", tmp_path, *train_args(tiny_phantom, tmp_path / "run")], capsys)
    assert_one_line_error(rc, err, str(tmp_path), "config file is a folder; expected a YAML file")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("method: mean_teacher\n")
    rc, err = call(main, train_args(cfg, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, str(cfg), "is not a folder", "SSL4MIS ACDC layout")
    assert_no_run_folder(tmp_path / "run")


def test_yaml_alias_key_is_accepted(tiny_phantom, tmp_path, in_process, capsys):
    """Control: the reference's `DAN_lr` spelling is a config key; the run trains and logs."""
    from raysemi.train import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("method: adversarial\nDAN_lr: 0.001\n")
    out = tmp_path / "run"
    before = running_runs(in_process)
    rc, err = call(main, ["--config", cfg, *train_args(tiny_phantom, out)], capsys)
    assert rc == 0, err
    assert "error" not in err.lower() and "Traceback" not in err
    saved = (out / "config.yaml").read_text()
    assert "dan_lr: 0.001" in saved and "method: adversarial" in saved
    assert (out / "results.json").is_file()
    assert running_runs(in_process) == before
    with sqlite3.connect(in_process) as con:
        assert con.execute("SELECT status FROM runs WHERE name = ?", (out.name,)).fetchall()[-1] == ("FINISHED",)


def test_resume_from_a_non_checkpoint_keeps_the_run_folder(trained_run, tmp_path, in_process, capsys):
    """--resume with a bad file must not rewrite the run it was meant to continue."""
    from raysemi.train import main

    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    before = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}  # overlays/ too
    bad = tmp_path / "random.pt"
    bad.write_bytes(random.Random(1).randbytes(4096))
    config = Path(trained_run / "config.yaml").read_text()
    data = next(line.split(": ", 1)[1] for line in config.splitlines() if line.startswith("data:"))
    rc, err = call(main, train_args(data, run, "--resume", bad, "--max-iterations", "4", "--no-mlflow"), capsys)
    assert_one_line_error(rc, err, str(bad), "not a raysemi checkpoint")
    after = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files of the run folder changed by a refused --resume: {changed}"


# ---- evaluate: checkpoints that are not (or do not fit) raysemi checkpoints (in-process) ------------
def _plain_dict(path: Path, trained: Path) -> None:
    torch.save({"config": {}, "networks": {}, "weights": torch.zeros(3)}, path)


def _num_classes_3(path: Path, trained: Path) -> None:
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    ckpt["config"]["num_classes"] = 3
    torch.save(ckpt, path)


def _drop_state_key(path: Path, trained: Path) -> None:
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    state = ckpt["networks"]["student"]
    del state[next(iter(state))]
    torch.save(ckpt, path)


def _unknown_model(path: Path, trained: Path) -> None:
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    ckpt["model"] = "resnet"
    torch.save(ckpt, path)


def _truncated(path: Path, trained: Path) -> None:
    path.write_bytes((trained / "best.pt").read_bytes()[:100_000])


def _empty_file(path: Path, trained: Path) -> None:
    path.write_bytes(b"")


EVAL_CASES = [
    case("plain_torch_dict", _plain_dict, ["format", "not a raysemi checkpoint"]),
    case("num_classes_3", _num_classes_3, ["networks.student", "does not match", "head"]),
    case("state_dict_key_dropped", _drop_state_key, ["networks.student", "does not match", "Missing key"]),
    case("unknown_model_name", _unknown_model, ["model", "'resnet'"]),
    case("empty_file", _empty_file, ["not a raysemi checkpoint"]),
    case("truncated_checkpoint", _truncated, ["not a raysemi checkpoint"]),
    case("missing_file", None, ["not found"]),
]


@pytest.mark.parametrize("make,needles", EVAL_CASES)
def test_evaluate_bad_checkpoint(make, needles, trained_run, tiny_phantom, tmp_path, in_process, capsys):
    from raysemi.evaluate import main

    ckpt = tmp_path / "bad.pt"
    if make is not None:
        make(ckpt, trained_run)
    csv = tmp_path / "results.csv"
    csv.write_text(KEEP)
    rc, err = call(main, ["--checkpoint", ckpt, "--data", tiny_phantom, "--split", "val", "--device", "cpu",
                          "--out", csv], capsys)
    assert_one_line_error(rc, err, str(ckpt), *needles)
    assert csv.read_text() == KEEP
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad.pt", "results.csv"][make is None:])


def test_evaluate_good_checkpoint_on_corrupt_data(trained_run, data_copy, tmp_path, in_process, capsys):
    from raysemi.evaluate import main

    bad = rewrite_h5(val_volume(data_copy), label=_set_first(9))
    csv = tmp_path / "results.csv"
    csv.write_text(KEEP)
    rc, err = call(main, ["--checkpoint", trained_run / "best.pt", "--data", data_copy, "--split", "val",
                          "--device", "cpu", "--out", csv], capsys)
    assert_one_line_error(rc, err, str(bad), "label", "[9]")
    assert csv.read_text() == KEEP


def test_evaluate_misspelled_split_names_the_lists_there(trained_run, tiny_phantom, tmp_path, in_process, capsys):
    from raysemi.evaluate import main

    rc, err = call(main, ["--checkpoint", trained_run / "best.pt", "--data", tiny_phantom, "--split", "tset",
                          "--device", "cpu", "--out", tmp_path / "r.csv"], capsys)
    assert_one_line_error(rc, err, "tset.list", "list file not found", "test, train, train_slices, val")
    assert not (tmp_path / "r.csv").exists()


def test_evaluate_on_data_without_that_split_says_which_splits_have_volumes(trained_run, data_copy, tmp_path,
                                                                          in_process, capsys):
    # `data import --test-fraction 0` writes an empty test.list
    from raysemi.evaluate import main

    (data_copy / "test.list").write_text("\n")
    rc, err = call(main, ["--checkpoint", trained_run / "best.pt", "--data", data_copy, "--device", "cpu",
                          "--out", tmp_path / "r.csv"], capsys)
    assert_one_line_error(rc, err, f"--split: test: {data_copy / 'test.list'} is empty, so the data has no test "
                                   "volumes; expected a split that has some (--split val or --split train)")
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("where, needles", [
    ("adir", ["--out:", "adir is a folder; expected a file path"]),
    ("afile/r.csv", ["--out:", "afile is a file; expected a folder there"]),
])
def test_evaluate_refuses_an_out_it_cannot_write_before_evaluating(where, needles, trained_run, tiny_phantom, tmp_path,
                                                                    in_process, capsys):
    """Found after a whole evaluation, this was a traceback that left a temp file beside --out."""
    from raysemi.evaluate import main

    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text(KEEP)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc, err = call(main, ["--checkpoint", trained_run / "best.pt", "--data", tiny_phantom, "--split", "val",
                          "--device", "cpu", "--out", tmp_path / where], capsys)
    assert_one_line_error(rc, err, *needles)
    assert "val volumes" not in err and sorted(p.name for p in tmp_path.rglob("*")) == before


# ---- phantom CLI (in-process) ----------------------------------------------------------------------
def test_phantom_overwrite_refuses_a_folder_that_is_not_a_phantom(tmp_path, in_process, capsys):
    from raysemi.data.__main__ import main

    out = seeded_output(tmp_path)
    rc, err = call(main, ["phantom", "--out", out, "--patients", "3", "--size", "32", "32", "--overwrite"], capsys)
    assert_one_line_error(rc, err, str(out), "refusing")
    assert_untouched(out)


def test_phantom_out_that_is_a_file(tmp_path, in_process, capsys):
    from raysemi.data.__main__ import main

    out = tmp_path / "x.nii.gz"
    out.write_text(KEEP)
    rc, err = call(main, ["phantom", "--out", out, "--patients", "3", "--size", "32", "32"], capsys)
    assert_one_line_error(rc, err, str(out), "--out exists and is not a folder")
    assert out.read_text() == KEEP


@pytest.mark.parametrize("args,needles", [
    (["--patients", "2"], ["patients", "2"]),
    (["--size", "16", "16"], ["size", "(16, 16)"]),
], ids=["too_few_patients", "too_small"])
def test_phantom_bad_values(args, needles, tmp_path, in_process, capsys):
    from raysemi.data.__main__ import main

    out = tmp_path / "ph"
    rc, err = call(main, ["phantom", "--out", out, *args], capsys)
    assert_one_line_error(rc, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("module", ["raysemi.train", "raysemi.search", "raysemi.evaluate", "raysemi.predict",
                                    "raysemi.data"])
def test_help_states_each_default_once(module):
    import importlib

    parser = importlib.import_module(module if module != "raysemi.data" else "raysemi.data.__main__").build_parser()
    helps = [parser.format_help()] + [sub.format_help() for action in parser._actions
                                      if isinstance(action, argparse._SubParsersAction)
                                      for sub in action.choices.values()]
    for text in helps:
        flat = " ".join(text.split())
        assert "(default: None)" not in flat, module
        assert not re.search(r"\(default:[^()]*\) \(default:", flat), module  # no flag says its default twice
    assert "(default: test)" in " ".join(helps[0].split()) if module == "raysemi.evaluate" else True
    assert "--fault-nan-at" not in helps[0] and "config: testing" not in helps[0]  # the test suite's fault switch stays out of sight


# ---- benchmark scripts (in-process) ----------------------------------------------------------------
BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
BENCHMARK_SCRIPTS = ("throughput", "trajectory", "search_wall", "strategies", "validation_metrics",
                     "graph_capture_matrix")
# tiny settings first, the case's flags after them (the last of a repeated flag wins): a check that
# stopped refusing would run seconds of work and then fail the test, not minutes at full size
TINY_BENCH = {
    "throughput": ["--device", "cpu", "--size", "32", "--batch-size", "4", "--methods", "mt", "--labeled-patients", "2",
                   "--warmup", "0", "--iterations", "1", "--repeats", "1"],
    "trajectory": ["--device", "cpu", "--size", "32", "--batch-size", "4", "--methods", "mt", "--labeled-patients", "2",
                   "--iterations", "2", "--points", "1", "--seeds", "1", "--reference-workers", "0"],
    "search_wall": ["--device", "cpu", "--size", "32", "--batch-size", "4", "--labeled-patients", "2", "--trials", "1",
                    "--iterations", "2", "--grace-period", "1", "--eval-interval", "1", "--cpus-per-trial", "1"],
    "strategies": ["--device", "cpu", "--patch-size", "32", "32", "--batch-size", "4", "--methods", "supervised",
                   "--labeled-patients", "2", "--iterations", "2", "--eval-interval", "2", "--seeds", "1"],
    "validation_metrics": ["--repeats", "1", "--skip-medpy", "--speckles", "0", "--threads", "1"],
    "graph_capture_matrix": ["--size", "32", "--batch-size", "4", "--methods", "mt"],
}


def benchmark_main(script: str):
    """The script's `main`, imported as `python benchmarks/<script>.py` would run it (its folder on the path)."""
    import importlib

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(script).main


def trajectory_json(path: Path, **over) -> Path:
    """A saved trajectory run as the script writes it: mean teacher, both pipelines, 2 seeds, 2 points."""
    rows = [{"method": "mean_teacher", "pipeline": pipe, "curves": [[0.5, 0.8], [0.6, 0.9]], "mean": [0.55, 0.85],
             "std": [0.05, 0.05], "set": {}} for pipe in ("ours", "reference")]
    report = {"args": {"size": 32, "batch_size": 4, "labeled_patients": 2, "iterations": 4, "points": 2, "seeds": 2},
              "iterations": [2, 4], "rows": rows, **over}
    path.write_text(json.dumps(report))
    return path


@pytest.mark.parametrize("script,args,needles", [
    case("throughput_unknown_method", "throughput", ["--methods", "mt,foo"], ["--methods", "'foo'", "known:"]),
    case("throughput_empty_methods", "throughput", ["--methods", ","], ["--methods", "','", "names no strategy"]),
    case("throughput_no_iterations", "throughput", ["--iterations", "0"], ["--iterations", "0", ">= 1"]),
    case("throughput_no_repeats", "throughput", ["--repeats", "0"], ["--repeats", "0", ">= 1"]),
    case("throughput_negative_packed", "throughput", ["--packed", "-1"], ["--packed", "-1", ">= 0"]),
    case("throughput_size", "throughput", ["--size", "40"], ["--size", "40", "multiple of 16"]),
    case("throughput_batch", "throughput", ["--batch-size", "1"], ["--batch-size", "1", ">= 2"]),
    case("throughput_device", "throughput", ["--device", "gpu0"], ["--device", "'gpu0'", "'cuda:N'"]),
    case("throughput_missing_data", "throughput", ["--data", "{tmp}/nowhere"], ["nowhere", "data folder not found"]),
    case("throughput_packed_missing_data", "throughput", ["--packed", "2", "--data", "{tmp}/nowhere"],
         ["nowhere", "data folder not found"]),
    case("throughput_bad_set", "throughput", ["--set", "speed=11"], ["--set", "'speed=11'", "config field"]),
    case("throughput_set_what_it_sets", "throughput", ["--set", "batch_size=8"],
         ["--set", "batch_size", "--batch-size", "set by this script"]),
    case("throughput_set_what_it_times", "throughput", ["--set", "max_iterations=5"],
         ["--set", "max_iterations", "--warmup/--iterations"]),
    case("throughput_compare_other_data", "throughput", ["--compare-set", "labeled_patients=3"],
         ["--compare-set", "labeled_patients", "not timed by an A/B"]),
    case("throughput_not_a_number", "throughput", ["--warmup", "some"], ["--warmup", "'some'"]),
    case("throughput_out_is_a_folder", "throughput", ["--out", "{tmp}"], ["--out", "is a folder"]),
    case("trajectory_no_points", "trajectory", ["--points", "0"], ["--points", "0", ">= 1"]),
    case("trajectory_no_seeds", "trajectory", ["--seeds", "0"], ["--seeds", "0", ">= 1"]),
    case("trajectory_points_not_dividing", "trajectory", ["--iterations", "10", "--points", "3"],
         ["--points", "3", "divisor of --iterations (10)"]),
    case("trajectory_pipeline", "trajectory", ["--pipelines", "ours,refx"], ["--pipelines", "'ours,refx'", "'reference'"]),
    case("trajectory_device", "trajectory", ["--device", "gpu0"], ["--device", "'gpu0'"]),
    case("trajectory_reference_alone", "trajectory", ["--reference-from", "r.json"], ["--reference-from", "--from-json"]),
    case("trajectory_missing_json", "trajectory", ["--from-json", "{tmp}/gone.json"], ["--from-json", "gone.json"]),
    case("trajectory_trains_nothing_from_json", "trajectory", ["--from-json", "{tmp}/r.json"],
         ["--methods", "given with --from-json", "trains nothing"]),
    case("trajectory_unknown_method", "trajectory", ["--methods", "meanteacher"], ["--methods", "'meanteacher'"]),
    case("trajectory_set_what_it_sets", "trajectory", ["--set", "eval_interval=1"],
         ["--set", "eval_interval", "set by this script"]),
    case("trajectory_device_before_data", "trajectory", ["--device", "gpu0", "--data", "{tmp}/nowhere"],
         ["--device", "'gpu0'"]),
    case("search_wall_graphs_on_cpu", "search_wall", ["--cuda-graphs", "on"], ["--cuda-graphs", "--device cpu"]),
    case("search_wall_no_trials", "search_wall", ["--trials", "0"], ["--trials", "0", ">= 1"]),
    case("search_wall_factor", "search_wall", ["--reduction-factor", "1"], ["--reduction-factor", "1", "> 1"]),
    case("search_wall_gpu_share", "search_wall", ["--gpus-per-trial", "0"], ["--gpus-per-trial", "0", "> 0"]),
    case("search_wall_gpu_share_over_one", "search_wall", ["--device", "cuda", "--gpus-per-trial", "2"],
         ["--gpus-per-trial", "2", "at most 1"]),
    case("search_wall_grace", "search_wall", ["--grace-period", "3"], ["--grace-period", "3", "at most --iterations (2)"]),
    case("search_wall_rate", "search_wall", ["--packed-rate", "-3"], ["--packed-rate", "-3", "> 0"]),
    case("search_wall_size", "search_wall", ["--size", "20"], ["--size", "20", "multiple of 16"]),
    case("search_wall_scale", "search_wall", ["--scale", "2"], ["--scale", "2", "(0, 1]"]),
    case("search_wall_missing_data", "search_wall", ["--data", "{tmp}/nowhere"], ["nowhere", "data folder not found"]),
    case("search_wall_missing_json", "search_wall", ["--from-json", "{tmp}/gone.json"], ["--from-json", "gone.json"]),
    case("strategies_unknown_method", "strategies", ["--methods", "foo"], ["--methods", "'foo'"]),
    case("strategies_patch", "strategies", ["--patch-size", "64", "40"], ["--patch-size", "40", "multiple of 16"]),
    case("strategies_no_seeds", "strategies", ["--seeds", "0"], ["--seeds", "0", ">= 1"]),
    case("strategies_device", "strategies", ["--device", "gpu0"], ["--device", "'gpu0'"]),
    case("validation_metrics_no_data", "validation_metrics", [], ["--data", "required"]),
    case("validation_metrics_threads", "validation_metrics", ["--data", "phantom", "--threads", "2,0"],
         ["--threads", "'0'", ">= 1"]),
    case("validation_metrics_speckles", "validation_metrics", ["--data", "phantom", "--speckles", "0,2"],
         ["--speckles", "'2'", "[0, 1)"]),
    case("validation_metrics_missing_data", "validation_metrics", ["--data", "{tmp}/nowhere"],
         ["nowhere", "data folder not found"]),
    case("graph_capture_matrix_method", "graph_capture_matrix", ["--methods", "foo"], ["--methods", "'foo'"]),
])
def test_benchmark_bad_values(script, args, needles, tmp_path, in_process, capsys):
    """The benchmarks are CLIs too: a bad flag or value is one line naming it, exit 2, nothing written
    (not even --out's folder)."""
    out = tmp_path / "new" / "result.json"
    args = [*TINY_BENCH[script], *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    if script != "graph_capture_matrix" and "--out" not in args:
        args += ["--out", out]
    rc, err = call(benchmark_main(script), args, capsys)
    assert_one_line_error(rc, err, *needles)
    assert not out.parent.exists()


def test_search_wall_passes_on_what_the_search_refuses_and_keeps_no_log(tiny_phantom, tmp_path, in_process, capsys):
    # a limit only the search knows (the data's patient count): its one error line comes back as
    # this script's, and the log and the folders made for it are gone
    out = tmp_path / "new" / "result.json"
    rc, err = call(benchmark_main("search_wall"), [*TINY_BENCH["search_wall"], "--data", tiny_phantom,
                                                   "--labeled-patients", "99", "--num-cpus", "1", "--out", out], capsys)
    assert_one_line_error(rc, err, "the search refused its settings", "labeled_patients: 99")
    assert not out.parent.exists()


def test_throughput_packed_passes_on_what_the_search_refuses(tiny_phantom, tmp_path, in_process, capsys):
    out = tmp_path / "new" / "result.json"
    rc, err = call(benchmark_main("throughput"), [*TINY_BENCH["throughput"], "--packed", "2", "--packed-iterations", "2",
                                                  "--packed-eval-interval", "1", "--packed-cpus-per-trial", "1",
                                                  "--data", tiny_phantom, "--labeled-patients", "99", "--out", out],
                   capsys)
    assert_one_line_error(rc, err, "the search refused its settings", "labeled_patients: 99")
    assert not out.parent.exists()


def test_search_wall_on_cuda_without_cuda_says_so(tmp_path, in_process, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "new" / "result.json"
    rc, err = call(benchmark_main("search_wall"), [*TINY_BENCH["search_wall"], "--device", "cuda", "--out", out], capsys)
    assert_one_line_error(rc, err, "--device: cuda", "no CUDA device")
    assert not out.parent.exists()


@pytest.mark.parametrize("saved,needles", [
    case("not_json", "{", ["cannot be read as JSON"]),
    case("no_rows", {"rows": []}, ["rows: []"]),
    case("short_curves", {"iterations": [2, 4, 6]}, ["rows[0]", "one Dice per iteration of [2, 4, 6]"]),
    case("no_args", {"args": None}, ["args: missing"]),
    case("text_in_means", {"rows": [{"method": "mean_teacher", "pipeline": "ours", "curves": [[0.5, 0.8]],
                                     "mean": [0.5, "x"], "std": [0, 0]}]}, ["rows[0]", "mean and std"]),
    case("not_a_row", {"rows": [{"method": "mean_teacher"}]}, ["rows[0]: not a row"]),
])
def test_trajectory_refuses_a_json_it_did_not_write(saved, needles, tmp_path, in_process, capsys):
    path = tmp_path / "saved.json"
    if isinstance(saved, str):
        path.write_text(saved)
    else:
        trajectory_json(path, **saved)
    rc, err = call(benchmark_main("trajectory"), ["--from-json", path, "--out", tmp_path / "new" / "r.json"], capsys)
    assert_one_line_error(rc, err, "--from-json", str(path), *needles)
    assert not (tmp_path / "new").exists()


def test_trajectory_reference_from_must_hold_what_it_replaces(tmp_path, in_process, capsys):
    ours = trajectory_json(tmp_path / "ours.json")
    ours.write_text(json.dumps({**json.loads(ours.read_text()), "rows": json.loads(ours.read_text())["rows"][:1]}))
    main = benchmark_main("trajectory")
    # another strategy's reference rows: nothing to compare with, said instead of a silent table
    other = trajectory_json(tmp_path / "other.json")
    other.write_text(other.read_text().replace("mean_teacher", "adversarial"))
    rc, err = call(main, ["--from-json", ours, "--reference-from", other], capsys)
    assert_one_line_error(rc, err, "--reference-from", "no reference rows for mean_teacher")
    # other validation points
    shifted = trajectory_json(tmp_path / "shifted.json", iterations=[3, 4])
    rc, err = call(main, ["--from-json", ours, "--reference-from", shifted], capsys)
    assert_one_line_error(rc, err, "--reference-from", "iterations [2, 4] against [3, 4]")
    # its own file as --out would lose its reference rows
    both = trajectory_json(tmp_path / "both.json")
    before = both.read_text()
    rc, err = call(main, ["--from-json", both, "--reference-from", trajectory_json(tmp_path / "r.json"), "--out", both],
                   capsys)
    assert_one_line_error(rc, err, "--out", "the file given to --from-json")
    assert both.read_text() == before
    rc, err = call(main, ["--from-json", trajectory_json(tmp_path / "o.json"), "--reference-from", both, "--out", both],
                   capsys)
    assert_one_line_error(rc, err, "--out", "the file given to --reference-from")
    assert both.read_text() == before


def test_benchmark_without_cuda_says_so(in_process, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the matrix would run")
    rc, err = call(benchmark_main("graph_capture_matrix"), TINY_BENCH["graph_capture_matrix"], capsys)
    assert_one_line_error(rc, err, "no CUDA device", "CUDA-graph captures")


def test_benchmark_debug_shows_the_traceback(tmp_path, in_process, capsys):
    rc, err = call(benchmark_main("trajectory"), ["--seeds", "0", "--debug", "--out", tmp_path / "r.json"], capsys)
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --seeds: 0")


@pytest.mark.parametrize("script", BENCHMARK_SCRIPTS)
def test_benchmark_help_explains_every_flag(script, capsys):
    """`--help` runs and shows the script's docstring (its example commands); every flag says what it
    is for, and its default once."""
    with pytest.raises(SystemExit) as exit_:
        benchmark_main(script)(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(sys.modules[script].__doc__.split()[:12]) in text
    parser = sys.modules[script].build_parser()
    undocumented = [a.option_strings[0] for a in parser._actions if not (a.help or "").strip()]
    assert not undocumented, f"{script}: no help for {undocumented}"
    sized = [a for a in parser._actions if isinstance(a.default, int) and not isinstance(a.default, bool)]
    assert all(f"(default: {a.default})" in text for a in sized)  # the defaults are shown
    assert "(default: None)" not in text and not re.search(r"\(default:[^()]*\) \(default:", text)


def test_benchmark_json_that_cannot_be_written_is_one_line(tmp_path):
    # --out passed its check, then its folder could not be made (here a file stands where it goes):
    # the work's result is lost, so say which file and why, in one line
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_cli
    finally:
        sys.path.remove(str(BENCHMARKS))
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(UserError, match=r"^--out: .*taken/r\.json: cannot be written \(.+\); expected a file path"):
        bench_cli.write_json(tmp_path / "taken" / "r.json", {"rows": []})
    assert bench_cli.write_json(tmp_path / "new" / "r.json", {"rows": []}).read_text() == '{\n "rows": []\n}'
