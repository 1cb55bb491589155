"""Receipts: the signed JSON receipt of a request, its printable page, the public keys.

The receipt is served as the exact bytes stored when it was issued (canonical JSON), so two
reads give identical bytes. `GET /v1/receipts/keys` needs no API key: whoever holds a receipt
must be able to check it, and public keys are public.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict

from app.api.deps import SessionDep, SettingsDep, require
from app.api.schemas import PROBLEM_RESPONSES, problem_response
from app.receipts.page import CONTENT_SECURITY_POLICY
from app.services import receipts
from app.services.apikeys import Principal

router = APIRouter(tags=["receipts"])

_RECEIPT_ERRORS: dict[int | str, dict[str, Any]] = {
    **{code: PROBLEM_RESPONSES[code] for code in (401, 403, 404, 422)},
    409: problem_response(
        "`receipt_not_ready`: the request has not reached a final status; "
        "`receipt_unavailable`: it was cancelled, or named only already-forgotten IDs, so no job ran"
    ),
    503: problem_response("`unavailable`: no receipt signing key is configured"),
}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ReceiptSignature(BaseModel):
    """Ed25519 over the canonical JSON of the receipt without this member."""

    kid: str
    alg: Literal["Ed25519"]
    value: str


class ForgottenIds(BaseModel):
    """The request's sample IDs as a salted hash: `sha256(salt + "\\n" + "\\n".join(sorted(ids)))`."""

    count: int
    salt: str
    sha256: str
    algorithm: str


class ReceiptPublic(_Open):
    """A signed deletion receipt (`docs/receipts.md` describes every member)."""

    format: Literal["lethe.receipt/1"]
    issued_at: str
    summary: str
    issuer: dict[str, Any]
    request: dict[str, Any]
    model: dict[str, Any]
    forgotten_ids: ForgottenIds
    versions: dict[str, Any]
    job: dict[str, Any]
    metrics: dict[str, Any]
    retrain_reference: dict[str, Any] | None
    forgetting_test: dict[str, Any]
    verdict: dict[str, Any]
    audit: dict[str, Any] | None
    signature: ReceiptSignature


class ReceiptKeyPublic(BaseModel):
    """A public key receipts are (or were) signed with."""

    kid: str
    alg: Literal["Ed25519"]
    x: str
    created_at: str
    active: bool
    retired_at: str | None


class ReceiptKeyList(BaseModel):
    """Every public key, oldest first; exactly one is active while a signing key is configured."""

    keys: list[ReceiptKeyPublic]


@router.get(
    "/v1/deletion-requests/{request_id}/receipt",
    response_model=ReceiptPublic,
    responses=_RECEIPT_ERRORS,
    summary="The signed receipt of a finished deletion request",
)
def get_receipt(
    request_id: str,
    session: SessionDep,
    settings: SettingsDep,
    _: Annotated[Principal, Depends(require("deletions:read"))],
) -> Any:
    """The receipt, issued on first read and identical on every read after."""
    stored = receipts.get_receipt(session, settings, request_id)
    return Response(stored.body, media_type="application/json")


@router.get(
    "/v1/deletion-requests/{request_id}/receipt.html",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}, **_RECEIPT_ERRORS},
    summary="The receipt as a printable page with its plots",
)
def get_receipt_page(
    request_id: str,
    session: SessionDep,
    settings: SettingsDep,
    _: Annotated[Principal, Depends(require("deletions:read"))],
) -> HTMLResponse:
    """One self-contained page: summary, verdict, server-drawn SVG plots, the receipt's tables."""
    html = receipts.receipt_page(session, settings, request_id)
    return HTMLResponse(
        html,
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"},
    )


@router.get(
    "/v1/receipts/keys",
    response_model=ReceiptKeyList,
    summary="The public keys receipts are signed with (no API key needed)",
)
def list_receipt_keys(session: SessionDep, settings: SettingsDep) -> Any:
    """Every key that ever signed a receipt; rotation adds one and keeps the others."""
    return receipts.list_public_keys(session, settings)
