"""Signed webhooks for finished deletion requests: an outbox table plus a delivery loop.

When a request reaches a final status and named a `callback_url`, the same transaction adds a
row to `callback_deliveries`. `deliver_due` (run periodically in the API process) leases due
rows, POSTs the request resource signed per API.md (`webhook-id`, `webhook-timestamp`,
`webhook-signature: v1,<base64 HMAC-SHA256("id.timestamp.body")>` with the API key's webhook
secret), records every attempt as an audit event and reschedules failures with exponential
backoff until 24 hours after the request finished. OpenDSR status callbacks (kind `opendsr`,
queued by `app.services.opendsr_status`) go through the same outbox, signed instead with the
processor's key as the OpenDSR specification says (`X-OpenDSR-Signature`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import logging
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import CallbackDelivery, DeletionRequest
from app.db.types import utcnow
from app.errors import InvalidInput, LetheError
from app.opendsr.identity import load_identity
from app.services import opendsr_status
from app.services.apikeys import webhook_secret
from app.services.audit import append_event
from app.services.common import canonical_json, new_id
from app.services.transactions import read_only, unit_of_work
from app.services.views import request_public
from app.settings import Settings
from app.vocab import FINAL_REQUEST_STATUSES

log = logging.getLogger(__name__)

BASE_BACKOFF_S = 5.0
MAX_BACKOFF_S = 3600.0
LEASE_S = 60.0


def check_callback_url(url: str, settings: Settings) -> str:
    """https anywhere; plain http only to a loopback host in development."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("callback_url must be an absolute http(s) URL", field="callback_url")
    if parts.scheme == "http":
        host = parts.hostname
        loopback = host == "localhost"
        with contextlib.suppress(ValueError):
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        if settings.environment != "development" or not loopback:
            raise InvalidInput(
                "callback_url must use https (http only to loopback in development)",
                field="callback_url",
            )
    return url


def sign(secret: bytes, msg_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header value for one delivery."""
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def enqueue_callback(session: Session, req: DeletionRequest, model_name: str) -> None:
    """Queue the final-status webhook of `req` in the caller's transaction (if it has a URL),
    and the OpenDSR status callbacks of the OpenDSR request it fulfils (if its status moved)."""
    opendsr_status.on_request_change(session, req.opendsr_request_id)
    if not req.callback_url or req.status not in FINAL_REQUEST_STATUSES:
        return
    now = utcnow()
    session.add(
        CallbackDelivery(
            id=new_id("msg"),
            request_id=req.id,
            api_key_id=req.api_key_id,
            url=req.callback_url,
            payload=canonical_json(request_public(req, model_name)),
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


def backoff_s(attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failure."""
    return float(min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** max(0, attempts - 1)))


def deliver_due(
    sessions: sessionmaker[Session],
    settings: Settings,
    client: httpx.Client,
    *,
    limit: int = 20,
) -> int:
    """Attempt every due delivery once; returns how many were attempted."""
    now = utcnow()
    with sessions() as session, read_only(session):
        due = list(
            session.scalars(
                select(CallbackDelivery.id)
                .where(CallbackDelivery.status == "pending")
                .where(CallbackDelivery.next_attempt_at <= now)
                .order_by(CallbackDelivery.next_attempt_at)
                .limit(limit)
            )
        )
    attempted = 0
    for delivery_id in due:
        leased = _lease(sessions, delivery_id)
        if leased is None:
            continue
        attempted += 1
        url, payload, key_id, kind = leased
        if kind == "opendsr":
            ok, code, error = _post_opendsr(client, settings, url, payload)
        else:
            ok, code, error = _post(client, settings, delivery_id, url, payload, key_id)
        _record_attempt(sessions, settings, delivery_id, ok=ok, code=code, error=error)
    return attempted


def _lease(
    sessions: sessionmaker[Session], delivery_id: str
) -> tuple[str, str, str | None, str] | None:
    """Lease one pending delivery for `LEASE_S` seconds; its URL, payload, API key id and kind,
    or None when another process holds it (or it is no longer pending)."""
    with sessions() as session:
        with unit_of_work(session):
            leased = session.execute(
                update(CallbackDelivery)
                .where(CallbackDelivery.id == delivery_id)
                .where(CallbackDelivery.status == "pending")
                .where((CallbackDelivery.lease_until.is_(None)) | (CallbackDelivery.lease_until < utcnow()))
                .values(lease_until=utcnow() + timedelta(seconds=LEASE_S))
            )
        if leased.rowcount != 1:  # type: ignore[attr-defined]
            return None
        with read_only(session):
            row = session.get(CallbackDelivery, delivery_id)
            assert row is not None
            return row.url, row.payload, row.api_key_id, row.kind


def _post(
    client: httpx.Client, settings: Settings, delivery_id: str, url: str, payload: str, key_id: str | None
) -> tuple[bool, int | None, str | None]:
    """POST one signed delivery; (delivered, HTTP status if any, error if not delivered)."""
    ts = int(utcnow().timestamp())
    secret = webhook_secret(settings, key_id or "")
    headers = {
        "content-type": "application/json",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, delivery_id, ts, payload),
        "user-agent": "lethe-webhooks/1",
    }
    return _send(client, url, payload, headers)


def _post_opendsr(
    client: httpx.Client, settings: Settings, url: str, payload: str
) -> tuple[bool, int | None, str | None]:
    """POST one OpenDSR status callback signed with the processor key (specification §8.6)."""
    try:
        identity = load_identity(settings)
    except LetheError as exc:
        return False, None, exc.detail[:500]
    headers = {
        "content-type": "application/json",
        "x-opendsr-processor-domain": identity.domain,
        "x-opendsr-signature": identity.sign(payload.encode()),
        "user-agent": "lethe-opendsr/2",
    }
    return _send(client, url, payload, headers)


def _send(
    client: httpx.Client, url: str, payload: str, headers: dict[str, str]
) -> tuple[bool, int | None, str | None]:
    try:
        resp = client.post(url, content=payload, headers=headers)
    except httpx.HTTPError as exc:
        return False, None, f"{type(exc).__name__}: {exc}"[:500]
    code = resp.status_code
    ok = 200 <= code < 300
    return ok, code, None if ok else f"HTTP {code}"


def _record_attempt(
    sessions: sessionmaker[Session],
    settings: Settings,
    delivery_id: str,
    *,
    ok: bool,
    code: int | None,
    error: str | None,
) -> None:
    with sessions() as session, unit_of_work(session):
        row = session.get(CallbackDelivery, delivery_id)
        assert row is not None
        now = utcnow()
        row.attempts += 1
        row.last_status_code = code
        row.last_error = error
        row.lease_until = None
        if ok:
            row.status, row.delivered_at = "delivered", now
        else:
            next_at = now + timedelta(seconds=backoff_s(row.attempts))
            if (next_at - row.created_at).total_seconds() > settings.callback_max_age_s:
                row.status = "failed"
            row.next_attempt_at = next_at
        req = session.get(DeletionRequest, row.request_id)
        kind = "opendsr" if row.kind == "opendsr" else "request"
        data: dict[str, Any] = {
            "delivery_id": row.id,
            "url": row.url,
            "attempt": row.attempts,
            "status_code": code,
            "delivered": ok,
            "outcome": row.status,
        }
        if error:
            data["error"] = error
        append_event(
            session,
            actor="system",
            action="callback.attempted",
            subject=f"{kind}:{row.request_id}",
            request_id=row.request_id if req is not None else None,
            model=None if req is None else _model_name(session, req.model_id),
            data=data,
        )


def _model_name(session: Session, model_id: int) -> str | None:
    from app.db.models import ModelRow

    return session.scalar(select(ModelRow.name).where(ModelRow.id == model_id))
