"""An OpenDSR request's status, derived from its deletion requests, and its announcement.

OpenDSR (specification §8) knows four statuses. One OpenDSR request is fulfilled by one
deletion request per model; its status is:

- `cancelled`  the controller cancelled it, or every deletion request was cancelled;
- `completed`  no model holds the subject, or every deletion request is final, at least one
               succeeded and none failed;
- `pending`    every deletion request still waits (`accepted` or `queued`);
- `in_progress` anything else: a job runs, or one failed and awaits an operator (OpenDSR
               has no failed status; the erasure is still owed, so it stays in progress).

Whenever that status changes, a signed callback to every `status_callback_urls` entry is
queued in the same transaction (the outbox `callback_deliveries`, kind `opendsr`); the
delivery loop signs it with the processor key and retries it like Lethe's own webhooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import CallbackDelivery, DeletionRequest, OpendsrRequest
from app.db.types import rfc3339, utcnow
from app.services.common import canonical_json, new_id
from app.vocab import FINAL_REQUEST_STATUSES, OpendsrStatus, RequestStatus

API_VERSION = "2.0"
_WAITING = frozenset({RequestStatus.ACCEPTED, RequestStatus.QUEUED})


def derive_status(cancelled_at: datetime | None, statuses: Sequence[str]) -> OpendsrStatus:
    """The OpenDSR status of a request whose deletion requests have `statuses`."""
    if cancelled_at is not None or (statuses and all(s == RequestStatus.CANCELLED for s in statuses)):
        return OpendsrStatus.CANCELLED
    if not statuses:
        return OpendsrStatus.COMPLETED
    if all(s in _WAITING for s in statuses):
        return OpendsrStatus.PENDING
    done = all(s in FINAL_REQUEST_STATUSES for s in statuses)
    if done and RequestStatus.SUCCEEDED in statuses and RequestStatus.FAILED not in statuses:
        return OpendsrStatus.COMPLETED
    return OpendsrStatus.IN_PROGRESS


def fulfilling_requests(session: Session, opendsr_id: str) -> list[DeletionRequest]:
    """The deletion requests that fulfil an OpenDSR request, by id."""
    return list(
        session.scalars(
            select(DeletionRequest)
            .where(DeletionRequest.opendsr_request_id == opendsr_id)
            .order_by(DeletionRequest.id)
        )
    )


def status_of(session: Session, row: OpendsrRequest) -> OpendsrStatus:
    """The current OpenDSR status of `row`."""
    return derive_status(row.cancelled_at, [r.status for r in fulfilling_requests(session, row.id)])


def status_body(session: Session, row: OpendsrRequest) -> dict[str, Any]:
    """The status members OpenDSR's status response and callbacks share (§8.3, §8.6)."""
    requests = fulfilling_requests(session, row.id)
    status = derive_status(row.cancelled_at, [r.status for r in requests])
    body: dict[str, Any] = {
        "controller_id": row.controller_id,
        "expected_completion_time": rfc3339(row.expected_completion_at),
        "subject_request_id": row.id,
        "request_status": status.value,
        "api_version": API_VERSION,
    }
    if status == OpendsrStatus.COMPLETED:
        body["results_count"] = sum(r.sample_count for r in requests)
    return body


def announce_if_changed(session: Session, row: OpendsrRequest) -> None:
    """Queue a callback to each of the row's URLs when its status moved since the last one."""
    body = status_body(session, row)
    if body["request_status"] == row.notified_status:
        return
    row.notified_status = body["request_status"]
    now = utcnow()
    for url in row.status_callback_urls:
        payload = {**body, "status_callback_url": url}
        session.add(
            CallbackDelivery(
                id=new_id("msg"),
                request_id=row.id,
                api_key_id=row.api_key_id,
                url=url,
                payload=canonical_json(payload),
                kind="opendsr",
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    session.flush()


def on_request_change(session: Session, opendsr_id: str | None) -> None:
    """A deletion request of `opendsr_id` changed status: announce the OpenDSR status if it
    moved (no-op for requests that did not come through OpenDSR)."""
    if opendsr_id is None:
        return
    session.flush()
    row = session.get(OpendsrRequest, opendsr_id)
    if row is not None:
        announce_if_changed(session, row)
