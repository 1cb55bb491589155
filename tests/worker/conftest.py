"""Fixtures for the worker tests: a migrated database, a model store, a tiny dataset.

Every test gets a fresh database: SQLite in its temp folder, or (for the tests parametrised
with `any_world`) a PostgreSQL database with a random name, created and dropped around it.
PostgreSQL must be reachable (`LETHE_TEST_PG_ADMIN_URL`, default
`postgresql+psycopg://postgres@127.0.0.1:5432/postgres`); if it is not, those tests FAIL.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from worker_world import World, write_tiny_dataset

from app.db import create_db_engine, create_session_factory
from app.db.migrate import upgrade
from app.services import datasets as dataset_service
from app.services.apikeys import Principal, create_api_key
from app.settings import Settings
from models_store import Store

PG_ADMIN_URL = os.environ.get(
    "LETHE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database (random name), dropped after the test."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"lethe_worker_{secrets.token_hex(6)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required and unreachable: {exc}")
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _world(tmp_path: Path, database_url: str | None) -> Iterator[World]:
    var = tmp_path / "var"
    settings = Settings(
        var_dir=var,
        database_url=database_url or "",
        run_background_loops=False,
        heartbeat_timeout_s=30.0,
    )
    upgrade(settings.database_url)
    engine = create_db_engine(settings.database_url)
    sessions = create_session_factory(engine)
    with sessions() as s:
        key = create_api_key(s, "test-admin", ["admin"], settings=settings)
    principal = Principal(key.id, key.name, frozenset(key.scopes))
    dataset_path = write_tiny_dataset(tmp_path / "tiny.npz")
    with sessions() as s:
        dataset_service.register_dataset(
            s, name="tiny", kind="npz", uri=str(dataset_path), actor=principal.name
        )
    try:
        yield World(settings, sessions, Store(settings.store_path), principal, dataset_path)
    finally:
        engine.dispose()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """The embedded deployment (SQLite) with the tiny dataset registered."""
    yield from _world(tmp_path, None)


@pytest.fixture(params=["sqlite", "postgres"])
def any_world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """The same, once on SQLite and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield from _world(tmp_path, None)
    else:
        yield from _world(tmp_path, request.getfixturevalue("pg_url"))
