"""Batch augmentation on the training device: the reference's per-sample choices, one grid_sample.

Per sample, as SSL4MIS's `RandomGenerator` (`if r() > 0.5: rot_flip elif r() > 0.5: rotate`):
with probability 1/2 a random rot90 (k in 0..3) then a flip along a random axis; with probability
1/4 a rotation by an integer angle in [-20, 20) degrees about the centre, zero-filled; with
probability 1/4 nothing (METHODS.md says "else a rotation"; the reference code leaves a quarter
of the samples as they are, and so do we). Nearest sampling for image and label alike (the reference uses order 0 for
both). Slices are resized to the patch size once at load time, so the rotation happens after the
resize here (before it in the reference); for square patches the two agree up to nearest rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def random_affines(n: int, generator: torch.Generator, size: tuple[int, int],
                   p_rot_flip: float = 0.5, p_rotate: float = 0.5) -> Tensor:
    """(n, 2, 3) affine matrices in normalised coordinates, drawn on the CPU generator.

    `p_rot_flip` is the chance of the rot90+flip branch; `p_rotate` that of a rotation among the
    rest (the remaining samples get the identity)."""
    H, W = size
    choose_flip = torch.rand(n, generator=generator) < p_rot_flip
    choose_rotate = torch.rand(n, generator=generator) < p_rotate
    k = torch.randint(0, 4, (n,), generator=generator)
    axis = torch.randint(0, 2, (n,), generator=generator)
    angle = torch.randint(-20, 20, (n,), generator=generator).double() * math.pi / 180
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    # rot90 by k then a flip (exact dihedral maps of the normalised square)
    c = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)[k]
    s = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)[k]
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    flip = torch.diag_embed(torch.where(axis[:, None] == 0, torch.tensor([1.0, -1.0], dtype=torch.float64),
                                        torch.tensor([-1.0, 1.0], dtype=torch.float64)))
    dihedral = rot @ flip
    # arbitrary rotation in pixel units (isotropic even for non-square patches)
    ca, sa = torch.cos(angle), torch.sin(angle)
    aspect = torch.tensor([[1.0, H / W], [W / H, 1.0]], dtype=torch.float64)
    rotation = torch.stack([torch.stack([ca, -sa], -1), torch.stack([sa, ca], -1)], -2) * aspect
    identity = torch.eye(2, dtype=torch.float64).expand(n, 2, 2)
    rotation = torch.where(choose_rotate[:, None, None], rotation, identity)
    theta[:, :, :2] = torch.where(choose_flip[:, None, None], dihedral, rotation)
    return theta.float()


def augment(image: Tensor, label: Tensor | None, theta: Tensor) -> tuple[Tensor, Tensor | None]:
    """Apply per-sample affines (from `random_affines`) to (B, C, H, W) images and (B, H, W) labels."""
    theta = theta.to(image.device)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    out = F.grid_sample(image, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if label is None:
        return out, None
    lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out, lab[:, 0].round().long()
