"""Fixtures for the worker tests: a migrated database, a model store, a tiny dataset.

Every test gets a fresh database: SQLite in its temp folder, or (for the tests parametrised
with `any_world`) its own PostgreSQL database (`pg_database_url` from `tests/conftest.py`),
which must be reachable: if it is not, those tests FAIL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sample_data import write_memorisation_dataset, write_tiny_dataset
from worker_world import World

from app.db import create_db_engine, create_session_factory
from app.db.migrate import upgrade
from app.services import datasets as dataset_service
from app.services.apikeys import Principal, create_api_key
from app.settings import Settings
from models_store import Store


def _world(
    tmp_path: Path, database_url: str | None, *, references: bool = False, reference_k: int = 2
) -> Iterator[World]:
    var = tmp_path / "var"
    settings = Settings(
        var_dir=var,
        database_url=database_url or "",
        run_background_loops=False,
        heartbeat_timeout_s=30.0,
        references=references,
        reference_k=reference_k,
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
        yield from _world(tmp_path, request.getfixturevalue("pg_database_url"))


@pytest.fixture
def ref_world(tmp_path: Path) -> Iterator[World]:
    """The embedded deployment with reference jobs on (K = 2)."""
    yield from _world(tmp_path, None, references=True)


@pytest.fixture(params=["sqlite", "postgres"])
def any_ref_world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """Reference jobs on (K = 2), once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield from _world(tmp_path, None, references=True)
    else:
        yield from _world(tmp_path, request.getfixturevalue("pg_database_url"), references=True)


@pytest.fixture
def memo_world(tmp_path: Path) -> Iterator[tuple[World, list[str]]]:
    """Reference jobs on with K = 4, and `memo` registered: the tiny dataset at 100 samples a
    class plus 32 training samples only memorisation classifies (their IDs come with it).

    32, not fewer: the references train under a fresh seed per job, and with 16 samples an
    unlucky draw left the forget-vs-control test near its 0.05 threshold (7/16 vs 1/16)."""
    for world in _world(tmp_path, None, references=True, reference_k=4):
        path, memorised = write_memorisation_dataset(
            tmp_path / "memo.npz", per_class=100, memorised=32
        )
        with world.sessions() as s:
            dataset_service.register_dataset(s, name="memo", kind="npz", uri=str(path),
                                             actor=world.principal.name)
        yield world, memorised
