"""Helpers shared by the services: identifiers, cursors, canonical JSON, bulk SQL."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Table, insert, text
from sqlalchemy.orm import Session

from app.errors import BadRequest

T = TypeVar("T")
CHUNK = 5000


def new_id(prefix: str) -> str:
    """A time-ordered identifier: prefix, 12 hex digits of milliseconds, 16 random hex digits."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, UTF-8: the encoding that hashes are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a cursor-paginated list."""

    items: list[T]
    next_cursor: str | None


def encode_cursor(value: Any) -> str:
    """An opaque cursor for the last item's sort key."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Any:
    """The sort key a cursor stands for; 400 for garbage."""
    if not cursor:
        return None
    try:
        pad = "=" * (-len(cursor) % 4)
        return json.loads(base64.urlsafe_b64decode(cursor + pad))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("invalid cursor") from None


def is_postgres(session: Session) -> bool:
    """True when the session is bound to PostgreSQL."""
    return session.get_bind().dialect.name == "postgresql"


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` items."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def select_column_in(
    session: Session, sql: str, column_values: Sequence[str], params: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """Run `sql` (which filters with `:values` as an IN/ANY target) over many values.

    `sql` must contain the marker `{in}`, replaced by `= ANY(:values)` on PostgreSQL (one
    array parameter, however many values) or by `IN (...)` chunks on SQLite.
    """
    rows: list[tuple[Any, ...]] = []
    if not column_values:
        return rows
    if is_postgres(session):
        stmt = text(sql.replace("{in}", "= ANY(:values)"))
        return [tuple(r) for r in session.execute(stmt, {**params, "values": list(column_values)})]
    for part in chunks(column_values):
        names = [f"v{i}" for i in range(len(part))]
        stmt = text(sql.replace("{in}", "IN (" + ",".join(":" + n for n in names) + ")"))
        bound = dict(zip(names, part, strict=True))
        rows.extend(tuple(r) for r in session.execute(stmt, {**params, **bound}))
    return rows


def bulk_insert(session: Session, table: Table, rows: Iterable[dict[str, Any]]) -> int:
    """Insert many rows in the session's transaction: COPY on PostgreSQL, executemany else."""
    rows = list(rows)
    if not rows:
        return 0
    columns = list(rows[0])
    if is_postgres(session):
        dbapi = session.connection().connection.dbapi_connection
        assert dbapi is not None
        cols = ", ".join(f'"{c}"' for c in columns)
        with dbapi.cursor() as cur, cur.copy(f'COPY "{table.name}" ({cols}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row([row[c] for c in columns])
        return len(rows)
    for part in chunks(rows, 20000):
        session.execute(insert(table), list(part))
    return len(rows)
