"""Bring your own model: a timm and a torchvision classifier trained in plain user code on a
folder of PNG and JPEG files, imported, unlearned on streamed data, and loaded back into plain
user code with strict loading and the same predictions as the worker's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from byom_user import (
    CLASSES,
    SIZE,
    timm_user_model,
    torchvision_user_model,
    train_elsewhere,
    user_batch,
)
from byom_user import manifest_rows as _rows
from image_folder import write_image_folder
from safetensors.torch import load_file, save_file

from engine.checkpoint import bytes_to_state, load_model
from engine.datasets import DatasetSpec
from engine.errors import CheckpointMismatch, UnreadableImages
from engine.jobs import ModelSpec, cached_dataset, device_data, run_import, run_unlearn
from engine.library_models import describe_model
from engine.metrics import infer
from engine.training import Recipe

CASES = {
    "timm": ("timm:test_resnet", timm_user_model, 1, ""),
    "torchvision": ("torchvision:mobilenet_v3_small", torchvision_user_model, 0, "module."),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("byom"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_library_model_round_trips_through_import_and_unlearning(folder, tmp_path, case):
    arch, make, workers, prefix = CASES[case]
    train, test = _rows(folder, "train"), _rows(folder, "test")
    upload = tmp_path / "mine.safetensors"
    train_elsewhere(make, folder.parent, [(p, y) for _, p, y in train], arch, prefix, upload)

    spec = ModelSpec(arch, CLASSES, DatasetSpec("manifest", str(folder), {"workers": workers}),
                     Recipe(optimizer="sgd", lr=0.01, epochs=2, batch_size=16, seed=0),
                     description=describe_model(arch, CLASSES, input_size=SIZE))
    imported = run_import(spec, upload)
    assert imported.method == "import" and 0.0 <= imported.metrics["acc_test"] <= 1.0
    assert imported.method_config["description"]["input_size"] == list(SIZE)
    # Version 1 holds the library's own keys, whatever prefix the upload carried.
    assert set(bytes_to_state(imported.weights)) == set(make().state_dict())

    forget = [sid for sid, _, _ in train[:4]]
    out = run_unlearn(spec, checkpoint=imported.weights, forget_ids=forget, forgotten_ids=[], seed=3)
    assert out.steps > 0 and {"acc_forget", "acc_test", "feature_distance"} <= set(out.metrics)
    before, after = bytes_to_state(imported.weights), bytes_to_state(out.weights)
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # The download, in plain user code: the library's constructor, safetensors, strict load.
    download = tmp_path / "downloaded.safetensors"
    download.write_bytes(out.weights)
    mine = make()
    mine.load_state_dict(load_file(str(download)), strict=True)
    mine.eval()
    x, _ = user_batch(folder.parent, [(p, y) for _, p, y in test], arch)
    with torch.no_grad():
        user_logits = mine(x)

    # The worker's predictions on the same test samples, read through the streamed pipeline.
    ds = cached_dataset(spec.dataset)
    data = device_data(spec, ds, "cpu")
    try:
        worker_model = load_model(arch, CLASSES, data.dataset.input_shape, out.weights)
        worker = infer(worker_model, data, ds.indices_of([sid for sid, _, _ in test]))
    finally:
        data.close()
    assert torch.allclose(worker.logits, user_logits, atol=1e-4), (worker.logits - user_logits).abs().max()
    assert torch.equal(worker.logits.argmax(1), user_logits.argmax(1))


def test_import_refuses_a_checkpoint_of_another_model_naming_the_keys(folder, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(torchvision_user_model().state_dict(), str(path))
    spec = ModelSpec("timm:test_resnet", CLASSES, DatasetSpec("manifest", str(folder), {"workers": 0}),
                     description=describe_model("timm:test_resnet", CLASSES, input_size=SIZE))
    named = "missing .*conv1.0.weight.*unexpected .*features.0.0.weight"
    with pytest.raises(CheckpointMismatch, match=named):
        run_import(spec, path)


def test_an_unlearning_job_with_a_missing_image_fails_naming_the_sample(folder, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder.parent / "images", root / "images")
    shutil.copy(folder, root / "manifest.csv")
    train = _rows(root / "manifest.csv", "train")
    (root / train[10][1]).unlink()
    upload = tmp_path / "w.safetensors"
    save_file(timm_user_model().state_dict(), str(upload))
    spec = ModelSpec("timm:test_resnet", CLASSES,
                     DatasetSpec("manifest", str(root / "manifest.csv"), {"workers": 0}),
                     Recipe(epochs=1, batch_size=64), describe_model("timm:test_resnet", CLASSES,
                                                                     input_size=SIZE))
    with pytest.raises(UnreadableImages) as info:
        run_unlearn(spec, checkpoint=upload, forget_ids=[train[0][0]], forgotten_ids=[])
    assert info.value.ids == [train[10][0]] and "file not found" in str(info.value)
    assert np.isin(info.value.ids, [sid for sid, _, _ in train]).all()
