"""The service's shared names, defined once: statuses, job kinds and phases, scopes, verify modes.

Every module that stores, compares or declares one of these imports it from here; the OpenAPI
document declares them as enums from the same classes. They are `StrEnum`s, so a member *is*
its string: it goes into the database, JSON and comparisons as the plain value.
"""

from __future__ import annotations

from enum import StrEnum


class RequestStatus(StrEnum):
    """A deletion request's life: accepted → queued → running → one final status."""

    ACCEPTED = "accepted"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_REQUEST_STATUSES


class JobStatus(StrEnum):
    """A job's life: queued → running → one final status."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_JOB_STATUSES


FINAL_REQUEST_STATUSES = frozenset(
    {RequestStatus.SUCCEEDED, RequestStatus.FAILED, RequestStatus.CANCELLED}
)
FINAL_JOB_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
#: A request that still waits for its job (it may still change, be cancelled or be coalesced).
OPEN_REQUEST_STATUSES = frozenset(
    {RequestStatus.ACCEPTED, RequestStatus.QUEUED, RequestStatus.RUNNING}
)
#: A job that holds its place in the model's line (later jobs of the model wait for it).
ACTIVE_JOB_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class JobKind(StrEnum):
    """What a job does: unlearn (a deletion), train (v1 from a recipe), retrain (exact
    unlearning from the recipe), reference (the reference statistics of a model), import (load
    an uploaded checkpoint of a library architecture strictly on a worker)."""

    UNLEARN = "unlearn"
    TRAIN = "train"
    RETRAIN = "retrain"
    REFERENCE = "reference"
    IMPORT = "import"


class ModelStatus(StrEnum):
    """A model's registration: `ready` once it can take deletion requests (a trained model is
    ready at once, its train job first in its line); an upload of a library architecture is
    `importing` while its `import` job checks it on a worker, then `ready` with version 1, or
    `failed` with the job's problem (nothing published; it takes no deletion requests)."""

    READY = "ready"
    IMPORTING = "importing"
    FAILED = "failed"


class ReferenceStatus(StrEnum):
    """A model's reference statistics: their job's status until they are stored (`ready`);
    `none` when no reference job was ever scheduled for the model (references were off)."""

    NONE = "none"
    QUEUED = "queued"
    RUNNING = "running"
    READY = "ready"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobPhase(StrEnum):
    QUEUED = "queued"
    LOADING = "loading"
    TRAINING = "training"
    UNLEARNING = "unlearning"
    VERIFYING = "verifying"
    PUBLISHING = "publishing"
    DONE = "done"


class Scope(StrEnum):
    """API key scopes (API.md, Auth)."""

    DELETIONS_WRITE = "deletions:write"
    DELETIONS_READ = "deletions:read"
    MODELS_READ = "models:read"
    MODELS_DOWNLOAD = "models:download"
    MODELS_WRITE = "models:write"
    AUDIT_READ = "audit:read"
    ADMIN = "admin"
    OPENDSR = "opendsr"


class VerifyMode(StrEnum):
    """How a job's result is verified: `standard` evidence, or also against a retrained model."""

    STANDARD = "standard"
    RETRAIN = "retrain"


class Split(StrEnum):
    """Where a sample sits. `test` is the held-out split as datasets declare it; Lethe divides
    it into `calibration` (methods may read it) and `audit` (only metrics, verdicts, receipts)."""

    TRAIN = "train"
    TEST = "test"
    CALIBRATION = "calibration"
    AUDIT = "audit"


class OpendsrStatus(StrEnum):
    """An OpenDSR request's status (OpenDSR specification §8), derived from its deletion
    requests (`app.services.opendsr_status`)."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class OpendsrRequestType(StrEnum):
    """OpenDSR subject request types (§6.2); Lethe fulfils `erasure` only."""

    ACCESS = "access"
    PORTABILITY = "portability"
    ERASURE = "erasure"
