"""The HTTP contract (API.md) through `create_app` on SQLite and PostgreSQL: auth and scopes,
problem+json, deletion requests, jobs, datasets, models and uploads, downloads with
Range/ETag, audit list/verify/export (with tampering), and the operations endpoints."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.main import create_app
from app.services import jobs

PROBLEM = "application/problem+json"


@pytest.fixture
def api(deployment: Any) -> Iterator[tuple[TestClient, Any]]:
    app = create_app(deployment.settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {deployment.admin_key}"
        yield client, deployment


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _upload(client: TestClient, name: str, data: bytes, **meta: Any) -> Any:
    metadata = {
        "name": name,
        "dataset": "tiny",
        "architecture": "small_cnn",
        "num_classes": 4,
        "policy": {"max_acc_test_drop": 1.0, "max_gap": None, "max_avg_gap": None},
    }
    metadata.update(meta)
    return client.post(
        "/v1/models",
        data={"metadata": json.dumps(metadata)},
        files={"checkpoint": ("m.safetensors", data, "application/octet-stream")},
    )


def _is_problem(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = resp.json()
    for key in ("type", "title", "status", "detail", "code"):
        assert key in body
    assert body["status"] == status
    if code:
        assert body["code"] == code
    assert "Traceback" not in resp.text
    return body


ENDPOINTS = [
    ("POST", "/v1/deletion-requests", "deletions:write"),
    ("GET", "/v1/deletion-requests", "deletions:read"),
    ("GET", "/v1/deletion-requests/dr_x", "deletions:read"),
    ("POST", "/v1/deletion-requests/dr_x/cancel", "deletions:write"),
    ("GET", "/v1/jobs", "deletions:read"),
    ("GET", "/v1/jobs/job_x", "deletions:read"),
    ("POST", "/v1/jobs/job_x/cancel", "deletions:write"),
    ("POST", "/v1/datasets", "admin"),
    ("GET", "/v1/datasets", "models:read"),
    ("GET", "/v1/datasets/tiny", "models:read"),
    ("GET", "/v1/datasets/tiny/samples", "models:read"),
    ("POST", "/v1/models", "models:write"),
    ("GET", "/v1/models", "models:read"),
    ("GET", "/v1/models/m", "models:read"),
    ("GET", "/v1/models/m/versions", "models:read"),
    ("GET", "/v1/models/m/versions/1", "models:read"),
    ("GET", "/v1/models/m/versions/1/manifest", "models:read"),
    ("GET", "/v1/models/m/versions/1/checkpoint", "models:download"),
    ("GET", "/v1/audit", "audit:read"),
    ("GET", "/v1/audit/verify", "audit:read"),
    ("GET", "/v1/audit/export", "audit:read"),
]


def test_auth_matrix(api: tuple[TestClient, Any], make_checkpoint: Any) -> None:
    client, dep = api
    assert _upload(client, "m", make_checkpoint()).status_code == 201
    from app.services.apikeys import SCOPES, revoke_api_key

    keys = {scope: dep.key([scope], name=f"only-{scope}") for scope in SCOPES if scope != "admin"}
    revoked = dep.key(list(SCOPES), name="revoked")
    with dep.sessions() as s:
        revoke_api_key(s, "revoked")
    anon = TestClient(client.app)
    for method, path, scope in ENDPOINTS:
        _is_problem(anon.request(method, path), 401, "unauthorized")
        assert anon.request(method, path).headers.get("www-authenticate") == "Bearer"
        _is_problem(anon.request(method, path, headers=_auth("lethe_wrong")), 401)
        _is_problem(anon.request(method, path, headers={"Authorization": "Basic x"}), 401)
        _is_problem(anon.request(method, path, headers=_auth(revoked)), 401)
        for held, key in keys.items():
            resp = anon.request(method, path, headers=_auth(key))
            if held == scope:
                assert resp.status_code not in (401, 403), (method, path, held, resp.text)
            else:
                _is_problem(resp, 403, "forbidden")
        resp = anon.request(method, path, headers=_auth(dep.admin_key))
        assert resp.status_code not in (401, 403, 500), (method, path, resp.text)


def test_keys_are_stored_hashed(api: tuple[TestClient, Any]) -> None:
    _, dep = api
    with dep.engine.connect() as conn:
        dump = " ".join(str(r) for r in conn.execute(text("SELECT * FROM api_keys")))
        audit_dump = " ".join(str(r) for r in conn.execute(text("SELECT data FROM audit_events")))
    assert dep.admin_key not in dump and dep.admin_key not in audit_dump
    assert hashlib.sha256(dep.admin_key.encode()).hexdigest() in dump


def test_deletion_request_http_flow(api: tuple[TestClient, Any], make_checkpoint: Any) -> None:
    client, dep = api
    _upload(client, "m", make_checkpoint())
    train, test = dep.ids()
    body = {"model": "m", "sample_ids": train[:10], "subject_ref": "dsr-9"}
    resp = client.post("/v1/deletion-requests", json=body, headers={"Idempotency-Key": "abc"})
    assert resp.status_code == 202, resp.text
    created = resp.json()
    assert resp.headers["location"] == f"/v1/deletion-requests/{created['id']}"
    assert created["status"] == "queued" and created["sample_count"] == 10
    replay = client.post("/v1/deletion-requests", json=body, headers={"Idempotency-Key": "abc"})
    assert replay.status_code == 202 and replay.json() == created
    assert replay.headers["idempotent-replayed"] == "true"
    mismatch = client.post(
        "/v1/deletion-requests",
        json={**body, "sample_ids": train[:11]},
        headers={"Idempotency-Key": "abc"},
    )
    _is_problem(mismatch, 422, "idempotency_key_mismatch")
    got = client.get(f"/v1/deletion-requests/{created['id']}").json()
    assert got == created
    listed = client.get("/v1/deletion-requests", params={"subject_ref": "dsr-9"}).json()
    assert [r["id"] for r in listed["items"]] == [created["id"]] and listed["next_cursor"] is None
    job = client.get(f"/v1/jobs/{created['job_id']}").json()
    assert job["status"] == "queued" and job["request_ids"] == [created["id"]]
    assert client.get("/v1/jobs", params={"model": "m"}).json()["items"][0]["id"] == job["id"]
    cancelled = client.post(f"/v1/deletion-requests/{created['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    _is_problem(client.post(f"/v1/deletion-requests/{created['id']}/cancel"), 409, "not_cancellable")
    assert client.get(f"/v1/jobs/{created['job_id']}").json()["status"] == "cancelled"
    _is_problem(client.post(f"/v1/jobs/{created['job_id']}/cancel"), 409, "not_cancellable")
    _is_problem(client.get("/v1/deletion-requests/dr_missing"), 404, "request_not_found")
    _is_problem(client.get("/v1/jobs/job_missing"), 404, "job_not_found")

    bad = client.post("/v1/deletion-requests", json={"model": "m", "sample_ids": test[:2]})
    assert _is_problem(bad, 422, "test_split_samples")["sample_ids"] == sorted(test[:2])
    unknown = client.post("/v1/deletion-requests", json={"model": "m", "sample_ids": ["zz"]})
    assert _is_problem(unknown, 422, "unknown_sample_ids")["count"] == 1
    _is_problem(
        client.post("/v1/deletion-requests", json={"model": "x", "sample_ids": ["a"]}),
        404,
        "model_not_found",
    )
    dup = client.post("/v1/deletion-requests", json={"model": "m", "sample_ids": ["a", "a"]})
    _is_problem(dup, 422, "duplicate_sample_ids")


def test_validation_errors_list_every_field(api: tuple[TestClient, Any]) -> None:
    client, _ = api
    resp = client.post(
        "/v1/deletion-requests", json={"sample_ids": "nope", "verify": "sometimes", "extra": 1}
    )
    body = _is_problem(resp, 422, "validation_error")
    fields = {tuple(e["loc"]) for e in body["errors"]}
    assert ("body", "model") in fields and ("body", "sample_ids") in fields
    assert ("body", "verify") in fields and ("body", "extra") in fields
    _is_problem(
        client.post(
            "/v1/deletion-requests",
            content=b"{not json",
            headers={"content-type": "application/json"},
        ),
        422,
    )


def test_oversized_bodies_and_id_lists_are_413(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    dep.settings.max_ids_per_request = 3
    _upload(client, "m", b"")  # refused; the model does not exist
    resp = client.post(
        "/v1/deletion-requests",
        json={"model": "m", "sample_ids": ["a"] * 0 + [f"x{i}" for i in range(4)]},
    )
    assert resp.status_code in (404, 413)
    big = client.post(
        "/v1/deletion-requests",
        content=b"x" * (dep.settings.max_body_bytes + 1),
        headers={"content-type": "application/json"},
    )
    _is_problem(big, 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        for _ in range(dep.settings.max_body_bytes // 65536 + 2):
            yield b" " * 65536

    streamed = client.post(
        "/v1/deletion-requests", content=chunks(), headers={"content-type": "application/json"}
    )
    _is_problem(streamed, 413, "payload_too_large")


def test_too_many_ids_is_413(api: tuple[TestClient, Any], make_checkpoint: Any) -> None:
    client, dep = api
    _upload(client, "m", make_checkpoint())
    dep.settings.max_ids_per_request = 3
    train, _ = dep.ids()
    resp = client.post("/v1/deletion-requests", json={"model": "m", "sample_ids": train[:4]})
    _is_problem(resp, 413, "payload_too_large")


def test_datasets_endpoints(api: tuple[TestClient, Any], tmp_path: Any) -> None:
    client, dep = api
    listed = client.get("/v1/datasets").json()
    assert [d["name"] for d in listed["items"]] == ["tiny"]
    tiny = client.get("/v1/datasets/tiny").json()
    assert tiny["num_samples"] == 160 and tiny["num_classes"] == 4
    # The test split's halves: `calibration` (methods may read it), `audit` (only verification).
    assert tiny["splits"] == {"train": 120, "test": 40, "calibration": 20, "audit": 20}
    page = client.get("/v1/datasets/tiny/samples", params={"split": "test", "label": 2, "limit": 4}).json()
    assert len(page["items"]) == 4 and page["next_cursor"]
    assert all(s["split"] == "test" and s["label"] == 2 for s in page["items"])
    rest = client.get(
        "/v1/datasets/tiny/samples",
        params={"split": "test", "label": 2, "cursor": page["next_cursor"]},
    ).json()
    assert len(page["items"]) + len(rest["items"]) == 10
    created = client.post(
        "/v1/datasets", json={"name": "digits", "kind": "npz", "uri": str(dep.dataset_path)}
    )
    assert created.status_code == 201 and created.json()["num_samples"] == 160
    _is_problem(
        client.post("/v1/datasets", json={"name": "digits", "kind": "npz", "uri": str(dep.dataset_path)}),
        409,
    )
    # The kinds are an enum of the document: an unknown one is a validation error naming `kind`.
    unknown_kind = _is_problem(client.post("/v1/datasets", json={"name": "x", "kind": "nope"}), 422)
    assert unknown_kind["code"] == "validation_error" and "body.kind" in unknown_kind["detail"]
    _is_problem(
        client.post("/v1/datasets", json={"name": "y", "kind": "npz", "uri": str(tmp_path / "missing.npz")}),
        422,
    )
    _is_problem(client.post("/v1/datasets", json={"name": "../etc", "kind": "npz"}), 422)
    _is_problem(client.get("/v1/datasets/nope"), 404, "dataset_not_found")


def test_model_registration_and_bad_uploads(api: tuple[TestClient, Any], make_checkpoint: Any) -> None:
    client, dep = api
    good = make_checkpoint()
    created = _upload(client, "m", good)
    assert created.status_code == 201, created.text
    model = created.json()
    assert model["latest_version"] == 1 and model["forgotten_count"] == 0
    assert model["pending_requests"] == 0 and model["policy"]["max_acc_test_drop"] == 1.0
    _is_problem(_upload(client, "m", good), 409, "already_exists")
    before = sorted(p for p in dep.store.root.rglob("*") if p.is_file())
    for name, data, code in [
        ("p1", pickle.dumps({"w": 1}), "invalid_checkpoint"),
        ("p2", good[:-100], "invalid_checkpoint"),
        ("p3", make_checkpoint(num_classes=5), "invalid_checkpoint"),
    ]:
        _is_problem(_upload(client, name, data), 422, code)
    _is_problem(_upload(client, "p4", good, architecture="vgg99"), 422)
    for bad_name in ("../evil", "a/b", ".x"):
        _is_problem(_upload(client, bad_name, good), 422)
    after = sorted(p for p in dep.store.root.rglob("*") if p.is_file())
    assert after == before
    assert [m["name"] for m in client.get("/v1/models").json()["items"]] == ["m"]
    train = client.post(
        "/v1/models",
        json={
            "name": "t",
            "dataset": "tiny",
            "architecture": "small_cnn",
            "num_classes": 4,
            "init": "train",
            "recipe": {"epochs": 1},
        },
    )
    assert train.status_code == 202, train.text
    job = client.get(train.headers["location"]).json()
    assert job["kind"] == "train" and job["status"] == "queued"
    assert client.get("/v1/models/t").json()["latest_version"] is None
    _is_problem(client.get("/v1/models/t/versions/latest"), 404, "version_not_found")
    _is_problem(client.get("/v1/models/nope"), 404, "model_not_found")
    for path in (
        "/v1/models/..%2F..%2Fetc",
        "/v1/models/m/versions/..%2F1",
        "/v1/models/m/versions/1%2F..%2F..%2Fsecret/checkpoint",
        "/v1/datasets/..%2Ftiny/samples",
    ):
        resp = client.get(path)
        assert resp.status_code in (404, 422), (path, resp.status_code)
        assert resp.headers["content-type"].startswith(PROBLEM)
    _is_problem(client.get("/v1/models/m/versions/-1"), 422, "validation_error")
    _is_problem(client.get("/v1/models/.hidden"), 422, "validation_error")


def test_versions_manifest_and_download(api: tuple[TestClient, Any], make_checkpoint: Any) -> None:
    client, dep = api
    data = make_checkpoint(seed=11)
    _upload(client, "m", data)
    train, _ = dep.ids()
    sub = client.post("/v1/deletion-requests", json={"model": "m", "sample_ids": train[:3]}).json()
    with dep.sessions() as s:
        t = jobs.claim_job(s, sub["job_id"], "w", store=dep.store, heartbeat_timeout_s=60)
    v2 = make_checkpoint(seed=12)
    dep.complete(t.job_id, v2, metrics={"acc_test": 0.9, "acc_forget": 0.1}, teacher_seed=t.teacher_seed)
    versions = client.get("/v1/models/m/versions").json()["items"]
    assert [(v["version"], v["parent"]) for v in versions] == [(2, 1), (1, None)]
    latest = client.get("/v1/models/m/versions/latest").json()
    assert latest["version"] == 2 and latest["sha256"] == hashlib.sha256(v2).hexdigest()
    assert latest["forgotten_count"] == 3 and latest["job_id"] == t.job_id
    manifest = client.get("/v1/models/m/versions/2/manifest").json()
    assert manifest["parent_version"] == 1 and manifest["sha256"] == latest["sha256"]
    assert client.get("/v1/models/m").json()["forgotten_count"] == 3

    full = client.get("/v1/models/m/versions/2/checkpoint")
    assert full.status_code == 200 and full.content == v2
    etag = full.headers["etag"]
    assert etag == f'"{hashlib.sha256(v2).hexdigest()}"'
    assert full.headers["content-disposition"] == 'attachment; filename="m-v2.safetensors"'
    assert full.headers["accept-ranges"] == "bytes"
    assert int(full.headers["content-length"]) == len(v2)
    part = client.get("/v1/models/m/versions/2/checkpoint", headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == v2[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(v2)}"
    tail = client.get("/v1/models/m/versions/2/checkpoint", headers={"Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == v2[-16:]
    open_end = client.get("/v1/models/m/versions/2/checkpoint", headers={"Range": f"bytes={len(v2) - 5}-"})
    assert open_end.content == v2[-5:]
    same = client.get("/v1/models/m/versions/2/checkpoint", headers={"Range": "bytes=0-3", "If-Range": etag})
    assert same.status_code == 206 and same.content == v2[:4]
    changed = client.get(
        "/v1/models/m/versions/2/checkpoint", headers={"Range": "bytes=0-3", "If-Range": '"other"'}
    )
    assert changed.status_code == 200 and changed.content == v2
    bad = client.get("/v1/models/m/versions/2/checkpoint", headers={"Range": f"bytes={len(v2)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(v2)}"
    cached = client.get("/v1/models/m/versions/2/checkpoint", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    v1 = client.get("/v1/models/m/versions/1/checkpoint")
    assert v1.content == data and v1.headers["content-disposition"].endswith('m-v1.safetensors"')
    events = client.get("/v1/audit", params={"action": "checkpoint.downloaded", "limit": 100}).json()["items"]
    assert len(events) == 8 and {e["data"]["version"] for e in events} == {1, 2}
    assert all(e["actor"] == "test-admin" for e in events)


def test_audit_endpoints_and_tamper_detection(api: tuple[TestClient, Any], make_checkpoint: Any) -> None:
    client, dep = api
    _upload(client, "m", make_checkpoint())
    train, _ = dep.ids()
    sub = client.post("/v1/deletion-requests", json={"model": "m", "sample_ids": train[:2]}).json()
    ok = client.get("/v1/audit/verify").json()
    assert ok["ok"] is True and ok["first_bad_seq"] is None and ok["checked"] >= 5
    page = client.get("/v1/audit", params={"limit": 2}).json()
    assert [e["seq"] for e in page["items"]] == [1, 2] and page["next_cursor"]
    nxt = client.get("/v1/audit", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [e["seq"] for e in nxt["items"]] == [3, 4]
    assert nxt["items"][0]["prev_hash"] == page["items"][1]["hash"]
    by_req = client.get("/v1/audit", params={"request_id": sub["id"]}).json()["items"]
    assert [e["action"] for e in by_req] == ["request.accepted", "request.queued"]
    assert by_req[0]["actor"] == "test-admin" and by_req[0]["data"]["sample_count"] == 2
    by_model = client.get("/v1/audit", params={"model": "m"}).json()["items"]
    assert {"model.registered", "model.version.published", "job.queued"} <= {e["action"] for e in by_model}
    assert client.get("/v1/audit", params={"since": "2999-01-01T00:00:00Z"}).json()["items"] == []
    export = client.get("/v1/audit/export")
    assert export.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in export.text.splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, ok["checked"] + 1))
    assert lines[-1]["hash"] == ok["head_hash"]

    target = 3
    with dep.engine.begin() as conn:
        if dep.backend == "postgresql":
            conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
            conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = :s"), {"s": target})
            conn.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
        else:
            conn.execute(text("DROP TRIGGER audit_events_no_update"))
            conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = :s"), {"s": target})
            conn.execute(
                text(
                    "CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events "
                    "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE refused'); END"
                )
            )
    bad = client.get("/v1/audit/verify").json()
    assert bad["ok"] is False and bad["first_bad_seq"] == target
    assert bad["checked"] == ok["checked"]


def test_deleted_event_is_caught(api: tuple[TestClient, Any], make_checkpoint: Any) -> None:
    client, dep = api
    _upload(client, "m", make_checkpoint())
    with dep.engine.begin() as conn:
        if dep.backend == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            conn.execute(text("DELETE FROM audit_events WHERE seq = 2"))
        else:
            conn.execute(text("DROP TRIGGER audit_events_no_delete"))
            conn.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    report = client.get("/v1/audit/verify").json()
    assert report["ok"] is False and report["first_bad_seq"] == 3


def test_operations_endpoints(api: tuple[TestClient, Any]) -> None:
    client, _ = api
    anon = TestClient(client.app)
    assert anon.get("/healthz").json() == {"status": "ok"}
    ready = anon.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": True, "migrations": True, "broker": True}
    client.get("/v1/models")
    metrics = anon.get("/metrics").text
    assert "lethe_http_requests_total" in metrics and "lethe_queue_depth" in metrics
    assert 'route="/v1/models"' in metrics
    spec = anon.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    for path in (
        "/v1/deletion-requests",
        "/v1/jobs/{job_id}",
        "/v1/models/{name}/versions/{n}",
        "/v1/audit/verify",
        "/v1/datasets/{name}/samples",
    ):
        assert path in spec["paths"]
    _is_problem(anon.get("/v1/nothing-here"), 404)


def test_readyz_fails_when_not_migrated(tmp_path: Any) -> None:
    from app.settings import Settings

    settings = Settings(var_dir=tmp_path / "v", run_background_loops=False)
    with TestClient(create_app(settings)) as client:
        resp = client.get("/readyz")
    assert resp.status_code == 503 and resp.json()["checks"]["migrations"] is False


def test_unhandled_errors_are_bare_500(api: tuple[TestClient, Any]) -> None:
    client, dep = api

    @client.app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals at /etc/x")

    resp = TestClient(client.app, raise_server_exceptions=False).get("/boom")
    body = _is_problem(resp, 500, "internal_error")
    assert "secret" not in resp.text and body["detail"] == "Internal server error"


def test_upload_accepts_form_fields_instead_of_metadata(
    api: tuple[TestClient, Any], make_checkpoint: Any
) -> None:
    client, _ = api
    resp = client.post(
        "/v1/models",
        data={
            "name": "f",
            "dataset": "tiny",
            "architecture": "small_cnn",
            "num_classes": "4",
            "recipe": json.dumps({"epochs": 3}),
        },
        files={"checkpoint": ("x.safetensors", io.BytesIO(make_checkpoint()), "application/x")},
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["recipe"]["epochs"] == 3


def test_hostile_strings_and_cursors_are_4xx(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    safe = TestClient(client.app, raise_server_exceptions=False)
    safe.headers["Authorization"] = f"Bearer {dep.admin_key}"
    for path in (
        "/v1/deletion-requests?model=a%00b",
        "/v1/jobs/a%00b",
        "/v1/audit?action=%00",
        "/v1/deletion-requests/x%00",
        "/v1/datasets/tiny/samples?cursor=NQ",  # a cursor holding an int where a name belongs
        "/v1/models/m/versions?cursor=ImEi",  # a string where a version number belongs
        "/v1/audit?cursor=%%%",
    ):
        resp = safe.get(path)
        assert resp.status_code < 500, (path, resp.status_code, resp.text)
        if "cursor" in path or dep.backend == "postgresql":
            assert 400 <= resp.status_code < 500, (path, resp.status_code)
            assert resp.headers["content-type"].startswith(PROBLEM)
    for body in (
        {"model": "a\x00", "sample_ids": ["x"]},
        {"model": "tiny", "sample_ids": ["x\x00"]},
        {"model": "tiny", "sample_ids": ["x"], "subject_ref": "\x00"},
    ):
        resp = safe.post("/v1/deletion-requests", json=body)
        assert 400 <= resp.status_code < 500, (body, resp.text)
    resp = safe.post("/v1/datasets", json={"name": "d2", "kind": "npz", "uri": "/x\x00y"})
    _is_problem(resp, 422)
    resp = safe.post("/v1/datasets", json={"name": "d3", "kind": "mnist5k", "options": {"split_seed": "x"}})
    _is_problem(resp, 422)
