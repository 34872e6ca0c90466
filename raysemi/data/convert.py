"""What `prepare-acdc` and `import` share: reading NIfTI and PNG files, min-max normalisation, writing
the HDF5 case files, progress lines, and an output folder that is built beside the target and only
then renamed into place (or, with --overwrite, merged file by file: nothing of the user's is deleted).

Slice files are numbered from 1, as in the SSL4MIS ACDC release (its lists name `<case>_slice_1` to
`<case>_slice_<D>`): `<case>_slice_<k>` holds slice index k - 1 of the volume, numbered from the
integer index, never from the order of names.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import h5py
import numpy as np

from raysemi.progress import ProgressBar
from raysemi.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LIST_NAMES = ("train_slices", "train", "val", "test")


def slice_name(case: str, z: int) -> str:
    """Name of the training slice holding slice index z (from 0) of a volume: numbered from 1."""
    return f"{case}_slice_{z + 1}"


def nifti_stem(name: str) -> str | None:
    """'patient001_frame01.nii.gz' -> 'patient001_frame01'; None for a name that is not NIfTI."""
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return None


def _one_line(err: BaseException) -> str:
    """The last informative line of an exception (SimpleITK's messages span several lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def read_nifti(path: Path, what: str = "image") -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3D NIfTI file as a (D, H, W) array and its spacing (z, y, x) in mm."""
    import SimpleITK as sitk  # imported here: only the converters need it

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise UserError(f"{path}: not a readable NIfTI file ({_one_line(err)}); expected a 3D .nii or .nii.gz "
                        f"{what}") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path}: {img.GetNumberOfComponentsPerPixel()} components per voxel; expected a "
                        f"single-channel 3D {what}")
    if img.GetDimension() != 3:
        raise UserError(f"{path}: {img.GetDimension()}D image of size {img.GetSize()}; expected a 3D {what} "
                        "(a 4D cine series is not a frame; 2D slices go in as PNG)")
    array = sitk.GetArrayFromImage(img)  # (z, y, x)
    spacing = tuple(float(s) for s in reversed(img.GetSpacing()))
    return array, spacing  # type: ignore[return-value]


def read_png(path: Path, what: str = "image") -> np.ndarray:
    """A PNG as a 2D array: grayscale (L, I, I;16); for a label also palette indices (P); an RGB(A) or
    palette image only when its colours are grays (a gray picture saved in colour)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P" and what == "image":  # a palette image: its gray levels, not the palette indices
                im = im.convert("RGB")
            array = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"{path}: not a readable PNG file ({_one_line(err)}); expected a grayscale {what}") from None
    if array.ndim == 3:
        if mode == "LA":  # gray + alpha
            array = array[..., 0]
        elif mode in ("RGB", "RGBA", "P") and (array[..., :3] == array[..., :1]).all():
            array = array[..., 0]
        else:
            kind = "class indices (a grayscale or palette PNG)" if what == "label" else "a grayscale image"
            raise UserError(f"{path}: colour PNG (mode {mode}); expected {kind}")
    if array.ndim != 2:
        raise UserError(f"{path}: PNG of shape {array.shape} (mode {mode}); expected a 2D grayscale {what}")
    return array


def check_image(image: np.ndarray, path: Path) -> None:
    if image.size == 0:
        raise UserError(f"{path}: image of shape {image.shape} is empty; expected at least one voxel")
    if image.dtype.kind not in "biuf":
        raise UserError(f"{path}: image: voxel type {image.dtype}; expected numbers")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise UserError(f"{path}: image: contains NaN or inf; expected finite intensities")


def check_label(label: np.ndarray, path: Path, num_classes: int, image_shape: tuple, image_path: Path,
                option: str = "--num-classes") -> np.ndarray:
    """A label array as uint8 classes in [0, num_classes), or a one-line error naming the file."""
    if label.shape != tuple(image_shape):
        raise UserError(f"{path}: label shape {label.shape} differs from image {image_path.name} shape "
                        f"{tuple(image_shape)}; expected the same shape")
    if label.dtype.kind == "f":
        if not np.isfinite(label).all() or (label != np.round(label)).any():
            raise UserError(f"{path}: label: non-integer values; expected integer classes 0..{num_classes - 1}")
    elif label.dtype.kind not in "biu":
        raise UserError(f"{path}: label: voxel type {label.dtype}; expected integer classes 0..{num_classes - 1}")
    bad = np.unique(label[(label < 0) | (label >= num_classes)])
    if bad.size:
        hint = " (a 0/255 mask? store class indices)" if 255 in bad.tolist() else ""
        raise UserError(f"{path}: label: values {bad[:5].tolist()} outside 0..{num_classes - 1}{hint}; expected "
                        f"classes 0..{num_classes - 1} ({option} {num_classes})")
    return label.astype(np.uint8 if num_classes <= 256 else np.uint16)


def check_spacing(label_spacing, image_spacing, path: Path, image_path: Path) -> None:
    if not np.allclose(label_spacing, image_spacing, rtol=1e-3, atol=1e-5):
        fmt = lambda s: "(" + ", ".join(f"{v:g}" for v in s) + ")"  # noqa: E731
        raise UserError(f"{path}: label spacing (z, y, x) {fmt(label_spacing)} mm differs from image "
                        f"{image_path.name} spacing {fmt(image_spacing)} mm; expected the same voxel grid")


def write_case(path: Path, image: np.ndarray, label: np.ndarray | None = None,
               spacing: tuple[float, ...] | None = None) -> None:
    """One HDF5 case file: `image` (float32), `label` (uint8) when labeled, `spacing` (z, y, x) when known."""
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.asarray(image, np.float32), compression="gzip", compression_opts=1)
        if label is not None:
            f.create_dataset("label", data=label, compression="gzip", compression_opts=1)
        if spacing is not None:
            f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)


def write_volume(root: Path, case: str, image: np.ndarray, label: np.ndarray | None,
                 spacing: tuple[float, ...] | None, training: bool) -> None:
    """`root/data/<case>.h5`, and for a training case also its slices `root/data/slices/<case>_slice_<k>.h5`."""
    write_case(root / "data" / f"{case}.h5", image, label, spacing)
    if training:
        for z in range(image.shape[0]):
            write_case(root / "data" / "slices" / f"{slice_name(case, z)}.h5", image[z],
                       None if label is None else label[z])


def write_lists(folder: Path, lists: dict[str, list[str]]) -> None:
    for name in LIST_NAMES:
        cases = lists.get(name, [])
        (folder / f"{name}.list").write_text("".join(f"{c}\n" for c in cases))


class Progress(ProgressBar):
    """The console's progress bar for a conversion loop: `step()` after each item, closed at the last."""

    def __init__(self, label: str, total: int, unit: str, stream: TextIO | None = None) -> None:
        super().__init__(total, label, unit, stream if stream is not None else sys.stdout)

    def step(self) -> None:
        self.advance()
        if self.done >= self.total:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on an error, so its `error:` line starts on a line of its own


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out that is a file, or a folder with content (unless --overwrite)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a folder; expected a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output folder exists and is not empty; expected a new or empty folder, or pass "
                        "--overwrite (which replaces only the files this command writes and deletes nothing)")


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success move its content to `out`, on failure delete it.

    A new or empty `out` is replaced by one rename, so a reader never sees half a dataset. With
    --overwrite, an `out` that has content receives our files one by one (each an atomic rename; the
    lists last); files of the user's that we do not write are left as they are.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        check_output(out, overwrite)  # something may have appeared there meanwhile
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.replace(tmp, out)
            return
        _merge(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _merge(tmp: Path, out: Path) -> None:
    files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.suffix == ".list", str(p)))
    for src in files:  # check every target first: a clash stops us before anything moved
        dst = out / src.relative_to(tmp)
        if dst.is_dir():
            raise UserError(f"{dst}: is a folder where this command writes a file; expected no folder of that name "
                            "(nothing was changed)")
        for parent in dst.relative_to(out).parents:
            if (out / parent).exists() and not (out / parent).is_dir():
                raise UserError(f"{out / parent}: is a file where this command writes a folder; expected no file of "
                                "that name (nothing was changed)")
    for src in files:
        dst = out / src.relative_to(tmp)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
