"""Data subjects on SQLite and PostgreSQL: hashed storage, look-ups, deletion by subject
(resolution, counts, digests, audit), a subject without training samples, tombstones."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.db.models import (
    AuditEvent,
    DatasetRow,
    DeletionRequest,
    Job,
    RequestSample,
    SubjectSample,
    SubjectTombstone,
)
from app.errors import DatasetWithoutSubjects, DuplicateSubjectIds, InvalidInput
from app.main import create_app
from app.services import jobs

# In the tiny dataset sample i is `train` when i % 40 < 30.
SUBJECTS = {
    "alice@example.com": ["s0000", "s0001", "s0002", "s0003", "s0004", "s0035", "s0036"],
    "bob": ["s0040", "s0041", "s0042"],
    "carol": ["s0038", "s0039"],  # held-out samples only: never trained on
}
TRAIN_OF = {
    "alice@example.com": ["s0000", "s0001", "s0002", "s0003", "s0004"],
    "bob": ["s0040", "s0041", "s0042"],
    "carol": [],
}


def _digest(values: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(values)).encode()).hexdigest()


def _count(dep: Any, model: Any, *where: Any) -> int:
    with dep.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_subjects_are_stored_hashed_with_a_key_per_dataset(deployment: Any, tmp_path: Path) -> None:
    deployment.register_with_subjects("subj", SUBJECTS)
    deployment.register_with_subjects("subj2", SUBJECTS)
    with deployment.sessions() as s:
        rows = {d.name: d for d in s.scalars(select(DatasetRow))}
        stored = s.execute(
            select(SubjectSample.dataset_id, SubjectSample.subject_hash, SubjectSample.sample_id)
        ).all()
    keys = {name: rows[name].subject_key for name in ("subj", "subj2")}
    assert rows["tiny"].subject_key is None and None not in keys.values()
    assert keys["subj"] != keys["subj2"]
    assert len(stored) == 2 * sum(len(v) for v in SUBJECTS.values())
    def mac(name: str, subject: str) -> str:
        return hmac.new(bytes.fromhex(str(keys[name])), subject.encode(), hashlib.sha256).hexdigest()

    expected = {
        (rows[name].id, mac(name, subject), s)
        for name in keys
        for subject, ids in SUBJECTS.items()
        for s in ids
    }
    assert set(stored) == expected
    clear = set(SUBJECTS)
    assert not any(h in clear for _, h, _ in stored)


def test_a_subject_is_looked_up_by_split_over_http(deployment: Any, tmp_path: Path) -> None:
    deployment.register_with_subjects("subj", SUBJECTS)
    with TestClient(create_app(deployment.settings)) as client:
        client.headers["Authorization"] = f"Bearer {deployment.admin_key}"
        alice = client.get("/v1/datasets/subj/subjects/alice@example.com")
        nobody = client.get("/v1/datasets/subj/subjects/nobody")
        plain = client.get("/v1/datasets/tiny/subjects/alice@example.com")
        missing = client.get("/v1/datasets/nope/subjects/alice")
    assert alice.status_code == 200
    assert alice.json() == {
        "dataset": "subj",
        "subject_id": "alice@example.com",
        "dataset_has_subjects": True,
        "sample_count": 7,
        "splits": {"train": 5, "test": 2},
    }
    assert nobody.json()["sample_count"] == 0 and nobody.json()["splits"] == {"train": 0, "test": 0}
    assert plain.json()["dataset_has_subjects"] is False
    assert missing.status_code == 404 and missing.json()["code"] == "dataset_not_found"


def test_a_request_by_subject_resolves_to_its_training_samples(deployment: Any, tmp_path: Path) -> None:
    deployment.register_with_subjects("subj", SUBJECTS)
    deployment.upload_model("m")
    sub = deployment.submit("m", [], subject_ids=["alice@example.com", "bob"], subject_ref="dsr-9")
    body = sub.body
    expected = sorted(TRAIN_OF["alice@example.com"] + TRAIN_OF["bob"])
    assert body["status"] == "queued" and body["sample_count"] == 8 and sub.enqueue_job_id
    summary = body["subjects"]
    assert summary["subject_count"] == 2 and summary["subjects_without_samples"] == 0
    assert summary["resolved_sample_count"] == 8 and summary["resolved_only_count"] == 8
    assert summary["resolved_sample_ids_sha256"] == _digest(expected)
    with deployment.sessions() as s:
        named = sorted(
            s.scalars(select(RequestSample.sample_id).where(RequestSample.request_id == body["id"]))
        )
        event = s.scalar(
            select(AuditEvent)
            .where(AuditEvent.request_id == body["id"])
            .where(AuditEvent.action == "request.accepted")
        )
        ticket = jobs.claim_job(s, sub.enqueue_job_id, "w", store=deployment.store, heartbeat_timeout_s=60)
    assert named == expected
    assert event is not None and "alice" not in event.data
    data = json.loads(event.data)
    assert data["subjects"] == summary and data["sample_ids_sha256"] == _digest(expected)
    assert ticket is not None and ticket.forget_ids == expected


def test_samples_and_subjects_together_are_counted_once(deployment: Any, tmp_path: Path) -> None:
    deployment.register_with_subjects("subj", SUBJECTS)
    deployment.upload_model("m")
    sub = deployment.submit("m", ["s0001", "s0010"], subject_ids=["alice@example.com"])
    assert sub.body["sample_count"] == 6
    assert sub.body["subjects"]["resolved_sample_count"] == 5
    assert sub.body["subjects"]["resolved_only_count"] == 4


def test_a_subject_without_training_samples_succeeds_at_once(deployment: Any, tmp_path: Path) -> None:
    deployment.register_with_subjects("subj", SUBJECTS)
    deployment.upload_model("m")
    sub = deployment.submit("m", None, subject_ids=["carol", "unknown-person"])
    body = sub.body
    assert body["status"] == "succeeded" and sub.enqueue_job_id is None and body["job_id"] is None
    assert body["sample_count"] == 0 and body["result_version"] == 1
    assert body["subjects"]["subjects_without_samples"] == 2
    assert _count(deployment, Job, Job.kind == "unlearn") == 0
    with deployment.sessions() as s:
        note = s.scalar(
            select(AuditEvent.data)
            .where(AuditEvent.request_id == body["id"])
            .where(AuditEvent.action == "request.succeeded")
        )
    assert note is not None and json.loads(note)["note"] == "the named subjects have no training samples"
    assert _count(deployment, SubjectTombstone) == 2


def test_subject_refusals_lose_nothing(deployment: Any, tmp_path: Path) -> None:
    deployment.upload_model("plain")
    with pytest.raises(DatasetWithoutSubjects) as err:
        deployment.submit("plain", None, subject_ids=["alice@example.com"])
    assert err.value.status == 422 and err.value.code == "dataset_without_subjects"
    deployment.register_with_subjects("subj", SUBJECTS)
    deployment.upload_model("m")
    with pytest.raises(DuplicateSubjectIds):
        deployment.submit("m", None, subject_ids=["bob", "bob"])
    with pytest.raises(InvalidInput) as none:
        deployment.submit("m", None)
    assert none.value.code == "invalid_input"
    assert _count(deployment, DeletionRequest) == 0


def test_a_forgotten_subject_is_tombstoned_for_the_lineage(
    deployment: Any, tmp_path: Path, make_checkpoint: Any
) -> None:
    deployment.register_with_subjects("subj", SUBJECTS)
    deployment.upload_model("m")
    first = deployment.submit("m", None, subject_ids=["bob"])
    with deployment.sessions() as s:
        ticket = jobs.claim_job(s, first.enqueue_job_id, "w", store=deployment.store, heartbeat_timeout_s=60)
    assert ticket is not None
    assert _count(deployment, SubjectTombstone) == 0  # not before the request succeeds
    result = deployment.complete(ticket.job_id, make_checkpoint())
    assert result.published
    with deployment.sessions() as s:
        tomb = s.scalars(select(SubjectTombstone)).one()
    assert tomb.request_id == first.body["id"]
    again = deployment.submit("m", ["s0041"], subject_ids=["bob"])
    assert again.body["status"] == "succeeded" and again.body["already_forgotten_count"] == 3
    later = deployment.submit("m", ["s0010"])
    with deployment.sessions() as s:
        nxt = jobs.claim_job(s, later.enqueue_job_id, "w", store=deployment.store, heartbeat_timeout_s=60)
    assert nxt is not None and set(TRAIN_OF["bob"]) <= set(nxt.forgotten_ids)
    assert _count(deployment, SubjectTombstone) == 1
