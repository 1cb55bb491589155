"""Request dependencies: database sessions, Bearer authentication with scopes, paging."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.errors import BadRequest, Forbidden, InvalidCursor, Unauthorized
from app.services.apikeys import Principal, authenticate
from app.services.common import decode_cursor
from app.settings import Settings
from app.vocab import Scope
from models_store import Store

# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in the
# thread pool, and those hand-offs cost more CPU than the work on a small request.


async def get_settings_dep(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for one request; creating it does no I/O, closing it (which may return a
    connection to the pool) runs in the thread pool."""
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


async def get_store(request: Request) -> Store:
    """The app's model store."""
    store: Store = request.app.state.store
    return store


#: Declares the Bearer scheme in the OpenAPI document; `require` does the checking itself so
#: that every refusal is a problem+json 401/403.
_BEARER = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


def require(scope: Scope) -> Callable[..., Principal]:
    """A dependency admitting callers whose key holds `scope` (or `admin`)."""

    def dependency(
        request: Request,
        session: Annotated[Session, Depends(get_session)],
        _declared: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
    ) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send 'Authorization: Bearer <api key>'")
        principal = authenticate(session, token.strip())
        if principal is None:
            raise Unauthorized("the API key is unknown or revoked")
        if not principal.allows(scope):
            raise Forbidden(f"this endpoint needs the {scope!r} scope", required_scope=scope)
        request.state.principal = principal
        return principal

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    return dependency


CURSOR_DESCRIPTION = (
    "An opaque token: the `next_cursor` of the previous page, passed back unchanged. Any other "
    "value is refused with 400 `invalid_cursor`."
)
_CURSOR = Query(max_length=500, description=CURSOR_DESCRIPTION)


class Paging:
    """`?limit=&cursor=` with the deployment's bounds. Reading `cursor` refuses one Lethe did
    not issue (400 `invalid_cursor`); the handler reads it after authentication, so a caller
    without a key gets 401 whatever the cursor."""

    key_type: type = str

    def __init__(
        self,
        request: Request,
        limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
        cursor: Annotated[str | None, _CURSOR] = None,
    ) -> None:
        settings: Settings = request.app.state.settings
        self.limit = min(limit or settings.page_limit_default, settings.page_limit_max)
        self._cursor = cursor

    @property
    def cursor(self) -> str | None:
        """The cursor, once checked to be one a list of this kind issued."""
        try:
            decode_cursor(self._cursor, self.key_type)
        except BadRequest:
            raise InvalidCursor("the cursor is not one this list issued") from None
        return self._cursor


class IntPaging(Paging):
    """Paging over a list ordered by a number (audit sequence, version)."""

    key_type = int


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[Store, Depends(get_store)]
PagingDep = Annotated[Paging, Depends(Paging)]
IntPagingDep = Annotated[IntPaging, Depends(IntPaging)]
