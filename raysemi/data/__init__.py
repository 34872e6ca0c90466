"""Data: the SSL4MIS layout reader, the patient split, the phantom, the ACDC and NIfTI/PNG converters,
device batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raysemi.data.acdc import prepare_acdc
from raysemi.data.importer import import_folder
from raysemi.data.layout import (TrainSlices, Volume, load_train_slices, load_volumes, patient_id, read_list,
                                 shipped_list, split_labeled)
from raysemi.data.phantom import cached_phantom, write_phantom
from raysemi.data.sampler import Batch, BatchSampler, TrainTensors, resize_nearest

__all__ = ["Batch", "BatchSampler", "Dataset", "TrainSlices", "TrainTensors", "Volume", "cached_phantom",
           "import_folder", "load_dataset", "load_train_slices", "load_volumes", "patient_id", "prepare_acdc",
           "read_list", "resolve_data_root", "resize_nearest", "shipped_list", "split_labeled", "write_phantom"]


@dataclass
class Dataset:
    """What a training run reads: the training slices and the validation volumes."""

    root: Path
    train: TrainSlices
    val: list[Volume]


def resolve_data_root(data: str) -> Path:
    """'phantom' (or empty) is the built-in phantom, generated once into the cache; else a path."""
    if data in ("", "phantom"):
        return cached_phantom()
    return Path(data).expanduser()


def load_dataset(data: str, labeled_patients: int, num_classes: int) -> Dataset:
    root = resolve_data_root(data)
    train = load_train_slices(root, labeled_patients, num_classes)
    return Dataset(root, train, load_volumes(root, "val", num_classes))
