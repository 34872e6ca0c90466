"""`prepare-acdc`: the raw ACDC NIfTI release to the SSL4MIS layout, with the SSL4MIS split lists.

Raw: `database/training/patientXXX/{Info.cfg, patientXXX_frameNN.nii.gz, patientXXX_frameNN_gt.nii.gz}`
for the ED and ES frames (frame numbers vary; Info.cfg says which: `ED: 1`, `ES: 12`). The SSL4MIS
release names them `patientXXX_frame01` (ED) and `patientXXX_frame02` (ES) whatever their number in
the raw data (patient090's ED is frame04): we name them the same way, so its lists apply unchanged.

Per volume: image min-max normalised as the reference does, float32; label uint8; `spacing` (z, y, x)
in mm from the NIfTI header. Volumes of every listed case go to `data/<case>.h5`, the slices of the
training cases to `data/slices/<case>_slice_<k>.h5` (k = slice index + 1, as the release numbers them).
Only the 100 patients of the SSL4MIS split (training/patient001-100) are written; database/testing
(patients 101-150) is not part of that split and is skipped.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from raysemi.data.convert import (NIFTI_SUFFIXES, Progress, check_image, check_label, check_same_grid, read_nifti,
                                  slice_name, staged_output, write_lists, write_volume)
from raysemi.data.layout import patient_id, shipped_list
from raysemi.data.normalize import minmax
from raysemi.errors import UserError

ACDC_CLASSES = 4  # background, RV, myocardium, LV cavity
_PATIENT_DIR = re.compile(r"^patient\d{3}$")
_CASE = re.compile(r"^(patient\d{3})_frame(0[12])$")
_GT = re.compile(r"^patient\d{3}_frame(\d+)_gt\.nii(\.gz)?$")


@dataclass
class PrepareSummary:
    out: Path
    lists: dict[str, list[str]]
    patients: list[str]
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def find_training_folder(raw: Path) -> Path:
    """`raw` is the ACDC 'database' folder (holding training/), a folder holding database/, or the
    training/ folder itself (holding the patient folders)."""
    if not raw.exists():
        raise UserError(f"{raw}: --raw folder not found; expected the ACDC 'database' folder "
                        "(with training/patient001/...)")
    if not raw.is_dir():
        raise UserError(f"{raw}: --raw is not a folder; expected the ACDC 'database' folder "
                        "(with training/patient001/...)")
    for candidate in (raw / "training", raw / "database" / "training", raw):
        if candidate.is_dir() and any(_PATIENT_DIR.match(p.name) for p in candidate.iterdir() if p.is_dir()):
            return candidate
    raise UserError(f"{raw}: not an ACDC database (no training/patientXXX folders); expected the 'database' "
                    "folder of the ACDC release, holding training/patient001/patient001_frame01.nii.gz ...")


def _nifti(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def ed_es_frames(folder: Path) -> tuple[int, int]:
    """(ED, ES) frame numbers from Info.cfg; without Info.cfg, the two labeled frames in order."""
    cfg = folder / "Info.cfg"
    if cfg.is_file():
        values = {}
        for line in cfg.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                values[key.strip()] = value.strip()
        frames = []
        for key in ("ED", "ES"):
            if key not in values:
                raise UserError(f"{cfg}: {key}: field missing; expected a line '{key}: <frame number>'")
            try:
                frames.append(int(values[key]))
            except ValueError:
                raise UserError(f"{cfg}: {key}: {values[key]!r} is not a frame number; expected an integer "
                                "such as 1") from None
        if frames[0] == frames[1]:
            raise UserError(f"{cfg}: ES: {frames[1]} equals ED; expected two different frames")
        return frames[0], frames[1]
    found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _GT.match(p.name)))
    if len(found) != 2:
        raise UserError(f"{cfg}: file missing, and {len(found)} labeled frames (*_frameNN_gt.nii.gz) found "
                        "instead of 2; expected Info.cfg with 'ED:' and 'ES:' lines")
    return found[0], found[1]


def _raw_case(folder: Path, pid: str, frame: int) -> tuple[Path, Path]:
    stem = f"{pid}_frame{frame:02d}"
    image = _nifti(folder, stem)
    if image is None:
        raise UserError(f"{folder / (stem + '.nii.gz')}: image file missing; expected the frame that "
                        f"{folder / 'Info.cfg'} names")
    label = _nifti(folder, f"{stem}_gt")
    if label is None:
        raise UserError(f"{folder / (stem + '_gt.nii.gz')}: label file missing; expected the ground truth "
                        f"of {image.name} next to it")
    return image, label


def prepare_acdc(raw: str | Path, out: str | Path, overwrite: bool = False, allow_missing: bool = False,
                 stream: TextIO | None = None) -> PrepareSummary:
    """Write the SSL4MIS layout of ACDC to `out` from the raw release in `raw` (see the module doc)."""
    raw, out = Path(raw).expanduser(), Path(out).expanduser()
    stream = stream or sys.stdout
    training = find_training_folder(raw)
    split = {name: shipped_list(name) for name in ("train", "val", "test")}
    patients = list(dict.fromkeys(patient_id(c) for name in ("train", "val", "test") for c in split[name]))

    present, missing = {}, []
    for pid in patients:
        folder = next((d / pid for d in (training, training.parent / "testing") if (d / pid).is_dir()), None)
        if folder is None:
            missing.append(pid)
        else:
            present[pid] = folder
    missing.sort()
    if missing and not allow_missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:6])}{', ...' if len(missing) > 6 else ''})" \
            if len(missing) > 1 else ""
        raise UserError(f"{training / missing[0]}: patient folder missing{more}; expected all {len(patients)} "
                        "patients of the SSL4MIS split, or pass --allow-missing to write only those present")
    lists = {name: [c for c in split[name] if patient_id(c) in present] for name in ("train", "val", "test")}
    for name in ("train", "val"):
        if not lists[name]:
            first = sorted({patient_id(c) for c in split[name]})[:3]
            raise UserError(f"{training}: no patient of the {name} split is present; expected at least one of "
                            f"{', '.join(first)}, ... (a run needs training and validation cases)")

    # every raw file is located before anything is read or written
    frames = {pid: ed_es_frames(present[pid]) for pid in present}
    sources = {}
    for case in (c for name in ("train", "val", "test") for c in lists[name]):
        m = _CASE.match(case)
        if m is None:  # the shipped lists only hold frame01/frame02 cases
            raise UserError(f"shipped list: case {case!r} is not patientXXX_frame01/02; expected the SSL4MIS lists")
        pid, slot = m.group(1), int(m.group(2))
        sources[case] = _raw_case(present[pid], pid, frames[pid][slot - 1])

    train_cases = set(lists["train"])
    shipped_slices: dict[str, list[str]] = {}
    for name in shipped_list("train_slices"):
        shipped_slices.setdefault(name.rsplit("_slice_", 1)[0], []).append(name)
    notes: list[str] = []
    depth: dict[str, int] = {}
    with Progress("prepare-acdc", len(present), "patients", stream) as progress, \
            staged_output(out, overwrite) as tmp:
        (tmp / "data" / "slices").mkdir(parents=True)
        for pid in present:
            for case in (c for c in sources if patient_id(c) == pid):
                image_path, label_path = sources[case]
                image, grid = read_nifti(image_path, "image")
                check_image(image, image_path)
                label, label_grid = read_nifti(label_path, "label")
                label = check_label(label, label_path, ACDC_CLASSES, image.shape, image_path,
                                    option="ACDC num_classes")
                check_same_grid(label_grid, grid, label_path, image_path)
                image = minmax(image)
                write_volume(tmp, case, image, label, grid.spacing, case in train_cases)
                depth[case] = image.shape[0]
            progress.step()
        # train_slices.list: the shipped one (its order, so seeded runs match runs on the release) for
        # the cases written; a case whose slice count differs from the release gets its own numbering
        lists["train_slices"] = []
        for case in lists["train"]:
            ours = [slice_name(case, z) for z in range(depth[case])]
            theirs = shipped_slices.get(case, [])
            if sorted(theirs) == sorted(ours):
                lists["train_slices"].extend(theirs)
            else:
                notes.append(f"{case}: {depth[case]} slices in the raw data, {len(theirs)} in the SSL4MIS list")
                lists["train_slices"].extend(ours)
        write_lists(tmp, lists)
    return PrepareSummary(out, lists, list(present), missing, notes)
