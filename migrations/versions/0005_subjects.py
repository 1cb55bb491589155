"""Data subjects, subject tombstones and OpenDSR requests.

Revision ID: 0005_subjects
Revises: 0004_byom
Create Date: 2026-11-28

- `datasets.subject_key`: the per-dataset HMAC key subject IDs are hashed with.
- `subject_samples`: (dataset, HMAC of the subject ID, sample ID); subject IDs are never stored
  in clear.
- `deletion_requests.subjects` (how its `subject_ids` resolved: counts and digests) and
  `deletion_requests.opendsr_request_id` (the OpenDSR request it fulfils for one model).
- `deletion_requests.group_id` and `deletion_request_groups`: one submission naming several
  models (`models`, or `model: "*"`), a deletion request per model.
- `request_subjects`: the subjects a request named (hashed), tombstoned when it succeeds.
- `subject_tombstones`: subjects forgotten by a model's lineage.
- `opendsr_requests`: erasure requests received through the OpenDSR processor interface.
- `callback_deliveries.kind`: `webhook` (Lethe's own) or `opendsr` (signed with the processor key).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.db.types import UTCDateTime

revision: str = "0005_subjects"
down_revision: str | None = "0004_byom"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("subject_key", sa.String(64), nullable=True))
    op.create_table(
        "subject_samples",
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("subject_hash", sa.String(64), nullable=False),
        sa.Column("sample_id", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name="fk_subject_samples_dataset_id_datasets", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("dataset_id", "subject_hash", "sample_id", name="pk_subject_samples"),
    )
    with op.batch_alter_table("deletion_requests") as batch:
        batch.add_column(sa.Column("subjects", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("opendsr_request_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("group_id", sa.String(40), nullable=True))
        batch.create_index("ix_deletion_requests_opendsr_request_id", ["opendsr_request_id"])
        batch.create_index("ix_deletion_requests_group_id", ["group_id"])
    op.create_table(
        "deletion_request_groups",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("api_key_id", sa.String(40), nullable=True),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("subject_ref", sa.String(200), nullable=True),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_deletion_request_groups"),
    )
    op.create_table(
        "request_subjects",
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("subject_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "subject_hash", name="pk_request_subjects"),
    )
    op.create_table(
        "subject_tombstones",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("subject_hash", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_subject_tombstones_model_id_models"),
        sa.PrimaryKeyConstraint("id", name="pk_subject_tombstones"),
        sa.UniqueConstraint("model_id", "subject_hash", name="uq_subject_tombstones_model_id_subject_hash"),
    )
    op.create_table(
        "opendsr_requests",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("api_key_id", sa.String(40), nullable=False),
        sa.Column("controller_id", sa.String(100), nullable=False),
        sa.Column("regulation", sa.String(16), nullable=False),
        sa.Column("property_id", sa.String(100), nullable=False),
        sa.Column("identity_types", sa.JSON(), nullable=False),
        sa.Column("status_callback_urls", sa.JSON(), nullable=False),
        sa.Column("submitted_time", sa.String(40), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("expected_completion_at", UTCDateTime(), nullable=False),
        sa.Column("cancelled_at", UTCDateTime(), nullable=True),
        sa.Column("notified_status", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_opendsr_requests"),
    )
    with op.batch_alter_table("callback_deliveries") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), server_default="webhook", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("callback_deliveries") as batch:
        batch.drop_column("kind")
    op.drop_table("opendsr_requests")
    op.drop_table("subject_tombstones")
    op.drop_table("request_subjects")
    op.drop_table("deletion_request_groups")
    with op.batch_alter_table("deletion_requests") as batch:
        batch.drop_index("ix_deletion_requests_group_id")
        batch.drop_column("group_id")
        batch.drop_index("ix_deletion_requests_opendsr_request_id")
        batch.drop_column("opendsr_request_id")
        batch.drop_column("subjects")
    op.drop_table("subject_samples")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("subject_key")
