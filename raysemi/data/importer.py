"""`import`: a user's own NIfTI volumes or PNG slices, labeled or not, into the SSL4MIS layout.

Rules (also in `python -m raysemi.data import --help`):
- --images holds either 3D NIfTI volumes (.nii, .nii.gz) or 2D PNG slices, not both, directly or in
  subfolders at any depth (one folder per patient is fine); hidden files and folders are ignored, and
  so are the --labels and --out folders when they lie inside --images; any other file is an error.
  Case names must be unique over the whole tree (two files giving the same name are refused, both
  named), and the slices of a PNG case must lie in one folder.
- PNG slices named `<case>_slice_<k>.png` make one case (a volume), ordered by the integer k; any other
  PNG is a case of its own (one slice). A NIfTI file is one case. The case name is the file name
  without its extension (and without `_slice_<k>` for PNG).
- The label of image `X.nii.gz` / `X.png` is the file in --labels (or any of its subfolders) named
  `X`, `X_gt`, `X_label` or `X_seg` with a NIfTI / PNG extension (--labels may be the --images folder
  itself, labels beside their images: its label files are then not taken as images). A label file
  that matches no image is an error, and so are two label files of the same name.
- Labels hold class indices 0..num_classes-1, with the image's shape (and, for NIfTI, its voxel grid: spacing,
  origin and orientation).
- Cases are grouped into patients as the layout does (`patient007_frame01` and `patient007_frame02`
  are patient007; other names are their own patient); all cases of a patient are labeled or none.
- Labeled patients are shuffled with --seed and split into train/val/test by the fractions; every
  unlabeled case goes to train, after the labeled ones, so `--labeled-patients N` (the first N
  patients of train_slices.list) with N up to the number of labeled training patients takes labeled
  patients only. Unlabeled case files have no `label` dataset.
- Images are min-max normalised per volume (per case) as prepare-acdc does; `spacing` (z, y, x) is
  stored for NIfTI, not for PNG.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from raysemi.data.convert import (Progress, check_image, check_label, check_same_grid, nifti_stem,
                                  read_nifti, read_png, slice_name, staged_output, walk_files, write_lists,
                                  write_volume)
from raysemi.data.layout import patient_id
from raysemi.data.normalize import minmax
from raysemi.errors import UserError

LABEL_SUFFIXES = ("", "_gt", "_label", "_seg")
#: folder names that say "the labels are here", for the hint of an error
LABEL_FOLDERS = {"masks", "mask", "labels", "label", "gt", "seg", "segs", "segmentation", "segmentations",
                 "annotations", "ground_truth", "groundtruth"}
_PNG_SLICE = re.compile(r"^(.+)_slice_(\d+)$")


@dataclass
class Case:
    name: str
    images: list[Path]  # NIfTI: one file; PNG: the slices in order
    labels: list[Path] | None = None

    @property
    def patient(self) -> str:
        return patient_id(slice_name(self.name, 0))  # how split_labeled will see its slices


@dataclass
class ImportSummary:
    out: Path
    kind: str
    lists: dict[str, list[str]]
    labeled_patients: list[str]  # in the order of train.list
    unlabeled_cases: int
    val_patients: int
    test_patients: int
    notes: list[str] = field(default_factory=list)


def _files(folder: Path, flag: str, skip: tuple[Path | None, ...] = ()) -> list[Path]:
    """The files in `folder` and its subfolders (`walk_files`: hidden ones and the folders of `skip`
    left out), after checking that `folder` is one."""
    if not folder.exists():
        raise UserError(f"{folder}: {flag} folder not found; expected a folder of .nii/.nii.gz or .png files")
    if not folder.is_dir():
        raise UserError(f"{folder}: {flag} is not a folder; expected a folder of .nii/.nii.gz or .png files")
    return walk_files(folder, flag, skip)


def _kind(path: Path) -> str | None:
    if nifti_stem(path.name) is not None:
        return "nifti"
    return "png" if path.suffix.lower() == ".png" else None


def _stem(path: Path) -> str:
    return nifti_stem(path.name) or path.stem


def _label_base(stem: str) -> str | None:
    for suffix in LABEL_SUFFIXES[1:]:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[:-len(suffix)]
    return None


def scan(images: Path, labels: Path | None, out: Path | None = None) -> tuple[str, list[Case]]:
    """The cases in `images` with their label files from `labels`, both searched with their subfolders
    (see the module doc for the rules); `out` is left out of both searches."""
    files = _files(images, "--images", (labels, out))
    if not files:
        raise UserError(f"{images}: --images folder is empty (no file in it or its subfolders, hidden ones "
                        "aside); expected .nii/.nii.gz volumes or .png slices")
    for p in files:
        if _kind(p) is None:
            raise UserError(f"{p}: not a NIfTI (.nii, .nii.gz) or PNG file; expected only images in --images "
                            "(labels go in --labels)")
    kinds = {_kind(p) for p in files}
    if len(kinds) > 1:
        png = next(p for p in files if _kind(p) == "png")
        raise UserError(f"{png}: PNG among NIfTI files in {images}; expected one kind: 3D NIfTI volumes or 2D "
                        "PNG slices")
    kind = kinds.pop()
    same_folder = labels is not None and labels.resolve() == images.resolve()
    stems = {}
    for p in files:
        s = _stem(p)
        if s in stems:
            what = "file" if same_folder else "image"  # side by side, a label's name may be the one twice
            a, b = sorted((stems[s].parent, p.parent), key=lambda f: f.name.lower() in LABEL_FOLDERS)
            hint = (f"images and labels in two folders? pass --images {a} --labels {b}"
                    if a.parent == b.parent and b.name.lower() in LABEL_FOLDERS else
                    "for one folder per case with the same file names in each, pass --case-per-folder")
            raise UserError(f"{p}: {what} name {s!r} again (also {stems[s]}); expected one file per {what} name in "
                            f"--images and its subfolders (an image's name is its case name; {hint})")
        stems[s] = p
    if same_folder:  # images and labels side by side: X.nii.gz with X_gt.nii.gz
        lone = [s for s in stems if _label_base(s) is not None and _label_base(s) not in stems]
        if lone:  # a typo in the image's or the label's name must not make the label an unlabeled image
            base = _label_base(lone[0])
            raise UserError(f"{stems[lone[0]]}: named as a label (…{lone[0][len(base):]}), "
                            f"but no image {base!r} lies in {images}"
                            f"{f' (and {len(lone) - 1} more)' if len(lone) > 1 else ''}; expected its image beside "
                            "it (or, if it is an image, a name without _gt, _label or _seg at the end)")
        stems = {s: p for s, p in stems.items() if _label_base(s) not in stems}

    label_files: dict[str, Path] = {}
    if labels is not None:
        for p in (files if same_folder else _files(labels, "--labels", (images, out))):
            if _kind(p) != kind:
                raise UserError(f"{p}: not a {'NIfTI' if kind == 'nifti' else 'PNG'} file; expected labels of the "
                                f"same kind as the images in --labels")
            if _stem(p) in label_files:
                raise UserError(f"{p}: label name {_stem(p)!r} again (also {label_files[_stem(p)]}); expected one "
                                "file per label name in --labels and its subfolders")
            label_files[_stem(p)] = p
    used: set[str] = set()

    def label_of(stem: str) -> Path | None:
        matches = [stem + s for s in LABEL_SUFFIXES if stem + s in label_files and not (same_folder and s == "")]
        if len(matches) > 1:
            names = ", ".join(str(label_files[m]) for m in matches)
            raise UserError(f"{labels}: {names} all match image {stems[stem]}; expected one label per image")
        if matches:
            used.add(matches[0])
            return label_files[matches[0]]
        return None

    cases: dict[str, Case] = {}
    if kind == "nifti":
        for s, p in stems.items():
            lab = label_of(s)
            cases[s] = Case(s, [p], [lab] if lab else None)
    else:
        groups: dict[str, dict[int, Path]] = {}
        for s, p in stems.items():
            m = _PNG_SLICE.match(s)
            name, index = (m.group(1), int(m.group(2))) if m else (s, None)
            group = groups.setdefault(name, {})
            if index is None or None in group:
                if group:
                    other = next(iter(group.values()))
                    raise UserError(f"{p}: makes case {name!r}, as {other} does; expected either {name}.png "
                                    f"or {name}_slice_<k>.png files")
            elif group and next(iter(group.values())).parent != p.parent:
                other = next(iter(group.values()))
                raise UserError(f"{p}: a slice of case {name!r} in another folder than {other}; expected the "
                                f"slices of a case in one folder (and case names unique across subfolders)")
            if index in group:
                raise UserError(f"{p}: slice {index} of case {name!r} again (also {group[index].name}); "
                                "expected one file per slice number")
            group[index] = p  # type: ignore[index]
        for name, group in groups.items():
            order = sorted(group, key=lambda k: -1 if k is None else k)  # integer order: 2 before 10
            paths = [group[k] for k in order]
            labs = [label_of(_stem(p)) for p in paths]
            if any(labs) and not all(labs):
                first = paths[labs.index(None)]
                raise UserError(f"{first}: no label, but other slices of case {name!r} have one; expected a label "
                                "for every slice of a case or for none")
            cases[name] = Case(name, paths, labs if all(labs) else None)  # type: ignore[arg-type]
    orphans = [label_files[s] for s in label_files if s not in used and not (same_folder and s in stems)]
    if orphans:
        raise UserError(f"{orphans[0]}: label file matches no image in {images}"
                        f"{f' (and {len(orphans) - 1} more)' if len(orphans) > 1 else ''}; expected the name of an "
                        "image, optionally with _gt, _label or _seg before the extension")
    for c in cases.values():
        if c.name != c.name.strip() or any(ch in c.name for ch in "\n\r\t"):
            raise UserError(f"{c.images[0]}: case name {c.name!r} has leading, trailing or control whitespace; "
                            "expected a name that fits on one line of a list file")
    return kind, sorted(cases.values(), key=lambda c: c.name)


#: file names (without extension) taken as the label of the image beside them with --case-per-folder
FOLDER_LABEL_NAMES = ("label", "labels", "seg", "segmentation", "mask", "gt", "ground_truth", "groundtruth")
#: the same, as the help, the README and the errors say it
FOLDER_LABEL_RULE = f"{', '.join(FOLDER_LABEL_NAMES)}, or <image>_gt, <image>_label, <image>_seg"


def scan_case_folders(images: Path, labels: Path | None, out: Path | None = None) -> list[Case]:
    """--case-per-folder: each folder of `images` holding NIfTI files is one case, named by its
    path under `images` ('/' -> '_'), its files named alike from case to case (KiTS's
    case_00000/imaging.nii.gz, say). In it: one image, and, with --labels the --images folder, a
    label named as in FOLDER_LABEL_NAMES or `<image>_gt/_label/_seg`; with --labels another folder,
    the one NIfTI file of the same subfolder there."""
    files = _files(images, "--images", (labels, out))
    if not any(nifti_stem(p.name) for p in files):
        raise UserError(f"{images}: --case-per-folder: no .nii/.nii.gz file in the folder or its subfolders; "
                        "expected one subfolder per case holding its NIfTI volume")
    for p in files:
        if nifti_stem(p.name) is None:
            raise UserError(f"{p}: --case-per-folder: not a NIfTI (.nii, .nii.gz) file; expected only NIfTI "
                            "volumes (PNG slices are imported without --case-per-folder)")
    same_folder = labels is not None and labels.resolve() == images.resolve()
    by_folder: dict[Path, list[Path]] = {}
    for p in files:
        by_folder.setdefault(p.parent, []).append(p)
    label_files: dict[Path, list[Path]] = {}
    if labels is not None and not same_folder:
        for p in _files(labels, "--labels", (images, out)):
            if nifti_stem(p.name) is None:
                raise UserError(f"{p}: not a NIfTI file; expected NIfTI labels in --labels")
            label_files.setdefault(p.parent.relative_to(labels), []).append(p)
    cases: dict[str, Case] = {}
    for folder, group in sorted(by_folder.items()):
        rel = folder.relative_to(images)
        if rel == Path("."):
            raise UserError(f"{group[0]}: --case-per-folder: a file directly in --images; expected one subfolder "
                            "per case (the case is named by its folder)")
        stems = {nifti_stem(p.name): p for p in group}
        labs = [p for st, p in stems.items() if same_folder and (
            st.lower() in FOLDER_LABEL_NAMES or (_label_base(st) is not None and _label_base(st) in stems))]
        imgs = [p for p in group if p not in labs]
        if not imgs:
            raise UserError(f"{folder}: --case-per-folder: only a label ({', '.join(p.name for p in labs)}), no "
                            "image; expected one image per case folder")
        if len(imgs) != 1:
            hint = ("; labels beside their image need --labels set to the --images folder" if labels is None else
                    "; with --labels another folder, labels lie in its subfolders, not beside the images"
                    if not same_folder else "")
            raise UserError(f"{folder}: --case-per-folder: {len(imgs)} images ({', '.join(p.name for p in imgs)}); "
                            "expected one image per case folder, and beside it at most one label named "
                            f"{FOLDER_LABEL_RULE}{hint}")
        if not same_folder and labels is not None:
            labs = label_files.pop(rel, [])
        if len(labs) > 1:
            raise UserError(f"{labs[0].parent}: --case-per-folder: {len(labs)} labels "
                            f"({', '.join(p.name for p in labs)}) for image {imgs[0]}; expected at most one")
        name = "_".join(rel.parts)
        if name in cases:
            raise UserError(f"{folder}: --case-per-folder: case name {name!r} again (also {cases[name].images[0].parent});"
                            " expected folder paths that stay distinct with '/' read as '_'")
        cases[name] = Case(name, imgs, labs or None)
    if label_files:
        rel, orphans = next(iter(label_files.items()))
        if rel == Path("."):
            raise UserError(f"{orphans[0]}: --case-per-folder: a file directly in --labels; expected one subfolder "
                            "per case, as in --images")
        raise UserError(f"{orphans[0]}: label folder {rel} has no image folder {images / rel}; expected the "
                        "subfolders of --labels to mirror those of --images")
    return sorted(cases.values(), key=lambda c: c.name)


def one_patient_notes(cases: list[Case]) -> list[str]:
    """A folder named like its cases (scans/patient0001/patient0001_ED.nii.gz and _ES) most likely
    holds one patient's cases. Unless named `<patient>_frameNN` they count as patients of their own,
    and may land in different splits: the same heart in train and in test."""
    folders: dict[Path, set[str]] = {}
    for c in cases:
        folder = c.images[0].parent
        if re.match(re.escape(folder.name) + r"[_\-. ]", c.name):
            folders.setdefault(folder, set()).add(c.patient)
    return [f"{folder}: its {len(p)} cases ({', '.join(sorted(p)[:3])}{', ...' if len(p) > 3 else ''}) count as "
            f"{len(p)} patients, so they may be in different splits; if they are one patient's, name them "
            f"<patient>_frameNN (e.g. {folder.name}_frame01, {folder.name}_frame02) and import again"
            for folder, p in sorted(folders.items()) if len(p) > 1]


def _split(patients: list[str], val_fraction: float, test_fraction: float, seed: int
           ) -> tuple[list[str], list[str], list[str]]:
    n = len(patients)
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    need = 2 + (test_fraction > 0)
    if n - n_val - n_test < 1:
        raise UserError(f"--labels: {n} labeled patient{'s' if n != 1 else ''} too few for --val-fraction "
                        f"{val_fraction:g} and --test-fraction {test_fraction:g}; expected at least {need} (one "
                        "for each split) or smaller fractions")
    order = [patients[i] for i in np.random.default_rng(seed).permutation(n)]
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def _read_case(case: Case, kind: str, num_classes: int
               ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float] | None]:
    if kind == "nifti":
        path = case.images[0]
        image, grid = read_nifti(path, "image")
        check_image(image, path)
        label = None
        if case.labels:
            label, label_grid = read_nifti(case.labels[0], "label")
            label = check_label(label, case.labels[0], num_classes, image.shape, path)
            check_same_grid(label_grid, grid, case.labels[0], path)
        return image, label, grid.spacing
    images, labels = [], []
    for i, path in enumerate(case.images):
        image = read_png(path, "image")
        check_image(image, path)
        if images and image.shape != images[0].shape:
            raise UserError(f"{path}: shape {image.shape} differs from {case.images[0].name} shape "
                            f"{images[0].shape}; expected one size for all slices of case {case.name!r}")
        images.append(image)
        if case.labels:
            lab_path = case.labels[i]
            labels.append(check_label(read_png(lab_path, "label"), lab_path, num_classes, image.shape, path))
    return np.stack(images), (np.stack(labels) if labels else None), None


def import_folder(images: str | Path, out: str | Path, labels: str | Path | None = None,
                  val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, num_classes: int = 4,
                  overwrite: bool = False, stream: TextIO | None = None, case_per_folder: bool = False
                  ) -> ImportSummary:
    """Write the SSL4MIS layout to `out` from a folder of NIfTI volumes or PNG slices (see the module
    doc); with `case_per_folder`, one case per folder (`scan_case_folders`)."""
    images, out = Path(images).expanduser(), Path(out).expanduser()
    labels = Path(labels).expanduser() if labels is not None else None
    stream = stream or sys.stdout
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction: {val_fraction:g} is invalid; expected a fraction in (0, 1) (validation "
                        "needs labeled volumes)")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise UserError(f"--test-fraction: {test_fraction:g} is invalid; expected a fraction in [0, 1) with "
                        f"--val-fraction + --test-fraction < 1 (val is {val_fraction:g})")
    if not 2 <= num_classes <= 65536:
        raise UserError(f"--num-classes: {num_classes} is invalid; expected 2 or more (background included)")
    kind, cases = ("nifti", scan_case_folders(images, labels, out)) if case_per_folder else scan(images, labels, out)

    by_patient: dict[str, list[Case]] = {}
    for c in cases:
        by_patient.setdefault(c.patient, []).append(c)
    labeled, unlabeled = [], []
    for pid, group in sorted(by_patient.items()):
        flags = {c.labels is not None for c in group}
        if len(flags) > 1:
            c = next(c for c in group if c.labels is None)
            raise UserError(f"{c.images[0]}: no label, but other cases of patient {pid!r} have one; expected all "
                            "cases of a patient labeled or none (--labeled-patients counts patients)")
        (labeled if flags.pop() else unlabeled).append(pid)
    if not labeled:
        where = f"in {labels} " if labels is not None else "(no --labels given) "
        raise UserError(f"{images}: no image has a label {where}; expected --labels with labels for at least 2 "
                        "patients (training needs labeled patients and validation needs labeled volumes)")
    train_lab, val, test = _split(labeled, val_fraction, test_fraction, seed)
    cases_of = lambda pids: [c.name for p in pids for c in by_patient[p]]  # noqa: E731
    lists = {"train": cases_of(train_lab) + cases_of(unlabeled), "val": cases_of(val), "test": cases_of(test)}
    train = set(lists["train"])

    notes: list[str] = one_patient_notes(cases)
    depth: dict[str, int] = {}
    across: list[Path] = []
    with Progress("import", len(cases), "cases", stream) as progress, staged_output(out, overwrite) as tmp:
        (tmp / "data" / "slices").mkdir(parents=True)
        for c in cases:
            image, label, spacing = _read_case(c, kind, num_classes)
            if image.max() == image.min():
                notes.append(f"{c.images[0]}: constant image, stored as zeros")
            if spacing is not None and 2 * spacing[0] <= max(spacing[1:]):
                across.append(c.images[0])
            image = minmax(image)
            write_volume(tmp, c.name, image, label, spacing, c.name in train)
            depth[c.name] = image.shape[0]
            progress.step()
        lists["train_slices"] = [slice_name(name, z) for name in lists["train"] for z in range(depth[name])]
        write_lists(tmp, lists)
    if across:
        notes.append(f"{across[0]}{f' and {len(across) - 1} more volumes' if len(across) > 1 else ''}: the slices "
                     "taken (along the file's third axis) are at most half as far apart as the voxels along "
                     "another axis: most likely across the slices the scan was acquired in (KiTS19, for one, "
                     "stores its slices along the first axis); if so, reorient the files so that the third axis "
                     "runs across the slices, and import them again")
    return ImportSummary(out, kind, lists, train_lab, sum(len(by_patient[p]) for p in unlabeled), len(val),
                         len(test), notes)
