"""`python -m raysemi.data`: write the synthetic phantom set, prepare the raw ACDC release, import a
user's own NIfTI volumes or PNG slices, all into the SSL4MIS layout that `--data` reads.

    python -m raysemi.data phantom --out data/phantom --patients 40 --seed 0 --size 128 128
    python -m raysemi.data prepare-acdc --raw ACDC/database --out data/ACDC
    python -m raysemi.data import --images scans/ --labels masks/ --out data/mine
    python -m raysemi.data export-nifti --data phantom --split test --out scans/
"""

from __future__ import annotations

import argparse

from raysemi.data.importer import FOLDER_LABEL_RULE
from raysemi.errors import ArgumentParser, DefaultsHelpFormatter, run_cli


class _Help(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, and the description's paragraphs and lists kept as written."""


PREPARE_HELP = """\
Turn the raw ACDC release (NIfTI) into the SSL4MIS training layout, with the SSL4MIS split lists
shipped in the package (70 train / 10 val / 20 test patients of training/patient001-100).

--raw is the 'database' folder of the release (or the folder holding it):
  database/training/patient001/Info.cfg                     'ED: 1', 'ES: 12', ...
  database/training/patient001/patient001_frame01.nii.gz    ED frame, and its ..._gt.nii.gz label
  database/training/patient001/patient001_frame12.nii.gz    ES frame, and its ..._gt.nii.gz label
database/testing (patients 101-150) is not in the SSL4MIS split and is skipped.

Written to --out (built in a temporary folder beside it, then renamed):
  train_slices.list, train.list, val.list, test.list
  data/patientXXX_frame01.h5       ED volume: image (D, H, W) float32, label uint8,
                                   attribute spacing (z, y, x) in mm
  data/patientXXX_frame02.h5       ES volume, whatever its raw frame number (the release's name)
  data/slices/<case>_slice_<k>.h5  training slices; k = slice index + 1 (slice_1 is the first),
                                   as the SSL4MIS release numbers them
Images are min-max normalised per volume, (x - min) / (max - min), as the reference does.

Every patient of the split must be present; --allow-missing writes only those present (at least one
train and one val patient), with lists that name only the cases written."""

IMPORT_HELP = """\
Bring your own images (labeled or not) into the SSL4MIS layout.

--images holds either 3D NIfTI volumes (.nii, .nii.gz), one case per file, or 2D PNG slices
(grayscale): PNGs named <case>_slice_<k>.png make one case, its slices ordered by the integer k
(2 before 10); any other PNG is a one-slice case. Files may lie in subfolders at any depth (one
folder per patient, say): the case name is the file name without its extension, and must be unique
over the whole tree (two files giving the same name are refused; one folder per case with the same
file names in each, such as KiTS's case_00000/imaging.nii.gz, needs --case-per-folder); a PNG
case's slices lie in one folder. Hidden files and folders are ignored, and so are the --labels and --out folders when they
lie inside --images; any other file is an error.

Labels (optional): the label of image X.nii.gz / X.png is the file in --labels (or any of its
subfolders) named X, X_gt, X_label or X_seg (same kind: NIfTI / PNG), holding class indices
0..num_classes-1 with the image's shape (and, for NIfTI, its voxel grid: spacing, origin and
direction). --labels may be the --images folder itself (each label beside its image). Images
without a label are unlabeled: they go to the training split only, and their files have
no 'label' dataset.

Cases named <patient>_frameNN are one patient (split together); other names are each their own
patient. Labeled patients are shuffled with --seed and split into train/val/test by the
fractions (at least one in train and val, and in test unless --test-fraction is 0); train.list and train_slices.list list the labeled training
patients first, then the unlabeled ones, so --labeled-patients N with N up to the printed number
takes labeled patients only. Images are min-max normalised per case; spacing (z, y, x) is stored
for NIfTI, not for PNG. Slice files are numbered from 1, like prepare-acdc's."""

OUT_HELP = ("output folder; must be new or empty unless --overwrite; built beside it and renamed into place")
OVERWRITE_HELP = ("replace the dataset in an --out that has content: the old dataset's files (the .list files, "
                  "phantom.txt, data/*.h5, data/slices/*.h5) are all replaced or removed, or on an error all kept "
                  "(a backup .<out>.old-* beside --out while it runs); your other files there stay")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m raysemi.data", description="Dataset tools: write, prepare or import data in "
                       "the SSL4MIS layout that --data reads.")
    sub = p.add_subparsers(dest="command", required=True)
    ph = sub.add_parser("phantom", help="write the synthetic cardiac short-axis set in the SSL4MIS ACDC layout",
                        description="Write the synthetic cardiac phantom (lists + data/slices/*.h5 + data/*.h5), "
                                    "deterministic for a seed; patients are split 70/10/20 into train/val/test.")
    ph.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    ph.add_argument("--patients", type=int, default=40, help="number of patients (2 volumes each: ED and ES)")
    ph.add_argument("--seed", type=int, default=0, help="random seed")
    ph.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"), help="slice size")
    ph.add_argument("--workers", type=int, default=1, help="processes writing patients in parallel (same files)")
    ph.add_argument("--overwrite", action="store_true", help="replace the dataset in an existing phantom/dataset folder, all or "
                    "nothing (its lists, phantom.txt and data/ .h5 files; your other files there stay)")

    pa = sub.add_parser("prepare-acdc", help="raw ACDC NIfTI release -> SSL4MIS layout with the SSL4MIS split",
                        description=PREPARE_HELP, formatter_class=_Help)
    pa.add_argument("--raw", required=True, help="the ACDC 'database' folder (holding training/patient001/...), the folder holding it, or its training/")
    pa.add_argument("--out", required=True, help=OUT_HELP)
    pa.add_argument("--allow-missing", action="store_true",
                    help="write only the patients of the split found under --raw instead of refusing")
    pa.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    im = sub.add_parser("import", help="your own NIfTI volumes or PNG slices (labeled or not) -> SSL4MIS layout",
                        description=IMPORT_HELP, formatter_class=_Help)
    im.add_argument("--images", required=True, help="folder of .nii/.nii.gz volumes or .png slices, searched "
                    "with its subfolders")
    im.add_argument("--labels", help="folder of label files (naming rule above), searched with its subfolders; at "
                    "least 2 labeled patients are needed (train and val)")
    im.add_argument("--case-per-folder", action="store_true",
                    help="each subfolder of --images is one case, named by its path ('/' read as '_'), its files "
                         "named alike in every case (KiTS: case_00000/imaging.nii.gz beside segmentation.nii.gz): "
                         "one NIfTI image in each, and its label beside it (--labels set to the --images folder; "
                         f"named {FOLDER_LABEL_RULE}) or in the same subfolder of another --labels folder")
    im.add_argument("--out", required=True, help=OUT_HELP)
    im.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the labeled patients for val")
    im.add_argument("--test-fraction", type=float, default=0.2, help="fraction of the labeled patients for test")
    im.add_argument("--seed", type=int, default=0, help="seed of the labeled patients' shuffle")
    im.add_argument("--num-classes", type=int, default=4,
                    help="classes, background included: labels must be 0..num_classes-1")
    im.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    ex = sub.add_parser("export-nifti", help="the volumes of a split -> NIfTI (<case>.nii.gz, <case>_gt.nii.gz), "
                        "e.g. to try raysemi.predict on the phantom", formatter_class=_Help, description=(
                            "Write the volumes of one split of a dataset in the SSL4MIS layout as NIfTI: "
                            "<case>.nii.gz (the normalised image, float32) and its label beside it as "
                            "<case>_gt.nii.gz (uint8), with the stored spacing (1 mm where none is stored). "
                            "raysemi.predict --input on that folder predicts the images and skips the labels; "
                            "raysemi.data import reads the pairs back."))
    ex.add_argument("--data", default="phantom", help="dataset root, or 'phantom' for the built-in phantom")
    ex.add_argument("--split", default="test", help="list to export: val, test or train")
    ex.add_argument("--out", required=True, help="output folder (new or empty unless --overwrite)")
    ex.add_argument("--no-labels", dest="labels", action="store_false", help="write the images only (default: images and their labels)")
    ex.add_argument("--num-classes", type=int, default=4, help="classes, background included (labels are checked "
                    "against it)")
    ex.add_argument("--overwrite", action="store_true", help="allow an --out that holds files; only these cases' "
                    ".nii.gz files are replaced, nothing is deleted")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "phantom":
        from raysemi.data.layout import read_list
        from raysemi.data.phantom import write_phantom

        out = write_phantom(args.out, args.patients, args.seed, tuple(args.size), overwrite=args.overwrite,
                            workers=args.workers)
        counts = {s: len(read_list(out, s)) for s in ("train_slices", "train", "val", "test")}
        print(f"phantom written to {out}: {args.patients} patients, 2 volumes each (ED, ES); "
              f"{counts['train']} training volumes ({counts['train_slices']} slices), {counts['val']} validation "
              f"and {counts['test']} test volumes")
    elif args.command == "prepare-acdc":
        from raysemi.data.acdc import prepare_acdc

        s = prepare_acdc(args.raw, args.out, overwrite=args.overwrite, allow_missing=args.allow_missing)
        for note in s.notes:
            print(f"note: {note}")
        if s.missing:
            print(f"--allow-missing: {len(s.missing)} patients of the split not found, left out: "
                  f"{', '.join(s.missing[:8])}{', ...' if len(s.missing) > 8 else ''}")
        n = {k: len(v) for k, v in s.lists.items()}
        print(f"ACDC written to {s.out}: {len(s.patients)} patients, {n['train']} train / {n['val']} val / "
              f"{n['test']} test volumes, {n['train_slices']} training slices")
    elif args.command == "import":
        from raysemi.data.importer import import_folder

        s = import_folder(args.images, args.out, args.labels, args.val_fraction, args.test_fraction, args.seed,
                          args.num_classes, overwrite=args.overwrite, case_per_folder=args.case_per_folder)
        for note in s.notes:
            print(f"note: {note}")
        n = {k: len(v) for k, v in s.lists.items()}
        k = len(s.labeled_patients)
        print(f"imported {'NIfTI volumes' if s.kind == 'nifti' else 'PNG slices'} to {s.out}: "
              f"{n['train'] + n['val'] + n['test'] - s.unlabeled_cases} labeled cases, {s.unlabeled_cases} unlabeled")
        print(f"splits: train {_n(n['train'], 'case')} ({_n(k, 'labeled patient')} first, then "
              f"{_n(s.unlabeled_cases, 'unlabeled case')}; {_n(n['train_slices'], 'slice')}), val "
              f"{_n(n['val'], 'case')} ({_n(s.val_patients, 'patient')}), test {_n(n['test'], 'case')} "
              f"({_n(s.test_patients, 'patient')})")
        print(f"train with: --data {s.out} --labeled-patients N, N from 1 to {k} (all labeled: {k})")
    elif args.command == "export-nifti":
        from pathlib import Path

        from raysemi.data import resolve_data_root
        from raysemi.data.export import export_nifti

        root = resolve_data_root(args.data)
        written = export_nifti(root, args.split, Path(args.out), labels=args.labels, num_classes=args.num_classes,
                               overwrite=args.overwrite)
        from raysemi.data.export import LABEL_SUFFIX

        labeled = sum(p.name.endswith(f"{LABEL_SUFFIX}.nii.gz") for p in written)
        images = len(written) - labeled
        with_labels = "" if not args.labels else " with their labels (<case>_gt.nii.gz)" if labeled == images else \
            f" with the labels of the {labeled} labeled ones (<case>_gt.nii.gz; the others are unlabeled)"
        print(f"exported {_n(images, 'volume')} of {root} ({args.split}) to {args.out}"
              f"{with_labels}; try: python -m raysemi.predict "
              f"--checkpoint CKPT --input {args.out} --out predictions/")
    return 0


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(cli())
