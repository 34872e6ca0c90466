"""Shared fixtures: a tiny phantom written once per session in the real HDF5 layout."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from raysemi.config import TrainConfig
from raysemi.data import write_phantom

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """12 patients of 32x32 slices: 8 train (slices), 1 val, 3 test (ED + ES volumes each)."""
    return write_phantom(tmp_path_factory.mktemp("data") / "phantom32", patients=12, seed=0, size=(32, 32))


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory) -> Path:
    """20 patients of 64x64 slices, for the learning tests."""
    return write_phantom(tmp_path_factory.mktemp("data") / "phantom64", patients=20, seed=1, size=(64, 64))


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> Callable[[Path], str]:
    """`mlflow_store(path)` puts an empty, already migrated MLflow sqlite store at `path` and
    returns its URI. MLflow migrates a new store's schema on first use (about 1.3 s of the suite's
    time per store); a copy of one store migrated once per session is the same store without it.
    The tests of a store the CLIs create themselves (the default `./mlflow.db`, the examples) do
    not use this."""
    from mlflow.tracking import MlflowClient

    template = tmp_path_factory.mktemp("mlflow-template") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    return make


def tiny_config(data: Path | str, **overrides) -> TrainConfig:
    """A config that trains in seconds on the CPU."""
    base = dict(data=str(data), labeled_patients=2, patch_size=(32, 32), batch_size=4, labeled_bs=2,
                max_iterations=4, eval_interval=2, log_interval=1, device="cpu", eval_hd95=True)
    base.update(overrides)
    return TrainConfig(**base).validate()
