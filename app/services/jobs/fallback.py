"""A failed verdict: nothing is published, the job fails with its evidence, and its
requests either fail with it or move to a new job running the policy's `fallback_method`."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.db.models import DeletionRequest, Job, JobRequest, ModelRow
from app.db.types import utcnow
from app.services.audit import append_event
from app.services.jobs.endings import finish_requests
from app.services.jobs.judging import Judgement, record_report
from app.services.jobs.lifecycle import create_job
from app.services.jobs.queries import load_model, next_queued_job_id, open_requests
from app.vocab import JobKind, JobPhase, JobStatus, RequestStatus


def fail_on_verdict(session: Session, job: Job, judged: Judgement) -> tuple[str | None, str | None]:
    """Fail `job` on its verdict in the caller's transaction; returns the fallback job's id
    (None when there is none) and the model's next claimable job's id."""
    record_report(job, judged)
    job.method_options = {**(job.method_options or {}), "resolved": judged.report.method_config or {}}
    model = load_model(session, job.model_id, lock=True)
    job.status, job.phase, job.finished_at = JobStatus.FAILED, JobPhase.DONE, utcnow()
    job.error = {"code": "verdict_failed", "message": "; ".join(judged.verdict["reasons"])}
    session.flush()
    requests = open_requests(session, job.id)
    fallback = _hand_to_fallback(session, job, model, requests, actor=judged.actor)
    if fallback is None:
        finish_requests(session, job, model, requests, status=RequestStatus.FAILED,
                        actor=judged.actor, error=job.error)
    append_event(
        session,
        actor=judged.actor,
        action="job.failed",
        subject=f"job:{job.id}",
        model=model.name,
        data={
            "code": "verdict_failed",
            "verdict": judged.verdict,
            "metrics": job.metrics,
            "gaps": job.gaps,
            "fallback_job_id": fallback.id if fallback else None,
        },
    )
    return (fallback.id if fallback else None), next_queued_job_id(session, model.id)


def _hand_to_fallback(
    session: Session, job: Job, model: ModelRow, requests: list[DeletionRequest], *, actor: str
) -> Job | None:
    """Queue the policy's `fallback_method` for `requests` and move them to it; None when the
    policy names none (or this job already ran it, or there is nothing to hand over)."""
    fallback_method = (model.policy or {}).get("fallback_method")
    if not fallback_method or fallback_method == job.method or job.kind == JobKind.TRAIN or not requests:
        return None
    fallback = create_job(
        session,
        model,
        kind=JobKind.RETRAIN if fallback_method == "retrain" else JobKind.UNLEARN,
        method=fallback_method,
        verify=job.verify,
        fallback_of=job.id,
        actor=actor,
    )
    for req in requests:
        req.job_id = fallback.id
        req.status = RequestStatus.QUEUED
        session.add(JobRequest(job_id=fallback.id, request_id=req.id))
    session.flush()
    return fallback
