"""The FastAPI application factory: routers, error handlers, limits, metrics, lifespan.

`create_app(settings)` builds everything from the settings it is given: the database engine
and session factory, the model store, the dispatcher and (unless switched off) the
background loops (sweeper, webhook delivery) that live as long as the app.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import audit, datasets, deletions, jobs, models, opendsr, ops, receipts
from app.api.schemas import (
    CALLBACK_PATTERN_DEVELOPMENT,
    CALLBACK_PATTERN_HTTPS,
    ModelTrainCreate,
    ModelUploadMetadata,
    Problem,
)
from app.db import create_db_engine, create_session_factory
from app.dispatch import Dispatcher
from app.errors import PROBLEM_JSON, PayloadTooLarge, install_handlers
from app.metrics import create_registry
from app.settings import Settings, get_settings
from models_store import Store

log = logging.getLogger(__name__)


class BodyLimit:
    """Refuse request bodies over the limit with 413, by Content-Length or while streaming.

    Checkpoint uploads (`POST /v1/models`) get the larger checkpoint limit.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, max_upload: int) -> None:
        self.app, self.max_body, self.max_upload = app, max_body, max_upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.max_upload if scope["path"].rstrip("/") == "/v1/models" else self.max_body
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(scope, send, limit)
            return
        seen = 0
        started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if not started:
                        rejected = True
                        await self._reject(scope, send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return  # the 413 already went out; drop what the app answers after it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)

    async def _reject(self, scope: Scope, send: Send, limit: int) -> None:
        import json

        body = json.dumps(
            PayloadTooLarge(f"the request body exceeds {limit} bytes", limit=limit).problem(
                instance=scope["path"]
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class LetheAPI(FastAPI):
    """FastAPI whose OpenAPI document also carries the schemas that hand-written parts of it
    refer to (`Problem`, every error response as `application/problem+json`; the two bodies
    of `POST /v1/models`, which a dependency parses itself), and states the deployment's own
    rule for `callback_url` (plain http to loopback only in development)."""

    def openapi(self) -> dict[str, Any]:
        """The generated document plus the referenced component schemas."""
        document = super().openapi()  # cached by FastAPI; the additions below are idempotent
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        _, top = models_json_schema(
            [(model, "validation") for model in _REFERENCED_MODELS],
            ref_template="#/components/schemas/{model}",
        )
        for name, schema in top["$defs"].items():
            schemas.setdefault(name, schema)
        settings: Settings = self.state.settings
        pattern = (
            CALLBACK_PATTERN_DEVELOPMENT if settings.environment == "development" else CALLBACK_PATTERN_HTTPS
        )
        callback = schemas["DeletionRequestCreate"]["properties"]["callback_url"]
        for variant in callback.get("anyOf", [callback]):
            if variant.get("type") == "string":
                variant["pattern"] = pattern
        schemas["OpendsrRequestCreate"]["properties"]["status_callback_urls"]["items"]["pattern"] = pattern
        return document


_REFERENCED_MODELS = (Problem, ModelTrainCreate, ModelUploadMetadata)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the Lethe API for `settings` (default: the environment's)."""
    settings = settings or get_settings()
    engine = create_db_engine(settings.database_url)
    sessions = create_session_factory(engine)
    store = Store(settings.store_path)
    dispatcher = Dispatcher(settings)
    registry, http_metrics = create_registry(sessions)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loops: list[Any] = []
        if settings.run_background_loops:
            from app.sweeper import start_background_loops

            loops = start_background_loops(sessions, settings, dispatcher, store)
        try:
            yield
        finally:
            for loop in loops:
                loop.stop()
            engine.dispose()

    app = LetheAPI(
        title="Lethe",
        version="0.1.0",
        summary="Verified deletion of training samples from image classifiers",
        openapi_url="/openapi.json",
        docs_url="/docs",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.store = store
    app.state.dispatcher = dispatcher
    app.state.metrics_registry = registry
    install_handlers(app)
    app.middleware("http")(http_metrics.middleware)
    app.add_middleware(
        BodyLimit, max_body=settings.max_body_bytes, max_upload=settings.max_checkpoint_bytes
    )
    for module in (deletions, receipts, jobs, datasets, models, audit, opendsr, ops):
        app.include_router(module.router)
    app.include_router(deletions.group_router)
    return app
