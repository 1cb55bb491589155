"""Fixtures of the end-to-end tests: the tiny dataset and the PostgreSQL + Redis deployment.

PostgreSQL and Redis are required: if either is unreachable the tests that need them FAIL
(never skip). Server URLs: `LETHE_TEST_PG_ADMIN_URL` (default
`postgresql+psycopg://postgres@127.0.0.1:5432/postgres`) and `LETHE_TEST_REDIS_URL` (default
`redis://127.0.0.1:6379`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_harness import PG_ADMIN_URL, REDIS_URL, write_tiny_dataset


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The e2e dataset: 160 samples of 28x28, 4 classes, 120 train / 40 test."""
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture
def postgres_redis_env() -> Iterator[dict[str, str]]:
    """A fresh PostgreSQL database and an unused Redis database number; dropped afterwards."""
    import redis
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"lethe_e2e_{secrets.token_hex(6)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required and unreachable: {exc}")
    db_number = None
    try:
        for candidate in secrets.SystemRandom().sample(range(1, 16), 15):
            r = redis.Redis.from_url(f"{REDIS_URL}/{candidate}")
            if r.dbsize() == 0:
                db_number = candidate
                break
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Redis at {REDIS_URL} is required and unreachable: {exc}")
    if db_number is None:
        pytest.fail(f"no empty Redis database number on {REDIS_URL}")
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield {"LETHE_DATABASE_URL": url, "LETHE_BROKER_URL": f"{REDIS_URL}/{db_number}"}
    finally:
        redis.Redis.from_url(f"{REDIS_URL}/{db_number}").flushdb()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
