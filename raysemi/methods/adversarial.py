"""Deep adversarial network (DAN, Zhang et al., MICCAI 2017), as in SSL4MIS's 2D script."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from raysemi.data.sampler import Batch
from raysemi.methods.base import StepInput, Strategy
from raysemi.methods.registry import register_method
from raysemi.models import Discriminator


@register_method
class Adversarial(Strategy):
    """Student step: supervised + w * CE(D(softmax(f(x_u)), x_u), 'labeled-like'), D in eval
    mode. Discriminator step (`after_step`, student in eval mode, no grad through it):
    CE(D(softmax(f(x)), x), [1] * labeled + [0] * unlabeled), Adam(dan_lr, betas 0.9/0.99)."""

    name = "adversarial"
    aliases = ("dan",)
    summary = "a discriminator tells labeled from unlabeled predictions; the student learns to fool it"
    hyperparameters = ("consistency", "consistency_rampup", "dan_lr", "base_lr")

    def __init__(self, student, *, num_classes: int, in_channels: int = 1, consistency: float = 0.1,
                 consistency_rampup: float = 200.0, rampup_interval: float = 150, dan_lr: float = 1e-4) -> None:
        super().__init__(student, num_classes=num_classes, consistency=consistency,
                         consistency_rampup=consistency_rampup, rampup_interval=rampup_interval)
        if not dan_lr > 0:
            raise ValueError(f"adversarial: dan_lr must be > 0, got {dan_lr}")
        self.discriminator = Discriminator(num_classes, in_channels)
        self.dan_lr = dan_lr
        self._optimizer: torch.optim.Optimizer | None = None

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizer is None:  # built lazily, after the module has moved to its device
            self._optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.dan_lr, betas=(0.9, 0.99))
        return {"discriminator": self._optimizer}

    def losses(self, batch: Batch, inputs: Mapping[str, StepInput]) -> dict[str, Tensor]:
        self.student.train()
        self.discriminator.eval()
        self.discriminator.requires_grad_(False)  # its gradient here would be discarded: skip the work
        lb = batch.labeled_bs
        logits = self.student(batch.image)
        out = self.supervised(logits, batch)
        probs_u = torch.softmax(logits[lb:].float(), dim=1)
        d_out = self.discriminator(probs_u, batch.image[lb:].float())
        fool = torch.ones(d_out.shape[0], dtype=torch.long, device=d_out.device)
        cons = F.cross_entropy(d_out.float(), fool)
        out.update(consistency=cons, loss=out["loss_sup"] + inputs["consistency_weight"] * cons)
        return out

    def after_step(self, batch: Batch, inputs: Mapping[str, StepInput]) -> dict[str, Tensor]:
        optimizer = self.extra_optimizers()["discriminator"]
        self.student.eval()
        self.discriminator.train()
        self.discriminator.requires_grad_(True)
        with torch.no_grad():
            probs = torch.softmax(self.student(batch.image).float(), dim=1)
        d_out = self.discriminator(probs, batch.image.float())
        target = torch.zeros(d_out.shape[0], dtype=torch.long, device=d_out.device)
        target[: batch.labeled_bs] = 1
        loss = F.cross_entropy(d_out.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.student.train()
        return {"loss_discriminator": loss.detach()}
