"""A model's reference statistics (DESIGN.md §2a): scheduling their `reference` job, storing
what it computed, and the API's view of them.

The `reference` job trains K reference models with the model's recipe on random halves of its
training pool and keeps only statistics (engine `run_reference`); the weights never leave the
worker's memory. The job runs on the same queue as the model's other jobs but outside its
version line: it never waits for them and they never wait for it, except unlearning jobs of a
model whose policy says `wait_for_references` (they are not claimed while the references are
queued or running; the reference job's end enqueues them). It publishes no version.

`schedule_references` adds to the caller's transaction (registration of version 1);
`complete_references` writes the statistics file, then marks the row `ready` in one
transaction with the job's success and its audit events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Job, ModelRow
from app.db.types import rfc3339, utcnow
from app.errors import ModelNotFound
from app.services.audit import append_event
from app.services.jobs.endings import next_jobs
from app.services.jobs.lifecycle import create_reference_job
from app.services.jobs.queries import check_attempt, load_job, load_model, reference_row
from app.services.transactions import read_only, unit_of_work
from app.settings import Settings
from app.vocab import JobKind, JobPhase, JobStatus, ReferenceStatus
from models_store import Store


def schedule_references(
    session: Session, model: ModelRow, *, settings: Settings, actor: str
) -> str | None:
    """Queue the model's reference job in the caller's transaction (with its `job.queued`
    event); its id for the caller to dispatch after commit, None when references are off."""
    if not settings.references:
        return None
    return create_reference_job(session, model, k=settings.reference_k, actor=actor).id


def _train_seconds(session: Session, model_id: int) -> float | None:
    """How long the model's own version 1 took to train (None for an uploaded model or
    while its train job has not succeeded)."""
    return session.scalar(
        select(Job.seconds)
        .where(Job.model_id == model_id)
        .where(Job.kind == JobKind.TRAIN)
        .where(Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.position)
        .limit(1)
    )


def complete_references(
    session: Session,
    store: Store,
    job_id: str,
    *,
    stats: bytes,
    k: int,
    seconds: float,
    seconds_per_reference: list[float],
    pool_size: int,
    steps: int,
    device: str,
    attempt: int | None = None,
    worker: str | None = None,
) -> list[str]:
    """Store the statistics file, then, in one transaction, mark the job succeeded and the
    model's references `ready` with their figures, with `references.ready` and
    `job.succeeded` events. Returns the model's next line job to enqueue (an unlearning job
    that waited for the references). `StaleAttempt` when another attempt owns the job (the
    file it wrote is content-addressed and named by no row: the next re-attempt removes it)."""
    with read_only(session):
        job = load_job(session, job_id)
        model_name = load_model(session, job.model_id).name
    path, sha = store.put_reference_stats(model_name, stats)
    with unit_of_work(session):
        job = load_job(session, job_id, lock=True)
        check_attempt(job, attempt, worker)
        model = load_model(session, job.model_id)
        row = reference_row(session, model.id)
        assert row is not None and row.job_id == job.id
        now = utcnow()
        job.status, job.phase, job.finished_at = JobStatus.SUCCEEDED, JobPhase.DONE, now
        job.seconds, job.progress = float(seconds), 1.0
        job.metrics = {"k": int(k), "pool_size": int(pool_size), "steps": int(steps), "device": device}
        row.status = ReferenceStatus.READY
        row.k, row.seconds = int(k), float(seconds)
        row.seconds_per_reference = [float(x) for x in seconds_per_reference]
        row.pool_size = int(pool_size)
        row.train_seconds = _train_seconds(session, model.id)
        row.stats_path, row.stats_sha256 = store.relative(path), sha
        row.finished_at, row.error = now, None
        session.flush()
        who = f"worker:{job.worker}"
        append_event(
            session,
            actor=who,
            action="references.ready",
            subject=f"model:{model.name}/references",
            model=model.name,
            data={"job_id": job.id, "k": row.k, "seconds": row.seconds, "pool_size": row.pool_size,
                  "sha256": sha},
        )
        append_event(
            session,
            actor=who,
            action="job.succeeded",
            subject=f"job:{job.id}",
            model=model.name,
            data={"result_version": None, "published": False},
        )
        return next_jobs(session, model.id)


def _iso(value: datetime | None) -> str | None:
    return rfc3339(value) if value is not None else None


def get_references(session: Session, name: str) -> dict[str, Any]:
    """The model's reference statistics: status, K, cost against one training of the model
    (`cost_ratio` = seconds / train_seconds, when both are known), pool size and times.
    `status` is `none` when no reference job was ever scheduled (references were off)."""
    with read_only(session):
        model = session.scalar(select(ModelRow).where(ModelRow.name == name))
        if model is None:
            raise ModelNotFound(f"no model {name!r}")
        row = reference_row(session, model.id)
        if row is None:
            return {"status": ReferenceStatus.NONE, "k": None, "seconds": None, "train_seconds": None,
                    "cost_ratio": None, "pool_size": None, "created_at": None,
                    "finished_at": None, "job_id": None}
        train = row.train_seconds if row.train_seconds is not None else _train_seconds(session, model.id)
        ratio = None
        if row.seconds is not None and train:
            ratio = round(row.seconds / train, 3)
        return {
            "status": row.status,
            "k": row.k,
            "seconds": row.seconds,
            "train_seconds": train,
            "cost_ratio": ratio,
            "pool_size": row.pool_size,
            "created_at": _iso(row.created_at),
            "finished_at": _iso(row.finished_at),
            "job_id": row.job_id,
        }


def references_path(session: Session, store: Store, name: str) -> str | None:
    """The absolute path of the model's ready statistics file (None when not ready)."""
    with read_only(session):
        model = session.scalar(select(ModelRow).where(ModelRow.name == name))
        row = reference_row(session, model.id) if model is not None else None
        if row is None or row.status != ReferenceStatus.READY or not row.stats_path:
            return None
        return str(store.resolve(row.stats_path))
