"""Uncertainty-aware mean teacher (Yu et al., MICCAI 2019), as in SSL4MIS's 2D UA-MT script."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from raysemi.data.sampler import Batch
from raysemi.losses import entropy_map
from raysemi.methods.base import StepInput, Strategy
from raysemi.methods.mean_teacher import teacher_noise
from raysemi.methods.registry import register_method
from raysemi.models.batch_norm_groups import batch_norm_groups, uses_groupable_batch_norm
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
    with the same caveat; `uncertainty_grouped_forward` runs all of a step's teacher forwards as
    one batch with BatchNorm statistics per forward: the same computation, in larger kernels, its
    random draws in another order);
    `mask = u < th(iter)` with `th = (start + (end - start) * sigmoid_rampup(iter, max_iter)) * ln 2`;
    `consistency = sum(mask * (p_student - p_teacher)^2) / (2 * sum(mask) + 1e-16)`.
    """

    name = "uncertainty_aware_mean_teacher"
    aliases = ("uamt", "ua_mt")
    summary = "mean teacher with the consistency masked by the teacher's uncertainty (T noisy passes)"
    hyperparameters = ("consistency", "consistency_rampup", "ema_decay", "base_lr",
                       "uncertainty_threshold_start", "uncertainty_threshold_end", "uncertainty_passes",
                       "uncertainty_copies", "uncertainty_with_target", "uncertainty_grouped_forward")

    def __init__(self, student, *, num_classes: int, max_iterations: int, consistency: float = 0.1,
                 consistency_rampup: float = 200.0, rampup_interval: float = 150, ema_decay: float = 0.99,
                 uncertainty_threshold_start: float = 0.75, uncertainty_threshold_end: float = 1.0,
                 uncertainty_passes: int = 8, uncertainty_copies: int = 2,
                 uncertainty_with_target: bool = False, uncertainty_grouped_forward: bool = False) -> None:
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
        self.grouped = bool(uncertainty_grouped_forward)
        if self.grouped and not uses_groupable_batch_norm(student):
            raise ValueError(f"uncertainty_aware_mean_teacher: uncertainty_grouped_forward needs a network whose "
                             f"BatchNorm layers can take per-group statistics; {type(student).__name__} has others")
        self._make_teacher(ema_decay)

    @torch.no_grad()
    def uncertainty(self, x_u: Tensor) -> Tensor:
        """(B_u, 1, H, W) entropy of the mean softmax over `passes` noisy teacher forwards."""
        return self._teacher_passes(x_u, target=False)[1]

    @torch.no_grad()
    def teacher_outputs(self, x_u: Tensor) -> tuple[Tensor, Tensor]:
        """The consistency target (softmax of one noisy teacher pass, drawn first, as in the
        reference) and the uncertainty map."""
        target, u = self._teacher_passes(x_u, target=True)
        assert target is not None
        return target, u

    def forward_copies(self, target: bool) -> list[int]:
        """Noisy copies of the unlabeled batch per teacher forward: `copies` at a time up to T,
        and the target's pass first, in a forward of its own (the reference) or, with
        `with_target`, as the first copy of the first."""
        sizes, done = [], 0
        while done < self.passes:
            sizes.append(min(self.copies, self.passes - done))
            done += sizes[-1]
        if target and self.with_target:
            sizes[0] += 1
        elif target:
            sizes.insert(0, 1)
        return sizes

    def _teacher_softmax(self, x_u: Tensor, copies: list[int]) -> Iterator[Tensor]:
        """Softmax of the teacher on noisy copies of `x_u`, (copies, B_u, C, H, W) per forward;
        with `grouped` one forward of them all, its BatchNorm statistics per forward."""
        noisy = []
        for n in copies:
            xr = x_u.repeat(n, 1, 1, 1)
            xr = xr + teacher_noise(xr)
            if not self.grouped:  # each noise draw, then its forward's dropout draws, as the reference
                yield torch.softmax(self.teacher(xr).float(), dim=1).view(n, *x_u.shape[:1], -1, *x_u.shape[2:])
            else:
                noisy.append(xr)
        if self.grouped:
            with batch_norm_groups(self.teacher, [n * x_u.shape[0] for n in copies]):
                logits = self.teacher(torch.cat(noisy))
            yield torch.softmax(logits.float(), dim=1).view(sum(copies), *x_u.shape[:1], -1, *x_u.shape[2:])

    def _teacher_passes(self, x_u: Tensor, target: bool) -> tuple[Tensor | None, Tensor]:
        """The target (the first noisy copy, when `target`) and the uncertainty map of the others."""
        first, total = None, 0.0
        for p in self._teacher_softmax(x_u, self.forward_copies(target)):
            if target and first is None:
                first, p = p[0], p[1:]
            total = total + p.sum(dim=0)
        return first, entropy_map(total / self.passes).unsqueeze(1)

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
