"""Completing a job: judge the run, then publish its checkpoint or fail it.

Publishing writes the checkpoint first (durable, content-addressed, with no transaction
open, so SQLite's write lock is free meanwhile) and then, in one transaction, the version
row (unique per parent: a lineage never forks), the tombstones, the request results and the
audit events. A job cancelled before or while the file was written publishes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Job, ModelRow, ModelVersion, Tombstone
from app.db.types import utcnow
from app.errors import Conflict
from app.services.audit import append_event
from app.services.common import bulk_insert, table_of
from app.services.jobs.endings import finish_requests, mark_cancelled
from app.services.jobs.fallback import fail_on_verdict
from app.services.jobs.judging import Judgement, RunReport, judge, record_report
from app.services.jobs.queries import (
    check_attempt,
    load_job,
    load_model,
    next_queued_job_id,
    open_requests,
)
from app.services.transactions import unit_of_work
from app.vocab import JobPhase, JobStatus, RequestStatus
from models_store import Store, StoredCheckpoint


@dataclass(frozen=True)
class CompletionResult:
    """What `complete_job` did; the worker enqueues `fallback_job_id` and `next_job_id`."""

    job_id: str
    published: bool
    verdict: str
    verdict_detail: dict[str, Any]
    version: int | None = None
    sha256: str | None = None
    fallback_job_id: str | None = None
    next_job_id: str | None = None
    enqueue: list[str] = field(default_factory=list)


def complete_job(
    session: Session,
    store: Store,
    job_id: str,
    *,
    weights: bytes,
    metrics: dict[str, Any],
    reference: dict[str, Any] | None,
    gaps: dict[str, Any] | None,
    history: list[dict[str, Any]] | None,
    method: str,
    method_config: dict[str, Any] | None,
    teacher_seed: int | None,
    seconds: float,
    steps: int,
    device: str,
    evidence: dict[str, Any] | None = None,
    attempt: int | None = None,
    worker: str | None = None,
) -> CompletionResult:
    """Verify a finished job and publish its checkpoint, or fail it (with the fallback).

    On a passing verdict: the checkpoint and manifest are stored durably, then one
    transaction adds the version (parent = the job's base version; a second child of the same
    parent violates the unique constraint and raises `Conflict`), the tombstones, the request
    results and the `model.version.published` / `job.succeeded` events. On a failing verdict
    nothing is published; the job keeps its evidence and either fails its requests or hands
    them to a new job running the policy's `fallback_method`.
    """
    job_id = str(job_id)
    report = RunReport(metrics, reference, gaps, history, method, method_config, teacher_seed,
                       seconds, steps, device, evidence).finite()
    with unit_of_work(session):
        job = load_job(session, job_id, lock=True)
        check_attempt(job, attempt, worker)
        judged = None if job.cancel_requested else judge(session, job, report)
        if judged is not None and not judged.passed:
            return _failed(job_id, judged, *fail_on_verdict(session, job, judged))
    if judged is None:
        return _cancelled(session, job_id)
    stored = store.put(judged.model_name, weights, judged.manifest)
    with unit_of_work(session):
        published = _publish(session, store, judged, stored, attempt=attempt, worker=worker)
    return published or _cancelled(session, job_id)


def _cancelled(session: Session, job_id: str) -> CompletionResult:
    """The job was asked to stop before it published: it ends cancelled, publishing nothing."""
    after_cancel = mark_cancelled(session, job_id)
    return CompletionResult(
        job_id, False, "cancelled", {},
        next_job_id=after_cancel[0] if after_cancel else None, enqueue=after_cancel,
    )


def _failed(job_id: str, judged: Judgement, fallback_id: str | None, nxt: str | None) -> CompletionResult:
    enqueue = [j for j in (fallback_id, nxt) if j]
    return CompletionResult(
        job_id,
        False,
        "failed",
        judged.verdict,
        fallback_job_id=fallback_id,
        next_job_id=nxt if (fallback_id is None or nxt != fallback_id) else None,
        enqueue=list(dict.fromkeys(enqueue)),
    )


def _publish(
    session: Session,
    store: Store,
    judged: Judgement,
    stored: StoredCheckpoint,
    *,
    attempt: int | None,
    worker: str | None,
) -> CompletionResult | None:
    """In the caller's transaction: the new version, its tombstones, the job's success and
    its requests'; None when the job was cancelled while the file was written."""
    model = load_model(session, judged.model_id, lock=True)
    job = load_job(session, judged.job_id, lock=True)
    check_attempt(job, attempt, worker)
    if job.cancel_requested:
        return None
    if model.latest_version != job.base_version:
        raise Conflict(
            f"model {model.name} moved to v{model.latest_version} while job {job.id} ran on "
            f"v{job.base_version}"
        )
    _add_version(session, store, model, job, judged, stored)
    _announce(session, model, job, judged, stored)
    nxt = next_queued_job_id(session, model.id)
    return CompletionResult(
        job.id,
        True,
        "passed",
        judged.verdict,
        version=judged.new_version,
        sha256=stored.sha256,
        next_job_id=nxt,
        enqueue=[nxt] if nxt else [],
    )


def _add_version(
    session: Session, store: Store, model: ModelRow, job: Job, judged: Judgement, stored: StoredCheckpoint
) -> None:
    """The version row (a second child of one parent is a `Conflict`: lineages never fork),
    the lineage's new tombstones, and the model and job moved to the new version."""
    now = utcnow()
    new_version, report = judged.new_version, judged.report
    session.add(
        ModelVersion(
            model_id=model.id,
            version=new_version,
            parent_version=job.base_version,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            path=store.relative(stored.path),
            manifest_path=store.relative(stored.manifest_path),
            method=report.method,
            job_id=job.id,
            metrics=report.all_metrics,
            forgotten_count=len(judged.lineage),
            created_at=now,
        )
    )
    fork = f"model {model.name} already has a child of v{job.base_version}; refusing a fork"
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(fork) from None
    bulk_insert(
        session,
        table_of(Tombstone),
        ("model_id", "sample_id", "version", "job_id", "created_at"),
        ((model.id, s, new_version, job.id, now) for s in judged.forget_ids),
    )
    model.latest_version = new_version
    model.forgotten_count = len(judged.lineage)
    record_report(job, judged)
    job.status, job.phase, job.finished_at = JobStatus.SUCCEEDED, JobPhase.DONE, now
    job.result_version = new_version
    job.progress = 1.0
    session.flush()


def _announce(
    session: Session, model: ModelRow, job: Job, judged: Judgement, stored: StoredCheckpoint
) -> None:
    """The `model.version.published` event, the requests' success and `job.succeeded`."""
    requests = open_requests(session, job.id)
    report, new_version = judged.report, judged.new_version
    append_event(
        session,
        actor=judged.actor,
        action="model.version.published",
        subject=f"model:{model.name}/v{new_version}",
        model=model.name,
        data={
            "version": new_version,
            "parent": job.base_version,
            "sha256": stored.sha256,
            "size_bytes": stored.size_bytes,
            "method": report.method,
            "job_id": job.id,
            "teacher_seed": report.teacher_seed,
            "forgotten_count": len(judged.lineage),
            "forgotten_sha256": judged.manifest["forgotten"]["sha256"],
        },
    )
    finish_requests(session, job, model, requests, status=RequestStatus.SUCCEEDED,
                    actor=judged.actor, result_version=new_version)
    append_event(
        session,
        actor=judged.actor,
        action="job.succeeded",
        subject=f"job:{job.id}",
        model=model.name,
        data={
            "result_version": new_version,
            "metrics": report.all_metrics,
            "verdict": judged.verdict,
            "gaps": report.gaps,
            "request_ids": [r.id for r in requests],
        },
    )
