"""Uncertainty-rectified pyramid consistency (URPC, Luo et al., MICCAI 2021), SSL4MIS's 2D form."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from raysemi.data.sampler import Batch
from raysemi.losses import supervised_loss
from raysemi.methods.base import StepInput, Strategy
from raysemi.methods.registry import register_method


def pyramid_consistency_loss(probs: list[Tensor]) -> Tensor:
    """Mean over outputs s of `mean((P - s)^2 e^{-v_s}) / (mean(e^{-v_s}) + 1e-8) + mean(v_s)`,
    with `P` the mean of the softmax outputs and `v_s = sum_c KL(P || s)` per pixel. `P` is not
    detached, as in the reference. `log(s)` is taken of `s` clamped at 1e-30, so a probability that
    underflows to 0 in float32 gives a large finite term instead of NaN (the reference has none)."""
    mean = torch.stack(probs).mean(dim=0)
    total = 0.0
    for s in probs:
        v = torch.sum(F.kl_div(torch.log(s.clamp_min(1e-30)), mean, reduction="none"), dim=1, keepdim=True)
        ev = torch.exp(-v)
        total = total + torch.mean((mean - s) ** 2 * ev) / (torch.mean(ev) + 1e-8) + torch.mean(v)
    return total / len(probs)


@register_method
class PyramidConsistency(Strategy):
    """Deep supervision on four decoder outputs plus their variance-weighted consistency on the
    unlabeled slices. Supervised loss: the 4 CE and 4 Dice terms over 8."""

    name = "pyramid_consistency"
    aliases = ("dv", "urpc")
    summary = "deep supervision (4 decoder outputs) with uncertainty-rectified pyramid consistency"
    hyperparameters = ("consistency", "consistency_rampup", "base_lr")
    models = ("unet_ds",)

    def __init__(self, student, *, num_classes: int, consistency: float = 0.1, consistency_rampup: float = 200.0,
                 rampup_interval: float = 150) -> None:
        super().__init__(student, num_classes=num_classes, consistency=consistency,
                         consistency_rampup=consistency_rampup, rampup_interval=rampup_interval)

    def losses(self, batch: Batch, inputs: Mapping[str, StepInput]) -> dict[str, Tensor]:
        outputs = self.student(batch.image)
        if not isinstance(outputs, (tuple, list)) or len(outputs) < 2:
            raise ValueError("pyramid_consistency needs a deep-supervision model (unet_ds) with several outputs")
        lb = batch.labeled_bs
        ces, dices = zip(*(supervised_loss(o[:lb], batch.label)[1:] for o in outputs))
        ce, dice = sum(ces) / len(ces), sum(dices) / len(dices)
        sup = (sum(ces) + sum(dices)) / (2 * len(outputs))
        cons = pyramid_consistency_loss([torch.softmax(o[lb:].float(), dim=1) for o in outputs])
        return {"loss_sup": sup, "loss_ce": ce, "loss_dice": dice, "consistency": cons,
                "loss": sup + inputs["consistency_weight"] * cons}
