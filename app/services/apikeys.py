"""API keys: creation (plain key shown once), hashed storage, scopes, revocation, lookup.

A key is `lethe_` + 32 random bytes (url-safe base64). Only its sha256 is stored; lookups go
through that digest and finish with a constant-time comparison. Each key also has a webhook
signing secret, derived from the deployment's signing secret and the key id (so it is never
stored) and shown once at creation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import ApiKey
from app.db.types import rfc3339, utcnow
from app.errors import AlreadyExists, InvalidInput, NotFound
from app.services.audit import append_event
from app.services.common import is_postgres, new_id
from app.services.transactions import read_only, unit_of_work
from app.settings import Settings
from app.vocab import Scope

SCOPES = tuple(Scope)
KEY_PREFIX = "lethe_"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    id: str
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """`admin` holds every scope."""
        return Scope.ADMIN in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class CreatedKey:
    """A new key; `key` and `webhook_secret` are never shown again."""

    id: str
    name: str
    scopes: list[str]
    key: str
    webhook_secret: str


def hash_key(key: str) -> str:
    """sha256 hex of a plain key."""
    return hashlib.sha256(key.encode()).hexdigest()


def webhook_secret(settings: Settings, api_key_id: str) -> bytes:
    """The HMAC key callbacks for requests made with this API key are signed with."""
    master = settings.webhook_signing_secret.get_secret_value().encode()
    return hmac.new(master, b"lethe.webhook:" + api_key_id.encode(), hashlib.sha256).digest()


def _scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted({s.strip() for s in scopes if s.strip()})
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown or not chosen:
        raise InvalidInput(f"scopes must be a non-empty subset of {list(SCOPES)}", unknown=unknown)
    return chosen


def create_api_key(
    session: Session,
    name: str,
    scopes: Iterable[str],
    *,
    actor: str = "cli",
    settings: Settings,
) -> CreatedKey:
    """Create a key and return it in plain text, once (`settings` sign its webhook secret)."""
    chosen = _scopes(scopes)
    if not name or len(name) > 100:
        raise InvalidInput("name must be 1..100 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"),
        name=name,
        key_hash=hash_key(key),
        prefix=key[: len(KEY_PREFIX) + 4],
        scopes=",".join(chosen),
        created_at=utcnow(),
    )
    with unit_of_work(session):
        session.add(row)
        try:
            session.flush()
        except IntegrityError:
            raise AlreadyExists(f"an API key named {name!r} exists") from None
        append_event(
            session,
            actor=actor,
            action="apikey.created",
            subject=f"apikey:{row.id}",
            data={"name": name, "scopes": chosen, "prefix": row.prefix},
        )
    secret = "whsec_" + base64.b64encode(webhook_secret(settings, row.id)).decode()
    return CreatedKey(row.id, name, chosen, key, secret)


def create_admin_key(session: Session, name: str = "admin", *, settings: Settings) -> CreatedKey:
    """Create a key with the `admin` scope (first start, CLI)."""
    return create_api_key(session, name, [Scope.ADMIN], settings=settings)


def revoke_api_key(session: Session, name_or_id: str, *, actor: str = "cli") -> dict[str, Any]:
    """Revoke a key by name or id; later requests with it get 401."""
    with unit_of_work(session):
        row = session.scalar(
            select(ApiKey).where((ApiKey.name == name_or_id) | (ApiKey.id == name_or_id))
        )
        if row is None:
            raise NotFound(f"no API key {name_or_id!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            append_event(
                session,
                actor=actor,
                action="apikey.revoked",
                subject=f"apikey:{row.id}",
                data={"name": row.name},
            )
    return key_public(row)


def key_public(row: ApiKey) -> dict[str, Any]:
    """What may be shown about a key (never its hash)."""
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "scopes": row.scopes.split(","),
        "created_at": rfc3339(row.created_at),
        "revoked_at": rfc3339(row.revoked_at),
    }


def list_api_keys(session: Session) -> list[dict[str, Any]]:
    """Every key, newest first."""
    with read_only(session):
        rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at.desc())).all()
        return [key_public(r) for r in rows]


def authenticate(session: Session, presented: str) -> Principal | None:
    """The principal for a presented key, or None if unknown or revoked.

    On SQLite the transaction ends here (every transaction there takes the write lock). On
    PostgreSQL it stays open for the handler, which saves the request a rollback, a pool
    check-out and its ping, and a BEGIN; PostgreSQL readers block no one.
    """
    digest = hash_key(presented)
    row = session.execute(
        select(ApiKey.id, ApiKey.name, ApiKey.key_hash, ApiKey.scopes, ApiKey.revoked_at).where(
            ApiKey.key_hash == digest
        )
    ).first()
    if not is_postgres(session):
        session.rollback()
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        return None
    return Principal(row.id, row.name, frozenset(row.scopes.split(",")))
