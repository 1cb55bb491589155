"""Lineages across dataset versions.

Revision ID: 0006_lineage
Revises: 0005_subjects
Create Date: 2026-11-29

- `datasets.version_of`: the dataset this one is a later version of (it shares that one's
  subject key, so a subject hashes the same in both).
- `models.succeeds`: the model whose lineage this one continues (trained on a later dataset
  version); what that lineage forgot, or was asked to forget, is forgotten by this one too.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_lineage"
down_revision: str | None = "0005_subjects"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("version_of", sa.String(100), nullable=True))
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("succeeds", sa.String(100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("succeeds")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("version_of")
