"""Shared fixtures: real databases (SQLite always; PostgreSQL and Redis required), a
migrated deployment, tiny datasets and numpy-built checkpoints of the right shapes.

PostgreSQL (`LETHE_TEST_PG_ADMIN_URL`, default `postgresql+psycopg://postgres@127.0.0.1:5432/
postgres`) and Redis (`LETHE_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`) must be
reachable: a test that needs them FAILS when they are not, it never skips. Each test gets its
own PostgreSQL database, cloned from a migrated template made once per session (random
names, dropped at the end), so concurrent runs on one server never share data.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

PG_ADMIN_URL = os.environ.get(
    "LETHE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("LETHE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
LENIENT_POLICY = {"max_acc_test_drop": 1.0, "max_gap": None, "max_avg_gap": None}
RECIPE = {"optimizer": "sgd", "lr": 0.05, "epochs": 2, "batch_size": 32, "seed": 0}


# -- data helpers ------------------------------------------------------------------------------


def write_npz_dataset(path: Path, *, per_class: int = 40, classes: int = 4) -> Path:
    """`per_class * classes` 28x28 samples `s0000...`; 3/4 of each class train, 1/4 test."""
    rng = np.random.default_rng(0)
    n = per_class * classes
    labels = np.repeat(np.arange(classes), per_class)
    x = rng.integers(0, 255, size=(n, 28, 28)).astype(np.uint8)
    split = np.where(np.arange(n) % per_class < per_class * 3 // 4, "train", "test")
    ids = np.asarray([f"s{i:04d}" for i in range(n)])
    np.savez(path, x=x, y=labels.astype(np.int64), ids=ids, split=split)
    return path


def split_ids(path: Path) -> tuple[list[str], list[str]]:
    """(train IDs, test IDs) of a dataset written by `write_npz_dataset`."""
    data = np.load(path)
    train = [str(i) for i, s in zip(data["ids"], data["split"], strict=True) if s == "train"]
    test = [str(i) for i, s in zip(data["ids"], data["split"], strict=True) if s == "test"]
    return train, test


def checkpoint_bytes(
    arch: str = "small_cnn",
    num_classes: int = 4,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    *,
    seed: int = 0,
    dtype: Any = np.float32,
    prefix: str = "",
) -> bytes:
    """A safetensors file with every tensor `arch` needs, filled with seeded noise."""
    from safetensors.numpy import save

    from engine.arch_shapes import param_shapes

    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(arch, num_classes, input_shape).items():
        if name.endswith("num_batches_tracked"):
            tensors[prefix + name] = np.asarray(0, dtype=np.int64).reshape(shape)
        else:
            tensors[prefix + name] = rng.standard_normal(shape).astype(dtype)
    return bytes(save(tensors))


# -- servers -----------------------------------------------------------------------------------


def _admin_engine() -> Any:
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def _create_database(name: str, template: str | None = None) -> None:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            tmpl = f' TEMPLATE "{template}"' if template else ""
            conn.execute(text(f'CREATE DATABASE "{name}"{tmpl}'))
    except Exception as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required and unusable: {exc}")
    finally:
        engine.dispose()


def _drop_database(name: str) -> None:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def pg_url_for(name: str) -> str:
    """The URL of database `name` on the test server."""
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database that per-test databases are cloned from."""
    from app.db.migrate import upgrade

    name = f"lethe_tmpl_{secrets.token_hex(6)}"
    _create_database(name)
    try:
        upgrade(pg_url_for(name))
        yield name
    finally:
        _drop_database(name)


@pytest.fixture
def pg_database_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database of this test's own; dropped afterwards."""
    name = f"lethe_test_{secrets.token_hex(6)}"
    _create_database(name, template=pg_template)
    try:
        yield pg_url_for(name)
    finally:
        _drop_database(name)


@pytest.fixture
def empty_pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (for migration tests)."""
    name = f"lethe_empty_{secrets.token_hex(6)}"
    _create_database(name)
    try:
        yield pg_url_for(name)
    finally:
        _drop_database(name)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """An empty Redis database number on the test server; flushed afterwards."""
    import redis

    chosen = None
    try:
        for candidate in secrets.SystemRandom().sample(range(1, 16), 15):
            r = redis.Redis.from_url(f"{REDIS_URL}/{candidate}", socket_timeout=5)
            if r.dbsize() == 0:
                r.set("lethe:test:claim", "1", ex=600)
                chosen = candidate
                break
    except Exception as exc:
        pytest.fail(f"Redis at {REDIS_URL} is required and unreachable: {exc}")
    if chosen is None:
        pytest.fail(f"no empty Redis database number on {REDIS_URL}")
    try:
        yield f"{REDIS_URL}/{chosen}"
    finally:
        redis.Redis.from_url(f"{REDIS_URL}/{chosen}").flushdb()


# -- a deployment ------------------------------------------------------------------------------


@dataclass
class Deployment:
    """One test's Lethe: settings, sessions, store, an admin principal and key, a dataset."""

    settings: Any
    engine: Any
    sessions: sessionmaker[Session]
    store: Any
    principal: Any
    admin_key: str
    dataset_path: Path
    dataset: str = "tiny"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        """`sqlite` or `postgresql`."""
        return self.engine.dialect.name

    def ids(self) -> tuple[list[str], list[str]]:
        """(train IDs, test IDs) of the registered dataset."""
        return split_ids(self.dataset_path)

    def upload_model(self, name: str = "m", *, policy: dict[str, Any] | None = None) -> None:
        """Register `name` with an uploaded small_cnn checkpoint (version 1)."""
        import io

        from app.services import models

        with self.sessions() as s:
            models.register_model_upload(
                s,
                self.store,
                principal=self.principal,
                name=name,
                dataset=self.dataset,
                architecture="small_cnn",
                num_classes=4,
                recipe=RECIPE,
                checkpoint=io.BytesIO(checkpoint_bytes()),
                settings=self.settings,
                policy=LENIENT_POLICY if policy is None else policy,
            )

    def submit(self, model: str, ids: list[str], **kw: Any) -> Any:
        """Submit a deletion request through the service; returns `Submitted`."""
        from app.services import deletions

        with self.sessions() as s:
            return deletions.submit_deletion_request(
                s,
                principal=self.principal,
                settings=self.settings,
                model=model,
                sample_ids=ids,
                **kw,
            )

    def complete(self, job_id: str, weights: bytes, **evidence: Any) -> Any:
        """Finish a claimed job through the service with canned evidence (`evidence`
        overrides any of it); returns the `CompletionResult`."""
        from app.services import jobs

        args: dict[str, Any] = dict(
            weights=weights,
            metrics={"acc_forget": 0.5, "acc_retain": 0.97, "acc_test": 0.95, "mia_forget": 0.4},
            reference=None,
            gaps=None,
            history=[{"step": 1}],
            method="feature_constraint",
            method_config={"balancer": "dwa"},
            teacher_seed=7,
            seconds=1.5,
            steps=10,
            device="cpu",
        )
        args.update(evidence)
        with self.sessions() as s:
            return jobs.complete_job(s, self.store, job_id, **args)

    def register_with_subjects(self, name: str, owners: dict[str, list[str]]) -> None:
        """Register a copy of the tiny dataset as `name`, whose samples belong to the subjects
        of `owners` (subject -> sample IDs; the rest to nobody), and make it the default."""
        from app.services import datasets

        data = dict(np.load(self.dataset_path))
        owner = {s: subject for subject, ids in owners.items() for s in ids}
        data["subjects"] = np.asarray([owner.get(str(i), "") for i in data["ids"]])
        path = self.dataset_path.with_name(f"{name}.npz")
        np.savez(path, **data)
        with self.sessions() as s:
            datasets.register_dataset(s, name=name, kind="npz", uri=str(path), actor="test")
        self.dataset = name

    def key(self, scopes: list[str], name: str | None = None) -> str:
        """A new API key with `scopes`."""
        from app.services.apikeys import create_api_key

        with self.sessions() as s:
            return create_api_key(s, name or f"k-{secrets.token_hex(4)}", scopes, settings=self.settings).key


def make_deployment(tmp_path: Path, database_url: str | None, **settings_kw: Any) -> Deployment:
    """Migrate, create an admin key and register the tiny npz dataset as `tiny`.

    Reference jobs are off unless a test asks for them (`references=True`): they cost K
    trainings per registered model."""
    from app.db import create_db_engine, create_session_factory
    from app.db.migrate import upgrade
    from app.services import datasets
    from app.services.apikeys import Principal, create_api_key
    from app.settings import Settings
    from models_store import Store

    settings = Settings(
        var_dir=tmp_path / "var",
        database_url=database_url or "",
        run_background_loops=False,
        **{"references": False, **settings_kw},
    )
    if database_url is None:
        upgrade(settings.database_url)
    engine = create_db_engine(settings.database_url)
    sessions = create_session_factory(engine)
    with sessions() as s:
        created = create_api_key(s, "test-admin", ["admin"], settings=settings)
    principal = Principal(created.id, created.name, frozenset(created.scopes))
    path = write_npz_dataset(tmp_path / "tiny.npz")
    with sessions() as s:
        datasets.register_dataset(s, name="tiny", kind="npz", uri=str(path), actor="test-admin")
    return Deployment(settings, engine, sessions, Store(settings.store_path), principal, created.key, path)


@pytest.fixture(params=["sqlite", "postgresql"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """A migrated deployment, once on SQLite and once on a fresh PostgreSQL database."""
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_database_url")
    dep = make_deployment(tmp_path, url)
    try:
        yield dep
    finally:
        dep.engine.dispose()


@pytest.fixture
def sqlite_deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A migrated SQLite deployment."""
    dep = make_deployment(tmp_path, None)
    try:
        yield dep
    finally:
        dep.engine.dispose()


@pytest.fixture
def pg_deployment(tmp_path: Path, pg_database_url: str) -> Iterator[Deployment]:
    """A migrated PostgreSQL deployment."""
    dep = make_deployment(tmp_path, pg_database_url)
    try:
        yield dep
    finally:
        dep.engine.dispose()


@pytest.fixture
def deployment_factory() -> Any:
    """`make_deployment` as a fixture, for tests that need other settings (tests import no
    helpers from conftest: which `conftest` module that name finds depends on collection)."""
    return make_deployment


@pytest.fixture
def make_checkpoint() -> Any:
    """`checkpoint_bytes` as a fixture (tests import no helpers from conftest)."""
    return checkpoint_bytes
