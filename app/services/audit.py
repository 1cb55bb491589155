"""The append-only, hash-chained audit log.

Each event stores the previous event's hash and its own: sha256 over the canonical JSON of
`{seq, at, actor, action, subject, model, request_id, data, prev_hash}`. Appends are
serialised (an advisory transaction lock on PostgreSQL; SQLite transactions are already
exclusive), and database triggers refuse UPDATE and DELETE. `verify_chain` recomputes every
hash and link, so an edit made behind the triggers' back is found with its sequence number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from app.db.models import AuditEvent
from app.db.types import rfc3339, utcnow
from app.services.common import Page, canonical_json, decode_cursor, encode_cursor, is_postgres, table_of
from app.services.transactions import read_only

GENESIS = "0" * 64
_LOCK_KEY = 0x4C45544845  # "LETHE"


def event_hash(
    *,
    seq: int,
    at: str,
    actor: str,
    action: str,
    subject: str,
    model: str | None,
    request_id: str | None,
    data: Any,
    prev_hash: str,
) -> str:
    """The hash an event with these fields must carry."""
    doc = {
        "seq": seq,
        "at": at,
        "actor": actor,
        "action": action,
        "subject": subject,
        "model": model,
        "request_id": request_id,
        "data": data,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


@dataclass(frozen=True)
class Event:
    """One audit event to append: who did what to which subject, with its data."""

    actor: str
    action: str
    subject: str
    data: dict[str, Any] | None = None
    model: str | None = None
    request_id: str | None = None


def append_events(session: Session, events: Sequence[Event]) -> None:
    """Add `events`, in order, to the chain inside the caller's transaction (committed with it).

    One INSERT for all of them. Call it late in a transaction: on PostgreSQL it holds the chain
    lock until commit. The head is remembered for the rest of the transaction, so later
    appends in it cost one INSERT too.
    """
    if not events:
        return
    txn = session.get_transaction()
    cached = session.info.get("audit_head")
    if cached is not None and txn is not None and cached[0] is txn:
        seq, prev = cached[1], cached[2]
    else:
        if is_postgres(session):
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        head = session.execute(
            select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
        ).first()
        seq, prev = (head[0], head[1]) if head else (0, GENESIS)
    at = rfc3339(utcnow())
    assert at is not None
    rows = []
    for e in events:
        seq += 1
        payload = json.loads(canonical_json(e.data or {}))
        fields: dict[str, Any] = dict(
            seq=seq, at=at, actor=e.actor, action=e.action, subject=e.subject, model=e.model,
            request_id=e.request_id, prev_hash=prev,
        )
        prev = event_hash(**fields, data=payload)
        rows.append({**fields, "data": canonical_json(payload), "hash": prev})
    session.execute(insert(table_of(AuditEvent)), rows)  # executemany: one multi-row INSERT
    session.info["audit_head"] = (session.get_transaction(), seq, prev)


def append_event(
    session: Session,
    *,
    actor: str,
    action: str,
    subject: str,
    data: dict[str, Any] | None = None,
    model: str | None = None,
    request_id: str | None = None,
) -> None:
    """Add one event to the chain in the caller's transaction (see `append_events`)."""
    append_events(session, [Event(actor, action, subject, data, model, request_id)])


def event_public(e: AuditEvent) -> dict[str, Any]:
    """The API shape of an event."""
    return {
        "seq": e.seq,
        "at": e.at,
        "actor": e.actor,
        "action": e.action,
        "subject": e.subject,
        "model": e.model,
        "request_id": e.request_id,
        "data": json.loads(e.data),
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    }


@dataclass(frozen=True)
class ChainReport:
    """The outcome of re-verifying the chain."""

    ok: bool
    checked: int
    head_seq: int | None
    head_hash: str | None
    first_bad_seq: int | None

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the API."""
        return {
            "ok": self.ok,
            "checked": self.checked,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "first_bad_seq": self.first_bad_seq,
        }


def verify_chain(session: Session) -> ChainReport:
    """Recompute every hash and link; the first event that does not fit is reported."""
    prev_hash, prev_seq = GENESIS, 0
    checked = 0
    first_bad: int | None = None
    head_seq: int | None = None
    head_hash: str | None = None
    stmt = select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=2000)
    with read_only(session):
        for e in session.scalars(stmt):
            checked += 1
            head_seq, head_hash = e.seq, e.hash
            if first_bad is None and not _fits(e, prev_seq, prev_hash):
                first_bad = e.seq
            prev_hash, prev_seq = e.hash, e.seq
    return ChainReport(first_bad is None, checked, head_seq, head_hash, first_bad)


def _fits(e: AuditEvent, prev_seq: int, prev_hash: str) -> bool:
    """True when `e` follows the event (`prev_seq`, `prev_hash`) and carries its own hash."""
    try:
        data = json.loads(e.data)
    except json.JSONDecodeError:
        return False
    expected = event_hash(
        seq=e.seq,
        at=e.at,
        actor=e.actor,
        action=e.action,
        subject=e.subject,
        model=e.model,
        request_id=e.request_id,
        data=data,
        prev_hash=e.prev_hash,
    )
    return e.seq == prev_seq + 1 and e.prev_hash == prev_hash and e.hash == expected


def _filtered(model: str | None, request_id: str | None, action: str | None, since: datetime | None) -> Any:
    stmt = select(AuditEvent)
    if model:
        stmt = stmt.where(AuditEvent.model == model)
    if request_id:
        stmt = stmt.where(AuditEvent.request_id == request_id)
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    if since:
        if since.tzinfo is None:  # a bare timestamp is read as UTC, like every stored one
            since = since.replace(tzinfo=UTC)
        stmt = stmt.where(AuditEvent.at >= rfc3339(since))
    return stmt


def list_events(
    session: Session,
    *,
    model: str | None = None,
    request_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page[dict[str, Any]]:
    """Events in chain order, filtered, one page at a time."""
    stmt = _filtered(model, request_id, action, since)
    after = decode_cursor(cursor, int)
    if after is not None:
        stmt = stmt.where(AuditEvent.seq > int(after))
    with read_only(session):
        rows = list(session.scalars(stmt.order_by(AuditEvent.seq).limit(limit + 1)))
        more = len(rows) > limit
        items = [event_public(e) for e in rows[:limit]]
    return Page(items, encode_cursor(items[-1]["seq"]) if more and items else None)


def export_events(
    session: Session,
    *,
    model: str | None = None,
    request_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
) -> Iterator[str]:
    """JSON Lines of the whole (filtered) chain, read in batches."""
    stmt = _filtered(model, request_id, action, since)
    after = 0
    while True:
        with read_only(session):
            batch = stmt.where(AuditEvent.seq > after).order_by(AuditEvent.seq).limit(2000)
            rows = list(session.scalars(batch))
            lines = [canonical_json(event_public(e)) + "\n" for e in rows]
        if not rows:
            return
        yield from lines
        after = json.loads(lines[-1])["seq"]
