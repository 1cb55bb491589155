"""The OpenDSR processor interface on SQLite and PostgreSQL: discovery, erasure intake (201
and its signatures), status, cancellation, unsupported types and identities, fan-out over
models, status mapping, and signed status callbacks verified with `cryptography` alone."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.db.models import AuditEvent, CallbackDelivery, DeletionRequest, Job, OpendsrRequest
from app.main import create_app
from app.services import callbacks, jobs
from app.services.opendsr_status import derive_status

# In the tiny dataset sample i is `train` when i % 40 < 30.
OWNERS = {"cust-1": ["s0000", "s0001", "s0002"], "cust-2": ["s0040", "s0041"], "cust-test": ["s0035"]}


@pytest.fixture
def api(deployment: Any, tmp_path: Path) -> Iterator[tuple[TestClient, Any]]:
    """Lethe over HTTP with an `opendsr`-scoped key; models `a` and `b` on a dataset with
    subjects, `plain` on one without."""
    deployment.upload_model("plain")
    deployment.register_with_subjects("subj", OWNERS)
    deployment.upload_model("a")
    deployment.upload_model("b")
    with TestClient(create_app(deployment.settings)) as client:
        client.headers["Authorization"] = f"Bearer {deployment.key(['opendsr'], 'controller-x')}"
        yield client, deployment


def _erasure(subject: str = "cust-1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subject_request_id": str(uuid.uuid4()),
        "subject_request_type": "erasure",
        "regulation": "gdpr",
        "submitted_time": "2026-10-02T15:00:00Z",
        "subject_identities": [
            {"identity_type": "controller_customer_id", "identity_value": subject, "identity_format": "raw"}
        ],
        "api_version": "2.0",
        "status_callback_urls": ["https://controller.example/opendsr/callbacks"],
    }
    body.update(over)
    return body


def _certificate(client: TestClient) -> x509.Certificate:
    cert = client.get("/opendsr/v2/cert.pem", headers={"Authorization": ""})
    assert cert.status_code == 200 and cert.headers["content-type"].startswith("application/x-pem-file")
    return x509.load_pem_x509_certificate(cert.content)


def _verifies(cert: x509.Certificate, body: bytes, signature: str) -> bool:
    """RSA PKCS#1 v1.5 / SHA-256, checked with `cryptography` only."""
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    try:
        key.verify(base64.b64decode(signature), body, padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        return False
    return True


def _id(erasure: dict[str, Any]) -> str:
    return str(erasure["subject_request_id"])


def _job_of(session: Any, erasure: dict[str, Any]) -> str:
    """The job of the (single) deletion request fulfilling `erasure`."""
    return str(session.scalar(
        select(DeletionRequest.job_id).where(DeletionRequest.opendsr_request_id == _id(erasure))
    ))


def _count(dep: Any, model: Any, *where: Any) -> int:
    with dep.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_discovery_names_erasure_and_a_fetchable_certificate(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    found = client.get("/opendsr/v2/discovery")
    assert found.status_code == 200
    assert found.json() == {
        "api_version": "2.0",
        "supported_identities": [{"identity_type": "controller_customer_id", "identity_format": "raw"}],
        "supported_subject_request_types": ["erasure"],
        "processor_certificate": "http://testserver/opendsr/v2/cert.pem",
    }
    cert = _certificate(client)
    assert cert.subject.rfc4514_string() == "CN=localhost"
    assert client.get("/opendsr/v2/status").json() == {"api_version": "2.0", "status": "ok"}
    other = dep.key(["deletions:write"])
    denied = client.get("/opendsr/v2/discovery", headers={"Authorization": f"Bearer {other}"})
    assert denied.status_code == 403 and denied.json()["code"] == "forbidden"


def test_an_erasure_is_created_signed_and_fans_out_to_each_model(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    cert = _certificate(client)
    sent = _erasure("cust-1")
    raw = json.dumps(sent).encode()
    created = client.post("/opendsr/v2/requests", content=raw, headers={"content-type": "application/json"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"controller_id", "expected_completion_time", "received_time",
                         "encoded_request", "subject_request_id", "api_version", "processor_signature"}
    assert body["subject_request_id"] == sent["subject_request_id"]
    assert body["controller_id"] == "controller-x"
    assert base64.b64decode(body["encoded_request"]) == raw
    assert body["received_time"].endswith("Z") and body["expected_completion_time"] > body["received_time"]
    assert created.headers["x-opendsr-processor-domain"] == "localhost"
    assert _verifies(cert, created.content, created.headers["x-opendsr-signature"])
    unsigned = {k: v for k, v in body.items() if k != "processor_signature"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
    assert _verifies(cert, canonical, body["processor_signature"])
    assert not _verifies(cert, canonical + b" ", body["processor_signature"])
    status = client.get(f"/opendsr/v2/requests/{sent['subject_request_id']}")
    assert status.status_code == 200
    assert _verifies(cert, status.content, status.headers["x-opendsr-signature"])
    state = status.json()
    assert state["request_status"] == "pending"
    assert sorted(r["model"] for r in state["deletion_requests"]) == ["a", "b"]  # not `plain`
    assert all(r["sample_count"] == 3 and r["status"] == "queued" for r in state["deletion_requests"])
    with dep.sessions() as s:
        reqs = list(s.scalars(select(DeletionRequest).where(DeletionRequest.subject_ref == _id(sent))))
        received = s.scalar(select(AuditEvent.data).where(AuditEvent.action == "opendsr.received"))
    assert len(reqs) == 2 and all(r.opendsr_request_id == sent["subject_request_id"] for r in reqs)
    assert received is not None and "cust-1" not in received
    assert json.loads(received)["models"] == ["a", "b"]


def test_property_id_names_one_model_and_a_subject_nobody_holds_completes_at_once(
    api: tuple[TestClient, Any],
) -> None:
    client, dep = api
    one = _erasure("cust-2", extensions={"localhost": {"property_id": "b"}, "other.example": {"x": 1}})
    assert client.post("/opendsr/v2/requests", json=one).status_code == 201
    state = client.get(f"/opendsr/v2/requests/{one['subject_request_id']}").json()
    assert [r["model"] for r in state["deletion_requests"]] == ["b"]
    nobody = _erasure("cust-test")  # held-out samples only: no model trained on them
    assert client.post("/opendsr/v2/requests", json=nobody).status_code == 201
    done = client.get(f"/opendsr/v2/requests/{nobody['subject_request_id']}").json()
    assert done["request_status"] == "completed" and done["deletion_requests"] == []
    assert done["results_count"] == 0
    with dep.sessions() as s:
        sent = s.scalars(select(CallbackDelivery).where(CallbackDelivery.request_id == _id(nobody)))
        payloads = [json.loads(d.payload) for d in sent]
    assert [p["request_status"] for p in payloads] == ["completed"]
    assert payloads[0]["status_callback_url"] == "https://controller.example/opendsr/callbacks"
    missing = _erasure("cust-2", extensions={"localhost": {"property_id": "nope"}})
    assert client.post("/opendsr/v2/requests", json=missing).json()["code"] == "model_not_found"


def test_unsupported_types_identities_and_bad_bodies_get_the_protocol_error(
    api: tuple[TestClient, Any],
) -> None:
    client, dep = api
    access = client.post("/opendsr/v2/requests", json=_erasure(subject_request_type="access"))
    assert access.status_code == 400 and access.headers["content-type"] == "application/problem+json"
    problem = access.json()
    assert problem["code"] == "unsupported_request_type" and problem["supported"] == ["erasure"]
    assert problem["error"]["code"] == 400
    assert problem["error"]["errors"][0]["reason"] == "unsupported_request_type"
    email = _erasure(subject_identities=[
        {"identity_type": "email", "identity_value": "a@b.example", "identity_format": "raw"}
    ])
    assert client.post("/opendsr/v2/requests", json=email).json()["code"] == "unsupported_identity"
    hashed = _erasure(subject_identities=[
        {"identity_type": "controller_customer_id", "identity_value": "ab12", "identity_format": "sha256"}
    ])
    assert client.post("/opendsr/v2/requests", json=hashed).status_code == 400
    bad = _erasure()
    del bad["subject_request_id"]
    invalid = client.post("/opendsr/v2/requests", json=bad)
    assert invalid.status_code == 400 and invalid.json()["code"] == "validation_error"
    assert invalid.json()["error"]["errors"][0]["domain"] == "Validation"
    assert _count(dep, OpendsrRequest) == 0 and _count(dep, DeletionRequest) == 0
    taken = _erasure()
    assert client.post("/opendsr/v2/requests", json=taken).status_code == 201
    again = client.post("/opendsr/v2/requests", json=taken)
    assert again.status_code == 409 and again.json()["code"] == "opendsr_request_exists"
    assert _count(dep, OpendsrRequest) == 1 and _count(dep, DeletionRequest) == 2
    unknown = client.get(f"/opendsr/v2/requests/{uuid.uuid4()}")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == 404


def test_a_pending_request_is_cancelled_once(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    cert = _certificate(client)
    sent = _erasure("cust-1")
    client.post("/opendsr/v2/requests", json=sent)
    rid = sent["subject_request_id"]
    cancelled = client.delete(f"/opendsr/v2/requests/{rid}")
    assert cancelled.status_code == 202
    assert _verifies(cert, cancelled.content, cancelled.headers["x-opendsr-signature"])
    body = cancelled.json()
    assert body["subject_request_id"] == rid and body["controller_id"] == "controller-x"
    assert set(body) == {
        "controller_id", "subject_request_id", "received_time", "api_version", "processor_signature"
    }
    state = client.get(f"/opendsr/v2/requests/{rid}").json()
    assert state["request_status"] == "cancelled"
    assert all(r["status"] == "cancelled" for r in state["deletion_requests"])
    assert _count(dep, Job, Job.status == "cancelled", Job.kind == "unlearn") == 2
    with dep.sessions() as s:
        statuses = [json.loads(d.payload)["request_status"]
                    for d in s.scalars(select(CallbackDelivery).where(CallbackDelivery.request_id == rid))]
    assert statuses == ["cancelled"]
    twice = client.delete(f"/opendsr/v2/requests/{rid}")
    assert twice.status_code == 409 and twice.json()["code"] == "not_cancellable"


def test_a_running_request_cannot_be_cancelled(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    sent = _erasure("cust-1", extensions={"localhost": {"property_id": "a"}})
    client.post("/opendsr/v2/requests", json=sent)
    with dep.sessions() as s:
        job_id = _job_of(s, sent)
        assert jobs.claim_job(s, job_id, "w", store=dep.store, heartbeat_timeout_s=60) is not None
    state = client.get(f"/opendsr/v2/requests/{_id(sent)}").json()
    assert state["request_status"] == "in_progress"
    refused = client.delete(f"/opendsr/v2/requests/{sent['subject_request_id']}")
    assert refused.status_code == 409 and refused.json()["status_now"] == "in_progress"


@pytest.mark.parametrize(
    ("cancelled", "statuses", "expected"),
    [
        (False, [], "completed"),
        (False, ["accepted", "queued"], "pending"),
        (False, ["queued", "running"], "in_progress"),
        (False, ["succeeded", "queued"], "in_progress"),
        (False, ["succeeded", "succeeded"], "completed"),
        (False, ["succeeded", "failed"], "in_progress"),
        (False, ["cancelled", "cancelled"], "cancelled"),
        (True, ["queued"], "cancelled"),
    ],
)
def test_status_mapping(cancelled: bool, statuses: list[str], expected: str) -> None:
    from app.db.types import utcnow

    assert derive_status(utcnow() if cancelled else None, statuses) == expected


class _Controller(BaseHTTPRequestHandler):
    received: list[tuple[bytes, dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((body, {k.lower(): v for k, v in self.headers.items()}))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_status_callbacks_are_signed_delivered_and_audited(
    api: tuple[TestClient, Any], make_checkpoint: Any
) -> None:
    client, dep = api
    cert = _certificate(client)
    _Controller.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Controller)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cb"
    try:
        sent = _erasure("cust-2", status_callback_urls=[url], extensions={"localhost": {"property_id": "a"}})
        assert client.post("/opendsr/v2/requests", json=sent).status_code == 201
        with dep.sessions() as s:
            job_id = _job_of(s, sent)
            ticket = jobs.claim_job(s, job_id, "w", store=dep.store, heartbeat_timeout_s=60)
        assert ticket is not None and ticket.forget_ids == ["s0040", "s0041"]
        assert dep.complete(job_id, make_checkpoint()).published
        with httpx.Client() as http:
            assert callbacks.deliver_due(dep.sessions, dep.settings, http) == 2
    finally:
        server.shutdown()
    bodies = []
    for raw, headers in _Controller.received:
        assert headers["x-opendsr-processor-domain"] == "localhost"
        assert _verifies(cert, raw, headers["x-opendsr-signature"])
        forged = raw.replace(b"controller-x", b"controller-y")
        assert not _verifies(cert, forged, headers["x-opendsr-signature"])
        bodies.append(json.loads(raw))
    assert [b["request_status"] for b in bodies] == ["in_progress", "completed"]
    assert all(b["status_callback_url"] == url and b["subject_request_id"] == sent["subject_request_id"]
               for b in bodies)
    assert bodies[1]["results_count"] == 2
    with dep.sessions() as s:
        attempts = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "callback.attempted")))
    assert len(attempts) == 2 and all(a.subject == f"opendsr:{sent['subject_request_id']}" for a in attempts)


def test_the_processor_identity_comes_from_settings_or_is_refused(tmp_path: Path) -> None:
    from app.errors import Unavailable
    from app.opendsr.identity import load_identity
    from app.settings import Settings

    dev = Settings(var_dir=tmp_path / "a", run_background_loops=False, opendsr_domain="proc.example")
    generated = load_identity(dev)
    assert generated.self_signed and generated.domain == "proc.example"
    assert load_identity(dev).certificate_pem == generated.certificate_pem  # kept, not redrawn
    key, cert = tmp_path / "a" / "opendsr-key.pem", tmp_path / "a" / "opendsr-cert.pem"
    configured = load_identity(Settings(
        var_dir=tmp_path / "b", run_background_loops=False,
        opendsr_key_file=key, opendsr_certificate_file=cert,
    ))
    assert not configured.self_signed
    other = load_identity(Settings(var_dir=tmp_path / "c", run_background_loops=False))
    with pytest.raises(Unavailable, match="not the certificate of the OpenDSR key"):
        load_identity(Settings(var_dir=tmp_path / "d", run_background_loops=False, opendsr_key_file=key,
                               opendsr_certificate_file=tmp_path / "c" / "opendsr-cert.pem"))
    assert other.certificate_pem != generated.certificate_pem
    production = Settings(var_dir=tmp_path / "e", run_background_loops=False, environment="production",
                          webhook_signing_secret="x" * 40)
    with pytest.raises(Unavailable, match="LETHE_OPENDSR_KEY_FILE"):
        load_identity(production)
