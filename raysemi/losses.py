"""Losses shared by the strategies: the reference's Dice loss, the supervised loss, entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def dice_loss(probs: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Mean over classes (background included) of `1 - (2 sum(p y) + s) / (sum(p^2) + sum(y^2) + s)`.

    `probs` is (B, C, H, W) softmax output, `target` (B, H, W) integer classes; sums run over the
    whole batch, as in the SSL4MIS `DiceLoss`.
    """
    if probs.dim() != 4 or target.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"dice_loss: probs (B, C, H, W) and target (B, H, W) expected, "
                         f"got {tuple(probs.shape)} and {tuple(target.shape)}")
    probs = probs.float()
    onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    intersect = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    return (1.0 - (2.0 * intersect + smooth) / (denom + smooth)).mean()


def supervised_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`0.5 * (CE + Dice)` on logits (B, C, H, W); returns (loss, ce, dice)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target.long())
    dice = dice_loss(torch.softmax(logits, dim=1), target)
    return 0.5 * (ce + dice), ce, dice


def entropy_map(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-pixel entropy `-sum_c p_c log(p_c + eps)` over the class axis (dim 1)."""
    return -(probs * torch.log(probs + eps)).sum(dim=1)


def normalized_entropy(probs: Tensor, num_classes: int = 4) -> Tensor:
    """Mean of `entropy / ln(C)`. C is a normaliser, not necessarily the class count: the 2D
    reference hard-codes C = 4, its 3D script C = 2 (METHODS.md says 2; we follow the 2D code)."""
    if num_classes < 2:
        raise ValueError(f"normalized_entropy: num_classes must be >= 2, got {num_classes}")
    return entropy_map(probs.float()).mean() / math.log(num_classes)
