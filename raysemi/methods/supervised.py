"""The supervised baseline: labeled slices only."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from raysemi.data.sampler import Batch
from raysemi.methods.base import StepInput, Strategy
from raysemi.methods.registry import register_method


@register_method
class Supervised(Strategy):
    """`loss = 0.5 * (CE + Dice)` on batches of labeled slices (the reference's fully supervised
    script draws whole batches from the labeled subset)."""

    name = "supervised"
    aliases = ("baseline",)
    summary = "baseline: labeled slices only, 0.5 * (CE + Dice)"
    hyperparameters = ("base_lr",)
    uses_unlabeled = False

    def __init__(self, student, *, num_classes: int) -> None:
        super().__init__(student, num_classes=num_classes)

    def step_inputs(self, iteration: int) -> dict[str, StepInput]:
        return {}

    def losses(self, batch: Batch, inputs: Mapping[str, StepInput]) -> dict[str, Tensor]:
        out = self.supervised(self.student(batch.image), batch)
        out["loss"] = out["loss_sup"]
        return out
