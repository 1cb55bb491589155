"""`/v1/models`: register (JSON train job or multipart upload), read, versions, download."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from app.api.deps import IntPagingDep, PagingDep, SessionDep, SettingsDep, StoreDep, require
from app.api.schemas import (
    PROBLEM_RESPONSES,
    ModelCreate,
    ModelList,
    ModelPublic,
    ModelTrainCreate,
    ModelUploadMetadata,
    ReferencesPublic,
    VersionList,
    VersionPublic,
    link,
)
from app.errors import (
    BadRequest,
    InvalidInput,
    PayloadTooLarge,
    RangeNotSatisfiable,
    ValidationFailed,
)
from app.services import models, references
from app.services.apikeys import Principal
from app.vocab import Scope

router = APIRouter(prefix="/v1/models", tags=["models"])
NamePath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
VersionPath = Annotated[str, Path(pattern=r"^(latest|[0-9]{1,9})$")]
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

_REGISTRATION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ModelTrainCreate"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": (
                        "The upload: `metadata` (JSON) and the `checkpoint` file. Older clients "
                        "may send the metadata members as separate form fields instead."
                    ),
                    "required": ["metadata", "checkpoint"],
                    "properties": {
                        "metadata": {"$ref": "#/components/schemas/ModelUploadMetadata"},
                        "checkpoint": {
                            "type": "string",
                            "format": "binary",
                            "description": "The safetensors file of version 1 (never a pickle)",
                        },
                    },
                },
                "encoding": {"metadata": {"contentType": "application/json"}},
            },
        },
    }
}


#: Links of a model whose version 1 is being trained (202): it has no version to read yet.
_PENDING_MODEL_LINKS = {
    "read": link("GET", "/v1/models/{name}", "The model", name="$response.body#/name"),
    "versions": link(
        "GET", "/v1/models/{name}/versions", "Its versions", name="$response.body#/name"
    ),
}
_MODEL_LINKS = {
    **_PENDING_MODEL_LINKS,
    "latest": link(
        "GET", "/v1/models/{name}/versions/{n}", "Its latest version", name="$response.body#/name",
        n="latest",
    ),
}


def _version_links(version: str) -> dict[str, Any]:
    return {
        "checkpoint": link(
            "GET", "/v1/models/{name}/versions/{n}/checkpoint", "Download the version",
            name="$request.path.name", n=version,
        ),
        "manifest": link(
            "GET", "/v1/models/{name}/versions/{n}/manifest", "The version's manifest",
            name="$request.path.name", n=version,
        ),
    }


@dataclass(frozen=True)
class Registration:
    """A parsed `POST /v1/models`: what to register and, for an upload, the file."""

    spec: ModelCreate
    checkpoint: UploadFile | None


def _validated(model: type[ModelCreate], raw: Any) -> ModelCreate:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ValidationFailed(
            [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        ) from None


def _json_part(raw: str, field: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise InvalidInput(f"{field} is not valid JSON", field=field) from None


def _upload_metadata(form: FormData) -> Any:
    """The `metadata` part; or, as older clients send it, one form field per member."""
    meta_raw = form.get("metadata")
    if isinstance(meta_raw, str):
        return _json_part(meta_raw, "metadata")
    meta: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
    for key in ("recipe", "policy", "input_size", "preprocessing"):
        if isinstance(meta.get(key), str):
            meta[key] = _json_part(meta[key], key)
    return meta


async def parse_registration(
    request: Request, settings: SettingsDep
) -> AsyncIterator[Registration]:
    """Parse either registration form: JSON (`ModelTrainCreate`) or multipart (`metadata` as
    `ModelUploadMetadata` plus the `checkpoint` file). The form is closed after the handler."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            raw = json.loads(await request.body())
        except ValueError:
            raise BadRequest("the body is not valid JSON") from None
        yield Registration(_validated(ModelTrainCreate, raw), None)
        return
    if not ctype.startswith("multipart/form-data"):
        raise InvalidInput("send application/json or multipart/form-data", field="content-type")
    try:
        form = await request.form(max_files=1, max_fields=20)
    except Exception as exc:
        raise BadRequest(f"unreadable multipart body: {exc}") from None
    try:
        spec = _validated(ModelUploadMetadata, _upload_metadata(form))
        upload = form.get("checkpoint")
        if upload is None or isinstance(upload, str):
            raise InvalidInput("a 'checkpoint' file part is required", field="checkpoint")
        if upload.size is not None and upload.size > settings.max_checkpoint_bytes:
            raise PayloadTooLarge(
                f"checkpoints are limited to {settings.max_checkpoint_bytes} bytes"
            )
        yield Registration(spec, upload)
    finally:
        await form.close()


@router.post(
    "",
    status_code=201,
    response_model=ModelPublic,
    responses={
        **PROBLEM_RESPONSES,
        201: {"description": "Registered with version 1", "links": _MODEL_LINKS},
        202: {
            "model": ModelPublic,
            "description": "A train job (JSON) or, for a timm:/torchvision: upload, an import "
            "job queued; `job_id` names it",
            "links": _PENDING_MODEL_LINKS,
        },
    },
    openapi_extra=_REGISTRATION_BODY,
)
async def create_model(
    # Authentication first: an anonymous caller learns nothing about the body's shape.
    principal: Annotated[Principal, Depends(require(Scope.MODELS_WRITE))],
    registration: Annotated[Registration, Depends(parse_registration)],
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
) -> Any:
    """Register a model: JSON with `init: "train"` (202, a train job) or a multipart upload of
    a safetensors checkpoint with its `metadata`: 201 with version 1 for a built-in
    architecture, 202 with an `import` job for `timm:`/`torchvision:` (the model is
    `importing` until the job publishes version 1 or fails the registration)."""
    spec, upload = registration.spec, registration.checkpoint
    sessions = request.app.state.sessions
    common: dict[str, Any] = {
        "principal": principal,
        "name": spec.name,
        "dataset": spec.dataset,
        "architecture": spec.architecture,
        "num_classes": spec.num_classes,
        "recipe": spec.recipe.model_dump(),
        "policy": spec.policy_overrides(),
        "settings": settings,
        "succeeds": spec.succeeds,
    }

    def register() -> models.Registered:
        with sessions() as session:
            if upload is None:
                return models.register_model_train(session, **common)
            assert isinstance(spec, ModelUploadMetadata)
            return models.register_uploaded_model(
                session,
                store,
                checkpoint=upload.file,
                max_bytes=settings.max_checkpoint_bytes,
                description=spec.description_overrides(),
                **common,
            )

    reg = await run_in_threadpool(register)
    for job_id in reg.dispatch:
        await run_in_threadpool(request.app.state.dispatcher.enqueue, job_id)
    if reg.job_id is None:
        return JSONResponse(
            reg.body, status_code=201, headers={"Location": f"/v1/models/{spec.name}"}
        )
    return JSONResponse(
        reg.body, status_code=202, headers={"Location": f"/v1/jobs/{reg.job_id}"}
    )


@router.get(
    "",
    response_model=ModelList,
    responses={
        **PROBLEM_RESPONSES,
        200: {
            "description": "A page of models",
            "links": {
                "versions": link(
                    "GET", "/v1/models/{name}/versions", "The first model's versions",
                    name="$response.body#/items/0/name",
                )
            },
        },
    },
)
def list_models(
    session: SessionDep, paging: PagingDep, _: Annotated[Principal, Depends(require(Scope.MODELS_READ))]
) -> Any:
    """Models by name."""
    page = models.list_models(session, limit=paging.limit, cursor=paging.cursor)
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get("/{name}", response_model=ModelPublic, responses=PROBLEM_RESPONSES)
def get_model(
    name: NamePath, session: SessionDep, _: Annotated[Principal, Depends(require(Scope.MODELS_READ))]
) -> Any:
    """One model: latest version, forgotten count, pending requests, policy."""
    return models.get_model(session, name)


@router.get("/{name}/references", response_model=ReferencesPublic, responses=PROBLEM_RESPONSES)
def get_references(
    name: NamePath, session: SessionDep, _: Annotated[Principal, Depends(require(Scope.MODELS_READ))]
) -> Any:
    """The model's reference statistics: status, K, cost against one training, pool size."""
    return references.get_references(session, name)


@router.get(
    "/{name}/versions",
    response_model=VersionList,
    responses={
        **PROBLEM_RESPONSES,
        200: {
            "description": "A page of versions",
            "links": _version_links("$response.body#/items/0/version"),
        },
    },
)
def list_versions(
    name: NamePath,
    session: SessionDep,
    paging: IntPagingDep,
    _: Annotated[Principal, Depends(require(Scope.MODELS_READ))],
) -> Any:
    """A model's versions, newest first."""
    page = models.list_versions(session, name, limit=paging.limit, cursor=paging.cursor)
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get(
    "/{name}/versions/{n}",
    response_model=VersionPublic,
    responses={
        **PROBLEM_RESPONSES,
        200: {"description": "The version", "links": _version_links("$response.body#/version")},
    },
)
def get_version(
    name: NamePath,
    n: VersionPath,
    session: SessionDep,
    _: Annotated[Principal, Depends(require(Scope.MODELS_READ))],
) -> Any:
    """One version (`n` may be `latest`)."""
    return models.get_version(session, name, n)


@router.get("/{name}/versions/{n}/manifest", responses=PROBLEM_RESPONSES)
def get_manifest(
    name: NamePath,
    n: VersionPath,
    session: SessionDep,
    store: StoreDep,
    _: Annotated[Principal, Depends(require(Scope.MODELS_READ))],
) -> Any:
    """The version's JSON manifest."""
    return models.get_manifest(session, store, name, n)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive for one satisfiable byte range; None to serve the whole file."""
    m = _RANGE.match(header.strip())
    if not m:
        return None  # multiple or malformed ranges: RFC 9110 lets us ignore Range
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiable("empty suffix range", size=size)
        return max(0, size - length), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(f"range {header!r} is outside 0..{size - 1}", size=size)
    return start, min(end, size - 1)


_DOWNLOAD_HEADERS = {
    "ETag": {"description": "The sha256 of the file, quoted (strong)", "schema": {"type": "string"}},
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
    "Content-Disposition": {
        "description": "attachment; filename=\"{model}-v{n}.safetensors\"",
        "schema": {"type": "string"},
    },
}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


@router.get(
    "/{name}/versions/{n}/checkpoint",
    responses={
        **PROBLEM_RESPONSES,
        200: {"description": "The whole file", "content": _BINARY, "headers": _DOWNLOAD_HEADERS},
        206: {
            "description": "The requested byte range",
            "content": _BINARY,
            "headers": {
                **_DOWNLOAD_HEADERS,
                "Content-Range": {
                    "schema": {"type": "string", "pattern": r"^bytes [0-9]+-[0-9]+/[0-9]+$"}
                },
            },
        },
        304: {"description": "Not modified (If-None-Match matched the ETag)", "headers": _DOWNLOAD_HEADERS},
        416: {
            "description": "Range not satisfiable",
            "headers": {
                **_DOWNLOAD_HEADERS,
                "Content-Range": {"schema": {"type": "string", "pattern": r"^bytes \*/[0-9]+$"}},
            },
        },
    },
    response_class=StreamingResponse,
)
def download_checkpoint(
    name: NamePath,
    n: VersionPath,
    session: SessionDep,
    store: StoreDep,
    principal: Annotated[Principal, Depends(require(Scope.MODELS_DOWNLOAD))],
    range_header: Annotated[
        str | None, Header(alias="Range", description="One byte range, `bytes=first-last`")
    ] = None,
    if_range: Annotated[
        str | None, Header(alias="If-Range", description="Honour Range only for this ETag")
    ] = None,
    if_none_match: Annotated[
        str | None, Header(alias="If-None-Match", description="ETags the client holds, or *")
    ] = None,
) -> Response:
    """The safetensors file, streamed; strong ETag = sha256; Range and If-Range honoured."""
    ck = models.checkpoint_file(session, store, name, n)
    etag = f'"{ck.sha256}"'
    base = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{ck.filename}"',
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if if_none_match and (
        if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]
    ):
        return Response(status_code=304, headers=base)
    byte_range: tuple[int, int] | None = None
    if range_header and (if_range is None or if_range.strip() == etag):
        try:
            byte_range = _parse_range(range_header, ck.size_bytes)
        except RangeNotSatisfiable:
            models.record_download(session, ck, actor=principal.name, byte_range="unsatisfiable")
            return Response(
                status_code=416, headers={**base, "Content-Range": f"bytes */{ck.size_bytes}"}
            )
    start, end = byte_range or (0, ck.size_bytes - 1)
    models.record_download(
        session,
        ck,
        actor=principal.name,
        byte_range=f"{start}-{end}" if byte_range else None,
    )
    headers = {**base, "Content-Length": str(end - start + 1)}
    status = 200
    if byte_range:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{ck.size_bytes}"
    return StreamingResponse(
        store.iter_range(ck.path, start, end),
        status_code=status,
        media_type="application/octet-stream",
        headers=headers,
    )
