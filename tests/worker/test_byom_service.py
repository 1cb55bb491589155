"""Bring your own model through the service: a timm or torchvision classifier trained in plain
user code is uploaded over HTTP for a streamed dataset of real PNG and JPEG files, imported by
the worker, unlearned, and its download loads into plain user code with the worker's
predictions. Refusals: each is a problem detail with its code, and nothing is stored."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from byom_user import (
    CLASSES,
    SIZE,
    manifest_rows,
    timm_user_model,
    torchvision_user_model,
    train_elsewhere,
    user_batch,
)
from fastapi.testclient import TestClient
from image_folder import write_image_folder
from safetensors.torch import load, save_file
from sqlalchemy import func, select

from app.db.models import DatasetRow, Job, ModelRow
from app.main import create_app
from app.services import jobs as job_service
from engine.checkpoint import load_model
from engine.datasets import DatasetSpec
from engine.jobs import ModelSpec, cached_dataset, device_data
from engine.metrics import infer
from engine.model_desc import ModelDescription
from worker.tasks import run_job

LENIENT = {"max_acc_test_drop": 1.0, "max_gap": None, "max_avg_gap": None}
RECIPE = {"optimizer": "sgd", "lr": 0.01, "epochs": 2, "batch_size": 16, "seed": 0}
CASES = {
    "timm": ("timm:test_resnet", timm_user_model, ""),
    "torchvision": ("torchvision:mobilenet_v3_small", torchvision_user_model, "module."),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of PNG (RGB, grayscale, RGBA) and JPEG files of mixed sizes, with its manifest."""
    return write_image_folder(tmp_path_factory.mktemp("pets"))


def _client(dep: Any) -> Iterator[TestClient]:
    with TestClient(create_app(dep.settings)) as client:
        client.headers["Authorization"] = f"Bearer {dep.admin_key}"
        yield client


@pytest.fixture
def api(sqlite_deployment: Any) -> Iterator[TestClient]:
    """The API of the SQLite deployment."""
    yield from _client(sqlite_deployment)


@pytest.fixture
def on_both(deployment: Any) -> Iterator[tuple[Any, TestClient]]:
    """A deployment and its API, once on SQLite and once on PostgreSQL."""
    for client in _client(deployment):
        yield deployment, client


def _register_dataset(api: TestClient, manifest: Path, name: str = "pets") -> Any:
    return api.post("/v1/datasets", json={"name": name, "kind": "manifest", "uri": str(manifest),
                                          "options": {"workers": 0}})


def _upload(api: TestClient, name: str, arch: str, checkpoint: bytes, **meta: Any) -> Any:
    metadata = {"name": name, "dataset": "pets", "architecture": arch, "num_classes": CLASSES,
                "recipe": RECIPE, "policy": LENIENT, **meta}
    return api.post("/v1/models", data={"metadata": json.dumps(metadata)},
                    files={"checkpoint": ("mine.safetensors", checkpoint, "application/octet-stream")})


def _work(dep: Any, job_id: str) -> str:
    """Run one job the way a worker does (claim, engine, publish or fail); its outcome."""
    return run_job(job_id, worker="w1", settings=dep.settings, sessions=dep.sessions,
                   store=dep.store).outcome


def _stored_files(dep: Any, name: str) -> list[Path]:
    folder = Path(dep.settings.store_path) / name
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _problem(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    assert body["code"] == code and body["detail"], body
    return body


def _worker_logits(manifest: Path, model: dict[str, Any], weights: bytes, ids: list[str]) -> torch.Tensor:
    """What the worker's pipeline predicts for `ids`: the stored description, streamed data."""
    spec = ModelSpec(model["architecture"], model["num_classes"],
                     DatasetSpec("manifest", str(manifest), {"workers": 0}),
                     description=ModelDescription.from_dict(model["description"]))
    ds = cached_dataset(spec.dataset)
    data = device_data(spec, ds, "cpu")
    try:
        net = load_model(spec.arch, spec.num_classes, data.dataset.input_shape, weights)
        return infer(net, data, ds.indices_of(ids)).logits
    finally:
        data.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_library_model_goes_through_the_service_and_back_into_user_code(
    case: str, images: Path, sqlite_deployment: Any, api: TestClient, tmp_path: Path
) -> None:
    dep, (arch, make, prefix) = sqlite_deployment, CASES[case]
    train, test = manifest_rows(images, "train"), manifest_rows(images, "test")
    upload = tmp_path / "mine.safetensors"
    train_elsewhere(make, images.parent, [(p, y) for _, p, y in train], arch, prefix, upload)

    assert _register_dataset(api, images).status_code == 201
    resp = _upload(api, "pets-net", arch, upload.read_bytes(), input_size=list(SIZE))
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    assert resp.headers["location"] == f"/v1/jobs/{job_id}"
    model = api.get("/v1/models/pets-net").json()
    assert model["status"] == "importing" and model["latest_version"] is None
    assert model["description"] == {"input_size": list(SIZE)}
    assert api.get(f"/v1/jobs/{job_id}").json()["kind"] == "import"
    # A deletion request sent while the model imports queues behind the import job.
    forget = [sid for sid, _, _ in train[:4]]
    sub = api.post("/v1/deletion-requests", json={"model": "pets-net", "sample_ids": forget})
    assert sub.status_code == 202, sub.text

    assert _work(dep, job_id) == "succeeded", api.get(f"/v1/jobs/{job_id}").json()["error"]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["result_version"] == 1
    assert 0.0 <= job["metrics"]["acc_test"] <= 1.0 and "acc_retain" in job["metrics"]
    model = api.get("/v1/models/pets-net").json()
    assert model["status"] == "ready" and model["latest_version"] == 1 and model["error"] is None
    assert model["description"]["input_size"] == list(SIZE)
    assert model["description"]["preprocessing"]["crop"] == "center"
    v1 = api.get("/v1/models/pets-net/versions/1").json()
    assert v1["method"] == "import" and v1["metrics"]["acc_test"] == job["metrics"]["acc_test"]
    assert len(_stored_files(dep, "pets-net")) == 2  # v1 and its manifest; the upload is gone

    unlearn_job = sub.json()["job_id"]
    assert _work(dep, unlearn_job) == "succeeded", api.get(f"/v1/jobs/{unlearn_job}").json()["error"]
    request = api.get(f"/v1/deletion-requests/{sub.json()['id']}").json()
    assert request["status"] == "succeeded" and request["result_version"] == 2
    assert request["verdict"]["passed"] and "acc_forget" in request["metrics"]
    assert api.get("/v1/audit/verify").json()["ok"] is True

    download = api.get("/v1/models/pets-net/versions/latest/checkpoint")
    assert download.status_code == 200
    assert download.headers["etag"] == f'"{api.get("/v1/models/pets-net/versions/2").json()["sha256"]}"'
    mine = make()
    mine.load_state_dict(load(download.content), strict=True)  # plain user code, no Lethe
    mine.eval()
    x, _ = user_batch(images.parent, [(p, y) for _, p, y in test], arch)
    with torch.no_grad():
        user_logits = mine(x)
    worker_logits = _worker_logits(images, model, download.content, [sid for sid, _, _ in test])
    assert torch.allclose(worker_logits, user_logits, atol=1e-4), (worker_logits - user_logits).abs().max()
    v1_weights = api.get("/v1/models/pets-net/versions/1/checkpoint").content
    assert load(v1_weights).keys() == load(download.content).keys()
    assert any(not torch.equal(a, load(download.content)[k]) for k, a in load(v1_weights).items())


def _assert_nothing_stored(dep: Any, api: TestClient, name: str) -> None:
    assert api.get(f"/v1/models/{name}").status_code == 404
    assert _stored_files(dep, name) == []
    with dep.sessions() as s:
        assert s.scalar(select(ModelRow).where(ModelRow.name == name)) is None


@pytest.mark.parametrize(("arch", "says"), [
    ("timm:no_such_model_xyz", "has no classification model 'no_such_model_xyz'"),
    ("torchvision:fcn_resnet50", "has no classification model 'fcn_resnet50'"),
])
def test_an_unknown_architecture_is_refused_and_nothing_is_stored(
    arch: str, says: str, images: Path, sqlite_deployment: Any, api: TestClient, tmp_path: Path
) -> None:
    assert _register_dataset(api, images).status_code == 201
    path = tmp_path / "w.safetensors"
    save_file(timm_user_model().state_dict(), str(path))
    body = _problem(_upload(api, "m", arch, path.read_bytes()), 422, "unsupported_architecture")
    assert says in body["detail"] and "timm:<name>" in body["detail"]
    _assert_nothing_stored(sqlite_deployment, api, "m")


def test_an_unknown_library_is_a_validation_error_naming_the_field(
    images: Path, sqlite_deployment: Any, api: TestClient, tmp_path: Path
) -> None:
    assert _register_dataset(api, images).status_code == 201
    path = tmp_path / "w.safetensors"
    save_file(timm_user_model().state_dict(), str(path))
    body = _problem(_upload(api, "m", "keras:resnet50", path.read_bytes()), 422, "validation_error")
    assert any(e["loc"][:2] == ["body", "architecture"] for e in body["errors"]), body
    _assert_nothing_stored(sqlite_deployment, api, "m")


def test_a_pickle_named_safetensors_is_refused_and_nothing_is_stored(
    images: Path, sqlite_deployment: Any, api: TestClient
) -> None:
    assert _register_dataset(api, images).status_code == 201
    buffer = io.BytesIO()
    torch.save(timm_user_model().state_dict(), buffer)
    body = _problem(_upload(api, "m", "timm:test_resnet", buffer.getvalue()), 422, "invalid_checkpoint")
    assert "zip archive" in body["detail"] or "pickle" in body["detail"]
    _assert_nothing_stored(sqlite_deployment, api, "m")


def test_description_members_that_disagree_are_refused(
    images: Path, sqlite_deployment: Any, api: TestClient, tmp_path: Path
) -> None:
    assert _register_dataset(api, images).status_code == 201
    path = tmp_path / "w.safetensors"
    save_file(timm_user_model().state_dict(), str(path))
    bad = {"input_size": [3, 32, 32], "preprocessing": {"mean": [0.5, 0.5], "std": [0.2, 0.2]}}
    body = _problem(_upload(api, "m", "timm:test_resnet", path.read_bytes(), **bad), 422, "invalid_input")
    assert "1 or 3 values" in body["detail"]
    _problem(_upload(api, "m", "small_cnn", path.read_bytes(), input_size=[1, 28, 28]), 422,
             "invalid_input")
    _assert_nothing_stored(sqlite_deployment, api, "m")


def _copy_folder(images: Path, root: Path) -> Path:
    shutil.copytree(images.parent / "images", root / "images")
    shutil.copy(images, root / "manifest.csv")
    return root / "manifest.csv"


def _assert_no_dataset(dep: Any, api: TestClient, name: str) -> None:
    assert api.get(f"/v1/datasets/{name}").status_code == 404
    with dep.sessions() as s:
        assert s.scalar(select(DatasetRow).where(DatasetRow.name == name)) is None


def test_a_manifest_row_outside_the_folder_is_refused(
    images: Path, sqlite_deployment: Any, api: TestClient, tmp_path: Path
) -> None:
    manifest = _copy_folder(images, tmp_path / "copy")
    (tmp_path / "secret.png").write_bytes((images.parent / "images" / "00000.png").read_bytes())
    lines = manifest.read_text().splitlines()
    sid = lines[1].split(",")[0]
    lines[1] = lines[1].replace("images/00000.png", "../secret.png")
    manifest.write_text("\n".join(lines) + "\n")
    body = _problem(_register_dataset(api, manifest), 422, "path_outside_dataset")
    assert body["sample_ids"] == [sid] and body["count"] == 1
    _assert_no_dataset(sqlite_deployment, api, "pets")


def test_a_missing_image_file_is_refused_naming_its_sample(
    images: Path, sqlite_deployment: Any, api: TestClient, tmp_path: Path
) -> None:
    manifest = _copy_folder(images, tmp_path / "copy")
    sid, rel, _ = manifest_rows(manifest, "train")[5]
    (manifest.parent / rel).unlink()
    body = _problem(_register_dataset(api, manifest), 422, "unreadable_images")
    assert body["sample_ids"] == [sid] and body["problems"] == {sid: "file not found"}
    _assert_no_dataset(sqlite_deployment, api, "pets")


def _mismatched_checkpoint(path: Path) -> None:
    """A test_resnet checkpoint with one key missing, one extra and a head for 7 classes."""
    state = timm_user_model(num_classes=7).state_dict()
    del state["conv1.0.weight"]
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(path))


def _squeezenet_checkpoint(path: Path) -> None:
    save_file(torchvision.models.squeezenet1_0(num_classes=CLASSES).state_dict(), str(path))


@pytest.mark.parametrize(("arch", "write", "code", "named"), [
    ("timm:test_resnet", _mismatched_checkpoint, "checkpoint_mismatch",
     ["missing 1: conv1.0.weight", "unexpected 1: extra.weight", "fc.weight (file [7,"]),
    ("torchvision:squeezenet1_0", _squeezenet_checkpoint, "head_not_found",
     ["not a linear layer", "classifier[-1]"]),
])
def test_a_failed_import_publishes_nothing_and_fails_the_registration(
    arch: str, write: Any, code: str, named: list[str], images: Path,
    on_both: tuple[Any, TestClient], tmp_path: Path,
) -> None:
    dep, api = on_both
    assert _register_dataset(api, images).status_code == 201
    path = tmp_path / "w.safetensors"
    write(path)
    resp = _upload(api, "m", arch, path.read_bytes(), input_size=list(SIZE))
    assert resp.status_code == 202, resp.text
    assert len(_stored_files(dep, "m")) == 2  # the pending upload and its manifest

    assert _work(dep, resp.json()["job_id"]) == "failed"
    job = api.get(f"/v1/jobs/{resp.json()['job_id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == code and job["result_version"] is None
    for part in named:
        assert part in job["error"]["message"], job["error"]["message"]
    model = api.get("/v1/models/m").json()
    assert model["status"] == "failed" and model["latest_version"] is None
    assert model["error"] == job["error"]
    assert api.get("/v1/models/m/versions").json()["items"] == []
    assert _stored_files(dep, "m") == []

    train = manifest_rows(images, "train")
    refused = api.post("/v1/deletion-requests", json={"model": "m", "sample_ids": [train[0][0]]})
    body = _problem(refused, 409, "model_import_failed")
    assert code in body["detail"] and body["import_error"]["code"] == code
    with dep.sessions() as s:
        assert [j.kind for j in s.scalars(select(Job))] == ["import"]
    actions = [e["action"] for e in api.get("/v1/audit", params={"model": "m"}).json()["items"]]
    assert "model.registration_failed" in actions and "model.version.published" not in actions


def test_a_failed_registration_frees_its_name_for_a_corrected_upload(
    images: Path, on_both: tuple[Any, TestClient], tmp_path: Path
) -> None:
    """The corrected checkpoint registers under the failed one's name, on the same model: the
    failed import stays in its history; a name whose model is not failed stays taken."""
    dep, api = on_both
    assert _register_dataset(api, images).status_code == 201
    bad, good = tmp_path / "bad.safetensors", tmp_path / "good.safetensors"
    _mismatched_checkpoint(bad)
    save_file(timm_user_model().state_dict(), str(good))
    first = _upload(api, "m", "timm:test_resnet", bad.read_bytes(), input_size=list(SIZE)).json()
    assert _work(dep, first["job_id"]) == "failed"
    failed = api.get("/v1/models/m").json()
    assert failed["status"] == "failed"

    again = _upload(api, "m", "timm:test_resnet", good.read_bytes(), input_size=list(SIZE))
    assert again.status_code == 202, again.text
    model = again.json()
    assert model["status"] == "importing" and model["error"] is None and model["job_id"] != first["job_id"]
    _problem(_upload(api, "m", "timm:test_resnet", good.read_bytes()), 409, "already_exists")
    assert _work(dep, model["job_id"]) == "succeeded"
    ready = api.get("/v1/models/m").json()
    assert ready["status"] == "ready" and ready["latest_version"] == 1 and ready["error"] is None
    _problem(_upload(api, "m", "timm:test_resnet", good.read_bytes()), 409, "already_exists")
    with dep.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ModelRow)) == 1
        assert [(j.kind, j.status) for j in s.scalars(select(Job).order_by(Job.position))] == [
            ("import", "failed"), ("import", "succeeded")]
    actions = [e["action"] for e in api.get("/v1/audit", params={"model": "m"}).json()["items"]]
    assert sorted(a for a in actions if a.startswith("model.")) == [
        "model.registered", "model.registered", "model.registration_failed", "model.version.published"]


@pytest.fixture
def with_references(
    images: Path, deployment_factory: Any, tmp_path: Path
) -> Iterator[tuple[Any, TestClient]]:
    """A SQLite deployment with reference jobs on (K = 2) and the image dataset registered."""
    dep = deployment_factory(tmp_path, None, references=True, reference_k=2)
    try:
        for api in _client(dep):
            assert _register_dataset(api, images).status_code == 201
            yield dep, api
    finally:
        dep.engine.dispose()


def test_a_failed_name_waits_for_its_stopping_reference_job(
    with_references: tuple[Any, TestClient], tmp_path: Path
) -> None:
    dep, api = with_references
    path = tmp_path / "w.safetensors"
    _mismatched_checkpoint(path)
    resp = _upload(api, "m", "timm:test_resnet", path.read_bytes(), input_size=list(SIZE)).json()
    ref_job = api.get("/v1/models/m/references").json()["job_id"]
    with dep.sessions() as s:  # the reference job runs when the import fails
        assert job_service.claim_job(s, ref_job, "w-ref", store=dep.store, heartbeat_timeout_s=60)
    assert _work(dep, resp["job_id"]) == "failed"
    assert api.get(f"/v1/jobs/{ref_job}").json()["cancel_requested"] is True
    save_file(timm_user_model().state_dict(), str(path))
    body = _problem(_upload(api, "m", "timm:test_resnet", path.read_bytes()), 409, "already_exists")
    assert "still stopping" in body["detail"]
    with dep.sessions() as s:
        job_service.mark_cancelled(s, ref_job, actor="worker:w-ref")  # its worker stops
    assert _upload(api, "m", "timm:test_resnet", path.read_bytes()).status_code == 202


def test_a_failed_import_cancels_the_reference_job_its_registration_queued(
    with_references: tuple[Any, TestClient], tmp_path: Path
) -> None:
    dep, api = with_references
    path = tmp_path / "w.safetensors"
    _mismatched_checkpoint(path)
    resp = _upload(api, "m", "timm:test_resnet", path.read_bytes(), input_size=list(SIZE))
    assert resp.status_code == 202, resp.text
    references = api.get("/v1/models/m/references").json()
    assert references["status"] == "queued" and references["k"] == 2

    assert _work(dep, resp.json()["job_id"]) == "failed"
    assert api.get("/v1/models/m/references").json()["status"] == "cancelled"
    assert api.get(f"/v1/jobs/{references['job_id']}").json()["status"] == "cancelled"
    assert _work(dep, references["job_id"]) == "skipped"


def test_cancelling_a_queued_import_fails_the_registration_and_removes_the_upload(
    images: Path, sqlite_deployment: Any, api: TestClient, tmp_path: Path
) -> None:
    assert _register_dataset(api, images).status_code == 201
    path = tmp_path / "w.safetensors"
    save_file(timm_user_model().state_dict(), str(path))
    job_id = _upload(api, "m", "timm:test_resnet", path.read_bytes()).json()["job_id"]
    assert len(_stored_files(sqlite_deployment, "m")) == 2
    resp = api.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
    model = api.get("/v1/models/m").json()
    assert model["status"] == "failed" and model["error"]["code"] == "cancelled"
    assert _stored_files(sqlite_deployment, "m") == []
    assert _work(sqlite_deployment, job_id) == "skipped"


@pytest.mark.parametrize("cancelled", [False, True])
def test_an_import_whose_workers_were_lost_removes_its_upload(
    cancelled: bool, images: Path, sqlite_deployment: Any, api: TestClient, tmp_path: Path
) -> None:
    """The sweeper's claim ends an import whose worker was lost (after too many attempts, or
    after a cancellation its worker never saw): no worker is left to remove the upload, so
    the ending does."""
    dep = sqlite_deployment
    assert _register_dataset(api, images).status_code == 201
    path = tmp_path / "w.safetensors"
    save_file(timm_user_model().state_dict(), str(path))
    job_id = _upload(api, "m", "timm:test_resnet", path.read_bytes()).json()["job_id"]
    with dep.sessions() as s:
        assert job_service.claim_job(s, job_id, "w-dead", store=dep.store, heartbeat_timeout_s=30.0)
    if cancelled:
        assert api.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    assert len(_stored_files(dep, "m")) == 2  # still pending: the job runs, as far as anyone knows
    with dep.sessions() as s:  # w-dead's heartbeat is now older than the timeout
        assert job_service.claim_job(s, job_id, "w2", store=dep.store, heartbeat_timeout_s=0.0,
                                     max_attempts=1) is None
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == ("cancelled" if cancelled else "failed")
    assert cancelled or job["error"]["code"] == "too_many_attempts"
    assert api.get("/v1/models/m").json()["status"] == "failed"
    assert _stored_files(dep, "m") == []


def test_a_re_attempted_import_keeps_its_upload_and_publishes(
    images: Path, sqlite_deployment: Any, api: TestClient, tmp_path: Path
) -> None:
    """An import whose worker died is claimed again; the re-attempt's store cleaning keeps
    the pending upload (its job still runs), and the store ends with version 1's files only."""
    dep = sqlite_deployment
    assert _register_dataset(api, images).status_code == 201
    path = tmp_path / "w.safetensors"
    save_file({"module." + k: v for k, v in timm_user_model().state_dict().items()}, str(path))
    job_id = _upload(api, "m", "timm:test_resnet", path.read_bytes(), input_size=list(SIZE)).json()["job_id"]
    with dep.sessions() as s:
        assert job_service.claim_job(s, job_id, "w-dead", store=dep.store, heartbeat_timeout_s=30.0)
    settings = dep.settings.model_copy(update={"heartbeat_timeout_s": 0.0})  # w-dead is dead
    run = run_job(job_id, worker="w2", settings=settings, sessions=dep.sessions, store=dep.store)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert run.outcome == "succeeded" and job["attempts"] == 2, job["error"]
    v1 = api.get("/v1/models/m/versions/1").json()
    on_disk = [p.name for p in _stored_files(dep, "m")]
    assert len(on_disk) == 2 and f"{v1['sha256']}.safetensors" in on_disk
