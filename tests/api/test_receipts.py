"""Signed receipts on SQLite and PostgreSQL: contents, offline verification (Lethe's checker,
the CLI and plain `cryptography`), tampering with any byte or field, key rotation, stable bytes,
the endpoints' auth and status codes, and the page's degraded forms.

Jobs are completed through the service with canned evidence of the engine's shape (the
engine producing it is tested with the engine); the evidence and history are written on the
job row the way the service stores them."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.cli import main as cli_main
from app.db.models import AuditEvent, Job, ModelVersion
from app.main import create_app
from app.receipts import keys as keyring
from app.receipts.signing import public_keys_from, verify, verify_bytes
from app.services import jobs
from app.settings import Settings

PROBLEM = "application/problem+json"
ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "receipts.md"


def canned_evidence(forget_ids: list[str], *, pending: bool = False) -> dict[str, Any]:
    """Evidence of the engine's shape for a 10-sample forget set."""
    if pending:
        return {
            "alpha": 0.05,
            "test": "offline-lira",
            "references": {"k": 8, "status": "pending"},
            "statement": "forgetting not tested: references pending",
            "per_class_accuracy": {
                "classes": [0, 1, 2, 3], "before": [0.9, 0.8, 0.85, 0.95],
                "after": [0.88, 0.8, 0.84, 0.93], "n": [10, 10, 10, 10],
            },
            "intervals": {"acc_forget": [0.2, 0.8], "acc_retain": [0.9, 0.99], "acc_test": [0.8, 0.99]},
        }
    n = len(forget_ids)
    return {
        "alpha": 0.05,
        "test": "offline-lira",
        "references": {"k": 8, "status": "ready"},
        "forget": {"n": n, "flagged": 1, "rate": 0.1, "interval": [0.0025, 0.445]},
        "control": {"n": n, "flagged": 0, "rate": 0.0, "interval": [0.0, 0.308]},
        "original": {"n": n, "flagged": 6, "rate": 0.6, "interval": [0.262, 0.878]},
        "forget_vs_control_p": 0.5,
        "original_vs_control_p": 0.0054,
        "distinguishes": True,
        "statement": "forget samples are flagged no more than never-trained ones",
        "p_values": {sid: 0.3 + 0.01 * i for i, sid in enumerate(forget_ids)},
        "scores": {
            "forget_original": [2.5 + 0.2 * i for i in range(n)],
            "forget_unlearned": [0.4 + 0.1 * i for i in range(n)],
            "forget_out_mean": [0.3 + 0.1 * i for i in range(n)],
            "out_reference": [0.1 * i - 0.5 for i in range(4 * n)],
        },
        "per_class_accuracy": {
            "classes": [0, 1, 2, 3], "before": [0.9, 0.8, 0.85, 0.95],
            "after": [0.88, 0.8, 0.84, 0.93], "n": [10, 10, 10, 10],
        },
        "intervals": {"acc_forget": [0.2, 0.8], "acc_retain": [0.9, 0.99], "acc_test": [0.8, 0.99]},
    }


HISTORY = [
    {"step": s, "losses": {"forget": 1.0 / s, "recover": 0.5 + 0.01 * s},
     "weights": {"forget": 0.5 + 0.02 * s, "recover": 0.5 - 0.02 * s}}
    for s in range(1, 11)
]
VERDICT = {
    "status": "passed", "passed": True, "reasons": [],
    "checks": [{"name": "forgetting", "passed": True}],
    "forgetting": "tested", "summary": "forget samples are flagged no more than never-trained ones",
}


def finish(dep: Any, ids: list[str], *, evidence: Any = None, history: Any = None,
           verdict: Any = None, fail: bool = False, **submit: Any) -> tuple[str, str]:
    """Submit `ids`, run their job to the end through the service; (request id, job id)."""
    sub = dep.submit("m", ids, **submit)
    job_id = sub.body["job_id"]
    with dep.sessions() as s:
        assert jobs.claim_job(s, job_id, "w1", heartbeat_timeout_s=60, store=dep.store) is not None
    if fail:
        with dep.sessions() as s:
            jobs.fail_job(s, job_id, error="the worker ran out of memory", code="worker_error", actor="w1")
    else:
        with dep.sessions() as s:
            version = int(s.scalar(select(ModelVersion.version).order_by(ModelVersion.version.desc())) or 1)
        result = dep.complete(job_id, dep.extra["checkpoint"](seed=version + 1),
                              evidence=evidence, history=history)
        assert result.published, result.verdict_detail
    if fail:
        _set_job(dep, job_id, evidence=evidence, history=history)
    if verdict is not None:
        _set_job(dep, job_id, verdict=verdict)
    return str(sub.body["id"]), str(job_id)


def _set_job(dep: Any, job_id: str, **values: Any) -> None:
    """Overwrite stored job fields (a verdict or evidence the service would not produce here)."""
    with dep.sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        s.commit()


@pytest.fixture
def api(deployment: Any, make_checkpoint: Any) -> Iterator[tuple[TestClient, Any]]:
    deployment.extra["checkpoint"] = make_checkpoint
    deployment.upload_model("m")
    with TestClient(create_app(deployment.settings)) as client:
        client.headers["Authorization"] = f"Bearer {deployment.admin_key}"
        yield client, deployment


@pytest.fixture
def sqlite_api(sqlite_deployment: Any, make_checkpoint: Any) -> Iterator[tuple[TestClient, Any]]:
    sqlite_deployment.extra["checkpoint"] = make_checkpoint
    sqlite_deployment.upload_model("m")
    with TestClient(create_app(sqlite_deployment.settings)) as client:
        client.headers["Authorization"] = f"Bearer {sqlite_deployment.admin_key}"
        yield client, sqlite_deployment


def _receipt(client: TestClient, request_id: str) -> bytes:
    resp = client.get(f"/v1/deletion-requests/{request_id}/receipt")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    return resp.content


def _keys(client: TestClient) -> dict[str, Any]:
    resp = client.get("/v1/receipts/keys", headers={"Authorization": ""})
    assert resp.status_code == 200, resp.text
    listing: dict[str, Any] = resp.json()
    return listing


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path, node


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.001
    if isinstance(value, str):
        return value + "x" if value else "x"
    return 0  # None


# -- contents -------------------------------------------------------------------------------


def test_receipt_holds_the_evidence_and_verifies_offline(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    train, _ = dep.ids()
    ids = train[:10]
    evidence = canned_evidence(ids)
    request_id, job_id = finish(dep, ids, evidence=evidence, history=HISTORY, verdict=VERDICT,
                                subject_ref="dsr-42")
    body = _receipt(client, request_id)
    assert _receipt(client, request_id) == body  # stored once: the same bytes on every read
    listing = _keys(client)
    result = verify_bytes(body, public_keys_from(listing))
    assert result.ok, result.reason
    assert [k["active"] for k in listing["keys"]] == [True] and listing["keys"][0]["kid"] == result.kid

    receipt = json.loads(body)
    assert body == json.dumps(receipt, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text = body.decode()
    assert not any(sid in text for sid in ids), "a forgotten sample ID leaked into the receipt"
    assert "p_values" not in text and "forget_original" not in text
    assert receipt["request"]["id"] == request_id and receipt["request"]["subject_ref"] == "dsr-42"
    assert receipt["model"]["name"] == "m" and len(receipt["model"]["dataset"]["fingerprint"]) == 64
    hashed = receipt["forgotten_ids"]
    expected = hashlib.sha256("\n".join([hashed["salt"], *sorted(ids)]).encode()).hexdigest()
    assert hashed["sha256"] == expected and hashed["count"] == 10 and len(hashed["salt"]) == 32
    with dep.sessions() as s:
        shas = dict(s.execute(select(ModelVersion.version, ModelVersion.sha256)).all())
        published = s.execute(
            select(AuditEvent.seq, AuditEvent.hash).where(AuditEvent.action == "model.version.published")
            .where(AuditEvent.subject == "model:m/v2")
        ).one()
        issued = s.scalars(select(AuditEvent.data).where(AuditEvent.action == "receipt.issued")).all()
    assert receipt["versions"] == {"base": {"version": 1, "sha256": shas[1]},
                                   "result": {"version": 2, "sha256": shas[2]}}
    assert receipt["audit"] == {
        "event": "model.version.published", "seq": published.seq, "hash": published.hash
    }
    assert len(issued) == 1 and json.loads(issued[0])["sha256"] == hashlib.sha256(body).hexdigest()
    job = receipt["job"]
    assert job["id"] == job_id and job["method"] == "feature_constraint" and job["device"] == "cpu"
    assert job["seconds"] == 1.5 and job["steps"] == 10 and isinstance(job["seed"]["teacher"], int)
    with dep.sessions() as s:
        assert job["options"] == s.get(Job, job_id).method_options and job["code_version"]
    assert receipt["metrics"]["acc_test"] == {"value": 0.95, "interval": [0.8, 0.99]}
    assert receipt["metrics"]["mia_forget"] == {"value": 0.4, "interval": None}
    test = receipt["forgetting_test"]
    assert test["status"] == "tested" and test["references"] == {"k": 8, "status": "ready"}
    assert test["forget"]["flagged"] == 1 and test["control"]["n"] == 10 and test["original"]["flagged"] == 6
    assert test["original_vs_control_p"] == 0.0054 and test["distinguishes"] is True
    assert receipt["verdict"]["status"] == "passed" and receipt["verdict"]["checks"] == VERDICT["checks"]
    assert receipt["summary"].startswith("Model m was asked to forget 10 training samples")
    assert "version 2 was published" in receipt["summary"]


def test_pending_references_and_missing_evidence_say_forgetting_was_not_tested(
    api: tuple[TestClient, Any],
) -> None:
    client, dep = api
    train, _ = dep.ids()
    pending_id, _ = finish(dep, train[:5], evidence=canned_evidence(train[:5], pending=True))
    bare_id, _ = finish(dep, train[5:8])
    pending = json.loads(_receipt(client, pending_id))
    assert pending["forgetting_test"]["status"] == "not_tested_references_pending"
    assert pending["forgetting_test"]["statement"] == "forgetting not tested: references pending"
    assert "Forgetting not tested: references pending." in pending["summary"]
    assert pending["verdict"]["forgetting"] == "not_tested_references_pending"
    assert pending["metrics"]["acc_forget"]["interval"] == [0.2, 0.8]
    bare = json.loads(_receipt(client, bare_id))
    assert bare["forgetting_test"]["status"] == "not_tested"
    assert bare["metrics"]["acc_forget"]["interval"] is None
    for rid in (pending_id, bare_id):
        page = client.get(f"/v1/deletion-requests/{rid}/receipt.html")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        assert html.count('data-state="missing"') >= 3  # confidence, flag rates, curves
        assert "Forgetting not tested" in html
    html = client.get(f"/v1/deletion-requests/{pending_id}/receipt.html").text
    assert 'data-plot="per_class" data-state="drawn"' in html  # audit accuracy needs no references
    assert "references pending" in html and "step history was not recorded" in html


def test_a_failed_request_gets_a_receipt_of_its_failure(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    train, _ = dep.ids()
    request_id, _ = finish(dep, train[:4], fail=True)
    receipt = json.loads(_receipt(client, request_id))
    assert receipt["request"]["status"] == "failed" and receipt["versions"]["result"] is None
    assert receipt["verdict"]["passed"] is False and receipt["verdict"]["status"] == "not_evaluated"
    assert "ran out of memory" in receipt["verdict"]["reasons"][0]
    assert receipt["audit"]["event"] == "request.failed"
    assert "nothing was published" in receipt["summary"]
    assert verify_bytes(json.dumps(receipt).encode(), public_keys_from(_keys(client))).ok


# -- tampering ------------------------------------------------------------------------------


def test_changing_any_byte_or_field_fails_verification(sqlite_api: tuple[TestClient, Any]) -> None:
    client, dep = sqlite_api
    train, _ = dep.ids()
    request_id, _ = finish(dep, train[:10], evidence=canned_evidence(train[:10]), history=HISTORY,
                           verdict=VERDICT, subject_ref="dsr-ü")
    body = _receipt(client, request_id)
    keys = public_keys_from(_keys(client))
    assert verify_bytes(body, keys).ok
    for i in range(len(body)):
        for replacement in {body[i] ^ 0x01, 0x20 if body[i] != 0x20 else 0x21}:
            tampered = body[:i] + bytes([replacement]) + body[i + 1:]
            assert not verify_bytes(tampered, keys).ok, f"byte {i} changed and still verifies"
    receipt = json.loads(body)
    checked = 0
    for path, value in _leaves(receipt):
        doc = copy.deepcopy(receipt)
        node = doc
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = _changed(value)
        assert not verify(doc, keys).ok, f"{'.'.join(map(str, path))} changed and still verifies"
        checked += 1
    assert checked > 60
    for member in ("summary", "verdict", "signature"):
        doc = copy.deepcopy(receipt)
        del doc[member]
        assert not verify(doc, keys).ok
    doc = copy.deepcopy(receipt)
    doc["extra"] = 1
    assert not verify(doc, keys).ok
    padded = copy.deepcopy(receipt)
    padded["signature"]["value"] += "=="
    assert not verify(padded, keys).ok


def test_receipts_signed_before_a_key_rotation_still_verify(sqlite_api: tuple[TestClient, Any]) -> None:
    client, dep = sqlite_api
    train, _ = dep.ids()
    first_id, _ = finish(dep, train[:3])
    first = _receipt(client, first_id)
    old_kid = json.loads(first)["signature"]["kid"]
    new_key = keyring.rotate_development_key(dep.settings)
    assert new_key.kid != old_kid
    second_id, _ = finish(dep, train[3:6])
    second = _receipt(client, second_id)
    assert json.loads(second)["signature"]["kid"] == new_key.kid
    listing = _keys(client)
    assert [(k["kid"], k["active"]) for k in listing["keys"]] == [(old_kid, False), (new_key.kid, True)]
    assert listing["keys"][0]["retired_at"] is not None
    keys = public_keys_from(listing)
    assert verify_bytes(first, keys).ok and verify_bytes(second, keys).ok
    assert _receipt(client, first_id) == first  # not re-signed with the new key
    only_new = {new_key.kid: keys[new_key.kid]}
    assert not verify_bytes(first, only_new).ok


def test_a_key_listing_cannot_pass_one_key_off_as_another(sqlite_api: tuple[TestClient, Any]) -> None:
    client, dep = sqlite_api
    train, _ = dep.ids()
    body = _receipt(client, finish(dep, train[:3])[0])
    listing = _keys(client)
    impostor = keyring.write_new_key(dep.settings.var_dir / "other.pem")
    assert impostor is not None
    listing["keys"][0]["x"] = impostor.x  # the right kid, someone else's key
    assert public_keys_from(listing) == {}
    assert not verify_bytes(body, public_keys_from(listing)).ok


# -- independent checkers -------------------------------------------------------------------


def test_plain_cryptography_verifies_a_receipt_without_lethe(sqlite_api: tuple[TestClient, Any]) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    client, dep = sqlite_api
    train, _ = dep.ids()
    receipt = json.loads(_receipt(client, finish(dep, train[:4], evidence=canned_evidence(train[:4]))[0]))
    keys = {k["kid"]: k for k in _keys(client)["keys"]}

    def unb64(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    def check(doc: dict[str, Any]) -> bool:
        sig = doc["signature"]
        signed = {k: v for k, v in doc.items() if k != "signature"}
        message = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        key = Ed25519PublicKey.from_public_bytes(unb64(keys[sig["kid"]]["x"]))
        try:
            key.verify(unb64(sig["value"]), message)
        except InvalidSignature:
            return False
        return sig["alg"] == "Ed25519"

    assert check(receipt)
    receipt["verdict"]["passed"] = False
    assert not check(receipt)


@pytest.mark.parametrize("page", ["docs/receipts.md", "README.md"])
def test_the_documented_snippet_verifies_a_receipt(
    sqlite_api: tuple[TestClient, Any], tmp_path: Path, page: str
) -> None:
    client, dep = sqlite_api
    train, _ = dep.ids()
    body = _receipt(client, finish(dep, train[:4])[0])
    (tmp_path / "receipt.json").write_bytes(body)
    (tmp_path / "keys.json").write_text(json.dumps(_keys(client)))
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    snippet = next(b for b in blocks if "Ed25519PublicKey" in b)
    assert "import app" not in snippet and "from app" not in snippet
    ok = subprocess.run([sys.executable, "-I", "-c", snippet], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout, ok.stderr
    doc = json.loads(body)
    doc["forgotten_ids"]["count"] = 11
    (tmp_path / "receipt.json").write_text(json.dumps(doc))
    bad = subprocess.run([sys.executable, "-I", "-c", snippet], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "InvalidSignature" in bad.stderr


def test_cli_verifies_offline_and_refuses_a_tampered_receipt(
    sqlite_api: tuple[TestClient, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, dep = sqlite_api
    train, _ = dep.ids()
    request_id, _ = finish(dep, train[:4])
    receipt, keys = tmp_path / "r.json", tmp_path / "keys.json"
    receipt.write_bytes(_receipt(client, request_id))
    keys.write_text(json.dumps(_keys(client)))
    assert cli_main(["receipt", "verify", str(receipt), "--keys", str(keys)]) == 0
    assert f"receipt OK: request {request_id}" in capsys.readouterr().out
    pretty = tmp_path / "pretty.json"  # re-indented by a human: still the same receipt
    pretty.write_text(json.dumps(json.loads(receipt.read_bytes()), indent=2))
    assert cli_main(["receipt", "verify", str(pretty), "--keys", str(keys)]) == 0
    tampered = tmp_path / "t.json"
    tampered.write_bytes(receipt.read_bytes().replace(b'"status":"succeeded"', b'"status":"succeedeD"'))
    assert cli_main(["receipt", "verify", str(tampered), "--keys", str(keys)]) == 1
    assert "receipt INVALID" in capsys.readouterr().err
    assert cli_main(["receipt", "verify", str(tmp_path / "missing.json"), "--keys", str(keys)]) == 1


# -- the endpoints --------------------------------------------------------------------------


def _problem(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    assert resp.json()["code"] == code and "Traceback" not in resp.text


def test_endpoints_auth_and_status_codes(api: tuple[TestClient, Any]) -> None:
    client, dep = api
    train, _ = dep.ids()
    done_id, _ = finish(dep, train[:3])
    queued = dep.submit("m", train[3:5]).body["id"]
    cancelled = dep.submit("m", train[5:7], method="finetune").body["id"]
    client.post(f"/v1/deletion-requests/{cancelled}/cancel").raise_for_status()
    forgotten = dep.submit("m", train[:2]).body  # already forgotten: succeeds with no job
    assert forgotten["status"] == "succeeded" and forgotten["job_id"] is None
    reader = {"Authorization": f"Bearer {dep.key(['deletions:read'])}"}
    other = {"Authorization": f"Bearer {dep.key(['models:read'])}"}
    for suffix in ("receipt", "receipt.html"):
        url = f"/v1/deletion-requests/{done_id}/{suffix}"
        _problem(client.get(url, headers={"Authorization": ""}), 401, "unauthorized")
        _problem(client.get(url, headers=other), 403, "forbidden")
        assert client.get(url, headers=reader).status_code == 200
        _problem(client.get(f"/v1/deletion-requests/dr_nope/{suffix}"), 404, "request_not_found")
        _problem(client.get(f"/v1/deletion-requests/{queued}/{suffix}"), 409, "receipt_not_ready")
        _problem(client.get(f"/v1/deletion-requests/{cancelled}/{suffix}"), 409, "receipt_unavailable")
        _problem(client.get(f"/v1/deletion-requests/{forgotten['id']}/{suffix}"), 409, "receipt_unavailable")
    page = client.get(f"/v1/deletion-requests/{done_id}/receipt.html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert client.get("/v1/receipts/keys", headers={"Authorization": ""}).status_code == 200
    spec = client.get("/openapi.json").json()["paths"]
    receipt_op = spec["/v1/deletion-requests/{request_id}/receipt"]["get"]
    assert {"200", "401", "403", "404", "409", "503"} <= set(receipt_op["responses"])
    page_op = spec["/v1/deletion-requests/{request_id}/receipt.html"]["get"]
    assert set(page_op["responses"]["200"]["content"]) == {"text/html"}
    assert "security" not in spec["/v1/receipts/keys"]["get"]


def test_production_without_a_signing_key_refuses_to_sign_but_lists_old_keys(
    sqlite_deployment: Any, make_checkpoint: Any, tmp_path: Path
) -> None:
    dep = sqlite_deployment
    dep.extra["checkpoint"] = make_checkpoint
    dep.upload_model("m")
    train, _ = dep.ids()
    first_id, _ = finish(dep, train[:3])
    second_id, _ = finish(dep, train[3:6])
    with TestClient(create_app(dep.settings)) as client:
        client.headers["Authorization"] = f"Bearer {dep.admin_key}"
        _receipt(client, first_id)
    prod = Settings(
        environment="production", var_dir=dep.settings.var_dir, database_url=dep.settings.database_url,
        run_background_loops=False, webhook_signing_secret="x" * 40,
    )
    with TestClient(create_app(prod)) as client:
        client.headers["Authorization"] = f"Bearer {dep.admin_key}"
        _problem(client.get(f"/v1/deletion-requests/{second_id}/receipt"), 503, "unavailable")
        assert [k["active"] for k in _keys(client)["keys"]] == [True]
        assert _receipt(client, first_id)  # stored receipts are still served
    pem = tmp_path / "prod.pem"
    key = keyring.write_new_key(pem)
    assert key is not None and (pem.stat().st_mode & 0o777) == 0o600
    with TestClient(create_app(prod.model_copy(update={"receipt_signing_key_file": pem}))) as client:
        client.headers["Authorization"] = f"Bearer {dep.admin_key}"
        assert json.loads(_receipt(client, second_id))["signature"]["kid"] == key.kid
        assert [k["active"] for k in _keys(client)["keys"]] == [False, True]


def test_the_development_key_is_private_and_logged(
    sqlite_deployment: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = sqlite_deployment.settings
    with caplog.at_level("WARNING"):
        key = keyring.load_signing_key(settings)
    path = keyring.development_key_path(settings)
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    assert str(path) in caplog.text and key.kid in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert keyring.load_signing_key(settings).kid == key.kid  # reused, not regenerated
    assert "generated" not in caplog.text
