"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017), as in SSL4MIS `train_mean_teacher_2D.py`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from raysemi.data.sampler import Batch
from raysemi.methods.base import StepInput, Strategy
from raysemi.methods.registry import register_method


def teacher_noise(x: Tensor, std: float = 0.1, clip: float = 0.2) -> Tensor:
    """`clamp(randn * std, -clip, clip)`: the input noise of the reference's teacher."""
    return torch.clamp(torch.randn_like(x) * std, -clip, clip)


@register_method
class MeanTeacher(Strategy):
    """`consistency = mean((softmax(f(x_u)) - softmax(f_ema(x_u + n)))^2)`; loss = supervised +
    w * consistency, with w = 0 for the first `warmup` iterations (the reference's
    `if iter_num < 1000: consistency_loss = 0`: the same loss; the term is still computed and logged).
    """

    name = "mean_teacher"
    aliases = ("mt",)
    summary = "student matches an EMA teacher on noisy unlabeled slices (MSE of softmax)"
    hyperparameters = ("consistency", "consistency_rampup", "ema_decay", "base_lr", "mt_warmup")

    def __init__(self, student, *, num_classes: int, consistency: float = 0.1, consistency_rampup: float = 200.0,
                 rampup_interval: float = 150, ema_decay: float = 0.99, mt_warmup: int = 1000) -> None:
        super().__init__(student, num_classes=num_classes, consistency=consistency,
                         consistency_rampup=consistency_rampup, rampup_interval=rampup_interval)
        if mt_warmup < 0:
            raise ValueError(f"mean_teacher: mt_warmup must be >= 0, got {mt_warmup}")
        self.warmup = mt_warmup
        self._make_teacher(ema_decay)

    def step_inputs(self, iteration: int) -> dict[str, StepInput]:
        return {"consistency_weight": self.weight(iteration) if iteration >= self.warmup else 0.0}

    def losses(self, batch: Batch, inputs: Mapping[str, StepInput]) -> dict[str, Tensor]:
        x_u = batch.unlabeled
        logits = self.student(batch.image)
        with torch.no_grad():
            target = torch.softmax(self.teacher(x_u + teacher_noise(x_u)).float(), dim=1)
        out = self.supervised(logits, batch)
        probs_u = torch.softmax(logits[batch.labeled_bs:].float(), dim=1)
        cons = torch.mean((probs_u - target) ** 2)
        out.update(consistency=cons, loss=out["loss_sup"] + inputs["consistency_weight"] * cons)
        return out
