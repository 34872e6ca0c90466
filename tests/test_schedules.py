import math

import pytest

from raysemi.schedules import consistency_weight, ema_alpha, poly_lr, sigmoid_rampup, uncertainty_threshold


@pytest.mark.parametrize("it,expected", [(0, 0.01), (50, 0.01 * 0.5 ** 0.9), (100, 0.0)])
def test_poly_lr(it, expected):
    assert poly_lr(it, 100, 0.01) == pytest.approx(expected)


@pytest.mark.parametrize("current,length,expected", [
    (0, 200, math.exp(-5)), (100, 200, math.exp(-5 * 0.25)), (200, 200, 1.0), (500, 200, 1.0), (3, 0, 1.0)])
def test_sigmoid_rampup(current, length, expected):
    assert sigmoid_rampup(current, length) == pytest.approx(expected)


def test_consistency_weight_uses_iteration_floor_150():
    # iterations 0..149 share ramp unit 0; 150 starts unit 1
    assert consistency_weight(149, 0.1, 200) == pytest.approx(0.1 * math.exp(-5))
    assert consistency_weight(150, 0.1, 200) == pytest.approx(0.1 * math.exp(-5 * (1 - 1 / 200) ** 2))
    assert consistency_weight(30000, 0.1, 200) == pytest.approx(0.1)


@pytest.mark.parametrize("it,decay,expected", [(0, 0.99, 0.0), (1, 0.99, 0.5), (9, 0.99, 0.9), (1000, 0.99, 0.99)])
def test_ema_alpha(it, decay, expected):
    assert ema_alpha(it, decay) == pytest.approx(expected)


def test_uncertainty_threshold_ramps_from_start_to_end():
    assert uncertainty_threshold(0, 1000) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert uncertainty_threshold(1000, 1000) == pytest.approx(math.log(2))
    assert uncertainty_threshold(1000, 1000, 0.5, 0.9) == pytest.approx(0.9 * math.log(2))
