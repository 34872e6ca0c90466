"""Each strategy's consistency term, recomputed here from the METHODS.md formula.

The student is a fixed per-pixel affine map (a 1x1 conv, no BatchNorm, no dropout), so its logits
are known in closed form: `logits[:, c] = w_c * x + b_c`. Teacher networks get other fixed weights.
Randomness (teacher input noise, ICT's Beta draws, the discriminator's dropout) is reproduced by
re-seeding torch and drawing the same tensors in the same order. The references below use plain
torch arithmetic in float64 and never call the helpers under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from raysemi.data.sampler import Batch
from raysemi.losses import dice_loss
from raysemi.loop import ema_update
from raysemi.methods import create_method
from raysemi.methods.pyramid_consistency import pyramid_consistency_loss
from raysemi import schedules

SEED = 1234
C = 4
W_S, B_S = (1.0, -0.5, 0.3, 0.0), (0.1, 0.0, -0.2, 0.05)  # student
W_T, B_T = (2.0, -1.5, 0.5, -0.3), (0.0, 0.2, -0.1, 0.3)  # teacher
# the four heads of the fake deep-supervision student
W_DS = ((1.0, -0.5, 0.3, 0.0), (0.8, -0.2, 0.1, 0.4), (1.5, -1.0, 0.0, 0.2), (0.2, 0.3, -0.6, 0.1))
B_DS = ((0.1, 0.0, -0.2, 0.05), (0.0, 0.1, 0.0, -0.1), (-0.3, 0.2, 0.1, 0.0), (0.05, -0.05, 0.2, 0.1))
CONSISTENCY, RAMPUP = 0.3, 40.0


# -- tiny deterministic networks ----------------------------------------------------------------
class PixelAffine(nn.Module):
    """logits[:, c] = w_c * x + b_c (a 1x1 conv)."""

    def __init__(self, w=W_S, b=B_S) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, len(w), 1)
        set_affine(self, w, b)

    def forward(self, x):
        return self.conv(x)


class PyramidAffine(nn.Module):
    """A fake deep-supervision student: four per-pixel affine heads, returned as a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([PixelAffine(w, b) for w, b in zip(W_DS, B_DS)])

    def forward(self, x):
        return tuple(h(x) for h in self.heads)


@torch.no_grad()
def set_affine(net: nn.Module, w, b) -> None:
    conv = net.conv
    conv.weight.copy_(torch.tensor(w).view(-1, 1, 1, 1))
    conv.bias.copy_(torch.tensor(b))


# -- independent references (float64, plain arithmetic) -------------------------------------------
def affine(x, w, b):
    x = x.double()
    return x * torch.tensor(w, dtype=torch.float64).view(1, -1, 1, 1) + torch.tensor(b, dtype=torch.float64).view(1, -1, 1, 1)


def softmax(logits):
    e = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    return e / e.sum(dim=1, keepdim=True)


def onehot(label, n):
    return torch.stack([(label == c).double() for c in range(n)], dim=1)


def ref_ce(logits, label):
    logp = torch.log(softmax(logits))
    return -(onehot(label, logits.shape[1]) * logp).sum(dim=1).mean()


def ref_dice(probs, label):
    y = onehot(label, probs.shape[1])
    terms = []
    for c in range(probs.shape[1]):
        p, t = probs[:, c], y[:, c]
        terms.append(1 - (2 * (p * t).sum() + 1e-5) / ((p * p).sum() + (t * t).sum() + 1e-5))
    return sum(terms) / len(terms)


def ref_sup(logits, label):
    return 0.5 * (ref_ce(logits, label) + ref_dice(softmax(logits), label))


def ref_noise(x):
    """The teacher noise, drawn in the order the strategy draws it. (Keep the fixtures' tensor sizes
    off multiples of 16: torch's CPU randn fills blocks of 16, so there one draw of 2n values equals two
    draws of n, and the UA-MT chunking would go untested.)"""
    return torch.clamp(torch.randn_like(x) * 0.1, -0.2, 0.2)


def ref_weight(iteration, consistency=CONSISTENCY, rampup=RAMPUP, interval=150):
    units = iteration // interval
    t = min(units, rampup) / rampup if rampup else 1.0
    return consistency * math.exp(-5.0 * (1.0 - t) ** 2)


def ref_entropy(p, eps=1e-6):
    return -(p * torch.log(p + eps)).sum(dim=1)


def ref_pyramid(probs):
    probs = [p.double() for p in probs]
    mean = sum(probs) / len(probs)
    terms = []
    for s in probs:
        v = (mean * (torch.log(mean) - torch.log(s))).sum(dim=1, keepdim=True)  # KL(P || s) per pixel
        ev = torch.exp(-v)
        terms.append(((mean - s) ** 2 * ev).mean() / (ev.mean() + 1e-8) + v.mean())
    return sum(terms) / len(terms)


# -- per-strategy references: (strategy, batch, iteration, **case kwargs) -> (loss_sup, consistency)
def ref_supervised(strategy, batch, it):
    return ref_sup(affine(batch.image, W_S, B_S)[: batch.labeled_bs], batch.label), None


def ref_mean_teacher(strategy, batch, it, mt_warmup):
    lb = batch.labeled_bs
    x_u = batch.image[lb:]
    logits = affine(batch.image, W_S, B_S)
    target = softmax(affine(x_u + ref_noise(x_u), W_T, B_T))
    cons = torch.mean((softmax(logits[lb:]) - target) ** 2)
    # before the warm-up the reference sets the term to 0: the same loss as a weight of 0 (the
    # test below checks that weight), while the term itself is still computed and logged here
    return ref_sup(logits[:lb], batch.label), cons


def ref_uamt(strategy, batch, it, max_iterations, uncertainty_passes, start=0.75, end=1.0, copies=2):
    lb = batch.labeled_bs
    x_u = batch.image[lb:]
    bu = x_u.shape[0]
    logits = affine(batch.image, W_S, B_S)
    target = softmax(affine(x_u + ref_noise(x_u), W_T, B_T))
    # T noisy teacher passes, `copies` (the reference: two) of the unlabeled batch per forward, one noise draw each
    total, done = torch.zeros(bu, C, *x_u.shape[2:], dtype=torch.float64), 0
    while done < uncertainty_passes:
        k = min(copies, uncertainty_passes - done)
        xr = torch.cat([x_u] * k)
        p = softmax(affine(xr + ref_noise(xr), W_T, B_T))
        for j in range(k):
            total = total + p[j * bu:(j + 1) * bu]
        done += k
    mean = total / uncertainty_passes
    u = -(mean * torch.log(mean + 1e-6)).sum(dim=1, keepdim=True)
    t = min(it, max_iterations) / max_iterations
    th = (start + (end - start) * math.exp(-5.0 * (1.0 - t) ** 2)) * math.log(2)
    # the fixture must not sit on the threshold (float32 vs float64) and must mask some pixels, not all
    assert (u - th).abs().min() > 1e-4
    mask = (u < th).double()
    assert 0 < mask.mean() < 1
    dist = (softmax(logits[lb:]) - target) ** 2
    cons = (mask * dist).sum() / (2 * mask.sum() + 1e-16)
    return ref_sup(logits[:lb], batch.label), cons, {"uncertainty_threshold": th, "certain_fraction": mask.mean()}


def ref_ict(strategy, batch, it, ict_alpha):
    lb = batch.labeled_bs
    x_u = batch.image[lb:]
    half = x_u.shape[0] // 2  # sized by the unlabeled count, not labeled_bs // 2
    lam = torch.distributions.Beta(torch.tensor(float(ict_alpha)), torch.tensor(float(ict_alpha))).sample((half, 1, 1, 1))
    assert lam.shape == (half, 1, 1, 1)
    u0, u1 = x_u[:half], x_u[half:2 * half]
    mixed = u0 * (1 - lam) + u1 * lam
    logits = affine(torch.cat([batch.image[:lb], mixed]), W_S, B_S)
    lam = lam.double()
    target = softmax(affine(u0, W_T, B_T)) * (1 - lam) + softmax(affine(u1, W_T, B_T)) * lam
    cons = torch.mean((softmax(logits[lb:]) - target) ** 2)
    return ref_sup(logits[:lb], batch.label), cons


def ref_entropy_min(strategy, batch, it, entropy_classes):
    logits = affine(batch.image, W_S, B_S)
    p = softmax(logits)  # whole batch: labeled and unlabeled
    cons = ref_entropy(p).mean() / math.log(entropy_classes)
    return ref_sup(logits[: batch.labeled_bs], batch.label), cons


def ref_urpc(strategy, batch, it):
    lb = batch.labeled_bs
    outs = [affine(batch.image, w, b) for w, b in zip(W_DS, B_DS)]
    sup = (sum(ref_ce(o[:lb], batch.label) for o in outs)
           + sum(ref_dice(softmax(o[:lb]), batch.label) for o in outs)) / 8
    cons = ref_pyramid([softmax(o[lb:]) for o in outs])
    return sup, cons


def ref_dan(strategy, batch, it):
    lb = batch.labeled_bs
    logits = affine(batch.image, W_S, B_S)
    d = strategy.discriminator
    assert not d.training, "the student step must leave (and run) the discriminator in eval mode"
    with torch.no_grad():
        d_out = d(softmax(logits[lb:]).float(), batch.image[lb:]).double()
    cons = -torch.log(softmax(d_out)[:, 1]).mean()  # CE against the 'labeled-like' class 1
    return ref_sup(logits[:lb], batch.label), cons


def make_batch(bs, lb, hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(bs, 1, hw, hw, generator=g) * 5.0 - 2.5
    label = torch.randint(0, C, (lb, hw, hw), generator=g)
    return Batch(image, label)


RAMP = dict(consistency=CONSISTENCY, consistency_rampup=RAMPUP)
# (method, student factory, constructor kwargs, reference, reference kwargs, batch_size, labeled_bs, hw, iteration)
CASES = [
    pytest.param("supervised", PixelAffine, {}, ref_supervised, {}, 4, 2, 3, 10, id="supervised"),
    pytest.param("mean_teacher", PixelAffine, dict(RAMP, mt_warmup=0), ref_mean_teacher, dict(mt_warmup=0),
                 4, 2, 3, 3149, id="mt-live"),
    pytest.param("mean_teacher", PixelAffine, dict(RAMP, mt_warmup=1000), ref_mean_teacher, dict(mt_warmup=1000),
                 4, 2, 3, 999, id="mt-before-warmup"),
    pytest.param("mean_teacher", PixelAffine, dict(RAMP, mt_warmup=1000), ref_mean_teacher, dict(mt_warmup=1000),
                 5, 2, 3, 1000, id="mt-at-warmup"),
    pytest.param("uncertainty_aware_mean_teacher", PixelAffine, dict(RAMP, max_iterations=100, uncertainty_passes=8),
                 ref_uamt, dict(max_iterations=100, uncertainty_passes=8), 4, 2, 3, 50, id="uamt-T8"),
    pytest.param("uncertainty_aware_mean_teacher", PixelAffine,
                 dict(RAMP, max_iterations=100, uncertainty_passes=8, uncertainty_copies=3),
                 ref_uamt, dict(max_iterations=100, uncertainty_passes=8, copies=3), 4, 2, 3, 50, id="uamt-T8-copies3"),
    pytest.param("uncertainty_aware_mean_teacher", PixelAffine, dict(RAMP, max_iterations=100, uncertainty_passes=3),
                 ref_uamt, dict(max_iterations=100, uncertainty_passes=3), 5, 2, 5, 0, id="uamt-T3-start"),
    pytest.param("uncertainty_aware_mean_teacher", PixelAffine,
                 dict(RAMP, max_iterations=100, uncertainty_passes=4, uncertainty_threshold_start=0.5,
                      uncertainty_threshold_end=0.9),
                 ref_uamt, dict(max_iterations=100, uncertainty_passes=4, start=0.5, end=0.9), 4, 2, 3, 400,
                 id="uamt-T4-custom-threshold-end"),
    pytest.param("interpolation_consistency", PixelAffine, dict(RAMP, ict_alpha=0.2, batch_size=4, labeled_bs=2),
                 ref_ict, dict(ict_alpha=0.2), 4, 2, 3, 3149, id="ict-equal-halves"),
    pytest.param("interpolation_consistency", PixelAffine, dict(RAMP, ict_alpha=0.5, batch_size=5, labeled_bs=1),
                 ref_ict, dict(ict_alpha=0.5), 5, 1, 3, 300, id="ict-lb1-unlabeled4"),
    pytest.param("interpolation_consistency", PixelAffine, dict(RAMP, ict_alpha=1.0, batch_size=8, labeled_bs=2),
                 ref_ict, dict(ict_alpha=1.0), 8, 2, 3, 6000, id="ict-lb2-unlabeled6"),
    pytest.param("entropy_minimization", PixelAffine, dict(RAMP), ref_entropy_min, dict(entropy_classes=4),
                 4, 2, 3, 3149, id="em-default-C4"),
    pytest.param("entropy_minimization", PixelAffine, dict(RAMP, entropy_classes=2), ref_entropy_min,
                 dict(entropy_classes=2), 4, 2, 3, 150, id="em-C2"),
    pytest.param("pyramid_consistency", PyramidAffine, dict(RAMP), ref_urpc, {}, 4, 2, 3, 3149, id="urpc"),
    pytest.param("adversarial", PixelAffine, dict(RAMP), ref_dan, {}, 4, 2, 16, 3149, id="dan-student-step"),
]


@pytest.mark.parametrize("method, student_fn, kwargs, reference, ref_kwargs, bs, lb, hw, iteration", CASES)
def test_consistency_matches_formula(method, student_fn, kwargs, reference, ref_kwargs, bs, lb, hw, iteration):
    torch.manual_seed(0)
    strategy = create_method(method, student_fn(), num_classes=C, **kwargs)
    if strategy.teacher is not None:
        set_affine(strategy.teacher, W_T, B_T)  # a teacher unlike the student, so using either shows
    if method == "adversarial":
        strategy.discriminator.train()  # step() itself must switch it to eval
    batch = make_batch(bs, lb, hw)

    torch.manual_seed(SEED)
    out = strategy.step(batch, iteration)
    torch.manual_seed(SEED)
    sup, cons, *extra = reference(strategy, batch, iteration, **ref_kwargs)

    tol = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss_sup"].double(), sup, **tol)
    if cons is None:  # the baseline
        torch.testing.assert_close(out["loss"], out["loss_sup"], rtol=0, atol=0)
        assert "consistency" not in out
        return
    torch.testing.assert_close(out["consistency"].double(), cons, **tol)
    w = ref_weight(iteration, kwargs.get("consistency", 0.1), kwargs.get("consistency_rampup", 200.0))
    if method == "mean_teacher" and iteration < kwargs["mt_warmup"]:
        w = 0.0  # the reference's `if iter_num < 1000: consistency_loss = 0`
    assert float(out["consistency_weight"]) == pytest.approx(w, rel=1e-6)  # stored as float32
    torch.testing.assert_close(out["loss"].double(), (out["loss_sup"] + w * out["consistency"]).double(), **tol)
    torch.testing.assert_close(out["loss"].double(), sup + w * cons, **tol)
    for key, value in (extra[0] if extra else {}).items():
        assert out[key].item() == pytest.approx(float(value), rel=1e-6), key
    if method == "mean_teacher" and iteration < kwargs["mt_warmup"]:
        assert float(out["consistency_weight"]) == 0.0 and out["loss"].item() == out["loss_sup"].item()
    if method != "supervised":
        assert float(cons) > 1e-6  # the fixture makes every live term nonzero


def test_uamt_copies_per_forward_change_nothing_without_batch_statistics():
    """Two noisy copies per teacher forward (the reference) or all T in one forward: the same noise
    stream, so the same uncertainty map for a network without BatchNorm (only BatchNorm's batch
    statistics see the grouping). This relies on torch's CPU generator giving one draw of 8n
    numbers as four draws of 2n (true here: n is a multiple of 16); the uamt-T8-copies3 case above
    checks that the grouping is applied at all."""
    batch = make_batch(8, 4, 6, seed=5)
    maps = []
    for copies in (2, 8):
        torch.manual_seed(0)
        strategy = create_method("uncertainty_aware_mean_teacher", PixelAffine(), num_classes=C, max_iterations=100,
                                 uncertainty_passes=8, uncertainty_copies=copies)
        torch.manual_seed(1)
        maps.append(strategy.uncertainty(batch.unlabeled))
    assert maps[0].shape == (4, 1, 6, 6)
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-6, atol=1e-7)
    assert maps[0].std() > 0  # not a constant map that any grouping would reproduce


@pytest.mark.parametrize("copies", [2, 8])
def test_uamt_target_in_the_uncertainty_forward_changes_nothing_without_batch_statistics(copies):
    """`uncertainty_with_target` runs the target's noisy pass as the first copy of the first
    uncertainty forward: the target's noise is still drawn first, so a network without BatchNorm
    gives the same target, uncertainty map and consistency (same generator caveat as above), in
    one teacher forward fewer."""
    batch = make_batch(8, 4, 6, seed=5)
    results, forwards = [], []
    for joined in (False, True):
        torch.manual_seed(0)
        strategy = create_method("uncertainty_aware_mean_teacher", PixelAffine(), num_classes=C, max_iterations=100,
                                 uncertainty_passes=8, uncertainty_copies=copies, uncertainty_with_target=joined)
        set_affine(strategy.teacher, W_T, B_T)
        sizes = []
        strategy.teacher.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
        torch.manual_seed(1)
        results.append((*strategy.teacher_outputs(batch.unlabeled), strategy.step(batch, 50)["consistency"].detach()))
        forwards.append(sizes)
    (t0, u0, c0), (t1, u1, c1) = results
    for a, b in ((t0, t1), (u0, u1), (c0, c1)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert t0.shape == (4, C, 6, 6) and u0.std() > 0 and float(c0) > 1e-6
    per_step = 1 + 8 // copies
    assert forwards[0] == [4] + [4 * copies] * (8 // copies) + [4] + [4 * copies] * (8 // copies)
    assert forwards[1] == [4 * (copies + 1)] + [4 * copies] * (8 // copies - 1) + \
        [4 * (copies + 1)] + [4 * copies] * (8 // copies - 1)
    assert len(forwards[1]) == 2 * (per_step - 1)


@pytest.mark.parametrize("copies, joined", [(2, False), (3, False), (8, True)])
def test_uamt_grouped_forward_computes_what_separate_forwards_compute(copies, joined):
    """`uncertainty_grouped_forward` runs a step's teacher forwards as one batch with BatchNorm
    statistics per forward: on the real UNet (dropout off, whose draws would come in another
    order) the same target, uncertainty map, consistency and teacher running statistics, from one
    teacher forward of (1 + T) copies."""
    from raysemi.models import create_model

    batch = make_batch(8, 4, 16, seed=5)
    results, forwards = [], []
    for grouped in (False, True):
        torch.manual_seed(0)
        unet = create_model("unet", in_channels=1, num_classes=C)
        for m in unet.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        strategy = create_method("uncertainty_aware_mean_teacher", unet, num_classes=C, max_iterations=100,
                                 uncertainty_passes=8, uncertainty_copies=copies, uncertainty_with_target=joined,
                                 uncertainty_grouped_forward=grouped,
                                 # a random UNet is near ln 4 uncertain everywhere: let every pixel count
                                 uncertainty_threshold_start=2.5, uncertainty_threshold_end=2.5)
        sizes = []
        strategy.teacher.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
        torch.manual_seed(1)
        target, u = strategy.teacher_outputs(batch.unlabeled)
        cons = strategy.step(batch, 5000)["consistency"].detach()
        results.append((target, u, cons, *[b.clone() for b in strategy.teacher.buffers()]))
        forwards.append(sizes)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    target, u, cons = results[0][:3]
    assert target.shape == (4, C, 16, 16) and u.std() > 0 and float(cons) > 1e-6
    assert forwards[1] == [4 * 9, 4 * 9]
    assert len(forwards[0]) == 2 * (8 // copies + (8 % copies > 0) + (not joined))


def test_uamt_grouped_forward_refuses_a_network_it_cannot_group():
    student = nn.Sequential(nn.Conv2d(1, C, 1), nn.BatchNorm2d(C))
    with pytest.raises(ValueError, match="uncertainty_grouped_forward needs a network whose BatchNorm layers"):
        create_method("uncertainty_aware_mean_teacher", student, num_classes=C, max_iterations=10,
                      uncertainty_grouped_forward=True)


def test_uamt_rejects_zero_copies():
    with pytest.raises(ValueError, match="uncertainty_copies must be >= 1"):
        create_method("uncertainty_aware_mean_teacher", PixelAffine(), num_classes=C, max_iterations=10,
                      uncertainty_copies=0)


def test_mean_teacher_warmup_default_is_reference_1000():
    strategy = create_method("mean_teacher", PixelAffine(), num_classes=C)
    set_affine(strategy.teacher, W_T, B_T)
    batch = make_batch(4, 2, 3)
    before, at = strategy.step(batch, 999), strategy.step(batch, 1000)
    assert before["consistency_weight"].item() == 0.0 and before["loss"].item() == before["loss_sup"].item()
    assert at["consistency_weight"].item() > 0.0 and at["loss"].item() > at["loss_sup"].item()


def test_entropy_minimization_defaults_to_four_classes():
    assert create_method("entropy_minimization", PixelAffine(), num_classes=C).entropy_classes == 4


def test_urpc_rejects_single_output_student():
    strategy = create_method("pyramid_consistency", PixelAffine(), num_classes=C)
    with pytest.raises(ValueError):
        strategy.step(make_batch(4, 2, 3), 0)


# -- the DAN discriminator step ---------------------------------------------------------------------
def test_dan_after_step_trains_discriminator_only():
    torch.manual_seed(0)
    dan_lr = 1e-3
    strategy = create_method("adversarial", PixelAffine(), num_classes=C, dan_lr=dan_lr)
    batch = make_batch(4, 2, 16)
    lb = batch.labeled_bs
    out = strategy.step(batch, 500)
    out["loss"].backward()  # leaves stale gradients on D that its own step must discard

    d = strategy.discriminator
    ref_d = copy.deepcopy(d).requires_grad_(True)  # the student step freezes D; its own step trains it
    ref_opt = torch.optim.Adam(ref_d.parameters(), lr=dan_lr, betas=(0.9, 0.99))
    d_before = [p.detach().clone() for p in d.parameters()]
    student_before = copy.deepcopy(strategy.student.state_dict())
    strategy.student.eval()  # after_step must hand the student back in train mode

    # reference: D in train mode on the detached softmax of the whole batch, targets [1]*lb + [0]*unlabeled
    ref_d.train()
    probs = softmax(affine(batch.image, W_S, B_S)).float()
    torch.manual_seed(SEED)
    d_out = ref_d(probs, batch.image)
    target = torch.tensor([1] * lb + [0] * (batch.image.shape[0] - lb))
    logp = torch.log_softmax(d_out, dim=1)
    ref_loss = -logp[torch.arange(len(target)), target].mean()
    flipped_loss = -logp[torch.arange(len(target)), 1 - target].mean()
    ref_opt.zero_grad(set_to_none=True)
    ref_loss.backward()
    ref_opt.step()

    torch.manual_seed(SEED)
    res = strategy.after_step(batch, strategy.step_inputs(500))

    assert float(res["loss_discriminator"]) == pytest.approx(ref_loss.item(), rel=1e-5)
    assert float(res["loss_discriminator"]) != pytest.approx(flipped_loss.item(), rel=1e-3)
    # Adam's first step moves each weight by about dan_lr * sign(grad); float32 rounding of the
    # softmax only matters where |grad| is near Adam's eps, hence the absolute tolerance << dan_lr
    for p, q in zip(d.parameters(), ref_d.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-5)
    moved = [(p.detach() - b).abs() for p, b in zip(d.parameters(), d_before)]
    assert all(m.max() > 0.5 * dan_lr for m in moved)  # every tensor took a step of ~dan_lr
    assert strategy.student.training
    for k, v in strategy.student.state_dict().items():
        assert torch.equal(v, student_before[k]), k


def test_dan_student_step_ignores_discriminator_dropout():
    """With D in eval mode the student step is deterministic whatever the RNG state."""
    strategy = create_method("adversarial", PixelAffine(), num_classes=C, **RAMP)
    batch = make_batch(4, 2, 16)
    torch.manual_seed(1)
    a = strategy.step(batch, 3000)["consistency"]
    torch.manual_seed(2)
    b = strategy.step(batch, 3000)["consistency"]
    assert torch.equal(a, b)


# -- URPC consistency helper against the formula ----------------------------------------------------
def _random_probs(seed, n, shape):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(*shape, generator=g) * 2, dim=1) for _ in range(n)]


@pytest.mark.parametrize("seed, n, shape", [(0, 4, (2, 4, 3, 3)), (1, 4, (1, 2, 5, 4)), (2, 2, (3, 3, 2, 2)),
                                            (3, 3, (2, 4, 1, 1))])
def test_pyramid_consistency_loss_matches_formula(seed, n, shape):
    probs = _random_probs(seed, n, shape)
    got = pyramid_consistency_loss(probs)
    torch.testing.assert_close(got.double(), ref_pyramid(probs), rtol=1e-5, atol=1e-7)
    assert float(got) > 0


def test_pyramid_consistency_loss_zero_when_outputs_agree():
    p = _random_probs(5, 1, (2, 4, 3, 3))[0]
    assert float(pyramid_consistency_loss([p, p.clone(), p.clone(), p.clone()])) == pytest.approx(0.0, abs=1e-7)


def test_pyramid_consistency_loss_hand_case():
    """One pixel, two classes, two outputs s1 = (0.5, 0.5), s2 = (0.9, 0.1): P = (0.7, 0.3)."""
    s1 = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    s2 = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    v1 = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    v2 = 0.7 * math.log(0.7 / 0.9) + 0.3 * math.log(0.3 / 0.1)
    # mean over the 2 classes of (P - s)^2 e^{-v}, divided by e^{-v} (+1e-8), plus v
    t1 = ((0.2 ** 2 + 0.2 ** 2) / 2 * math.exp(-v1)) / (math.exp(-v1) + 1e-8) + v1
    t2 = ((0.2 ** 2 + 0.2 ** 2) / 2 * math.exp(-v2)) / (math.exp(-v2) + 1e-8) + v2
    assert float(pyramid_consistency_loss([s1, s2])) == pytest.approx((t1 + t2) / 2, rel=1e-5)


# -- schedules ------------------------------------------------------------------------------------
@pytest.mark.parametrize("current, length, expected", [
    (0, 200, math.exp(-5.0)),
    (100, 200, math.exp(-1.25)),
    (150, 200, math.exp(-5.0 * 0.25 ** 2)),
    (200, 200, 1.0),
    (300, 200, 1.0),
    (-5, 200, math.exp(-5.0)),
    (7, 0, 1.0),
])
def test_sigmoid_rampup(current, length, expected):
    assert schedules.sigmoid_rampup(current, length) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("iteration, consistency, rampup, interval, expected", [
    (0, 0.1, 200, 150, 0.1 * math.exp(-5.0)),
    (149, 0.1, 200, 150, 0.1 * math.exp(-5.0)),  # iter // 150 == 0
    (150, 0.1, 200, 150, 0.1 * math.exp(-5.0 * (1 - 1 / 200) ** 2)),
    (15000, 0.1, 200, 150, 0.1 * math.exp(-1.25)),
    (15149, 0.1, 200, 150, 0.1 * math.exp(-1.25)),  # floor division, not iter / 150
    (30000, 0.1, 200, 150, 0.1),
    (99999, 0.1, 200, 150, 0.1),
    (3149, 0.3, 40, 150, 0.3 * math.exp(-1.25)),
    (10, 0.5, 20, 1, 0.5 * math.exp(-1.25)),
    (5, 2.0, 0, 150, 2.0),
    (12345, 0.0, 200, 150, 0.0),
])
def test_consistency_weight(iteration, consistency, rampup, interval, expected):
    assert schedules.consistency_weight(iteration, consistency, rampup, interval) == pytest.approx(expected, rel=1e-12)


def test_consistency_weight_default_interval_is_150():
    assert schedules.consistency_weight(299, 1.0, 10) == schedules.consistency_weight(150, 1.0, 10)
    assert schedules.consistency_weight(300, 1.0, 10) == pytest.approx(math.exp(-5.0 * 0.8 ** 2))


@pytest.mark.parametrize("iteration, max_iterations, start, end, expected", [
    (0, 100, 0.75, 1.0, (0.75 + 0.25 * math.exp(-5.0)) * math.log(2)),
    (50, 100, 0.75, 1.0, (0.75 + 0.25 * math.exp(-1.25)) * math.log(2)),
    (100, 100, 0.75, 1.0, math.log(2)),
    (250, 100, 0.75, 1.0, math.log(2)),
    (50, 100, 0.5, 0.9, (0.5 + 0.4 * math.exp(-1.25)) * math.log(2)),
])
def test_uncertainty_threshold(iteration, max_iterations, start, end, expected):
    got = schedules.uncertainty_threshold(iteration, max_iterations, start, end)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("iteration, max_iterations, base_lr, expected", [
    (0, 100, 0.01, 0.01), (50, 100, 0.01, 0.01 * 0.5 ** 0.9), (99, 100, 0.02, 0.02 * 0.01 ** 0.9), (100, 100, 0.01, 0.0),
])
def test_poly_lr(iteration, max_iterations, base_lr, expected):
    assert schedules.poly_lr(iteration, max_iterations, base_lr) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("iteration, decay, expected", [
    (0, 0.99, 0.0), (1, 0.99, 0.5), (2, 0.6, 0.6), (2, 0.99, 2 / 3), (9, 0.99, 0.9), (99, 0.99, 0.99),
    (5000, 0.99, 0.99), (3, 0.0, 0.0),
])
def test_ema_alpha(iteration, decay, expected):
    assert schedules.ema_alpha(iteration, decay) == pytest.approx(expected, rel=1e-12, abs=1e-15)


class _Tiny(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b = nn.Parameter(torch.tensor(b))
        self.register_buffer("stat", torch.tensor([7.0]))


def test_ema_update_three_steps_by_hand():
    """decay 0.6: a = 0 (copy), then 0.5, then min(2/3, 0.6) = 0.6."""
    teacher = _Tiny([1.0, 2.0], [10.0])
    student = _Tiny([3.0, -1.0], [0.0])
    student.stat.fill_(-1.0)
    students = [([3.0, -1.0], [0.0]), ([5.0, 1.0], [4.0]), ([-1.0, 2.0], [1.0])]
    expected = [([3.0, -1.0], [0.0]),                    # a = 0: a copy of the student
                ([4.0, 0.0], [2.0]),                     # a = 0.5: 0.5 * t + 0.5 * s
                ([0.6 * 4 - 0.4, 0.4 * 2], [0.6 * 2 + 0.4])]  # a = 0.6
    alphas = [0.0, 0.5, 0.6]
    for it, ((sw, sb), (ew, eb), a) in enumerate(zip(students, expected, alphas)):
        with torch.no_grad():
            student.w.copy_(torch.tensor(sw))
            student.b.copy_(torch.tensor(sb))
        alpha = schedules.ema_alpha(it, 0.6)
        assert alpha == pytest.approx(a, abs=1e-12)
        ema_update(teacher, student, alpha)
        torch.testing.assert_close(teacher.w.detach(), torch.tensor(ew), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(teacher.b.detach(), torch.tensor(eb), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(student.w.detach(), torch.tensor(sw))  # the student is left alone
    assert float(teacher.stat) == 7.0  # buffers are not averaged (as the reference)


# -- Dice loss --------------------------------------------------------------------------------------
S = 1e-5
P_A0 = [[0.9, 0.6], [0.2, 0.5]]  # class-0 probabilities of image A (class 1 = 1 - these)
Y_A = [[0, 0], [1, 1]]


def _probs(*class0):
    p0 = torch.tensor(class0)  # (B, H, W)
    return torch.stack([p0, 1 - p0], dim=1)


@pytest.mark.parametrize("probs, target, expected", [
    # A: class 0 sum(p y) = 0.9 + 0.6 = 1.5, sum(p^2) = 0.81 + 0.36 + 0.04 + 0.25 = 1.46, sum(y^2) = 2
    #    class 1 sum(p y) = 0.8 + 0.5 = 1.3, sum(p^2) = 0.01 + 0.16 + 0.64 + 0.25 = 1.06, sum(y^2) = 2
    pytest.param(_probs(P_A0), torch.tensor([Y_A]),
                 ((1 - (3.0 + S) / (3.46 + S)) + (1 - (2.6 + S) / (3.06 + S))) / 2, id="hand-2x2"),
    pytest.param(_probs([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([Y_A]), 0.0, id="perfect"),
    # uniform 0.5 on an all-background label: class 0: 2, 1, 4; class 1: 0, 1, 0
    pytest.param(_probs([[0.5, 0.5], [0.5, 0.5]]), torch.zeros(1, 2, 2, dtype=torch.long),
                 ((1 - (4.0 + S) / (5.0 + S)) + (1 - S / (1.0 + S))) / 2, id="absent-class"),
    # two images: sums run over the whole batch (A plus the uniform/background image)
    pytest.param(_probs(P_A0, [[0.5, 0.5], [0.5, 0.5]]), torch.tensor([Y_A, [[0, 0], [0, 0]]]),
                 ((1 - (7.0 + S) / (8.46 + S)) + (1 - (2.6 + S) / (4.06 + S))) / 2, id="batch-sums"),
])
def test_dice_loss_hand_cases(probs, target, expected):
    assert float(dice_loss(probs, target)) == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("probs_shape, target_shape", [
    ((1, 2, 2), (1, 2, 2)),           # probs without a class axis
    ((1, 2, 2, 2), (1, 1, 2, 2)),     # target with a channel axis
    ((1, 2, 2, 2), (2, 2, 2)),        # batch mismatch
    ((1, 2, 2, 2), (1, 2, 3)),        # spatial mismatch
    ((1, 2, 2, 2, 1), (1, 2, 2, 1)),  # 3D volume
])
def test_dice_loss_bad_shapes(probs_shape, target_shape):
    with pytest.raises(ValueError):
        dice_loss(torch.full(probs_shape, 0.5), torch.zeros(target_shape, dtype=torch.long))
