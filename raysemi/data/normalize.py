"""Intensity normalisation shared by dataset preparation and prediction.

The SSL4MIS ACDC release (whose HDF5 files raysemi trains on as they are) scales every volume on
its own to [0, 1]: `(x - min) / (max - min)`. Anything that turns raw scans into network input
(`raysemi.data prepare-acdc`, `raysemi.predict`) must use this same rule, so it lives here once.
"""

from __future__ import annotations

import numpy as np


def minmax(volume: np.ndarray) -> np.ndarray:
    """Per-volume min-max scaling to [0, 1] as float32, the SSL4MIS ACDC preprocessing.

    A constant volume (max == min) becomes all zeros rather than NaN. Raises ValueError on an empty
    array or on NaN/inf values (callers turn it into a one-line error naming their file).
    """
    # in float64 as the reference (numpy's arithmetic on the int16 scans), cast at the end: float32
    # before subtracting the minimum loses the detail of intensities with a large offset
    x = np.asarray(volume, dtype=np.float64)
    if x.size == 0:
        raise ValueError("empty array; expected at least one voxel")
    if not np.isfinite(x).all():
        raise ValueError("contains NaN or inf; expected finite intensities")
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)
