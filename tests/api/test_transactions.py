"""The services' unit of work: it commits what its block did, or nothing when the block
raises; a read-only block always ends its transaction and keeps no write."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, insert, select
from sqlalchemy.orm import Session, sessionmaker

from app.services.transactions import read_only, unit_of_work

METADATA = MetaData()
ROWS = Table("rows", METADATA, Column("n", Integer, primary_key=True))


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = create_engine(f"sqlite:///{tmp_path / 't.db'}")
    METADATA.create_all(engine)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def _stored(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as s:
        return list(s.scalars(select(ROWS.c.n).order_by(ROWS.c.n)))


def test_a_block_that_ends_normally_commits(sessions: sessionmaker[Session]) -> None:
    def add(session: Session, n: int) -> int:
        with unit_of_work(session):
            session.execute(insert(ROWS).values(n=n))
            return n  # a return inside the block commits too

    with sessions() as s:
        with unit_of_work(s):
            s.execute(insert(ROWS).values(n=1))
        assert not s.in_transaction()
        assert add(s, 2) == 2
    assert _stored(sessions) == [1, 2]


def test_a_block_that_raises_leaves_nothing_and_the_error_goes_on(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as s:
        with pytest.raises(LookupError), unit_of_work(s):
            s.execute(insert(ROWS).values(n=1))
            raise LookupError("refused")
        assert not s.in_transaction()
        with unit_of_work(s):  # the session is usable again at once
            s.execute(insert(ROWS).values(n=2))
    assert _stored(sessions) == [2]


def test_a_failing_statement_undoes_the_whole_block(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        with pytest.raises(Exception, match="UNIQUE"), unit_of_work(s):
            s.execute(insert(ROWS).values(n=1))
            s.execute(insert(ROWS).values(n=1))
        assert not s.in_transaction()
    assert _stored(sessions) == []


def test_a_read_only_block_ends_its_transaction_and_keeps_no_write(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as s:
        with read_only(s):
            s.execute(insert(ROWS).values(n=1))
            assert s.scalar(select(ROWS.c.n)) == 1
        assert not s.in_transaction()
        with pytest.raises(KeyError), read_only(s):
            s.execute(select(ROWS.c.n))
            raise KeyError("x")
        assert not s.in_transaction()
    assert _stored(sessions) == []
