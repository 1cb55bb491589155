"""`/v1/deletion-requests`: submit, read, list, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse

from app.api.deps import PagingDep, SessionDep, SettingsDep, require
from app.api.schemas import (
    PROBLEM_RESPONSES,
    DeletionRequestCreate,
    DeletionRequestGroupPublic,
    DeletionRequestList,
    DeletionRequestPublic,
    link,
)
from app.services import deletion_groups, deletions
from app.services.apikeys import Principal
from app.vocab import RequestStatus, Scope

router = APIRouter(prefix="/v1/deletion-requests", tags=["deletion requests"])
group_router = APIRouter(prefix="/v1/deletion-request-groups", tags=["deletion requests"])


_REQUEST_LINKS = {
    "read": link("GET", "/v1/deletion-requests/{request_id}", "The request", request_id="$response.body#/id"),
    "cancel": link(
        "POST", "/v1/deletion-requests/{request_id}/cancel", "Cancel it", request_id="$response.body#/id"
    ),
    "job": link("GET", "/v1/jobs/{job_id}", "The job it joined", job_id="$response.body#/job_id"),
}


@router.post(
    "",
    status_code=202,
    response_model=DeletionRequestPublic | DeletionRequestGroupPublic,
    responses={
        **PROBLEM_RESPONSES,
        202: {"description": "Accepted: the request, or the group of a request naming several "
                             "models", "links": _REQUEST_LINKS},
    },
    summary="Ask a model (or several) to forget samples or data subjects",
)
def create_deletion_request(
    body: DeletionRequestCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: Annotated[Principal, Depends(require(Scope.DELETIONS_WRITE))],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="Same key and body within 24 h replay the first answer",
        ),
    ] = None,
) -> Any:
    """Accept a deletion request (202); it joins the model's queued job or starts one. Naming
    several models (`models`, or `model: "*"`) accepts one request per model, as a group."""
    result = deletions.submit_deletion_request(
        session,
        principal=principal,
        settings=settings,
        idempotency_key=idempotency_key,
        **body.model_dump(),
    )
    request.app.state.dispatcher.enqueue_many(result.job_ids)
    where = "deletion-request-groups" if "requests" in result.body else "deletion-requests"
    headers = {"Location": f"/v1/{where}/{result.body.get('id')}"}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(result.body, status_code=result.status_code, headers=headers)


@router.get(
    "",
    response_model=DeletionRequestList,
    responses={
        **PROBLEM_RESPONSES,
        200: {
            "description": "A page of requests",
            "links": {
                "first": link(
                    "GET",
                    "/v1/deletion-requests/{request_id}",
                    "The first request of the page",
                    request_id="$response.body#/items/0/id",
                ),
                "cancel_first": link(
                    "POST",
                    "/v1/deletion-requests/{request_id}/cancel",
                    "Cancel the first request of the page",
                    request_id="$response.body#/items/0/id",
                ),
            },
        },
    },
)
def list_deletion_requests(
    session: SessionDep,
    paging: PagingDep,
    _: Annotated[Principal, Depends(require(Scope.DELETIONS_READ))],
    model: Annotated[str | None, Query(max_length=100)] = None,
    status: RequestStatus | None = None,
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
    _: Annotated[Principal, Depends(require(Scope.DELETIONS_READ))],
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
    principal: Annotated[Principal, Depends(require(Scope.DELETIONS_WRITE))],
) -> Any:
    """Cancel a request that is still `accepted` or `queued` (else 409 `not_cancellable`)."""
    return deletions.cancel_deletion_request(session, request_id, actor=principal.name)


@group_router.get("/{group_id}", response_model=DeletionRequestGroupPublic, responses=PROBLEM_RESPONSES)
def get_deletion_request_group(
    group_id: str,
    session: SessionDep,
    _: Annotated[Principal, Depends(require(Scope.DELETIONS_READ))],
) -> Any:
    """A request that named several models: each model's deletion request and their status."""
    return deletion_groups.get_group(session, group_id)
