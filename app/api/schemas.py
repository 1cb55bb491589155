"""Request and response schemas (the OpenAPI document is generated from these)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.errors import PROBLEM_JSON

#: Printable IDs only: no control characters (PostgreSQL text cannot hold NUL).
SampleId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class DeletionRequestCreate(_Strict):
    """Body of `POST /v1/deletion-requests`."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    sample_ids: list[SampleId] = Field(min_length=1)
    subject_ref: Annotated[str, StringConstraints(max_length=200)] | None = None
    reason: Annotated[str, StringConstraints(max_length=2000)] | None = None
    method: Annotated[str, StringConstraints(min_length=1, max_length=60)] = "feature_constraint"
    method_options: dict[str, Any] = Field(default_factory=dict)
    verify: Literal["standard", "retrain"] = "standard"
    callback_url: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None


class DeletionRequestPublic(_Open):
    """A deletion request."""

    id: str
    model: str
    status: Literal["accepted", "queued", "running", "succeeded", "failed", "cancelled"]
    sample_count: int
    already_forgotten_count: int
    subject_ref: str | None
    reason: str | None
    method: str
    verify: str
    job_id: str | None
    result_version: int | None
    verdict: dict[str, Any] | None
    metrics: dict[str, Any] | None
    error: dict[str, Any] | None
    received_at: str
    started_at: str | None
    finished_at: str | None


class DeletionRequestList(BaseModel):
    """A page of deletion requests."""

    items: list[DeletionRequestPublic]
    next_cursor: str | None


class JobPublic(_Open):
    """A job."""

    id: str
    kind: Literal["unlearn", "train", "retrain"]
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    phase: str
    progress: float
    step: int
    total_steps: int
    eta_seconds: float | None
    losses: dict[str, float]
    weights: dict[str, float]
    request_ids: list[str]
    base_version: int | None
    result_version: int | None
    metrics: dict[str, Any] | None
    verdict: dict[str, Any] | None
    error: dict[str, Any] | None
    worker: str | None
    attempts: int
    queued_at: str
    started_at: str | None
    heartbeat_at: str | None
    finished_at: str | None


class JobList(BaseModel):
    """A page of jobs."""

    items: list[JobPublic]
    next_cursor: str | None


class DatasetCreate(_Strict):
    """Body of `POST /v1/datasets`."""

    name: Name
    kind: Annotated[str, StringConstraints(min_length=1, max_length=40)]
    uri: Annotated[str, StringConstraints(max_length=4000)] = ""
    options: dict[str, Any] = Field(default_factory=dict)


class DatasetPublic(_Open):
    """A dataset."""

    name: str
    kind: str
    num_samples: int
    num_classes: int
    splits: dict[str, int]
    created_at: str


class DatasetList(BaseModel):
    """A page of datasets."""

    items: list[DatasetPublic]
    next_cursor: str | None


class SamplePublic(BaseModel):
    """One sample of a dataset's index."""

    sample_id: str
    split: str
    label: int


class SampleList(BaseModel):
    """A page of samples."""

    items: list[SamplePublic]
    next_cursor: str | None


class Recipe(_Strict):
    """How a model is (re)trained from scratch."""

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.05, gt=0, le=10)
    epochs: int = Field(default=8, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=1, le=65536)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class ModelCreate(_Strict):
    """Body of `POST /v1/models` (JSON, `init: "train"`; or the `metadata` part of an upload)."""

    name: Name
    dataset: Name
    architecture: Annotated[str, StringConstraints(min_length=1, max_length=60)]
    num_classes: int = Field(ge=2, le=100000)
    recipe: Recipe = Field(default_factory=Recipe)
    policy: dict[str, Any] | None = None
    init: Literal["train", "upload"] | None = None


class ModelPublic(_Open):
    """A model."""

    name: str
    dataset: str | None
    architecture: str
    num_classes: int
    latest_version: int | None
    forgotten_count: int
    pending_requests: int
    policy: dict[str, Any]
    created_at: str


class ModelList(BaseModel):
    """A page of models."""

    items: list[ModelPublic]
    next_cursor: str | None


class VersionPublic(_Open):
    """A published model version."""

    version: int
    parent: int | None
    sha256: str
    size_bytes: int
    method: str | None
    job_id: str | None
    metrics: dict[str, Any] | None
    forgotten_count: int
    created_at: str


class VersionList(BaseModel):
    """A page of versions."""

    items: list[VersionPublic]
    next_cursor: str | None


class AuditEventPublic(BaseModel):
    """One audit event."""

    seq: int
    at: str
    actor: str
    action: str
    subject: str
    model: str | None
    request_id: str | None
    data: dict[str, Any]
    prev_hash: str
    hash: str


class AuditList(BaseModel):
    """A page of audit events."""

    items: list[AuditEventPublic]
    next_cursor: str | None


class ChainVerification(BaseModel):
    """The result of re-verifying the audit chain."""

    ok: bool
    checked: int
    head_seq: int | None
    head_hash: str | None
    first_bad_seq: int | None


class Problem(_Open):
    """An RFC 9457 problem document (`application/problem+json`); codes add their own members,
    e.g. `errors` (every offending field) or `sample_ids` and `count`."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None


class Health(BaseModel):
    """`GET /healthz`: the process is alive."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """`GET /readyz`: 200 when every check passes, 503 (same body) when one fails."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, bool]


def problem_response(description: str) -> dict[str, Any]:
    """An OpenAPI response entry served as problem+json (errors are never plain JSON)."""
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: problem_response(description)
    for code, description in (
        (400, "Bad request"),
        (401, "Missing or invalid API key"),
        (403, "The API key lacks the required scope"),
        (404, "Not found"),
        (409, "Conflict"),
        (413, "Payload too large"),
        (422, "Invalid input; validation errors list every offending field"),
    )
}
