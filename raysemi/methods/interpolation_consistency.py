"""Interpolation consistency training (Verma et al., IJCAI 2019), as in SSL4MIS's 2D ICT script."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from raysemi.data.sampler import Batch
from raysemi.methods.base import StepInput, Strategy
from raysemi.methods.registry import register_method


@register_method
class InterpolationConsistency(Strategy):
    """The student on mixed unlabeled slices matches the mix of the teacher's predictions.

    Unlabeled half split into `u0`, `u1` (sized by the unlabeled count: the reference's
    `labeled_bs // 2` only works when both halves of the batch are equal); per sample
    `lam ~ Beta(alpha, alpha)`; student input = labeled + `u0 (1 - lam) + u1 lam`; target =
    `softmax(f_ema(u0)) (1 - lam) + softmax(f_ema(u1)) lam`; consistency = MSE of the softmaxes.
    """

    name = "interpolation_consistency"
    aliases = ("ict",)
    summary = "student on mixed unlabeled slices matches the mixed EMA-teacher predictions"
    hyperparameters = ("ict_alpha", "consistency", "consistency_rampup", "ema_decay", "base_lr")

    def __init__(self, student, *, num_classes: int, consistency: float = 0.1, consistency_rampup: float = 200.0,
                 rampup_interval: float = 150, ema_decay: float = 0.99, ict_alpha: float = 0.2,
                 batch_size: int = 24, labeled_bs: int = 12) -> None:
        super().__init__(student, num_classes=num_classes, consistency=consistency,
                         consistency_rampup=consistency_rampup, rampup_interval=rampup_interval)
        if not ict_alpha > 0:
            raise ValueError(f"interpolation_consistency: ict_alpha must be > 0, got {ict_alpha}")
        if (batch_size - labeled_bs) % 2 or batch_size - labeled_bs < 2:
            raise ValueError(f"interpolation_consistency: the unlabeled slices per batch "
                             f"(batch_size - labeled_bs = {batch_size - labeled_bs}) must be even and >= 2, "
                             "to split them into two halves to mix")
        self.beta = torch.distributions.Beta(torch.tensor(float(ict_alpha)), torch.tensor(float(ict_alpha)))
        self.half = (batch_size - labeled_bs) // 2
        self._make_teacher(ema_decay)

    def step_inputs(self, iteration: int) -> dict[str, StepInput]:
        """The weight and the per-sample mixing factors `lam` (drawn on the host, as the reference)."""
        return {"consistency_weight": self.weight(iteration), "lam": self.beta.sample((self.half, 1, 1, 1))}

    def losses(self, batch: Batch, inputs: Mapping[str, StepInput]) -> dict[str, Tensor]:
        x_u = batch.unlabeled
        half = x_u.shape[0] // 2
        if half != self.half:
            raise ValueError(f"interpolation_consistency: built for {2 * self.half} unlabeled slices per batch, "
                             f"got {x_u.shape[0]}")
        u0, u1 = x_u[:half], x_u[half: 2 * half]
        lam = inputs["lam"]
        mixed = u0 * (1 - lam) + u1 * lam
        logits = self.student(torch.cat([batch.image[: batch.labeled_bs], mixed]))
        with torch.no_grad():
            p0 = torch.softmax(self.teacher(u0).float(), dim=1)
            p1 = torch.softmax(self.teacher(u1).float(), dim=1)
            target = p0 * (1 - lam) + p1 * lam
        out = self.supervised(logits, batch)
        cons = torch.mean((torch.softmax(logits[batch.labeled_bs:].float(), dim=1) - target) ** 2)
        out.update(consistency=cons, loss=out["loss_sup"] + inputs["consistency_weight"] * cons)
        return out
