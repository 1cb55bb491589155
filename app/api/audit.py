"""`/v1/audit`: list, verify, export."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from app.api.deps import IntPagingDep, SessionDep, require
from app.api.schemas import PROBLEM_RESPONSES, AuditList, ChainVerification, Timestamp
from app.services import audit
from app.services.apikeys import Principal
from app.vocab import Scope

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=AuditList, responses=PROBLEM_RESPONSES)
def list_events(
    session: SessionDep,
    paging: IntPagingDep,
    _: Annotated[Principal, Depends(require(Scope.AUDIT_READ))],
    model: Annotated[str | None, Query(max_length=100)] = None,
    request_id: Annotated[str | None, Query(max_length=40)] = None,
    action: Annotated[str | None, Query(max_length=60)] = None,
    since: Annotated[Timestamp | None, Query(description="Events at or after this time")] = None,
) -> Any:
    """Events in chain order."""
    page = audit.list_events(
        session,
        model=model,
        request_id=request_id,
        action=action,
        since=since,
        limit=paging.limit,
        cursor=paging.cursor,
    )
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get("/verify", response_model=ChainVerification, responses=PROBLEM_RESPONSES)
def verify(session: SessionDep, _: Annotated[Principal, Depends(require(Scope.AUDIT_READ))]) -> Any:
    """Re-verify every hash and link of the chain."""
    return audit.verify_chain(session).as_dict()


@router.get(
    "/export",
    responses={**PROBLEM_RESPONSES, 200: {"content": {"application/x-ndjson": {}}}},
    response_class=StreamingResponse,
)
def export(
    request: Request,
    _: Annotated[Principal, Depends(require(Scope.AUDIT_READ))],
    model: Annotated[str | None, Query(max_length=100)] = None,
    request_id: Annotated[str | None, Query(max_length=40)] = None,
    action: Annotated[str | None, Query(max_length=60)] = None,
    since: Annotated[Timestamp | None, Query(description="Events at or after this time")] = None,
) -> StreamingResponse:
    """The chain as JSON Lines, streamed."""
    sessions = request.app.state.sessions

    def lines() -> Any:
        with sessions() as session:
            yield from audit.export_events(
                session, model=model, request_id=request_id, action=action, since=since
            )

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="lethe-audit.jsonl"'},
    )
