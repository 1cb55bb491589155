"""Reference statistics in the API: an uploaded v1 schedules the model's reference job in its
registration's transaction; `GET /v1/models/{name}/references` shows it (404 for an unknown
model, `none` when references were off)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.models import AuditEvent, Job
from app.main import create_app


@pytest.fixture(params=["sqlite", "postgresql"])
def ref_deployment(
    request: pytest.FixtureRequest, tmp_path: Path, deployment_factory: Any
) -> Iterator[Any]:
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_database_url")
    dep = deployment_factory(tmp_path, url, references=True, reference_k=4)
    try:
        yield dep
    finally:
        dep.engine.dispose()


def test_an_uploaded_version_one_schedules_references(ref_deployment: Any) -> None:
    dep = ref_deployment
    dep.upload_model("m")
    with dep.sessions() as s:
        jobs = list(s.scalars(select(Job).where(Job.kind == "reference")))
        assert len(jobs) == 1 and jobs[0].status == "queued"
        assert jobs[0].method_options["k"] == 4
        queued = s.scalar(select(AuditEvent).where(AuditEvent.subject == f"job:{jobs[0].id}"))
        assert queued is not None and queued.action == "job.queued"
        job_id = jobs[0].id
    with TestClient(create_app(dep.settings)) as api:
        api.headers["Authorization"] = f"Bearer {dep.admin_key}"
        body = api.get("/v1/models/m/references").json()
        assert body["status"] == "queued" and body["k"] == 4 and body["job_id"] == job_id
        assert body["train_seconds"] is None and body["cost_ratio"] is None  # an upload
        assert api.get("/v1/models/nope/references").status_code == 404
        assert api.get(f"/v1/jobs/{job_id}").json()["kind"] == "reference"


def test_references_off_schedules_nothing(sqlite_deployment: Any) -> None:
    sqlite_deployment.upload_model("m")
    with sqlite_deployment.sessions() as s:
        assert not list(s.scalars(select(Job).where(Job.kind == "reference")))
    with TestClient(create_app(sqlite_deployment.settings)) as api:
        api.headers["Authorization"] = f"Bearer {sqlite_deployment.admin_key}"
        resp = api.get("/v1/models/m/references")
        assert resp.status_code == 200 and resp.json()["status"] == "none"
        api.headers["Authorization"] = "Bearer wrong"
        assert api.get("/v1/models/m/references").status_code == 401
