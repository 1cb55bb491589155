"""`/v1/jobs`: read, list, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from app.api.deps import PagingDep, SessionDep, StoreDep, require
from app.api.schemas import PROBLEM_RESPONSES, JobList, JobPublic
from app.services import jobs
from app.services.apikeys import Principal
from app.vocab import JobStatus, Scope

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", response_model=JobList, responses=PROBLEM_RESPONSES)
def list_jobs(
    session: SessionDep,
    paging: PagingDep,
    _: Annotated[Principal, Depends(require(Scope.DELETIONS_READ))],
    model: Annotated[str | None, Query(max_length=100)] = None,
    status: JobStatus | None = None,
) -> Any:
    """Jobs, newest first."""
    page = jobs.list_jobs(
        session, model=model, status=status, limit=paging.limit, cursor=paging.cursor
    )
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get("/{job_id}", response_model=JobPublic, responses=PROBLEM_RESPONSES)
def get_job(
    job_id: str, session: SessionDep, _: Annotated[Principal, Depends(require(Scope.DELETIONS_READ))]
) -> Any:
    """One job with its progress."""
    return jobs.get_job(session, job_id)


@router.post(
    "/{job_id}/cancel", status_code=202, response_model=JobPublic, responses=PROBLEM_RESPONSES
)
def cancel_job(
    job_id: str,
    session: SessionDep,
    store: StoreDep,
    principal: Annotated[Principal, Depends(require(Scope.DELETIONS_WRITE))],
) -> Any:
    """Cancel a job: at once while queued, at the worker's next step while running."""
    return jobs.cancel_job(session, job_id, actor=principal.name, store=store)
