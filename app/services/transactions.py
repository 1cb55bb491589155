"""Transactions of the services: where a unit of work commits or rolls back.

A service wraps what must commit together in `unit_of_work(session)`: the block's changes
commit when it ends normally (a `return` inside it included) and are rolled back when it
raises, and the error goes on. Reads are wrapped in `read_only(session)`, which always rolls
back at the end: that ends the snapshot and, on SQLite (where every transaction holds the
write lock), lets the next writer in. Services call neither `commit()` nor `rollback()`
themselves, with two documented exceptions: `apikeys.authenticate` ends its read on SQLite
only, and `idempotency` rolls back the INSERT that found its key taken before reading it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session


@contextmanager
def unit_of_work(session: Session) -> Iterator[Session]:
    """One transaction: committed when the block ends normally, rolled back when it raises."""
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise


@contextmanager
def read_only(session: Session) -> Iterator[Session]:
    """A transaction that only reads: rolled back when the block ends, however it ends."""
    try:
        yield session
    finally:
        session.rollback()
