"""A synthetic cardiac short-axis MRI set in the SSL4MIS ACDC layout, deterministic for a seed.

Each patient has an end-diastolic and an end-systolic volume of 6-10 short-axis slices: LV blood
pool (label 3) with papillary muscles inside, a myocardium ring (2), an RV crescent (1) that
shrinks and vanishes towards the apex, in a body of organ-like blobs (lungs, liver, fat, a spine),
blurred for partial volume, under a smooth bias field and Rician-like noise, min-max normalised per
volume as the reference's preprocessing does. Myocardium and background tissue share intensities,
and RV and LV blood look alike, so shape context matters: a UNet with few labels does not reach
the ceiling. Shapes vary along each volume and across patients.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from raysemi.errors import UserError
from raysemi.files import out_folder

#: bump when the generator changes, so cached sets are regenerated
VERSION = 1


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (np.abs(f).max() + 1e-8)


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _wobbly_disc(yy, xx, cy, cx, r, phases, amps) -> np.ndarray:
    """Disc whose radius varies smoothly with angle (a few Fourier modes)."""
    theta = np.arctan2(yy - cy, xx - cx)
    rr = r * (1 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(zip(amps, phases))))
    return np.hypot(yy - cy, xx - cx) <= rr


def _patient(rng: np.random.Generator, size: tuple[int, int]) -> dict:
    """Per-patient anatomy and acquisition parameters."""
    return {
        "n_slices": int(rng.integers(6, 11)),
        "body": (rng.uniform(0.36, 0.44), rng.uniform(0.42, 0.48), rng.uniform(-0.3, 0.3)),
        "heart": (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.08)),
        "lv_r": rng.uniform(0.085, 0.12),
        "myo_t": rng.uniform(0.025, 0.04),
        "rv_angle": rng.uniform(2.6, 3.6),  # the RV sits to the patient's right of the LV
        "rv_scale": rng.uniform(1.1, 1.5),
        "ellip": rng.uniform(0.85, 1.15),
        "noise": rng.uniform(0.04, 0.09),
        "bias": rng.uniform(0.15, 0.4),
        "blood": rng.uniform(0.75, 0.95),
        "myo": rng.uniform(0.25, 0.35),
        "es_frame": int(rng.integers(6, 16)),
        "spacing_z": float(rng.choice([5.0, 6.5, 10.0])),
    }


def _slice(rng, P: dict, size: tuple[int, int], z: float, systole: bool) -> tuple[np.ndarray, np.ndarray]:
    """One slice at relative depth z in [0, 1] (base -> apex)."""
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    yy, xx = yy / H - 0.5, xx / W - 0.5
    img = np.zeros(size)
    lab = np.zeros(size, np.uint8)
    # body and background organs
    by, bx, ba = P["body"]
    body = _ellipse(yy, xx, 0.02, 0, by, bx, ba * 0.3)
    img[body] = 0.32
    img += body * 0.12 * _smooth_field(rng, size, H / 12)
    for side in (-1, 1):  # lungs: dark
        lung = _ellipse(yy, xx, -0.08 + rng.normal(0, 0.01), side * 0.24, 0.2, 0.12, side * 0.3)
        img[lung & body] = 0.06
    liver = _ellipse(yy, xx, 0.2 + 0.15 * z, -0.18, 0.16, 0.2, 0.4)
    img[liver & body] = 0.5 + 0.05 * rng.standard_normal()
    spine = _ellipse(yy, xx, 0.3, 0.0, 0.05, 0.045)
    img[spine] = 0.7
    fat = body & ~_ellipse(yy, xx, 0.02, 0, by - 0.025, bx - 0.025, ba * 0.3)
    img[fat] = 0.75
    # heart: shrinks from base to apex; systole shrinks the cavity and thickens the wall
    hy, hx = P["heart"]
    taper = 1.0 - 0.55 * z ** 1.4
    lv_r = P["lv_r"] * taper * (0.72 if systole else 1.0)
    t = P["myo_t"] * (1.35 if systole else 1.0) * (0.8 + 0.2 * taper)
    phases, amps = rng.uniform(0, 2 * np.pi, 3), rng.uniform(0, 0.06, 3)
    cy, cx = hy + rng.normal(0, 0.004), hx + rng.normal(0, 0.004)
    xs = xx * P["ellip"]
    epi = _wobbly_disc(yy, xs, cy, cx, lv_r + t, phases, amps * 0.5)
    endo = _wobbly_disc(yy, xs, cy, cx, lv_r, phases, amps)
    rv_r = P["lv_r"] * P["rv_scale"] * (1.0 - 1.1 * z ** 1.2) * (0.8 if systole else 1.0)
    rv = np.zeros(size, bool)
    if rv_r > 0.02:
        d = lv_r + t + rv_r * 0.35
        ry, rx = cy + d * np.sin(P["rv_angle"]), cx + d * np.cos(P["rv_angle"])
        rv = _ellipse(yy, xs, ry, rx, rv_r * 0.75, rv_r * 1.15, P["rv_angle"] + np.pi / 2) & ~epi
        rv &= ~_wobbly_disc(yy, xs, cy, cx, lv_r + t + 0.012, phases, amps * 0.5)
    pericardium = _wobbly_disc(yy, xs, cy, cx, lv_r + t + 0.02, phases, amps * 0.5) | ndimage.binary_dilation(rv, iterations=2)
    img[pericardium] = 0.62  # epicardial fat, partly bright
    img[epi] = P["myo"]
    img[endo] = P["blood"]
    img[rv] = P["blood"] - 0.05
    lab[rv], lab[epi & ~endo], lab[endo] = 1, 2, 3
    for _ in range(int(rng.integers(0, 3))):  # papillary muscles: dark spots labeled as LV cavity
        a = rng.uniform(0, 2 * np.pi)
        pm = _ellipse(yy, xs, cy + 0.6 * lv_r * np.sin(a), cx + 0.6 * lv_r * np.cos(a), 0.012, 0.012)
        img[pm & endo] = P["myo"] + 0.05
    img = ndimage.gaussian_filter(img, 0.8 * H / 128)
    return img, lab


def _volume(rng, P: dict, size: tuple[int, int], systole: bool) -> tuple[np.ndarray, np.ndarray]:
    n = P["n_slices"]
    imgs, labs = zip(*(_slice(rng, P, size, z / max(n - 1, 1), systole) for z in range(n)))
    img, lab = np.stack(imgs), np.stack(labs)
    bias = 1 + P["bias"] * _smooth_field(rng, size, size[0] / 4)
    img = img * bias[None]
    sigma = P["noise"]
    img = np.sqrt((img + rng.normal(0, sigma, img.shape)) ** 2 + rng.normal(0, sigma, img.shape) ** 2)
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32), lab


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray, spacing=None) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, compression="gzip", compression_opts=1)
        f.create_dataset("label", data=label, compression="gzip", compression_opts=1)
        if spacing is not None:
            f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)


def _write_patient(tmp: Path, p: int, seed: int, size: tuple[int, int], split_name: str
                   ) -> tuple[str, list[str], list[str]]:
    """Write one patient's ED and ES volumes (and their slices for training patients)."""
    rng = np.random.default_rng([seed, p])
    P = _patient(rng, size)
    pid = f"patient{p + 1:03d}"
    spacing = (P["spacing_z"], 200.0 / size[0], 200.0 / size[1])
    cases, slices = [], []
    for frame, systole in ((1, False), (P["es_frame"], True)):
        case = f"{pid}_frame{frame:02d}"
        img, lab = _volume(rng, P, size, systole)
        _write_h5(tmp / "data" / f"{case}.h5", img, lab, spacing)
        cases.append(case)
        if split_name == "train":
            for z in range(img.shape[0]):
                _write_h5(tmp / "data" / "slices" / f"{case}_slice_{z}.h5", img[z], lab[z])
                slices.append(f"{case}_slice_{z}")
    return split_name, cases, slices


def write_phantom(out: str | Path, patients: int = 40, seed: int = 0, size: tuple[int, int] = (128, 128),
                  split: tuple[float, float] = (0.7, 0.1), overwrite: bool = False, workers: int = 1) -> Path:
    """Write the phantom set to `out` (atomically: a temp folder renamed at the end; with
    `overwrite`, the old dataset's files are swapped for the new ones, all or nothing, and other
    files in `out` stay, as for `import --overwrite`).

    Patients are split 70/10/20 into train/val/test like ACDC's 70/10/20 of 100. `workers`
    processes write patients in parallel; the files do not depend on it.
    """
    out = out_folder(out)
    if patients < 3:
        raise UserError(f"phantom: patients: {patients} is invalid; expected at least 3 (train, val and test)")
    if len(size) != 2 or min(size) < 32:
        raise UserError(f"phantom: size: {tuple(size)} is invalid; expected two integers >= 32")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a folder; expected a new or empty folder (or a "
                        "dataset folder, with --overwrite)")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: output folder exists and is not empty; choose another or pass --overwrite")
        from raysemi.data.convert import dataset_files

        if not dataset_files(out):  # (a dataset left half-swapped by a killed --overwrite still counts)
            raise UserError(f"{out}: not a phantom/ACDC folder; refusing to overwrite other content")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "data" / "slices").mkdir(parents=True)
        n_train = max(1, int(round(patients * split[0])))
        n_val = max(1, int(round(patients * split[1])))
        n_train = min(n_train, patients - n_val - 1)
        lists: dict[str, list[str]] = {"train_slices": [], "train": [], "val": [], "test": []}
        splits = ["train" if p < n_train else "val" if p < n_train + n_val else "test" for p in range(patients)]
        jobs = [(tmp, p, seed, tuple(size), splits[p]) for p in range(patients)]
        if workers > 1:  # patients are independent (one random stream each): same files either way
            with ProcessPoolExecutor(min(workers, patients)) as pool:
                written = list(pool.map(_write_patient, *zip(*jobs)))
        else:
            written = [_write_patient(*job) for job in jobs]
        for split_name, cases, slices in written:
            lists[split_name] += cases
            lists["train_slices"] += slices
        for name, cases in lists.items():
            (tmp / f"{name}.list").write_text("\n".join(cases) + "\n")
        (tmp / "phantom.txt").write_text(f"raysemi phantom v{VERSION}: patients={patients} seed={seed} size={size[0]}x{size[1]}\n")
        if out.exists() and any(out.iterdir()):  # --overwrite: swap the old dataset's files for ours, all or
            from raysemi.data.convert import swap_dataset  # nothing; the user's other files there stay

            if not overwrite:  # it appeared while we wrote (another process): leave it alone
                raise UserError(f"{out}: output folder appeared meanwhile and is not empty; choose another or pass "
                                "--overwrite")
            swap_dataset(tmp, out)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("RAYSEMI_CACHE", Path.home() / ".cache" / "raysemi"))


def cached_phantom(patients: int = 40, seed: int = 0, size: tuple[int, int] = (128, 128)) -> Path:
    """The built-in phantom ('--data phantom'): generated once into the cache folder, then reused."""
    path = cache_dir() / f"phantom-v{VERSION}-p{patients}-s{seed}-{size[0]}x{size[1]}"
    if not (path / "phantom.txt").is_file():
        try:  # overwrite only a broken leftover; a copy that another process writes meanwhile wins
            write_phantom(path, patients, seed, size, overwrite=path.is_dir() and any(path.iterdir()))
        except (OSError, UserError):  # another process won the race: use its copy
            if not (path / "phantom.txt").is_file():
                raise
    return path
