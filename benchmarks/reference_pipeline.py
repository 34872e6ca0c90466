"""The reference's way of feeding and validating the same training step, for speed ratios measured
in one run (`benchmarks/throughput.py --compare-reference-pipeline`).

Written from SSL4MIS's description (our own code, no copied lines):
- every slice is read from its h5 file per sample, augmented on the CPU per sample
  (`random() > 0.5`: rot90 + flip; else `random() > 0.5`: a rotation of -20..20 degrees, order 0),
  zoomed to the patch size with order 0;
- batches come from a two-stream sampler (an epoch = one pass over the labeled slices, so 6-11
  iterations at 7 labeled patients) through a `DataLoader` whose workers restart every epoch;
- each batch is copied to the device synchronously, the step runs in fp32 NCHW, and the losses are
  read back on the host every iteration (the reference logs `loss.item()` each step);
- validation goes one slice at a time (zoom on the CPU, forward, argmax, zoom back) and scores
  medpy's Dice and HD95 on whole volumes.
Only the feed and the validation differ from our path; the strategy's step is the same code.
"""

from __future__ import annotations

import random
from pathlib import Path

import h5py
import numpy as np
import torch
from medpy.metric import binary
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from raysemi.data.sampler import Batch


def _augment(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if random.random() > 0.5:
        k = np.random.randint(0, 4)
        image, label = np.rot90(image, k), np.rot90(label, k)
        axis = np.random.randint(0, 2)
        image, label = np.flip(image, axis=axis).copy(), np.flip(label, axis=axis).copy()
    elif random.random() > 0.5:
        angle = np.random.randint(-20, 20)
        image = ndimage.rotate(image, angle, order=0, reshape=False)
        label = ndimage.rotate(label, angle, order=0, reshape=False)
    h, w = image.shape
    image = ndimage.zoom(image, (size[0] / h, size[1] / w), order=0)
    label = ndimage.zoom(label, (size[0] / h, size[1] / w), order=0)
    return image, label


class SliceFiles(Dataset):
    """Training slices read from `ROOT/data/slices/<name>.h5` at every access, as the reference."""

    def __init__(self, root: Path, names: list[str], size: tuple[int, int]) -> None:
        self.root, self.names, self.size = Path(root), names, size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with h5py.File(self.root / "data" / "slices" / f"{self.names[i]}.h5", "r") as f:
            image = f["image"][:]
            label = f["label"][:] if "label" in f else np.zeros(image.shape, np.uint8)
        image, label = _augment(image, label, self.size)
        return torch.from_numpy(image.astype(np.float32))[None], torch.from_numpy(label.astype(np.uint8))


class TwoStream(torch.utils.data.Sampler):
    """Batches of `labeled_bs` labeled + `unlabeled_bs` unlabeled indices; an epoch is one shuffled
    pass over the labeled indices (the unlabeled ones are drawn from their own shuffled passes)."""

    def __init__(self, labeled: list[int], unlabeled: list[int], labeled_bs: int, unlabeled_bs: int) -> None:
        self.labeled, self.unlabeled, self.lb, self.ub = labeled, unlabeled, labeled_bs, unlabeled_bs

    def __len__(self) -> int:
        return len(self.labeled) // self.lb

    def __iter__(self):
        lab = np.random.permutation(self.labeled)
        unl: list[int] = []
        for b in range(len(self)):
            while len(unl) < self.ub:
                unl.extend(np.random.permutation(self.unlabeled).tolist())
            batch_u, unl = unl[:self.ub], unl[self.ub:]
            yield lab[b * self.lb:(b + 1) * self.lb].tolist() + batch_u


class ReferenceFeed:
    """Stands in for `Trainer.sampler`: `next()` returns a Batch fed the reference's way."""

    def __init__(self, root: Path, slice_names: list[str], labeled_idx: np.ndarray, unlabeled_idx: np.ndarray,
                 labeled_bs: int, unlabeled_bs: int, size: tuple[int, int], device: torch.device,
                 workers: int = 4) -> None:
        dataset = SliceFiles(root, slice_names, size)
        sampler = TwoStream([int(i) for i in labeled_idx], [int(i) for i in unlabeled_idx], labeled_bs, unlabeled_bs)
        self.loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda")
        self.labeled_bs, self.device = labeled_bs, device
        self.epochs, self._it = 0, None

    def next(self) -> Batch:
        while True:
            if self._it is None:  # a new epoch: the DataLoader starts its workers again
                self._it, self.epochs = iter(self.loader), self.epochs + 1
            try:
                image, label = next(self._it)
                break
            except StopIteration:
                self._it = None
        return Batch(image.to(self.device), label[:self.labeled_bs].to(self.device).long())


@torch.no_grad()
def reference_validation(net: torch.nn.Module, volumes, num_classes: int, size: tuple[int, int],
                         device: torch.device) -> float:
    """Mean Dice over classes and volumes, slice by slice as the reference (HD95 computed too)."""
    from raysemi.models import main_output

    net.eval()
    scores = []
    for vol in volumes:
        pred = np.zeros_like(vol.label)
        for z in range(vol.image.shape[0]):
            s = vol.image[z]
            x = ndimage.zoom(s, (size[0] / s.shape[0], size[1] / s.shape[1]), order=0)
            x = torch.from_numpy(x.astype(np.float32))[None, None].to(device)
            out = torch.argmax(torch.softmax(main_output(net(x)), dim=1), dim=1)[0].cpu().numpy()
            pred[z] = ndimage.zoom(out, (s.shape[0] / size[0], s.shape[1] / size[1]), order=0)
        for c in range(1, num_classes):
            p, g = pred == c, vol.label == c
            if p.sum() > 0 and g.sum() > 0:
                scores.append((binary.dc(p, g), binary.hd95(p, g)))
            else:
                scores.append((0.0, 0.0))
    net.train()
    return float(np.mean([s[0] for s in scores]))
