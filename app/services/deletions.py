"""Deletion requests: intake (validation, coalescing into jobs, idempotency), views, cancel.

Intake, in one transaction per request: the model row is locked (PostgreSQL) so a model's
job line changes one request at a time; the IDs are checked against the dataset's sample
index (unknown and test-split IDs are refused, listed) and against the lineage's tombstones
(already forgotten IDs are counted); the request and its IDs are stored with bulk inserts;
the request joins the model's queued job with the same method and verification, or starts a
new one. A request naming only forgotten IDs succeeds at once without a job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from app.db.models import (
    DatasetRow,
    DeletionRequest,
    DeletionRequestGroup,
    IdempotencyKey,
    Job,
    JobRequest,
    ModelRow,
    RequestSample,
)
from app.db.types import utcnow
from app.errors import (
    DuplicateSampleIds,
    InvalidInput,
    InvalidMethodOptions,
    ModelImportFailed,
    ModelNotFound,
    NotCancellable,
    PayloadTooLarge,
    RequestNotFound,
    TestSplitSamples,
    UnknownSampleIds,
)
from app.services import deletion_groups, idempotency
from app.services import subjects as subjects_service
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
from app.services.transactions import read_only, unit_of_work
from app.services.views import request_public
from app.settings import Settings
from app.vocab import (
    OPEN_REQUEST_STATUSES,
    JobKind,
    JobStatus,
    ModelStatus,
    RequestStatus,
    Split,
    VerifyMode,
)
from engine import catalog

#: A request can be cancelled only while it waits; once its job runs, it runs to its end.
CANCELLABLE = frozenset({RequestStatus.ACCEPTED, RequestStatus.QUEUED})


@dataclass(frozen=True)
class Submitted:
    """The outcome of a submission: the response and the job(s) to send to the broker."""

    status_code: int
    body: dict[str, Any]
    enqueue_job_id: str | None
    replayed: bool = False
    group_job_ids: tuple[str, ...] = ()  # a request naming several models: one job each

    @property
    def job_ids(self) -> list[str]:
        """Every new job to send to the broker."""
        return [self.enqueue_job_id] if self.enqueue_job_id else list(self.group_job_ids)


def _get_model(session: Session, name: str) -> ModelRow:
    """The model a request names; one whose import failed has no version and takes none."""
    model = session.scalar(select(ModelRow).where(ModelRow.name == name))
    if model is None:
        raise ModelNotFound(f"no model named {name!r}", model=name)
    if model.status == ModelStatus.FAILED:
        error = model.error or {}
        raise ModelImportFailed(
            f"model {name!r} has no version: its checkpoint import failed "
            f"({error.get('code')}: {error.get('message')}); register the corrected checkpoint "
            "under the same name",
            model=name, import_error=error,
        )
    return model


@dataclass(frozen=True)
class _Intake:
    """A deletion request as submitted (the method defaulted)."""

    model: str
    sample_ids: list[str]
    subject_ids: list[str]
    subject_ref: str | None
    reason: str | None
    method: str
    method_options: dict[str, Any]
    verify: str
    callback_url: str | None
    opendsr_request_id: str | None = None
    models: list[str] | None = None  # several models (or ["*"]): a group
    group_id: str | None = None

    def body(self) -> dict[str, Any]:
        """The request body an Idempotency-Key is bound to."""
        body: dict[str, Any] = {
            "model": self.model,
            "sample_ids": self.sample_ids,
            "subject_ref": self.subject_ref,
            "reason": self.reason,
            "method": self.method,
            "method_options": self.method_options,
            "verify": self.verify,
            "callback_url": self.callback_url,
        }
        if self.subject_ids:  # bodies without subjects keep the hash they always had
            body["subject_ids"] = self.subject_ids
        if self.models is not None:
            body["models"] = self.models
        return body

    @property
    def fans_out(self) -> bool:
        """True when the request names several models (`models`, or `model: "*"`)."""
        return self.models is not None


@dataclass(frozen=True)
class _Resolved:
    """The IDs a request forgets: those it named, plus its subjects' training samples."""

    sample_ids: list[str]
    subjects: subjects_service.Resolution | None
    summary: dict[str, Any] | None


def submit_deletion_request(
    session: Session,
    *,
    principal: Principal,
    settings: Settings,
    model: str | None = None,
    models: list[str] | None = None,
    sample_ids: list[str] | None = None,
    subject_ids: list[str] | None = None,
    subject_ref: str | None = None,
    reason: str | None = None,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    verify: str = VerifyMode.STANDARD,
    callback_url: str | None = None,
    idempotency_key: str | None = None,
    opendsr_request_id: str | None = None,
) -> Submitted:
    """Validate and accept a deletion request (see the module docstring for the rules)."""
    method = method or catalog.DEFAULT_METHOD
    options = catalog.normalise_method_options(method, method_options or {})
    selector = _model_selector(model, models)
    intake = _Intake(model or "", list(sample_ids or []), list(subject_ids or []), subject_ref, reason,
                     method, options, verify, callback_url, opendsr_request_id, selector)
    # The key's claim is in this unit of work: a request that fails leaves it free for a retry.
    with unit_of_work(session):
        claim: IdempotencyKey | None = None
        if idempotency_key is not None:
            claim, replay = idempotency.begin(
                session,
                principal.id,
                idempotency_key,
                idempotency.body_hash(intake.body()),
                ttl_s=settings.idempotency_ttl_s,
            )
            if replay is not None:
                return Submitted(replay.status_code, replay.body, None, replayed=True)
        if intake.fans_out:
            resource, group_jobs = _accept_group(session, intake, principal, settings)
            enqueue, more = None, tuple(group_jobs)
        else:
            resource, enqueue = accept_in_transaction(session, intake, principal, settings)
            more = ()
        if claim is not None:
            idempotency.finish(claim, 202, resource, str(resource["id"]))
    return Submitted(202, resource, enqueue, group_job_ids=more)


def _model_selector(model: str | None, models: list[str] | None) -> list[str] | None:
    """None for one model; the model names (or `["*"]`) for a request naming several."""
    if (model is None) == (models is None):
        raise InvalidInput("name exactly one of model (a name, or '*') and models", field="model")
    if models is not None:
        return list(models)
    return [deletion_groups.ALL_MODELS] if model == deletion_groups.ALL_MODELS else None


def _accept_group(
    session: Session, intake: _Intake, principal: Principal, settings: Settings
) -> tuple[dict[str, Any], list[str]]:
    """One deletion request per model the request reaches, in the caller's transaction, and
    the group that reports them; the group resource and the new jobs to enqueue."""
    assert intake.models is not None
    _validate(intake, settings)
    if len(intake.models) > deletion_groups.MAX_MODELS:
        raise InvalidInput(f"at most {deletion_groups.MAX_MODELS} models per request", field="models")
    targets = deletion_groups.target_models(session, intake.models, intake.sample_ids, intake.subject_ids)
    group = DeletionRequestGroup(id=new_id("drg"), api_key_id=principal.id, models=intake.models,
                                 subject_ref=intake.subject_ref, received_at=utcnow())
    session.add(group)
    session.flush()
    jobs: list[str] = []
    for m in targets:
        one = dataclasses.replace(intake, model=m.name, models=None, group_id=group.id)
        _, job_id = accept_in_transaction(session, one, principal, settings)
        if job_id is not None:
            jobs.append(job_id)
    resource = deletion_groups.group_public(session, group)
    append_event(
        session,
        actor=principal.name,
        action="request.group.accepted",
        subject=f"group:{group.id}",
        data={"models": [m.name for m in targets], "request_ids": [r["id"] for r in resource["requests"]],
              "asked": intake.models, "subject_ref": intake.subject_ref},
    )
    return resource, jobs


def accept_in_transaction(
    session: Session, intake: _Intake, principal: Principal, settings: Settings
) -> tuple[dict[str, Any], str | None]:
    """Validate, store and queue one request in the caller's transaction: its resource and the
    id of a new job to send to the broker (None when it joined a queued job or needs none)."""
    _validate(intake, settings)
    # Validation and the bulk insert run before the model lock: the lock (and, on
    # PostgreSQL, the audit chain's) is held only for the job join and the final events.
    m = _get_model(session, intake.model)
    resolved = _resolve(session, m, intake, settings)
    forgotten = _check_sample_ids(session, m, resolved.sample_ids)
    req = _store_request(session, m, intake, resolved, forgotten, principal)
    accepted = _accepted_event(req, m, intake, resolved, forgotten, principal)
    enqueue: str | None = None
    if req.status == RequestStatus.SUCCEEDED:
        _succeed_at_once(session, req, m, accepted, principal)
    else:
        enqueue = _queue(session, req, m, intake, accepted, principal)
    return request_public(req, m.name), enqueue


def accept_subjects_in_transaction(
    session: Session,
    *,
    principal: Principal,
    settings: Settings,
    model: str,
    subject_ids: list[str],
    subject_ref: str,
    reason: str,
    opendsr_request_id: str,
) -> tuple[dict[str, Any], str | None]:
    """A request naming only `subject_ids` with the default method, accepted in the caller's
    transaction (the OpenDSR door): its resource and the new job to enqueue, if any."""
    method = catalog.DEFAULT_METHOD
    intake = _Intake(model, [], subject_ids, subject_ref, reason, method,
                     catalog.normalise_method_options(method, {}), VerifyMode.STANDARD, None,
                     opendsr_request_id)
    return accept_in_transaction(session, intake, principal, settings)


def accept_in_lineage(
    session: Session,
    *,
    principal: Principal,
    settings: Settings,
    model: str,
    sample_ids: list[str],
    reason: str,
) -> tuple[dict[str, Any], str | None]:
    """A request for `sample_ids` with the default method, accepted in the caller's
    transaction (a lineage's successor forgetting what its predecessor forgot,
    `app.services.lineage`): its resource and the new job to enqueue, if any."""
    method = catalog.DEFAULT_METHOD
    intake = _Intake(model, sample_ids, [], None, reason, method,
                     catalog.normalise_method_options(method, {}), VerifyMode.STANDARD, None)
    return accept_in_transaction(session, intake, principal, settings)


def _validate(intake: _Intake, settings: Settings) -> None:
    """Refuse what no database state can make valid: no, too many or repeated IDs, an unknown
    method or verification, a callback URL that is not allowed."""
    sample_ids = intake.sample_ids
    if not sample_ids and not intake.subject_ids:
        raise InvalidInput(
            "name at least one sample (sample_ids) or data subject (subject_ids)", field="sample_ids"
        )
    _check_count(len(sample_ids), settings)
    if len(set(sample_ids)) != len(sample_ids):
        seen: set[str] = set()
        dups = sorted({s for s in sample_ids if s in seen or seen.add(s)})  # type: ignore[func-returns-value]
        raise DuplicateSampleIds(dups)
    subjects_service.check_subject_ids(intake.subject_ids)
    _check_method(intake.method, intake.method_options)
    if intake.verify not in tuple(VerifyMode):
        raise InvalidInput("verify must be 'standard' or 'retrain'", field="verify")
    if intake.callback_url is not None:
        check_callback_url(intake.callback_url, settings)


def _check_count(count: int, settings: Settings) -> None:
    if count > settings.max_ids_per_request:
        raise PayloadTooLarge(
            f"at most {settings.max_ids_per_request} sample IDs per request",
            limit=settings.max_ids_per_request,
            count=count,
        )


def _resolve(session: Session, m: ModelRow, intake: _Intake, settings: Settings) -> _Resolved:
    """The named sample IDs plus the training samples of the named subjects (each once)."""
    if not intake.subject_ids:
        return _Resolved(intake.sample_ids, None, None)
    dataset = session.get(DatasetRow, m.dataset_id)
    assert dataset is not None
    resolution = subjects_service.resolve(session, dataset, intake.subject_ids)
    named = set(intake.sample_ids)
    extra = [s for s in resolution.sample_ids if s not in named]
    _check_count(len(intake.sample_ids) + len(extra), settings)
    return _Resolved(intake.sample_ids + extra, resolution, resolution.summary(intake.sample_ids))


def _store_request(
    session: Session,
    m: ModelRow,
    intake: _Intake,
    resolved: _Resolved,
    forgotten: set[str],
    principal: Principal,
) -> DeletionRequest:
    """Insert the request, its IDs and its subjects (hashed); it is `succeeded` at once when
    every ID was already forgotten (or its subjects have no training sample), else `accepted`.
    The returned row stays transient: the response is built from it, and its later changes are
    written with plain UPDATEs."""
    now = utcnow()
    all_forgotten = len(forgotten) == len(resolved.sample_ids)
    req = DeletionRequest(
        id=new_id("dr"),
        model_id=m.id,
        status=RequestStatus.SUCCEEDED if all_forgotten else RequestStatus.ACCEPTED,
        sample_count=len(resolved.sample_ids),
        already_forgotten_count=len(forgotten),
        subject_ref=intake.subject_ref,
        reason=intake.reason,
        method=intake.method,
        verify=intake.verify,
        callback_url=intake.callback_url,
        api_key_id=principal.id,
        job_id=None,
        result_version=m.latest_version if all_forgotten else None,
        verdict=None,
        metrics=None,
        error=None,
        received_at=now,
        started_at=now if all_forgotten else None,
        finished_at=now if all_forgotten else None,
        subjects=resolved.summary,
        opendsr_request_id=intake.opendsr_request_id,
        group_id=intake.group_id,
    )
    session.execute(insert(table_of(DeletionRequest)), _columns(req))
    rid = req.id
    bulk_insert(
        session,
        table_of(RequestSample),
        ("request_id", "sample_id", "already_forgotten"),
        ((rid, s, s in forgotten) for s in resolved.sample_ids),
    )
    if resolved.subjects is not None:
        subjects_service.record_request_subjects(session, rid, resolved.subjects.hashes)
    return req


def _accepted_event(
    req: DeletionRequest,
    m: ModelRow,
    intake: _Intake,
    resolved: _Resolved,
    forgotten: set[str],
    principal: Principal,
) -> Event:
    """The `request.accepted` audit event (the IDs only as digests, subjects only as counts)."""
    data: dict[str, Any] = {
        "sample_count": len(resolved.sample_ids),
        "already_forgotten_count": len(forgotten),
        "sample_ids_sha256": subjects_service.digest(resolved.sample_ids),
        "subject_ref": intake.subject_ref,
        "reason": intake.reason,
        "method": intake.method,
        "verify": intake.verify,
    }
    if resolved.summary is not None:
        data["subjects"] = resolved.summary
    if intake.opendsr_request_id is not None:
        data["opendsr_request_id"] = intake.opendsr_request_id
    return Event(principal.name, "request.accepted", f"request:{req.id}", data, m.name, req.id)


def _succeed_at_once(
    session: Session, req: DeletionRequest, m: ModelRow, accepted: Event, principal: Principal
) -> None:
    """Every ID was already forgotten, or the named subjects have no training sample: the
    request succeeds on the current version, no job; its subjects are tombstoned."""
    reason = ("the named subjects have no training samples" if req.sample_count == 0
              else "every ID was already forgotten")
    note = {"result_version": m.latest_version, "note": reason}
    subjects_service.tombstone_subjects(session, m.id, [req.id])
    append_events(session, [
        accepted,
        Event(principal.name, "request.succeeded", f"request:{req.id}", note, m.name, req.id),
    ])
    enqueue_callback(session, req, m.name)


def _queue(
    session: Session, req: DeletionRequest, m: ModelRow, intake: _Intake, accepted: Event,
    principal: Principal,
) -> str | None:
    """Join the request to the model's matching queued job, or a new one; returns the new
    job's id to send to the broker (None when the request joined a queued job)."""
    job_id, new_job = _join_or_create_job(session, m, intake.method, intake.verify,
                                          intake.method_options, principal)
    req.status, req.job_id = RequestStatus.QUEUED, job_id
    requests = table_of(DeletionRequest)
    session.execute(
        update(requests).where(requests.c.id == req.id).values(status=RequestStatus.QUEUED, job_id=job_id)
    )
    session.execute(insert(table_of(JobRequest)), {"job_id": job_id, "request_id": req.id})
    # The audit chain's lock is taken last, so it is held only for this insert and commit.
    events = [accepted]
    if new_job is not None:
        events.append(job_queued_event(new_job, m.name, actor=principal.name))
    queued = {"job_id": job_id, "coalesced": new_job is None}
    events.append(Event(principal.name, "request.queued", f"request:{req.id}", queued, m.name, req.id))
    append_events(session, events)
    return new_job.id if new_job is not None else None


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
        unknown = [s for s in sample_ids if s not in split_of]
        if unknown:
            raise UnknownSampleIds(unknown)
        raise TestSplitSamples([s for s, sp in split_of.items() if sp != Split.TRAIN])
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
        .where(Job.status == JobStatus.QUEUED)
        .where(Job.kind.in_((JobKind.UNLEARN, JobKind.RETRAIN)))
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
        kind=JobKind.RETRAIN if method == "retrain" else JobKind.UNLEARN,
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
        raise RequestNotFound(f"no deletion request {request_id!r}")
    return row[0], row[1]


def get_deletion_request(session: Session, request_id: str) -> dict[str, Any]:
    """One request's resource."""
    with read_only(session):
        req, name = _load(session, request_id)
        return request_public(req, name)


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
    with read_only(session):
        rows = session.execute(stmt.order_by(DeletionRequest.id.desc()).limit(limit + 1)).all()
        more = len(rows) > limit
        items = [request_public(r, n) for r, n in rows[:limit]]
    return Page(items, encode_cursor(items[-1]["id"]) if more else None)


def cancel_deletion_request(session: Session, request_id: str, *, actor: str) -> dict[str, Any]:
    """Cancel a request while `accepted` or `queued`; its job is cancelled if left empty."""
    with unit_of_work(session):
        cancel_in_transaction_request(session, request_id, actor=actor)
    return get_deletion_request(session, request_id)


def cancel_in_transaction_request(session: Session, request_id: str, *, actor: str) -> None:
    """`cancel_deletion_request` in the caller's transaction (409 `not_cancellable` when the
    request no longer waits)."""
    req, name = _load(session, request_id)
    job: Job | None = None
    if req.job_id:
        job = session.scalar(select(Job).where(Job.id == req.job_id).with_for_update(key_share=True))
    req, name = _load(session, request_id, lock=True)
    if req.status not in CANCELLABLE:
        raise NotCancellable(
            f"request {request_id} is {req.status}; only accepted or queued requests can be "
            "cancelled",
            status_now=req.status,
        )
    req.status, req.finished_at = RequestStatus.CANCELLED, utcnow()
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
    if job is not None and job.status == JobStatus.QUEUED:
        _cancel_if_empty(session, job, req.model_id, actor=actor)


def _cancel_if_empty(session: Session, job: Job, model_id: int, *, actor: str) -> None:
    """Cancel the queued `job` when none of its requests is open any more."""
    remaining = session.scalars(
        select(DeletionRequest.id)
        .where(DeletionRequest.job_id == job.id)
        .where(DeletionRequest.status.in_(OPEN_REQUEST_STATUSES))
        .limit(1)
    ).first()
    if remaining is None:
        model = session.scalar(select(ModelRow).where(ModelRow.id == model_id))
        assert model is not None
        cancel_in_transaction(session, job, model, actor=actor)
