"""The OpenDSR processor interface: discovery, erasure intake, status, cancellation.

A controller (a privacy platform) posts an erasure for a data subject. Its identities map to
subject IDs by a configured rule (`opendsr_subject_identity_types`: the identity types whose
raw value is a subject ID; default `controller_customer_id`). The request fans out to one
deletion request per model, in one transaction: the model named by the extension's
`property_id`, or with `*` (the default) every model whose dataset holds a training sample
of the subject. Each deletion request then runs as any other (coalescing, verification,
receipt); the OpenDSR status is derived from them (`app.services.opendsr_status`) and
announced to the controller's `status_callback_urls`, signed with the processor key.
Other request types (`access`, `portability`) get the protocol's error answer: Lethe holds
no personal data to return, only models that must forget.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import DeletionRequest, ModelRow, OpendsrRequest
from app.db.types import rfc3339, utcnow
from app.errors import (
    NotCancellable,
    OpendsrRequestExists,
    OpendsrRequestNotFound,
    UnsupportedIdentity,
    UnsupportedRequestType,
)
from app.services import deletion_groups, deletions
from app.services.apikeys import Principal
from app.services.audit import append_event
from app.services.callbacks import check_callback_url
from app.services.opendsr_status import (
    API_VERSION,
    announce_if_changed,
    fulfilling_requests,
    status_body,
    status_of,
)
from app.services.transactions import read_only, unit_of_work
from app.settings import Settings
from app.vocab import OpendsrRequestType, OpendsrStatus, Scope

#: `property_id` meaning every model whose dataset knows the subject.
ALL_MODELS = deletion_groups.ALL_MODELS
#: The identity format Lethe can map to a subject (hashed formats cannot be reversed).
RAW = "raw"


def discovery(settings: Settings, certificate_url: str) -> dict[str, Any]:
    """The discovery document (specification §6.3)."""
    return {
        "api_version": API_VERSION,
        "supported_identities": [
            {"identity_type": t, "identity_format": RAW} for t in settings.opendsr_subject_identity_types
        ],
        "supported_subject_request_types": [OpendsrRequestType.ERASURE.value],
        "processor_certificate": certificate_url,
    }


@dataclass(frozen=True)
class Erasure:
    """An OpenDSR request as posted (already checked against its schema)."""

    subject_request_id: str
    subject_request_type: str
    regulation: str
    submitted_time: str
    subject_identities: list[dict[str, str]]
    status_callback_urls: list[str]
    extensions: dict[str, Any]

    def property_id(self, domain: str) -> str:
        """The model the controller names in its extension for this processor, or `*`."""
        mine = self.extensions.get(domain)
        value = mine.get("property_id") if isinstance(mine, dict) else None
        return str(value) if value not in (None, "") else ALL_MODELS


@dataclass(frozen=True)
class Accepted:
    """A created OpenDSR request: the response body (unsigned) and the jobs to enqueue."""

    body: dict[str, Any]
    enqueue_job_ids: list[str]


def submit_erasure(
    session: Session, erasure: Erasure, raw_body: bytes, *, principal: Principal, settings: Settings
) -> Accepted:
    """Accept an erasure (see the module docstring); 400 for another type or no usable
    identity, 409 when the `subject_request_id` is taken."""
    if erasure.subject_request_type != OpendsrRequestType.ERASURE:
        raise UnsupportedRequestType(
            f"subject_request_type {erasure.subject_request_type!r} is not supported; this "
            "processor fulfils erasure only",
            supported=[OpendsrRequestType.ERASURE.value],
        )
    subject_ids = _subject_ids(erasure, settings)
    for url in erasure.status_callback_urls:
        check_callback_url(url, settings)
    now = utcnow()
    with unit_of_work(session):
        if session.get(OpendsrRequest, erasure.subject_request_id) is not None:
            raise OpendsrRequestExists(f"subject_request_id {erasure.subject_request_id} exists")
        models = _target_models(session, erasure.property_id(settings.opendsr_domain), subject_ids)
        enqueue = _fan_out(session, erasure, models, subject_ids, principal, settings)
        row = _store(session, erasure, principal, settings, now, [m.name for m in models])
        body = _created_body(row, raw_body)
    return Accepted(body, enqueue)


def _subject_ids(erasure: Erasure, settings: Settings) -> list[str]:
    """The subject IDs the request's identities map to (raw values of the configured types)."""
    types = set(settings.opendsr_subject_identity_types)
    found = sorted({
        i["identity_value"]
        for i in erasure.subject_identities
        if i["identity_type"] in types and i["identity_format"] == RAW
    })
    if not found:
        raise UnsupportedIdentity(
            "no identity maps to a data subject; supported: "
            + ", ".join(f"{t} ({RAW})" for t in sorted(types)),
            supported=[{"identity_type": t, "identity_format": RAW} for t in sorted(types)],
        )
    return found


def _target_models(session: Session, property_id: str, subject_ids: list[str]) -> list[ModelRow]:
    """The named model, or with `*` every model whose dataset has a training sample of one of
    the subjects (by name)."""
    return deletion_groups.target_models(session, [property_id], [], subject_ids)


def _fan_out(
    session: Session,
    erasure: Erasure,
    models: list[ModelRow],
    subject_ids: list[str],
    principal: Principal,
    settings: Settings,
) -> list[str]:
    """One deletion request per model; the new jobs to enqueue."""
    enqueue: list[str] = []
    for model in models:
        _, job_id = deletions.accept_subjects_in_transaction(
            session,
            principal=principal,
            settings=settings,
            model=model.name,
            subject_ids=subject_ids,
            subject_ref=erasure.subject_request_id,
            reason=f"OpenDSR {erasure.regulation} erasure",
            opendsr_request_id=erasure.subject_request_id,
        )
        if job_id is not None:
            enqueue.append(job_id)
    return enqueue


def _store(
    session: Session,
    erasure: Erasure,
    principal: Principal,
    settings: Settings,
    now: Any,
    model_names: list[str],
) -> OpendsrRequest:
    """The OpenDSR row, its first announcement (when it completed at once) and its audit event."""
    row = OpendsrRequest(
        id=erasure.subject_request_id,
        api_key_id=principal.id,
        controller_id=principal.name,
        regulation=erasure.regulation,
        property_id=erasure.property_id(settings.opendsr_domain),
        identity_types=sorted({i["identity_type"] for i in erasure.subject_identities}),
        status_callback_urls=list(erasure.status_callback_urls),
        submitted_time=erasure.submitted_time,
        received_at=now,
        expected_completion_at=now + timedelta(days=settings.opendsr_expected_completion_days),
        cancelled_at=None,
        notified_status=OpendsrStatus.PENDING,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise OpendsrRequestExists(f"subject_request_id {erasure.subject_request_id} exists") from None
    announce_if_changed(session, row)
    append_event(
        session,
        actor=principal.name,
        action="opendsr.received",
        subject=f"opendsr:{row.id}",
        data={
            "regulation": row.regulation,
            "property_id": row.property_id,
            "identity_types": row.identity_types,
            "models": model_names,
            "request_ids": [r.id for r in fulfilling_requests(session, row.id)],
            "status": status_of(session, row).value,
        },
    )
    return row


def _created_body(row: OpendsrRequest, raw_body: bytes) -> dict[str, Any]:
    """The 201 body (specification §7.3), before its `processor_signature`."""
    return {
        "controller_id": row.controller_id,
        "expected_completion_time": rfc3339(row.expected_completion_at),
        "received_time": rfc3339(row.received_at),
        "encoded_request": base64.b64encode(raw_body).decode(),
        "subject_request_id": row.id,
        "api_version": API_VERSION,
    }


def _load(session: Session, subject_request_id: str, principal: Principal) -> OpendsrRequest:
    """The request, if `principal` sent it (or is an admin); else 404."""
    row = session.get(OpendsrRequest, subject_request_id)
    if row is None or (row.api_key_id != principal.id and Scope.ADMIN not in principal.scopes):
        raise OpendsrRequestNotFound(f"no OpenDSR request {subject_request_id}")
    return row


def get_status(session: Session, subject_request_id: str, principal: Principal) -> dict[str, Any]:
    """The status body (specification §8.3) plus the deletion request of each model."""
    with read_only(session):
        row = _load(session, subject_request_id, principal)
        body = status_body(session, row)
        body["deletion_requests"] = [_summary(session, r) for r in fulfilling_requests(session, row.id)]
    return body


def _summary(session: Session, req: DeletionRequest) -> dict[str, Any]:
    model = session.scalar(select(ModelRow.name).where(ModelRow.id == req.model_id))
    return {
        "id": req.id,
        "model": model,
        "status": req.status,
        "sample_count": req.sample_count,
        "result_version": req.result_version,
    }


def cancel(session: Session, subject_request_id: str, principal: Principal) -> dict[str, Any]:
    """Cancel a `pending` request and every deletion request fulfilling it; 409 otherwise."""
    with unit_of_work(session):
        row = _load(session, subject_request_id, principal)
        status = status_of(session, row)
        if status != OpendsrStatus.PENDING:
            raise NotCancellable(
                f"OpenDSR request {subject_request_id} is {status}; only pending requests can be "
                "cancelled",
                status_now=status.value,
            )
        now = utcnow()
        row.cancelled_at = now  # first: each cancellation below then derives `cancelled`
        for req in fulfilling_requests(session, row.id):
            deletions.cancel_in_transaction_request(session, req.id, actor=principal.name)
        announce_if_changed(session, row)
        append_event(
            session, actor=principal.name, action="opendsr.cancelled", subject=f"opendsr:{row.id}", data={}
        )
        return {
            "controller_id": row.controller_id,
            "subject_request_id": row.id,
            "received_time": rfc3339(now),
            "api_version": API_VERSION,
        }
