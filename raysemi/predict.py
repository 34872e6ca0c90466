"""`python -m raysemi.predict`: segment 3D NIfTI scans with a trained checkpoint.

    python -m raysemi.predict --checkpoint runs/x/best.pt --input scans/ --out predictions/

Each input volume (one file, or every .nii / .nii.gz file of a folder and its subfolders, searched as
`raysemi.data import` searches --images: hidden files and folders, and --out, left out) is read with
SimpleITK as a (D, H, W) array (slices along the first array axis, as the SSL4MIS ACDC preprocessing
reads them), min-max normalised per volume like the training data, segmented slice by slice
(batched, on the device, resized to the checkpoint's patch size and back with nearest), and written
as `<OUT>/<sub>/<name>_pred.nii.gz` (`<name>` is the input file name without .nii.gz / .nii, `<sub>`
its subfolder of --input, so equal names from two subfolders do not collide): a uint8 label volume
with the input's size, spacing, origin and direction. Every input's header, the output folder and
the checkpoint are checked before anything is written, and each output is written to a temporary
name and renamed when complete.
"""

from __future__ import annotations

import time
from pathlib import Path

from raysemi.errors import ArgumentParser, UserError, run_cli

PRED_SUFFIX = "_pred.nii.gz"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m raysemi.predict", description=(
        "Segment 3D NIfTI volumes with a raysemi checkpoint: each input (a .nii/.nii.gz file, or every such "
        "file in a folder and its subfolders) is min-max normalised per volume as the training data, predicted "
        f"slice by slice on the device, and written to --out as <name>{PRED_SUFFIX}, in the subfolder it had "
        "in --input (uint8 labels, same size, spacing, origin and direction as the input)."))
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by raysemi.train (best.pt or last.pt) or a "
                   "search's best_checkpoint.pt")
    p.add_argument("--input", required=True, metavar="IMG.nii.gz|DIR",
                   help="a 3D NIfTI file, or a folder whose .nii/.nii.gz files, in it or in subfolders at any "
                        "depth (one folder per patient), are all predicted; hidden files and folders, other "
                        "files, labels beside their image (X_gt, X_label, X_seg next to X; segmentation, "
                        "mask, label, seg, gt next to another volume), subfolders named for labels (labels, "
                        "masks, segmentations, gt, labelsTr, ...: a labels tree beside the images'), 4D volumes "
                        "(cine sequences such as ACDC's patientNNN_4d, said so) and the --out folder when "
                        "it lies inside are left out")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the predicted label volumes, with the subfolders of --input")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
    p.add_argument("--eval-model", "--model", dest="model", choices=("student", "teacher"), default=None,
                   help="network to predict with (default: the checkpoint's eval_model)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"allow an --out folder that already holds files; only the *{PRED_SUFFIX} files of "
                        "these inputs are replaced, nothing is deleted")
    return p


def output_name(path: Path) -> str:
    """'case01.nii.gz' -> 'case01_pred.nii.gz'."""
    from raysemi.data.convert import nifti_stem

    stem = nifti_stem(path.name)
    if stem is None:
        raise ValueError(f"{path}: not a .nii/.nii.gz file name")
    return stem + PRED_SUFFIX


def is_label_beside_its_image(path: Path) -> bool:
    """`X_gt`, `X_label` or `X_seg` (.nii/.nii.gz) with `X` (.nii/.nii.gz) in the same folder, or a
    file named as `import --case-per-folder` names labels (segmentation, mask, gt, ...) beside
    another NIfTI file: a label by `import`'s naming rules, not a scan to predict."""
    from raysemi.data.convert import NIFTI_SUFFIXES, nifti_stem
    from raysemi.data.importer import FOLDER_LABEL_NAMES, LABEL_SUFFIXES

    stem = nifti_stem(path.name) or ""
    if stem.lower() in FOLDER_LABEL_NAMES and any(
            p != path and nifti_stem(p.name) is not None for p in path.parent.iterdir()):
        return True
    return any(stem.endswith(suffix) and len(stem) > len(suffix)
               and any((path.parent / (stem[:-len(suffix)] + ext)).is_file() for ext in NIFTI_SUFFIXES)
               for suffix in LABEL_SUFFIXES[1:])


#: subfolder names (any case) that say labels: `import --case-per-folder`'s label names, their
#: plurals, and nnU-Net's labelsTr / labelsTs / labelsVal / labelsTest
LABEL_FOLDERS = frozenset({"label", "labels", "seg", "segs", "segmentation", "segmentations", "mask", "masks", "gt",
                           "ground_truth", "groundtruth", "labelstr", "labelsts", "labelsval", "labelstest"})


def labels_folder(path: Path, root: Path) -> Path | None:
    """The subfolder of `root` that `path` lies in whose name says labels (`labels/`, `masks/`,
    nnU-Net's `labelsTr/`, ...: a tree of labels that mirrors the images' tree), or None. `root`
    itself may be one: given as --input, its files are predicted."""
    parts = path.relative_to(root).parts[:-1]
    for depth, part in enumerate(parts, start=1):
        if part.lower() in LABEL_FOLDERS:
            return root.joinpath(*parts[:depth])
    return None


def first_few(paths: list[Path], root: Path, end: str = "") -> str:
    """'a/, b/, c/, ...': the first three paths under `root`, for a line that names what was skipped."""
    return ", ".join(f"{p.relative_to(root)}{end}" for p in paths[:3]) + (", ..." if len(paths) > 3 else "")


#: a volume whose values are all integers in 0..LABEL_MAX_VALUE is taken for a label map (scans'
#: intensities span hundreds of values, CT's go negative)
LABEL_MAX_VALUE = 15


def label_values(array) -> list[int] | None:
    """The values of a volume that holds only a few non-negative integers, as a label map does
    (given by mistake as a scan to predict), or None. np.unique runs only where the range is small."""
    import numpy as np

    low, high = array.min(), array.max()
    if low < 0 or high > LABEL_MAX_VALUE:
        return None
    sample = array.ravel()[::101]  # a scan normalised to [0, 1] fails here, before the whole volume is sorted
    if not np.array_equal(sample, np.round(sample)):
        return None
    values = np.unique(array)
    if not np.array_equal(values, np.round(values)):
        return None
    return [int(v) for v in values]


def list_inputs(path: str | Path, out: str | Path | None = None) -> list[Path]:
    """The NIfTI files to predict: `path` itself, or the .nii/.nii.gz files of a folder and its
    subfolders (sorted; searched as `import` searches --images, by `walk_files`: hidden files, such as
    a killed run's temporary outputs, and hidden folders are skipped, and so is `out` inside `path`,
    so that a second run does not predict the first one's outputs; so are label files beside their
    image, `X_gt` / `X_label` / `X_seg` next to `X`)."""
    from raysemi.data.convert import nifti_stem, walk_files

    path = Path(path)
    if path.is_dir():
        skip = (Path(out),) if out is not None else ()
        files = [p for p in walk_files(path, "--input", skip) if nifti_stem(p.name) is not None]
        files = [p for p in files if not is_label_beside_its_image(p)]
        if not files:
            raise UserError(f"{path}: --input: no .nii or .nii.gz file in the folder or its subfolders (hidden "
                            "ones and --out aside); expected 3D NIfTI volumes")
        return files
    if not path.exists():
        raise UserError(f"{path}: --input: no such file or folder; expected a .nii/.nii.gz file or a folder of them")
    if nifti_stem(path.name) is None:
        raise UserError(f"{path}: --input: not a NIfTI file name; expected a .nii or .nii.gz file (or a folder)")
    return [path]


def output_paths(inputs: list[Path], root: Path, out: Path) -> list[Path]:
    """Where each input's labels go: `out/<sub>/<name>_pred.nii.gz`, `<sub>` the input's subfolder of
    `root` (the --input folder; none for a file or a flat folder), so equal names cannot collide."""
    if not root.is_dir():
        return [out / output_name(p) for p in inputs]
    return [out / p.parent.relative_to(root) / output_name(p) for p in inputs]


def read_header(path: Path, allow_4d: bool = False) -> tuple[int, ...]:
    """Check, from the header only, that `path` is a single-channel 3D NIfTI volume (or, with
    `allow_4d`, a 4D one, for the caller to skip); its size in SimpleITK order (x, y, slices[, t])."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("NiftiImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise UserError(f"{path}: not a readable NIfTI file; expected a 3D NIfTI volume (.nii/.nii.gz)") from None
    size = tuple(int(s) for s in reader.GetSize())
    if reader.GetDimension() != 3 and not (allow_4d and reader.GetDimension() == 4):
        raise UserError(f"{path}: dimension: {reader.GetDimension()}D image of size {' x '.join(map(str, size))}; "
                        "expected a 3D volume (x, y, slices)")
    if reader.GetNumberOfComponents() != 1:
        raise UserError(f"{path}: components: {reader.GetNumberOfComponents()} per voxel; expected a "
                        "single-channel (scalar) volume")
    if min(size) < 1:
        raise UserError(f"{path}: size: {size}; expected a non-empty volume")
    from raysemi.data.convert import check_whole

    check_whole(path, "scan")  # a half-copied scan reads as one with zeros at its end
    return size


def check_out(out: Path, outputs: list[Path], inputs: list[Path], overwrite: bool) -> None:
    """Refuse an --out that is a file, or a folder with files in it (unless --overwrite), and
    outputs that would replace an input or each other."""
    from raysemi.data.convert import check_out_folder

    check_out_folder(out, overwrite, f"the *{PRED_SUFFIX} files of these inputs")
    seen: dict[Path, Path] = {}
    resolved_inputs = {p.resolve(): p for p in inputs}
    for src, dst in zip(inputs, outputs):
        key = dst.resolve()
        if key in resolved_inputs:
            raise UserError(f"{dst}: --out: the output of {src.name} would replace the input {resolved_inputs[key]}; "
                            "expected an --out folder apart from the inputs")
        if key in seen:
            raise UserError(f"{dst}: --out: both {seen[key]} and {src} would be written here; "
                            "expected input names that differ without .nii/.nii.gz")
        seen[key] = src
        if dst.exists() and not dst.is_file():
            raise UserError(f"{dst}: --out: exists and is not a file; expected to write a NIfTI file there")
        folder = dst.parent  # the subfolders of --out this output needs: a file there would stop the run midway
        while folder != out and folder != folder.parent:
            if folder.exists() and not folder.is_dir():
                raise UserError(f"{folder}: --out: exists and is not a folder; expected a folder for the output "
                                f"of {src}")
            folder = folder.parent


def write_labels(pred, reference, path: Path) -> None:
    """Write a (D, H, W) uint8 array as NIfTI with `reference`'s geometry, atomically."""
    import SimpleITK as sitk

    from raysemi.data.convert import write_nifti

    image = sitk.GetImageFromArray(pred)
    image.CopyInformation(reference)
    write_nifti(image, path)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size: {args.batch_size} is invalid; expected an integer >= 1")
    # every input and the output folder are checked before the checkpoint is read or a file written
    out = Path(args.out)
    inputs = list_inputs(args.input, out)
    root = Path(args.input)
    # a labels tree beside the images' (images/ and labels/, imagesTr/ and labelsTr/): left out, and said so
    in_labels = {path: labels_folder(path, root) for path in inputs} if root.is_dir() else {}
    label_folders = sorted({folder for folder in in_labels.values() if folder is not None})
    if label_folders:
        inputs = [path for path in inputs if in_labels[path] is None]
        if not inputs:
            raise UserError(f"{root}: --input: only files in labels folders ({first_few(label_folders, root, '/')}); "
                            "expected scans (give a labels folder itself as --input to predict its files)")
    # in a folder, 4D cine sequences lie beside the 3D frames that are segmented (ACDC's
    # patientNNN_4d.nii.gz): skipped, and said so; a 4D file given alone is refused
    cines = [path for path in inputs if len(read_header(path, allow_4d=root.is_dir())) == 4]
    if cines:
        inputs = [path for path in inputs if path not in cines]
        if not inputs:
            raise UserError(f"{root}: --input: only 4D volumes ({len(cines)}, e.g. {cines[0].relative_to(root)}); "
                            "expected 3D volumes (x, y, slices), e.g. the frames of a cine sequence")
    outputs = output_paths(inputs, root, out)
    check_out(out, outputs, inputs, args.overwrite)

    import numpy as np
    import SimpleITK as sitk

    from raysemi.data.normalize import minmax
    from raysemi.evaluate import load_network
    from raysemi.inference import predict_volume
    from raysemi.loop import resolve_device
    from raysemi.metrics import class_names

    device = resolve_device(args.device)
    net, config = load_network(args.checkpoint, args.model, device)
    if config.in_channels != 1:
        raise UserError(f"{args.checkpoint}: config: in_channels: {config.in_channels}; raysemi.predict reads "
                        "single-channel volumes, expected 1")
    amp = device.type == "cuda" and config.amp != "off"
    which = args.model or config.eval_model
    names = class_names(config.num_classes)
    print(f"{args.checkpoint} ({config.method}, {which}, {config.num_classes} classes, patch "
          f"{config.patch_size[0]}x{config.patch_size[1]}) on {device}: {len(inputs)} volume(s) -> {out}", flush=True)
    if label_folders:
        count = sum(folder is not None for folder in in_labels.values())
        print(f"skipped {count} file(s) in labels folders (by name; give one as --input to predict its files): "
              f"{first_few(label_folders, root, '/')}", flush=True)
    if cines:
        print(f"skipped {len(cines)} 4D volume(s) (cine sequences; their 3D frames are what is segmented): "
              f"{first_few(cines, root)}", flush=True)
    width = len(str(len(inputs)))
    like_labels: list[tuple[Path, list[int]]] = []
    in_folder = root.is_dir()  # then inputs are shown by their path in --input, else by name as before
    for i, (src, dst) in enumerate(zip(inputs, outputs), start=1):
        t0 = time.perf_counter()
        try:
            image = sitk.ReadImage(str(src), imageIO="NiftiImageIO")
        except RuntimeError:
            raise UserError(f"{src}: not a readable NIfTI file (the voxel data could not be read); "
                            "expected a 3D NIfTI volume") from None
        array = sitk.GetArrayFromImage(image)  # (D, H, W) = (z, y, x)
        if array.dtype.kind not in "biuf":
            raise UserError(f"{src}: pixel type: {image.GetPixelIDTypeAsString()}; expected a real-valued "
                            "(integer or float) volume")
        try:
            volume = minmax(array)
        except ValueError as err:
            raise UserError(f"{src}: image: {err}") from None
        values = label_values(array)
        if values is not None:
            like_labels.append((src, values))
        pred = predict_volume(net, volume, config.patch_size, device, args.batch_size, amp)
        try:  # created only now, so a run refused on its first volume leaves no empty folder
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"{dst.parent}: --out: cannot create the folder ({err.strerror or err})") from None
        write_labels(pred, image, dst)
        counts = np.bincount(pred.ravel(), minlength=config.num_classes)
        share = ", ".join(f"{name} {100.0 * c / pred.size:.1f}%" for name, c in zip(names, counts[1:]))
        D, H, W = array.shape
        shown = src.relative_to(root) if in_folder else src.name
        print(f"[{i:>{width}}/{len(inputs)}] {shown}: {D} slices of {H}x{W} -> {dst.relative_to(out)} "
              f"({share} of voxels; {time.perf_counter() - t0:.1f}s)"
              f"{'; holds only the values ' + ', '.join(map(str, values)) + ': a label map?' if values else ''}",
              flush=True)
    if like_labels:
        src, values = like_labels[0]
        print(f"warning: {len(like_labels)} of {len(inputs)} inputs hold only a few integer values, as label maps do "
              f"(e.g. {src.relative_to(root) if in_folder else src.name}: {', '.join(map(str, values))}); if they are "
              "labels, their predictions mean nothing: give the scans as --input", flush=True)
    return 0


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(cli())
