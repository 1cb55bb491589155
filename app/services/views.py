"""The public shapes of deletion requests and jobs (API bodies, callback payloads, replays)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import DeletionRequest, Job, JobRequest
from app.db.types import rfc3339
from app.vocab import FINAL_JOB_STATUSES, JobPhase, JobStatus


def request_public(req: DeletionRequest, model_name: str) -> dict[str, Any]:
    """A deletion request as API.md describes it."""
    return {
        "id": req.id,
        "model": model_name,
        "status": req.status,
        "sample_count": req.sample_count,
        "already_forgotten_count": req.already_forgotten_count,
        "subject_ref": req.subject_ref,
        "reason": req.reason,
        "method": req.method,
        "verify": req.verify,
        "callback_url": req.callback_url,
        "job_id": req.job_id,
        "result_version": req.result_version,
        "verdict": req.verdict,
        "metrics": req.metrics,
        "error": req.error,
        "subjects": req.subjects,
        "group_id": req.group_id,
        "received_at": rfc3339(req.received_at),
        "started_at": rfc3339(req.started_at),
        "finished_at": rfc3339(req.finished_at),
    }


def job_public(session: Session, job: Job, model_name: str) -> dict[str, Any]:
    """A job as API.md describes it."""
    request_ids = list(
        session.scalars(
            select(JobRequest.request_id).where(JobRequest.job_id == job.id).order_by(JobRequest.request_id)
        )
    )
    phase = job.phase
    if job.status in FINAL_JOB_STATUSES:
        phase = JobPhase.DONE
    total = job.total_steps or 0
    progress = 1.0 if job.status == JobStatus.SUCCEEDED else (min(1.0, job.step / total) if total else 0.0)
    return {
        "id": job.id,
        "kind": job.kind,
        "model": model_name,
        "status": job.status,
        "phase": phase,
        "progress": round(progress, 4),
        "step": job.step,
        "total_steps": job.total_steps,
        "eta_seconds": job.eta_seconds,
        "losses": job.losses or {},
        "weights": job.weights or {},
        "request_ids": request_ids,
        "method": job.method,
        "verify": job.verify,
        "teacher_seed": job.teacher_seed,
        "base_version": job.base_version,
        "result_version": job.result_version,
        "metrics": job.metrics,
        "reference": job.reference,
        "gaps": job.gaps,
        "verdict": job.verdict,
        "error": job.error,
        "worker": job.worker,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "fallback_of": job.fallback_of,
        "queued_at": rfc3339(job.queued_at),
        "started_at": rfc3339(job.started_at),
        "heartbeat_at": rfc3339(job.heartbeat_at),
        "finished_at": rfc3339(job.finished_at),
    }
