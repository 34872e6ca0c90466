"""Uncertainty-aware mean teacher (Yu et al., MICCAI 2019), as in SSL4MIS's 2D UA-MT script."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from raysemi.data.sampler import Batch
from raysemi.losses import entropy_map
from raysemi.methods.base import StepInput, Strategy
from raysemi.methods.mean_teacher import teacher_noise
from raysemi.methods.registry import register_method
from raysemi.schedules import uncertainty_threshold


@register_method
class UncertaintyAwareMeanTeacher(Strategy):
    """Mean teacher whose consistency counts only pixels where the teacher is confident.

    Uncertainty `u = -sum_c p_c log(p_c + 1e-6)` of the mean softmax over T noisy teacher passes
    (run, as the reference does, two noisy copies of the unlabeled batch per forward; with
    `uncertainty_copies` up to T per forward: fewer, larger forwards, which keep a GPU busier;
    the teacher's BatchNorm then takes its batch statistics over more noisy copies of the same
    slices, the same in expectation, and updates its running statistics, which only an
    `eval_model: teacher` validation reads, fewer times per step; `uncertainty_with_target` runs
    the consistency target's own noisy pass in the first of those forwards, one forward fewer,
    with the same caveat);
    `mask = u < th(iter)` with `th = (start + (end - start) * sigmoid_rampup(iter, max_iter)) * ln 2`;
    `consistency = sum(mask * (p_student - p_teacher)^2) / (2 * sum(mask) + 1e-16)`.
    """

    name = "uncertainty_aware_mean_teacher"
    aliases = ("uamt", "ua_mt")
    summary = "mean teacher with the consistency masked by the teacher's uncertainty (T noisy passes)"
    hyperparameters = ("consistency", "consistency_rampup", "ema_decay", "base_lr",
                       "uncertainty_threshold_start", "uncertainty_threshold_end", "uncertainty_passes",
                       "uncertainty_copies", "uncertainty_with_target")

    def __init__(self, student, *, num_classes: int, max_iterations: int, consistency: float = 0.1,
                 consistency_rampup: float = 200.0, rampup_interval: int = 150, ema_decay: float = 0.99,
                 uncertainty_threshold_start: float = 0.75, uncertainty_threshold_end: float = 1.0,
                 uncertainty_passes: int = 8, uncertainty_copies: int = 2,
                 uncertainty_with_target: bool = False) -> None:
        super().__init__(student, num_classes=num_classes, consistency=consistency,
                         consistency_rampup=consistency_rampup, rampup_interval=rampup_interval)
        if uncertainty_passes < 1:
            raise ValueError(f"uncertainty_aware_mean_teacher: uncertainty_passes (T) must be >= 1, got {uncertainty_passes}")
        self.max_iterations = max_iterations
        self.th_start, self.th_end = uncertainty_threshold_start, uncertainty_threshold_end
        if uncertainty_copies < 1:
            raise ValueError(f"uncertainty_aware_mean_teacher: uncertainty_copies must be >= 1, got {uncertainty_copies}")
        self.passes = uncertainty_passes
        self.copies = uncertainty_copies
        self.with_target = bool(uncertainty_with_target)
        self._make_teacher(ema_decay)

    @torch.no_grad()
    def uncertainty(self, x_u: Tensor) -> Tensor:
        """(B_u, 1, H, W) entropy of the mean softmax over `passes` noisy teacher forwards."""
        return self._teacher_passes(x_u, with_target=False)[1]

    @torch.no_grad()
    def teacher_outputs(self, x_u: Tensor) -> tuple[Tensor, Tensor]:
        """The consistency target (softmax of one noisy teacher pass, drawn first, as in the
        reference) and the uncertainty map; with `with_target` both come from shared forwards."""
        if self.with_target:
            return self._teacher_passes(x_u, with_target=True)
        target = torch.softmax(self.teacher(x_u + teacher_noise(x_u)).float(), dim=1)
        return target, self.uncertainty(x_u)

    def _teacher_passes(self, x_u: Tensor, with_target: bool) -> tuple[Tensor | None, Tensor]:
        """Noisy teacher forwards of `copies` copies of `x_u` each (one more in the first when
        `with_target`: the target's copy, first so that its noise is drawn first)."""
        target, total, done = None, 0.0, 0
        while done < self.passes:
            copies = min(self.copies, self.passes - done)
            extra = 1 if with_target and target is None else 0
            xr = x_u.repeat(copies + extra, 1, 1, 1)
            p = torch.softmax(self.teacher(xr + teacher_noise(xr)).float(), dim=1)
            p = p.view(copies + extra, *x_u.shape[:1], *p.shape[1:])
            if extra:
                target, p = p[0], p[1:]
            total = total + p.sum(dim=0)
            done += copies
        return target, entropy_map(total / self.passes).unsqueeze(1)

    def step_inputs(self, iteration: int) -> dict[str, StepInput]:
        return {"consistency_weight": self.weight(iteration),
                "uncertainty_threshold": uncertainty_threshold(iteration, self.max_iterations, self.th_start, self.th_end)}

    def losses(self, batch: Batch, inputs: Mapping[str, StepInput]) -> dict[str, Tensor]:
        x_u = batch.unlabeled
        logits = self.student(batch.image)
        target, u = self.teacher_outputs(x_u)
        out = self.supervised(logits, batch)
        dist = (torch.softmax(logits[batch.labeled_bs:].float(), dim=1) - target) ** 2
        mask = (u < inputs["uncertainty_threshold"]).float()
        cons = torch.sum(mask * dist) / (2 * torch.sum(mask) + 1e-16)
        out.update(consistency=cons, loss=out["loss_sup"] + inputs["consistency_weight"] * cons,
                   certain_fraction=mask.mean())
        return out
