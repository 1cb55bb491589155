"""Receipts: signing keys, stored signed receipts, and the job evidence they are built from.

Revision ID: 0002_receipts
Revises: 0001_initial
Create Date: 2026-11-28

- `receipt_keys`: every Ed25519 public key receipts were ever signed with (`kid` is the RFC 7638
  thumbprint); one is `active`. Rows are never deleted, so a rotation never invalidates a receipt.
- `receipts`: the signed receipt of a finished request, as the exact canonical bytes served.
- `jobs.evidence`: the per-sample forgetting evidence of an unlearning job (JSON).
- `jobs.history`: the job's step history, the loss and balance-weight curves (JSON).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.db.types import UTCDateTime

revision: str = "0002_receipts"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "receipt_keys",
        sa.Column("kid", sa.String(64), nullable=False),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("retired_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("kid", name="pk_receipt_keys"),
    )
    op.create_table(
        "receipts",
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("kid", sa.String(64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_receipts"),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("evidence", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("history", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("history")
        batch.drop_column("evidence")
    op.drop_table("receipts")
    op.drop_table("receipt_keys")
