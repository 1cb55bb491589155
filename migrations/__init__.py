"""Alembic environment and revisions; the same revisions run on SQLite and PostgreSQL."""
