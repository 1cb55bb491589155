"""Lineages across dataset versions: what a model forgot stays forgotten in its successor.

A team retrains its model on a later snapshot of its data and registers the result with
`succeeds: <previous model>`. The snapshot is registered as a dataset with `version_of: <the
previous dataset>`: it shares that dataset's subject key, so a data subject hashes alike in
both, and sample IDs keep their meaning. At registration, in the registration's transaction:

- every data subject the predecessor's lineage forgot, or was asked to forget by a request
  still open, is tombstoned for the successor: none of its samples is used for recovery;
- the samples to forget are the successor dataset's training samples among those the
  predecessor forgot or was asked to forget, plus every training sample of those subjects
  (a subject's samples that are new in the snapshot included);
- if there are any, a deletion request for them is queued on the successor (in the name of
  the key that registers it, its reason naming the predecessor), behind its version 1. Once
  it succeeds they are tombstoned like any other, so a later request naming them finds them
  already forgotten.

The successor's dataset must be its predecessor's dataset or a version of it (`version_of`,
followed back any number of times); anything else is refused (422, field `succeeds`), since
neither sample IDs nor subject hashes would mean the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, insert, select
from sqlalchemy.orm import Session

from app.db.models import (
    DatasetRow,
    DeletionRequest,
    ModelRow,
    RequestSample,
    RequestSubject,
    Sample,
    SubjectSample,
    SubjectTombstone,
    Tombstone,
)
from app.db.types import utcnow
from app.errors import InvalidInput
from app.services import deletions
from app.services.apikeys import Principal
from app.services.audit import append_event
from app.services.common import table_of
from app.settings import Settings
from app.vocab import OPEN_REQUEST_STATUSES, Split


def check_predecessor(session: Session, name: str, succeeds: str, dataset: DatasetRow) -> ModelRow:
    """The model the registration of `name` continues; 422 (field `succeeds`) when it is
    `name` itself or there is none of that name, or when `dataset` is neither its dataset nor
    a version of it."""
    if succeeds == name:
        raise InvalidInput(f"model {name!r} cannot succeed itself", field="succeeds")
    pred = session.scalar(select(ModelRow).where(ModelRow.name == succeeds))
    if pred is None:
        raise InvalidInput(f"succeeds names no model: {succeeds!r}", field="succeeds")
    pred_dataset = session.get(DatasetRow, pred.dataset_id)
    assert pred_dataset is not None
    chain = _versions_back(session, dataset)
    if pred_dataset.name not in chain:
        raise InvalidInput(
            f"model {succeeds!r} was trained on dataset {pred_dataset.name!r}, and "
            f"{dataset.name!r} is not a version of it (register the new snapshot with "
            f"version_of: {pred_dataset.name!r})",
            field="succeeds",
        )
    return pred


def _versions_back(session: Session, dataset: DatasetRow) -> list[str]:
    """`dataset`'s name and those of the datasets it is a later version of, newest first."""
    names = [dataset.name]
    current: str | None = dataset.version_of
    while current is not None and current not in names:
        names.append(current)
        current = session.scalar(select(DatasetRow.version_of).where(DatasetRow.name == current))
    return names


@dataclass(frozen=True)
class Inherited:
    """What a successor took over at registration."""

    request_ids: list[str]
    job_ids: list[str]
    sample_count: int
    subject_count: int


def inherit(
    session: Session, model: ModelRow, pred: ModelRow, *, principal: Principal, settings: Settings
) -> Inherited:
    """Make `model` continue `pred`'s lineage (see the module docstring), in the caller's
    transaction; returns the requests queued and the jobs to send to the broker after commit."""
    model.succeeds = pred.name
    open_requests = select(DeletionRequest.id).where(
        DeletionRequest.model_id == pred.id, DeletionRequest.status.in_(OPEN_REQUEST_STATUSES)
    )
    subjects = _subjects(session, pred, open_requests)
    _tombstone(session, model, subjects)
    named = set(session.scalars(select(Tombstone.sample_id).where(Tombstone.model_id == pred.id)))
    named.update(session.scalars(
        select(RequestSample.sample_id).where(RequestSample.request_id.in_(open_requests))))
    training = _training_samples(session, model.dataset_id, named, list(subjects))
    request_ids: list[str] = []
    job_ids: list[str] = []
    step = settings.max_ids_per_request
    for start in range(0, len(training), step):
        body, job_id = deletions.accept_in_lineage(
            session, principal=principal, settings=settings, model=model.name,
            sample_ids=training[start:start + step],
            reason=f"carried over from model {pred.name!r}, whose lineage this model continues",
        )
        request_ids.append(str(body["id"]))
        job_ids.extend([job_id] if job_id else [])
    inherited = Inherited(request_ids, job_ids, len(training), len(subjects))
    append_event(
        session,
        actor=principal.name,
        action="model.lineage.continued",
        subject=f"model:{model.name}",
        model=model.name,
        data={"succeeds": pred.name, "sample_count": inherited.sample_count,
              "subject_count": inherited.subject_count, "request_ids": request_ids},
    )
    return inherited


def _subjects(session: Session, pred: ModelRow, open_requests: Select[Any]) -> dict[str, str]:
    """Subject hash -> the request that forgot it or asked for it, for `pred`'s lineage."""
    found: dict[str, str] = {}
    for subject_hash, request_id in session.execute(
        select(SubjectTombstone.subject_hash, SubjectTombstone.request_id)
        .where(SubjectTombstone.model_id == pred.id)
    ):
        found.setdefault(str(subject_hash), str(request_id))
    for subject_hash, request_id in session.execute(
        select(RequestSubject.subject_hash, RequestSubject.request_id)
        .where(RequestSubject.request_id.in_(open_requests))
        .order_by(RequestSubject.request_id)
    ):
        found.setdefault(str(subject_hash), str(request_id))
    return found


def _tombstone(session: Session, model: ModelRow, subjects: dict[str, str]) -> None:
    if not subjects:
        return
    now = utcnow()
    session.execute(
        insert(table_of(SubjectTombstone)),
        [{"model_id": model.id, "subject_hash": h, "request_id": r, "created_at": now}
         for h, r in sorted(subjects.items())],
    )


def _training_samples(
    session: Session, dataset_id: int, sample_ids: set[str], subject_hashes: list[str]
) -> list[str]:
    """The training samples of `dataset_id` among `sample_ids` or owned by the subjects."""
    found: set[str] = set()
    ids = sorted(sample_ids)
    for start in range(0, len(ids), 10_000):  # bound the IN list
        found.update(session.scalars(
            select(Sample.sample_id).where(
                Sample.dataset_id == dataset_id, Sample.split == Split.TRAIN,
                Sample.sample_id.in_(ids[start:start + 10_000]))))
    for start in range(0, len(subject_hashes), 10_000):
        found.update(session.scalars(
            select(SubjectSample.sample_id)
            .join(Sample, (Sample.dataset_id == SubjectSample.dataset_id)
                  & (Sample.sample_id == SubjectSample.sample_id))
            .where(SubjectSample.dataset_id == dataset_id, Sample.split == Split.TRAIN,
                   SubjectSample.subject_hash.in_(subject_hashes[start:start + 10_000]))))
    return sorted(found)
