"""`python -m raysemi.data export-nifti`: volumes of a dataset in the SSL4MIS layout back to NIfTI.

For looking at the data in a NIfTI viewer, and for trying `raysemi.predict` (which reads NIfTI) on
the phantom: each volume of a split becomes `<case>.nii.gz` (the normalised image, float32) with
its label beside it as `<case>_gt.nii.gz` (uint8), the naming that `predict` skips as a label and
`import` reads as one. The spacing stored with the volume is kept (1 mm where none is stored).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raysemi.data.convert import check_out_folder, write_nifti
from raysemi.data.layout import load_volumes
from raysemi.progress import ProgressBar

LABEL_SUFFIX = "_gt"


def export_nifti(root: Path, split: str, out: Path, *, labels: bool = True, num_classes: int = 4,
                 overwrite: bool = False, stream=None) -> list[Path]:
    """Write the volumes of `split` under `root` to `out` as NIfTI (see the module); the files written."""
    import SimpleITK as sitk

    volumes = load_volumes(root, split, num_classes)  # every volume read and checked before a file is written
    check_out_folder(out, overwrite, f"the .nii.gz files of these {len(volumes)} cases")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with ProgressBar(len(volumes), f"{split} volumes", unit="vol", stream=stream) as bar:
        for i, vol in enumerate(volumes, start=1):
            spacing = tuple(reversed(vol.spacing)) if vol.spacing is not None else (1.0, 1.0, 1.0)  # (x, y, z)
            pairs = [(vol.image.astype(np.float32), out / f"{vol.name}.nii.gz")]
            if labels:
                pairs.append((vol.label.astype(np.uint8), out / f"{vol.name}{LABEL_SUFFIX}.nii.gz"))
            for array, path in pairs:
                image = sitk.GetImageFromArray(array)
                image.SetSpacing(spacing)
                write_nifti(image, path)
                written.append(path)
            bar.update(i)
    return written
