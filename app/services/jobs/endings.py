"""How a job ends without publishing: failed, cancelled, or cancelled on request; and what
every end does to the job's open requests (final status, audit event, callback).

Each public function is one transaction and returns the ids of jobs that became runnable
(the model's next queued job), for the caller to enqueue.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.db.models import DeletionRequest, Job, ModelRow
from app.db.types import utcnow
from app.errors import NotCancellable
from app.services.audit import append_event
from app.services.callbacks import enqueue_callback
from app.services.jobs.lifecycle import reference_job_moved
from app.services.jobs.queries import (
    check_attempt,
    get_job,
    load_job,
    load_model,
    next_queued_job_id,
    open_requests,
    published_files,
    reference_row,
)
from app.services.subjects import tombstone_subjects
from app.services.transactions import unit_of_work
from app.vocab import FINAL_JOB_STATUSES, JobKind, JobPhase, JobStatus, ModelStatus, RequestStatus
from models_store import Store


def finish_requests(
    session: Session,
    job: Job,
    model: ModelRow,
    requests: list[DeletionRequest],
    *,
    status: RequestStatus,
    actor: str,
    error: dict[str, Any] | None = None,
    result_version: int | None = None,
) -> None:
    """Give `requests` their final `status` with the job's verdict and metrics, each with its
    audit event and queued callback (in the caller's transaction); on success the subjects
    they named are tombstoned for the model's lineage."""
    now = utcnow()
    if status == RequestStatus.SUCCEEDED:
        tombstone_subjects(session, model.id, [r.id for r in requests])
    for req in requests:
        req.status = status
        req.finished_at = now
        req.verdict = job.verdict
        req.metrics = job.metrics
        if error is not None:
            req.error = error
        if result_version is not None:
            req.result_version = result_version
        session.flush()
        append_event(
            session,
            actor=actor,
            action=f"request.{status}",
            subject=f"request:{req.id}",
            model=model.name,
            request_id=req.id,
            data={"job_id": job.id, "result_version": req.result_version, "error": error},
        )
        enqueue_callback(session, req, model.name)


def end_registration(session: Session, job: Job, model: ModelRow, *, actor: str) -> None:
    """An `import` job ended without publishing: its model's registration fails with the
    job's problem (it then takes no deletion requests), and its reference job, which has
    nothing left to serve, is cancelled (in the caller's transaction). Other kinds: nothing."""
    if job.kind != JobKind.IMPORT:
        return
    error = job.error or {"code": "cancelled", "message": "the import job was cancelled"}
    model.status, model.error = ModelStatus.FAILED, error
    session.flush()
    append_event(
        session,
        actor=actor,
        action="model.registration_failed",
        subject=f"model:{model.name}",
        model=model.name,
        data={"job_id": job.id, "error": error},
    )
    reference = reference_row(session, model.id)
    ref_job = session.get(Job, reference.job_id) if reference and reference.job_id else None
    if ref_job is not None and ref_job.status not in FINAL_JOB_STATUSES:
        if ref_job.status == JobStatus.QUEUED:
            cancel_in_transaction(session, ref_job, model, actor=actor)
        else:
            ref_job.cancel_requested = True  # its worker stops at its next step
            session.flush()


def next_jobs(session: Session, model_id: int) -> list[str]:
    """The model's next job, as a list to enqueue (empty when none is claimable)."""
    nxt = next_queued_job_id(session, model_id)
    return [nxt] if nxt else []


def fail_job(
    session: Session,
    job_id: str,
    *,
    error: str,
    code: str,
    attempt: int | None = None,
    worker: str | None = None,
    actor: str | None = None,
) -> list[str]:
    """Mark a job failed (its open requests too); returns job ids to enqueue next."""
    with unit_of_work(session):
        job = load_job(session, job_id, lock=True)
        if job.status in FINAL_JOB_STATUSES:
            return []
        if attempt is not None or worker is not None:
            check_attempt(job, attempt, worker)
        model = load_model(session, job.model_id)
        job.status, job.phase, job.finished_at = JobStatus.FAILED, JobPhase.DONE, utcnow()
        job.error = {"code": code, "message": error}
        session.flush()
        reference_job_moved(session, job)
        who = actor or f"worker:{job.worker}"
        requests = open_requests(session, job.id)
        finish_requests(session, job, model, requests, status=RequestStatus.FAILED, actor=who,
                        error=job.error)
        append_event(
            session,
            actor=who,
            action="job.failed",
            subject=f"job:{job.id}",
            model=model.name,
            data={"code": code, "error": error, "attempts": job.attempts},
        )
        end_registration(session, job, model, actor=who)
        return next_jobs(session, model.id)


def cancel_in_transaction(session: Session, job: Job, model: ModelRow, *, actor: str) -> None:
    """Cancel `job` and its open requests inside the caller's transaction (no commit)."""
    job.status, job.phase, job.finished_at = JobStatus.CANCELLED, JobPhase.DONE, utcnow()
    session.flush()
    reference_job_moved(session, job)
    requests = open_requests(session, job.id)
    finish_requests(session, job, model, requests, status=RequestStatus.CANCELLED, actor=actor)
    append_event(
        session,
        actor=actor,
        action="job.cancelled",
        subject=f"job:{job.id}",
        model=model.name,
        data={"attempts": job.attempts},
    )
    end_registration(session, job, model, actor=actor)


def mark_cancelled(session: Session, job_id: str, *, actor: str | None = None) -> list[str]:
    """Mark a job cancelled (its open requests too); returns job ids to enqueue next."""
    with unit_of_work(session):
        job = load_job(session, job_id, lock=True)
        if job.status in FINAL_JOB_STATUSES:
            return []
        model = load_model(session, job.model_id)
        who = actor or (f"worker:{job.worker}" if job.worker else "system")
        cancel_in_transaction(session, job, model, actor=who)
        return next_jobs(session, model.id)


def discard_upload(session: Session, store: Store, model_name: str, options: dict[str, Any]) -> None:
    """An `import` job ended: remove its pending upload and the upload's manifest (named by
    the job's `options`) unless a version names the file (version 1 re-saved with the same
    bytes). A failed or cancelled import thus leaves nothing stored."""
    keep = published_files(session, model_name)
    for key in ("upload", "upload_manifest"):
        path = options.get(key)
        if path and str(path) not in keep:
            store.resolve(str(path)).unlink(missing_ok=True)


def cancel_job(
    session: Session, job_id: str, *, actor: str, store: Store | None = None
) -> dict[str, Any]:
    """Cancel a queued job now, or flag a running one (the worker stops at its next step).
    A queued `import` job's upload is removed from `store` (a running one's by its worker)."""
    with unit_of_work(session):
        job = load_job(session, job_id, lock=True)
        model = load_model(session, job.model_id)
        if job.status in FINAL_JOB_STATUSES:
            raise NotCancellable(f"job {job_id} is {job.status}", status_now=job.status)
        queued = job.status == JobStatus.QUEUED
        upload = (model.name, dict(job.method_options or {})) if job.kind == JobKind.IMPORT else None
        if not queued:
            job.cancel_requested = True
            session.flush()
            append_event(
                session,
                actor=actor,
                action="job.cancel_requested",
                subject=f"job:{job.id}",
                model=model.name,
                data={},
            )
    if queued:
        mark_cancelled(session, job_id, actor=actor)
        if store is not None and upload is not None:
            discard_upload(session, store, *upload)
    return get_job(session, job_id)
