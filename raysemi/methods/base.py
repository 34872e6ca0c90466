"""The shared base of every strategy: networks, the supervised loss, the consistency ramp.

A strategy is an `nn.Module` holding the networks it needs (`student`, and where it has them a
`teacher` updated by the loop's EMA hook, a `discriminator` with its own optimiser). Each
iteration the loop asks `step_inputs(iteration)` for what changes from one iteration to the next
(schedule values such as the consistency weight, host-drawn random numbers such as ICT's mixing
factors), hands them on the device to `losses(batch, inputs)`, back-propagates `out["loss"]` into
the student's SGD optimiser, then (in this order) updates the teacher by EMA and calls
`after_step` (the adversarial discriminator's own update).

`losses` and `after_step` must be a fixed sequence of device work: no Python branch on the
iteration or on a tensor's value, no `.item()`. That is what lets the loop capture a whole
iteration once as a CUDA graph and replay it (`raysemi/cuda_graph.py`), with the inputs arriving
through fixed buffers. Strategies know nothing of Ray, MLflow, checkpoints or evaluation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import ClassVar, Union

import torch
from torch import Tensor, nn

from raysemi.data.sampler import Batch
from raysemi.losses import supervised_loss
from raysemi.schedules import consistency_weight


#: a per-iteration input: a Python number (a schedule value) or a small tensor drawn on the host
StepInput = Union[float, Tensor]


class Strategy(nn.Module):
    """Base class. Subclasses set the class attributes and implement `losses` (and, when their
    inputs change with the iteration, `step_inputs`)."""

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
                 consistency_rampup: float = 200.0, rampup_interval: float = 150) -> None:
        super().__init__()
        if consistency < 0 or consistency_rampup < 0 or not rampup_interval > 0:
            raise ValueError(f"{self.name}: consistency and consistency_rampup must be >= 0 and "
                             f"rampup_interval > 0 (got {consistency}, {consistency_rampup}, {rampup_interval})")
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
    def step_inputs(self, iteration: int) -> dict[str, StepInput]:
        """What `losses` needs that changes with the iteration, computed on the host. Numbers are
        logged as `train/<name>`; tensors (random draws) are not. Default: the consistency weight."""
        return {"consistency_weight": self.weight(iteration)}

    def losses(self, batch: Batch, inputs: Mapping[str, StepInput]) -> dict[str, Tensor]:
        """Losses for one batch; must hold `"loss"`, the student's objective. `inputs` holds what
        `step_inputs` gave, as numbers or as device tensors: use them only in arithmetic."""
        raise NotImplementedError

    def after_step(self, batch: Batch, inputs: Mapping[str, StepInput]) -> dict[str, Tensor]:
        """Hook after the student's optimiser step and the EMA update (default: nothing)."""
        return {}

    def step(self, batch: Batch, iteration: int) -> dict[str, Tensor]:
        """`losses` at `iteration`, with the numeric inputs added to the result (for tests and
        benchmarks that drive a strategy by hand; the loop calls `step_inputs` and `losses`)."""
        device = batch.image.device
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.step_inputs(iteration).items()}
        out = self.losses(batch, inputs)
        out.update({k: torch.tensor(float(v)) for k, v in inputs.items() if not isinstance(v, Tensor)})
        return out

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers the strategy owns (checkpointed by the loop)."""
        return {}

    def networks(self) -> dict[str, nn.Module]:
        """Named networks, for checkpoints and evaluation."""
        return {name: m for name, m in self.named_children()}
