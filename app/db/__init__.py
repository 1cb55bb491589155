"""Persistence: SQLAlchemy models, engine and session factories, migration helpers."""

from app.db.models import Base
from app.db.session import create_db_engine, create_session_factory

__all__ = ["Base", "create_db_engine", "create_session_factory"]
