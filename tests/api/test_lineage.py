"""Lineages across dataset versions, on SQLite and PostgreSQL: a model registered with
`succeeds` on a later version of its predecessor's dataset forgets what that lineage forgot
or was asked to forget, new samples of a forgotten subject included."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.models import SubjectTombstone
from app.main import create_app
from app.services import jobs

# In the tiny dataset sample i is `train` when i % 40 < 30.
OWNERS = {"cust-1": ["s0000", "s0001", "s0002"], "cust-2": ["s0003"], "cust-test": ["s0035"]}
#: What the later snapshot adds: (ID, label, split, subject).
NEW = [("n0001", 0, "train", "cust-1"), ("n0002", 1, "train", "cust-2"),
       ("n0003", 2, "test", "cust-1"), ("n0004", 3, "train", "")]
RECIPE = {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 32, "seed": 0}


def _snapshot(dep: Any, path: Path, *, extra: list[tuple[str, int, str, str]]) -> Path:
    data = dict(np.load(dep.dataset_path))
    owner = {s: subject for subject, ids in OWNERS.items() for s in ids}
    subjects = [owner.get(str(i), "") for i in data["ids"]]
    if extra:
        rng = np.random.default_rng(1)
        data["x"] = np.concatenate([data["x"], rng.integers(0, 255, (len(extra), 28, 28)).astype(np.uint8)])
        data["y"] = np.concatenate([data["y"], [y for _, y, _, _ in extra]]).astype(np.int64)
        data["ids"] = np.concatenate([data["ids"], [i for i, _, _, _ in extra]])
        data["split"] = np.concatenate([data["split"], [s for _, _, s, _ in extra]])
        subjects += [s for _, _, _, s in extra]
    data["subjects"] = np.asarray(subjects)
    np.savez(path, **data)
    return path


@pytest.fixture
def api(deployment: Any, tmp_path: Path) -> Iterator[tuple[TestClient, Any]]:
    with TestClient(create_app(deployment.settings)) as client:
        client.headers["Authorization"] = f"Bearer {deployment.admin_key}"
        v1 = _snapshot(deployment, tmp_path / "v1.npz", extra=[])
        made = client.post("/v1/datasets", json={"name": "v1", "kind": "npz", "uri": str(v1)})
        assert made.status_code == 201, made.text
        deployment.dataset = "v1"
        deployment.upload_model("a")
        yield client, deployment


def _run(dep: Any, job_id: str, make_checkpoint: Any, seed: int) -> Any:
    """Claim a job as a worker would and publish a new version; the ticket."""
    with dep.sessions() as s:
        ticket = jobs.claim_job(s, job_id, "w", store=dep.store, heartbeat_timeout_s=60)
    assert ticket is not None
    assert dep.complete(ticket.job_id, make_checkpoint(seed=seed), teacher_seed=ticket.teacher_seed).published
    return ticket


def _upload(client: TestClient, make_checkpoint: Any, name: str, dataset: str, **meta: Any) -> Any:
    metadata = {"name": name, "dataset": dataset, "architecture": "small_cnn", "num_classes": 4,
                "recipe": RECIPE, "policy": {"max_acc_test_drop": 1.0}, **meta}
    return client.post("/v1/models", data={"metadata": json.dumps(metadata)},
                       files={"checkpoint": ("w.safetensors", make_checkpoint(seed=9))})


def test_a_successor_forgets_what_its_lineage_forgot_or_was_asked_to_forget(
    api: tuple[TestClient, Any], make_checkpoint: Any, tmp_path: Path
) -> None:
    client, dep = api
    # Model `a` forgets subject cust-1 and sample s0010; a request for cust-2 is still queued.
    by_subject = client.post("/v1/deletion-requests", json={"model": "a", "subject_ids": ["cust-1"]}).json()
    _run(dep, by_subject["job_id"], make_checkpoint, seed=1)
    by_sample = client.post("/v1/deletion-requests", json={"model": "a", "sample_ids": ["s0010"]}).json()
    _run(dep, by_sample["job_id"], make_checkpoint, seed=2)
    pending = client.post("/v1/deletion-requests", json={"model": "a", "subject_ids": ["cust-2"]}).json()
    assert pending["status"] == "queued"

    # The next snapshot: a version of v1, with new samples of both subjects.
    v2 = _snapshot(dep, tmp_path / "v2.npz", extra=NEW)
    made = client.post("/v1/datasets", json={"name": "v2", "kind": "npz", "uri": str(v2), "version_of": "v1"})
    assert made.status_code == 201, made.text
    assert made.json()["version_of"] == "v1" and made.json()["num_samples"] == 160 + len(NEW)
    seen = client.get("/v1/datasets/v2/subjects/cust-1").json()  # hashed alike: the key is v1's
    assert seen["sample_count"] == 5 and seen["splits"] == {"train": 4, "test": 1}

    resp = _upload(client, make_checkpoint, "b", "v2", succeeds="a")
    assert resp.status_code == 201, resp.text
    assert resp.json()["succeeds"] == "a" and resp.json()["pending_requests"] == 1
    (carried,) = client.get("/v1/deletion-requests", params={"model": "b"}).json()["items"]
    assert carried["status"] == "queued" and "'a'" in carried["reason"]
    # cust-1's old and new training samples, s0010, and cust-2's (its request is still open);
    # never n0003 (test split) nor n0004 (nobody's).
    expected = ["n0001", "n0002", "s0000", "s0001", "s0002", "s0003", "s0010"]
    assert carried["sample_count"] == len(expected)
    with dep.sessions() as s:
        assert len(s.scalars(select(SubjectTombstone).where(SubjectTombstone.model_id == 2)).all()) == 2
    ticket = _run(dep, carried["job_id"], make_checkpoint, seed=3)
    assert ticket.forget_ids == expected
    assert set(expected) <= set(ticket.forgotten_ids)  # never used for recovery
    assert client.get(f"/v1/deletion-requests/{carried['id']}").json()["status"] == "succeeded"

    # Named again on the successor: already forgotten, done at once.
    again = client.post("/v1/deletion-requests", json={"model": "b", "sample_ids": ["n0001"]}).json()
    assert again["status"] == "succeeded" and again["already_forgotten_count"] == 1
    assert client.get("/v1/models/b").json()["latest_version"] == 2
    events = client.get("/v1/audit", params={"model": "b"}).json()["items"]
    (continued,) = [e for e in events if e["action"] == "model.lineage.continued"]
    assert continued["data"] == {"succeeds": "a", "sample_count": 7, "subject_count": 2,
                                 "request_ids": [carried["id"]]}


def test_a_successor_with_nothing_to_forget_queues_nothing(
    api: tuple[TestClient, Any], make_checkpoint: Any
) -> None:
    client, dep = api
    resp = _upload(client, make_checkpoint, "b", "v1", succeeds="a")  # the same dataset is fine
    assert resp.status_code == 201, resp.text
    assert resp.json()["succeeds"] == "a" and resp.json()["pending_requests"] == 0
    assert client.get("/v1/deletion-requests", params={"model": "b"}).json()["items"] == []


def test_a_lineage_needs_a_known_predecessor_on_a_version_of_its_dataset(
    api: tuple[TestClient, Any], make_checkpoint: Any, tmp_path: Path
) -> None:
    client, dep = api
    for name, dataset, succeeds, says in (("b", "v1", "nobody", "names no model"),
                                          ("c", "tiny", "a", "version_of: 'v1'"),
                                          ("e", "v1", "e", "cannot succeed itself")):
        body = _upload(client, make_checkpoint, name, dataset, succeeds=succeeds)
        assert body.status_code == 422, body.text
        assert body.json()["code"] == "invalid_input" and body.json()["field"] == "succeeds"
        assert says in body.json()["detail"]
        assert client.get(f"/v1/models/{name}").status_code == 404  # nothing stored
    refused = client.post("/v1/datasets", json={"name": "v9", "kind": "npz", "uri": str(dep.dataset_path),
                                                "version_of": "nothing"})
    assert refused.status_code == 422 and refused.json()["field"] == "version_of"
    assert client.get("/v1/datasets/v9").status_code == 404
    # A version of a version still counts (v3 -> v2 -> v1), and a version in between that
    # names no subjects (v2) does not break the key: cust-1 hashes alike in v1 and v3.
    data = dict(np.load(_snapshot(dep, tmp_path / "v2.npz", extra=NEW[:1])))
    del data["subjects"]
    np.savez(tmp_path / "v2.npz", **data)
    v3 = _snapshot(dep, tmp_path / "v3.npz", extra=NEW[:2])
    for name, path, of in (("v2", tmp_path / "v2.npz", "v1"), ("v3", v3, "v2")):
        made = client.post("/v1/datasets",
                           json={"name": name, "kind": "npz", "uri": str(path), "version_of": of})
        assert made.status_code == 201, made.text
    done = client.post("/v1/deletion-requests", json={"model": "a", "subject_ids": ["cust-1"]}).json()
    _run(dep, done["job_id"], make_checkpoint, seed=1)
    successor = _upload(client, make_checkpoint, "d", "v3", succeeds="a")
    assert successor.status_code == 201, successor.text
    (carried,) = client.get("/v1/deletion-requests", params={"model": "d"}).json()["items"]
    assert carried["sample_count"] == 4  # s0000-s0002 and the new n0001


def test_a_successor_trained_by_lethe_forgets_after_its_version_1(
    api: tuple[TestClient, Any], make_checkpoint: Any
) -> None:
    client, dep = api
    done = client.post("/v1/deletion-requests", json={"model": "a", "sample_ids": ["s0004"]}).json()
    _run(dep, done["job_id"], make_checkpoint, seed=1)
    resp = client.post("/v1/models", json={"name": "b", "dataset": "v1", "architecture": "small_cnn",
                                           "num_classes": 4, "recipe": RECIPE, "init": "train",
                                           "succeeds": "a"})
    assert resp.status_code == 202, resp.text
    (carried,) = client.get("/v1/deletion-requests", params={"model": "b"}).json()["items"]
    assert carried["sample_count"] == 1 and carried["job_id"] != resp.json()["job_id"]
    with dep.sessions() as s:  # the train job goes first: the deletion waits for version 1
        assert jobs.claim_job(s, carried["job_id"], "w", store=dep.store, heartbeat_timeout_s=60) is None
