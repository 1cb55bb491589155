"""Deletion requests: intake (validation, coalescing into jobs, idempotency), views, cancel.

Intake, in one transaction per request: the model row is locked (PostgreSQL) so a model's
job line changes one request at a time; the IDs are checked against the dataset's sample
index (unknown and test-split IDs are refused, listed) and against the lineage's tombstones
(already forgotten IDs are counted); the request and its IDs are stored with bulk inserts;
the request joins the model's queued job with the same method and verification, or starts a
new one. A request naming only forgotten IDs succeeds at once without a job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import DeletionRequest, Job, JobRequest, ModelRow, RequestSample
from app.db.types import utcnow
from app.errors import (
    DuplicateSampleIds,
    InvalidInput,
    ModelNotFound,
    NotCancellable,
    PayloadTooLarge,
    RequestNotFound,
    TestSplitSamples,
    UnknownSampleIds,
)
from app.services import idempotency
from app.services.apikeys import Principal
from app.services.audit import append_event
from app.services.callbacks import check_callback_url, enqueue_callback
from app.services.common import (
    Page,
    bulk_insert,
    count_matching,
    decode_cursor,
    encode_cursor,
    matching_values,
    new_id,
)
from app.services.jobs import audit_job_queued, cancel_in_transaction, create_job
from app.services.policy import METHOD_NAMES
from app.services.views import request_public
from app.settings import Settings


@dataclass(frozen=True)
class Submitted:
    """The outcome of a submission: the response and the job to send to the broker, if any."""

    status_code: int
    body: dict[str, Any]
    enqueue_job_id: str | None
    replayed: bool = False


def _get_model(session: Session, name: str) -> ModelRow:
    model = session.scalar(select(ModelRow).where(ModelRow.name == name))
    if model is None:
        session.rollback()
        raise ModelNotFound(f"no model named {name!r}", model=name)
    return model


def _lock_model(session: Session, name: str) -> ModelRow:
    model = session.scalar(select(ModelRow).where(ModelRow.name == name).with_for_update(key_share=True))
    if model is None:
        session.rollback()
        raise ModelNotFound(f"no model named {name!r}", model=name)
    return model


def submit_deletion_request(
    session: Session,
    *,
    principal: Principal,
    settings: Settings,
    model: str,
    sample_ids: list[str],
    subject_ref: str | None = None,
    reason: str | None = None,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    verify: str = "standard",
    callback_url: str | None = None,
    idempotency_key: str | None = None,
) -> Submitted:
    """Validate and accept a deletion request (see the module docstring for the rules)."""
    method = method or "feature_constraint"
    body = {
        "model": model,
        "sample_ids": sample_ids,
        "subject_ref": subject_ref,
        "reason": reason,
        "method": method,
        "method_options": method_options or {},
        "verify": verify,
        "callback_url": callback_url,
    }
    row_id = 0
    if idempotency_key is not None:
        row_id, replay = idempotency.begin(
            session,
            principal.id,
            idempotency_key,
            idempotency.body_hash(body),
            ttl_s=settings.idempotency_ttl_s,
        )
        if replay is not None:
            return Submitted(replay.status_code, replay.body, None, replayed=True)
    try:
        result = _create(
            session,
            principal=principal,
            settings=settings,
            model=model,
            sample_ids=sample_ids,
            subject_ref=subject_ref,
            reason=reason,
            method=method,
            method_options=method_options or {},
            verify=verify,
            callback_url=callback_url,
            idempotency_row=row_id,
        )
    except BaseException:
        if row_id:
            idempotency.abandon(session, row_id)
        raise
    return result


def _create(
    session: Session,
    *,
    principal: Principal,
    settings: Settings,
    model: str,
    sample_ids: list[str],
    subject_ref: str | None,
    reason: str | None,
    method: str,
    method_options: dict[str, Any],
    verify: str,
    callback_url: str | None,
    idempotency_row: int,
) -> Submitted:
    if not sample_ids:
        raise InvalidInput("sample_ids must name at least one sample", field="sample_ids")
    if len(sample_ids) > settings.max_ids_per_request:
        raise PayloadTooLarge(
            f"at most {settings.max_ids_per_request} sample IDs per request",
            limit=settings.max_ids_per_request,
            count=len(sample_ids),
        )
    if len(set(sample_ids)) != len(sample_ids):
        seen: set[str] = set()
        dups = sorted({s for s in sample_ids if s in seen or seen.add(s)})  # type: ignore[func-returns-value]
        raise DuplicateSampleIds(dups)
    if method not in METHOD_NAMES:
        raise InvalidInput(f"unknown method {method!r}", field="method", known=list(METHOD_NAMES))
    if verify not in ("standard", "retrain"):
        raise InvalidInput("verify must be 'standard' or 'retrain'", field="verify")
    if callback_url is not None:
        check_callback_url(callback_url, settings)

    # Validation and the bulk insert run before the model lock: the lock (and, on
    # PostgreSQL, the audit chain's) is held only for the job join and the final events.
    m = _get_model(session, model)
    # Count first: the common case (every ID a known training sample) moves no rows back.
    train_count = count_matching(
        session,
        "samples",
        "sample_id",
        sample_ids,
        where="t.dataset_id = :ds AND t.split = 'train'",
        params={"ds": m.dataset_id},
    )
    if train_count != len(sample_ids):
        split_of = {
            r[0]: r[1]
            for r in matching_values(
                session,
                "samples",
                "sample_id",
                sample_ids,
                where="t.dataset_id = :ds",
                params={"ds": m.dataset_id},
                select="sample_id, split",
            )
        }
        session.rollback()
        unknown = [s for s in sample_ids if s not in split_of]
        if unknown:
            raise UnknownSampleIds(unknown)
        raise TestSplitSamples([s for s, sp in split_of.items() if sp != "train"])
    forgotten = {
        r[0]
        for r in matching_values(
            session,
            "tombstones",
            "sample_id",
            sample_ids,
            where="t.model_id = :m",
            params={"m": m.id},
        )
    }
    now = utcnow()
    req = DeletionRequest(
        id=new_id("dr"),
        model_id=m.id,
        status="accepted",
        sample_count=len(sample_ids),
        already_forgotten_count=len(forgotten),
        subject_ref=subject_ref,
        reason=reason,
        method=method,
        verify=verify,
        callback_url=callback_url,
        api_key_id=principal.id,
        received_at=now,
    )
    session.add(req)
    session.flush()
    bulk_insert(
        session,
        RequestSample.__table__,  # type: ignore[arg-type]
        ({"request_id": req.id, "sample_id": s, "already_forgotten": s in forgotten} for s in sample_ids),
    )
    digest = hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()
    enqueue: str | None = None
    new_job: Job | None = None
    accepted = {
        "sample_count": len(sample_ids),
        "already_forgotten_count": len(forgotten),
        "sample_ids_sha256": digest,
        "subject_ref": subject_ref,
        "reason": reason,
        "method": method,
        "verify": verify,
    }

    def audit_accepted() -> None:
        append_event(
            session,
            actor=principal.name,
            action="request.accepted",
            subject=f"request:{req.id}",
            model=m.name,
            request_id=req.id,
            data=accepted,
        )

    if len(forgotten) == len(sample_ids):
        req.status, req.finished_at, req.started_at = "succeeded", now, now
        req.result_version = m.latest_version
        session.flush()
        audit_accepted()
        append_event(
            session,
            actor=principal.name,
            action="request.succeeded",
            subject=f"request:{req.id}",
            model=m.name,
            request_id=req.id,
            data={"result_version": m.latest_version, "note": "every ID was already forgotten"},
        )
        enqueue_callback(session, req, m.name)
    else:
        _lock_model(session, model)
        job = session.scalar(
            select(Job)
            .where(Job.model_id == m.id)
            .where(Job.status == "queued")
            .where(Job.kind.in_(("unlearn", "retrain")))
            .where(Job.method == method)
            .where(Job.verify == verify)
            .where(Job.cancel_requested.is_(False))
            .order_by(Job.position.desc())
            .limit(1)
            .with_for_update(key_share=True)
        )
        if job is None or job.status != "queued" or (job.method_options or {}) != method_options:
            new_job = create_job(
                session,
                m,
                kind="retrain" if method == "retrain" else "unlearn",
                method=method,
                verify=verify,
                method_options=method_options,
                actor=principal.name,
                audit=False,
            )
            job = new_job
            enqueue = job.id
        req.status, req.job_id = "queued", job.id
        session.add(JobRequest(job_id=job.id, request_id=req.id))
        session.flush()
        # The audit chain's lock is taken last, so it is held only for these inserts.
        audit_accepted()
        if new_job is not None:
            audit_job_queued(session, new_job, m.name, actor=principal.name)
        append_event(
            session,
            actor=principal.name,
            action="request.queued",
            subject=f"request:{req.id}",
            model=m.name,
            request_id=req.id,
            data={"job_id": job.id, "coalesced": new_job is None},
        )
    resource = request_public(req, m.name)
    if idempotency_row:
        idempotency.finish(session, idempotency_row, 202, resource, req.id)
    session.commit()
    return Submitted(202, resource, enqueue)


def _load(session: Session, request_id: str, *, lock: bool = False) -> tuple[DeletionRequest, str]:
    stmt = (
        select(DeletionRequest, ModelRow.name)
        .join(ModelRow, ModelRow.id == DeletionRequest.model_id)
        .where(DeletionRequest.id == request_id)
    )
    if lock:
        stmt = stmt.with_for_update(of=DeletionRequest)
    row = session.execute(stmt).first()
    if row is None:
        session.rollback()
        raise RequestNotFound(f"no deletion request {request_id!r}")
    return row[0], row[1]


def get_deletion_request(session: Session, request_id: str) -> dict[str, Any]:
    """One request's resource."""
    req, name = _load(session, request_id)
    body = request_public(req, name)
    session.rollback()
    return body


def list_deletion_requests(
    session: Session,
    *,
    model: str | None = None,
    status: str | None = None,
    subject_ref: str | None = None,
    limit: int,
    cursor: str | None = None,
) -> Page[dict[str, Any]]:
    """Requests, newest first, filtered."""
    stmt = select(DeletionRequest, ModelRow.name).join(ModelRow, ModelRow.id == DeletionRequest.model_id)
    if model:
        stmt = stmt.where(ModelRow.name == model)
    if status:
        stmt = stmt.where(DeletionRequest.status == status)
    if subject_ref:
        stmt = stmt.where(DeletionRequest.subject_ref == subject_ref)
    after = decode_cursor(cursor)
    if after is not None:
        stmt = stmt.where(DeletionRequest.id < str(after))
    rows = session.execute(stmt.order_by(DeletionRequest.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    items = [request_public(r, n) for r, n in rows[:limit]]
    session.rollback()
    return Page(items, encode_cursor(items[-1]["id"]) if more else None)


def cancel_deletion_request(session: Session, request_id: str, *, actor: str) -> dict[str, Any]:
    """Cancel a request while `accepted` or `queued`; its job is cancelled if left empty."""
    req, name = _load(session, request_id)
    job: Job | None = None
    if req.job_id:
        job = session.scalar(select(Job).where(Job.id == req.job_id).with_for_update(key_share=True))
    req, name = _load(session, request_id, lock=True)
    if req.status not in ("accepted", "queued"):
        status = req.status
        session.rollback()
        raise NotCancellable(
            f"request {request_id} is {status}; only accepted or queued requests can be cancelled",
            status_now=status,
        )
    now = utcnow()
    req.status, req.finished_at = "cancelled", now
    session.flush()
    append_event(
        session,
        actor=actor,
        action="request.cancelled",
        subject=f"request:{req.id}",
        model=name,
        request_id=req.id,
        data={"job_id": req.job_id},
    )
    enqueue_callback(session, req, name)
    if job is not None and job.status == "queued":
        remaining = session.scalars(
            select(DeletionRequest.id)
            .where(DeletionRequest.job_id == job.id)
            .where(DeletionRequest.status.in_(("accepted", "queued", "running")))
            .limit(1)
        ).first()
        if remaining is None:
            model = session.scalar(select(ModelRow).where(ModelRow.id == req.model_id))
            assert model is not None
            cancel_in_transaction(session, job, model, actor=actor)
    session.commit()
    return get_deletion_request(session, request_id)
