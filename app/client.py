"""A small typed HTTP client for Lethe's `/v1` API (the contract in API.md).

The CLI talks to a running service only through this module. Every non-2xx answer becomes a
`LetheAPIError` subclass chosen by status code and carrying the problem+json `code`, so
callers branch on `err.code` (`unknown_sample_ids`, `model_not_found`, ...) rather than on
message text. Responses are returned as the JSON objects the API documents, typed with
`TypedDict`s that list the fields the contract fixes (servers may add more).

    LetheClientError
    ├── LetheAPIError            the server answered with a problem+json error
    │   ├── Unauthorized         401: no key or an unknown/revoked key
    │   ├── Forbidden            403: the key lacks the scope
    │   ├── NotFound             404
    │   ├── Conflict             409 (for example `not_cancellable`)
    │   ├── PayloadTooLarge      413
    │   ├── Unprocessable        422 (validation, `unknown_sample_ids`, `test_split_samples`)
    │   └── ServerError          5xx
    ├── ServiceUnreachable       no answer at all (connection refused, timeout)
    ├── ChecksumMismatch         a downloaded checkpoint's sha256 differs from its ETag
    └── WaitTimeout              `wait_for_*` gave up before a final status
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict, cast
from urllib.parse import quote

import httpx

from app.vocab import FINAL_JOB_STATUSES, FINAL_REQUEST_STATUSES, JobStatus, RequestStatus, VerifyMode

#: The statuses a request or a job never leaves.
FINAL_STATUSES: frozenset[str] = FINAL_REQUEST_STATUSES | FINAL_JOB_STATUSES


class LetheClientError(Exception):
    """Base of every error this client raises."""

    code = "client_error"


class LetheAPIError(LetheClientError):
    """The service answered with an error (RFC 9457 problem+json)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.code = str(problem.get("code") or f"http_{status}")
        self.title = str(problem.get("title") or "")
        self.detail = str(problem.get("detail") or "")
        message = self.detail or self.title or f"HTTP {status}"
        super().__init__(f"{status} {self.code}: {message}")


class Unauthorized(LetheAPIError):
    """401: no API key, or one the service does not know (or has revoked)."""


class Forbidden(LetheAPIError):
    """403: the API key lacks the scope this operation needs."""


class NotFound(LetheAPIError):
    """404: no such model, version, request, job or dataset."""


class Conflict(LetheAPIError):
    """409: the resource is in a state that forbids the operation."""


class PayloadTooLarge(LetheAPIError):
    """413: the body or the ID list exceeds the service's limits."""


class Unprocessable(LetheAPIError):
    """422: validation failed (every offending field is listed in the problem)."""


class ServerError(LetheAPIError):
    """5xx: the service failed; the problem never carries a stack trace."""


class ServiceUnreachable(LetheClientError):
    """The service could not be reached at all."""

    code = "service_unreachable"


class ChecksumMismatch(LetheClientError):
    """A downloaded file's sha256 differs from the ETag the service sent."""

    code = "checksum_mismatch"


class WaitTimeout(LetheClientError):
    """A `wait_for_*` call reached its deadline before the resource became final."""

    code = "wait_timeout"


_BY_STATUS: dict[int, type[LetheAPIError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unprocessable,
}


# The resource types below list every member of the matching OpenAPI schema (named in each
# docstring) with its type; `tests/api/test_client_types.py` keeps the two equal. Statuses,
# kinds and phases are the `app.vocab` enums' values; JSON gives them as plain strings.


class DeletionRequest(TypedDict, total=False):
    """`GET /v1/deletion-requests/{id}` (schema `DeletionRequestPublic`)."""

    id: str
    model: str
    status: str
    sample_count: int
    already_forgotten_count: int
    subject_ref: str | None
    reason: str | None
    method: str
    verify: str
    callback_url: str | None
    job_id: str | None
    result_version: int | None
    verdict: dict[str, Any] | None
    metrics: dict[str, Any] | None
    error: dict[str, Any] | None
    subjects: dict[str, Any] | None
    group_id: str | None
    received_at: str
    started_at: str | None
    finished_at: str | None


class DeletionRequestGroup(TypedDict, total=False):
    """`GET /v1/deletion-request-groups/{id}` (schema `DeletionRequestGroupPublic`): a request
    that named several models, with each model's deletion request."""

    id: str
    models: list[str]
    status: str
    subject_ref: str | None
    requests: list[Any]
    received_at: str


class Job(TypedDict, total=False):
    """`GET /v1/jobs/{id}` (schema `JobPublic`)."""

    id: str
    kind: str
    model: str
    status: str
    phase: str
    progress: float
    step: int
    total_steps: int
    eta_seconds: float | None
    losses: dict[str, float]
    weights: dict[str, float]
    request_ids: list[str]
    method: str | None
    verify: str | None
    teacher_seed: int | None
    base_version: int | None
    result_version: int | None
    metrics: dict[str, Any] | None
    reference: dict[str, Any] | None
    gaps: dict[str, Any] | None
    verdict: dict[str, Any] | None
    error: dict[str, Any] | None
    worker: str | None
    attempts: int
    cancel_requested: bool
    fallback_of: str | None
    queued_at: str
    started_at: str | None
    heartbeat_at: str | None
    finished_at: str | None


class Model(TypedDict, total=False):
    """`GET /v1/models/{name}` (schema `ModelPublic`)."""

    name: str
    dataset: str | None
    architecture: str
    num_classes: int
    recipe: dict[str, Any]
    latest_version: int | None
    forgotten_count: int
    pending_requests: int
    policy: dict[str, Any]
    status: str
    description: dict[str, Any] | None
    error: dict[str, Any] | None
    succeeds: str | None
    created_at: str


class References(TypedDict, total=False):
    """`GET /v1/models/{name}/references` (schema `ReferencesPublic`)."""

    status: str
    k: int | None
    seconds: float | None
    train_seconds: float | None
    cost_ratio: float | None
    pool_size: int | None
    created_at: str | None
    finished_at: str | None
    job_id: str | None


class ModelVersion(TypedDict, total=False):
    """`GET /v1/models/{name}/versions/{n}` (schema `VersionPublic`)."""

    model: str
    version: int
    parent: int | None
    sha256: str
    size_bytes: int
    method: str | None
    job_id: str | None
    metrics: dict[str, Any] | None
    forgotten_count: int
    created_at: str


class Dataset(TypedDict, total=False):
    """`GET /v1/datasets/{name}` (schema `DatasetPublic`)."""

    name: str
    kind: str
    uri: str
    options: dict[str, Any]
    num_samples: int
    num_classes: int
    splits: dict[str, int]
    input_shape: list[int]
    fingerprint: str
    version_of: str | None
    created_at: str


class AuditVerification(TypedDict, total=False):
    """`GET /v1/audit/verify` (schema `ChainVerification`)."""

    ok: bool
    checked: int
    head_seq: int | None
    head_hash: str | None
    first_bad_seq: int | None


class Receipt(TypedDict, total=False):
    """`GET /v1/deletion-requests/{id}/receipt` (schema `ReceiptPublic`): a signed receipt.
    Check it with `lethe receipt verify` or the few lines of `docs/receipts.md`."""

    format: str
    issued_at: str
    summary: str
    issuer: dict[str, Any]
    request: dict[str, Any]
    model: dict[str, Any]
    forgotten_ids: dict[str, Any]
    versions: dict[str, Any]
    job: dict[str, Any]
    metrics: dict[str, Any]
    retrain_reference: dict[str, Any] | None
    forgetting_test: dict[str, Any]
    verdict: dict[str, Any]
    audit: dict[str, Any] | None
    signature: dict[str, Any]


class ReceiptKey(TypedDict, total=False):
    """One public key of `GET /v1/receipts/keys` (schema `ReceiptKeyPublic`)."""

    kid: str
    alg: str
    x: str
    created_at: str
    active: bool
    retired_at: str | None


#: Each resource type and the OpenAPI component schema it mirrors.
class Subject(TypedDict, total=False):
    """`GET /v1/datasets/{name}/subjects/{subject_id}` (schema `SubjectPublic`)."""

    dataset: str
    subject_id: str
    dataset_has_subjects: bool
    sample_count: int
    splits: dict[str, Any]


class OpendsrRequestStatus(TypedDict, total=False):
    """`GET /opendsr/v2/requests/{subject_request_id}` (schema `OpendsrStatusPublic`)."""

    controller_id: str
    expected_completion_time: str
    subject_request_id: str
    request_status: str
    api_version: str
    results_count: int | None
    deletion_requests: list[Any]


SCHEMAS: dict[str, type] = {
    "DeletionRequestPublic": DeletionRequest,
    "DeletionRequestGroupPublic": DeletionRequestGroup,
    "JobPublic": Job,
    "ModelPublic": Model,
    "VersionPublic": ModelVersion,
    "ReferencesPublic": References,
    "DatasetPublic": Dataset,
    "SubjectPublic": Subject,
    "OpendsrStatusPublic": OpendsrRequestStatus,
    "ChainVerification": AuditVerification,
    "ReceiptPublic": Receipt,
    "ReceiptKeyPublic": ReceiptKey,
}


class Download(TypedDict):
    """What `download_checkpoint` wrote."""

    path: str
    sha256: str
    etag: str
    size_bytes: int


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"title": response.reason_phrase, "detail": response.text[:500]}
    return body if isinstance(body, dict) else {"detail": str(body)[:500]}


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the `LetheAPIError` subclass that matches a non-2xx response."""
    if response.is_success:
        return
    status = response.status_code
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else LetheAPIError)
    raise cls(status, _problem(response))


class LetheClient:
    """Synchronous client for one Lethe service.

    `base_url` is the service root (for example `http://127.0.0.1:8000`); `api_key` goes into
    `Authorization: Bearer`. Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> LetheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    # -- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"{self.base_url}: {exc}") from exc
        raise_for_problem(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _paginate(self, path: str, params: dict[str, Any], limit: int | None) -> list[Any]:
        """Follow `next_cursor` until the list ends or `limit` items were collected."""
        items: list[Any] = []
        query = {k: v for k, v in params.items() if v is not None}
        cursor: str | None = None
        while True:
            page_params = dict(query)
            if cursor:
                page_params["cursor"] = cursor
            if limit is not None:
                page_params["limit"] = min(limit - len(items), 100)
            page = self._json("GET", path, params=page_params)
            items.extend(page.get("items", []))
            cursor = page.get("next_cursor")
            if not cursor or (limit is not None and len(items) >= limit):
                return items

    # -- operations -----------------------------------------------------------------------

    def healthz(self) -> bool:
        """True when `/healthz` answers 2xx."""
        try:
            return self._http.get("/healthz").is_success
        except httpx.TransportError:
            return False

    def readyz(self) -> dict[str, Any]:
        """`/readyz`: database and broker reachable, migrations at head; raises when not ready."""
        return cast(dict[str, Any], self._json("GET", "/readyz"))

    # deletion requests

    def create_deletion_request(
        self,
        model: str,
        sample_ids: list[str] | None = None,
        *,
        subject_ids: list[str] | None = None,
        subject_ref: str | None = None,
        reason: str | None = None,
        method: str | None = None,
        method_options: dict[str, Any] | None = None,
        verify: VerifyMode | str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> DeletionRequest:
        """`POST /v1/deletion-requests` naming samples, data subjects or both; returns the
        accepted request resource."""
        body: dict[str, Any] = {"model": model}
        optional = {
            "sample_ids": sample_ids,
            "subject_ids": subject_ids,
            "subject_ref": subject_ref,
            "reason": reason,
            "method": method,
            "method_options": method_options,
            "verify": verify,
            "callback_url": callback_url,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return cast(
            DeletionRequest,
            self._json("POST", "/v1/deletion-requests", json=body, headers=headers),
        )

    def get_deletion_request(self, request_id: str) -> DeletionRequest:
        """`GET /v1/deletion-requests/{id}`."""
        return cast(DeletionRequest, self._json("GET", f"/v1/deletion-requests/{request_id}"))

    def list_deletion_requests(
        self,
        *,
        model: str | None = None,
        status: RequestStatus | str | None = None,
        subject_ref: str | None = None,
        limit: int | None = 100,
    ) -> list[DeletionRequest]:
        """`GET /v1/deletion-requests`, following cursors up to `limit` items."""
        params = {"model": model, "status": status, "subject_ref": subject_ref}
        return cast(list[DeletionRequest], self._paginate("/v1/deletion-requests", params, limit))

    def cancel_deletion_request(self, request_id: str) -> DeletionRequest:
        """`POST /v1/deletion-requests/{id}/cancel`; `Conflict` once it is running."""
        return cast(
            DeletionRequest, self._json("POST", f"/v1/deletion-requests/{request_id}/cancel")
        )

    def wait_for_request(
        self,
        request_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        on_update: Callable[[DeletionRequest, Job | None], None] | None = None,
    ) -> DeletionRequest:
        """Poll a deletion request (and its job) until it is final; returns the final resource.

        `on_update(request, job)` is called after every poll, so a caller can draw progress.
        Raises `WaitTimeout` after `timeout` seconds (None waits forever).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            request = self.get_deletion_request(request_id)
            job_id = request.get("job_id")
            job = self.get_job(job_id) if job_id else None
            if on_update is not None:
                on_update(request, job)
            if request.get("status") in FINAL_STATUSES:
                return request
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"request {request_id} still {request.get('status')} after {timeout} s"
                )
            time.sleep(poll_interval)

    # jobs

    def get_receipt(self, request_id: str) -> Receipt:
        """`GET /v1/deletion-requests/{id}/receipt`: the signed receipt of a finished request."""
        return cast(Receipt, self._json("GET", f"/v1/deletion-requests/{request_id}/receipt"))

    def list_receipt_keys(self) -> list[ReceiptKey]:
        """`GET /v1/receipts/keys`: every public key that ever signed a receipt."""
        return cast(list[ReceiptKey], self._json("GET", "/v1/receipts/keys")["keys"])

    def get_job(self, job_id: str) -> Job:
        """`GET /v1/jobs/{id}`."""
        return cast(Job, self._json("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(
        self,
        *,
        model: str | None = None,
        status: JobStatus | str | None = None,
        limit: int | None = 100,
    ) -> list[Job]:
        """`GET /v1/jobs`, following cursors up to `limit` items."""
        params = {"model": model, "status": status}
        return cast(list[Job], self._paginate("/v1/jobs", params, limit))

    def cancel_job(self, job_id: str) -> Job:
        """`POST /v1/jobs/{id}/cancel`: cooperative; the worker stops at its next step."""
        return cast(Job, self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait_for_job(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll a job until it is final; same contract as `wait_for_request`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job.get("status") in FINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} still {job.get('status')} after {timeout} s")
            time.sleep(poll_interval)

    # datasets

    def register_dataset(
        self, name: str, kind: str, uri: str = "", options: dict[str, Any] | None = None,
        *, version_of: str | None = None,
    ) -> Dataset:
        """`POST /v1/datasets` (scope `admin`); `version_of`: the dataset this one is a later
        version of (its models' successors forget what they forgot)."""
        body: dict[str, Any] = {"name": name, "kind": kind, "uri": uri, "options": options or {}}
        if version_of is not None:
            body["version_of"] = version_of
        return cast(Dataset, self._json("POST", "/v1/datasets", json=body))

    def get_dataset(self, name: str) -> Dataset:
        """`GET /v1/datasets/{name}`."""
        return cast(Dataset, self._json("GET", f"/v1/datasets/{name}"))

    def forget_everywhere(
        self,
        subject_ids: list[str],
        *,
        models: list[str] | None = None,
        subject_ref: str | None = None,
        idempotency_key: str | None = None,
    ) -> DeletionRequestGroup:
        """`POST /v1/deletion-requests` for data subjects in several models: those listed, or
        (default) every model whose dataset holds them; returns the group resource."""
        body: dict[str, Any] = {"subject_ids": subject_ids}
        body.update({"models": models} if models is not None else {"model": "*"})
        if subject_ref is not None:
            body["subject_ref"] = subject_ref
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return cast(
            DeletionRequestGroup, self._json("POST", "/v1/deletion-requests", json=body, headers=headers)
        )

    def get_deletion_request_group(self, group_id: str) -> DeletionRequestGroup:
        """`GET /v1/deletion-request-groups/{id}`."""
        return cast(DeletionRequestGroup, self._json("GET", f"/v1/deletion-request-groups/{group_id}"))

    def get_subject(self, dataset: str, subject_id: str) -> Subject:
        """`GET /v1/datasets/{name}/subjects/{subject_id}`: the subject's samples per split."""
        path = f"/v1/datasets/{dataset}/subjects/{quote(subject_id, safe='')}"
        return cast(Subject, self._json("GET", path))

    def get_opendsr_request(self, subject_request_id: str) -> OpendsrRequestStatus:
        """`GET /opendsr/v2/requests/{id}` (scope `opendsr`): the OpenDSR status and the
        deletion request of each model (the signature headers are not checked here; see
        `docs/opendsr_client.py` for a controller that checks them)."""
        path = f"/opendsr/v2/requests/{subject_request_id}"
        return cast(OpendsrRequestStatus, self._json("GET", path))

    def list_samples(
        self,
        dataset: str,
        *,
        split: str | None = None,
        label: int | None = None,
        limit: int | None = 1000,
    ) -> list[dict[str, Any]]:
        """`GET /v1/datasets/{name}/samples`: `sample_id, split, label` rows."""
        params = {"split": split, "label": label}
        return self._paginate(f"/v1/datasets/{dataset}/samples", params, limit)

    # models and versions

    def register_model(
        self,
        name: str,
        *,
        dataset: str,
        architecture: str,
        num_classes: int,
        recipe: dict[str, Any],
        **extra: Any,
    ) -> dict[str, Any]:
        """`POST /v1/models` with `init: "train"`: 202 and the train job in the answer."""
        body: dict[str, Any] = {
            "name": name,
            "dataset": dataset,
            "architecture": architecture,
            "num_classes": num_classes,
            "recipe": recipe,
            "init": "train",
        }
        body.update(extra)
        return cast(dict[str, Any], self._json("POST", "/v1/models", json=body))

    def upload_model(
        self,
        name: str,
        checkpoint: str | Path,
        *,
        dataset: str,
        architecture: str,
        num_classes: int,
        recipe: dict[str, Any] | None = None,
        **metadata: Any,
    ) -> dict[str, Any]:
        """`POST /v1/models` as a multipart upload of a safetensors file: 201 with version 1
        for a built-in architecture; 202 with `job_id` (an `import` job) for `timm:<name>` or
        `torchvision:<name>`. `metadata` adds members such as `input_size`, `preprocessing`,
        `policy`, `succeeds`."""
        meta: dict[str, Any] = {"name": name, "dataset": dataset, "architecture": architecture,
                                "num_classes": num_classes, **metadata}
        if recipe is not None:
            meta["recipe"] = recipe
        with Path(checkpoint).open("rb") as f:
            files = {"checkpoint": (Path(checkpoint).name, f, "application/octet-stream")}
            return cast(dict[str, Any], self._json(
                "POST", "/v1/models", data={"metadata": json.dumps(meta)}, files=files,
            ))

    def get_model(self, name: str) -> Model:
        """`GET /v1/models/{name}`."""
        return cast(Model, self._json("GET", f"/v1/models/{name}"))

    def get_references(self, name: str) -> References:
        """`GET /v1/models/{name}/references`."""
        return cast(References, self._json("GET", f"/v1/models/{name}/references"))

    def list_models(self, *, limit: int | None = 100) -> list[Model]:
        """`GET /v1/models`."""
        return cast(list[Model], self._paginate("/v1/models", {}, limit))

    def list_versions(self, model: str, *, limit: int | None = 100) -> list[ModelVersion]:
        """`GET /v1/models/{name}/versions`."""
        return cast(list[ModelVersion], self._paginate(f"/v1/models/{model}/versions", {}, limit))

    def get_version(self, model: str, version: int | str = "latest") -> ModelVersion:
        """`GET /v1/models/{name}/versions/{n}` (`n` may be `latest`)."""
        return cast(ModelVersion, self._json("GET", f"/v1/models/{model}/versions/{version}"))

    def get_manifest(self, model: str, version: int | str = "latest") -> dict[str, Any]:
        """`GET /v1/models/{name}/versions/{n}/manifest`."""
        return cast(
            dict[str, Any], self._json("GET", f"/v1/models/{model}/versions/{version}/manifest")
        )

    def download_checkpoint(
        self,
        model: str,
        version: int | str = "latest",
        dest: str | os.PathLike[str] | None = None,
        *,
        on_chunk: Callable[[int, int | None], None] | None = None,
    ) -> Download:
        """Stream a checkpoint to `dest` and check its sha256 against the strong ETag.

        `dest` defaults to the server's file name in the current directory; a directory
        (an existing one, or a path ending in `/`) receives that name. The file appears only
        once complete and verified (written to a temporary name, then renamed); on a
        mismatch it is removed and `ChecksumMismatch` raised. `on_chunk(bytes_so_far,
        total)` reports progress.
        """
        path = f"/v1/models/{model}/versions/{version}/checkpoint"
        try:
            with self._http.stream("GET", path) as response:
                if not response.is_success:
                    response.read()
                    raise_for_problem(response)
                etag = response.headers.get("ETag", "").strip().strip('"')
                target = _download_target(response, model, version, dest)
                total = (
                    int(response.headers["Content-Length"])
                    if "Content-Length" in (response.headers)
                    else None
                )
                digest = hashlib.sha256()
                size = 0
                partial = target.with_name(f".{target.name}.part")
                try:
                    with partial.open("wb") as out:
                        for chunk in response.iter_bytes(1 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                            if on_chunk is not None:
                                on_chunk(size, total)
                        out.flush()
                        os.fsync(out.fileno())
                except BaseException:
                    partial.unlink(missing_ok=True)  # never leave half a checkpoint behind
                    raise
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"{self.base_url}: {exc}") from exc
        sha = digest.hexdigest()
        if etag and sha != etag:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(f"downloaded sha256 {sha} differs from ETag {etag}")
        os.replace(partial, target)
        return {"path": str(target), "sha256": sha, "etag": etag, "size_bytes": size}

    # audit

    def verify_audit(self) -> AuditVerification:
        """`GET /v1/audit/verify`: re-walk the hash chain."""
        return cast(AuditVerification, self._json("GET", "/v1/audit/verify"))

    def list_audit(
        self,
        *,
        model: str | None = None,
        request_id: str | None = None,
        action: str | None = None,
        since: str | None = None,
        limit: int | None = 1000,
    ) -> list[dict[str, Any]]:
        """`GET /v1/audit` events, following cursors up to `limit`."""
        params = {"model": model, "request_id": request_id, "action": action, "since": since}
        return self._paginate("/v1/audit", params, limit)

    def export_audit(self) -> Iterator[dict[str, Any]]:
        """`GET /v1/audit/export`: the whole log, one event per JSON Lines row, streamed."""
        import json

        try:
            with self._http.stream("GET", "/v1/audit/export") as response:
                if not response.is_success:
                    response.read()
                    raise_for_problem(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield cast(dict[str, Any], json.loads(line))
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"{self.base_url}: {exc}") from exc


def _download_target(
    response: httpx.Response,
    model: str,
    version: int | str,
    dest: str | os.PathLike[str] | None,
) -> Path:
    """Where a download goes: `dest`, or the server's file name (inside `dest` if a folder)."""
    name = f"{model}-v{version}.safetensors"
    disposition = response.headers.get("Content-Disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            # Only a bare file name is honoured: a server cannot steer the write elsewhere.
            name = Path(value.strip('"')).name or name
    if dest is None:
        return Path.cwd() / name
    target = Path(dest)
    if str(dest).endswith(("/", os.sep)):
        target.mkdir(parents=True, exist_ok=True)
    return target / name if target.is_dir() else target
