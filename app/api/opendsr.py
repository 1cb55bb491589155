"""`/opendsr/v2`: the OpenDSR processor interface (opengdpr/OpenDSR `specification.md`).

Discovery, status, erasure requests, their status and cancellation; scope `opendsr`. The
processor certificate is public at `/opendsr/v2/cert.pem` (discovery points to it). Every
answer of the request resource carries `X-OpenDSR-Processor-Domain` and
`X-OpenDSR-Signature` (base64 signature over the exact body bytes); `processor_signature` in
a body is the same signature over the canonical JSON (sorted keys, no whitespace, UTF-8) of
that body without its `processor_signature` member.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from sqlalchemy import text

from app.api.deps import SessionDep, SettingsDep, require
from app.api.schemas import (
    PROBLEM_RESPONSES,
    UUID4_PATTERN,
    OpendsrCancelled,
    OpendsrCreated,
    OpendsrDiscovery,
    OpendsrProcessorStatus,
    OpendsrRequestCreate,
    OpendsrStatusPublic,
    link,
    problem_response,
)
from app.opendsr.identity import ProcessorIdentity, load_identity
from app.services import opendsr
from app.services.apikeys import Principal
from app.services.common import canonical_json
from app.services.opendsr_status import API_VERSION
from app.services.transactions import read_only
from app.vocab import Scope

PREFIX = "/opendsr/v2"
router = APIRouter(prefix=PREFIX, tags=["opendsr"])
OpendsrPrincipal = Annotated[Principal, Depends(require(Scope.OPENDSR))]
RequestIdPath = Annotated[str, Path(pattern=UUID4_PATTERN)]
_SIGNED = {
    "X-OpenDSR-Processor-Domain": {"description": "The domain the signing certificate is issued to",
                                   "schema": {"type": "string"}},
    "X-OpenDSR-Signature": {"description": "Base64 signature of the body bytes (SHA-256)",
                            "schema": {"type": "string"}},
}
_REQUEST_LINKS = {
    "status": link("GET", f"{PREFIX}/requests/{{subject_request_id}}", "Its status",
                   subject_request_id="$response.body#/subject_request_id"),
    "cancel": link("DELETE", f"{PREFIX}/requests/{{subject_request_id}}", "Cancel it while pending",
                   subject_request_id="$response.body#/subject_request_id"),
}


def _signed(body: dict[str, Any], identity: ProcessorIdentity, status_code: int, *,
            with_signature: bool = False) -> Response:
    """`body` as canonical JSON bytes with the OpenDSR signature headers (and, for the
    request and cancellation answers, its `processor_signature`)."""
    if with_signature:
        body = {**body, "processor_signature": identity.sign(canonical_json(body).encode())}
    content = canonical_json(body).encode()
    headers = {
        "X-OpenDSR-Processor-Domain": identity.domain,
        "X-OpenDSR-Signature": identity.sign(content),
    }
    return Response(content, status_code=status_code, media_type="application/json", headers=headers)


async def _raw_body(request: Request) -> bytes:
    """The request body as sent (`encoded_request` returns it whole)."""
    return await request.body()


@router.get("/discovery", response_model=OpendsrDiscovery, responses=PROBLEM_RESPONSES)
def discovery(request: Request, settings: SettingsDep, _: OpendsrPrincipal) -> Any:
    """What this processor supports, and where its signing certificate is published."""
    return opendsr.discovery(settings, str(request.url_for("opendsr_certificate")))


@router.get(
    "/cert.pem",
    name="opendsr_certificate",
    response_class=Response,
    responses={
        200: {"description": "The processor's X.509 certificate (PEM)",
              "content": {"application/x-pem-file": {"schema": {"type": "string"}}}},
        503: problem_response("No signing key is configured"),
    },
)
def certificate(settings: SettingsDep) -> Response:
    """The certificate OpenDSR answers and callbacks are signed with (public)."""
    return Response(load_identity(settings).certificate_pem, media_type="application/x-pem-file")


@router.get("/status", response_model=OpendsrProcessorStatus, responses=PROBLEM_RESPONSES)
def processor_status(session: SessionDep, _: OpendsrPrincipal) -> Any:
    """The processor answers and reaches its database."""
    with read_only(session):
        session.execute(text("SELECT 1"))
    return {"api_version": API_VERSION, "status": "ok"}


@router.post(
    "/requests",
    status_code=201,
    response_model=OpendsrCreated,
    responses={**PROBLEM_RESPONSES,
               201: {"description": "Created", "headers": _SIGNED, "links": _REQUEST_LINKS}},
    summary="Submit an OpenDSR erasure request",
)
def create_request(
    body: OpendsrRequestCreate,
    raw: Annotated[bytes, Depends(_raw_body)],
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: OpendsrPrincipal,
) -> Response:
    """Accept an erasure: one deletion request per model holding the subject (201)."""
    identity = load_identity(settings)
    erasure = opendsr.Erasure(
        subject_request_id=body.subject_request_id,
        subject_request_type=body.subject_request_type.value,
        regulation=body.regulation,
        submitted_time=body.submitted_time.isoformat(),
        subject_identities=[i.model_dump() for i in body.subject_identities],
        status_callback_urls=list(body.status_callback_urls),
        extensions=body.extensions,
    )
    accepted = opendsr.submit_erasure(session, erasure, raw, principal=principal, settings=settings)
    request.app.state.dispatcher.enqueue_many(accepted.enqueue_job_ids)
    return _signed(accepted.body, identity, 201, with_signature=True)


@router.get(
    "/requests/{subject_request_id}",
    response_model=OpendsrStatusPublic,
    responses={**PROBLEM_RESPONSES, 200: {"description": "The status", "headers": _SIGNED}},
)
def get_request(
    subject_request_id: RequestIdPath, session: SessionDep, settings: SettingsDep, principal: OpendsrPrincipal
) -> Response:
    """An OpenDSR request's status, with each model's deletion request."""
    body = opendsr.get_status(session, subject_request_id, principal)
    return _signed(body, load_identity(settings), 200)


@router.delete(
    "/requests/{subject_request_id}",
    status_code=202,
    response_model=OpendsrCancelled,
    responses={**PROBLEM_RESPONSES, 202: {"description": "Cancelled", "headers": _SIGNED}},
)
def cancel_request(
    subject_request_id: RequestIdPath, session: SessionDep, settings: SettingsDep, principal: OpendsrPrincipal
) -> Response:
    """Cancel a request that is still `pending` (else 409 `not_cancellable`)."""
    identity = load_identity(settings)
    body = opendsr.cancel(session, subject_request_id, principal)
    return _signed(body, identity, 202, with_signature=True)
