"""Manifest datasets: indexed vectorised, images streamed from disk, bad rows named by ID."""

from __future__ import annotations

import csv
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from image_folder import write_image_folder
from PIL import Image
from torchvision import transforms

from engine.datasets import Dataset, DatasetSpec, load_dataset
from engine.errors import InvalidInput, PathOutsideDataset, UnreadableImages
from engine.manifest import check_files, read_image
from engine.model_desc import ModelDescription, Preprocessing
from engine.runtime import DeviceData, InMemoryData
from engine.streaming import StreamedData

CPU = torch.device("cpu")
DESC = ModelDescription("timm:test_resnet", 4, 3, (3, 32, 32),
                        Preprocessing((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 36, "center", "bicubic"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def _rows(manifest):
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def _write(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_and_parquet_manifests_index_the_same_samples_without_reading_images(folder, tmp_path):
    ds = load_dataset(DatasetSpec("manifest", str(folder)), "f")
    assert ds.images is None and len(ds) == 64 and ds.num_classes == 4
    assert ds.split_sizes() == {"train": 48, "test": 16}
    assert ds.files is not None and ds.files.subject_ids is not None
    assert ds.files.subject_ids[4] == "subject-1"
    assert ds.subjects is not None and ds.subjects.tolist() == ds.files.subject_ids.tolist()
    rows = _rows(folder)
    table = pa.table({k: [r[k] for r in rows] for k in ("sample_id", "path", "split")}
                     | {"label": pa.array([int(r["label"]) for r in rows], pa.int64())})
    pq.write_table(table, folder.parent / "manifest.parquet")
    pds = load_dataset(DatasetSpec("manifest", str(folder.parent / "manifest.parquet")), "p")
    assert pds.fingerprint() == ds.fingerprint()
    assert check_files(ds) == 64


def test_a_million_row_manifest_indexes_without_opening_a_file(tmp_path):
    n = 1_000_000
    table = pa.table({
        "sample_id": pa.array(np.char.add("id-", np.arange(n).astype(str))),
        "path": pa.array(np.char.add("img/", np.arange(n).astype(str))),
        "label": pa.array(np.arange(n) % 10),
    })
    path = tmp_path / "big.parquet"
    pq.write_table(table, path)
    start = time.perf_counter()
    ds = load_dataset(DatasetSpec("manifest", str(path), {"input_size": [3, 64, 64]}), "big")
    print(f"1,000,000-row manifest indexed in {time.perf_counter() - start:.2f} s")
    assert len(ds) == n and ds.num_classes == 10 and ds.input_shape == (3, 64, 64)
    assert ds.indices_of(["id-999999"]).tolist() == [n - 1]


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "images/../../x.png", "C:\\x.png"])
def test_paths_leaving_the_folder_are_refused_by_sample_id(folder, tmp_path, bad):
    rows = _rows(folder)
    rows[5]["path"] = bad
    with pytest.raises(PathOutsideDataset) as info:
        load_dataset(DatasetSpec("manifest", str(_write(tmp_path / "m.csv", rows))), "bad")
    assert info.value.code == "path_outside_dataset" and info.value.ids == [rows[5]["sample_id"]]


def test_a_symlink_out_of_the_folder_is_refused_when_read(folder, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    rows = [{"sample_id": "a", "path": "link.png", "label": 0},
            {"sample_id": "b", "path": "link.png", "label": 1}]
    ds = load_dataset(DatasetSpec("manifest", str(_write(root / "m.csv", rows)),
                                  {"input_size": [3, 8, 8]}), "s")
    with pytest.raises(UnreadableImages, match="outside the dataset folder"):
        check_files(ds)


def test_missing_and_corrupt_files_are_named_at_registration_and_at_job_time(folder, tmp_path):
    rows = _rows(folder)
    # Same images, new folder: two rows point at files that are absent or not images.
    root = tmp_path / "d"
    shutil.copytree(folder.parent / "images", root / "images")
    (root / rows[3]["path"]).unlink()
    (root / rows[7]["path"]).unlink()
    (root / rows[7]["path"]).write_bytes(b"not an image")
    spec = DatasetSpec("manifest", str(_write(root / "m.csv", rows)), {"workers": 0})
    ds = load_dataset(spec, "broken")
    with pytest.raises(UnreadableImages) as info:
        check_files(ds)
    assert info.value.code == "unreadable_images"
    assert info.value.ids == [rows[3]["sample_id"], rows[7]["sample_id"]]
    assert "file not found" in str(info.value)
    data = DeviceData(ds, CPU, DESC)
    assert isinstance(data, StreamedData)
    data.batch(np.array([0, 1, 2]))  # the readable ones are fine
    with pytest.raises(UnreadableImages) as job_error:
        list(data.batches(np.arange(len(ds)), 16))
    assert job_error.value.ids == [rows[3]["sample_id"], rows[7]["sample_id"]]


def test_read_image_matches_the_libraries_eval_transform(folder):
    prep = DESC.preprocessing
    tf = transforms.Compose([
        transforms.Resize(prep.resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(32), transforms.PILToTensor(),
    ])
    for rel in ("images/00000.png", "images/00001.jpg", "images/00002.png", "images/00004.png"):
        ours = read_image(folder.parent / rel, (3, 32, 32), prep)
        with Image.open(folder.parent / rel) as im:
            theirs = tf(im.convert("RGB")).numpy()
        assert ours.shape == (3, 32, 32) and np.array_equal(ours, theirs)
    gray = read_image(folder.parent / "images/00000.png", (1, 20, 24), Preprocessing())
    assert gray.shape == (1, 20, 24)


def _in_memory_twin(ds: Dataset) -> Dataset:
    assert ds.files is not None
    files = ds.files.for_model(DESC)
    images = np.stack([read_image(files.path_of(i), files.input_size, files.preprocessing)
                       for i in range(len(ds))])
    return Dataset(ds.name, ds.ids, ds.labels, ds.splits, images, ds.num_classes)


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_batches_equal_the_in_memory_path(folder, workers):
    ds = load_dataset(DatasetSpec("manifest", str(folder), {"workers": workers}), "f")
    streamed = DeviceData(ds, CPU, DESC)
    memory = DeviceData(_in_memory_twin(ds), CPU, DESC)
    assert isinstance(streamed, StreamedData) and isinstance(memory, InMemoryData)
    assert streamed.dataset.input_shape == memory.dataset.input_shape == (3, 32, 32)
    assert ds.input_shape != (3, 32, 32)  # the view follows the model, the index is untouched
    try:
        idx = np.array([9, 3, 40, 3, 17, 63, 0], dtype=np.int64)
        (xs, ys), (xm, ym) = streamed.batch(idx), memory.batch(idx)
        assert torch.equal(ys, ym) and torch.allclose(xs, xm, atol=1e-6)
        assert abs(float(xs[:, 0].mean()) - float(xm[:, 0].mean())) < 1e-6
        order = np.random.default_rng(0).permutation(len(ds))
        for (a, la), (b, lb) in zip(streamed.batches(order, 10), memory.batches(order, 10), strict=True):
            assert torch.equal(la, lb) and torch.allclose(a, b, atol=1e-6)
            # A batch read inside a pass over batches does not disturb the pass.
            assert torch.equal(streamed.batch(idx[:2])[1], ys[:2])
    finally:
        streamed.close()


def test_manifest_refuses_missing_columns_and_empty_labels(tmp_path):
    path = _write(tmp_path / "m.csv", [{"sample_id": "a", "file": "x.png", "label": 1}])
    with pytest.raises(InvalidInput, match="lacks columns"):
        load_dataset(DatasetSpec("manifest", str(path)), "x")
    path = _write(tmp_path / "n.csv", [{"sample_id": "a", "path": "x.png", "label": ""}])
    with pytest.raises(InvalidInput, match="empty"):
        load_dataset(DatasetSpec("manifest", str(path), {"input_size": [3, 8, 8]}), "x")
