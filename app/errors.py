"""The service's error tree and its translation to RFC 9457 problem+json.

    LetheError                          500 internal_error
    ├── InvalidInput                    422 invalid_input
    │   ├── ValidationFailed            422 validation_error      (every offending field)
    │   ├── UnknownSampleIds            422 unknown_sample_ids     (sample_ids, count)
    │   ├── TestSplitSamples            422 test_split_samples     (sample_ids, count)
    │   ├── DuplicateSampleIds          422 duplicate_sample_ids   (sample_ids, count)
    │   ├── DuplicateSubjectIds         422 duplicate_subject_ids
    │   ├── DatasetWithoutSubjects      422 dataset_without_subjects
    │   ├── InvalidMethodOptions        422 invalid_method_options (errors: each option)
    │   ├── InvalidCheckpoint           422 invalid_checkpoint
    │   ├── UnsupportedArchitecture     422 unsupported_architecture (the library lacks the model)
    │   ├── PathOutsideDataset          422 path_outside_dataset   (sample_ids, count)
    │   ├── UnreadableImages            422 unreadable_images      (sample_ids, problems)
    │   └── IdempotencyKeyMismatch      422 idempotency_key_mismatch
    ├── BadRequest                      400 bad_request
    │   ├── InvalidCursor               400 invalid_cursor         (not a cursor Lethe issued)
    │   ├── UnsupportedRequestType      400 unsupported_request_type (OpenDSR: not erasure)
    │   └── UnsupportedIdentity         400 unsupported_identity   (OpenDSR: no usable identity)
    ├── Unauthorized                    401 unauthorized
    ├── Forbidden                       403 forbidden
    ├── NotFound                        404 not_found
    │   ├── ModelNotFound               404 model_not_found
    │   ├── DatasetNotFound             404 dataset_not_found
    │   ├── VersionNotFound             404 version_not_found
    │   ├── RequestNotFound             404 request_not_found
    │   ├── GroupNotFound               404 group_not_found
    │   ├── OpendsrRequestNotFound      404 opendsr_request_not_found
    │   └── JobNotFound                 404 job_not_found
    ├── Conflict                        409 conflict
    │   ├── AlreadyExists               409 already_exists
    │   ├── NotCancellable              409 not_cancellable
    │   ├── OpendsrRequestExists        409 opendsr_request_exists
    │   ├── IdempotencyInFlight         409 idempotency_in_flight
    │   ├── StaleAttempt                409 stale_attempt          (a worker lost its claim)
    │   ├── ReceiptNotReady             409 receipt_not_ready      (the request is not final yet)
    │   ├── ModelImportFailed           409 model_import_failed    (the model has no version)
    │   └── ReceiptUnavailable          409 receipt_unavailable    (final, but no job ran for it)
    ├── PreconditionFailed              412 precondition_failed
    ├── PayloadTooLarge                 413 payload_too_large
    ├── RangeNotSatisfiable             416 range_not_satisfiable
    └── Unavailable                     503 unavailable

On the OpenDSR paths (`/opendsr/`) an input error is a 400, as that protocol requires, and
every problem document also carries the protocol's `error` object (`code`, `message`,
`errors`).

`engine.errors.InvalidInput` subclasses map onto the same codes (`to_lethe_error`), so an
engine refusal reaches the client as the same problem document as a service refusal. One
handler on the base class renders every error; unexpected exceptions become a bare 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from engine import errors as engine_errors

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://lethe.dev/problems/"


class LetheError(Exception):
    """Base of every error the service raises on purpose; carries an HTTP status and a code."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal server error"

    def __init__(self, detail: str | None = None, **extras: Any) -> None:
        self.detail = detail or self.title
        self.extras = extras
        super().__init__(self.detail)

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        """The RFC 9457 problem document for this error."""
        body: dict[str, Any] = {
            "type": _TYPE_BASE + self.code.replace("_", "-"),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extras)
        return body


class InvalidInput(LetheError):
    status, code, title = 422, "invalid_input", "Invalid input"


class ValidationFailed(InvalidInput):
    code, title = "validation_error", "Request validation failed"

    def __init__(self, errors: Sequence[dict[str, Any]]) -> None:
        fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in errors)
        super().__init__(f"invalid fields: {fields}" if fields else None, errors=list(errors))


class _SampleIdProblem(InvalidInput):
    noun = "sample IDs"

    def __init__(self, ids: Sequence[str], *, count: int | None = None, limit: int = 100) -> None:
        shown = sorted(ids)[:limit]
        total = len(ids) if count is None else count
        super().__init__(f"{total} {self.noun}", sample_ids=shown, count=total)


class UnknownSampleIds(_SampleIdProblem):
    code, title, noun = "unknown_sample_ids", "Unknown sample IDs", "sample IDs not in the dataset"


class TestSplitSamples(_SampleIdProblem):
    __test__ = False  # a problem type, not a pytest class
    code, title = "test_split_samples", "Test-split samples cannot be forgotten"
    noun = "sample IDs of the held-out test split, which was never trained on"


class DuplicateSampleIds(_SampleIdProblem):
    code, title, noun = "duplicate_sample_ids", "Duplicate sample IDs", "sample IDs given twice"


class DuplicateSubjectIds(InvalidInput):
    code, title = "duplicate_subject_ids", "Duplicate subject IDs"


class DatasetWithoutSubjects(InvalidInput):
    code, title = "dataset_without_subjects", "The dataset names no data subjects"


class InvalidMethodOptions(InvalidInput):
    code, title = "invalid_method_options", "Invalid method options"

    def __init__(self, method: str, problems: Sequence[tuple[str, str, str]]) -> None:
        """`problems`: (option, message, type), type `method_option` for the option's own
        schema, `method_option_rule` for a constraint between options."""
        errors = [
            {"loc": ["body", "method_options", option], "msg": message, "type": kind}
            for option, message, kind in problems
        ]
        named = ", ".join(f"{option} ({message})" for option, message, _ in problems)
        super().__init__(f"options of {method}: {named}", method=method, errors=errors)


class InvalidCheckpoint(InvalidInput):
    code, title = "invalid_checkpoint", "Invalid checkpoint"


class UnsupportedArchitecture(InvalidInput):
    code, title = "unsupported_architecture", "Unsupported architecture"


class PathOutsideDataset(_SampleIdProblem):
    code, title = "path_outside_dataset", "Image paths outside the dataset folder"
    noun = "samples whose image path is absolute or leaves the dataset folder"


class UnreadableImages(InvalidInput):
    code, title = "unreadable_images", "Missing or unreadable image files"

    def __init__(self, detail: str, problems: dict[str, str], *, limit: int = 100) -> None:
        shown = dict(list(problems.items())[:limit])
        super().__init__(detail, sample_ids=list(shown), problems=shown, count=len(problems))


class IdempotencyKeyMismatch(InvalidInput):
    code, title = "idempotency_key_mismatch", "Idempotency key reused with a different body"


class BadRequest(LetheError):
    status, code, title = 400, "bad_request", "Bad request"


class InvalidCursor(BadRequest):
    code, title = "invalid_cursor", "Invalid cursor"


class UnsupportedRequestType(BadRequest):
    code, title = "unsupported_request_type", "Subject request type not supported"


class UnsupportedIdentity(BadRequest):
    code, title = "unsupported_identity", "No supported identity"


class Unauthorized(LetheError):
    status, code, title = 401, "unauthorized", "Missing or invalid API key"


class Forbidden(LetheError):
    status, code, title = 403, "forbidden", "The API key lacks the required scope"


class NotFound(LetheError):
    status, code, title = 404, "not_found", "Not found"


class ModelNotFound(NotFound):
    code, title = "model_not_found", "Model not found"


class DatasetNotFound(NotFound):
    code, title = "dataset_not_found", "Dataset not found"


class VersionNotFound(NotFound):
    code, title = "version_not_found", "Model version not found"


class RequestNotFound(NotFound):
    code, title = "request_not_found", "Deletion request not found"


class GroupNotFound(NotFound):
    code, title = "group_not_found", "Deletion request group not found"


class OpendsrRequestNotFound(NotFound):
    code, title = "opendsr_request_not_found", "OpenDSR request not found"


class JobNotFound(NotFound):
    code, title = "job_not_found", "Job not found"


class Conflict(LetheError):
    status, code, title = 409, "conflict", "Conflict"


class AlreadyExists(Conflict):
    code, title = "already_exists", "Already exists"


class NotCancellable(Conflict):
    code, title = "not_cancellable", "Not cancellable in its current status"


class OpendsrRequestExists(Conflict):
    code, title = "opendsr_request_exists", "An OpenDSR request with this id exists"


class IdempotencyInFlight(Conflict):
    code, title = "idempotency_in_flight", "A request with this idempotency key is in progress"


class StaleAttempt(Conflict):
    code, title = "stale_attempt", "The job was claimed again by another attempt"


class ReceiptNotReady(Conflict):
    code, title = "receipt_not_ready", "The request has not reached a final status yet"


class ReceiptUnavailable(Conflict):
    code, title = "receipt_unavailable", "No job ran for this request, so there is no receipt"


class ModelImportFailed(Conflict):
    code, title = "model_import_failed", "The model's checkpoint import failed"


class PreconditionFailed(LetheError):
    status, code, title = 412, "precondition_failed", "Precondition failed"


class PayloadTooLarge(LetheError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class RangeNotSatisfiable(LetheError):
    status, code, title = 416, "range_not_satisfiable", "Range not satisfiable"


class Unavailable(LetheError):
    status, code, title = 503, "unavailable", "Service unavailable"


def to_lethe_error(exc: engine_errors.EngineError) -> LetheError:
    """Translate an engine refusal into the service error with the same code."""
    if isinstance(exc, engine_errors.UnknownSampleIds):
        return UnknownSampleIds(exc.ids)
    if isinstance(exc, engine_errors.TestSplitSamples):
        return TestSplitSamples(exc.ids)
    if isinstance(exc, engine_errors.InvalidCheckpoint):
        return InvalidCheckpoint(str(exc))
    if isinstance(exc, engine_errors.UnsupportedArchitecture):
        return UnsupportedArchitecture(str(exc), architecture=exc.name)
    if isinstance(exc, engine_errors.PathOutsideDataset):
        return PathOutsideDataset(exc.ids, count=exc.count)
    if isinstance(exc, engine_errors.UnreadableImages):
        return UnreadableImages(str(exc), exc.problems)
    if isinstance(exc, engine_errors.UnknownName):
        err = InvalidInput(str(exc), known=exc.known)
        err.code = "unknown_name"
        return err
    if isinstance(exc, engine_errors.InvalidInput):
        return InvalidInput(str(exc))
    return LetheError("engine error")


#: Where the OpenDSR processor interface lives (its errors speak that protocol too).
OPENDSR_PREFIX = "/opendsr/"


def opendsr_problem(body: dict[str, Any]) -> dict[str, Any]:
    """A problem document as the OpenDSR protocol wants it: input errors are 400, and the
    protocol's `error` object (specification §7.6) rides along."""
    status = 400 if body["status"] == 422 else body["status"]
    reasons = [
        {"domain": "Validation", "reason": e.get("type") or body["code"], "message": e.get("msg", "")}
        for e in body.get("errors", [])
    ] or [{"domain": "Lethe", "reason": body["code"], "message": body["detail"]}]
    return {**body, "status": status,
            "error": {"code": status, "message": body["detail"], "errors": reasons}}


#: The methods a 405's `Allow` may name (the app serves no others).
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Any) -> list[str]:
    """The methods the app serves on the request's path, for a 405's `Allow` (RFC 9110).

    Starlette's own 405 names only the first route matching the path; a path served by
    several routes (GET and POST on `/v1/models`) needs all of them. Each method is tried
    against the app's routes, which say whether they fully match it.
    """
    from starlette.routing import Match

    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


def install_handlers(app: Any) -> None:
    """Register the problem+json handlers on a FastAPI app."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sqlalchemy.exc import DataError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def render(request: Request, err: LetheError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        body = err.problem(instance=request.url.path)
        if request.url.path.startswith(OPENDSR_PREFIX):
            body = opendsr_problem(body)
        return JSONResponse(body, status_code=body["status"], media_type=PROBLEM_JSON, headers=headers)

    async def on_lethe(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LetheError)
        if exc.status >= 500:
            log.error("request failed: %s %s: %s", request.method, request.url.path, exc.detail)
        return render(request, exc)

    async def on_engine(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, engine_errors.EngineError)
        return render(request, to_lethe_error(exc))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return render(request, ValidationFailed(errors))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        err = LetheError(str(exc.detail))
        err.status = exc.status_code
        err.title = str(exc.detail)
        err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = render(request, err)
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

    async def on_data_error(request: Request, exc: Exception) -> JSONResponse:
        return render(request, InvalidInput("a value cannot be stored (for example a NUL character)"))

    async def on_unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return render(request, LetheError())

    app.add_exception_handler(LetheError, on_lethe)
    app.add_exception_handler(engine_errors.EngineError, on_engine)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(DataError, on_data_error)
    app.add_exception_handler(Exception, on_unhandled)
