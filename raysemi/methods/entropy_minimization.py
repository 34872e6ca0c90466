"""Entropy minimisation (Vu et al., CVPR 2019 / Grandvalet & Bengio), as in SSL4MIS's 2D script."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from raysemi.data.sampler import Batch
from raysemi.losses import normalized_entropy
from raysemi.methods.base import StepInput, Strategy
from raysemi.methods.registry import register_method


@register_method
class EntropyMinimization(Strategy):
    """`consistency = mean(-sum_c p_c log(p_c + 1e-6) / ln C)` over the whole batch (labeled and
    unlabeled); C is `entropy_classes` (the 2D reference hard-codes 4; its 3D script uses 2)."""

    name = "entropy_minimization"
    aliases = ("em",)
    summary = "pushes predictions on all slices towards low entropy"
    hyperparameters = ("consistency", "consistency_rampup", "base_lr")

    def __init__(self, student, *, num_classes: int, consistency: float = 0.1, consistency_rampup: float = 200.0,
                 rampup_interval: float = 150, entropy_classes: int = 4) -> None:
        super().__init__(student, num_classes=num_classes, consistency=consistency,
                         consistency_rampup=consistency_rampup, rampup_interval=rampup_interval)
        if entropy_classes < 2:
            raise ValueError(f"entropy_minimization: entropy_classes must be >= 2, got {entropy_classes}")
        self.entropy_classes = entropy_classes

    def losses(self, batch: Batch, inputs: Mapping[str, StepInput]) -> dict[str, Tensor]:
        logits = self.student(batch.image)
        out = self.supervised(logits, batch)
        cons = normalized_entropy(torch.softmax(logits.float(), dim=1), self.entropy_classes)
        out.update(consistency=cons, loss=out["loss_sup"] + inputs["consistency_weight"] * cons)
        return out
