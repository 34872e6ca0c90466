"""What `prepare-acdc` and `import` share: reading NIfTI and PNG files, searching a folder tree (which
`predict` uses too), min-max normalisation, writing the HDF5 case files, progress lines, and an
output folder that is built beside the target and only then renamed into place (or, with
--overwrite, swapped for the old dataset's files, all or nothing: files of the user's that are not
dataset files stay).

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
from typing import NamedTuple, TextIO

import h5py
import numpy as np

from raysemi.errors import UserError
from raysemi.files import cannot_write_in, out_folder
from raysemi.progress import ProgressBar

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LIST_NAMES = ("train_slices", "train", "val", "test")
DATASET_TOP = (*(f"{name}.list" for name in LIST_NAMES), "phantom.txt")  # `phantom` writes phantom.txt
OURS = "the .list files, phantom.txt, data/*.h5 and data/slices/*.h5"  # what --overwrite replaces


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


def walk_files(folder: Path, flag: str, skip: tuple[Path | None, ...] = ()) -> list[Path]:
    """The files in `folder` and its subfolders at any depth, sorted; hidden files and folders are left
    out, and so are the folders of `skip` (an --out or --labels folder inside the searched one is not
    input). Linked folders are followed, each folder searched once, so a link loop ends. `import` and
    `predict` share it, so that both read the same tree the same way; `flag` names the option in the
    error for an unreadable subfolder."""
    skipped = {os.path.realpath(s) for s in skip if s is not None} - {os.path.realpath(folder)}

    def unreadable(err: OSError) -> None:
        raise UserError(f"{err.filename}: {flag} subfolder cannot be read ({err.strerror}); expected a readable "
                        "folder")

    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: searched already
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        # sorted, so a folder reached by two paths (a link) is always found by the same one
        dirs[:] = sorted(d for d in dirs
                         if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in skipped)
        found += [Path(root, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(root, n))]
    return sorted(found)


def _one_line(err: BaseException) -> str:
    """The last informative line of an exception (SimpleITK's messages span several lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


class Grid(NamedTuple):
    """Where a NIfTI file's voxels lie in the scanner's space: spacing (z, y, x) in mm, as the HDF5
    files store it; origin (x, y, z) in mm and the direction cosines (row-major 3x3), as ITK gives
    them. An image and its label must share it to pair up voxel for voxel."""
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]


def read_nifti(path: Path, what: str = "image") -> tuple[np.ndarray, Grid]:
    """A 3D NIfTI file as a (D, H, W) array and its voxel grid."""
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
    check_whole(path, what)
    array = sitk.GetArrayFromImage(img)  # (z, y, x)
    grid = Grid(tuple(float(v) for v in reversed(img.GetSpacing())), tuple(float(v) for v in img.GetOrigin()),
                tuple(float(v) for v in img.GetDirection()))
    return array, grid  # type: ignore[arg-type]


def check_whole(path: Path, what: str = "image") -> None:
    """Refuse a cut-off NIfTI file (a half-downloaded or half-copied scan): SimpleITK reads one
    without a word, zeros in place of the missing voxels. A gzip stream must reach its end (what
    follows it is ignored, as SimpleITK does), and the data must be as long as the NIfTI-1 header
    says (its datatype's size: ITK reads by datatype, not bitpix)."""
    import zlib

    try:
        with open(path, "rb") as f:
            if f.read(2) == b"\x1f\x8b":  # by content: SimpleITK reads a plain .nii named .nii.gz too
                f.seek(0)
                stream, head, size = zlib.decompressobj(wbits=31), b"", 0
                while not stream.eof and (chunk := f.read(1 << 20)):
                    data = stream.decompress(chunk)
                    head += data[:348 - len(head)]  # the header: the first 348 bytes
                    size += len(data)
                if not stream.eof:
                    raise EOFError("the compressed stream ends before its end mark")
            else:
                f.seek(0)
                head, size = f.read(348), os.fstat(f.fileno()).st_size
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path}: the file is cut off or damaged ({type(err).__name__}: {err}); expected a whole "
                        f"{what} (copy or download it again)") from None
    need = _nifti1_length(head)
    if need is not None and size < need:
        raise UserError(f"{path}: the file is cut off: {size} bytes where its header needs {need}; expected a "
                        f"whole {what} (copy or download it again)")


#: NIfTI-1 datatype code -> bytes per voxel (the codes ITK reads)
_NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                1536: 16, 1792: 16, 2048: 32, 2304: 4}


def _nifti1_length(head: bytes) -> int | None:
    """The bytes a NIfTI-1 file needs (vox_offset + voxels x datatype size), from its 348-byte
    header in either byte order; None for anything else (NIfTI-2, an odd header: SimpleITK's)."""
    import math
    import struct

    if len(head) < 348:
        return None
    for order in "<>":
        if struct.unpack(order + "i", head[:4])[0] != 348:
            continue
        dims = struct.unpack(order + "8h", head[40:56])
        datatype = struct.unpack(order + "h", head[70:72])[0]
        offset = struct.unpack(order + "f", head[108:112])[0]
        if not 0 < dims[0] <= 7 or datatype not in _NIFTI_BYTES or not math.isfinite(offset) or offset < 0:
            return None
        return int(offset) + int(np.prod([max(d, 1) for d in dims[1:1 + dims[0]]])) * _NIFTI_BYTES[datatype]
    return None


def check_out_folder(out: Path, overwrite: bool, replaced: str) -> None:
    """A NIfTI writer's --out: a folder, new or empty unless --overwrite (whose files, `replaced`
    says which, are then replaced and nothing deleted); refused in one line otherwise."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out: exists and is not a folder; expected a folder (new, empty, or --overwrite)")
    if out.is_dir() and not overwrite:
        present = sorted(p.name for p in out.iterdir())
        if present:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            entries = f"{len(present)} entr{'y' if len(present) == 1 else 'ies'}"
            raise UserError(f"{out}: --out: folder is not empty ({entries}: {shown}); choose another --out, or "
                            f"pass --overwrite (only {replaced} are replaced, nothing is deleted)")
    parent = out  # the folder it will be made in: a folder this user can write to
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{out}: --out: {parent} is a file; expected a folder path")
    why = cannot_write_in(parent if parent.exists() else Path.cwd())
    if why:
        raise UserError(f"{out}: --out: {parent} {why}; expected a folder this user can write to")


def write_nifti(image, path: Path) -> None:
    """Write a SimpleITK image as compressed NIfTI at `path`, atomically: through a hidden name in
    the same folder (which folder searches skip), renamed into place."""
    import secrets

    import SimpleITK as sitk

    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp.nii.gz")
    try:
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("NiftiImageIO")
        writer.SetFileName(tmp)
        writer.UseCompressionOn()
        writer.Execute(image)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        off = label[~np.isfinite(label) | (label != np.round(label))]
        if off.size:
            raise UserError(f"{path}: label: non-integer values (e.g. {float(off[0]):g}); expected integer classes "
                            f"0..{num_classes - 1} (a mask resampled with linear interpolation? resample labels "
                            "with nearest neighbour)")
    elif label.dtype.kind not in "biu":
        raise UserError(f"{path}: label: voxel type {label.dtype}; expected integer classes 0..{num_classes - 1}")
    bad = np.unique(label[(label < 0) | (label >= num_classes)])
    if bad.size:
        hint = " (a 0/255 mask? store class indices)" if 255 in bad.tolist() else ""
        raise UserError(f"{path}: label: values {bad[:5].tolist()} outside 0..{num_classes - 1}{hint}; expected "
                        f"classes 0..{num_classes - 1} ({option} {num_classes})")
    return label.astype(np.uint8 if num_classes <= 256 else np.uint16)


#: largest difference in a direction cosine between a label and its image: about 0.006 degrees,
#: 0.04 mm at the edge of a 400 mm field; headers written by two tools differ by ~1e-7
DIRECTION_TOLERANCE = 1e-4


def check_same_grid(label: Grid, image: Grid, path: Path, image_path: Path) -> None:
    """A label must lie on its image's voxel grid: the same spacing, origin and orientation. The
    arrays are paired voxel for voxel, so a label shifted or flipped in the scanner's space would
    silently train on the wrong pixels. The tolerances pass the float noise of headers written by
    different tools (1% of a voxel for the origin), not a real shift or turn."""
    fmt = lambda s: "(" + ", ".join(f"{v:.6g}" for v in s) + ")"  # noqa: E731
    header = ("; if the arrays do match voxel for voxel and only the label's header is wrong, copy the image's "
              "header to it (SimpleITK: label.CopyInformation(image))")
    if not np.allclose(label.spacing, image.spacing, rtol=1e-3, atol=1e-5):
        raise UserError(f"{path}: label spacing (z, y, x) {fmt(label.spacing)} mm differs from image "
                        f"{image_path.name} spacing {fmt(image.spacing)} mm; expected the same voxel grid" + header)
    shift, limit = float(np.abs(np.subtract(label.origin, image.origin)).max()), 0.01 * min(image.spacing)
    if shift > limit:
        raise UserError(f"{path}: label origin (x, y, z) {fmt(label.origin)} mm differs from image "
                        f"{image_path.name} origin {fmt(image.origin)} mm by {shift:.4g} mm, more than 1% of its "
                        f"{min(image.spacing):g} mm voxel; expected the same voxel grid" + header)
    turn = float(np.abs(np.subtract(label.direction, image.direction)).max())
    if turn > DIRECTION_TOLERANCE:
        raise UserError(f"{path}: label direction {fmt(label.direction)} differs from image {image_path.name} "
                        f"direction {fmt(image.direction)} by {turn:.3g} in a cosine "
                        f"(at most {DIRECTION_TOLERANCE:g}); "
                        "expected the same orientation (the arrays would be paired flipped or turned)" + header)


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


def dataset_files(root: Path) -> list[Path]:
    """The files of a dataset in `root` that `python -m raysemi.data` writes, relative to `root`: the
    four lists, `phantom.txt` and every `.h5` directly in `data/` or `data/slices/` (a link counts as
    a file: it is moved, never followed). Nothing else in `root` is ours, so --overwrite leaves it."""
    found = [Path(name) for name in DATASET_TOP if _is_file(root / name)]
    for sub in (Path("data"), Path("data") / "slices"):
        if (root / sub).is_dir():
            found += sorted(sub / p.name for p in (root / sub).iterdir() if p.suffix == ".h5" and _is_file(p))
    return found


def _is_file(path: Path) -> bool:
    return path.is_symlink() or path.is_file()


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out that is a file, or a folder with content (unless --overwrite)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a folder; expected a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output folder exists and is not empty; expected a new or empty folder, or pass "
                        f"--overwrite (which replaces the dataset there, {OURS}, and leaves your other files)")


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success put its content in `out`, on failure delete it.

    A new or empty `out` is replaced by one rename, so a reader never sees half a dataset. With
    --overwrite, an `out` that has content has its dataset replaced as a whole (see `swap_dataset`):
    the old dataset's files (`dataset_files`) go, the new ones come, and every other file stays. A
    failure part-way (an OSError, Ctrl-C) moves the old files back and leaves `out` as it was.
    """
    out = out_folder(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        try:
            yield tmp
        except OSError as err:  # a full disk, a lost mount: one line, and `out` as it was
            what = err.strerror or (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"{err.filename or out}: the dataset could not be written ({what}); nothing was changed "
                            f"in {out}; expected room and permission to write beside it") from None
        check_output(out, overwrite)  # something may have appeared there meanwhile
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.replace(tmp, out)
            return
        swap_dataset(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _rank(rel: Path) -> int:
    """train_slices.list 0, the other top-level files 1, the .h5 files 2: the old dataset leaves in
    this order and the new one comes in the reverse, so `out` holds a train_slices.list only before
    the first rename and after the last one."""
    return 0 if rel == Path("train_slices.list") else 1 if len(rel.parts) == 1 else 2


def swap_dataset(tmp: Path, out: Path) -> None:
    """Replace the dataset in `out` (its `dataset_files`) by the one built in `tmp`, all or nothing.

    Every clash is checked before anything moves. The old dataset's files are then renamed into a
    backup folder `.<out name>.old-*` beside `out`, the new ones are renamed in, and the backup is
    deleted. On an error or Ctrl-C the new files are taken out again and the old ones renamed back,
    so `out` is as it was (an OSError becomes a UserError saying so). Files of `out` that are not
    dataset files are never moved. If the process dies between two renames (power cut, kill -9),
    `out` holds part of each dataset and no train_slices.list (so no run reads it), the rest of the
    old dataset is in `.<out name>.old-*` and the rest of the new one in `.<out name>.tmp-*`: run the
    command again with --overwrite (or move the backup's files back) and delete those two folders.
    """
    new = sorted((p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file()), key=lambda p: (-_rank(p), str(p)))
    # a file we are about to replace is backed up too, dataset file or not: the undo never loses one
    old = sorted(set(dataset_files(out)) | {rel for rel in new if _is_file(out / rel)},
                 key=lambda p: (_rank(p), str(p)))
    for rel in new:  # check every target first: a clash stops us before anything moved
        dst = out / rel
        if dst.is_dir() and rel not in old:
            raise UserError(f"{dst}: is a folder where this command writes a file; expected no folder of that name "
                            "(nothing was changed)")
        for parent in list(rel.parents)[:-1]:
            if (out / parent).exists() and not (out / parent).is_dir():
                raise UserError(f"{out / parent}: is a file where this command writes a folder; expected no file of "
                                "that name (nothing was changed)")
    backup: Path | None = None
    aside: list[Path] = []  # old files moved (or being moved) into the backup
    moved: list[Path] = []  # new files moved (or being moved) into out
    made: list[Path] = []  # folders created in out
    try:
        if old:
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            for rel in old:
                (backup / rel).parent.mkdir(parents=True, exist_ok=True)
                aside.append(rel)  # before the rename: a Ctrl-C between the two is undone too
                os.replace(out / rel, backup / rel)
        for rel in new:
            for parent in reversed(list(rel.parents)[:-1]):
                if not (out / parent).exists():
                    (out / parent).mkdir()
                    made.append(parent)
            moved.append(rel)
            os.replace(tmp / rel, out / rel)
    except BaseException as err:
        stuck = _undo(out, backup, aside, moved, made)
        if stuck:
            raise UserError(f"{out}: replacing the dataset failed ({_one_line(err)}), and moving the old files back "
                            f"failed too ({stuck}); the old dataset's files that are not back in {out} are in "
                            f"{backup} (same relative paths): move them back by hand") from err
        if isinstance(err, OSError):
            raise UserError(f"{out}: replacing the dataset failed ({_one_line(err)}); the old dataset is back as "
                            "it was and nothing was changed") from err
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _undo(out: Path, backup: Path | None, aside: list[Path], moved: list[Path], made: list[Path]) -> str:
    """Take the new files out of `out` and rename the old ones back (the last of each list may not have
    moved); '' when all went back, else the first error (the backup folder is then kept)."""
    errors: list[str] = []
    for rel in reversed(moved):
        try:
            (out / rel).unlink(missing_ok=True)
        except OSError as err:
            errors.append(_one_line(err))
    for rel in reversed(made):
        try:
            (out / rel).rmdir()
        except OSError as err:
            errors.append(_one_line(err))
    for rel in reversed(aside):
        try:
            if os.path.lexists(backup / rel):  # type: ignore[operator]
                os.replace(backup / rel, out / rel)  # type: ignore[operator]
        except OSError as err:
            errors.append(_one_line(err))
    if errors:
        return errors[0] + (f" and {len(errors) - 1} more" if len(errors) > 1 else "")
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return ""
