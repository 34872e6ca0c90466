import h5py
import numpy as np
import pytest
import torch

from raysemi.data import (BatchSampler, TrainTensors, load_train_slices, load_volumes, patient_id, read_list,
                          shipped_list, split_labeled, write_phantom)
from raysemi.data.augment import augment, random_affines
from raysemi.data.sampler import resize_all, resize_nearest
from raysemi.errors import UserError


@pytest.mark.parametrize("patients,slices", [(3, 68), (7, 136), (14, 256), (21, 396), (28, 512), (35, 664), (70, 1312)])
def test_labeled_split_on_the_real_acdc_list(patients, slices):
    names = shipped_list("train_slices")
    labeled, unlabeled, pids = split_labeled(names, patients)
    assert len(labeled) == slices and len(labeled) + len(unlabeled) == 1312
    assert len(pids) == patients
    assert {patient_id(names[i]) for i in labeled} == set(pids)
    assert not {patient_id(names[i]) for i in unlabeled} & set(pids)


def test_real_lists_are_shipped():
    assert (len(shipped_list("train")), len(shipped_list("val")), len(shipped_list("test"))) == (140, 20, 40)
    assert patient_id("patient012_frame01_slice_3") == "patient012"


@pytest.mark.parametrize("n", [0, 71])
def test_labeled_patients_out_of_range(n):
    with pytest.raises(UserError, match=f"labeled_patients: {n} is invalid; expected 1 to 70"):
        split_labeled(shipped_list("train_slices"), n)


def test_phantom_layout_and_determinism(tmp_path, tiny_phantom):
    for split in ("train_slices", "train", "val", "test"):
        assert read_list(tiny_phantom, split)
    again = write_phantom(tmp_path / "again", patients=12, seed=0, size=(32, 32))
    other = write_phantom(tmp_path / "other", patients=12, seed=1, size=(32, 32))
    v1, v2, v3 = (load_volumes(p, "val", 4)[0] for p in (tiny_phantom, again, other))
    assert np.array_equal(v1.image, v2.image) and np.array_equal(v1.label, v2.label)
    assert not np.array_equal(v1.image, v3.image)
    assert v1.spacing is not None and len(v1.spacing) == 3
    assert set(np.unique(v1.label)) == {0, 1, 2, 3}
    assert 0.0 <= v1.image.min() and v1.image.max() <= 1.0


def test_phantom_shapes_vary_within_and_across_patients(tiny_phantom):
    vols = load_volumes(tiny_phantom, "test", 4)
    lv_area = [(v.label == 3).sum(axis=(1, 2)) for v in vols]
    assert lv_area[0][0] > lv_area[0][-1]  # the LV shrinks from base to apex
    assert len({tuple(a) for a in lv_area}) == len(vols)  # no two volumes alike
    rv_last = [(v.label[-1] == 1).sum() for v in vols]
    rv_first = [(v.label[0] == 1).sum() for v in vols]
    assert all(f > last for f, last in zip(rv_first, rv_last))


def test_unlabeled_slices_need_no_label(tiny_phantom, tmp_path):
    import shutil

    import h5py
    root = shutil.copytree(tiny_phantom, tmp_path / "copy")
    names = read_list(root, "train_slices")
    with h5py.File(root / "data" / "slices" / f"{names[-1]}.h5", "a") as f:
        del f["label"]  # an unlabeled patient's slice
    data = load_train_slices(root, 2, 4)
    assert len(data.labels) == len(data.labeled_idx)


def test_augmentation_keeps_image_and_label_aligned():
    # the label is drawn from the image (a threshold), so after any transform it must still be
    torch.manual_seed(0)
    img = torch.zeros(64, 1, 32, 32)
    for i in range(64):
        img[i, 0, 4 + i % 7:20 + i % 5, 6:24 - i % 4] = 0.8
        img[i, 0, 10:14, 10 + i % 9:16 + i % 9] = 0.4
    lab = (img[:, 0] > 0.6).long() * 2 + ((img[:, 0] > 0.3) & (img[:, 0] < 0.6)).long()
    theta = random_affines(64, torch.Generator().manual_seed(1), (32, 32))
    out, out_lab = augment(img, lab, theta)
    expect = (out[:, 0] > 0.6).long() * 2 + ((out[:, 0] > 0.3) & (out[:, 0] < 0.6)).long()
    assert torch.equal(out_lab, expect)
    changed = (out != img).flatten(1).any(1)
    assert 0.55 < changed.float().mean() < 0.95  # about a quarter of the samples stay untouched
    # the dihedral maps are exact permutations: the histogram of a flipped image is unchanged
    flips = (theta[:, :, :2].abs().round() == theta[:, :, :2].abs()).all(-1).all(-1) & changed
    assert flips.any()
    for i in torch.nonzero(flips).flatten()[:5]:
        assert torch.equal(torch.sort(out[i].flatten()).values, torch.sort(img[i].flatten()).values)


def test_sampler_draws_each_labeled_slice_once_per_epoch(tiny_phantom):
    data = load_train_slices(tiny_phantom, 2, 4)
    tensors = TrainTensors.from_slices(data, (32, 32))
    n_lab = len(data.labeled_idx)
    s = BatchSampler(tensors, labeled_bs=4, unlabeled_bs=2, seed=0, augment_batches=False)
    epochs = n_lab // 4
    seen = []
    for _ in range(epochs):
        b = s.next()
        assert b.image.shape == (6, 1, 32, 32) and b.label.shape == (4, 32, 32)
        seen.append(s.labeled.perm[s.labeled.pos - 4:s.labeled.pos])
    seen = torch.cat(seen)
    assert len(set(seen.tolist())) == len(seen)  # no labeled slice twice within an epoch
    # labels belong to the images drawn (no augmentation here: compare with the stored slices)
    b = BatchSampler(tensors, 4, 2, seed=3, augment_batches=False).next()
    for img, lab in zip(b.image[:4], b.label):
        j = [k for k in range(len(data.labeled_idx)) if torch.equal(tensors.images[data.labeled_idx[k]], img)]
        assert j and torch.equal(tensors.labels[j[0]].long(), lab)


def test_resize_all_equals_resizing_each_slice_in_order():
    rng = np.random.default_rng(0)
    shapes = [(20, 24), (32, 32), (20, 24), (17, 40), (20, 24), (32, 32), (20, 24)]
    images = [rng.random(s, dtype=np.float32) for s in shapes]
    labels = [rng.integers(0, 4, s) for s in shapes]
    for arrays in (images, labels):
        for chunk in (2, 256):  # 2: a shape's slices split over several resizes
            got = resize_all(arrays, (32, 32), chunk=chunk)
            want = torch.stack([resize_nearest(a, (32, 32)) for a in arrays])
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert resize_all([], (8, 8)).shape == (0, 8, 8)


def test_sampler_state_round_trip(tiny_phantom):
    tensors = TrainTensors.from_slices(load_train_slices(tiny_phantom, 2, 4), (32, 32))
    a = BatchSampler(tensors, 2, 2, seed=5)
    for _ in range(3):
        a.next()
    b = BatchSampler(tensors, 2, 2, seed=99)
    b.load_state_dict(a.state_dict())
    x, y = a.next(), b.next()
    assert torch.equal(x.image, y.image) and torch.equal(x.label, y.label)


def test_phantom_written_in_parallel_is_identical(tmp_path):
    from raysemi.data.phantom import write_phantom

    a = write_phantom(tmp_path / "a", patients=4, size=(32, 32))
    b = write_phantom(tmp_path / "b", patients=4, size=(32, 32), workers=2)
    for name in ("train_slices", "train", "val", "test"):
        assert (a / f"{name}.list").read_text() == (b / f"{name}.list").read_text()
    files = sorted(p.relative_to(a) for p in a.rglob("*.h5"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.h5"))
    for rel in files:
        with h5py.File(a / rel) as fa, h5py.File(b / rel) as fb:
            assert np.array_equal(fa["image"][:], fb["image"][:]) and np.array_equal(fa["label"][:], fb["label"][:])
