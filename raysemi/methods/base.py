"""The shared base of every strategy: networks, the supervised loss, the consistency ramp.

A strategy is an `nn.Module` holding the networks it needs (`student`, and where it has them a
`teacher` updated by the loop's EMA hook, a `discriminator` with its own optimiser). The loop
calls `step(batch, iteration)`, back-propagates `out["loss"]` into the student's SGD optimiser,
then (in this order) updates the teacher by EMA and calls `after_step` (the adversarial
discriminator's own update). Strategies know nothing of Ray, MLflow, checkpoints or evaluation.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import Tensor, nn

from raysemi.data.sampler import Batch
from raysemi.losses import supervised_loss
from raysemi.schedules import consistency_weight


class Strategy(nn.Module):
    """Base class. Subclasses set the class attributes and implement `step`."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    #: config fields this strategy reads (shown by --list-methods, searched by default)
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    #: model names it can train; the first is the default
    models: ClassVar[tuple[str, ...]] = ("unet",)
    #: False for the supervised baseline: batches then hold labeled slices only
    uses_unlabeled: ClassVar[bool] = True

    def __init__(self, student: nn.Module, *, num_classes: int, consistency: float = 0.1,
                 consistency_rampup: float = 200.0, rampup_interval: int = 150) -> None:
        super().__init__()
        if consistency < 0 or consistency_rampup < 0 or rampup_interval < 1:
            raise ValueError(f"{self.name}: consistency and consistency_rampup must be >= 0 and "
                             f"rampup_interval >= 1 (got {consistency}, {consistency_rampup}, {rampup_interval})")
        self.student = student
        self.teacher: nn.Module | None = None
        self.ema_decay = 0.0
        self.num_classes = num_classes
        self.consistency = consistency
        self.consistency_rampup = consistency_rampup
        self.rampup_interval = rampup_interval

    # -- helpers for subclasses -------------------------------------------------------------
    def _make_teacher(self, ema_decay: float) -> None:
        """An EMA copy of the student; no gradients, updated only by the loop's EMA hook.

        It stays in train mode like the reference's teacher (dropout on, BatchNorm on batch
        statistics and its own running statistics); its parameters start as the student's.
        """
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"{self.name}: ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def weight(self, iteration: int) -> float:
        """The ramped consistency weight w(iteration)."""
        return consistency_weight(iteration, self.consistency, self.consistency_rampup, self.rampup_interval)

    @staticmethod
    def supervised(logits: Tensor, batch: Batch) -> dict[str, Tensor]:
        """`0.5 * (CE + Dice)` on the labeled part of a batch."""
        loss, ce, dice = supervised_loss(logits[: batch.labeled_bs], batch.label)
        return {"loss_sup": loss, "loss_ce": ce, "loss_dice": dice}

    # -- the interface the loop calls -------------------------------------------------------
    def step(self, batch: Batch, iteration: int) -> dict[str, Tensor]:
        """Losses for one batch; must hold `"loss"`, the student's objective."""
        raise NotImplementedError

    def after_step(self, batch: Batch, iteration: int) -> dict[str, Tensor]:
        """Hook after the student's optimiser step and the EMA update (default: nothing)."""
        return {}

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers the strategy owns (checkpointed by the loop)."""
        return {}

    def networks(self) -> dict[str, nn.Module]:
        """Named networks, for checkpoints and evaluation."""
        return {name: m for name, m in self.named_children()}
