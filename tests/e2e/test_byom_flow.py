"""Bring your own model against real processes: `lethe serve` (uvicorn and a real Celery
worker) on loopback, driven over HTTP with the Python client. A timm model trained in plain
user code on generated PNG and JPEG files is uploaded, imported by the worker process,
unlearned, downloaded and loaded into `timm.create_model` with strict loading; its
predictions equal those of the worker's pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from byom_user import CLASSES, SIZE, manifest_rows, timm_user_model, train_elsewhere, user_batch
from e2e_harness import start_service
from image_folder import write_image_folder
from safetensors.torch import load_file

from engine.checkpoint import load_model
from engine.datasets import DatasetSpec
from engine.jobs import ModelSpec, cached_dataset, device_data
from engine.metrics import infer
from engine.model_desc import ModelDescription

JOB_TIMEOUT_S = 300.0
POLICY = {"max_acc_test_drop": 1.0, "max_gap": None, "max_avg_gap": None}
RECIPE = {"optimizer": "sgd", "lr": 0.01, "epochs": 2, "batch_size": 16, "seed": 0}


def test_a_timm_model_is_imported_unlearned_and_loaded_back_through_real_processes(tmp_path: Path) -> None:
    manifest = write_image_folder(tmp_path / "pets")
    train, test = manifest_rows(manifest, "train"), manifest_rows(manifest, "test")
    upload = tmp_path / "mine.safetensors"
    train_elsewhere(timm_user_model, manifest.parent, [(p, y) for _, p, y in train], "timm:test_resnet",
                    "module.", upload)
    service = start_service({}, tmp_path / "var")
    try:
        client = service.client
        client.register_dataset("pets", "manifest", str(manifest), {"workers": 0})
        created = client.upload_model("pets-net", upload, dataset="pets", architecture="timm:test_resnet",
                                      num_classes=CLASSES, recipe=RECIPE, policy=POLICY,
                                      input_size=list(SIZE))
        assert created["status"] == "importing"
        job = client.wait_for_job(created["job_id"], timeout=JOB_TIMEOUT_S)
        assert job["status"] == "succeeded" and job["kind"] == "import", (job, service.logs())
        model = client.get_model("pets-net")
        assert model["status"] == "ready" and model["latest_version"] == 1

        request = client.create_deletion_request("pets-net", [sid for sid, _, _ in train[:3]])
        done = client.wait_for_request(request["id"], timeout=JOB_TIMEOUT_S)
        assert done["status"] == "succeeded" and done["result_version"] == 2, (done, service.logs())
        assert client.verify_audit()["ok"]
        download = client.download_checkpoint("pets-net", "latest", tmp_path / "out/")
    finally:
        service.stop()

    mine = timm_user_model()
    mine.load_state_dict(load_file(download["path"]), strict=True)
    mine.eval()
    x, _ = user_batch(manifest.parent, [(p, y) for _, p, y in test], "timm:test_resnet")
    with torch.no_grad():
        user_logits = mine(x)
    spec = ModelSpec("timm:test_resnet", CLASSES, DatasetSpec("manifest", str(manifest), {"workers": 0}),
                     description=ModelDescription.from_dict(dict(model["description"] or {})))
    ds = cached_dataset(spec.dataset)
    data = device_data(spec, ds, "cpu")
    try:
        net = load_model(spec.arch, CLASSES, data.dataset.input_shape, download["path"])
        worker_logits = infer(net, data, ds.indices_of([sid for sid, _, _ in test])).logits
    finally:
        data.close()
    assert torch.allclose(worker_logits, user_logits, atol=1e-4), (worker_logits - user_logits).abs().max()
