"""Bring your own model: a model's registration status, input description and error.

Revision ID: 0004_byom
Revises: 0003_references
Create Date: 2026-11-28

- `models.status`: `ready` (every existing model), `importing` while an uploaded checkpoint of
  a `timm:`/`torchvision:` architecture is checked by its `import` job, `failed` after.
- `models.description`: the input size and preprocessing (JSON) the model reads images with.
- `models.error`: the failed import's problem `{code, message}`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_byom"
down_revision: str | None = "0003_references"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="ready"))
        batch.add_column(sa.Column("description", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("error", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("error")
        batch.drop_column("description")
        batch.drop_column("status")
