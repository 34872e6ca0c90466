"""`python -m raysemi.data export-nifti`: volumes of a dataset in the SSL4MIS layout back to NIfTI.

For looking at the data in a NIfTI viewer, and for trying `raysemi.predict` (which reads NIfTI) on
the phantom: each volume of a split becomes `<case>.nii.gz` (the normalised image, float32) with
its label beside it as `<case>_gt.nii.gz` (uint8), the naming that `predict` skips as a label and
`import` reads as one. The spacing stored with the volume is kept (1 mm where none is stored).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from raysemi.data.convert import Progress, check_out_folder, write_nifti
from raysemi.data.layout import check_split, load_volumes
from raysemi.errors import UserError

LABEL_SUFFIX = "_gt"


def export_nifti(root: Path, split: str, out: Path, *, labels: bool = True, num_classes: int = 4,
                 overwrite: bool = False, stream=None) -> list[Path]:
    """Write the volumes of `split` under `root` to `out` as NIfTI (see the module); the files written."""
    import SimpleITK as sitk

    check_split(root, split)
    # every volume read and checked before a file is written; the train split's unlabeled cases
    # have no label to write
    volumes = load_volumes(root, split, num_classes, need_labels=False)
    check_out_folder(out, overwrite, f"the .nii.gz files of these {len(volumes)} cases")
    made = out  # the first folder this run creates (removed again if it fails): nothing is left behind
    while not made.parent.exists() and made.parent != made.parent.parent:
        made = made.parent
    made = None if out.exists() else made
    written, path = [], out
    try:
        out.mkdir(parents=True, exist_ok=True)
        with Progress(f"{split} volumes", len(volumes), "vol", stream) as bar:  # on stdout, as import's
            for vol in volumes:
                spacing = tuple(reversed(vol.spacing)) if vol.spacing is not None else (1.0, 1.0, 1.0)  # (x, y, z)
                pairs = [(vol.image.astype(np.float32), out / f"{vol.name}.nii.gz")]
                if labels and vol.label is not None:
                    pairs.append((vol.label.astype(np.uint8), out / f"{vol.name}{LABEL_SUFFIX}.nii.gz"))
                for array, path in pairs:
                    image = sitk.GetImageFromArray(array)
                    image.SetSpacing(spacing)
                    write_nifti(image, path)
                    written.append(path)
                bar.step()
    except BaseException as err:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(err, (OSError, RuntimeError)):  # SimpleITK says a failed write with a RuntimeError
            first = (getattr(err, "strerror", None) or str(err)).strip().splitlines()
            raise UserError(f"{path}: --out: cannot write ({first[0] if first else type(err).__name__}); expected a "
                            "folder with room for the files") from None
        raise
    return written
