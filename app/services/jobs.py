"""Jobs: creation, the worker-facing lifecycle (claim, progress, complete, fail, cancel),
the sweeper's query, and the API's job views.

Rules enforced here:
- Jobs of one model run strictly in `position` order: a job can be claimed only when no
  earlier job of the model is `queued` or `running`, and it runs on the model's latest
  version at claim time.
- A claim is one conditional UPDATE (`queued`, or `running` with an expired heartbeat, to
  `running`), so two concurrent claimers never both win, on PostgreSQL or SQLite.
- Publishing writes the checkpoint first (durable, content-addressed) and then, in one
  transaction, the version row (unique per parent: a lineage never forks), the tombstones,
  the request statuses and the audit events.
- The `attempt` argument some functions accept makes a worker that lost its claim (its
  heartbeat expired and another worker took the job) fail with `StaleAttempt` instead of
  overwriting the new attempt's state.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from app.db.models import (
    DatasetRow,
    DeletionRequest,
    Job,
    JobRequest,
    ModelRow,
    ModelVersion,
    RequestSample,
    Tombstone,
)
from app.db.types import rfc3339, utcnow
from app.errors import Conflict, JobNotFound, NotCancellable, StaleAttempt
from app.services import policy as policy_rules
from app.services.audit import Event, append_event, append_events
from app.services.callbacks import enqueue_callback
from app.services.common import (
    Page,
    bulk_insert,
    decode_cursor,
    encode_cursor,
    finite_json,
    new_id,
    table_of,
)
from app.services.views import job_public
from models_store import Store

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
REQUEST_OPEN = ("accepted", "queued", "running")
DEFAULT_MAX_ATTEMPTS = 5


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


# -- helpers ----------------------------------------------------------------------------------


def _job(session: Session, job_id: str, *, lock: bool = False) -> Job:
    stmt = select(Job).where(Job.id == str(job_id))
    if lock:
        stmt = stmt.with_for_update(key_share=True)
    job = session.scalar(stmt)
    if job is None:
        session.rollback()
        raise JobNotFound(f"no job {job_id!r}")
    return job


def _model(session: Session, model_id: int, *, lock: bool = False) -> ModelRow:
    stmt = select(ModelRow).where(ModelRow.id == model_id)
    if lock:
        stmt = stmt.with_for_update(key_share=True)
    model = session.scalar(stmt)
    assert model is not None
    return model


def _open_requests(session: Session, job_id: str) -> list[DeletionRequest]:
    return list(
        session.scalars(
            select(DeletionRequest)
            .where(DeletionRequest.job_id == job_id)
            .where(DeletionRequest.status.in_(REQUEST_OPEN))
            .order_by(DeletionRequest.id)
        )
    )


def _pending_forget_ids(session: Session, job: Job) -> list[str]:
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
        .where(DeletionRequest.status.in_(REQUEST_OPEN))
        .where(~exists(tomb))
        .distinct()
        .order_by(RequestSample.sample_id)
    )
    return list(session.scalars(stmt))


def _tombstoned(session: Session, model_id: int) -> list[str]:
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


def next_queued_job_id(session: Session, model_id: int) -> str | None:
    """The model's earliest queued job, if it is now claimable (nothing running before it)."""
    first = session.scalar(
        select(Job)
        .where(Job.model_id == model_id)
        .where(Job.status.in_(ACTIVE))
        .order_by(Job.position)
        .limit(1)
    )
    if first is None or first.status != "queued":
        return None
    return first.id


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
    kind: str,
    method: str,
    verify: str = "standard",
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
        status="queued",
        phase="queued",
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


def _finish_requests(
    session: Session,
    job: Job,
    model: ModelRow,
    requests: list[DeletionRequest],
    *,
    status: str,
    actor: str,
    error: dict[str, Any] | None = None,
    result_version: int | None = None,
) -> None:
    now = utcnow()
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


def _check_attempt(job: Job, attempt: int | None, worker: str | None) -> None:
    if job.status != "running":
        raise StaleAttempt(f"job {job.id} is {job.status}, not running")
    if attempt is not None and job.attempts != attempt:
        raise StaleAttempt(f"job {job.id} is on attempt {job.attempts}, not {attempt}")
    if worker is not None and job.worker != worker:
        raise StaleAttempt(f"job {job.id} is held by {job.worker}, not {worker}")


# -- worker-facing ------------------------------------------------------------------------------


def claim_job(
    session: Session,
    job_id: str,
    worker: str,
    *,
    heartbeat_timeout_s: float,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    store: Store | None = None,
) -> JobTicket | None:
    """Take a job for `worker`; None when it is final, held by a live worker, or not its turn.

    Moves `queued` (or `running` with a heartbeat older than `heartbeat_timeout_s`) to
    `running` in one conditional UPDATE, bumps `attempts`, marks its requests `running` and
    records `job.started`; all in one committed transaction. A job whose requests were all
    cancelled is cancelled; a job whose IDs were all forgotten meanwhile succeeds without
    work; a job that exhausted `max_attempts` fails.
    """
    from app.settings import get_settings

    now = utcnow()
    cutoff = now - timedelta(seconds=heartbeat_timeout_s)
    job_id = str(job_id)
    current = session.get(Job, job_id)
    if current is None or current.status in FINAL:
        session.rollback()
        return None
    if current.status == "running" and current.heartbeat_at is not None and current.heartbeat_at < cutoff:
        if current.cancel_requested:
            session.rollback()
            mark_cancelled(session, job_id, actor="sweeper")
            return None
        if current.attempts >= max_attempts:
            lost = current.attempts
            session.rollback()
            fail_job(
                session,
                job_id,
                error=f"the job's worker was lost {lost} times",
                code="too_many_attempts",
                actor="sweeper",
            )
            return None
    earlier = aliased(Job)
    unfinished_before = (
        select(earlier.id)
        .where(earlier.model_id == Job.model_id)
        .where(earlier.position < Job.position)
        .where(earlier.status.in_(ACTIVE))
    )
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .where(Job.cancel_requested.is_(False))
        .where(
            or_(
                Job.status == "queued",
                and_(Job.status == "running", Job.heartbeat_at < cutoff),
            )
        )
        .where(~exists(unfinished_before))
        .values(
            status="running",
            phase="loading",
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
        session.rollback()
        return None
    job = session.scalar(select(Job).where(Job.id == job_id).execution_options(populate_existing=True))
    assert job is not None
    model = _model(session, job.model_id)
    dataset = session.get(DatasetRow, model.dataset_id)
    assert dataset is not None
    requests = _open_requests(session, job.id)

    if job.kind != "train" and not requests:
        session.commit()
        mark_cancelled(session, job_id, actor="system")
        return None
    base_version = model.latest_version
    base_path: str | None = None
    if base_version is not None:
        version = session.scalar(
            select(ModelVersion)
            .where(ModelVersion.model_id == model.id)
            .where(ModelVersion.version == base_version)
        )
        assert version is not None
        store = store or Store(get_settings().store_path)
        base_path = str(store.resolve(version.path))
    if job.kind == "unlearn" and base_version is None:
        session.commit()
        fail_job(
            session,
            job_id,
            error="the model has no published version to unlearn from",
            code="no_base_version",
        )
        return None
    forget_ids = _pending_forget_ids(session, job) if job.kind != "train" else []
    if job.kind != "train" and not forget_ids:
        job.status, job.phase, job.finished_at = "succeeded", "done", now
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
        _finish_requests(
            session,
            job,
            model,
            requests,
            status="succeeded",
            actor=f"worker:{worker}",
            result_version=base_version,
        )
        append_event(
            session,
            actor=f"worker:{worker}",
            action="job.succeeded",
            subject=f"job:{job.id}",
            model=model.name,
            data={"result_version": base_version, "published": False},
        )
        session.commit()
        return None

    job.base_version = base_version
    for req in requests:
        req.status = "running"
        req.started_at = req.started_at or now
    forgotten = sorted(set(_tombstoned(session, model.id)) | set(forget_ids))
    append_event(
        session,
        actor=f"worker:{worker}",
        action="job.started",
        subject=f"job:{job.id}",
        model=model.name,
        data={
            "worker": worker,
            "attempt": job.attempts,
            "base_version": base_version,
            "forget_count": len(forget_ids),
            "request_ids": [r.id for r in requests],
        },
    )
    ticket = JobTicket(
        job_id=job.id,
        kind=job.kind,
        model_name=model.name,
        arch=model.architecture,
        num_classes=model.num_classes,
        dataset_kind=dataset.kind,
        dataset_uri=dataset.uri,
        dataset_options=dict(dataset.options or {}),
        recipe=dict(model.recipe),
        base_version=base_version,
        base_checkpoint=base_path,
        forget_ids=forget_ids,
        forgotten_ids=forgotten,
        method=job.method,
        method_options=dict(job.method_options or {}),
        verify=job.verify,
        teacher_seed=int(job.teacher_seed),
        attempt=job.attempts,
        input_shape=(dataset.in_channels, dataset.height, dataset.width),
    )
    session.commit()
    return ticket


def published_files(session: Session, model_name: str) -> set[str]:
    """Store-relative paths of every checkpoint and manifest the model's versions name."""
    rows = session.execute(
        select(ModelVersion.path, ModelVersion.manifest_path)
        .join(ModelRow, ModelRow.id == ModelVersion.model_id)
        .where(ModelRow.name == model_name)
    ).all()
    session.rollback()
    return {path for row in rows for path in row}


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
    job = _job(session, job_id)
    try:
        _check_attempt(job, attempt, worker)
    except StaleAttempt:
        session.rollback()
        raise
    job.phase = phase
    job.step = int(step)
    job.total_steps = int(total_steps)
    job.progress = min(1.0, step / total_steps) if total_steps else 0.0
    job.losses = {k: float(v) for k, v in (losses or {}).items()}
    job.weights = {k: float(v) for k, v in (weights or {}).items()}
    job.eta_seconds = eta_seconds
    job.heartbeat_at = utcnow()
    cancel = bool(job.cancel_requested)
    session.commit()
    return cancel


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
    # Evidence is stored as JSON, which has no inf or nan: such a value is recorded as null.
    metrics, reference, gaps, history = (finite_json(x) for x in (metrics, reference, gaps, history))
    job = _job(session, job_id, lock=True)
    _check_attempt(job, attempt, worker)
    if job.cancel_requested:
        session.rollback()
        after_cancel = mark_cancelled(session, job_id)
        return CompletionResult(
            job_id, False, "cancelled", {}, next_job_id=_first(after_cancel), enqueue=after_cancel
        )
    model = _model(session, job.model_id)
    dataset = session.get(DatasetRow, model.dataset_id)
    assert dataset is not None
    parent_metrics = None
    if job.base_version is not None:
        parent_metrics = session.scalar(
            select(ModelVersion.metrics)
            .where(ModelVersion.model_id == model.id)
            .where(ModelVersion.version == job.base_version)
        )
    all_metrics: dict[str, Any] = {**metrics, "seconds": seconds, "steps": steps, "device": device}
    verdict = policy_rules.evaluate(
        model.policy, kind=job.kind, metrics=metrics, parent_metrics=parent_metrics, gaps=gaps
    )
    job.metrics, job.reference, job.gaps, job.verdict = all_metrics, reference, gaps, verdict
    job.seconds = seconds
    job.method_options = {**(job.method_options or {}), "resolved": method_config or {}}
    forget_ids = _pending_forget_ids(session, job) if job.kind != "train" else []
    lineage = sorted(set(_tombstoned(session, model.id)) | set(forget_ids))
    actor = f"worker:{job.worker}"

    if not verdict["passed"]:
        return _fail_verdict(session, job, model, verdict, actor)

    new_version = 1 if job.base_version is None else job.base_version + 1
    manifest = {
        "format": "lethe.checkpoint/1",
        "model": model.name,
        "version": new_version,
        "parent_version": job.base_version,
        "job_id": job.id,
        "kind": job.kind,
        "architecture": {
            "name": model.architecture,
            "num_classes": model.num_classes,
            "input_shape": [dataset.in_channels, dataset.height, dataset.width],
        },
        "dataset": {
            "name": dataset.name,
            "kind": dataset.kind,
            "uri": dataset.uri,
            "options": dataset.options,
            "fingerprint": dataset.fingerprint,
        },
        "recipe": model.recipe,
        "method": method,
        "method_config": method_config or {},
        "teacher_seed": teacher_seed,
        "verify": job.verify,
        "metrics": all_metrics,
        "reference": reference,
        "gaps": gaps,
        "verdict": verdict,
        "forgotten": {
            "count": len(lineage),
            "sha256": ids_digest(lineage),
            "this_job": len(forget_ids),
        },
        "history_len": len(history or []),
        "created_at": rfc3339(utcnow()),
    }
    model_name, model_id = model.name, model.id
    session.rollback()  # release locks (SQLite write lock) while the file is written
    stored = store.put(model_name, weights, manifest)

    model = _model(session, model_id, lock=True)
    job = _job(session, job_id, lock=True)
    _check_attempt(job, attempt, worker)
    if job.cancel_requested:  # cancelled while the file was written: publish nothing
        session.rollback()
        after_cancel = mark_cancelled(session, job_id)
        return CompletionResult(
            job_id, False, "cancelled", {}, next_job_id=_first(after_cancel), enqueue=after_cancel
        )
    if model.latest_version != job.base_version:
        latest, base = model.latest_version, job.base_version
        session.rollback()
        raise Conflict(f"model {model_name} moved to v{latest} while job {job_id} ran on v{base}")
    now = utcnow()
    version = ModelVersion(
        model_id=model.id,
        version=new_version,
        parent_version=job.base_version,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        path=store.relative(stored.path),
        manifest_path=store.relative(stored.manifest_path),
        method=method,
        job_id=job.id,
        metrics=all_metrics,
        forgotten_count=len(lineage),
        created_at=now,
    )
    session.add(version)
    base = job.base_version
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"model {model_name} already has a child of v{base}; refusing a fork") from None
    model_id, job_id = model.id, job.id
    bulk_insert(
        session,
        table_of(Tombstone),
        ("model_id", "sample_id", "version", "job_id", "created_at"),
        ((model_id, s, new_version, job_id, now) for s in forget_ids),
    )
    model.latest_version = new_version
    model.forgotten_count = len(lineage)
    job.metrics, job.reference, job.gaps, job.verdict = all_metrics, reference, gaps, verdict
    job.seconds = seconds
    job.status, job.phase, job.finished_at = "succeeded", "done", now
    job.result_version = new_version
    job.progress = 1.0
    session.flush()
    requests = _open_requests(session, job.id)
    append_event(
        session,
        actor=actor,
        action="model.version.published",
        subject=f"model:{model.name}/v{new_version}",
        model=model.name,
        data={
            "version": new_version,
            "parent": job.base_version,
            "sha256": stored.sha256,
            "size_bytes": stored.size_bytes,
            "method": method,
            "job_id": job.id,
            "teacher_seed": teacher_seed,
            "forgotten_count": len(lineage),
            "forgotten_sha256": manifest["forgotten"]["sha256"],  # type: ignore[index]
        },
    )
    _finish_requests(
        session,
        job,
        model,
        requests,
        status="succeeded",
        actor=actor,
        result_version=new_version,
    )
    append_event(
        session,
        actor=actor,
        action="job.succeeded",
        subject=f"job:{job.id}",
        model=model.name,
        data={
            "result_version": new_version,
            "metrics": all_metrics,
            "verdict": verdict,
            "gaps": gaps,
            "request_ids": [r.id for r in requests],
        },
    )
    nxt = next_queued_job_id(session, model.id)
    session.commit()
    return CompletionResult(
        job_id,
        True,
        "passed",
        verdict,
        version=new_version,
        sha256=stored.sha256,
        next_job_id=nxt,
        enqueue=[nxt] if nxt else [],
    )


def _first(ids: list[str]) -> str | None:
    return ids[0] if ids else None


def _fail_verdict(
    session: Session, job: Job, model: ModelRow, verdict: dict[str, Any], actor: str
) -> CompletionResult:
    model = _model(session, model.id, lock=True)
    now = utcnow()
    job.status, job.phase, job.finished_at = "failed", "done", now
    job.error = {"code": "verdict_failed", "message": "; ".join(verdict["reasons"])}
    session.flush()
    requests = _open_requests(session, job.id)
    fallback_method = (model.policy or {}).get("fallback_method")
    fallback: Job | None = None
    if fallback_method and fallback_method != job.method and job.kind != "train" and requests:
        fallback = create_job(
            session,
            model,
            kind="retrain" if fallback_method == "retrain" else "unlearn",
            method=fallback_method,
            verify=job.verify,
            fallback_of=job.id,
            actor=actor,
        )
        for req in requests:
            req.job_id = fallback.id
            req.status = "queued"
            session.add(JobRequest(job_id=fallback.id, request_id=req.id))
        session.flush()
    else:
        _finish_requests(session, job, model, requests, status="failed", actor=actor, error=job.error)
    append_event(
        session,
        actor=actor,
        action="job.failed",
        subject=f"job:{job.id}",
        model=model.name,
        data={
            "code": "verdict_failed",
            "verdict": verdict,
            "metrics": job.metrics,
            "gaps": job.gaps,
            "fallback_job_id": fallback.id if fallback else None,
        },
    )
    nxt = next_queued_job_id(session, model.id)
    session.commit()
    enqueue = [j for j in ([fallback.id] if fallback else []) + ([nxt] if nxt else [])]
    return CompletionResult(
        job.id,
        False,
        "failed",
        verdict,
        fallback_job_id=fallback.id if fallback else None,
        next_job_id=nxt if (fallback is None or nxt != fallback.id) else None,
        enqueue=list(dict.fromkeys(enqueue)),
    )


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
    job = _job(session, job_id, lock=True)
    if job.status in FINAL:
        session.rollback()
        return []
    if attempt is not None or worker is not None:
        _check_attempt(job, attempt, worker)
    model = _model(session, job.model_id)
    job.status, job.phase, job.finished_at = "failed", "done", utcnow()
    job.error = {"code": code, "message": error}
    session.flush()
    who = actor or f"worker:{job.worker}"
    _finish_requests(
        session,
        job,
        model,
        _open_requests(session, job.id),
        status="failed",
        actor=who,
        error=job.error,
    )
    append_event(
        session,
        actor=who,
        action="job.failed",
        subject=f"job:{job.id}",
        model=model.name,
        data={"code": code, "error": error, "attempts": job.attempts},
    )
    nxt = next_queued_job_id(session, model.id)
    session.commit()
    return [nxt] if nxt else []


def cancel_in_transaction(session: Session, job: Job, model: ModelRow, *, actor: str) -> None:
    """Cancel `job` and its open requests inside the caller's transaction (no commit)."""
    job.status, job.phase, job.finished_at = "cancelled", "done", utcnow()
    session.flush()
    _finish_requests(session, job, model, _open_requests(session, job.id), status="cancelled", actor=actor)
    append_event(
        session,
        actor=actor,
        action="job.cancelled",
        subject=f"job:{job.id}",
        model=model.name,
        data={"attempts": job.attempts},
    )


def mark_cancelled(session: Session, job_id: str, *, actor: str | None = None) -> list[str]:
    """Mark a job cancelled (its open requests too); returns job ids to enqueue next."""
    job = _job(session, job_id, lock=True)
    if job.status in FINAL:
        session.rollback()
        return []
    model = _model(session, job.model_id)
    who = actor or (f"worker:{job.worker}" if job.worker else "system")
    cancel_in_transaction(session, job, model, actor=who)
    nxt = next_queued_job_id(session, model.id)
    session.commit()
    return [nxt] if nxt else []


def find_stale_jobs(session: Session, *, queued_grace_s: float, heartbeat_timeout_s: float) -> list[str]:
    """Jobs whose broker message may be lost: claimable `queued` jobs last enqueued more than
    `queued_grace_s` ago, and `running` jobs whose heartbeat is older than
    `heartbeat_timeout_s` (their worker died)."""
    now = utcnow()
    grace = now - timedelta(seconds=queued_grace_s)
    dead = now - timedelta(seconds=heartbeat_timeout_s)
    earlier = aliased(Job)
    unfinished_before = (
        select(earlier.id)
        .where(earlier.model_id == Job.model_id)
        .where(earlier.position < Job.position)
        .where(earlier.status.in_(ACTIVE))
    )
    last_sent = func.coalesce(Job.enqueued_at, Job.queued_at)
    stmt = (
        select(Job.id)
        .where(
            or_(
                and_(Job.status == "queued", last_sent < grace, ~exists(unfinished_before)),
                and_(Job.status == "running", Job.heartbeat_at < dead, last_sent < grace),
            )
        )
        .order_by(Job.queued_at)
    )
    ids = list(session.scalars(stmt))
    session.rollback()
    return ids


def mark_enqueued(session: Session, job_ids: list[str]) -> None:
    """Remember when the jobs were last sent to the broker (the sweeper's clock)."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(enqueued_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    session.commit()


# -- API-facing ---------------------------------------------------------------------------------


def get_job(session: Session, job_id: str) -> dict[str, Any]:
    """One job's resource."""
    try:
        job = _job(session, job_id)
        return job_public(session, job, _model(session, job.model_id).name)
    finally:
        session.rollback()


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
    rows = session.execute(stmt.order_by(Job.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [job_public(session, j, name) for j, name in rows]
    session.rollback()
    return Page(items, encode_cursor(rows[-1][0].id) if more else None)


def cancel_job(session: Session, job_id: str, *, actor: str) -> dict[str, Any]:
    """Cancel a queued job now, or flag a running one (the worker stops at its next step)."""
    job = _job(session, job_id, lock=True)
    model = _model(session, job.model_id)
    if job.status in FINAL:
        status = job.status
        session.rollback()
        raise NotCancellable(f"job {job_id} is {status}", status_now=status)
    if job.status == "queued":
        session.rollback()
        mark_cancelled(session, job_id, actor=actor)
    else:
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
        session.commit()
    return get_job(session, job_id)
