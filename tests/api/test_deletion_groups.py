"""Requests naming several models on SQLite and PostgreSQL: `models: [...]` and `model: "*"`
fan out to one deletion request (and job) per model, reported together by the group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.db.models import DeletionRequest, DeletionRequestGroup, Job
from app.errors import DatasetWithoutSubjects, InvalidInput, ModelNotFound
from app.main import create_app
from app.services import deletion_groups, deletions, jobs

# In the tiny dataset sample i is `train` when i % 40 < 30.
OWNERS = {"cust-1": ["s0000", "s0001", "s0002"], "cust-test": ["s0035"]}


@pytest.fixture
def dep(deployment: Any, tmp_path: Path) -> Any:
    """Model `plain` on the tiny dataset (no subjects); `a` and `b` on a copy with subjects."""
    deployment.upload_model("plain")
    deployment.register_with_subjects("subj", OWNERS)
    deployment.upload_model("a")
    deployment.upload_model("b")
    return deployment


def _submit(dep: Any, **kw: Any) -> Any:
    with dep.sessions() as s:
        return deletions.submit_deletion_request(s, principal=dep.principal, settings=dep.settings, **kw)


def _count(dep: Any, model: Any, *where: Any) -> int:
    with dep.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_every_model_holding_the_subject_gets_a_request_and_a_job(dep: Any) -> None:
    with TestClient(create_app(dep.settings)) as client:
        client.headers["Authorization"] = f"Bearer {dep.admin_key}"
        sent = client.post("/v1/deletion-requests",
                           json={"model": "*", "subject_ids": ["cust-1"], "subject_ref": "dsr-7"})
        assert sent.status_code == 202, sent.text
        group = sent.json()
        assert sent.headers["location"] == f"/v1/deletion-request-groups/{group['id']}"
        again = client.get(sent.headers["location"])
    assert again.status_code == 200 and again.json() == group
    assert group["models"] == ["*"] and group["status"] == "queued" and group["subject_ref"] == "dsr-7"
    assert [r["model"] for r in group["requests"]] == ["a", "b"]  # `plain` knows no subjects
    assert {r["group_id"] for r in group["requests"]} == {group["id"]}
    assert all(r["sample_count"] == 3 and r["status"] == "queued" for r in group["requests"])
    assert len({r["job_id"] for r in group["requests"]}) == 2
    assert _count(dep, Job, Job.kind == "unlearn", Job.status == "queued") == 2


def test_the_group_status_follows_its_requests(dep: Any, make_checkpoint: Any) -> None:
    sub = _submit(dep, models=["b", "a"], subject_ids=["cust-1"])
    assert sorted(sub.job_ids) == sorted(r["job_id"] for r in sub.body["requests"])
    by_model = {r["model"]: r for r in sub.body["requests"]}
    with dep.sessions() as s:
        ticket = jobs.claim_job(s, by_model["a"]["job_id"], "w", store=dep.store, heartbeat_timeout_s=60)
    assert ticket is not None
    with dep.sessions() as s:
        assert deletion_groups.get_group(s, sub.body["id"])["status"] == "queued"  # b still waits
    with dep.sessions() as s:
        deletions.cancel_deletion_request(s, by_model["b"]["id"], actor="t")
        assert deletion_groups.get_group(s, sub.body["id"])["status"] == "running"
    assert dep.complete(ticket.job_id, make_checkpoint()).published
    with dep.sessions() as s:
        done = deletion_groups.get_group(s, sub.body["id"])
    assert done["status"] == "succeeded"
    assert {r["model"]: r["status"] for r in done["requests"]} == {"a": "succeeded", "b": "cancelled"}


def test_a_subject_no_model_holds_succeeds_at_once_and_samples_reach_every_dataset(dep: Any) -> None:
    nobody = _submit(dep, model="*", subject_ids=["cust-test"])
    assert nobody.body["status"] == "succeeded" and nobody.body["requests"] == [] and nobody.job_ids == []
    both = _submit(dep, model="*", sample_ids=["s0005"])  # the two datasets share sample IDs
    assert [r["model"] for r in both.body["requests"]] == ["a", "b", "plain"]


def test_a_refused_model_loses_the_whole_group(dep: Any) -> None:
    with pytest.raises(DatasetWithoutSubjects):
        _submit(dep, models=["a", "plain"], subject_ids=["cust-1"])
    with pytest.raises(ModelNotFound) as missing:
        _submit(dep, models=["a", "nope"], subject_ids=["cust-1"])
    assert missing.value.problem()["models"] == ["nope"]
    with pytest.raises(InvalidInput):
        _submit(dep, model="a", models=["b"], subject_ids=["cust-1"])
    with pytest.raises(InvalidInput):
        _submit(dep, subject_ids=["cust-1"])
    with pytest.raises(InvalidInput):
        _submit(dep, models=["a", "*"], subject_ids=["cust-1"])
    assert _count(dep, DeletionRequest) == 0 and _count(dep, DeletionRequestGroup) == 0


def test_a_group_replays_under_its_idempotency_key(dep: Any) -> None:
    first = _submit(dep, model="*", subject_ids=["cust-1"], idempotency_key="k-group")
    again = _submit(dep, model="*", subject_ids=["cust-1"], idempotency_key="k-group")
    assert again.replayed and again.body == first.body and again.job_ids == []
    assert _count(dep, DeletionRequest) == 2


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], "succeeded"),
        (["queued", "accepted"], "accepted"),
        (["running", "queued"], "queued"),
        (["running", "succeeded"], "running"),
        (["succeeded", "cancelled"], "succeeded"),
        (["succeeded", "failed"], "failed"),
        (["cancelled", "cancelled"], "cancelled"),
    ],
)
def test_summed_status(statuses: list[str], expected: str) -> None:
    assert deletion_groups.summed_status(statuses) == expected
