"""Reads of the job tables: row loaders, the queries the lifecycle is built on, and the API's
job views.

Loaders (`load_job`, `load_model`) and queries run inside the caller's transaction; the two
views (`get_job`, `list_jobs`) and the worker's `published_files` are read-only transactions
of their own.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from app.db.models import (
    DeletionRequest,
    Job,
    ModelReference,
    ModelRow,
    ModelVersion,
    RequestSample,
    Tombstone,
)
from app.db.types import utcnow
from app.errors import JobNotFound, StaleAttempt
from app.services.common import Page, decode_cursor, encode_cursor
from app.services.transactions import read_only
from app.services.views import job_public
from app.vocab import ACTIVE_JOB_STATUSES, OPEN_REQUEST_STATUSES, JobKind, JobStatus


def load_job(session: Session, job_id: str, *, lock: bool = False, fresh: bool = False) -> Job:
    """The job row (locked against concurrent writers when `lock`; re-read from the database
    when `fresh`), or `JobNotFound`."""
    stmt = select(Job).where(Job.id == str(job_id))
    if lock:
        stmt = stmt.with_for_update(key_share=True)
    if fresh:
        stmt = stmt.execution_options(populate_existing=True)
    job = session.scalar(stmt)
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    return job


def load_model(session: Session, model_id: int, *, lock: bool = False) -> ModelRow:
    """The model row a job belongs to (it always exists: jobs reference it)."""
    stmt = select(ModelRow).where(ModelRow.id == model_id)
    if lock:
        stmt = stmt.with_for_update(key_share=True)
    model = session.scalar(stmt)
    assert model is not None
    return model


def check_attempt(job: Job, attempt: int | None, worker: str | None) -> None:
    """`StaleAttempt` unless `job` is running for this attempt and worker (None: any)."""
    if job.status != JobStatus.RUNNING:
        raise StaleAttempt(f"job {job.id} is {job.status}, not running")
    if attempt is not None and job.attempts != attempt:
        raise StaleAttempt(f"job {job.id} is on attempt {job.attempts}, not {attempt}")
    if worker is not None and job.worker != worker:
        raise StaleAttempt(f"job {job.id} is held by {job.worker}, not {worker}")


def waits_for_earlier_job() -> ColumnElement[bool]:
    """True for a job that is not its model's turn: an earlier job of the model's version
    line is still queued or running (jobs of one model run strictly in `position` order).

    `reference` jobs are outside the line: one never waits, and none is waited for."""
    earlier = aliased(Job)
    return and_(
        Job.kind != JobKind.REFERENCE,
        exists(
            select(earlier.id)
            .where(earlier.model_id == Job.model_id)
            .where(earlier.position < Job.position)
            .where(earlier.kind != JobKind.REFERENCE)
            .where(earlier.status.in_(ACTIVE_JOB_STATUSES))
        ),
    )


def open_requests(session: Session, job_id: str) -> list[DeletionRequest]:
    """The job's requests that are not final yet, by id."""
    return list(
        session.scalars(
            select(DeletionRequest)
            .where(DeletionRequest.job_id == job_id)
            .where(DeletionRequest.status.in_(OPEN_REQUEST_STATUSES))
            .order_by(DeletionRequest.id)
        )
    )


def pending_forget_ids(session: Session, job: Job) -> list[str]:
    """Union of the job's open requests' IDs minus what the lineage already forgot."""
    tomb = (
        select(Tombstone.id)
        .where(Tombstone.model_id == job.model_id)
        .where(Tombstone.sample_id == RequestSample.sample_id)
    )
    stmt = (
        select(RequestSample.sample_id)
        .join(DeletionRequest, DeletionRequest.id == RequestSample.request_id)
        .where(DeletionRequest.job_id == job.id)
        .where(DeletionRequest.status.in_(OPEN_REQUEST_STATUSES))
        .where(~exists(tomb))
        .distinct()
        .order_by(RequestSample.sample_id)
    )
    return list(session.scalars(stmt))


def tombstoned(session: Session, model_id: int) -> list[str]:
    """Every sample ID the model's lineage has forgotten, sorted."""
    return list(
        session.scalars(
            select(Tombstone.sample_id).where(Tombstone.model_id == model_id).order_by(Tombstone.sample_id)
        )
    )


def ids_digest(ids: list[str]) -> str:
    """sha256 over the sorted IDs joined by newlines (the manifest's forgotten digest)."""
    h = hashlib.sha256()
    for s in sorted(ids):
        h.update(s.encode())
        h.update(b"\n")
    return h.hexdigest()


def version_path(session: Session, model_id: int, version: int) -> str:
    """The store-relative checkpoint path of one published version."""
    path = session.scalar(
        select(ModelVersion.path)
        .where(ModelVersion.model_id == model_id)
        .where(ModelVersion.version == version)
    )
    assert path is not None
    return path


def version_metrics(session: Session, model_id: int, version: int | None) -> dict[str, Any] | None:
    """The metrics recorded with one version (None for no version)."""
    if version is None:
        return None
    return session.scalar(
        select(ModelVersion.metrics)
        .where(ModelVersion.model_id == model_id)
        .where(ModelVersion.version == version)
    )


def next_queued_job_id(session: Session, model_id: int) -> str | None:
    """The model's earliest queued job of its version line, if it is now claimable (nothing
    running before it; `reference` jobs are not in the line)."""
    first = session.scalar(
        select(Job)
        .where(Job.model_id == model_id)
        .where(Job.kind != JobKind.REFERENCE)
        .where(Job.status.in_(ACTIVE_JOB_STATUSES))
        .order_by(Job.position)
        .limit(1)
    )
    if first is None or first.status != JobStatus.QUEUED:
        return None
    return first.id


def find_stale_jobs(session: Session, *, queued_grace_s: float, heartbeat_timeout_s: float) -> list[str]:
    """Jobs whose broker message may be lost: claimable `queued` jobs last enqueued more than
    `queued_grace_s` ago, and `running` jobs whose heartbeat is older than
    `heartbeat_timeout_s` (their worker died)."""
    now = utcnow()
    grace: datetime = now - timedelta(seconds=queued_grace_s)
    dead: datetime = now - timedelta(seconds=heartbeat_timeout_s)
    last_sent = func.coalesce(Job.enqueued_at, Job.queued_at)
    stmt = (
        select(Job.id)
        .where(
            or_(
                and_(Job.status == JobStatus.QUEUED, last_sent < grace, ~waits_for_earlier_job()),
                and_(Job.status == JobStatus.RUNNING, Job.heartbeat_at < dead, last_sent < grace),
            )
        )
        .order_by(Job.queued_at)
    )
    with read_only(session):
        return list(session.scalars(stmt))


def reference_row(session: Session, model_id: int) -> ModelReference | None:
    """The model's `model_references` row (None when no reference job was ever scheduled)."""
    return session.scalar(select(ModelReference).where(ModelReference.model_id == model_id))


def reference_files(session: Session, model_name: str) -> set[str]:
    """Store-relative paths of the statistics files the model's references row names."""
    with read_only(session):
        path = session.scalar(
            select(ModelReference.stats_path)
            .join(ModelRow, ModelRow.id == ModelReference.model_id)
            .where(ModelRow.name == model_name)
        )
    return {path} if path else set()


def published_files(session: Session, model_name: str) -> set[str]:
    """Store-relative paths of every checkpoint and manifest the model's versions name, and
    the pending upload of its import job while that job is queued or running."""
    with read_only(session):
        rows = session.execute(
            select(ModelVersion.path, ModelVersion.manifest_path)
            .join(ModelRow, ModelRow.id == ModelVersion.model_id)
            .where(ModelRow.name == model_name)
        ).all()
        imports = session.scalars(
            select(Job.method_options)
            .join(ModelRow, ModelRow.id == Job.model_id)
            .where(ModelRow.name == model_name)
            .where(Job.kind == JobKind.IMPORT)
            .where(Job.status.in_(ACTIVE_JOB_STATUSES))
        ).all()
    pending = {str(o[key]) for o in imports for key in ("upload", "upload_manifest") if o and key in o}
    return {path for row in rows for path in row} | pending


def get_job(session: Session, job_id: str) -> dict[str, Any]:
    """One job's resource."""
    with read_only(session):
        job = load_job(session, job_id)
        return job_public(session, job, load_model(session, job.model_id).name)


def list_jobs(
    session: Session,
    *,
    model: str | None = None,
    status: str | None = None,
    limit: int,
    cursor: str | None = None,
) -> Page[dict[str, Any]]:
    """Jobs, newest first."""
    stmt = select(Job, ModelRow.name).join(ModelRow, ModelRow.id == Job.model_id)
    if model:
        stmt = stmt.where(ModelRow.name == model)
    if status:
        stmt = stmt.where(Job.status == status)
    after = decode_cursor(cursor)
    if after is not None:
        stmt = stmt.where(Job.id < str(after))
    with read_only(session):
        rows = session.execute(stmt.order_by(Job.id.desc()).limit(limit + 1)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        items = [job_public(session, j, name) for j, name in rows]
    return Page(items, encode_cursor(rows[-1][0].id) if more else None)
