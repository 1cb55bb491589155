"""Operations endpoints: `/healthz`, `/readyz`, `/metrics` (no authentication)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.schemas import Health, Readiness
from app.db.migrate import at_head

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A check failed"}},
)
async def readyz(request: Request) -> Any:
    """Database reachable and migrated to head, broker reachable; 503 otherwise."""
    state = request.app.state

    def check() -> dict[str, bool]:
        checks = {"database": False, "migrations": False, "broker": False}
        try:
            with state.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = True
            checks["migrations"] = at_head(state.engine)
        except Exception:
            pass
        checks["broker"] = state.dispatcher.ping()
        return checks

    checks = await run_in_threadpool(check)
    ok = all(checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    body = await run_in_threadpool(generate_latest, request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
