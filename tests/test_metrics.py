import math

import numpy as np
import pytest
from medpy.metric import binary as mb
from scipy.spatial import cKDTree

from raysemi.metrics import Summary, binary_metrics, case_metrics, diagonal


def box(shape, sl):
    a = np.zeros(shape, bool)
    a[sl] = True
    return a


def test_hand_computed_dice_and_jaccard():
    pred = box((1, 4, 4), np.s_[0, 0:2, 0:2])  # 4 voxels
    gt = box((1, 4, 4), np.s_[0, 0:2, 0:1])  # 2 voxels, inside pred
    m = binary_metrics(pred, gt)
    assert m["dice"] == pytest.approx(2 * 2 / (4 + 2))
    assert m["jaccard"] == pytest.approx(2 / 4)


def test_distances_use_spacing_and_match_medpy():
    pred = box((4, 20, 20), np.s_[1:3, 2:10, 3:9])
    gt = box((4, 20, 20), np.s_[1:4, 4:12, 3:11])
    spacing = (10.0, 1.5, 0.7)
    m = binary_metrics(pred, gt, spacing)
    assert m["hd95"] == pytest.approx(mb.hd95(pred, gt, spacing))
    assert m["asd"] == pytest.approx(mb.asd(pred, gt, spacing))
    assert m["dice"] == pytest.approx(mb.dc(pred, gt))
    # in voxels the distance differs
    assert binary_metrics(pred, gt)["hd95"] == pytest.approx(mb.hd95(pred, gt))
    assert m["hd95"] != pytest.approx(binary_metrics(pred, gt)["hd95"])


def test_shifted_square_hd95_by_hand():
    # a 2D square shifted by 3 pixels along x: every surface distance is <= 3, the max is 3
    pred = box((10, 10), np.s_[2:6, 2:6])
    gt = box((10, 10), np.s_[2:6, 5:9])
    m = binary_metrics(pred, gt, (1.0, 2.0))
    assert m["hd95"] == pytest.approx(6.0)  # 3 pixels * 2 mm


@pytest.mark.parametrize("pred_empty,gt_empty,dice,dist", [
    (True, True, 1.0, 0.0),        # nothing to find, nothing found
    (True, False, 0.0, "diag"),    # missed structure: worst distance, not the reference's 0
    (False, True, 0.0, "diag"),    # structure invented where there is none
])
def test_empty_mask_rule(pred_empty, gt_empty, dice, dist):
    shape, spacing = (3, 8, 8), (10.0, 1.0, 1.0)
    full = box(shape, np.s_[1, 2:5, 2:5])
    empty = np.zeros(shape, bool)
    m = binary_metrics(empty if pred_empty else full, empty if gt_empty else full, spacing)
    expected = diagonal(shape, spacing) if dist == "diag" else dist
    assert m["dice"] == dice and m["hd95"] == pytest.approx(expected) and m["asd"] == pytest.approx(expected)
    assert m["empty_pred"] == float(pred_empty and not gt_empty)


def test_diagonal_by_hand():
    assert diagonal((3, 8, 8), (10.0, 1.0, 1.0)) == pytest.approx(math.sqrt(20 ** 2 + 7 ** 2 + 7 ** 2))


def test_case_metrics_per_class_and_summary_counts_empty_predictions():
    gt = np.zeros((2, 6, 6), int)
    gt[0, 1:3, 1:3] = 1
    gt[1, 3:5, 3:5] = 2
    pred = gt.copy()
    pred[pred == 2] = 0  # class 2 missed
    rows = case_metrics(pred, gt, num_classes=3)
    assert [r["dice"] for r in rows] == [1.0, 0.0]
    s = Summary(["a", "b"], [("case1", rows), ("case2", case_metrics(gt, gt, 3))])
    means = s.means()
    assert means["dice_a"] == 1.0 and means["dice_b"] == 0.5 and means["dice"] == 0.75
    assert means["empty_pred"] == 1.0
    assert "1 class-volume pairs predicted empty" in s.format()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(np.ones((3, 3), bool), np.ones((3, 3), bool), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("seed", range(6))
def test_cropped_distances_equal_medpy_on_the_whole_volume(seed):
    # blobs anywhere, some touching the volume's border: the bounding-box crop must be exact
    rng = np.random.default_rng(seed)
    shape = (6, 40, 36)
    pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
    for mask in (pred, gt):
        for _ in range(3):
            z, y, x = (int(rng.integers(0, s)) for s in shape)
            r = int(rng.integers(1, 8))
            mask[max(z - 1, 0):z + 2, max(y - r, 0):y + r, max(x - r, 0):x + r] = True
    spacing = (10.0, 1.5, 1.25)
    m = binary_metrics(pred, gt, spacing)
    assert m["hd95"] == pytest.approx(mb.hd95(pred, gt, spacing), rel=1e-12)
    assert m["asd"] == pytest.approx(mb.asd(pred, gt, spacing), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ndim", [2, 3])
def test_surface_distances_equal_medpys_both_ways_on_speckled_masks(seed, ndim):
    # a realistic early prediction: the truth shifted, with speckles anywhere (so the bounding box is
    # the whole volume), one-voxel-thin parts (whose border is the whole object) and touching the edge
    from medpy.metric.binary import __surface_distances as medpy_surface_distances

    from raysemi.metrics import surface_distances

    rng = np.random.default_rng(seed)
    shape = (5, 48, 40)[-ndim:]
    gt = np.zeros(shape, bool)
    gt[(slice(None),) * (ndim - 2) + (slice(10, 30), slice(8, 24))] = True
    gt[(slice(None),) * (ndim - 2) + (slice(0, 40), 30)] = True  # thin, from the edge
    pred = np.roll(gt, int(rng.integers(1, 4)), axis=-1) | (rng.random(shape) < 0.01)
    spacing = (6.5, 0.78, 0.93)[-ndim:]
    for sp in (spacing, None):
        for method in ("edt", "kdtree", "auto"):  # both exact methods, in medpy's voxel order
            d_pg, d_gp = surface_distances(pred, gt, sp, method)
            np.testing.assert_allclose(d_pg, medpy_surface_distances(pred, gt, sp, 1), rtol=1e-12)
            np.testing.assert_allclose(d_gp, medpy_surface_distances(gt, pred, sp, 1), rtol=1e-12)
        m = binary_metrics(pred, gt, sp)
        assert m["hd95"] == pytest.approx(mb.hd95(pred, gt, sp), rel=1e-12)
        assert m["asd"] == pytest.approx(mb.asd(pred, gt, sp), rel=1e-12)
        assert m["hd95"] > 0


def test_surface_distances_take_the_cheaper_method_and_refuse_an_unknown_one(monkeypatch):
    from raysemi import metrics

    gt = np.zeros((4, 64, 64), bool)
    gt[:, 20:40, 20:40] = True
    speckled = np.roll(gt, 2, axis=-1)
    speckled[0, 0, 0] = speckled[3, 63, 63] = True  # the bounding box becomes the whole volume
    used = []
    monkeypatch.setattr(metrics, "cKDTree", lambda pts: used.append("kdtree") or cKDTree(pts))
    metrics.surface_distances(np.roll(gt, 2, axis=-1), gt)
    assert used == []  # a compact box: the distance transform
    metrics.surface_distances(speckled, gt)
    assert used == ["kdtree", "kdtree"]
    with pytest.raises(ValueError, match="method must be"):
        metrics.surface_distances(gt, gt, None, "fast")


def test_surface_distances_take_integer_masks_as_booleans():
    from raysemi.metrics import surface_distances

    gt = np.zeros((6, 20, 20), np.uint8)
    gt[:, 5:12, 5:12] = 1
    pred = np.roll(gt, 2, axis=-1) * 3  # any non-zero value is foreground
    for method in ("edt", "kdtree"):
        got = surface_distances(pred, gt, (2.0, 1.0, 1.0), method)
        want = surface_distances(pred > 0, gt > 0, (2.0, 1.0, 1.0), method)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
