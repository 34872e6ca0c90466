"""Training slices as one tensor on the device, and the reference's two-stream batch sampling.

A batch holds `labeled_bs` labeled slices (each drawn once per labeled epoch, reshuffled every
epoch, an incomplete last group dropped, as `TwoStreamBatchSampler` does), then
`batch_size - labeled_bs` unlabeled slices from an endless reshuffled stream. Indices are drawn on
the CPU with a seeded generator (cheap, device independent); images never leave the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raysemi.data.augment import augment, random_affines
from raysemi.data.layout import TrainSlices


@dataclass
class Batch:
    """`image` (B, C, H, W): the labeled slices first, then the unlabeled ones; `label` holds the
    labels of the first `labeled_bs` slices only (B_l, H, W)."""

    image: Tensor
    label: Tensor

    @property
    def labeled_bs(self) -> int:
        return self.label.shape[0]

    @property
    def unlabeled(self) -> Tensor:
        return self.image[self.labeled_bs:]


def resize_nearest(x: np.ndarray | Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of (H, W) or (N, H, W) to `size`; integer labels stay integers."""
    t = torch.as_tensor(np.array(x) if isinstance(x, np.ndarray) and not x.flags.writeable else x)
    squeeze = t.dim() == 2
    t = t[None] if squeeze else t
    if tuple(t.shape[-2:]) != tuple(size):
        dtype = t.dtype
        t = F.interpolate(t[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(dtype)
    return t[0] if squeeze else t


def resize_all(arrays: list[np.ndarray], size: tuple[int, int], chunk: int = 256) -> Tensor:
    """`resize_nearest` of each (H, W) array (all of one dtype, as the loader reads them), stacked in
    order (N, *size): one resize per group of up to `chunk` slices of the same shape rather than
    one per slice. A trial builds this at its start; a thousand tiny parallel ops were 15-20x
    slower when processes shared the cores (each op's thread barrier), a few large ones are not."""
    if not arrays:
        return torch.zeros((0, *size))
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(tuple(a.shape), []).append(i)
    out: Tensor | None = None
    for idx in groups.values():
        for k in range(0, len(idx), chunk):
            part = idx[k:k + chunk]
            resized = resize_nearest(np.stack([arrays[i] for i in part]), size)
            if out is None:
                out = torch.empty((len(arrays), *resized.shape[1:]), dtype=resized.dtype)
            out[torch.tensor(part)] = resized
    return out


@dataclass
class TrainTensors:
    """Training slices resized to the patch size; `labels` has rows for labeled slices only."""

    images: Tensor  # (N, 1, H, W) float32
    labels: Tensor  # (N_labeled, H, W) uint8, row i belongs to images[labeled_idx[i]]
    labeled_idx: Tensor
    unlabeled_idx: Tensor

    @classmethod
    def from_slices(cls, data: TrainSlices, patch_size: tuple[int, int]) -> "TrainTensors":
        images = resize_all(data.images, patch_size)[:, None].float()
        labels = resize_all([data.labels[int(i)] for i in data.labeled_idx], patch_size).to(torch.uint8) \
            if len(data.labeled_idx) else torch.zeros(0, *patch_size, dtype=torch.uint8)
        return cls(images, labels, torch.tensor(data.labeled_idx, dtype=torch.long),
                   torch.tensor(data.unlabeled_idx, dtype=torch.long))

    def to(self, device: torch.device | str) -> "TrainTensors":
        return TrainTensors(self.images.to(device), self.labels.to(device), self.labeled_idx, self.unlabeled_idx)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small CPU tensor to `device` without stalling the host: on CUDA through pinned memory
    with `non_blocking`, so the step's kernels stay queued (a plain `.to` waits for the GPU)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _Stream:
    """Endless shuffled passes over `n` items, served `k` at a time."""

    def __init__(self, n: int, k: int, generator: torch.Generator, drop_last: bool) -> None:
        if n < 1 or (drop_last and n < k):
            raise ValueError(f"cannot draw {k} of {n} items per batch")
        self.n, self.k, self.gen, self.drop_last = n, k, generator, drop_last
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> Tensor:
        out = []
        need = self.k
        while need:
            if self.pos >= self.n or (self.drop_last and self.n - self.pos < self.k):
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            take = self.perm[self.pos:self.pos + need]
            self.pos += len(take)
            need -= len(take)
            out.append(take)
        return torch.cat(out)

    def state(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load(self, state: dict) -> None:
        self.perm, self.pos = state["perm"].cpu().clone(), int(state["pos"])


class BatchSampler:
    """Draws augmented batches from device-resident `TrainTensors`.

    `unlabeled_bs = 0` gives labeled-only batches (the supervised baseline). The labeled stream
    wraps without dropping when there are fewer labeled slices than `labeled_bs`.
    """

    def __init__(self, data: TrainTensors, labeled_bs: int, unlabeled_bs: int, seed: int,
                 augment_batches: bool = True) -> None:
        self.data = data
        self.generator = torch.Generator().manual_seed(seed)
        n_lab = len(data.labeled_idx)
        if unlabeled_bs and len(data.unlabeled_idx) == 0:
            raise ValueError("labeled_patients labels every patient of train_slices.list, so there are no unlabeled "
                             "slices; expected fewer labeled patients for a semi-supervised strategy, or --method supervised")
        self.labeled = _Stream(n_lab, labeled_bs, self.generator, drop_last=n_lab >= labeled_bs)
        self.unlabeled = _Stream(len(data.unlabeled_idx), unlabeled_bs, self.generator, False) if unlabeled_bs else None
        self.augment = augment_batches

    def draw(self) -> dict[str, Tensor]:
        """The host side of a batch: slice indices `idx`, label rows `rows` and (when augmenting)
        the affines `theta`, as small CPU tensors of fixed shapes."""
        rows = self.labeled.next()
        idx = self.data.labeled_idx[rows]
        if self.unlabeled is not None:
            idx = torch.cat([idx, self.data.unlabeled_idx[self.unlabeled.next()]])
        out = {"idx": idx, "rows": rows}
        if self.augment:
            out["theta"] = random_affines(len(idx), self.generator, tuple(self.data.images.shape[-2:]))
        return out

    def assemble(self, idx: Tensor, rows: Tensor, theta: Tensor | None = None) -> Batch:
        """The device side: gather and augment the drawn slices. Only device work of fixed shapes
        (`index_select`, one `grid_sample`), so it can be part of a captured CUDA graph."""
        image = torch.index_select(self.data.images, 0, idx)
        label = torch.index_select(self.data.labels, 0, rows).long()
        if theta is not None:
            lab_full = torch.zeros(image.shape[0], *image.shape[-2:], dtype=torch.long, device=image.device)
            lab_full[: rows.shape[0]] = label
            image, lab_full = augment(image, lab_full, theta)
            label = lab_full[: rows.shape[0]]
        return Batch(image.contiguous(), label)

    def next(self) -> Batch:
        device = self.data.images.device
        return self.assemble(**{k: to_device(v, device) for k, v in self.draw().items()})

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "labeled": self.labeled.state(),
                "unlabeled": self.unlabeled.state() if self.unlabeled else None}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.labeled.load(state["labeled"])
        if self.unlabeled is not None and state["unlabeled"] is not None:
            self.unlabeled.load(state["unlabeled"])
