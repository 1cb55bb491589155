"""Helpers shared by the services: identifiers, cursors, canonical JSON, bulk SQL."""

from __future__ import annotations

import base64
import json
import math
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Table, bindparam, insert, text
from sqlalchemy.orm import Session

from app.errors import BadRequest

T = TypeVar("T")
CHUNK = 5000
#: Above this many values PostgreSQL lookups hash-join a JSON array instead of probing the
#: index once per value (which is what small lists want).
JOIN_THRESHOLD = 2000
#: Below this many rows one multi-row INSERT beats COPY's extra round trips.
COPY_THRESHOLD = 200


def new_id(prefix: str) -> str:
    """A time-ordered identifier: prefix, 12 hex digits of milliseconds, 16 random hex digits."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def finite_json(obj: Any) -> Any:
    """`obj` with every non-finite float (inf, nan) replaced by None: JSON has no such
    numbers, and PostgreSQL refuses them in a JSON column."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


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


def decode_cursor(cursor: str | None, kind: type = str) -> Any:
    """The sort key a cursor stands for (of type `kind`); 400 for anything else."""
    if not cursor:
        return None
    try:
        pad = "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(cursor + pad))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("invalid cursor") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest("invalid cursor")
    return value


def table_of(entity: Any) -> Table:
    """The Core table of a mapped class: plain INSERT/UPDATE statements skip the ORM's
    bulk-persistence machinery, which costs more CPU than the round trip on hot paths."""
    return cast(Table, entity.__table__)


def is_postgres(session: Session) -> bool:
    """True when the session is bound to PostgreSQL."""
    return session.get_bind().dialect.name == "postgresql"


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` items."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _restricted(
    session: Session, table: str, column: str, values: Sequence[str], where: str, join: str = ""
) -> list[tuple[str, Any]]:
    """(FROM ... WHERE ... SQL, bound value) pairs covering `values`, alias `t` for `table`
    (followed by `join`, e.g. a LEFT JOIN that may refer to `t`).

    PostgreSQL: one statement. Small lists probe the index with `= ANY(:values)`; large ones
    hash-join a JSON array (encoding 100,000 strings as JSON is far cheaper than as a text[]
    parameter, and a join beats 100,000 probes). SQLite: `IN (...)` chunks.
    """
    if is_postgres(session):
        if len(values) > JOIN_THRESHOLD:
            sql = (
                f"FROM json_array_elements_text(CAST(:values AS json)) AS v(id) "
                f"JOIN {table} t ON t.{column} = v.id {join} WHERE {where}"
            )
            return [(sql, json.dumps(list(values)))]
        return [(f"FROM {table} t {join} WHERE t.{column} = ANY(:values) AND {where}", list(values))]
    return [
        (f"FROM {table} t {join} WHERE t.{column} IN :values AND {where}", list(part))
        for part in chunks(values)
    ]


def matching_values(
    session: Session,
    table: str,
    column: str,
    values: Sequence[str],
    *,
    where: str,
    params: dict[str, Any],
    select: str | None = None,
) -> list[tuple[Any, ...]]:
    """Rows of `table` whose `column` is one of `values` and that match `where`.

    `select` names the returned columns (default: `column`).
    """
    cols = ", ".join("t." + c.strip() for c in (select or column).split(","))
    return [tuple(r) for result in _select_matching(session, cols, table, column, values, where, params)
            for r in result]


def counts_matching(
    session: Session,
    table: str,
    column: str,
    values: Sequence[str],
    *,
    where: str,
    params: dict[str, Any],
    join: str = "",
    counts: Sequence[str] = ("count(*)",),
) -> tuple[int, ...]:
    """Several aggregates (`counts`, e.g. `count(x.col)` over a LEFT JOIN `join`) of the rows
    of `table` whose `column` is one of `values` (unique) and that match `where`, in one query."""
    totals = [0] * len(counts)
    for result in _select_matching(session, ", ".join(counts), table, column, values, where, params, join):
        totals = [total + int(v or 0) for total, v in zip(totals, result.one(), strict=True)]
    return tuple(totals)


def _select_matching(
    session: Session,
    columns: str,
    table: str,
    column: str,
    values: Sequence[str],
    where: str,
    params: dict[str, Any],
    join: str = "",
) -> Iterator[Any]:
    """`SELECT columns` over the rows of `table` matching `values` and `where`: one result per
    statement `_restricted` needs (one on PostgreSQL, one per chunk on SQLite)."""
    if not values:
        return
    with _hash_join(session, values):
        for sql, bound in _restricted(session, table, column, values, where, join):
            stmt = _with_values(text(f"SELECT {columns} {sql}"), session)
            yield session.execute(stmt, {**params, "values": bound})


@contextmanager
def _hash_join(session: Session, values: Sequence[str]) -> Iterator[None]:
    """For large lists on PostgreSQL, steer the planner off per-value index probes: it cannot
    know how many rows the JSON array holds and guesses 100."""
    big = len(values) > JOIN_THRESHOLD and is_postgres(session)
    if big:
        session.execute(text("SET LOCAL enable_nestloop = off"))
    try:
        yield
    finally:
        if big:
            session.execute(text("SET LOCAL enable_nestloop = on"))


def _with_values(stmt: Any, session: Session) -> Any:
    if is_postgres(session):
        return stmt
    return stmt.bindparams(bindparam("values", expanding=True))


def bulk_insert(
    session: Session, table: Table, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> int:
    """Insert many rows (value tuples in `columns` order) in the session's transaction: COPY on
    PostgreSQL for large batches, multi-row INSERTs otherwise."""
    rows = list(rows)
    if not rows:
        return 0
    if is_postgres(session) and len(rows) > COPY_THRESHOLD:
        dbapi: Any = session.connection().connection.dbapi_connection  # a psycopg connection
        assert dbapi is not None
        cols = ", ".join(f'"{c}"' for c in columns)
        with dbapi.cursor() as cur, cur.copy(f'COPY "{table.name}" ({cols}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(row)
        return len(rows)
    for part in chunks(rows, 20000):
        session.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in part])
    return len(rows)
