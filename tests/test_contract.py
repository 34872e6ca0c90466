"""Contract tests over every registered strategy (STYLE.md rule 5).

A strategy is covered by being registered: each test is parametrized over `list_methods()`. One
step on tiny CPU tensors must give a finite loss, a gradient for every student parameter and none
for the teacher; the teacher moves only by the loop's EMA rule; the unlabeled slices must change
the loss (except for the supervised baseline, which must declare it does not use them);
`after_step` leaves the student alone; and three iterations of the real loop run for each.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from raysemi.config import TrainConfig
from raysemi.data import Batch, load_dataset
from raysemi.loop import Callback, Trainer, ema_update
from raysemi.methods import create_method, get_method, list_methods
from raysemi.models import create_model
from raysemi.schedules import ema_alpha
from tests.conftest import tiny_config

METHODS = list_methods()
# the strategies METHODS.md defines with an EMA teacher (others may add one; these must have one)
TEACHER_METHODS = {"mean_teacher", "uncertainty_aware_mean_teacher", "interpolation_consistency"}
ITERATION = 100  # any iteration works: consistency_rampup = 0 makes w = consistency from the start


def test_registry_holds_the_seven_strategies():
    assert set(METHODS) >= {"supervised", "mean_teacher", "uncertainty_aware_mean_teacher",
                            "interpolation_consistency", "entropy_minimization", "pyramid_consistency",
                            "adversarial"}


def build(name: str):
    # uamt: an untrained 4-class net is near-uniform (entropy ~ ln 4), above the default threshold
    # (<= ln 2) everywhere, which masks the whole consistency term; a threshold of 2 ln 2 = ln 4 keeps
    # it live. Strategies that do not take a field ignore it.
    cfg = TrainConfig(method=name, batch_size=4, labeled_bs=2, patch_size=(32, 32), mt_warmup=0,
                      consistency_rampup=0.0, max_iterations=1000, device="cpu", num_classes=4,
                      in_channels=1, uncertainty_threshold_start=2.0, uncertainty_threshold_end=2.0).validate()
    torch.manual_seed(0)
    student = create_model(get_method(name).models[0], in_channels=1, num_classes=4)
    strategy = create_method(name, student, **cfg.to_dict())
    strategy.train()
    return strategy


def make_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(4, 1, 32, 32, generator=g), torch.randint(0, 4, (2, 32, 32), generator=g))


def run_step(strategy, batch, seed=7):
    torch.manual_seed(seed)  # identical noise, dropout and mixing draws for identical seeds
    return strategy.step(batch, ITERATION)


@pytest.mark.parametrize("name", METHODS)
def test_step_gives_finite_loss_and_student_gradients(name):
    strategy = build(name)
    out = run_step(strategy, make_batch())
    assert "loss" in out
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    for key, value in out.items():
        assert torch.isfinite(torch.as_tensor(value)).all(), key
    out["loss"].backward()
    grads = {n: p.grad for n, p in strategy.student.named_parameters()}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"{name}: no gradient for {missing}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    nonzero = [n for n, g in grads.items() if g.abs().sum() > 0]
    # conv biases just before a BatchNorm have (numerically) zero gradient; everything else must move
    assert len(nonzero) >= 0.7 * len(grads), f"{name}: only {len(nonzero)}/{len(grads)} nonzero gradients"
    if strategy.teacher is not None:
        assert all(p.grad is None and not p.requires_grad for p in strategy.teacher.parameters())


@pytest.mark.parametrize("name", [m for m in METHODS if get_method(m).uses_unlabeled])
def test_consistency_term_reaches_the_student(name):
    """A consistency term cut from the graph (e.g. computed on detached outputs) is caught here."""
    strategy = build(name)
    assert strategy.weight(ITERATION) > 0
    out = run_step(strategy, make_batch())
    cons = out["consistency"]
    assert cons.requires_grad, f"{name}: the consistency term has no gradient"
    params = list(strategy.student.parameters())
    grads = torch.autograd.grad(cons, params, allow_unused=True)
    assert sum(int(g is not None and g.abs().sum() > 0) for g in grads) >= len(params) // 2
    if strategy.teacher is not None:
        assert not any(p.requires_grad for p in strategy.teacher.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_unlabeled_slices_change_the_loss(name):
    cls = get_method(name)
    if name == "supervised":
        assert cls.uses_unlabeled is False  # the loop then builds labeled-only batches
        return
    assert cls.uses_unlabeled is True
    strategy = build(name)
    batch = make_batch()
    other = Batch(batch.image.clone(), batch.label.clone())
    other.image[2:] = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(99))
    assert torch.equal(other.image[:2], batch.image[:2])

    a, a_again, b = run_step(strategy, batch), run_step(strategy, batch), run_step(strategy, other)
    assert torch.equal(a["loss"], a_again["loss"]), f"{name}: the step is not reproducible under a fixed seed"
    assert abs(a["loss"].item() - b["loss"].item()) > 1e-6, f"{name}: the loss ignores the unlabeled slices"
    assert abs(a["consistency"].item() - b["consistency"].item()) > 1e-7


@pytest.mark.parametrize("name", METHODS)
def test_teacher_moves_only_by_the_ema_rule(name):
    strategy = build(name)
    teacher = strategy.teacher
    if name in TEACHER_METHODS:
        assert teacher is not None
    if teacher is None:
        assert "teacher" not in strategy.networks()
        return
    student = strategy.student
    # the teacher starts as a copy of the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)
    with torch.no_grad():  # make teacher and student differ so that the mix is visible
        for t in teacher.parameters():
            t.add_(0.01 * torch.randn_like(t))
    t0 = [p.detach().clone() for p in teacher.parameters()]

    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    out = run_step(strategy, make_batch())
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    for p, before in zip(teacher.parameters(), t0):
        assert torch.equal(p, before), "the step or the optimiser changed the teacher"

    s1 = [p.detach().clone() for p in student.parameters()]
    for it in (ITERATION, 3):
        a = min(1.0 - 1.0 / (it + 1), strategy.ema_decay)
        assert ema_alpha(it, strategy.ema_decay) == pytest.approx(a, abs=1e-15)
        before = [p.detach().clone() for p in teacher.parameters()]
        ema_update(teacher, student, ema_alpha(it, strategy.ema_decay))
        for p, t, s in zip(teacher.parameters(), before, s1):
            torch.testing.assert_close(p, a * t + (1 - a) * s, rtol=1e-5, atol=1e-7)
    for p, s in zip(student.parameters(), s1):
        assert torch.equal(p, s), "the EMA update changed the student"


@pytest.mark.parametrize("name", METHODS)
def test_after_step_leaves_the_student_alone(name):
    strategy = build(name)
    batch = make_batch()
    opt = torch.optim.SGD(strategy.student.parameters(), lr=0.01)
    out = run_step(strategy, batch)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    student_state = copy.deepcopy(strategy.student.state_dict())  # parameters and BatchNorm buffers
    others = {n: copy.deepcopy(m.state_dict()) for n, m in strategy.networks().items() if n != "student"}

    extra = strategy.after_step(batch, strategy.step_inputs(ITERATION))

    for k, v in strategy.student.state_dict().items():
        assert torch.equal(v, student_state[k]), f"{name}: after_step changed student {k}"
    assert strategy.student.training, f"{name}: after_step left the student in eval mode"
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in extra.values())
    if name == "adversarial":
        assert "loss_discriminator" in extra
        d_before = others["discriminator"]
        changed = [k for k, v in strategy.discriminator.state_dict().items() if not torch.equal(v, d_before[k])]
        assert changed, "after_step did not train the discriminator"
        assert set(changed) == {n for n, _ in strategy.discriminator.named_parameters()}


# -- the real loop ---------------------------------------------------------------------------------
class _Recorder(Callback):
    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []

    def on_log(self, trainer, iteration, metrics):
        self.logs.append(dict(metrics, iteration=iteration))

    def on_eval(self, trainer, iteration, metrics, is_best):
        self.evals.append(dict(metrics))


@pytest.fixture(scope="module")
def phantom_data(tiny_phantom):
    cfg = tiny_config(tiny_phantom)
    return load_dataset(cfg.data, cfg.labeled_patients, cfg.num_classes)


@pytest.mark.parametrize("name", METHODS)
def test_trainer_fit_three_iterations(name, tiny_phantom, phantom_data):
    cfg = tiny_config(tiny_phantom, method=name, max_iterations=3, eval_interval=3, mt_warmup=0)
    rec = _Recorder()
    trainer = Trainer(cfg, phantom_data, [rec])
    student0 = [p.detach().clone() for p in trainer.strategy.student.parameters()]
    result = trainer.fit()

    assert result.iterations == 3 == trainer.iteration
    assert [log["iteration"] for log in rec.logs] == [1, 2, 3]
    for log in rec.logs:
        assert math.isfinite(log["train/loss"]) and math.isfinite(log["train/loss_sup"])
        if get_method(name).uses_unlabeled:
            assert math.isfinite(log["train/consistency"])
    assert len(rec.evals) == 1 and math.isfinite(rec.evals[0]["val/dice"])
    assert math.isfinite(result.best_dice)
    moved = any(not torch.equal(p, q) for p, q in zip(trainer.strategy.student.parameters(), student0))
    assert moved, "three optimiser steps left the student unchanged"

    networks = trainer.checkpoint_payload(full=False)["networks"]
    assert "student" in networks
    if name in TEACHER_METHODS:
        assert trainer.strategy.teacher is not None
    assert ("teacher" in networks) == (trainer.strategy.teacher is not None)
    if trainer.strategy.teacher is not None:
        assert set(networks["teacher"]) == set(networks["student"])
        # three EMA updates from a copy: the teacher has moved, but is not the student
        t = dict(trainer.strategy.teacher.named_parameters())
        s = dict(trainer.strategy.student.named_parameters())
        assert any(not torch.equal(t[k], s[k]) for k in t)
