"""raysemi.predict: NIfTI volumes in, uint8 label volumes out with the input's geometry; every bad
input is one `error:` line, exit 2, and nothing written or left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from raysemi.data import load_dataset, read_list
from raysemi.data.normalize import minmax
from raysemi.errors import run_cli
from raysemi.evaluate import load_network
from raysemi.inference import predict_volume
from raysemi.loop import Trainer
from raysemi.predict import main, output_name
from tests.conftest import tiny_config

SPACING = (1.37, 1.25, 8.0)
ORIGIN = (-120.5, 80.25, 33.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # a rotation, not the identity
KEEP = b"precious user data\n"


@pytest.fixture(scope="module")
def trained(tiny_phantom, tmp_path_factory) -> Path:
    """best.pt of a 2-iteration mean_teacher run (student and teacher networks)."""
    out = tmp_path_factory.mktemp("predict_run")
    cfg = tiny_config(tiny_phantom, method="mean_teacher", max_iterations=2, eval_interval=2, eval_hd95=False)
    Trainer(cfg, load_dataset(cfg.data, cfg.labeled_patients, cfg.num_classes), output_dir=out).fit()
    return out / "best.pt"


@pytest.fixture(scope="module")
def raw_volume(tiny_phantom) -> np.ndarray:
    """A validation volume of the phantom, padded to a non-square size other than the patch size,
    and scaled to scanner-like int16 values (so predict has to normalise it)."""
    with h5py.File(tiny_phantom / "data" / f"{read_list(tiny_phantom, 'val')[0]}.h5") as f:
        image = f["image"][()]
    image = np.pad(image, ((0, 0), (3, 5), (0, 6)), mode="edge")  # (D, 40, 38)
    return np.round(image * 900 + 40).astype(np.int16)


def write_nifti(path: Path, array: np.ndarray, geometry: bool = True) -> Path:
    image = sitk.GetImageFromArray(array)
    if geometry:
        image.SetSpacing(SPACING)
        image.SetOrigin(ORIGIN)
        image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path))
    return path


def call(args: list, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = run_cli(main, [str(a) for a in args])
    except SystemExit as exit_:
        rc = exit_.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_error(rc: int, err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def test_round_trip_keeps_geometry_and_matches_predict_volume(trained, raw_volume, tmp_path, capsys):
    src = write_nifti(tmp_path / "case01.nii.gz", raw_volume)
    out = tmp_path / "pred"
    rc, stdout, err = call(["--checkpoint", trained, "--input", src, "--out", out, "--device", "cpu",
                            "--batch-size", "3"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["case01_pred.nii.gz"]  # no temporary file left
    assert "[1/1] case01.nii.gz" in stdout and "case01_pred.nii.gz" in stdout

    pred = sitk.ReadImage(str(out / "case01_pred.nii.gz"))
    ref = sitk.ReadImage(str(src))
    assert pred.GetSize() == ref.GetSize() == raw_volume.shape[::-1]
    assert pred.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(pred.GetSpacing(), SPACING) and np.allclose(pred.GetOrigin(), ORIGIN)
    assert np.allclose(pred.GetDirection(), DIRECTION)
    labels = sitk.GetArrayFromImage(pred)
    assert labels.min() >= 0 and labels.max() <= 3

    # the same labels as the inference code on the same normalised array, with the same network
    net, config = load_network(trained, None, torch.device("cpu"))
    expected = predict_volume(net, minmax(raw_volume), config.patch_size, torch.device("cpu"), 32)
    np.testing.assert_array_equal(labels, expected)
    # and the normalisation gives back the training data's [0, 1] intensities
    assert np.allclose(minmax(raw_volume), (raw_volume - 40) / 900, atol=2e-3)


def test_teacher_network_can_be_chosen(trained, raw_volume, tmp_path, capsys):
    src = write_nifti(tmp_path / "case01.nii", raw_volume, geometry=False)
    rc, stdout, err = call(["--checkpoint", trained, "--input", src, "--out", tmp_path / "p", "--device", "cpu",
                            "--eval-model", "teacher"], capsys)
    assert rc == 0, err
    assert "teacher" in stdout.splitlines()[0]
    net, config = load_network(trained, "teacher", torch.device("cpu"))
    expected = predict_volume(net, minmax(raw_volume), config.patch_size, torch.device("cpu"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p" / "case01_pred.nii.gz"))),
                                  expected)


def test_folder_of_two_scans_gives_two_outputs(trained, raw_volume, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti(scans / "a.nii.gz", raw_volume)
    write_nifti(scans / "b.nii", raw_volume[::-1].copy())
    (scans / "notes.txt").write_bytes(KEEP)  # not NIfTI: skipped in a folder
    (scans / ".a_pred.nii.gz.1234.tmp.nii.gz").write_bytes(b"")  # hidden (a killed run's temp file): skipped
    write_nifti(scans / "a_gt.nii.gz", raw_volume)  # a's label beside it (import's naming rule): skipped
    write_nifti(scans / "b_seg.nii.gz", raw_volume)  # b.nii's label
    write_nifti(scans / "c_label.nii.gz", raw_volume)  # no c beside it: a scan of that name, predicted
    out = tmp_path / "out"
    rc, stdout, err = call(["--checkpoint", trained, "--input", scans, "--out", out, "--device", "cpu"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a_pred.nii.gz", "b_pred.nii.gz", "c_label_pred.nii.gz"]
    assert "[1/3] a.nii.gz" in stdout and "[2/3] b.nii" in stdout and "[3/3] c_label.nii.gz" in stdout
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a_pred.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "b_pred.nii.gz")))
    np.testing.assert_array_equal(a[::-1], b)  # slice by slice: reversing the slices reverses the labels


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_nested_folders_keep_their_structure_and_match_single_file_runs(trained, raw_volume, tmp_path, capsys):
    """--input searches subfolders as `import --images` does (one folder per patient); --out repeats the
    subfolders, so equal names from two folders do not collide."""
    scans = tmp_path / "scans"
    for sub in ("patient001", "patient002/deeper", ".cache"):
        (scans / sub).mkdir(parents=True)
    write_nifti(scans / "patient001" / "patient001_frame01.nii.gz", raw_volume)
    write_nifti(scans / "patient002" / "patient002_frame01.nii", raw_volume[::-1].copy())
    write_nifti(scans / "patient002" / "deeper" / "patient001_frame01.nii.gz", raw_volume[:, 2:-3].copy())
    write_nifti(scans / "top.nii.gz", raw_volume[:, :, 1:].copy(), geometry=False)
    write_nifti(scans / ".cache" / "hidden.nii.gz", raw_volume)  # hidden folder: skipped
    (scans / "patient001" / "notes.txt").write_bytes(KEEP)  # not NIfTI: skipped
    (scans / "patient001" / "loop").symlink_to(scans, target_is_directory=True)  # searched once, no loop
    out = tmp_path / "out"
    rc, stdout, err = call(["--checkpoint", trained, "--input", scans, "--out", out, "--device", "cpu"], capsys)
    assert rc == 0, err
    expected = {"patient001/patient001_frame01.nii.gz": "patient001/patient001_frame01_pred.nii.gz",
                "patient002/patient002_frame01.nii": "patient002/patient002_frame01_pred.nii.gz",
                "patient002/deeper/patient001_frame01.nii.gz": "patient002/deeper/patient001_frame01_pred.nii.gz",
                "top.nii.gz": "top_pred.nii.gz"}
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(expected.values())  # no temporary file, nothing from .cache or the link
    assert "4 volume(s)" in stdout.splitlines()[0]
    for src, dst in expected.items():
        assert f"] {src}: " in stdout and f"-> {dst} " in stdout
        alone = tmp_path / "alone" / src  # the same file predicted on its own
        rc, _, err = call(["--checkpoint", trained, "--input", scans / src, "--out", alone, "--device", "cpu"],
                          capsys)
        assert rc == 0, err
        pred, ref = sitk.ReadImage(str(out / dst)), sitk.ReadImage(str(scans / src))
        assert pred.GetSize() == ref.GetSize() and pred.GetPixelID() == sitk.sitkUInt8
        assert np.allclose(pred.GetSpacing(), ref.GetSpacing()) and np.allclose(pred.GetOrigin(), ref.GetOrigin())
        assert np.allclose(pred.GetDirection(), ref.GetDirection())
        np.testing.assert_array_equal(_labels(out / dst), _labels(alone / Path(dst).name))


def test_out_inside_input_is_not_read_as_input(trained, raw_volume, tmp_path, capsys):
    scans = tmp_path / "scans"
    (scans / "patient001").mkdir(parents=True)
    write_nifti(scans / "patient001" / "patient001_frame01.nii.gz", raw_volume)
    write_nifti(scans / "a.nii.gz", raw_volume[::-1].copy())
    out = scans / "predictions"
    args = ["--checkpoint", trained, "--input", scans, "--out", out, "--device", "cpu"]
    rc, _, err = call(args, capsys)
    assert rc == 0, err
    first = {str(p.relative_to(out)): _labels(p) for p in out.rglob("*") if p.is_file()}
    assert sorted(first) == ["a_pred.nii.gz", "patient001/patient001_frame01_pred.nii.gz"]
    rc, stdout, err = call(args + ["--overwrite"], capsys)  # the first run's outputs are now inside --input
    assert rc == 0, err
    assert "2 volume(s)" in stdout.splitlines()[0] and "predictions/" not in stdout.split("->", 1)[1]
    again = {str(p.relative_to(out)): _labels(p) for p in out.rglob("*") if p.is_file()}
    assert sorted(again) == sorted(first)  # nothing like predictions/predictions/... or *_pred_pred
    for name, labels in first.items():
        np.testing.assert_array_equal(again[name], labels)


def test_minmax_is_the_ssl4mis_rule():
    x = np.array([[[2.0, 4.0], [6.0, 10.0]]], np.float64)
    y = minmax(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, (x - 2) / 8)
    np.testing.assert_array_equal(minmax(np.full((2, 3, 3), 7, np.int16)), np.zeros((2, 3, 3), np.float32))
    for bad in (np.array([1.0, np.nan]), np.array([np.inf, 0.0]), np.zeros((0, 4))):
        with pytest.raises(ValueError):
            minmax(bad)


def test_output_names():
    assert output_name(Path("x/case01.nii.gz")) == "case01_pred.nii.gz"
    assert output_name(Path("patient001_frame01.nii")) == "patient001_frame01_pred.nii.gz"
    assert output_name(Path("SCAN.NII.GZ")) == "SCAN_pred.nii.gz"


def test_overwrite_replaces_only_our_outputs(trained, raw_volume, tmp_path, capsys):
    src = write_nifti(tmp_path / "a.nii.gz", raw_volume)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(KEEP)
    (out / "a_pred.nii.gz").write_bytes(b"an older prediction")
    rc, _, err = call(["--checkpoint", trained, "--input", src, "--out", out, "--device", "cpu"], capsys)
    assert_error(rc, err, str(out), "--out", "not empty", "notes.txt", "--overwrite")
    assert (out / "a_pred.nii.gz").read_bytes() == b"an older prediction"

    rc, _, err = call(["--checkpoint", trained, "--input", src, "--out", out, "--device", "cpu", "--overwrite"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a_pred.nii.gz", "notes.txt"]
    assert (out / "notes.txt").read_bytes() == KEEP
    assert sitk.ReadImage(str(out / "a_pred.nii.gz")).GetSize() == raw_volume.shape[::-1]


# ---- bad input --------------------------------------------------------------------------------------
def _retouch(trained: Path, path: Path, change) -> Path:
    ckpt = torch.load(trained, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


def _other_architecture(c):
    c["model"] = "unet_ds"


def _class_count(c):
    c["config"]["num_classes"] = 3


def _reshaped_tensor(c):
    state = c["networks"]["student"]
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 2)


def _networks_not_a_mapping(c):
    c["networks"] = [torch.zeros(3)]


CHECKPOINT_CASES = [
    pytest.param(None, ["not a raysemi checkpoint"], id="random_bytes"),
    pytest.param(_other_architecture, ["networks.student", "does not match the model unet_ds", "aux_heads"],
                 id="other_architecture"),
    pytest.param(_class_count, ["networks.student", "num_classes=3", "size mismatch for head.weight"],
                 id="class_count"),
    pytest.param(_reshaped_tensor, ["networks.student", "size mismatch for", "torch.Size"], id="tensor_shape"),
    pytest.param(_networks_not_a_mapping, ["networks", "expected a file written by raysemi.train"],
                 id="networks_not_a_mapping"),
]


@pytest.mark.parametrize("change,needles", CHECKPOINT_CASES)
def test_bad_checkpoint_is_one_line_and_writes_nothing(change, needles, trained, raw_volume, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    if change is None:
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        _retouch(trained, bad, change)
    src = write_nifti(tmp_path / "a.nii.gz", raw_volume)
    out = tmp_path / "out"
    rc, _, err = call(["--checkpoint", bad, "--input", src, "--out", out, "--device", "cpu"], capsys)
    assert_error(rc, err, str(bad), *needles)
    assert not out.exists()


def _four_d(path: Path, volume: np.ndarray) -> None:
    frames = [sitk.GetImageFromArray(volume.astype(np.float32)) for _ in range(2)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))


INPUT_CASES = [
    pytest.param("scan.nii.gz", lambda p, v: p.write_bytes(b"not a nifti at all"),
                 ["scan.nii.gz", "not a readable NIfTI file"], id="not_nifti_content"),
    pytest.param("cut.nii.gz", lambda p, v: write_nifti(p, np.random.default_rng(0).random((4, 64, 64)))
                 and p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
                 ["cut.nii.gz: the file is cut off or damaged", "expected a whole scan"], id="cut_off"),
    pytest.param("scan.png", lambda p, v: p.write_bytes(b"\x89PNG"), ["scan.png", "not a NIfTI file name"],
                 id="not_nifti_name"),
    pytest.param("slice.nii.gz", lambda p, v: sitk.WriteImage(sitk.GetImageFromArray(v[0]), str(p)),
                 ["slice.nii.gz", "2D image", "expected a 3D volume"], id="2d_nifti"),
    pytest.param("cine.nii.gz", _four_d, ["cine.nii.gz", "4D image", "expected a 3D volume"], id="4d_nifti"),
    pytest.param("rgb.nii.gz", lambda p, v: sitk.WriteImage(sitk.GetImageFromArray(
        np.stack([v] * 3, -1).astype(np.float32), isVector=True), str(p)), ["rgb.nii.gz", "components: 3"],
        id="vector_nifti"),
]


@pytest.mark.parametrize("name,make,needles", INPUT_CASES)
def test_bad_input_file_is_one_line_and_writes_nothing(name, make, needles, trained, raw_volume, tmp_path, capsys):
    src = tmp_path / name
    make(src, raw_volume)
    out = tmp_path / "out"
    rc, _, err = call(["--checkpoint", trained, "--input", src, "--out", out, "--device", "cpu"], capsys)
    assert_error(rc, err, *needles)
    assert not out.exists() or not any(out.iterdir())


def test_a_bad_scan_in_a_folder_stops_before_any_output(trained, raw_volume, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti(scans / "a.nii.gz", raw_volume)
    sitk.WriteImage(sitk.GetImageFromArray(raw_volume[0]), str(scans / "b.nii.gz"))  # 2D
    out = tmp_path / "out"
    rc, _, err = call(["--checkpoint", trained, "--input", scans, "--out", out, "--device", "cpu"], capsys)
    assert_error(rc, err, "b.nii.gz", "2D image")
    assert not out.exists()


def test_cine_sequences_in_a_folder_are_skipped_and_said_so(trained, raw_volume, tmp_path, capsys):
    """ACDC's layout: patientNNN_4d.nii.gz beside its 3D frames and their labels. The frames are
    predicted, the cine is skipped with one line naming it; a folder of cines alone is refused."""
    scans = tmp_path / "testing"
    (scans / "patient101").mkdir(parents=True)
    write_nifti(scans / "patient101" / "patient101_frame01.nii.gz", raw_volume)
    write_nifti(scans / "patient101" / "patient101_frame01_gt.nii.gz", (raw_volume > raw_volume.mean()).astype(np.uint8))
    _four_d(scans / "patient101" / "patient101_4d.nii.gz", raw_volume)
    out = tmp_path / "out"
    rc, stdout, _ = call(["--checkpoint", trained, "--input", scans, "--out", out, "--device", "cpu"], capsys)
    assert rc == 0
    assert "skipped 1 4D volume(s)" in stdout and "patient101/patient101_4d.nii.gz" in stdout
    assert "1 volume(s)" in stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz")) == \
        ["patient101/patient101_frame01_pred.nii.gz"]

    cines = tmp_path / "cines"
    cines.mkdir()
    _four_d(cines / "a_4d.nii.gz", raw_volume)
    rc, _, err = call(["--checkpoint", trained, "--input", cines, "--out", tmp_path / "out2", "--device", "cpu"], capsys)
    assert_error(rc, err, str(cines), "--input", "only 4D volumes (1, e.g. a_4d.nii.gz)", "expected 3D volumes")
    assert not (tmp_path / "out2").exists()


def test_case_folders_with_generic_names_predict_the_image_not_the_label(trained, raw_volume, tmp_path, capsys):
    """KiTS's layout (import --case-per-folder): case_00000/imaging.nii.gz beside segmentation.nii.gz."""
    scans = tmp_path / "kits"
    for case in ("case_00000", "case_00001"):
        (scans / case).mkdir(parents=True)
        write_nifti(scans / case / "imaging.nii.gz", raw_volume)
        write_nifti(scans / case / "segmentation.nii.gz", (raw_volume > raw_volume.mean()).astype(np.uint8))
    (scans / "lonely").mkdir()
    write_nifti(scans / "lonely" / "mask.nii.gz", raw_volume)  # alone in its folder: a scan after all
    out = tmp_path / "out"
    rc, _, err = call(["--checkpoint", trained, "--input", scans, "--out", out, "--device", "cpu"], capsys)
    assert rc == 0, err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz")) == [
        "case_00000/imaging_pred.nii.gz", "case_00001/imaging_pred.nii.gz", "lonely/mask_pred.nii.gz"]


def test_tree_without_nifti_is_one_line(trained, raw_volume, tmp_path, capsys):
    """Subfolders are searched, but hidden ones and --out are not: a tree whose only NIfTI files lie
    there holds no input."""
    scans = tmp_path / "scans"
    for sub in ("patient001", "patient002", ".hidden", "pred/patient003"):
        (scans / sub).mkdir(parents=True)
    (scans / "patient001" / "readme.txt").write_bytes(KEEP)
    write_nifti(scans / ".hidden" / "a.nii.gz", raw_volume)
    write_nifti(scans / "pred" / "patient003" / "b_pred.nii.gz", raw_volume)
    rc, _, err = call(["--checkpoint", trained, "--input", scans, "--out", scans / "pred", "--device", "cpu"],
                      capsys)
    assert_error(rc, err, str(scans), "--input", "no .nii or .nii.gz file", "subfolders")
    assert sorted(p.name for p in (scans / "pred").rglob("*")) == ["b_pred.nii.gz", "patient003"]


def test_out_subfolder_that_is_a_file_is_refused_before_writing(trained, raw_volume, tmp_path, capsys):
    scans = tmp_path / "scans"
    (scans / "p1").mkdir(parents=True)
    (scans / "p2").mkdir()
    write_nifti(scans / "p1" / "a.nii.gz", raw_volume)
    write_nifti(scans / "p2" / "a.nii.gz", raw_volume)
    out = tmp_path / "out"
    out.mkdir()
    (out / "p2").write_bytes(KEEP)
    rc, _, err = call(["--checkpoint", trained, "--input", scans, "--out", out, "--device", "cpu", "--overwrite"],
                      capsys)
    assert_error(rc, err, str(out / "p2"), "not a folder")
    assert sorted(p.name for p in out.iterdir()) == ["p2"] and (out / "p2").read_bytes() == KEEP


def test_empty_folder_and_missing_input(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_bytes(KEEP)
    rc, _, err = call(["--checkpoint", trained, "--input", tmp_path / "empty", "--out", tmp_path / "o"], capsys)
    assert_error(rc, err, str(tmp_path / "empty"), "no .nii or .nii.gz file")
    rc, _, err = call(["--checkpoint", trained, "--input", tmp_path / "nope", "--out", tmp_path / "o"], capsys)
    assert_error(rc, err, str(tmp_path / "nope"), "--input", "no such file or folder")
    rc, _, err = call(["--checkpoint", trained, "--input", tmp_path / "empty", "--out", tmp_path / "o",
                       "--batch-size", "0"], capsys)
    assert_error(rc, err, "--batch-size", "0")
    assert not (tmp_path / "o").exists()


def test_out_that_would_replace_an_input_or_is_a_file(trained, raw_volume, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti(scans / "a.nii.gz", raw_volume)
    write_nifti(scans / "a_pred.nii.gz", raw_volume)  # a user's input that happens to bear our output name
    before = {p.name: p.read_bytes() for p in scans.iterdir()}
    rc, _, err = call(["--checkpoint", trained, "--input", scans, "--out", scans, "--overwrite"], capsys)
    assert_error(rc, err, "a_pred.nii.gz", "would replace the input")
    assert {p.name: p.read_bytes() for p in scans.iterdir()} == before
    (tmp_path / "file").write_bytes(KEEP)
    rc, _, err = call(["--checkpoint", trained, "--input", scans / "a.nii.gz", "--out", tmp_path / "file"], capsys)
    assert_error(rc, err, "file", "not a folder")
    assert (tmp_path / "file").read_bytes() == KEEP


def test_console_script_entry_point(tmp_path):
    """`python -m raysemi predict` reaches the same CLI; bad input answers before torch loads."""
    r = subprocess.run([sys.executable, "-m", "raysemi", "predict", "--checkpoint", "x.pt", "--input",
                        str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert_error(r.returncode, r.stderr, "missing.nii.gz", "no such file or folder")


def test_a_labels_tree_beside_the_images_is_left_out_and_said_so(trained, raw_volume, tmp_path, capsys):
    """images/ and labels/ mirrored (or nnU-Net's imagesTr/ and labelsTr/): the scans are predicted,
    the labels skipped with one line naming their folders; a labels folder given itself is predicted."""
    data = tmp_path / "data"
    label = (raw_volume > raw_volume.mean()).astype(np.uint8)
    for top, other in (("images", "labels"), ("imagesTr", "labelsTr")):
        for case in ("a", "b"):
            (data / top / case).mkdir(parents=True, exist_ok=True)
            (data / other / case).mkdir(parents=True, exist_ok=True)
            write_nifti(data / top / case / f"{case}.nii.gz", raw_volume)
            write_nifti(data / other / case / f"{case}.nii.gz", label)
    (data / "Labeled").mkdir()  # a name that only starts like one: scans
    write_nifti(data / "Labeled" / "c.nii.gz", raw_volume)
    out = tmp_path / "out"
    rc, stdout, err = call(["--checkpoint", trained, "--input", data, "--out", out, "--device", "cpu"], capsys)
    assert rc == 0, err
    assert "skipped 4 file(s) in labels folders (by name; give one as --input to predict its files): labels/, " \
           "labelsTr/" in stdout and "5 volume(s)" in stdout
    assert "label map" not in stdout  # scans are not taken for labels
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz")) == [
        "Labeled/c_pred.nii.gz", "images/a/a_pred.nii.gz", "images/b/b_pred.nii.gz", "imagesTr/a/a_pred.nii.gz", "imagesTr/b/b_pred.nii.gz"]
    # the labels folder itself: its files are what was asked for
    rc, stdout, err = call(["--checkpoint", trained, "--input", data / "labels", "--out", tmp_path / "out2",
                            "--device", "cpu"], capsys)
    assert rc == 0 and "skipped" not in stdout, err
    assert len(list((tmp_path / "out2").rglob("*_pred.nii.gz"))) == 2
    # ... and as they hold only label values, each line and a last warning say so
    assert stdout.count("; holds only the values 0, 1: a label map?") == 2
    assert stdout.strip().splitlines()[-1] == (
        "warning: 2 of 2 inputs hold only a few integer values, as label maps do (e.g. a/a.nii.gz: 0, 1); if they "
        "are labels, their predictions mean nothing: give the scans as --input")
    # a tree of labels folders only: one line, nothing written
    only = tmp_path / "only"
    (only / "masks").mkdir(parents=True)
    write_nifti(only / "masks" / "a.nii.gz", label)
    rc, _, err = call(["--checkpoint", trained, "--input", only, "--out", tmp_path / "out4", "--device", "cpu"], capsys)
    assert_error(rc, err, str(only), "--input", "only files in labels folders (masks/)", "expected scans")
    assert not (tmp_path / "out4").exists()


def test_the_phantom_exported_to_nifti_is_predicted_image_by_image(trained, tiny_phantom, tmp_path, capsys):
    """`raysemi.data export-nifti` writes <case>.nii.gz and <case>_gt.nii.gz: predict takes the
    images, skips the labels beside them, and gives what predict_volume gives on the h5 volume."""
    from raysemi.data import load_volumes
    from raysemi.data.export import export_nifti

    export_nifti(tiny_phantom, "test", tmp_path / "scans")
    out = tmp_path / "out"
    rc, stdout, err = call(["--checkpoint", trained, "--input", tmp_path / "scans", "--out", out, "--device", "cpu"],
                           capsys)
    assert rc == 0, err
    volumes = load_volumes(tiny_phantom, "test", 4)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{v.name}_pred.nii.gz" for v in volumes)
    assert "label map" not in stdout  # the phantom's normalised images are not taken for labels
    net, config = load_network(trained, None, torch.device("cpu"))
    for v in volumes:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{v.name}_pred.nii.gz")))
        expected = predict_volume(net, minmax(v.image), config.patch_size, torch.device("cpu"), 32, False)
        assert np.array_equal(pred, expected)
