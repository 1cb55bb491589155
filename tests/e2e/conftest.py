"""Fixtures of the end-to-end tests: the tiny dataset and the PostgreSQL + Redis settings.

The database and Redis fixtures (`pg_database_url`, `redis_url`) come from `tests/conftest.py`:
a fresh PostgreSQL database with a random name and an empty, claimed Redis database number.
If either server is unreachable the test FAILS, never skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sample_data import write_tiny_dataset


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The e2e dataset: 160 samples of 28x28, 4 classes, 120 train / 40 test."""
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture
def postgres_redis_env(pg_database_url: str, redis_url: str) -> dict[str, str]:
    """`lethe serve` settings for PostgreSQL (own database) and Redis (own db number)."""
    return {"LETHE_DATABASE_URL": pg_database_url, "LETHE_BROKER_URL": redis_url}
