"""`python -m raysemi.data prepare-acdc` and `import`: tiny raw trees written here with SimpleITK and
Pillow, converted through the CLI's `main`, read back with the layout reader; every bad input is one
`error:` line, exit code 2, and leaves no output folder (nor a temporary one) behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from raysemi.data import load_dataset, read_list, shipped_list
from raysemi.data.__main__ import main
from raysemi.data.convert import dataset_files
from raysemi.errors import UserError, run_cli

SPACING_XYZ = (1.5, 1.25, 10.0)  # as SimpleITK takes it; the h5 holds (z, y, x)
KEEP = "precious user data\n"


# ---- helpers ---------------------------------------------------------------------------------------
def call(args: list, capsys) -> tuple[int, str, str]:
    """`main` through run_cli in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = run_cli(main, [str(a) for a in args])
    except SystemExit as exit_:  # argparse errors exit from inside main
        rc = exit_.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_error(rc: int, err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_written(tmp_path: Path, *keep: str) -> None:
    """Only the inputs are left in tmp_path: no output folder, no temporary folder beside it."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def write_nifti(path: Path, array: np.ndarray, spacing=SPACING_XYZ, origin=None, direction=None) -> None:
    if array.ndim == 4:  # a cine series (t, z, y, x)
        img = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in array])
    else:
        img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing[:img.GetDimension()])
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def volume(rng, depth: int, size=(16, 16)) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(-100, 1000, (depth, *size)).astype(np.int16)
    label = rng.integers(0, 4, (depth, *size)).astype(np.uint8)
    return image, label


def minmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


# patient -> (ED frame, ES frame, slices): patient090's ED is frame 4 in the real release; patient099
# has 16 slices (slice_10 sorts before slice_2 as a string); patient038 has 5 where the SSL4MIS list
# names 8, so it gets a note and its own numbering
ACDC = {"patient099": (1, 12, 16), "patient038": (1, 9, 5), "patient090": (4, 11, 7),  # train
        "patient028": (1, 10, 3),  # val
        "patient011": (1, 8, 4)}  # test


def write_acdc(root: Path, patients=ACDC, seed: int = 0) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """A raw ACDC tree (database/training/patientXXX/...) and a testing patient; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for pid, (ed, es, depth) in patients.items():
        folder = root / "training" / pid
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
        for frame in (ed, es):
            image, label = volume(rng, depth)
            write_nifti(folder / f"{pid}_frame{frame:02d}.nii.gz", image)
            write_nifti(folder / f"{pid}_frame{frame:02d}_gt.nii.gz", label)
            arrays[pid, frame] = image, label
    if "patient099" in patients:  # the cine series beside the frames, which is not read
        write_nifti(root / "training" / "patient099" / "patient099_4d.nii.gz",
                    rng.integers(0, 100, (2, 3, 16, 16)).astype(np.int16), (*SPACING_XYZ, 1.0))
    test = root / "testing" / "patient101"
    test.mkdir(parents=True)
    (test / "Info.cfg").write_text("ED: 1\nES: 7\n")
    for frame in (1, 7):
        write_nifti(test / f"patient101_frame{frame:02d}.nii.gz", volume(rng, 2)[0])
    return arrays


def read_h5(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {**{k: f[k][()] for k in f}, **{f"@{k}": tuple(v) for k, v in f.attrs.items()}}


# ---- prepare-acdc ----------------------------------------------------------------------------------
def test_prepare_acdc_writes_the_ssl4mis_layout(tmp_path, capsys):
    raw = tmp_path / "database"
    arrays = write_acdc(raw)
    out = tmp_path / "ACDC"
    rc, stdout, err = call(["prepare-acdc", "--raw", raw, "--out", out, "--allow-missing"], capsys)
    assert rc == 0, err
    assert "prepare-acdc 5/5" in stdout
    assert "note: patient038_frame01: 5 slices in the raw data, 8 in the SSL4MIS list" in stdout
    assert "--allow-missing: 95 patients" in stdout

    # the lists: the shipped ones, reduced to the cases written, in their order
    present = set(ACDC)
    for split in ("train", "val", "test"):
        assert read_list(out, split) == [c for c in shipped_list(split) if c[:10] in present]
    assert read_list(out, "val") == ["patient028_frame01", "patient028_frame02"]
    slices = read_list(out, "train_slices")
    shipped = [s for s in shipped_list("train_slices") if s[:10] in {"patient099", "patient090"}]
    assert [s for s in slices if not s.startswith("patient038")] == shipped  # the release's own order
    assert [s for s in slices if s.startswith("patient038_frame01")] == [f"patient038_frame01_slice_{k}"
                                                                         for k in range(1, 6)]
    # only what the lists name is written; testing/ (patient101) and the 4D cine are skipped
    cases = {c for split in ("train", "val", "test") for c in read_list(out, split)}
    assert {p.stem for p in (out / "data").glob("*.h5")} == cases
    assert {p.stem for p in (out / "data" / "slices").glob("*.h5")} == set(slices)

    # ED is frame01 and ES frame02 whatever their raw numbers; min-max per volume; spacing (z, y, x)
    for pid, (ed, es, depth) in ACDC.items():
        for slot, frame in ((1, ed), (2, es)):
            image, label = arrays[pid, frame]
            h5 = read_h5(out / "data" / f"{pid}_frame{slot:02d}.h5")
            assert h5["image"].dtype == np.float32 and h5["label"].dtype == np.uint8
            np.testing.assert_allclose(h5["image"], minmax(image), atol=1e-6)
            assert np.array_equal(h5["label"], label)
            assert h5["@spacing"] == (10.0, 1.25, 1.5)
            assert h5["image"].min() == 0 and h5["image"].max() == 1
    per_slice_min = read_h5(out / "data" / "patient099_frame01.h5")["image"].min(axis=(1, 2))
    assert (per_slice_min > 0).any()  # normalised over the volume, not slice by slice

    # slice_k is slice index k - 1, by integer index: slice_10 is z = 9 although it sorts before slice_2
    vol = read_h5(out / "data" / "patient099_frame02.h5")
    for z in (0, 1, 9, 15):
        s = read_h5(out / "data" / "slices" / f"patient099_frame02_slice_{z + 1}.h5")
        assert np.array_equal(s["image"], vol["image"][z]) and np.array_equal(s["label"], vol["label"][z])
    assert np.array_equal(read_h5(out / "data" / "slices" / "patient099_frame02_slice_10.h5")["image"],
                          minmax(arrays["patient099", 12][0])[9])

    data = load_dataset(str(out), 2, 4)
    assert data.train.labeled_patients == ["patient099", "patient038"]
    assert len(data.train.labeled_idx) == 2 * 16 + 2 * 5 and len(data.val) == 2
    assert data.val[0].spacing == (10.0, 1.25, 1.5)


def test_prepare_acdc_refuses_missing_patients_unless_allowed(tmp_path, capsys):
    raw = tmp_path / "database"
    write_acdc(raw)
    rc, _, err = call(["prepare-acdc", "--raw", raw, "--out", tmp_path / "ACDC"], capsys)
    # only patient099 and patient038 are there; the missing ones are named in order
    assert_error(rc, err, str(raw / "training" / "patient001"), "patient folder missing",
                 "and 94 more: patient002, patient003, patient004, patient005, patient006, ...", "--allow-missing")
    assert_nothing_written(tmp_path, "database")


def test_prepare_acdc_needs_train_and_val_patients(tmp_path, capsys):
    raw = tmp_path / "database"
    write_acdc(raw, {"patient099": (1, 12, 2)})
    rc, _, err = call(["prepare-acdc", "--raw", raw, "--out", tmp_path / "ACDC", "--allow-missing"], capsys)
    assert_error(rc, err, "no patient of the val split is present", "patient028")
    assert_nothing_written(tmp_path, "database")


SMALL = {"patient038": (1, 9, 3), "patient028": (1, 10, 2)}


def _replace(path: Path, array=None, spacing=SPACING_XYZ, raw_bytes: bytes | None = None):
    if raw_bytes is not None:
        path.write_bytes(raw_bytes)
    else:
        write_nifti(path, array, spacing)


P = "training/patient028/patient028_frame01"
PREPARE_BAD = {
    "missing_gt": (lambda raw: (raw / f"{P}_gt.nii.gz").unlink(), [f"{P}_gt.nii.gz", "label file missing"]),
    "missing_image": (lambda raw: (raw / f"{P}.nii.gz").unlink(), [f"{P}.nii.gz", "image file missing"]),
    "label_shape": (lambda raw: _replace(raw / f"{P}_gt.nii.gz", np.zeros((2, 16, 15), np.uint8)),
                    [f"{P}_gt.nii.gz", "label shape (2, 16, 15) differs from image", "(2, 16, 16)"]),
    "label_spacing": (lambda raw: _replace(raw / f"{P}_gt.nii.gz", np.zeros((2, 16, 16), np.uint8), (1.5, 1.25, 5.0)),
                      [f"{P}_gt.nii.gz", "label spacing (z, y, x) (5, 1.25, 1.5) mm differs", "(10, 1.25, 1.5)"]),
    "label_origin": (lambda raw: write_nifti(raw / f"{P}_gt.nii.gz", np.zeros((2, 16, 16), np.uint8),
                                             origin=(0, 0, 5.0)),
                     [f"{P}_gt.nii.gz", "label origin (x, y, z) (0, 0, 5) mm differs from image", "(0, 0, 0)",
                      "by 5 mm, more than 1% of its 1.25 mm voxel; expected the same voxel grid",
                      "label.CopyInformation(image)"]),
    "label_values": (lambda raw: _replace(raw / f"{P}_gt.nii.gz", np.full((2, 16, 16), 7, np.uint8)),
                     [f"{P}_gt.nii.gz", "values [7] outside 0..3"]),
    "corrupt_image": (lambda raw: _replace(raw / f"{P}.nii.gz", raw_bytes=b"not a nifti at all"),
                      [f"{P}.nii.gz", "not a readable NIfTI file"]),
    "truncated_label": (lambda raw: _replace(raw / f"{P}_gt.nii.gz",
                                             raw_bytes=(raw / f"{P}_gt.nii.gz").read_bytes()[:60]),
                        [f"{P}_gt.nii.gz", "not a readable NIfTI file"]),
    "4d_frame": (lambda raw: _replace(raw / f"{P}.nii.gz", np.zeros((2, 2, 16, 16), np.int16), (*SPACING_XYZ, 1.0)),
                 [f"{P}.nii.gz", "4D image", "expected a 3D image"]),
    "info_es": (lambda raw: (raw / "training/patient028/Info.cfg").write_text("ED: 1\nES: twelve\n"),
                ["Info.cfg: ES: 'twelve' is not a frame number"]),
}


@pytest.mark.parametrize("case", PREPARE_BAD)
def test_prepare_acdc_bad_input(case, tmp_path, capsys):
    raw = tmp_path / "database"
    write_acdc(raw, SMALL)
    damage, needles = PREPARE_BAD[case]
    damage(raw)
    rc, _, err = call(["prepare-acdc", "--raw", raw, "--out", tmp_path / "ACDC", "--allow-missing"], capsys)
    assert_error(rc, err, *needles)
    assert_nothing_written(tmp_path, "database")


def test_prepare_acdc_bad_raw_folder(tmp_path, capsys):
    rc, _, err = call(["prepare-acdc", "--raw", tmp_path / "nope", "--out", tmp_path / "ACDC"], capsys)
    assert_error(rc, err, str(tmp_path / "nope"), "--raw folder not found", "'database' folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hello")
    (tmp_path / "other" / "training").mkdir()
    rc, _, err = call(["prepare-acdc", "--raw", tmp_path / "other", "--out", tmp_path / "ACDC"], capsys)
    assert_error(rc, err, str(tmp_path / "other"), "not an ACDC database", "training/patient001")
    assert_nothing_written(tmp_path, "other")


def test_prepare_acdc_output_folder_rules(tmp_path, capsys):
    raw = tmp_path / "ACDC_release"
    write_acdc(raw / "database", SMALL)  # --raw may also be the folder holding database/
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text(KEEP)
    (out / "train.list").write_text("mine\n")
    args = ["prepare-acdc", "--raw", raw, "--out", out, "--allow-missing"]
    rc, _, err = call(args, capsys)
    assert_error(rc, err, str(out), "output folder exists and is not empty", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "train.list"]
    assert (out / "train.list").read_text() == "mine\n"

    rc, _, err = call([*args, "--overwrite"], capsys)
    assert rc == 0, err
    assert (out / "keep.txt").read_text() == KEEP  # the user's file stays; ours are replaced
    assert read_list(out, "train") == ["patient038_frame01", "patient038_frame02"]
    assert_nothing_written(tmp_path, "ACDC_release", "out")  # the temporary folder is gone

    rc, _, err = call(["prepare-acdc", "--raw", raw, "--out", out / "keep.txt", "--allow-missing"], capsys)
    assert_error(rc, err, "keep.txt: --out exists and is not a folder")
    # --raw may also be the training/ folder itself: the same dataset
    rc, _, err = call(["prepare-acdc", "--raw", raw / "database" / "training", "--out", tmp_path / "again",
                       "--allow-missing"], capsys)
    assert rc == 0, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").glob("*.list")} == \
        {p.name: p.read_bytes() for p in out.glob("*.list")}


# ---- import ----------------------------------------------------------------------------------------
def write_nifti_set(images: Path, labels: Path, rng) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """7 labeled patients (one with two frames), 3 unlabeled; the label naming rules all used."""
    images.mkdir()
    labels.mkdir()
    cases = {}
    suffixes = ["", "_gt", "_label", "_seg", "_gt", "_gt", "_seg", "_seg"]
    names = ["p01", "p02", "p03", "p04", "p05", "p06", "pat7_frame01", "pat7_frame02"]
    for name, suffix in zip(names, suffixes):
        image, label = volume(rng, int(rng.integers(2, 5)))
        ext = ".nii" if name == "p03" else ".nii.gz"
        write_nifti(images / f"{name}{ext}", image)
        write_nifti(labels / f"{name}{suffix}{ext}", label)
        cases[name] = image, label
    for name in ("u01", "u02", "u03"):
        image = volume(rng, 3)[0]
        write_nifti(images / f"{name}.nii.gz", image)
        cases[name] = image, None
    return cases


def test_import_nifti_labeled_first_and_splits(tmp_path, capsys):
    cases = write_nifti_set(tmp_path / "img", tmp_path / "lab", np.random.default_rng(1))
    out = tmp_path / "mine"
    rc, stdout, err = call(["import", "--images", tmp_path / "img", "--labels", tmp_path / "lab", "--out", out,
                            "--val-fraction", 0.2, "--test-fraction", 0.2, "--seed", 3], capsys)
    assert rc == 0, err
    assert "8 labeled cases, 3 unlabeled" in stdout
    assert "--labeled-patients N, N from 1 to 5" in stdout
    train, val, test = (read_list(out, s) for s in ("train", "val", "test"))
    labeled = {n for n, (_, lab) in cases.items() if lab is not None}
    assert train[-3:] == ["u01", "u02", "u03"] and set(train[:-3]) <= labeled  # labeled first
    assert set(val) <= labeled and set(test) <= labeled and len(val) >= 1 and len(test) >= 1
    assert set(train[:-3]) | set(val) | set(test) == labeled and not set(val) & set(test)
    for split in (train, val, test):  # a patient's frames stay together
        assert ("pat7_frame01" in split) == ("pat7_frame02" in split)

    for name, (image, label) in cases.items():
        h5 = read_h5(out / "data" / f"{name}.h5")
        np.testing.assert_allclose(h5["image"], minmax(image), atol=1e-6)
        assert h5["@spacing"] == (10.0, 1.25, 1.5)
        if label is None:
            assert "label" not in h5  # unlabeled: no label dataset at all
        else:
            assert np.array_equal(h5["label"], label)
    slices = read_list(out, "train_slices")
    assert slices == [f"{c}_slice_{k}" for c in train for k in range(1, len(cases[c][0]) + 1)]
    assert "label" not in read_h5(out / "data" / "slices" / "u02_slice_3.h5")

    data = load_dataset(str(out), 5, 4)
    assert len(data.train.labeled_patients) == 5 and len(data.val) == len(val)
    assert len(data.train.unlabeled_idx) == 9 and len(data.train.labels) == len(data.train.labeled_idx)
    with pytest.raises(UserError, match=r"label: dataset missing, but labeled_patients 6 takes patient u01 "
                                        r"\(number 6 in .*train_slices.list\) as labeled; expected labeled_patients "
                                        r"\(--labeled-patients\) 1 to 5"):
        load_dataset(str(out), 6, 4)

    again = tmp_path / "again"  # the split is a function of the seed
    assert call(["import", "--images", tmp_path / "img", "--labels", tmp_path / "lab", "--out", again,
                 "--val-fraction", 0.2, "--test-fraction", 0.2, "--seed", 3], capsys)[0] == 0
    assert all(read_list(out, s) == read_list(again, s) for s in ("train_slices", "train", "val", "test"))


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(array, mode).save(path) if mode is None else Image.fromarray(array).convert(mode).save(path)


def test_import_png_slices_grouped_by_integer_index(tmp_path, capsys):
    rng = np.random.default_rng(2)
    folder = tmp_path / "png"  # images and labels side by side: --labels is the same folder
    folder.mkdir()
    stack = rng.integers(0, 255, (12, 20, 24)).astype(np.uint8)
    stack[0] = np.clip(stack[0], 10, 200)  # the case's min and max lie in other slices
    labels = rng.integers(0, 4, (12, 20, 24)).astype(np.uint8)
    for k in range(12):
        write_png(folder / f"caseA_slice_{k + 1}.png", stack[k])
        write_png(folder / f"caseA_slice_{k + 1}_gt.png", labels[k])
    singles = {}
    for name in ("s1", "s2", "s3", "s4", "u1", "u2"):
        img = rng.integers(0, 60000, (20, 24)).astype(np.uint16)
        singles[name] = img
        write_png(folder / f"{name}.png", img)
        if name.startswith("s"):
            write_png(folder / f"{name}_label.png", rng.integers(0, 4, (20, 24)).astype(np.uint8))
    gray = rng.integers(0, 255, (20, 24)).astype(np.uint8)  # a gray picture saved as RGB is accepted
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(folder / "s5.png")
    write_png(folder / "s5_seg.png", np.ones((20, 24), np.uint8))
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "sub").mkdir()  # hidden files are ignored; an empty subfolder adds nothing

    out = tmp_path / "mine"
    rc, stdout, err = call(["import", "--images", folder, "--labels", folder, "--out", out], capsys)
    assert rc == 0, err
    assert "6 labeled cases, 2 unlabeled" in stdout
    train = read_list(out, "train")
    assert train[-2:] == ["u1", "u2"] and len(read_list(out, "val")) == 1 and len(read_list(out, "test")) == 1
    vol = read_h5(out / "data" / "caseA.h5")
    assert vol["image"].shape == (12, 20, 24) and "@spacing" not in vol  # no spacing for PNG
    np.testing.assert_allclose(vol["image"], minmax(stack), atol=1e-6)  # the 2nd PNG sorts after the 10th
    assert np.array_equal(vol["label"], labels)
    assert vol["image"][0].min() > 0  # normalised over the case, not per slice
    if "caseA" in train:
        s10 = read_h5(out / "data" / "slices" / "caseA_slice_10.h5")
        assert np.array_equal(s10["image"], vol["image"][9])
    np.testing.assert_allclose(read_h5(out / "data" / "u1.h5")["image"][0], minmax(singles["u1"]), atol=1e-6)
    np.testing.assert_allclose(read_h5(out / "data" / "s5.h5")["image"][0], minmax(gray), atol=1e-6)
    n_lab = len(train) - 2
    data = load_dataset(str(out), n_lab, 4)
    assert len(data.train.unlabeled_idx) == 2
    with pytest.raises(UserError, match=f"1 to {n_lab}"):
        load_dataset(str(out), n_lab + 1, 4)


# ---- import: bad input -----------------------------------------------------------------------------
def _nifti_pair(tmp_path: Path, n: int = 4) -> tuple[Path, Path]:
    rng = np.random.default_rng(5)
    img, lab = tmp_path / "img", tmp_path / "lab"
    img.mkdir()
    lab.mkdir()
    for i in range(n):
        image, label = volume(rng, 2)
        write_nifti(img / f"c{i}.nii.gz", image)
        write_nifti(lab / f"c{i}_gt.nii.gz", label % 3)  # the bad-input runs pass --num-classes 3
    return img, lab


def _png_pair(tmp_path: Path, n: int = 4) -> tuple[Path, Path]:
    rng = np.random.default_rng(6)
    img, lab = tmp_path / "img", tmp_path / "lab"
    img.mkdir()
    lab.mkdir()
    for i in range(n):
        write_png(img / f"c{i}.png", rng.integers(0, 255, (16, 16)).astype(np.uint8))
        write_png(lab / f"c{i}.png", rng.integers(0, 3, (16, 16)).astype(np.uint8))
    return img, lab


def _partly_labeled_case(t: Path) -> None:
    img, lab = _png_pair(t)
    for k in (1, 2):
        write_png(img / f"v_slice_{k}.png", np.zeros((16, 16), np.uint8))
    write_png(lab / "v_slice_1.png", np.zeros((16, 16), np.uint8))


def _partly_labeled_patient(t: Path) -> None:
    img, lab = _nifti_pair(t)
    (img / "c1.nii.gz").rename(img / "c1_frame01.nii.gz")
    (lab / "c1_gt.nii.gz").rename(lab / "c1_frame01_gt.nii.gz")
    write_nifti(img / "c1_frame02.nii.gz", np.zeros((2, 16, 16), np.int16))


def _cut(path: Path, array: np.ndarray) -> None:
    """`path` rewritten with `array`, then cut to 60% of its bytes: a half-downloaded scan (random
    voxels, so that a .gz is cut in its data, not its header)."""
    write_nifti(path, array)
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * 0.6)])


def _big(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, (2, 64, 64)).astype(np.int16)


IMPORT_BAD = {
    # SimpleITK reads a cut-off file without a word, with zeros for the missing voxels
    "truncated_gz": (lambda t: _cut(_nifti_pair(t)[0] / "c3.nii.gz", _big()),
                     ["c3.nii.gz: the file is cut off or damaged (EOFError", "expected a whole image"]),
    "truncated_nii": (lambda t: (_nifti_pair(t)[0] / "c3.nii.gz").unlink() or _cut(t / "img" / "c3.nii", _big()),
                      ["c3.nii: the file is cut off: ", "bytes where its header needs 16736", "expected a whole image"]),
    "empty": (lambda t: (t / "img").mkdir() or (t / "lab").mkdir(), ["img: --images folder is empty"]),
    "not_an_image": (lambda t: (_nifti_pair(t)[0] / "notes.txt").write_text("x"),
                     ["notes.txt: not a NIfTI (.nii, .nii.gz) or PNG file"]),
    "mixed_kinds": (lambda t: write_png(_nifti_pair(t)[0] / "x.png", np.zeros((4, 4), np.uint8)),
                    ["x.png: PNG among NIfTI files", "expected one kind"]),
    "no_labels_at_all": (lambda t: [p.unlink() for p in _nifti_pair(t)[1].iterdir()],
                         ["no image has a label", "expected --labels with labels for at least 2 patients"]),
    "one_labeled_patient": (lambda t: [p.unlink() for p in sorted(_nifti_pair(t)[1].iterdir())[1:]],
                            ["1 labeled patient too few for --val-fraction 0.1 and --test-fraction 0.2",
                             "expected at least 3"]),
    "orphan_label": (lambda t: write_nifti(_nifti_pair(t)[1] / "zz_gt.nii.gz", np.zeros((2, 16, 16), np.uint8)),
                     ["zz_gt.nii.gz: label file matches no image", "_gt, _label or _seg"]),
    "label_shape": (lambda t: write_nifti(_nifti_pair(t)[1] / "c1_gt.nii.gz", np.zeros((3, 16, 16), np.uint8)),
                    ["c1_gt.nii.gz: label shape (3, 16, 16) differs from image c1.nii.gz shape (2, 16, 16)"]),
    "label_spacing": (lambda t: write_nifti(_nifti_pair(t)[1] / "c1_gt.nii.gz", np.zeros((2, 16, 16), np.uint8),
                                            (1.5, 1.0, 10.0)),
                      ["c1_gt.nii.gz: label spacing (z, y, x) (10, 1, 1.5) mm differs from image c1.nii.gz"]),
    "label_origin": (lambda t: write_nifti(_nifti_pair(t)[1] / "c1_gt.nii.gz", np.zeros((2, 16, 16), np.uint8),
                                           origin=(0.1, 0, 0)),
                     ["c1_gt.nii.gz: label origin (x, y, z) (0.1, 0, 0) mm differs from image c1.nii.gz origin "
                      "(0, 0, 0) mm by 0.1 mm, more than 1% of its 1.25 mm voxel"]),
    "label_direction": (lambda t: write_nifti(_nifti_pair(t)[1] / "c1_gt.nii.gz", np.zeros((2, 16, 16), np.uint8),
                                              direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)),
                        ["c1_gt.nii.gz: label direction (-1, 0, 0, 0, 1, 0, 0, 0, 1) differs from image c1.nii.gz "
                         "direction (1, 0, 0, 0, 1, 0, 0, 0, 1) by 2 in a cosine (at most 0.0001)",
                         "expected the same orientation"]),
    "label_values": (lambda t: write_nifti(_nifti_pair(t)[1] / "c2_gt.nii.gz", np.full((2, 16, 16), 3, np.uint8)),
                     ["c2_gt.nii.gz: label: values [3] outside 0..2", "--num-classes 3"]),
    "float_label": (lambda t: write_nifti(_nifti_pair(t)[1] / "c2_gt.nii.gz", np.full((2, 16, 16), 0.999, np.float32)),
                    ["c2_gt.nii.gz: label: non-integer values (e.g. 0.999)", "resample labels with nearest neighbour"]),
    "corrupt_nifti": (lambda t: (_nifti_pair(t)[0] / "c3.nii.gz").write_bytes(b"\x1f\x8b garbage"),
                      ["c3.nii.gz: not a readable NIfTI file"]),
    "png_255_mask": (lambda t: write_png(_png_pair(t)[1] / "c0.png", np.full((16, 16), 255, np.uint8)),
                     ["c0.png: label: values [255] outside 0..2 (a 0/255 mask? store class indices)"]),
    "png_label_shape": (lambda t: write_png(_png_pair(t)[1] / "c0.png", np.zeros((16, 8), np.uint8)),
                        ["c0.png: label shape (16, 8) differs from image c0.png shape (16, 16)"]),
    "png_colour": (lambda t: Image.fromarray(np.arange(768, dtype=np.uint8).reshape(16, 16, 3))
                   .save(_png_pair(t)[0] / "c1.png"), ["c1.png: colour PNG (mode RGB)", "grayscale image"]),
    "corrupt_png": (lambda t: (_png_pair(t)[0] / "c2.png").write_bytes(b"\x89PNG nope"),
                    ["c2.png: not a readable PNG file"]),
    "png_partly_labeled_case": (_partly_labeled_case,
                                ["v_slice_2.png: no label, but other slices of case 'v' have one"]),
    "partly_labeled_patient": (_partly_labeled_patient,
                               ["c1_frame02.nii.gz: no label, but other cases of patient 'c1' have one"]),
}


@pytest.mark.parametrize("case", IMPORT_BAD)
def test_import_bad_input(case, tmp_path, capsys):
    damage, needles = IMPORT_BAD[case]
    damage(tmp_path)
    rc, _, err = call(["import", "--images", tmp_path / "img", "--labels", tmp_path / "lab",
                       "--out", tmp_path / "out", "--num-classes", 3], capsys)
    assert_error(rc, err, *needles)
    assert_nothing_written(tmp_path, "img", "lab")


def _turn(angle: float) -> tuple:
    return (np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1)


@pytest.mark.parametrize("shift,turn,refused", [
    (0.005 * 1.25, 5e-5, None),  # half a percent of a voxel, a turn of 5e-5 rad: header noise, taken
    (0.02 * 1.25, 0.0, "by 0.025 mm, more than 1% of its 1.25 mm voxel"),
    (0.0, 5e-4, "in a cosine (at most 0.0001)"),
], ids=["within", "shifted", "turned"])
def test_a_label_is_taken_on_its_scans_grid_and_refused_just_off_it(tmp_path, capsys, shift, turn, refused):
    """Real scans have an origin and an oblique orientation: a label on the same grid is taken, also
    with the noise two tools leave in a header; just past the tolerances it is refused."""
    img, lab = _nifti_pair(tmp_path)
    origin = (-120.5, 88.25, -40.0)
    for i in range(4):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(img / f"c{i}.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(lab / f"c{i}_gt.nii.gz")))
        write_nifti(img / f"c{i}.nii.gz", image, origin=origin, direction=_turn(0.3))
        write_nifti(lab / f"c{i}_gt.nii.gz", label, origin=(origin[0] + shift, *origin[1:]),
                    direction=_turn(0.3 + turn))
    rc, _, err = call(["import", "--images", img, "--labels", lab, "--out", tmp_path / "out", "--num-classes", 3,
                       "--val-fraction", 0.25, "--test-fraction", 0.25], capsys)
    if refused is None:
        assert rc == 0, err
        assert len(list((tmp_path / "out" / "data").glob("c*.h5"))) == 4
    else:
        assert_error(rc, err, "c0_gt.nii.gz: label", refused)
        assert_nothing_written(tmp_path, "img", "lab")


def test_images_and_masks_under_one_images_folder_get_the_flags_that_read_them(tmp_path, capsys):
    img, lab = _png_pair(tmp_path)
    (tmp_path / "x").mkdir()
    img.rename(tmp_path / "x" / "images")
    lab.rename(tmp_path / "x" / "masks")
    rc, _, err = call(["import", "--images", tmp_path / "x", "--out", tmp_path / "out"], capsys)
    assert_error(rc, err, "image name 'c0' again", f"images and labels in two folders? pass --images "
                 f"{tmp_path / 'x' / 'images'} --labels {tmp_path / 'x' / 'masks'})")
    assert_nothing_written(tmp_path, "x")


def test_the_cut_off_check_passes_whole_files_that_simpleitk_reads(tmp_path):
    """No false alarm on files SimpleITK reads whole: a plain .nii named .nii.gz, bytes after the
    gzip stream, a bitpix that disagrees with the datatype (ITK reads by datatype); a gzip stream
    cut short is still caught."""
    import gzip

    from raysemi.data.convert import check_whole

    array = _big()
    write_nifti(tmp_path / "v.nii", array)
    raw = (tmp_path / "v.nii").read_bytes()
    swapped = bytearray(raw)
    swapped[72:74] = (8).to_bytes(2, "little")  # bitpix 8 for int16 data
    files = {"plain_named_gz.nii.gz": raw, "trailing.nii.gz": gzip.compress(raw) + b"\0" * 64,
             "bitpix.nii": bytes(swapped), "whole.nii.gz": gzip.compress(raw)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name in [*files, "v.nii"]:
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))), array), name
        check_whole(tmp_path / name)  # no error
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw)[:-100])
    with pytest.raises(UserError, match="cut.nii.gz: the file is cut off or damaged"):
        check_whole(tmp_path / "cut.nii.gz")


def test_import_side_by_side_refuses_a_label_without_its_image(tmp_path, capsys):
    """Labels beside their images: a label whose image name has a typo must not become an unlabeled
    training image (it is refused, as it is with a separate --labels folder)."""
    img, lab = _nifti_pair(tmp_path)
    for p in lab.iterdir():
        p.rename(img / p.name)
    lab.rmdir()
    (img / "c2_gt.nii.gz").rename(img / "c_2_gt.nii.gz")
    rc, _, err = call(["import", "--images", img, "--labels", img, "--out", tmp_path / "out", "--num-classes", 3],
                      capsys)
    assert_error(rc, err, "c_2_gt.nii.gz: named as a label (…_gt), but no image 'c_2' lies in",
                 "expected its image beside it")
    assert_nothing_written(tmp_path, "img")


def test_import_notes_what_may_split_a_patient_or_slice_across_the_acquisition(tmp_path, capsys):
    """Two things the import cannot know but can suspect, said as notes: one patient's cases in a
    folder of its own but not named <patient>_frameNN (they may land in different splits), and
    volumes whose slice axis is the finely spaced one (KiTS19's layout: sliced across the scan)."""
    rng = np.random.default_rng(3)
    img = tmp_path / "img"
    for p in range(4):
        (img / f"patient{p}").mkdir(parents=True)
        for phase in ("ED", "ES"):
            image, label = volume(rng, 2)
            spacing = (5.0, 0.8, 0.8) if p == 0 else SPACING_XYZ  # x, y, z: patient0's slices are 0.8 mm apart
            write_nifti(img / f"patient{p}" / f"patient{p}_{phase}.nii.gz", image, spacing)
            write_nifti(img / f"patient{p}" / f"patient{p}_{phase}_gt.nii.gz", label, spacing)
    rc, out, err = call(["import", "--images", img, "--labels", img, "--out", tmp_path / "out"], capsys)
    assert rc == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    for p in range(4):
        assert any(f"patient{p}: its 2 cases (patient{p}_ED, patient{p}_ES) count as 2 patients, so they may be in "
                   f"different splits; if they are one patient's, name them <patient>_frameNN (e.g. "
                   f"patient{p}_frame01" in n for n in notes), notes
    across = [n for n in notes if "the slices taken (along the file's third axis)" in n]
    assert len(across) == 1 and "patient0_ED.nii.gz and 1 more volumes" in across[0], notes


def test_import_into_a_linked_folder_and_under_a_file(tmp_path, capsys):
    """--out may be a link to a folder (elsewhere, even on another file system): the dataset is
    written there, the link kept. An --out under a file is refused before any work."""
    img, lab = _nifti_pair(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    rc, _, err = call(["import", "--images", img, "--labels", lab, "--out", tmp_path / "link", "--num-classes", 3],
                      capsys)
    assert rc == 0, err
    assert (tmp_path / "link").is_symlink() and read_list(tmp_path / "real", "train")
    assert_nothing_written(tmp_path, "img", "lab", "real", "link")
    (tmp_path / "afile").write_text(KEEP)
    for command in (["import", "--images", img, "--labels", lab, "--num-classes", 3], ["phantom", "--patients", 3]):
        rc, _, err = call([*command, "--out", tmp_path / "afile" / "sub" / "out"], capsys)
        assert_error(rc, err, "--out:", "afile is a file; expected a folder there")
    assert (tmp_path / "afile").read_text() == KEEP


def test_minmax_computes_in_float64_as_the_reference():
    """The reference's (x - min) / (max - min) runs in float64 (numpy on the int16 scans): float32
    before the subtraction loses the detail of intensities far from zero."""
    from raysemi.data.normalize import minmax

    x = 1e5 + np.random.default_rng(0).random((4, 16, 16))
    ref = ((x - x.min()) / (x.max() - x.min())).astype(np.float32)
    out = minmax(x)
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 1e-6
    assert minmax(np.full((2, 2), 7.0)).dtype == np.float32


def test_import_options_and_output_folder(tmp_path, capsys):
    img, lab = _nifti_pair(tmp_path)
    out = tmp_path / "out"
    base = ["import", "--images", img, "--labels", lab, "--out", out]
    for extra, needle in ((["--val-fraction", 0], "--val-fraction: 0 is invalid"),
                          (["--test-fraction", 0.95], "--test-fraction: 0.95 is invalid"),
                          (["--num-classes", 1], "--num-classes: 1 is invalid")):
        assert_error(*call([*base, *extra], capsys)[::2], needle)
    assert_error(*call(["import", "--images", tmp_path / "nope", "--out", out], capsys)[::2],
                 "nope: --images folder not found")
    out.mkdir()
    (out / "keep.txt").write_text(KEEP)
    assert_error(*call(base, capsys)[::2], f"{out}: output folder exists and is not empty")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    rc, _, err = call([*base, "--overwrite", "--test-fraction", 0], capsys)
    assert rc == 0, err
    assert (out / "keep.txt").read_text() == KEEP
    assert read_list(out, "train") and (out / "test.list").read_text() == ""  # no test split asked for
    assert_nothing_written(tmp_path, "img", "lab", "out")


def test_help_states_the_rules(capsys):
    for command, needles in (("import", ["X_gt", "_slice_<k>.png", "no 'label' dataset", "--labeled-patients"]),
                             ("prepare-acdc", ["--allow-missing", "frame02", "slice index + 1", "(x - min)"])):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert all(n in text for n in needles), text


def test_cli_subprocess_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "raysemi.data", "import", "--images", str(tmp_path / "empty"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert_error(proc.returncode, proc.stderr, "--images folder is empty")
    assert not (tmp_path / "out").exists()


# ---- --overwrite: the old dataset replaced as a whole, or not at all -------------------------------
def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Everything under `folder` (hidden too) by its relative path: a file's bytes, None for a folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


USER_FILES = {"keep.txt": KEEP, "data/notes.txt": "which scanner\n", "data/slices/README": "mine\n",
              "other.list": "not one of the four lists\n", "mine/scan.h5": "an .h5 outside data/ and data/slices/\n"}


def _imported_with_user_files(tmp_path: Path, capsys) -> tuple[Path, list]:
    """A dataset imported from 11 NIfTI cases into tmp_path/out, plus the user's own files there; and
    the arguments that import a smaller set (4 cases) over it."""
    write_nifti_set(tmp_path / "big_img", tmp_path / "big_lab", np.random.default_rng(1))
    out = tmp_path / "out"
    rc, _, err = call(["import", "--images", tmp_path / "big_img", "--labels", tmp_path / "big_lab", "--out", out],
                      capsys)
    assert rc == 0, err
    for rel, text in USER_FILES.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    small = tmp_path / "small"
    small.mkdir()
    img, lab = _nifti_pair(small)
    return out, ["import", "--images", img, "--labels", lab, "--out", out, "--num-classes", 3]


def test_overwrite_leaves_exactly_the_new_dataset_and_the_users_files(tmp_path, capsys):
    out, small_args = _imported_with_user_files(tmp_path, capsys)
    old_slices = {p.name for p in (out / "data" / "slices").glob("*.h5")}
    assert len(old_slices) > 20
    rc, _, err = call([*small_args, "--overwrite"], capsys)
    assert rc == 0, err

    fresh = tmp_path / "fresh"  # the same small import into a new folder: what the dataset must be
    assert call([*small_args[:-4], "--out", fresh, "--num-classes", 3], capsys)[0] == 0
    got, want = snapshot(out), snapshot(fresh)
    assert got == {**want, "mine": None, **{rel: text.encode() for rel, text in USER_FILES.items()}}
    assert not old_slices & {p.name for p in (out / "data" / "slices").glob("*.h5")}  # no stale slice
    assert read_list(out, "train_slices") == read_list(fresh, "train_slices")
    assert_nothing_written(tmp_path, "big_img", "big_lab", "small", "out", "fresh")  # no backup, no temp


def test_overwrite_of_a_phantom_folder_removes_the_phantom(tmp_path, capsys):
    from raysemi.data import write_phantom

    out = write_phantom(tmp_path / "out", patients=3, size=(32, 32))
    (out / "keep.txt").write_text(KEEP)
    img, lab = _nifti_pair(tmp_path)
    rc, _, err = call(["import", "--images", img, "--labels", lab, "--out", out, "--num-classes", 3,
                       "--overwrite"], capsys)
    assert rc == 0, err
    files = snapshot(out)
    assert "phantom.txt" not in files and files["keep.txt"] == KEEP.encode()
    assert {Path(f).stem for f in files if f.startswith("data/slices/")} == set(read_list(out, "train_slices"))
    assert_nothing_written(tmp_path, "img", "lab", "out")


def test_phantom_overwrite_swaps_the_dataset_and_keeps_the_users_files(tmp_path, capsys):
    from raysemi.data import write_phantom

    out = write_phantom(tmp_path / "out", patients=6, size=(32, 32))
    old_slices = {p.name for p in (out / "data" / "slices").glob("*.h5")}
    (out / "keep.txt").write_text(KEEP)
    (out / "data" / "notes.txt").write_text(KEEP)
    rc, _, err = call(["phantom", "--out", out, "--patients", 3, "--size", 32, 32, "--seed", 5, "--overwrite"], capsys)
    assert rc == 0, err
    fresh = write_phantom(tmp_path / "fresh", patients=3, size=(32, 32), seed=5)
    got, want = snapshot(out), snapshot(fresh)
    assert got == {**want, "keep.txt": KEEP.encode(), "data/notes.txt": KEEP.encode()}  # before: all deleted
    assert old_slices - {p.name for p in (out / "data" / "slices").glob("*.h5")}  # the old set had more slices
    assert_nothing_written(tmp_path, "out", "fresh")  # no backup, no temp


def test_phantom_overwrite_repairs_a_dataset_left_half_swapped(tmp_path, capsys):
    # a swap killed between two renames leaves the dataset without train_slices.list (so no run reads
    # it); the documented repair is to run the command again with --overwrite
    from raysemi.data import write_phantom

    out = write_phantom(tmp_path / "out", patients=3, size=(32, 32))
    (out / "train_slices.list").unlink()
    rc, _, err = call(["phantom", "--out", out, "--patients", 3, "--size", 32, 32, "--overwrite"], capsys)
    assert rc == 0, err
    assert snapshot(out) == snapshot(write_phantom(tmp_path / "fresh", patients=3, size=(32, 32)))


def test_phantom_leaves_a_folder_that_appeared_while_it_wrote(tmp_path, monkeypatch):
    # another process (two trials filling the phantom cache at once, say) got there first: its copy stays
    from raysemi.data import phantom
    from raysemi.errors import UserError

    out = tmp_path / "out"
    real = phantom._write_patient

    def first_writes_elsewhere(*args):
        if not out.exists():
            out.mkdir()
            (out / "train.list").write_text("theirs\n")
        return real(*args)

    monkeypatch.setattr(phantom, "_write_patient", first_writes_elsewhere)
    with pytest.raises(UserError, match="appeared meanwhile"):
        phantom.write_phantom(out, patients=3, size=(32, 32))
    assert snapshot(out) == {"train.list": b"theirs\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def _fail_rename(monkeypatch, at: int, error: BaseException, every_later: bool = False) -> list:
    """os.replace raises `error` on its `at`-th call (and on every later one if asked); returns the
    targets of the calls, for the test to check where it failed. The swap's renames are the only
    os.replace calls of an import into a folder that has content."""
    calls: list = []
    real = os.replace

    def replace(src, dst):
        calls.append(Path(dst))
        if len(calls) == at or (every_later and len(calls) > at):
            raise error
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("where", ["first_aside", "mid_aside", "first_in", "mid_in", "last_in", "ctrl_c"])
def test_a_failure_in_the_swap_leaves_the_old_dataset_as_it_was(where, tmp_path, capsys, monkeypatch):
    out, small_args = _imported_with_user_files(tmp_path, capsys)
    fresh = tmp_path / "fresh"
    assert call([*small_args[:-4], "--out", fresh, "--num-classes", 3], capsys)[0] == 0
    n_old, n_new = len(dataset_files(out)), len(dataset_files(fresh))  # renames aside, then renames in
    assert n_old > 2 * n_new > 10
    at = {"first_aside": 1, "mid_aside": n_old // 2, "first_in": n_old + 1, "mid_in": n_old + n_new // 2,
          "last_in": n_old + n_new, "ctrl_c": n_old + 3}[where]  # last_in: train_slices.list
    before = snapshot(out)
    error = KeyboardInterrupt() if where == "ctrl_c" else OSError(errno.ENOSPC, "No space left on device")
    calls = _fail_rename(monkeypatch, at, error)
    rc, _, err = call([*small_args, "--overwrite"], capsys)
    monkeypatch.undo()
    assert len(calls) >= at
    if where == "last_in":  # the lists come in last, train_slices.list the very last
        assert calls[at - 1] == out / "train_slices.list" and calls[at - 2].suffix == ".list"
    if where == "ctrl_c":
        assert rc == 130 and "interrupted" in err
    else:
        assert_error(rc, err, str(out), "replacing the dataset failed", "No space left on device",
                     "the old dataset is back as it was")
    assert snapshot(out) == before  # every old file back, byte for byte; the user's files untouched
    assert_nothing_written(tmp_path, "big_img", "big_lab", "small", "out", "fresh")


def test_when_restoring_fails_too_the_error_names_the_backup(tmp_path, capsys, monkeypatch):
    out, small_args = _imported_with_user_files(tmp_path, capsys)
    before = snapshot(out)
    n_old = len(dataset_files(out))
    _fail_rename(monkeypatch, n_old + 3, OSError(errno.EIO, "Input/output error"), every_later=True)
    rc, _, err = call([*small_args, "--overwrite"], capsys)
    monkeypatch.undo()
    line = assert_error(rc, err, str(out), "replacing the dataset failed", "moving the old files back failed too",
                        "move them back by hand")
    backups = list(tmp_path.glob(".out.old-*"))
    assert len(backups) == 1 and str(backups[0]) in line
    # nothing is lost: the old dataset's files are in the backup, the user's files still in out
    assert {**snapshot(out), **snapshot(backups[0])} == before
    assert {f for f, data in snapshot(out).items() if data is not None} == set(USER_FILES)


def test_a_failed_swap_removes_the_folders_it_made(tmp_path, capsys, monkeypatch):
    img, lab = _nifti_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text(KEEP)
    (out / "train.list").write_text("an old list\n")  # no data/ yet: the swap makes data/ and data/slices/
    before = snapshot(out)
    calls = _fail_rename(monkeypatch, 7, OSError(errno.ENOSPC, "No space left on device"))  # the 2nd slice
    rc, _, err = call(["import", "--images", img, "--labels", lab, "--out", out, "--num-classes", 3,
                       "--overwrite"], capsys)
    monkeypatch.undo()
    assert_error(rc, err, "the old dataset is back as it was")
    assert calls[6].parent == out / "data" / "slices"
    assert snapshot(out) == before  # no empty data/ left behind
    assert_nothing_written(tmp_path, "img", "lab", "out")


def test_a_full_disk_while_writing_is_one_line_and_changes_nothing(tmp_path, capsys, monkeypatch):
    """A disk that fills while the volumes are written (stood in for by h5py's error: a disk cannot
    be filled at will here) ends in one line, the --out as it was and no temp folder left."""
    import raysemi.data.importer

    img, lab = _nifti_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text(KEEP)
    written = []

    def full(tmp, name, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "data" / f"{name}.h5"))
        written.append(name)

    monkeypatch.setattr(raysemi.data.importer, "write_volume", full)
    rc, _, err = call(["import", "--images", img, "--labels", lab, "--out", out, "--num-classes", 3,
                       "--overwrite"], capsys)
    assert_error(rc, err, ".h5: the dataset could not be written (No space left on device); nothing was changed in "
                 f"{out}")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert_nothing_written(tmp_path, "img", "lab", "out")


CLASHES = {  # something of the user's where the import writes: refused before anything moves
    "folder_for_a_list": (lambda out: (out / "train.list").mkdir(),
                          ["train.list: is a folder where this command writes a file"]),
    "folder_for_a_volume": (lambda out: (out / "data" / "c0.h5").mkdir(parents=True),
                            ["c0.h5: is a folder where this command writes a file"]),
    "file_for_data": (lambda out: (out / "data").write_text("x"),
                      ["data: is a file where this command writes a folder"]),
    "file_for_slices": (lambda out: (out / "data").mkdir() or (out / "data" / "slices").write_text("x"),
                        ["slices: is a file where this command writes a folder"]),
}


@pytest.mark.parametrize("case", CLASHES)
def test_overwrite_refuses_a_clash_and_changes_nothing(case, tmp_path, capsys):
    img, lab = _nifti_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text(KEEP)
    (out / "val.list").write_text("an old list\n")
    make, needles = CLASHES[case]
    make(out)
    before = snapshot(out)
    rc, _, err = call(["import", "--images", img, "--labels", lab, "--out", out, "--num-classes", 3,
                       "--overwrite"], capsys)
    assert_error(rc, err, *needles, "nothing was changed")
    assert snapshot(out) == before and (out / "train.list").is_dir() == (case == "folder_for_a_list")
    assert_nothing_written(tmp_path, "img", "lab", "out")


# ---- import: subfolders ----------------------------------------------------------------------------
def _nest(flat: Path, nested: Path, rename: dict[str, str] | None = None) -> None:
    """Copy each file of `flat` into a folder per patient under `nested` (p01 two levels down)."""
    for p in flat.iterdir():
        pid = p.name.split(".")[0].split("_")[0]  # p01_gt.nii.gz, pat7_frame01.nii.gz -> p01, pat7
        folder = nested / ("site_a" if pid == "p01" else "") / pid
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / (rename or {}).get(p.name, p.name))


@pytest.mark.parametrize("layout", ["labels_tree", "labels_beside_images", "labels_and_out_inside_images"])
def test_import_nested_folders_give_the_flat_layouts_dataset(layout, tmp_path, capsys):
    write_nifti_set(tmp_path / "img", tmp_path / "lab", np.random.default_rng(1))
    flat = tmp_path / "flat"
    assert call(["import", "--images", tmp_path / "img", "--labels", tmp_path / "lab", "--out", flat], capsys)[0] == 0

    root = tmp_path / "nested"
    images, labels, out = root, root / "masks", tmp_path / "out"
    if layout == "labels_tree":
        images = root / "scans"
    elif layout == "labels_beside_images":
        labels = images
    else:
        out = root / "dataset"
    _nest(tmp_path / "img", images)
    _nest(tmp_path / "lab", labels, {"p01.nii.gz": "p01_gt.nii.gz"} if labels == images else None)
    (images / ".ipynb_checkpoints").mkdir()  # a hidden folder is not searched
    shutil.copy(tmp_path / "img" / "p02.nii.gz", images / ".ipynb_checkpoints" / "p02.nii.gz")
    assert (images / "site_a" / "p01" / "p01.nii.gz").is_file()
    args = ["import", "--images", images, "--labels", labels, "--out", out]
    rc, stdout, err = call(args, capsys)
    assert rc == 0, err
    assert "8 labeled cases, 3 unlabeled" in stdout
    assert snapshot(out) == snapshot(flat)
    if layout == "labels_and_out_inside_images":  # again: --out (now full of .h5) is not searched either
        rc, _, err = call([*args, "--overwrite"], capsys)
        assert rc == 0, err
        assert snapshot(out) == snapshot(flat)


def _twice_in_subfolders(t: Path) -> None:
    img, _ = _nifti_pair(t)
    (img / "a").mkdir()
    (img / "b").mkdir()
    (img / "c1.nii.gz").rename(img / "a" / "c1.nii.gz")
    shutil.copy(img / "a" / "c1.nii.gz", img / "b" / "c1.nii")


def _label_twice_in_subfolders(t: Path) -> None:
    _, lab = _nifti_pair(t)
    (lab / "x").mkdir()
    shutil.copy(lab / "c2_gt.nii.gz", lab / "x" / "c2_gt.nii.gz")


def _png_case_in_two_folders(t: Path) -> None:
    img, _ = _png_pair(t)
    for k, sub in ((1, "a"), (2, "b")):
        (img / sub).mkdir()
        write_png(img / sub / f"v_slice_{k}.png", np.zeros((16, 16), np.uint8))


NESTED_BAD = {
    "image_twice": (_twice_in_subfolders, lambda t: [f"{t / 'img' / 'b' / 'c1.nii'}: image name 'c1' again",
                                                     f"(also {t / 'img' / 'a' / 'c1.nii.gz'})"]),
    "label_twice": (_label_twice_in_subfolders,
                    lambda t: [f"{t / 'lab' / 'x' / 'c2_gt.nii.gz'}: label name 'c2_gt' again",
                               f"(also {t / 'lab' / 'c2_gt.nii.gz'})"]),
    "png_case_in_two_folders": (_png_case_in_two_folders,
                                lambda t: [f"{t / 'img' / 'b' / 'v_slice_2.png'}: a slice of case 'v' in another "
                                           f"folder than {t / 'img' / 'a' / 'v_slice_1.png'}"]),
}


@pytest.mark.parametrize("case", NESTED_BAD)
def test_import_refuses_one_name_from_two_subfolders(case, tmp_path, capsys):
    make, needles = NESTED_BAD[case]
    make(tmp_path)
    rc, _, err = call(["import", "--images", tmp_path / "img", "--labels", tmp_path / "lab",
                       "--out", tmp_path / "out", "--num-classes", 3], capsys)
    assert_error(rc, err, *needles(tmp_path))
    assert_nothing_written(tmp_path, "img", "lab")


# ---- import --case-per-folder (KiTS-like: one folder per case, the same file names in each) --------
def write_case_folders(images: Path, labels: Path | None, rng, labeled: int = 6, unlabeled: int = 2) -> dict:
    """case_0000k/imaging.nii.gz, and its label segmentation.nii.gz beside it (labels None) or in
    labels/case_0000k/ (the name there does not matter); cases 0..labeled-1 labeled."""
    arrays = {}
    for k in range(labeled + unlabeled):
        name = f"case_{k:05d}"
        image, label = volume(rng, int(rng.integers(2, 4)))
        (images / name).mkdir(parents=True)
        write_nifti(images / name / "imaging.nii.gz", image)
        if k < labeled:
            folder = images / name if labels is None else labels / name
            folder.mkdir(parents=True, exist_ok=True)
            write_nifti(folder / ("segmentation.nii.gz" if labels is None else "mask.nii"), label)
        arrays[name] = image, (label if k < labeled else None)
    return arrays


def test_import_case_per_folder_names_cases_by_their_folder(tmp_path, capsys):
    images = tmp_path / "kits"
    arrays = write_case_folders(images, None, np.random.default_rng(2))
    out = tmp_path / "out"
    rc, _, err = call(["import", "--images", images, "--labels", images, "--out", out], capsys)  # without the flag
    assert_error(rc, err, "file name 'imaging' again", "pass --case-per-folder")
    rc, stdout, err = call(["import", "--images", images, "--labels", images, "--out", out, "--case-per-folder",
                            "--val-fraction", 0.2, "--test-fraction", 0.2], capsys)
    assert rc == 0, err
    assert "6 labeled cases, 2 unlabeled" in stdout
    names = read_list(out, "train") + read_list(out, "val") + read_list(out, "test")
    assert sorted(names) == sorted(arrays)
    for name, (image, label) in arrays.items():
        h5 = read_h5(out / "data" / f"{name}.h5")
        np.testing.assert_allclose(h5["image"], minmax(image), atol=1e-6)
        assert np.array_equal(h5["label"], label) if label is not None else "label" not in h5

    # the labels in a tree of their own, mirroring the case folders: the same dataset
    other = tmp_path / "other"
    write_case_folders(other / "scans", other / "masks", np.random.default_rng(2))
    rc, _, err = call(["import", "--images", other / "scans", "--labels", other / "masks", "--out", tmp_path / "o2",
                       "--case-per-folder", "--val-fraction", 0.2, "--test-fraction", 0.2], capsys)
    assert rc == 0, err
    assert snapshot(tmp_path / "o2") == snapshot(out)


def _two_images(t: Path) -> None:
    write_nifti(t / "kits" / "case_00002" / "imaging_t2.nii.gz", volume(np.random.default_rng(0), 2)[0])


def _file_at_the_top(t: Path) -> None:
    write_nifti(t / "kits" / "extra.nii.gz", volume(np.random.default_rng(0), 2)[0])


def _two_labels(t: Path) -> None:
    write_nifti(t / "kits" / "case_00003" / "mask.nii.gz", volume(np.random.default_rng(0), 2)[1])


def _png_inside(t: Path) -> None:
    write_png(t / "kits" / "case_00004" / "preview.png", np.zeros((16, 16), np.uint8))


CASE_FOLDER_BAD = {
    "two_images": (_two_images, ["kits", "case_00002: --case-per-folder: 2 images (imaging", "expected one image"],
                   True),
    "file_at_the_top": (_file_at_the_top, ["extra.nii.gz: --case-per-folder: a file directly in --images"], True),
    "two_labels": (_two_labels, ["case_00003: --case-per-folder: 2 labels", "expected at most one"], True),
    "png_inside": (_png_inside, ["preview.png: --case-per-folder: not a NIfTI"], True),
    "labels_beside_without_labels_flag": (lambda t: None, ["case_00000: --case-per-folder: 2 images",
                                                           "need --labels set to the --images folder"], False),
    "label_without_image": (lambda t: (t / "kits" / "case_00005" / "imaging.nii.gz").unlink(),
                            ["case_00005: --case-per-folder: only a label (segmentation.nii.gz), no image"], True),
}


@pytest.mark.parametrize("case", CASE_FOLDER_BAD)
def test_import_case_per_folder_bad_input(case, tmp_path, capsys):
    make, needles, labels_flag = CASE_FOLDER_BAD[case]
    write_case_folders(tmp_path / "kits", None, np.random.default_rng(2))
    make(tmp_path)
    rc, _, err = call(["import", "--images", tmp_path / "kits", *(["--labels", tmp_path / "kits"] if labels_flag else []),
                       "--out", tmp_path / "out", "--case-per-folder"], capsys)
    assert_error(rc, err, *needles)
    assert_nothing_written(tmp_path, "kits")


def _orphan_label_folder(t: Path) -> None:
    (t / "masks" / "case_00099").mkdir()
    write_nifti(t / "masks" / "case_00099" / "mask.nii", volume(np.random.default_rng(0), 2)[1])


def _label_at_the_top_of_labels(t: Path) -> None:
    write_nifti(t / "masks" / "stray.nii.gz", volume(np.random.default_rng(0), 2)[1])


def _label_beside_with_a_labels_tree(t: Path) -> None:
    write_nifti(t / "scans" / "case_00001" / "segmentation.nii.gz", volume(np.random.default_rng(0), 2)[1])


@pytest.mark.parametrize("make,needles", [
    (_orphan_label_folder, ["case_00099", "has no image folder", "expected the subfolders of --labels to mirror"]),
    (_label_at_the_top_of_labels, ["stray.nii.gz: --case-per-folder: a file directly in --labels"]),
    (_label_beside_with_a_labels_tree, ["case_00001: --case-per-folder: 2 images",
                                        "with --labels another folder, labels lie in its subfolders"]),
], ids=["orphan_label_folder", "label_at_the_top", "label_beside_with_a_labels_tree"])
def test_import_case_per_folder_with_a_labels_tree_bad_input(make, needles, tmp_path, capsys):
    write_case_folders(tmp_path / "scans", tmp_path / "masks", np.random.default_rng(2))
    make(tmp_path)
    rc, _, err = call(["import", "--images", tmp_path / "scans", "--labels", tmp_path / "masks", "--out",
                       tmp_path / "out", "--case-per-folder"], capsys)
    assert_error(rc, err, *needles)
    assert_nothing_written(tmp_path, "scans", "masks")


def test_the_label_names_are_said_alike_in_help_and_readme(capsys):
    from raysemi.data.importer import FOLDER_LABEL_NAMES, FOLDER_LABEL_RULE

    with pytest.raises(SystemExit):
        main(["import", "--help"])
    assert FOLDER_LABEL_RULE in " ".join(capsys.readouterr().out.split())
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    section = readme[readme.index("--case-per-folder`"):][:900]
    assert all(f"`{name}`" in section for name in FOLDER_LABEL_NAMES)


# ---- export-nifti ----------------------------------------------------------------------------------
def test_export_nifti_writes_each_volume_and_its_label_and_import_reads_them_back(tiny_phantom, tmp_path, capsys):
    from raysemi.data import load_volumes

    out = tmp_path / "scans"
    rc, stdout, err = call(["export-nifti", "--data", tiny_phantom, "--split", "test", "--out", out], capsys)
    assert rc == 0, err
    volumes = load_volumes(tiny_phantom, "test", 4)
    assert f"exported {len(volumes)} volumes of {tiny_phantom} (test) to {out} with their labels" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        name for v in volumes for name in (f"{v.name}.nii.gz", f"{v.name}_gt.nii.gz"))
    for v in volumes:
        image = sitk.ReadImage(str(out / f"{v.name}.nii.gz"))
        label = sitk.ReadImage(str(out / f"{v.name}_gt.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(image), v.image)  # (D, H, W) back, values as stored
        assert np.array_equal(sitk.GetArrayFromImage(label), v.label) and label.GetPixelID() == sitk.sitkUInt8
        assert image.GetSpacing() == pytest.approx(tuple(reversed(v.spacing)))  # (x, y, z) in the file
    # import reads the pairs back: the same volumes, as labeled cases
    rc, _, err = call(["import", "--images", out, "--labels", out, "--out", tmp_path / "back"], capsys)
    assert rc == 0, err
    back = {v.name: v for s in ("train", "val", "test") for v in load_volumes(tmp_path / "back", s, 4)}
    assert set(back) == {v.name for v in volumes}
    for v in volumes:
        assert np.array_equal(back[v.name].label, v.label) and back[v.name].spacing == pytest.approx(v.spacing)
    # an --out with files is refused (nothing touched) unless --overwrite; --no-labels: images only
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, _, err = call(["export-nifti", "--data", tiny_phantom, "--out", out], capsys)
    assert_error(rc, err, f"{out}: --out: folder is not empty ({len(before)} entries: ", "pass --overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "notes.txt").write_text(KEEP)
    rc, _, err = call(["export-nifti", "--data", tiny_phantom, "--split", "val", "--out", out, "--no-labels",
                       "--overwrite"], capsys)
    assert rc == 0, err
    val = [f"{v.name}.nii.gz" for v in load_volumes(tiny_phantom, "val", 4)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "notes.txt", *val])
    assert (out / "notes.txt").read_text() == KEEP


def test_export_nifti_of_a_train_split_with_unlabeled_cases(tmp_path, capsys):
    """An imported dataset's train split holds unlabeled cases (no `label` dataset): they export as
    images alone, with or without --no-labels."""
    img, lab = _nifti_pair(tmp_path, 6)
    (lab / "c5_gt.nii.gz").unlink()
    assert call(["import", "--images", img, "--labels", lab, "--out", tmp_path / "d", "--num-classes", 3], capsys)[0] == 0
    train = read_list(tmp_path / "d", "train")
    assert "c5" in train and len(train) >= 2
    rc, stdout, err = call(["export-nifti", "--data", tmp_path / "d", "--split", "train", "--out", tmp_path / "x",
                            "--num-classes", 3], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(
        [f"{c}.nii.gz" for c in train] + [f"{c}_gt.nii.gz" for c in train if c != "c5"])
    assert f"exported {len(train)} volumes" in stdout and f"with the labels of the {len(train) - 1} labeled ones" in stdout
    rc, _, err = call(["export-nifti", "--data", tmp_path / "d", "--split", "train", "--out", tmp_path / "y",
                       "--num-classes", 3, "--no-labels"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == sorted(f"{c}.nii.gz" for c in train)


def test_export_nifti_bad_input_is_one_line_and_writes_nothing(tiny_phantom, tmp_path, capsys):
    out = tmp_path / "scans"
    rc, _, err = call(["export-nifti", "--data", tiny_phantom, "--split", "tset", "--out", out], capsys)
    assert_error(rc, err, "tset.list", "list file not found", "test, train, train_slices, val")
    rc, _, err = call(["export-nifti", "--data", tmp_path / "nowhere", "--out", out], capsys)
    assert_error(rc, err, "nowhere", "data folder not found")
    (tmp_path / "afile").write_text(KEEP)
    rc, _, err = call(["export-nifti", "--data", tiny_phantom, "--out", tmp_path / "afile"], capsys)
    assert_error(rc, err, "afile: --out: exists and is not a folder")
    rc, _, err = call(["export-nifti", "--data", tiny_phantom, "--out", tmp_path / "afile" / "sub"], capsys)
    assert_error(rc, err, f"afile{os.sep}sub: --out: {tmp_path / 'afile'} is a file; expected a folder path")
    # data imported with --test-fraction 0 has an empty test.list: said so, with the splits that have volumes
    data = Path(shutil.copytree(tiny_phantom, tmp_path / "data"))
    (data / "test.list").write_text("")
    rc, _, err = call(["export-nifti", "--data", data, "--out", out], capsys)
    assert_error(rc, err, f"--split: test: {data / 'test.list'} is empty, so the data has no test volumes; expected "
                          "a split that has some (--split val or --split train)")
    shutil.rmtree(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == KEEP


def test_export_nifti_that_cannot_write_leaves_no_folder_behind(tiny_phantom, tmp_path, capsys, monkeypatch):
    # a full disk cannot be made here: the writer fails as it would, after the first files
    import errno as errno_

    from raysemi.data import export

    real, calls = export.write_nifti, []

    def failing(image, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno_.ENOSPC, "No space left on device")
        real(image, path)

    monkeypatch.setattr(export, "write_nifti", failing)
    rc, _, err = call(["export-nifti", "--data", tiny_phantom, "--out", tmp_path / "new" / "scans"], capsys)
    assert_error(rc, err, f"{calls[2]}: --out: cannot write (No space left on device); expected a folder with room")
    assert not any(tmp_path.iterdir())  # the folders it made are gone, with the two files written
