"""Idempotency keys for POSTs: the first response is replayed for 24 hours.

`begin` records the key as in flight in its own committed transaction, so a concurrent
duplicate hits the unique (principal, key) constraint and learns the key is taken: it gets
409 while the first is in flight, the stored response once it finished (same body), or 422
(different body). The creating transaction calls `finish` so the response is stored
atomically with what it describes; `abandon` frees the key when creation failed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import IdempotencyKey
from app.db.types import utcnow
from app.errors import IdempotencyInFlight, IdempotencyKeyMismatch, InvalidInput
from app.services.common import canonical_json

IN_FLIGHT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Replay:
    """A stored response to send again."""

    status_code: int
    body: dict[str, Any]


def body_hash(body: Any) -> str:
    """sha256 of the canonical JSON of a request body."""
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def begin(
    session: Session, principal: str, key: str, digest: str, *, ttl_s: float
) -> tuple[int, Replay | None]:
    """Claim `key` for this body; returns (row id, None) or (0, the stored response)."""
    if not key or len(key) > 200:
        raise InvalidInput("Idempotency-Key must be 1..200 characters", field="Idempotency-Key")
    for _ in range(3):
        now = utcnow()
        row = IdempotencyKey(
            principal=principal,
            key=key,
            body_hash=digest,
            state="in_flight",
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
        session.add(row)
        try:
            session.commit()
            return row.id, None
        except IntegrityError:
            session.rollback()
        existing = session.scalar(
            select(IdempotencyKey)
            .where(IdempotencyKey.principal == principal)
            .where(IdempotencyKey.key == key)
        )
        if existing is None:
            continue
        state, stored_hash = existing.state, existing.body_hash
        status_code, response = existing.status_code, existing.response
        stale_flight = existing.state == "in_flight" and (
            (now - existing.created_at).total_seconds() > IN_FLIGHT_TIMEOUT_S
        )
        if existing.expires_at < now or stale_flight:
            session.execute(delete(IdempotencyKey).where(IdempotencyKey.id == existing.id))
            session.commit()
            continue
        session.rollback()
        if stored_hash != digest:
            raise IdempotencyKeyMismatch("this Idempotency-Key was used with a different request body")
        if state == "in_flight":
            raise IdempotencyInFlight("the first request with this Idempotency-Key is in progress")
        assert response is not None and status_code is not None
        return 0, Replay(status_code, response)
    raise IdempotencyInFlight("could not claim the Idempotency-Key; retry")


def finish(session: Session, row_id: int, status_code: int, body: dict[str, Any], request_id: str) -> None:
    """Store the response in the caller's transaction."""
    row = session.get(IdempotencyKey, row_id)
    assert row is not None
    row.state, row.status_code, row.response, row.request_id = "done", status_code, body, request_id


def abandon(session: Session, row_id: int) -> None:
    """Forget an in-flight key whose request failed, so it can be retried."""
    session.rollback()
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.id == row_id))
    session.commit()


def purge_expired(session: Session) -> int:
    """Delete expired keys; returns how many."""
    res = session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < utcnow()))
    session.commit()
    return int(res.rowcount or 0)  # type: ignore[attr-defined]
