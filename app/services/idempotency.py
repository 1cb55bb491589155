"""Idempotency keys for POSTs: the first response is replayed for 24 hours.

`begin` claims the key in the caller's transaction, the same one that creates the resource
and stores its response (`finish`), so the key and what it stands for commit together, or
not at all: a request that fails, or whose process dies mid-way, leaves no trace, and the
client's retry with the same key simply runs.

A duplicate that arrives while the first is being created gets 409. On PostgreSQL the first
holds a transaction-scoped advisory lock on the (principal, key) pair, so the duplicate
learns this at once instead of waiting on the unique index, and the lock goes when that
transaction ends, however it ends. On SQLite every write transaction holds the database's
write lock (`BEGIN IMMEDIATE`), so a duplicate waits for the first and then replays it.
A duplicate that comes after the first committed gets the stored response (same body) or
422 (different body).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import IdempotencyKey
from app.db.types import utcnow
from app.errors import IdempotencyInFlight, IdempotencyKeyMismatch, InvalidInput
from app.services.common import canonical_json, is_postgres
from app.services.transactions import read_only, unit_of_work


@dataclass(frozen=True)
class Replay:
    """A stored response to send again."""

    status_code: int
    body: dict[str, Any]


def body_hash(body: Any) -> str:
    """sha256 of the canonical JSON of a request body."""
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _lock_id(principal: str, key: str) -> int:
    """A signed 64-bit advisory-lock id for the (principal, key) pair."""
    digest = hashlib.sha256(f"idempotency\0{principal}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def begin(
    session: Session, principal: str, key: str, digest: str, *, ttl_s: float
) -> tuple[IdempotencyKey | None, Replay | None]:
    """Claim `key` for this body inside the caller's unit of work.

    Returns (the claimed row, None): go on and create, then `finish` before committing. Or
    (None, the stored response) for a completed duplicate; nothing is then left to commit.
    """
    if not key or len(key) > 200:
        raise InvalidInput("Idempotency-Key must be 1..200 characters", field="Idempotency-Key")
    for _ in range(3):
        row = _claim(session, principal, key, digest, ttl_s=ttl_s)
        if row is not None:
            return row, None
        replay = _stored_response(session, principal, key, digest)
        if replay is not None:
            return None, replay
    raise IdempotencyInFlight("could not claim the Idempotency-Key; retry")


def _claim(
    session: Session, principal: str, key: str, digest: str, *, ttl_s: float
) -> IdempotencyKey | None:
    """The new in-flight row for (principal, key), flushed in the caller's transaction; None
    when the key exists (that transaction is then over: the failed insert ended it)."""
    if is_postgres(session):
        lock = _lock_id(principal, key)
        if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": lock}):
            raise IdempotencyInFlight("the first request with this Idempotency-Key is in progress")
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
        session.flush()
    except IntegrityError:
        # The only rollback outside `transactions`: a failed INSERT leaves the transaction
        # unusable, and the key's owner is then read in a fresh one.
        session.rollback()
        return None
    return row


def _stored_response(session: Session, principal: str, key: str, digest: str) -> Replay | None:
    """The response stored under an existing key, or 422 for a different body; None when no
    key is left (it was removed meanwhile, or it had expired and is removed now)."""
    with read_only(session):
        existing = session.scalar(
            select(IdempotencyKey)
            .where(IdempotencyKey.principal == principal)
            .where(IdempotencyKey.key == key)
        )
        if existing is None:
            return None
        # A committed row is always a finished one: the claim commits with its response.
        row_id, stored_hash, expires_at = existing.id, existing.body_hash, existing.expires_at
        status_code, response = existing.status_code, existing.response
    if expires_at < utcnow():
        with unit_of_work(session):
            session.execute(delete(IdempotencyKey).where(IdempotencyKey.id == row_id))
        return None
    if stored_hash != digest:
        raise IdempotencyKeyMismatch("this Idempotency-Key was used with a different request body")
    assert response is not None and status_code is not None
    return Replay(status_code, response)


def finish(row: IdempotencyKey, status_code: int, body: dict[str, Any], request_id: str) -> None:
    """Store the response on the claimed row; it commits with the caller's transaction."""
    row.state, row.status_code, row.response, row.request_id = "done", status_code, body, request_id


def purge_expired(session: Session) -> int:
    """Delete expired keys; returns how many."""
    with unit_of_work(session):
        res = session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < utcnow()))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]
