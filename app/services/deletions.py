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

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from app.db.models import DeletionRequest, IdempotencyKey, Job, JobRequest, ModelRow, RequestSample
from app.db.types import utcnow
from app.errors import (
    DuplicateSampleIds,
    InvalidInput,
    InvalidMethodOptions,
    ModelNotFound,
    NotCancellable,
    PayloadTooLarge,
    RequestNotFound,
    TestSplitSamples,
    UnknownSampleIds,
)
from app.services import idempotency
from app.services.apikeys import Principal
from app.services.audit import Event, append_event, append_events
from app.services.callbacks import check_callback_url, enqueue_callback
from app.services.common import (
    Page,
    bulk_insert,
    counts_matching,
    decode_cursor,
    encode_cursor,
    matching_values,
    new_id,
    table_of,
)
from app.services.jobs import cancel_in_transaction, create_job, job_queued_event
from app.services.views import request_public
from app.settings import Settings
from engine import catalog


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
    method = method or catalog.DEFAULT_METHOD
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
    claim: IdempotencyKey | None = None
    if idempotency_key is not None:
        claim, replay = idempotency.begin(
            session,
            principal.id,
            idempotency_key,
            idempotency.body_hash(body),
            ttl_s=settings.idempotency_ttl_s,
        )
        if replay is not None:
            return Submitted(replay.status_code, replay.body, None, replayed=True)
    try:
        return _create(
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
            claim=claim,
        )
    except BaseException:
        session.rollback()  # the key's claim goes with everything else: a retry may use it
        raise


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
    claim: IdempotencyKey | None,
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
    _check_method(method, method_options)
    if verify not in ("standard", "retrain"):
        raise InvalidInput("verify must be 'standard' or 'retrain'", field="verify")
    if callback_url is not None:
        check_callback_url(callback_url, settings)

    # Validation and the bulk insert run before the model lock: the lock (and, on
    # PostgreSQL, the audit chain's) is held only for the job join and the final events.
    m = _get_model(session, model)
    forgotten = _check_sample_ids(session, m, sample_ids)
    now = utcnow()
    all_forgotten = len(forgotten) == len(sample_ids)
    req = DeletionRequest(
        id=new_id("dr"),
        model_id=m.id,
        status="succeeded" if all_forgotten else "accepted",
        sample_count=len(sample_ids),
        already_forgotten_count=len(forgotten),
        subject_ref=subject_ref,
        reason=reason,
        method=method,
        verify=verify,
        callback_url=callback_url,
        api_key_id=principal.id,
        job_id=None,
        result_version=m.latest_version if all_forgotten else None,
        verdict=None,
        metrics=None,
        error=None,
        received_at=now,
        started_at=now if all_forgotten else None,
        finished_at=now if all_forgotten else None,
    )
    # Written with plain INSERTs; `req` stays a transient object the response is built from.
    session.execute(insert(table_of(DeletionRequest)), _columns(req))
    rid = req.id
    bulk_insert(
        session,
        table_of(RequestSample),
        ("request_id", "sample_id", "already_forgotten"),
        ((rid, s, s in forgotten) for s in sample_ids),
    )
    accepted = Event(
        principal.name,
        "request.accepted",
        f"request:{req.id}",
        {
            "sample_count": len(sample_ids),
            "already_forgotten_count": len(forgotten),
            "sample_ids_sha256": hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest(),
            "subject_ref": subject_ref,
            "reason": reason,
            "method": method,
            "verify": verify,
        },
        m.name,
        req.id,
    )
    enqueue: str | None = None
    if all_forgotten:
        note = {"result_version": m.latest_version, "note": "every ID was already forgotten"}
        append_events(session, [
            accepted,
            Event(principal.name, "request.succeeded", f"request:{req.id}", note, m.name, req.id),
        ])
        enqueue_callback(session, req, m.name)
    else:
        job_id, new_job = _join_or_create_job(session, m, method, verify, method_options, principal)
        enqueue = new_job.id if new_job is not None else None
        req.status, req.job_id = "queued", job_id
        requests = table_of(DeletionRequest)
        session.execute(
            update(requests).where(requests.c.id == req.id).values(status="queued", job_id=job_id)
        )
        session.execute(insert(table_of(JobRequest)), {"job_id": job_id, "request_id": req.id})
        # The audit chain's lock is taken last, so it is held only for this insert and commit.
        events = [accepted]
        if new_job is not None:
            events.append(job_queued_event(new_job, m.name, actor=principal.name))
        queued = {"job_id": job_id, "coalesced": new_job is None}
        events.append(Event(principal.name, "request.queued", f"request:{req.id}", queued, m.name, req.id))
        append_events(session, events)
    resource = request_public(req, m.name)
    if claim is not None:
        idempotency.finish(claim, 202, resource, req.id)
    session.commit()
    return Submitted(202, resource, enqueue)


def _check_method(method: str, options: dict[str, Any]) -> None:
    """Refuse an unknown method, or options its catalog entry does not admit (each named)."""
    if method not in catalog.METHODS:
        raise InvalidInput(
            f"unknown method {method!r}", field="method", known=list(catalog.METHOD_NAMES)
        )
    problems = catalog.check_method_options(method, options)
    if problems:
        raise InvalidMethodOptions(
            method,
            [(p.option, p.message, "method_option_rule" if p.rule else "method_option") for p in problems],
        )


def _columns(row: DeletionRequest) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in DeletionRequest.__table__.columns}


def _check_sample_ids(session: Session, m: ModelRow, sample_ids: list[str]) -> set[str]:
    """The already-forgotten IDs among `sample_ids`; unknown or test-split IDs are refused.

    The common case (every ID a training sample, none forgotten) is one query that moves
    two counts back, whatever the number of IDs.
    """
    train, forgotten_count = counts_matching(
        session,
        "samples",
        "sample_id",
        sample_ids,
        where="t.dataset_id = :ds AND t.split = 'train'",
        join="LEFT JOIN tombstones tb ON tb.model_id = :m AND tb.sample_id = t.sample_id",
        params={"ds": m.dataset_id, "m": m.id},
        counts=("count(*)", "count(tb.sample_id)"),
    )
    if train != len(sample_ids):
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
    if not forgotten_count:
        return set()
    return {
        r[0]
        for r in matching_values(
            session, "tombstones", "sample_id", sample_ids, where="t.model_id = :m", params={"m": m.id}
        )
    }


def _join_or_create_job(
    session: Session,
    m: ModelRow,
    method: str,
    verify: str,
    method_options: dict[str, Any],
    principal: Principal,
) -> tuple[str, Job | None]:
    """Under the model's lock: the id of the queued job the request joins, and the job if it
    had to be created (same method, verification and options, not being cancelled)."""
    session.execute(
        select(ModelRow.id).where(ModelRow.id == m.id).with_for_update(key_share=True)
    )
    row = session.execute(
        select(Job.id, Job.method_options)
        .where(Job.model_id == m.id)
        .where(Job.status == "queued")
        .where(Job.kind.in_(("unlearn", "retrain")))
        .where(Job.method == method)
        .where(Job.verify == verify)
        .where(Job.cancel_requested.is_(False))
        .order_by(Job.position.desc())
        .limit(1)
        .with_for_update(key_share=True)
    ).first()
    if row is not None and (row.method_options or {}) == method_options:
        return str(row.id), None
    job = create_job(
        session,
        m,
        kind="retrain" if method == "retrain" else "unlearn",
        method=method,
        verify=verify,
        method_options=method_options,
        actor=principal.name,
        audit=False,
    )
    return job.id, job


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
