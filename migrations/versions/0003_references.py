"""Reference statistics: one row per model for the statistics its `reference` job computes.

Revision ID: 0003_references
Revises: 0002_receipts
Create Date: 2026-11-28

- `model_references`: the model's reference statistics (DESIGN.md §2a): the job computing
  them, its status (`queued`, `running`, `ready`, `failed`, `cancelled`), K and the seed, the
  cost (total and per-reference seconds, the model's own training time when known) and the
  store-relative path and sha256 of the statistics file once ready. Never any weights.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.db.types import UTCDateTime

revision: str = "0003_references"
down_revision: str | None = "0002_receipts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_references",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("seconds_per_reference", sa.JSON(), nullable=True),
        sa.Column("train_seconds", sa.Float(), nullable=True),
        sa.Column("pool_size", sa.Integer(), nullable=True),
        sa.Column("stats_path", sa.String(500), nullable=True),
        sa.Column("stats_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_model_references_model_id_models"),
        sa.PrimaryKeyConstraint("id", name="pk_model_references"),
        sa.UniqueConstraint("model_id", name="uq_model_references_model_id"),
    )


def downgrade() -> None:
    op.drop_table("model_references")
