"""`/v1/deletion-requests`: submit, read, list, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse

from app.api.deps import PagingDep, SessionDep, SettingsDep, require
from app.api.schemas import (
    PROBLEM_RESPONSES,
    DeletionRequestCreate,
    DeletionRequestList,
    DeletionRequestPublic,
)
from app.services import deletions
from app.services.apikeys import Principal

router = APIRouter(prefix="/v1/deletion-requests", tags=["deletion requests"])


@router.post(
    "",
    status_code=202,
    response_model=DeletionRequestPublic,
    responses=PROBLEM_RESPONSES,
    summary="Ask a model to forget samples",
)
def create_deletion_request(
    body: DeletionRequestCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: Annotated[Principal, Depends(require("deletions:write"))],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> Any:
    """Accept a deletion request (202); it joins the model's queued job or starts one."""
    result = deletions.submit_deletion_request(
        session,
        principal=principal,
        settings=settings,
        idempotency_key=idempotency_key,
        **body.model_dump(),
    )
    if result.enqueue_job_id:
        request.app.state.dispatcher.enqueue(result.enqueue_job_id)
    headers = {"Location": f"/v1/deletion-requests/{result.body.get('id')}"}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(result.body, status_code=result.status_code, headers=headers)


@router.get("", response_model=DeletionRequestList, responses=PROBLEM_RESPONSES)
def list_deletion_requests(
    session: SessionDep,
    paging: PagingDep,
    _: Annotated[Principal, Depends(require("deletions:read"))],
    model: Annotated[str | None, Query(max_length=100)] = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
    subject_ref: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    """Requests, newest first."""
    page = deletions.list_deletion_requests(
        session,
        model=model,
        status=status,
        subject_ref=subject_ref,
        limit=paging.limit,
        cursor=paging.cursor,
    )
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get("/{request_id}", response_model=DeletionRequestPublic, responses=PROBLEM_RESPONSES)
def get_deletion_request(
    request_id: str,
    session: SessionDep,
    _: Annotated[Principal, Depends(require("deletions:read"))],
) -> Any:
    """One request."""
    return deletions.get_deletion_request(session, request_id)


@router.post(
    "/{request_id}/cancel",
    status_code=202,
    response_model=DeletionRequestPublic,
    responses=PROBLEM_RESPONSES,
)
def cancel_deletion_request(
    request_id: str,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require("deletions:write"))],
) -> Any:
    """Cancel a request that is still `accepted` or `queued` (else 409 `not_cancellable`)."""
    return deletions.cancel_deletion_request(session, request_id, actor=principal.name)
