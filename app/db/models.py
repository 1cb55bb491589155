"""The SQL schema: every table Lethe keeps, as SQLAlchemy 2 declarative models.

The database is the source of truth (DESIGN.md §3): requests, jobs, versions, tombstones and
the audit chain live here; the broker only carries job ids. The Alembic revisions in
`migrations/` create exactly this schema (a test compares the two).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.db.types import UTCDateTime

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a stable constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime, float: Float}


class ApiKey(Base):
    """A client credential: only the sha256 of the key is stored."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[str] = mapped_column(String(400))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class DatasetRow(Base):
    """A registered dataset: how to load it and the shape of its index."""

    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    uri: Mapped[str] = mapped_column(Text)
    options: Mapped[dict[str, Any]]
    num_samples: Mapped[int]
    num_classes: Mapped[int]
    train_size: Mapped[int]
    test_size: Mapped[int]
    in_channels: Mapped[int]
    height: Mapped[int]
    width: Mapped[int]
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    # The HMAC key subject IDs are hashed with (hex); None when the dataset names no subjects.
    subject_key: Mapped[str | None] = mapped_column(String(64))
    # The dataset this one is a later version of (its subject key is that one's).
    version_of: Mapped[str | None] = mapped_column(String(100))


class Sample(Base):
    """One sample of a dataset's index; the API validates deletion IDs against this table."""

    __tablename__ = "samples"
    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    sample_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    split: Mapped[str] = mapped_column(String(8))
    label: Mapped[int]
    __table_args__ = (Index(None, "dataset_id", "split", "label"),)


class SubjectSample(Base):
    """A sample of a data subject: the subject only as HMAC-SHA256(dataset key, subject ID)."""

    __tablename__ = "subject_samples"
    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    subject_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    sample_id: Mapped[str] = mapped_column(String(200), primary_key=True)


class ModelRow(Base):
    """A model lineage: its dataset, architecture, training recipe and verification policy."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    architecture: Mapped[str] = mapped_column(String(60))
    num_classes: Mapped[int]
    in_channels: Mapped[int]
    recipe: Mapped[dict[str, Any]]
    policy: Mapped[dict[str, Any]]
    latest_version: Mapped[int | None]
    forgotten_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    #: `app.vocab.ModelStatus`: ready, importing (an upload checked on a worker) or failed.
    status: Mapped[str] = mapped_column(String(16), default="ready", server_default="ready")
    #: Input size and preprocessing (`engine.model_desc.ModelDescription` as JSON): what the
    #: caller gave at registration, completed with the library's defaults by the import job.
    description: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Why the registration failed: the import job's problem `{code, message}`.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The model whose lineage this one continues (`app.services.lineage`).
    succeeds: Mapped[str | None] = mapped_column(String(100))


class ModelVersion(Base):
    """An immutable published checkpoint; (model, parent) is unique, so a lineage never forks."""

    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version: Mapped[int]
    parent_version: Mapped[int | None]
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    manifest_path: Mapped[str] = mapped_column(Text)
    method: Mapped[str | None] = mapped_column(String(60))
    job_id: Mapped[str | None] = mapped_column(String(40))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    forgotten_count: Mapped[int]
    created_at: Mapped[datetime]
    __table_args__ = (
        UniqueConstraint("model_id", "version"),
        UniqueConstraint("model_id", "parent_version"),
    )


class DeletionRequest(Base):
    """One deletion request as the client sees it; it keeps its own status inside a job."""

    __tablename__ = "deletion_requests"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    status: Mapped[str] = mapped_column(String(16))
    sample_count: Mapped[int]
    already_forgotten_count: Mapped[int]
    subject_ref: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(60))
    verify: Mapped[str] = mapped_column(String(16))
    callback_url: Mapped[str | None] = mapped_column(Text)
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    job_id: Mapped[str | None] = mapped_column(String(40))
    result_version: Mapped[int | None]
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    received_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # How the request's `subject_ids` resolved (counts and digests; never the IDs in clear).
    subjects: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The OpenDSR request this one fulfils for one model, if it came through OpenDSR.
    opendsr_request_id: Mapped[str | None] = mapped_column(String(36))
    # The group of a request that named several models (`models`, or `model: "*"`).
    group_id: Mapped[str | None] = mapped_column(String(40))
    __table_args__ = (
        Index(None, "model_id", "status"),
        Index(None, "subject_ref"),
        Index(None, "job_id"),
        Index(None, "opendsr_request_id"),
        Index(None, "group_id"),
    )


class DeletionRequestGroup(Base):
    """One submission naming several models: a deletion request per model it reached."""

    __tablename__ = "deletion_request_groups"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    models: Mapped[list[Any]] = mapped_column(JSON)  # as asked: names, or ["*"]
    subject_ref: Mapped[str | None] = mapped_column(String(200))
    received_at: Mapped[datetime]


class RequestSubject(Base):
    """A data subject named by a request (hashed); tombstoned when the request succeeds."""

    __tablename__ = "request_subjects"
    request_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    subject_hash: Mapped[str] = mapped_column(String(64), primary_key=True)


class RequestSample(Base):
    """A sample ID named by a request (bulk-inserted; up to 100,000 per request).

    No foreign key to `deletion_requests` on purpose: the rows are written in the same
    transaction as their request, requests are never deleted, and a per-row referential
    check would triple the cost of ingesting 100,000 IDs.
    """

    __tablename__ = "request_samples"
    request_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    sample_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    already_forgotten: Mapped[bool] = mapped_column(Boolean)


class Job(Base):
    """A unit of GPU work on one model; `position` orders the jobs of a model."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    position: Mapped[int]
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    phase: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(60))
    method_options: Mapped[dict[str, Any]]
    verify: Mapped[str] = mapped_column(String(16))
    teacher_seed: Mapped[int] = mapped_column(BigInteger)
    fallback_of: Mapped[str | None] = mapped_column(String(40))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    eta_seconds: Mapped[float | None]
    losses: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    weights: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    base_version: Mapped[int | None]
    result_version: Mapped[int | None]
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reference: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    gaps: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Per-sample forgetting evidence of an unlearning job and its step history (loss and
    # balance-weight curves); receipts and their page are built from them.
    evidence: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    history: Mapped[list[Any] | None] = mapped_column(JSON)
    worker: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    seconds: Mapped[float | None]
    queued_at: Mapped[datetime]
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    __table_args__ = (
        UniqueConstraint("model_id", "position"),
        Index(None, "status"),
    )


class JobRequest(Base):
    """Membership of a deletion request in a job (several requests coalesce into one job)."""

    __tablename__ = "job_requests"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    request_id: Mapped[str] = mapped_column(
        ForeignKey("deletion_requests.id", ondelete="CASCADE"), primary_key=True
    )
    __table_args__ = (Index(None, "request_id"),)


class Tombstone(Base):
    """A sample forgotten by a model's lineage; it never comes back."""

    __tablename__ = "tombstones"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    sample_id: Mapped[str] = mapped_column(String(200))
    version: Mapped[int]
    job_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime]
    __table_args__ = (UniqueConstraint("model_id", "sample_id"),)


class SubjectTombstone(Base):
    """A data subject forgotten by a model's lineage: none of its samples is used again."""

    __tablename__ = "subject_tombstones"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    subject_hash: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime]
    __table_args__ = (UniqueConstraint("model_id", "subject_hash"),)


class OpendsrRequest(Base):
    """An OpenDSR erasure request from a controller; one deletion request per model fulfils it
    (`deletion_requests.opendsr_request_id`). `notified_status` is the last status announced
    to the controller's callbacks."""

    __tablename__ = "opendsr_requests"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # the subject_request_id
    api_key_id: Mapped[str] = mapped_column(String(40))
    controller_id: Mapped[str] = mapped_column(String(100))
    regulation: Mapped[str] = mapped_column(String(16))
    property_id: Mapped[str] = mapped_column(String(100))
    identity_types: Mapped[list[Any]] = mapped_column(JSON)
    status_callback_urls: Mapped[list[Any]] = mapped_column(JSON)
    submitted_time: Mapped[str] = mapped_column(String(40))
    received_at: Mapped[datetime]
    expected_completion_at: Mapped[datetime]
    cancelled_at: Mapped[datetime | None]
    notified_status: Mapped[str] = mapped_column(String(16))


class IdempotencyKey(Base):
    """A remembered POST: the first response is replayed for 24 hours."""

    __tablename__ = "idempotency_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    principal: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(200))
    body_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None]
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    request_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    __table_args__ = (UniqueConstraint("principal", "key"),)


class AuditEvent(Base):
    """One link of the append-only, hash-chained audit log (triggers refuse UPDATE/DELETE)."""

    __tablename__ = "audit_events"
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(60))
    subject: Mapped[str] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(100))
    request_id: Mapped[str | None] = mapped_column(String(40))
    data: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    __table_args__ = (
        Index(None, "model", "seq"),
        Index(None, "request_id"),
        Index(None, "action"),
    )


class CallbackDelivery(Base):
    """Outbox of signed webhooks: one row per final request status with a callback URL."""

    __tablename__ = "callback_deliveries"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(40))
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    # `webhook` (Lethe's HMAC-signed callbacks) or `opendsr` (signed with the processor key).
    kind: Mapped[str] = mapped_column(String(16), server_default="webhook")
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    lease_until: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    __table_args__ = (Index(None, "status", "next_attempt_at"),)


class ReceiptKey(Base):
    """A public key receipts are signed with; kept after rotation so old receipts verify."""

    __tablename__ = "receipt_keys"
    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))
    public_key: Mapped[str] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime]
    retired_at: Mapped[datetime | None]


class Receipt(Base):
    """The signed receipt of a finished deletion request, stored once so its bytes never change."""

    __tablename__ = "receipts"
    request_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kid: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


class ModelReference(Base):
    """A model's reference statistics (DESIGN.md §2a): the job computing them, their status
    and cost, and the statistics file once ready. Statistics only, never weights."""

    __tablename__ = "model_references"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), unique=True)
    job_id: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16))
    k: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float | None]
    seconds_per_reference: Mapped[list[Any] | None] = mapped_column(JSON)
    train_seconds: Mapped[float | None]
    pool_size: Mapped[int | None]
    stats_path: Mapped[str | None] = mapped_column(String(500))
    stats_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
