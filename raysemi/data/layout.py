"""Reader for the SSL4MIS ACDC layout, and the labeled/unlabeled split by patient.

ROOT/train_slices.list, train.list, val.list, test.list; training slices in
ROOT/data/slices/<case>_slice_<z>.h5 and volumes in ROOT/data/<case>.h5, each with datasets
`image` (float) and `label` (integer classes); an optional `spacing` attribute (z, y, x in mm)
on volumes makes HD95/ASD come out in millimetres. Every problem is a one-line UserError that
names the file, the field, the value and what was expected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import h5py
import numpy as np

from raysemi.errors import UserError

SPLITS = ("train_slices", "train", "val", "test")
_PATIENT = re.compile(r"^(.+?)_frame\d+")
_SLICE = re.compile(r"^(.+)_slice_\d+$")


def patient_id(case: str) -> str:
    """'patient012_frame01_slice_3' -> 'patient012'; names without '_frame' keep what precedes '_slice_'."""
    m = _PATIENT.match(case)
    if m:
        return m.group(1)
    m = _SLICE.match(case)
    return m.group(1) if m else case


def read_list(root: str | Path, split: str) -> list[str]:
    """Case names of one split list, in file order."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "data folder not found"
        raise UserError(f"{root}: {what}; expected a folder in the SSL4MIS ACDC layout "
                        "(train_slices.list, val.list, data/...), or 'phantom'")
    path = root / f"{split}.list"
    if not path.is_file():
        there = sorted(p.name[:-len(".list")] for p in root.glob("*.list") if p.is_file())
        raise UserError(f"{path}: list file not found; expected one case name per line (the lists in "
                        f"{root}: {', '.join(there) or 'none'})")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise UserError(f"{path}: list file is empty; expected one case name per line")
    return names


def check_split(root: Path, split: str) -> None:
    """An empty list is data without that split (`data import --test-fraction 0` writes an empty
    test.list): for the CLIs that take a --split (evaluate, export-nifti), say so and which splits
    have volumes, instead of only that the file is empty."""
    def cases(name: str) -> bool:
        path = root / f"{name}.list"
        return path.is_file() and bool(path.read_text().strip())

    path = root / f"{split}.list"
    if path.is_file() and not cases(split):
        others = " or ".join(f"--split {s}" for s in ("val", "test", "train") if s != split and cases(s))
        raise UserError(f"--split: {split}: {path} is empty, so the data has no {split} volumes; expected a split "
                        f"that has some ({others or 'none has: check the data folder'})")


def shipped_list(split: str) -> list[str]:
    """The real ACDC split lists of the SSL4MIS benchmark, shipped with the package."""
    text = resources.files("raysemi.data").joinpath("lists", f"{split}.list").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_labeled(slice_names: list[str], labeled_patients: int, source: str = "train_slices.list"
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Indices of labeled and unlabeled slices: all slices of the first N patients of the list.

    Patients are taken in order of first appearance, the way the reference's "first N slices"
    works on its patient-grouped list; returns (labeled_idx, unlabeled_idx, labeled_patient_ids).
    """
    order: list[str] = []
    ids = [patient_id(n) for n in slice_names]
    for pid in ids:
        if pid not in order:
            order.append(pid)
    if not 1 <= labeled_patients <= len(order):
        raise UserError(f"{source}: labeled_patients: {labeled_patients} is invalid; expected 1 to "
                        f"{len(order)} (the patients in the list)")
    chosen = set(order[:labeled_patients])
    mask = np.array([pid in chosen for pid in ids])
    return np.flatnonzero(mask), np.flatnonzero(~mask), order[:labeled_patients]


class _MissingLabel(UserError):
    """A file read as labeled has no `label` dataset (load_train_slices explains which N to use)."""


def _numeric(path: Path, name: str, dataset, expected: str) -> np.ndarray:
    """A dataset's values, refused in one line unless they are numbers (bool, integer or float)."""
    if not isinstance(dataset, h5py.Dataset):
        raise UserError(f"{path}: {name}: is a group, not a dataset; expected an array of {expected}")
    value = np.asarray(dataset[()])
    if value.dtype.kind not in "biuf":
        raise UserError(f"{path}: {name}: values of type {dataset.dtype} are not numbers; expected {expected}")
    return value


def _read_h5(path: Path, num_classes: int, need_label: bool, listed_in: str) -> tuple[np.ndarray, np.ndarray | None, tuple | None]:
    if not path.is_file():
        raise UserError(f"{path}: listed in {listed_in} but the file is missing")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{path}: not a readable HDF5 file ({err})") from None
    with f:
        if "image" not in f:
            raise UserError(f"{path}: image: dataset missing; expected datasets 'image' and 'label' "
                            f"(found: {', '.join(f.keys()) or 'none'})")
        image = _numeric(path, "image", f["image"], "intensities").astype(np.float32)
        label = None
        if need_label:
            if "label" not in f:
                raise _MissingLabel(f"{path}: label: dataset missing; expected datasets 'image' and 'label' "
                                    f"(found: {', '.join(f.keys())})")
            label = _numeric(path, "label", f["label"], f"integer classes in [0, {num_classes})")
        spacing = None
        if "spacing" in f.attrs:
            try:
                spacing = tuple(float(s) for s in np.atleast_1d(f.attrs["spacing"]))
            except (TypeError, ValueError):
                raise UserError(f"{path}: spacing: {f.attrs['spacing']!r} is not numeric; expected the voxel "
                                "spacing (z, y, x) in mm as numbers") from None
    # a volume's spacing scales HD95 and ASD (a training slice's is never read)
    if spacing is not None and image.ndim == 3 and (
            len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing)):
        raise UserError(f"{path}: spacing: {spacing} is invalid; expected 3 finite numbers > 0 (z, y, x in mm "
                        "per voxel of the volume)")
    if not np.isfinite(image).all():
        raise UserError(f"{path}: image: contains NaN or inf; expected finite intensities")
    if label is not None:
        if label.shape != image.shape:
            raise UserError(f"{path}: label: shape {label.shape} differs from image shape {image.shape}; "
                            "expected the same shape")
        if label.dtype.kind == "f":
            if not np.isfinite(label).all() or (label != np.round(label)).any():
                raise UserError(f"{path}: label: non-integer values; expected integer classes in [0, {num_classes})")
        bad = np.unique(label[(label < 0) | (label >= num_classes)])
        if bad.size:
            raise UserError(f"{path}: label: values {bad[:5].tolist()} outside [0, {num_classes}); "
                            f"expected classes 0..{num_classes - 1} (num_classes={num_classes})")
        label = label.astype(np.int64)
    return image, label, spacing


@dataclass
class Volume:
    """One validation/test volume: (D, H, W) image and label, spacing (z, y, x) in mm or None."""

    name: str
    image: np.ndarray
    label: np.ndarray  # None only from load_volumes(need_labels=False): an unlabeled case
    spacing: tuple[float, ...] | None = None


@dataclass
class TrainSlices:
    """Training slices as lists of arrays (sizes may differ); labels only for labeled slices."""

    names: list[str]
    images: list[np.ndarray]
    labels: dict[int, np.ndarray]
    labeled_idx: np.ndarray
    unlabeled_idx: np.ndarray
    labeled_patients: list[str] = field(default_factory=list)


def load_train_slices(root: str | Path, labeled_patients: int, num_classes: int) -> TrainSlices:
    """Read every training slice; the label only of labeled ones (unlabeled files may lack it)."""
    root = Path(root)
    names = read_list(root, "train_slices")
    labeled, unlabeled, pids = split_labeled(names, labeled_patients, str(root / "train_slices.list"))
    is_labeled = np.zeros(len(names), bool)
    is_labeled[labeled] = True
    images, labels = [], {}
    for i, name in enumerate(names):
        path = root / "data" / "slices" / f"{name}.h5"
        try:
            image, label, _ = _read_h5(path, num_classes, bool(is_labeled[i]), "train_slices.list")
        except _MissingLabel:
            raise _too_many_labeled(root, names, labeled_patients, path) from None
        if image.ndim != 2:
            raise UserError(f"{root / 'data' / 'slices' / (name + '.h5')}: image: shape {image.shape}; "
                            "expected a 2D slice (H, W)")
        images.append(image)
        if label is not None:
            labels[i] = label
    return TrainSlices(names, images, labels, labeled, unlabeled, pids)


def _too_many_labeled(root: Path, names: list[str], labeled_patients: int, path: Path) -> UserError:
    """The error for a slice without `label` among the first N patients: how many lead with labels.

    An imported folder lists its labeled patients first, then the unlabeled ones (whose files have
    no `label`), so the usable N is the count of leading patients whose slices all have labels.
    """
    order: dict[str, list[str]] = {}
    for n in names:
        order.setdefault(patient_id(n), []).append(n)

    def has_label(name: str) -> bool:
        try:
            with h5py.File(root / "data" / "slices" / f"{name}.h5", "r") as f:
                return "label" in f
        except OSError:
            return False

    leading = 0
    for slices in order.values():
        if not all(has_label(n) for n in slices):
            break
        leading += 1
    pid = patient_id(path.stem)
    rank = list(order).index(pid) + 1
    fix = (f"expected labeled_patients (--labeled-patients) 1 to {leading}: only the first {leading} patients of "
           "the list have labels" if leading else "expected a 'label' dataset in every slice of the first "
           f"{labeled_patients} patients of the list (labeled patients come first)")
    return UserError(f"{path}: label: dataset missing, but labeled_patients {labeled_patients} takes patient {pid} "
                     f"(number {rank} in {root / 'train_slices.list'}) as labeled; {fix}")


def load_volumes(root: str | Path, split: str, num_classes: int, need_labels: bool = True) -> list[Volume]:
    """Read the volumes of `val`, `test` or `train` as (D, H, W) arrays with their labels; with
    `need_labels` False, a volume without one (an unlabeled training case) has label None."""
    root = Path(root)
    volumes = []
    for name in read_list(root, split):
        path = root / "data" / f"{name}.h5"
        try:
            image, label, spacing = _read_h5(path, num_classes, True, f"{split}.list")
        except _MissingLabel:
            if need_labels:
                raise
            image, label, spacing = _read_h5(path, num_classes, False, f"{split}.list")
        if image.ndim == 2:
            image, label = image[None], None if label is None else label[None]
        if image.ndim != 3:
            raise UserError(f"{path}: image: shape {image.shape}; expected a volume (D, H, W)")
        if spacing is not None and len(spacing) != 3:
            raise UserError(f"{path}: spacing: {spacing} has {len(spacing)} values; expected 3 (z, y, x) in mm")
        volumes.append(Volume(name, image, label, spacing))
    return volumes
