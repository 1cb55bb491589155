"""Dataset adapters: stable IDs, splits, and clear errors for IDs that cannot be forgotten."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from engine.datasets import DatasetSpec, load_dataset
from engine.errors import InvalidInput, TestSplitSamples, UnknownName, UnknownSampleIds


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(DatasetSpec("mnist5k"))


def test_mnist5k_is_a_stratified_4000_1000_split_with_stable_ids(mnist):
    assert len(mnist) == 5000 and mnist.input_shape == (1, 28, 28)
    assert mnist.split_sizes() == {"train": 4000, "test": 1000}
    assert np.bincount(mnist.labels[mnist.test_indices]).tolist() == [100] * 10
    assert mnist.ids[0] == "mnist5k-0000" and mnist.ids[-1] == "mnist5k-4999"
    again = load_dataset(DatasetSpec("mnist5k"))
    assert np.array_equal(again.splits, mnist.splits)
    other = load_dataset(DatasetSpec("mnist5k", options={"split_seed": 1}))
    assert not np.array_equal(other.splits, mnist.splits)
    assert np.array_equal(other.ids, mnist.ids)  # IDs do not depend on the split


def test_unknown_and_test_split_ids_are_named(mnist):
    test_id = str(mnist.ids[mnist.test_indices[0]])
    train_id = str(mnist.ids[mnist.train_indices[0]])
    with pytest.raises(UnknownSampleIds) as exc:
        mnist.deletable_indices([train_id, "nope-1", "nope-2"])
    assert exc.value.ids == ["nope-1", "nope-2"] and exc.value.code == "unknown_sample_ids"
    with pytest.raises(TestSplitSamples) as exc2:
        mnist.deletable_indices([train_id, test_id])
    assert exc2.value.ids == [test_id]
    assert mnist.deletable_indices([train_id]).tolist() == [mnist.train_indices[0]]


def test_retain_pool_excludes_every_forgotten_id(mnist):
    forgotten = [str(i) for i in mnist.ids[mnist.train_indices[:123]]]
    pool = mnist.retain_pool(forgotten + ["not-a-sample"])
    assert len(pool) == 4000 - 123
    assert not set(mnist.ids[pool].tolist()) & set(forgotten)
    assert (mnist.splits[pool] == "train").all()


def test_npz_adapter(tmp_path):
    path = tmp_path / "d.npz"
    x = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3)).astype(np.uint8)
    np.savez(path, x=x, y=np.array([0, 1, 2, 0, 1, 2]), ids=np.array(list("abcdef")),
             split=np.array(["train"] * 4 + ["test"] * 2))
    ds = load_dataset(DatasetSpec("npz", str(path)))
    assert ds.input_shape == (3, 8, 8) and ds.num_classes == 3
    assert np.array_equal(ds.images[0], x[0].transpose(2, 0, 1))
    assert ds.split_sizes() == {"train": 4, "test": 2}
    np.savez(tmp_path / "bad.npz", x=x, y=np.zeros(6))
    with pytest.raises(InvalidInput, match="ids"):
        load_dataset(DatasetSpec("npz", str(tmp_path / "bad.npz")))


def test_image_folder_adapter(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(np.full((10, 10), i * 60, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"sample_id": f"p{i}", "path": f"img/{i}.png", "label": i % 2,
                     "split": "test" if i == 3 else "train"})
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sample_id", "path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    ds = load_dataset(DatasetSpec("image_folder", str(manifest)))
    assert ds.ids.tolist() == ["p0", "p1", "p2", "p3"] and ds.input_shape == (1, 10, 10)
    assert int(ds.images[2].max()) == 120 and ds.split_sizes() == {"train": 3, "test": 1}

    with manifest.open("a", newline="") as f:
        f.write("evil,../../etc/passwd,0,train\n")
    with pytest.raises(InvalidInput, match="escapes"):
        load_dataset(DatasetSpec("image_folder", str(manifest)))


def test_torchvision_layouts_are_read_locally_never_downloaded(tmp_path):
    with pytest.raises(InvalidInput, match="never downloaded"):
        load_dataset(DatasetSpec("cifar10", str(tmp_path)))
    with pytest.raises(UnknownName):
        load_dataset(DatasetSpec("imagenet"))


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    ds = load_dataset(DatasetSpec("mnist", str(tmp_path)))
    assert ds.split_sizes() == {"train": 5, "test": 3}
    assert ds.ids.tolist()[:2] == ["train-000000", "train-000001"] and ds.ids[-1] == "test-000002"
    assert ds.labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


def test_heldout_split_is_deterministic_stratified_and_disjoint(mnist):
    cal, audit = mnist.calibration_indices, mnist.audit_indices
    assert mnist.heldout_sizes() == {"calibration": 500, "audit": 500}
    assert not np.intersect1d(cal, audit).size
    assert np.array_equal(np.sort(np.concatenate([cal, audit])), mnist.test_indices)
    # Stratified: each half keeps the test split's class balance (100 per digit -> 50 + 50).
    assert np.bincount(mnist.labels[cal], minlength=10).tolist() == [50] * 10
    assert np.bincount(mnist.labels[audit], minlength=10).tolist() == [50] * 10
    # Deterministic: a fresh load of the same dataset gives the same halves...
    again = load_dataset(DatasetSpec("mnist5k"))
    assert np.array_equal(again.audit_indices, audit)
    # ...and a different dataset (another split seed, so another fingerprint) other halves.
    other = load_dataset(DatasetSpec("mnist5k", options={"split_seed": 1}))
    assert (np.bincount(other.labels[other.audit_indices]) == 50).all()
    assert not np.array_equal(other.audit_indices, audit)


def test_heldout_split_seed_comes_from_the_fingerprint_and_odd_classes_favour_audit(tmp_path):
    labels = np.array([0] * 7 + [1] * 4 + [0] * 3)
    splits = np.array(["test"] * 11 + ["train"] * 3)
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((14, 4, 4), np.uint8), y=labels,
             ids=np.array([f"i{k}" for k in range(14)]), split=splits)
    ds = load_dataset(DatasetSpec("npz", str(path)))
    assert np.bincount(ds.labels[ds.audit_indices]).tolist() == [4, 2]
    assert np.bincount(ds.labels[ds.calibration_indices]).tolist() == [3, 2]
    assert (ds.splits[ds.audit_indices] == "test").all()
    # Changing one label changes the fingerprint, and the shuffle with it.
    draws = set()
    for k in range(6):
        relabelled = labels.copy()
        relabelled[13] = k
        np.savez(path, x=np.zeros((14, 4, 4), np.uint8), y=relabelled,
                 ids=np.array([f"i{j}" for j in range(14)]), split=splits)
        draws.add(tuple(load_dataset(DatasetSpec("npz", str(path))).audit_indices.tolist()))
    assert len(draws) > 1


def test_split_names_match_the_service_vocabulary():
    from app.vocab import Split
    from engine.datasets import AUDIT, CALIBRATION, TEST, TRAIN

    assert {s.value for s in Split} == {TRAIN, TEST, CALIBRATION, AUDIT}


def test_mnist5k_has_demo_subjects_of_ten_consecutive_samples(mnist):
    assert mnist.subjects is not None
    assert mnist.subjects[:11].tolist() == ["demo-subject-000"] * 10 + ["demo-subject-001"]
    assert mnist.subjects[4999] == "demo-subject-499" and len(set(mnist.subjects.tolist())) == 500
    off = load_dataset(DatasetSpec("mnist5k", options={"subject_group": 0}))
    assert off.subjects is None
    assert off.fingerprint() == mnist.fingerprint()  # subjects do not change the index


def test_npz_subjects_and_synthetic_groups(tmp_path):
    path = tmp_path / "d.npz"
    ids = np.asarray([f"x{i}" for i in range(6)])
    subjects = np.asarray(["ann", "ann", "", "bo", "bo", "bo"])
    np.savez(path, x=np.zeros((6, 4, 4), np.uint8), y=np.arange(6) % 2, ids=ids, subjects=subjects)
    named = load_dataset(DatasetSpec("npz", str(path)))
    assert named.subjects is not None and named.subjects.tolist() == subjects.tolist()
    np.savez(path, x=np.zeros((6, 4, 4), np.uint8), y=np.arange(6) % 2, ids=ids)
    assert load_dataset(DatasetSpec("npz", str(path))).subjects is None
    grouped = load_dataset(DatasetSpec("npz", str(path), {"subject_group": 4, "subject_prefix": "p"}))
    assert grouped.subjects is not None and grouped.subjects.tolist() == ["p-000"] * 4 + ["p-001"] * 2
    np.savez(path, x=np.zeros((6, 4, 4), np.uint8), y=np.arange(6) % 2, ids=ids, subjects=subjects[:5])
    with pytest.raises(InvalidInput, match="one entry per sample"):
        load_dataset(DatasetSpec("npz", str(path)))

def test_heldout_sizes_from_label_counts_match_the_partition(tmp_path) -> None:
    """The service shows `calibration`/`audit` sizes from its index's per-label test counts
    (`heldout_sizes_of`); they must be the partition's, odd label counts included."""
    from engine.datasets import heldout_sizes_of

    labels = np.array([0] * 7 + [1] * 4 + [2] * 1 + [0] * 3)
    splits = np.array(["test"] * 12 + ["train"] * 3)
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((15, 4, 4), np.uint8), y=labels,
             ids=np.array([f"i{k}" for k in range(15)]), split=splits)
    ds = load_dataset(DatasetSpec("npz", str(path)))
    assert ds.heldout_sizes() == heldout_sizes_of([7, 4, 1]) == {"calibration": 5, "audit": 7}
