"""A job's life before its end: creation at the end of the model's line, the broker's
clock, and the running job's progress and heartbeat.

`create_job` adds to the caller's transaction (the caller holds the model's lock and
commits); `mark_enqueued` and `record_progress` are transactions of their own.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.models import Job, ModelReference, ModelRow
from app.db.types import utcnow
from app.services.audit import Event, append_events
from app.services.common import new_id
from app.services.jobs.queries import check_attempt, load_job
from app.services.transactions import unit_of_work
from app.vocab import JobKind, JobPhase, JobStatus, VerifyMode


def job_queued_event(job: Job, model_name: str, *, actor: str) -> Event:
    """The `job.queued` audit event of a new job."""
    return Event(
        actor,
        "job.queued",
        f"job:{job.id}",
        {
            "kind": job.kind,
            "method": job.method,
            "verify": job.verify,
            "position": job.position,
            "teacher_seed": job.teacher_seed,
            "fallback_of": job.fallback_of,
        },
        model_name,
    )


def audit_job_queued(session: Session, job: Job, model_name: str, *, actor: str) -> None:
    """Append the `job.queued` audit event of a new job."""
    append_events(session, [job_queued_event(job, model_name, actor=actor)])


def create_job(
    session: Session,
    model: ModelRow,
    *,
    kind: JobKind | str,
    method: str,
    verify: VerifyMode | str = VerifyMode.STANDARD,
    method_options: dict[str, Any] | None = None,
    fallback_of: str | None = None,
    actor: str,
    audit: bool = True,
) -> Job:
    """Add a queued job at the end of the model's line (caller commits).

    Callers hold the model row lock (PostgreSQL) or the SQLite write lock, so positions are
    assigned one at a time; the unique (model, position) constraint backs that up.
    """
    last = session.scalar(select(func.max(Job.position)).where(Job.model_id == model.id))
    now = utcnow()
    job = Job(
        id=new_id("job"),
        model_id=model.id,
        position=(last or 0) + 1,
        kind=kind,
        status=JobStatus.QUEUED,
        phase=JobPhase.QUEUED,
        method=method,
        method_options=method_options or {},
        verify=verify,
        teacher_seed=secrets.randbits(31),
        fallback_of=fallback_of,
        progress=0.0,
        step=0,
        total_steps=0,
        attempts=0,
        cancel_requested=False,
        queued_at=now,
        enqueued_at=now,
    )
    session.add(job)
    session.flush()
    if audit:
        audit_job_queued(session, job, model.name, actor=actor)
    return job


def create_reference_job(
    session: Session, model: ModelRow, *, k: int, actor: str
) -> Job:
    """Queue the model's `reference` job and its `model_references` row (caller commits).

    The job takes a position like any other, but it is not part of the model's version line:
    `queries.waits_for_earlier_job` ignores it both ways and it publishes no version. A model
    has one row; scheduling again (a new base) resets it to `queued` for the new job.
    """
    job = create_job(
        session, model, kind=JobKind.REFERENCE, method="reference", actor=actor,
        method_options={"k": int(k)},
    )
    job.method_options = {"k": int(k), "seed": int(job.teacher_seed)}
    row = session.scalar(select(ModelReference).where(ModelReference.model_id == model.id))
    if row is None:
        row = ModelReference(model_id=model.id, created_at=utcnow())
        session.add(row)
    row.job_id, row.status, row.k, row.seed = job.id, JobStatus.QUEUED, int(k), int(job.teacher_seed)
    row.seconds = row.seconds_per_reference = row.pool_size = None
    row.stats_path = row.stats_sha256 = None
    row.finished_at, row.error = None, None
    session.flush()
    return job


def reference_job_moved(session: Session, job: Job) -> None:
    """Mirror a `reference` job's new status (running, failed, cancelled) on its model's
    `model_references` row, in the caller's transaction; other kinds are ignored."""
    if job.kind != JobKind.REFERENCE:
        return
    row = session.scalar(select(ModelReference).where(ModelReference.job_id == job.id))
    if row is None:
        return
    row.status = job.status
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        row.finished_at, row.error = job.finished_at, job.error
    session.flush()


def mark_enqueued(session: Session, job_ids: list[str]) -> None:
    """Remember when the jobs were last sent to the broker (the sweeper's clock)."""
    with unit_of_work(session):
        if job_ids:
            session.execute(
                update(Job)
                .where(Job.id.in_(job_ids))
                .values(enqueued_at=utcnow())
                .execution_options(synchronize_session=False)
            )


def record_progress(
    session: Session,
    job_id: str,
    *,
    phase: str,
    step: int,
    total_steps: int,
    losses: dict[str, float] | None,
    weights: dict[str, float] | None,
    eta_seconds: float | None,
    attempt: int | None = None,
    worker: str | None = None,
) -> bool:
    """Store progress and refresh the heartbeat; True when cancellation was requested.

    Raises `StaleAttempt` when the job is no longer running for this attempt/worker.
    """
    with unit_of_work(session):
        job = load_job(session, job_id)
        check_attempt(job, attempt, worker)
        job.phase = phase
        job.step = int(step)
        job.total_steps = int(total_steps)
        job.progress = min(1.0, step / total_steps) if total_steps else 0.0
        job.losses = {k: float(v) for k, v in (losses or {}).items()}
        job.weights = {k: float(v) for k, v in (weights or {}).items()}
        job.eta_seconds = eta_seconds
        job.heartbeat_at = utcnow()
        return bool(job.cancel_requested)
