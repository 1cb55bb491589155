"""Claiming a job: the worker's first step, which fixes everything the run will use.

A claim is one conditional UPDATE (`queued`, or `running` with an expired heartbeat, to
`running`), so two concurrent claimers never both win, on PostgreSQL or SQLite; it takes a
job only when it is the model's turn, and the job runs on the model's latest version at
claim time. The claim, its requests turning `running` and the `job.started` event commit
together. A job that cannot run ends instead: cancelled (its requests all were, or its
abandoned run was asked to stop), failed (no version to unlearn from, or its worker was
lost too often), or succeeded without work (every ID was forgotten meanwhile).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session

from app.db.models import DatasetRow, DeletionRequest, Job, ModelRow
from app.db.types import utcnow
from app.services.audit import append_event
from app.services.jobs.endings import discard_upload, fail_job, finish_requests, mark_cancelled
from app.services.jobs.lifecycle import reference_job_moved
from app.services.jobs.queries import (
    load_job,
    load_model,
    open_requests,
    pending_forget_ids,
    reference_row,
    tombstoned,
    version_path,
    waits_for_earlier_job,
)
from app.services.opendsr_status import on_request_change
from app.services.subjects import tombstoned_subject_samples
from app.services.transactions import unit_of_work
from app.vocab import FINAL_JOB_STATUSES, JobKind, JobPhase, JobStatus, ReferenceStatus, RequestStatus
from models_store import Store

DEFAULT_MAX_ATTEMPTS = 5

#: What ends a job that cannot run, once the claim's transaction is over.
AfterClaim = Callable[[Session], object]


@dataclass(frozen=True)
class JobTicket:
    """Everything a worker needs to run a claimed job, fixed at claim time."""

    job_id: str
    kind: str
    model_name: str
    arch: str
    num_classes: int
    dataset_kind: str
    dataset_uri: str
    dataset_options: dict[str, Any]
    recipe: dict[str, Any]
    base_version: int | None
    base_checkpoint: str | None
    forget_ids: list[str]
    forgotten_ids: list[str]
    method: str
    method_options: dict[str, Any]
    verify: str
    teacher_seed: int
    attempt: int
    input_shape: tuple[int, int, int] = (1, 28, 28)
    #: The model's ready reference statistics (absolute path) for an unlearning job; None
    #: while they are not ready (the job's evidence then says "references pending").
    reference_stats: str | None = None
    #: The model's input description (`engine.model_desc`, as JSON; None for a built-in):
    #: what the caller gave until its import job completed it with the library's defaults.
    description: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Claim:
    """A won claim: the rows it works on and who holds it since when."""

    job: Job
    model: ModelRow
    requests: list[DeletionRequest]
    worker: str
    now: datetime

    @property
    def actor(self) -> str:
        return f"worker:{self.worker}"


def claim_job(
    session: Session,
    job_id: str,
    worker: str,
    *,
    heartbeat_timeout_s: float,
    store: Store,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> JobTicket | None:
    """Take a job for `worker`; None when it is final, held by a live worker, or not its turn.

    Moves `queued` (or `running` with a heartbeat older than `heartbeat_timeout_s`) to
    `running` in one conditional UPDATE, bumps `attempts`, marks its requests `running` and
    records `job.started`; all in one committed transaction. A job whose requests were all
    cancelled is cancelled; a job whose IDs were all forgotten meanwhile succeeds without
    work; a job that exhausted `max_attempts` fails.
    """
    job_id = str(job_id)
    now = utcnow()
    cutoff = now - timedelta(seconds=heartbeat_timeout_s)
    with unit_of_work(session):
        ended = _unclaimable(session, job_id, cutoff=cutoff, max_attempts=max_attempts, store=store)
        claim = None if ended else _take(session, job_id, worker, now=now, cutoff=cutoff)
        refused = _refusal(claim) if claim else None
        ticket = _start(session, claim, store) if claim and not refused else None
    for end in (ended, refused):
        if end is not None:
            end(session)
    return ticket


def _unclaimable(
    session: Session, job_id: str, *, cutoff: datetime, max_attempts: int, store: Store
) -> AfterClaim | None:
    """None when the job may be claimed; else what ends it: nothing for a job that is gone
    or final; for a run whose worker was lost, its cancellation (it was asked to stop) or its
    failure (`max_attempts` runs were lost). The worker that would have removed a lost
    import's pending upload is gone, so that ending removes it."""
    current = session.get(Job, job_id)
    if current is None or current.status in FINAL_JOB_STATUSES:
        return _nothing
    abandoned = (
        current.status == JobStatus.RUNNING
        and current.heartbeat_at is not None
        and current.heartbeat_at < cutoff
    )
    end: AfterClaim | None = None
    if abandoned and current.cancel_requested:
        end = functools.partial(mark_cancelled, job_id=job_id, actor="sweeper")
    elif abandoned and current.attempts >= max_attempts:
        error = f"the job's worker was lost {current.attempts} times"
        end = functools.partial(
            fail_job, job_id=job_id, error=error, code="too_many_attempts", actor="sweeper"
        )
    if end is not None and current.kind == JobKind.IMPORT:
        upload = (load_model(session, current.model_id).name, dict(current.method_options or {}))
        return functools.partial(_end_import, end=end, store=store, upload=upload)
    return end


def _end_import(
    session: Session, *, end: AfterClaim, store: Store, upload: tuple[str, dict[str, Any]]
) -> None:
    """End a lost import job (`end`), then remove its pending upload from `store`."""
    end(session)
    discard_upload(session, store, *upload)


def _nothing(session: Session) -> None:
    return None


def _take(session: Session, job_id: str, worker: str, *, now: datetime, cutoff: datetime) -> _Claim | None:
    """The conditional UPDATE that makes `worker` the job's owner; None when another claim,
    the job's state or its place in the line prevents it, or the job waits for its model's
    reference statistics (policy `wait_for_references`)."""
    if _waits_for_references(session, job_id):
        return None
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .where(Job.cancel_requested.is_(False))
        .where(
            or_(
                Job.status == JobStatus.QUEUED,
                and_(Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff),
            )
        )
        .where(~waits_for_earlier_job())
        .values(
            status=JobStatus.RUNNING,
            phase=JobPhase.LOADING,
            worker=worker,
            attempts=Job.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            step=0,
            total_steps=0,
            eta_seconds=None,
        )
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = load_job(session, job_id, fresh=True)
    model = load_model(session, job.model_id)
    return _Claim(job, model, open_requests(session, job.id), worker, now)


#: Job kinds that unlearn (they read the model's reference statistics).
_UNLEARNING_KINDS = (JobKind.UNLEARN, JobKind.RETRAIN)
#: Job kinds that run for the model itself, not for deletion requests.
_MODEL_KINDS = (JobKind.TRAIN, JobKind.REFERENCE, JobKind.IMPORT)
#: Reference statistics that are still being computed.
_PENDING_REFERENCES = (ReferenceStatus.QUEUED, ReferenceStatus.RUNNING)


def _waits_for_references(session: Session, job_id: str) -> bool:
    """True for an unlearning job of a model whose policy says `wait_for_references` while
    its references are queued or running; the reference job's end enqueues it again."""
    job = session.get(Job, job_id)
    if job is None or job.kind not in _UNLEARNING_KINDS:
        return False
    model = load_model(session, job.model_id)
    if not bool((model.policy or {}).get("wait_for_references", False)):
        return False
    row = reference_row(session, model.id)
    return row is not None and row.status in _PENDING_REFERENCES


def _refusal(claim: _Claim) -> AfterClaim | None:
    """What ends a claimed job that has nothing to run on: a deletion job whose requests were
    all cancelled, or an unlearning job of a model with no published version."""
    job = claim.job
    if job.kind not in _MODEL_KINDS and not claim.requests:
        return functools.partial(mark_cancelled, job_id=job.id, actor="system")
    if job.kind == JobKind.UNLEARN and claim.model.latest_version is None:
        error = "the model has no published version to unlearn from"
        return functools.partial(fail_job, job_id=job.id, error=error, code="no_base_version")
    return None


def _start(session: Session, claim: _Claim, store: Store) -> JobTicket | None:
    """Fix the run's inputs, mark the requests `running` and record `job.started`; None when
    every requested ID was already forgotten (the job then succeeds without work)."""
    job, model = claim.job, claim.model
    base_version = model.latest_version
    base_path = None
    if job.kind == JobKind.IMPORT:
        base_path = str(store.resolve(str(job.method_options["upload"])))
    elif base_version is not None:
        base_path = str(store.resolve(version_path(session, model.id, base_version)))
    unlearning = job.kind not in _MODEL_KINDS
    forget_ids = pending_forget_ids(session, job) if unlearning else []
    if unlearning and not forget_ids:
        _succeed_without_work(session, claim)
        return None
    job.base_version = base_version
    for req in claim.requests:
        req.status = RequestStatus.RUNNING
        req.started_at = req.started_at or claim.now
    for opendsr_id in sorted({r.opendsr_request_id for r in claim.requests if r.opendsr_request_id}):
        on_request_change(session, opendsr_id)
    # Samples of forgotten subjects never come back through recovery either.
    gone_subjects = tombstoned_subject_samples(session, model.id, model.dataset_id)
    forgotten = sorted(set(tombstoned(session, model.id)) | set(forget_ids) | set(gone_subjects))
    reference_job_moved(session, job)
    append_event(
        session,
        actor=claim.actor,
        action="job.started",
        subject=f"job:{job.id}",
        model=model.name,
        data={
            "worker": claim.worker,
            "attempt": job.attempts,
            "base_version": base_version,
            "forget_count": len(forget_ids),
            "request_ids": [r.id for r in claim.requests],
        },
    )
    return _ticket(session, claim, store, base_path, forget_ids, forgotten)


def _succeed_without_work(session: Session, claim: _Claim) -> None:
    """Every ID of the job was forgotten by earlier jobs: it succeeds on the current version."""
    job, model = claim.job, claim.model
    base_version = model.latest_version
    job.status, job.phase, job.finished_at = JobStatus.SUCCEEDED, JobPhase.DONE, claim.now
    job.base_version = base_version
    job.result_version = base_version
    job.verdict = {
        "status": "passed",
        "passed": True,
        "reasons": [],
        "checks": [],
        "note": "every requested ID was already forgotten",
    }
    session.flush()
    finish_requests(session, job, model, claim.requests, status=RequestStatus.SUCCEEDED,
                    actor=claim.actor, result_version=base_version)
    append_event(
        session,
        actor=claim.actor,
        action="job.succeeded",
        subject=f"job:{job.id}",
        model=model.name,
        data={"result_version": base_version, "published": False},
    )


def _ticket(
    session: Session,
    claim: _Claim,
    store: Store,
    base_path: str | None,
    forget_ids: list[str],
    forgotten: list[str],
) -> JobTicket:
    job, model = claim.job, claim.model
    dataset = session.get(DatasetRow, model.dataset_id)
    assert dataset is not None
    stats = None
    row = reference_row(session, model.id) if job.kind in _UNLEARNING_KINDS else None
    if row is not None and row.status == ReferenceStatus.READY and row.stats_path:
        stats = str(store.resolve(row.stats_path))
    return JobTicket(
        job_id=job.id,
        kind=job.kind,
        model_name=model.name,
        arch=model.architecture,
        num_classes=model.num_classes,
        dataset_kind=dataset.kind,
        dataset_uri=dataset.uri,
        dataset_options=dict(dataset.options or {}),
        recipe=dict(model.recipe),
        base_version=model.latest_version,
        base_checkpoint=base_path,
        forget_ids=forget_ids,
        forgotten_ids=forgotten,
        method=job.method,
        method_options=dict(job.method_options or {}),
        verify=job.verify,
        teacher_seed=int(job.teacher_seed),
        attempt=job.attempts,
        input_shape=(dataset.in_channels, dataset.height, dataset.width),
        reference_stats=stats,
        description=dict(model.description) if model.description else None,
    )
