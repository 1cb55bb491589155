"""Receipts of finished deletion requests: built once, signed, stored; the public keys.

A request gets a receipt when it reached `succeeded` or `failed` through a job (a cancelled
request, or one naming only already-forgotten IDs, ran none: 409 `receipt_unavailable`; one
still in flight: 409 `receipt_not_ready`). The first read builds it from the database (the
request, its job and the job's evidence, the versions, the audit chain), signs it with the
active key and stores the exact bytes with a `receipt.issued` audit event, all in one
transaction; every later read serves the same bytes. What a receipt holds is described in
`docs/receipts.md`; the forgotten IDs appear only as a salted sha256.

Every public key that ever signed stays in `receipt_keys`; the one that signs now is `active`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import (
    AuditEvent,
    DatasetRow,
    DeletionRequest,
    Job,
    ModelRow,
    ModelVersion,
    Receipt,
    ReceiptKey,
    RequestSample,
)
from app.db.types import rfc3339, utcnow
from app.errors import ReceiptNotReady, ReceiptUnavailable, RequestNotFound, Unavailable
from app.receipts import keys as keyring
from app.receipts.signing import ALG, sign
from app.services.audit import append_event
from app.services.common import canonical_json, finite_json
from app.services.policy import NO_EVIDENCE
from app.settings import Settings
from app.vocab import RequestStatus

FORMAT = "lethe.receipt/1"
ID_HASH = "sha256(salt || 0x0A || sorted IDs joined by 0x0A), UTF-8"
PENDING = "forgetting not tested: references pending"
#: Evidence members a receipt carries about the forgetting test (never `p_values` or
#: `scores`: those are per sample, and `p_values` is keyed by sample ID).
_TEST_FIELDS = (
    "test",
    "alpha",
    "references",
    "forget",
    "control",
    "original",
    "forget_vs_control_p",
    "original_vs_control_p",
    "distinguishes",
    "statement",
)
_JOB_COST = ("seconds", "steps", "device")


# -- keys -----------------------------------------------------------------------------------


def _register_key(session: Session, key: keyring.SigningKey) -> None:
    """Make `key` the active one in `receipt_keys` (older keys stay, inactive); commits."""
    for _ in range(3):
        row = session.get(ReceiptKey, key.kid)
        if row is not None and row.active:
            session.rollback()
            return
        now = utcnow()
        session.execute(
            update(ReceiptKey)
            .where(ReceiptKey.active.is_(True))
            .where(ReceiptKey.kid != key.kid)
            .values(active=False, retired_at=now)
        )
        if row is None:
            session.add(
                ReceiptKey(
                    kid=key.kid, alg=ALG, public_key=key.x, active=True, created_at=now, retired_at=None
                )
            )
        else:
            row.active, row.retired_at = True, None
        try:
            session.commit()
            return
        except IntegrityError:  # another process registered it first
            session.rollback()
    raise Unavailable("the receipt signing key could not be registered")


def active_signing_key(session: Session, settings: Settings) -> keyring.SigningKey:
    """The configured signing key, registered as the active public key."""
    key = keyring.load_signing_key(settings)
    _register_key(session, key)
    return key


def list_public_keys(session: Session, settings: Settings) -> dict[str, Any]:
    """Every public key receipts were signed with, oldest first (`GET /v1/receipts/keys`).

    The configured key is registered first; without one (production, unset) the known keys
    are still listed, so old receipts stay checkable.
    """
    try:
        active_signing_key(session, settings)
    except Unavailable:
        session.rollback()
    rows = session.scalars(select(ReceiptKey).order_by(ReceiptKey.created_at, ReceiptKey.kid)).all()
    body = {
        "keys": [
            {
                "kid": r.kid,
                "alg": r.alg,
                "x": r.public_key,
                "created_at": rfc3339(r.created_at),
                "active": r.active,
                "retired_at": rfc3339(r.retired_at),
            }
            for r in rows
        ]
    }
    session.rollback()
    return body


# -- reading a receipt ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredReceipt:
    """A receipt as served: its exact bytes (canonical JSON) and its parsed document."""

    body: str
    document: dict[str, Any]
    sha256: str


def get_receipt(session: Session, settings: Settings, request_id: str) -> StoredReceipt:
    """The request's signed receipt, issued on first read (see the module docstring)."""
    for _ in range(3):
        stored = session.get(Receipt, request_id)
        if stored is not None:
            body, digest = stored.body, stored.sha256
            session.rollback()
            return StoredReceipt(body, json.loads(body), digest)
        req, model = _eligible(session, request_id)
        session.rollback()
        key = active_signing_key(session, settings)
        unsigned = finite_json(build_receipt(session, req.id, salt=secrets.token_hex(16)))
        document = sign(unsigned, key.private_key)
        body = canonical_json(document)
        digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
        session.add(Receipt(request_id=req.id, kid=key.kid, body=body, sha256=digest, created_at=utcnow()))
        try:
            session.flush()
        except IntegrityError:  # issued concurrently: serve that one
            session.rollback()
            continue
        append_event(
            session,
            actor="lethe",
            action="receipt.issued",
            subject=f"request:{req.id}",
            model=model,
            request_id=req.id,
            data={"kid": key.kid, "sha256": digest},
        )
        session.commit()
        return StoredReceipt(body, document, digest)
    raise Unavailable("the receipt could not be stored")


def _eligible(session: Session, request_id: str) -> tuple[DeletionRequest, str]:
    row = session.execute(
        select(DeletionRequest, ModelRow.name)
        .join(ModelRow, ModelRow.id == DeletionRequest.model_id)
        .where(DeletionRequest.id == request_id)
    ).first()
    if row is None:
        session.rollback()
        raise RequestNotFound(f"no deletion request {request_id!r}")
    req, model = row[0], row[1]
    if not RequestStatus(req.status).final:
        session.rollback()
        raise ReceiptNotReady(
            f"request {request_id} is {req.status}; its receipt exists once it succeeds or fails",
            status_now=req.status,
        )
    if req.status == RequestStatus.CANCELLED or req.job_id is None:
        why = {
            RequestStatus.CANCELLED: " (it was cancelled)",
            RequestStatus.SUCCEEDED: " (every ID was already forgotten)",
        }.get(RequestStatus(req.status), "")
        session.rollback()
        raise ReceiptUnavailable(
            f"request {request_id} is {req.status} and no job ran for it{why}", status_now=req.status
        )
    return req, str(model)


def job_of_receipt(session: Session, document: dict[str, Any]) -> Job | None:
    """The job a receipt was built from (for the page's per-sample plots and curves)."""
    job_id = (document.get("job") or {}).get("id")
    return session.get(Job, job_id) if job_id else None


# -- building -------------------------------------------------------------------------------


def build_receipt(session: Session, request_id: str, *, salt: str) -> dict[str, Any]:
    """The unsigned receipt of a final request with a job: a function of the database state,
    the salt and the moment it is called (`issued_at`)."""
    req = session.get(DeletionRequest, request_id)
    assert req is not None and req.job_id is not None
    job = session.get(Job, req.job_id)
    model = session.get(ModelRow, req.model_id)
    assert job is not None and model is not None
    dataset = session.get(DatasetRow, model.dataset_id)
    assert dataset is not None
    ids = sorted(
        session.scalars(select(RequestSample.sample_id).where(RequestSample.request_id == req.id))
    )
    evidence = job.evidence if isinstance(job.evidence, dict) else None
    forgetting = _forgetting(evidence, job.verdict)
    verdict = _verdict(job, forgetting)
    document: dict[str, Any] = {
        "format": FORMAT,
        "issued_at": rfc3339(utcnow()),
        "issuer": {"service": "lethe", "version": _service_version()},
        "request": {
            "id": req.id,
            "subject_ref": req.subject_ref,
            "status": req.status,
            "verify": req.verify,
            "sample_count": req.sample_count,
            "already_forgotten_count": req.already_forgotten_count,
            "received_at": rfc3339(req.received_at),
            "finished_at": rfc3339(req.finished_at),
        },
        "model": {
            "name": model.name,
            "architecture": model.architecture,
            "num_classes": model.num_classes,
            "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint},
        },
        "forgotten_ids": {
            "count": len(ids),
            "salt": salt,
            "sha256": salted_ids_sha256(ids, salt),
            "algorithm": ID_HASH,
        },
        "versions": {
            "base": _version(session, model.id, job.base_version),
            "result": _version(session, model.id, req.result_version),
        },
        "job": _job(job, model, evidence),
        "metrics": _metrics(job.metrics, evidence),
        "retrain_reference": {"metrics": job.reference, "gaps": job.gaps} if job.reference else None,
        "forgetting_test": forgetting,
        "verdict": verdict,
        "audit": _audit_anchor(session, req, model.name),
    }
    document["summary"] = summary_sentence(document)
    return document


def salted_ids_sha256(ids: list[str], salt: str) -> str:
    """sha256 of the salt, a newline, and the sorted IDs joined by newlines (UTF-8)."""
    return hashlib.sha256("\n".join([salt, *sorted(ids)]).encode("utf-8")).hexdigest()


def _service_version() -> str:
    try:
        return metadata.version("lethe")
    except metadata.PackageNotFoundError:
        return "unknown"


def _version(session: Session, model_id: int, version: int | None) -> dict[str, Any] | None:
    if version is None:
        return None
    sha = session.scalar(
        select(ModelVersion.sha256)
        .where(ModelVersion.model_id == model_id)
        .where(ModelVersion.version == version)
    )
    return {"version": version, "sha256": sha}


def _job(job: Job, model: ModelRow, evidence: dict[str, Any] | None) -> dict[str, Any]:
    metrics = job.metrics or {}
    code_version = (evidence or {}).get("code_version")
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "method": job.method,
        "options": job.method_options or {},
        "verify": job.verify,
        "seed": {"teacher": job.teacher_seed, "recipe": (model.recipe or {}).get("seed")},
        "code_version": code_version or _service_version(),
        "code_version_source": "worker" if code_version else "service",
        "device": metrics.get("device"),
        "seconds": job.seconds if job.seconds is not None else metrics.get("seconds"),
        "steps": metrics.get("steps"),
        "fallback_of": job.fallback_of,
        "error": job.error,
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
    }


def _metrics(metrics: dict[str, Any] | None, evidence: dict[str, Any] | None) -> dict[str, Any]:
    """Each verification metric with its interval on audit data where the evidence has one."""
    intervals = (evidence or {}).get("intervals") or {}
    out: dict[str, Any] = {}
    for name, value in sorted((metrics or {}).items()):
        if name in _JOB_COST:
            continue
        out[name] = {"value": value, "interval": intervals.get(name)}
    return out


def _forgetting(evidence: dict[str, Any] | None, verdict: dict[str, Any] | None) -> dict[str, Any]:
    """The per-sample forgetting test as the receipt states it (no per-sample values); its
    status is the verdict's where the verdict judged it."""
    if evidence is None:
        return {"status": "not_tested", "statement": NO_EVIDENCE}
    references = evidence.get("references") or {}
    if references.get("status") == "pending":
        return {
            "status": "not_tested_references_pending",
            "statement": PENDING,
            "references": references,
        }
    test = {k: evidence.get(k) for k in _TEST_FIELDS}
    judged = (verdict or {}).get("forgetting")
    test["status"] = judged or ("tested" if evidence.get("distinguishes") else "test_has_no_power")
    if not test.get("statement"):
        test["statement"] = (
            "the test distinguishes these samples on this model"
            if evidence.get("distinguishes")
            else "this test cannot distinguish these samples on this model"
        )
    return test


def _verdict(job: Job, forgetting: dict[str, Any]) -> dict[str, Any]:
    if job.verdict:
        verdict = dict(job.verdict)
        verdict.setdefault("forgetting", forgetting["status"])
        return verdict
    error = (job.error or {}).get("message") or "no verdict was recorded"
    return {
        "status": "not_evaluated",
        "passed": False,
        "reasons": [f"the job ended before verification: {error}"],
        "checks": [],
        "forgetting": forgetting["status"],
    }


def _audit_anchor(session: Session, req: DeletionRequest, model: str) -> dict[str, Any] | None:
    """The audit event that closed the request: the publication of its result version, or
    (nothing published) the request's final event."""
    stmt = select(AuditEvent.seq, AuditEvent.action, AuditEvent.hash)
    if req.status == RequestStatus.SUCCEEDED and req.result_version is not None:
        stmt = stmt.where(AuditEvent.model == model).where(
            AuditEvent.action == "model.version.published",
            AuditEvent.subject == f"model:{model}/v{req.result_version}",
        )
    else:
        stmt = stmt.where(AuditEvent.request_id == req.id, AuditEvent.action == f"request.{req.status}")
    row = session.execute(stmt.order_by(AuditEvent.seq.desc()).limit(1)).first()
    if row is None:
        return None
    return {"event": row.action, "seq": row.seq, "hash": row.hash}


def summary_sentence(document: dict[str, Any]) -> str:
    """One sentence a person can read first: what was asked, what happened, the verdict."""
    req, model = document["request"], document["model"]["name"]
    n = req["sample_count"]
    samples = f"{n} training sample{'s' if n != 1 else ''}"
    result = (document.get("versions") or {}).get("result")
    verdict = document["verdict"]
    forgetting = document["forgetting_test"]["statement"]
    if req["status"] == RequestStatus.SUCCEEDED and result:
        head = (
            f"Model {model} was asked to forget {samples} (request {req['id']}) and version "
            f"{result['version']} was published without them; verdict {verdict['status']}"
        )
    else:
        reasons = "; ".join(verdict.get("reasons") or []) or "no reason recorded"
        head = (
            f"Model {model} was asked to forget {samples} (request {req['id']}) and nothing was "
            f"published; verdict {verdict['status']} ({reasons})"
        )
    forgetting = forgetting.strip().rstrip(".")
    return f"{head}. {forgetting[:1].upper()}{forgetting[1:]}."


def receipt_page(session: Session, settings: Settings, request_id: str) -> str:
    """The receipt as a self-contained HTML page (issued first if it was not yet)."""
    # matplotlib is imported on first use: most API processes never draw a page.
    from app.receipts import page

    stored = get_receipt(session, settings, request_id)
    job = job_of_receipt(session, stored.document)
    evidence, history = (job.evidence, job.history) if job is not None else (None, None)
    session.rollback()
    figures = page.build_plots(stored.document, evidence, history)
    return page.render(stored.document, sha256=stored.sha256, figures=figures)
