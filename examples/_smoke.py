"""Shared by the examples: the tiny settings of `--smoke-test` (CI runs every example with it)."""

from __future__ import annotations

from pathlib import Path

from raysemi.data import write_phantom

SMOKE_TRAIN = ["--labeled-patients", "2", "--patch-size", "32", "32", "--batch-size", "4", "--labeled-bs", "2",
               "--max-iterations", "6", "--eval-interval", "3", "--eval-batch-size", "16"]


def smoke_data(workdir: Path) -> str:
    """A 12-patient 32x32 phantom in the working folder (generated once)."""
    path = workdir / "smoke-phantom"
    if not (path / "phantom.txt").is_file():
        write_phantom(path, patients=12, seed=0, size=(32, 32), overwrite=True)
    return str(path)
