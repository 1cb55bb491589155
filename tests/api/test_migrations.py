"""Migrations from empty to head on SQLite and PostgreSQL; the audit triggers; tamper checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

from app.db import create_db_engine
from app.db.migrate import at_head, current_revision, downgrade, head_revision, upgrade
from app.db.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    url: str = request.getfixturevalue("empty_pg_url")
    return url


def test_empty_to_head_matches_the_models_and_downgrades(empty_url: str) -> None:
    engine = create_db_engine(empty_url)
    try:
        assert current_revision(engine) is None
        upgrade(empty_url)
        assert current_revision(engine) == head_revision()
        assert at_head(engine)
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"migrations and models differ: {diff}"
        downgrade(empty_url, "base")
        assert current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(empty_url)
        assert at_head(engine)
    finally:
        engine.dispose()


def _insert_event(conn, seq: int) -> None:  # type: ignore[no-untyped-def]
    conn.execute(
        text(
            "INSERT INTO audit_events (seq, at, actor, action, subject, data, prev_hash, hash) "
            "VALUES (:s, '2026-01-01T00:00:00.000000Z', 'a', 'x', 's', '{}', :p, :h)"
        ),
        {"s": seq, "p": "0" * 64, "h": "1" * 64},
    )


def test_audit_triggers_refuse_update_and_delete(empty_url: str) -> None:
    upgrade(empty_url)
    engine = create_db_engine(empty_url)
    try:
        with engine.begin() as conn:
            _insert_event(conn, 1)
        for stmt in (
            "UPDATE audit_events SET actor = 'mallory' WHERE seq = 1",
            "DELETE FROM audit_events WHERE seq = 1",
        ):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(stmt))
        if engine.dialect.name == "postgresql":
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text("TRUNCATE audit_events"))
        with engine.connect() as conn:
            row = conn.execute(text("SELECT actor, count(*) FROM audit_events GROUP BY actor")).one()
        assert tuple(row) == ("a", 1)
    finally:
        engine.dispose()
