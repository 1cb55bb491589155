"""Deletion request groups: one submission that names several models.

`POST /v1/deletion-requests` with `models: [...]`, or `model: "*"`, reaches several models:
the listed ones, or every model whose dataset holds a training sample the request names
(directly or through a data subject). Intake (`app.services.deletions`) accepts one deletion
request per model in one transaction, each with its own job, coalescing and receipt; the group
reports all of them in one resource, with a status summed up from theirs:

- `succeeded` when no model was reached, or every request is final and none failed, at least
  one succeeded (the rest cancelled);
- `failed` when every request is final and one failed; `cancelled` when all were cancelled;
- else the least advanced open status among them: `accepted`, `queued`, then `running`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import DatasetRow, DeletionRequest, DeletionRequestGroup, ModelRow
from app.db.types import rfc3339
from app.errors import GroupNotFound, InvalidInput, ModelNotFound
from app.services import subjects
from app.services.common import counts_matching
from app.services.transactions import read_only
from app.services.views import request_public
from app.vocab import FINAL_REQUEST_STATUSES, RequestStatus

#: `model: "*"`: every model whose dataset holds what the request names.
ALL_MODELS = "*"
MAX_MODELS = 100


def summed_status(statuses: Sequence[str]) -> RequestStatus:
    """The group's status from its requests' (see the module docstring)."""
    if statuses and all(s == RequestStatus.CANCELLED for s in statuses):
        return RequestStatus.CANCELLED
    if all(s in FINAL_REQUEST_STATUSES for s in statuses):
        return RequestStatus.FAILED if RequestStatus.FAILED in statuses else RequestStatus.SUCCEEDED
    for status in (RequestStatus.ACCEPTED, RequestStatus.QUEUED, RequestStatus.RUNNING):
        if status in statuses:
            return status
    return RequestStatus.RUNNING


def target_models(
    session: Session, selector: Sequence[str], sample_ids: Sequence[str], subject_ids: Sequence[str]
) -> list[ModelRow]:
    """The models a request reaches, by name: those listed (404 naming the unknown ones), or,
    for `["*"]`, every model whose dataset holds a named training sample or a training sample
    of a named subject."""
    if list(selector) != [ALL_MODELS]:
        if ALL_MODELS in selector or len(set(selector)) != len(selector):
            raise InvalidInput("models must be distinct model names (or model '*' alone)", field="models")
        found = session.scalars(select(ModelRow).where(ModelRow.name.in_(list(selector))))
        rows = {m.name: m for m in found}
        unknown = sorted(set(selector) - set(rows))
        if unknown:
            raise ModelNotFound(f"no models named {unknown}", models=unknown)
        return [rows[name] for name in sorted(rows)]
    datasets = session.scalars(select(DatasetRow).order_by(DatasetRow.id))
    holding = [d.id for d in datasets if _holds(session, d, sample_ids, subject_ids)]
    if not holding:
        return []
    stmt = select(ModelRow).where(ModelRow.dataset_id.in_(holding)).order_by(ModelRow.name)
    return list(session.scalars(stmt))


def _holds(
    session: Session, dataset: DatasetRow, sample_ids: Sequence[str], subject_ids: Sequence[str]
) -> bool:
    """True when `dataset` has a training sample named, or of a named subject."""
    by_subject = subject_ids and dataset.subject_key is not None
    if by_subject and subjects.resolve(session, dataset, subject_ids).sample_ids:
        return True
    if not sample_ids:
        return False
    (found,) = counts_matching(
        session, "samples", "sample_id", sample_ids,
        where="t.dataset_id = :ds AND t.split = 'train'", params={"ds": dataset.id},
    )
    return found > 0


def group_public(session: Session, group: DeletionRequestGroup) -> dict[str, Any]:
    """The group resource: its requests (each as `GET /v1/deletion-requests/{id}` shows it)
    and their summed status."""
    rows = session.execute(
        select(DeletionRequest, ModelRow.name)
        .join(ModelRow, ModelRow.id == DeletionRequest.model_id)
        .where(DeletionRequest.group_id == group.id)
        .order_by(ModelRow.name)
    ).all()
    return {
        "id": group.id,
        "models": group.models,
        "status": summed_status([r.status for r, _ in rows]),
        "subject_ref": group.subject_ref,
        "requests": [request_public(r, name) for r, name in rows],
        "received_at": rfc3339(group.received_at),
    }


def get_group(session: Session, group_id: str) -> dict[str, Any]:
    """One group's resource, or 404 `group_not_found`."""
    with read_only(session):
        group = session.get(DeletionRequestGroup, group_id)
        if group is None:
            raise GroupNotFound(f"no deletion request group {group_id!r}")
        return group_public(session, group)
