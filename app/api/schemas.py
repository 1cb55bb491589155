"""Request and response schemas (the OpenAPI document is generated from these)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails

from app.errors import PROBLEM_JSON
from app.services.deletion_groups import MAX_MODELS
from app.services.subjects import MAX_SUBJECTS_PER_REQUEST
from app.vocab import (
    JobKind,
    JobPhase,
    JobStatus,
    ModelStatus,
    OpendsrRequestType,
    OpendsrStatus,
    ReferenceStatus,
    RequestStatus,
    VerifyMode,
)
from engine.arch_shapes import ARCHITECTURES
from engine.catalog import DEFAULT_METHOD, METHOD_NAMES, METHODS, OPTIMIZERS
from engine.datasets import ADAPTERS
from engine.model_desc import CROPS, INTERPOLATIONS

#: Printable IDs only: no control characters (PostgreSQL text cannot hold NUL).
SampleId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
SubjectId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]

# Closed sets read from their sources (the method catalog, the dataset adapters, the
# architectures, the training optimizers): pydantic validates them as Literals and the
# OpenAPI document declares them as enums.
if TYPE_CHECKING:
    MethodName = str
    DatasetKind = str
    Architecture = str
    Optimizer = str
    Crop = str
    Interpolation = str
else:
    MethodName = Literal[METHOD_NAMES]
    DatasetKind = Literal[tuple(ADAPTERS)]
    Architecture = Literal[ARCHITECTURES]
    Optimizer = Literal[OPTIMIZERS]
    Crop = Literal[CROPS]
    Interpolation = Literal[INTERPOLATIONS]

#: `library:name` of a library classifier; the name is checked against the installed
#: library's model list at registration (422 `unsupported_architecture` when it has none).
LibraryArchitecture = Annotated[
    str,
    StringConstraints(pattern=r"^(timm|torchvision):[A-Za-z0-9_.-]{1,100}$"),
    Field(description="`timm:<name>` or `torchvision:<name>`, e.g. `timm:resnet50`; a name the "
          "installed library does not build as a classifier is 422 `unsupported_architecture`"),
]
#: Images are read as grayscale (1) or RGB (3).
Channels = Literal[1, 3]
Side = Annotated[int, Field(ge=1, le=8192)]

_RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"
)


def _rfc3339(value: Any) -> Any:
    """Only an RFC 3339 date-time with an offset (pydantic alone also takes `0.5` as a Unix
    time, which the document's `format: date-time` does not allow)."""
    if isinstance(value, str) and _RFC3339.match(value.upper()):
        return value.upper()
    raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-01-31T12:00:00Z")


#: A timestamp in a query (`since`): RFC 3339, validated.
Timestamp = Annotated[datetime, BeforeValidator(_rfc3339)]

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_URI_TAIL = r"(:[0-9]{1,5})?([/?#][A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]*)?$"
#: `callback_url` in production: https only.
CALLBACK_PATTERN_HTTPS = r"^https://[A-Za-z0-9.-]+" + _URI_TAIL
#: `callback_url` in development: https, or plain http to a loopback host.
CALLBACK_PATTERN_DEVELOPMENT = (
    r"^(https://[A-Za-z0-9.-]+|http://(localhost|127\." + _OCTET + r"\." + _OCTET + r"\." + _OCTET
    + r"|\[::1\]))" + _URI_TAIL
)
CALLBACK_DESCRIPTION = (
    "Where the final request resource is POSTed, signed. https; plain http only to a loopback "
    "host (localhost, 127.0.0.0/8, [::1]) and only on a deployment in development."
)
CallbackUrl = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2000, pattern=CALLBACK_PATTERN_DEVELOPMENT),
    Field(json_schema_extra={"format": "uri"}),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def _method_variants(schema: dict[str, Any]) -> None:
    """`method_options` per `method`, from the catalog: one variant per method (the default
    method's variant also covers a body without `method`)."""
    variants = []
    for name, spec in METHODS.items():
        variant: dict[str, Any] = {
            "title": name,
            "properties": {"method": {"const": name}, "method_options": spec.json_schema()},
        }
        if name != DEFAULT_METHOD:
            variant["required"] = ["method"]
        variants.append(variant)
    schema["oneOf"] = variants


def _request_variants(schema: dict[str, Any]) -> None:
    """The method variants, and: a request names samples, subjects, or both; and one model
    (`model`, a name or `*`) or several (`models`)."""
    _method_variants(schema)
    schema["allOf"] = [
        {"anyOf": [_present(name, "array") for name in ("sample_ids", "subject_ids")]},
        {"oneOf": [_present("model", "string"), _present("models", "array")]},
    ]


def _present(name: str, json_type: str) -> dict[str, Any]:
    return {"required": [name], "properties": {name: {"type": json_type}}}


class DeletionRequestCreate(_Strict):
    """Body of `POST /v1/deletion-requests`: `sample_ids`, `subject_ids` (data subjects,
    resolved at intake to their training samples), or both. `method_options` are the chosen
    method's options (each variant of `oneOf` lists one method's, with types, defaults and
    bounds)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_request_variants)

    model: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = Field(
        default=None, description="The model; `*`: every model whose dataset holds the named data"
    )
    models: list[Name] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MODELS,
        json_schema_extra={"uniqueItems": True},
        description="Several models: one deletion request each, reported together as a group",
    )
    sample_ids: list[SampleId] | None = Field(
        default=None, min_length=1, json_schema_extra={"uniqueItems": True}
    )
    subject_ids: list[SubjectId] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SUBJECTS_PER_REQUEST,
        json_schema_extra={"uniqueItems": True},
        description="Data subjects whose training samples the model forgets",
    )
    subject_ref: Annotated[str, StringConstraints(max_length=200)] | None = None
    reason: Annotated[str, StringConstraints(max_length=2000)] | None = None
    method: MethodName = DEFAULT_METHOD
    method_options: dict[str, Any] = Field(default_factory=dict)
    verify: VerifyMode = VerifyMode.STANDARD
    callback_url: CallbackUrl | None = Field(default=None, description=CALLBACK_DESCRIPTION)

    @model_validator(mode="wrap")
    @classmethod
    def _a_model_is_named(cls, data: Any, handler: Any) -> Any:
        """A body naming neither `model` nor `models` lists `model` as missing, beside every
        other offending field (validation errors name them all)."""
        unnamed = isinstance(data, dict) and data.get("model") is None and data.get("models") is None
        missing = InitErrorDetails(type="missing", loc=("model",), input=data)
        try:
            value = handler(data)
        except ValidationError as exc:
            if not unnamed:
                raise
            found = [_detail(e) for e in exc.errors()]
            raise ValidationError.from_exception_data(cls.__name__, [*found, missing]) from None
        if unnamed:
            raise ValidationError.from_exception_data(cls.__name__, [missing])
        return value


def _detail(error: Any) -> InitErrorDetails:
    """A reported validation error as pydantic takes it back (`from_exception_data`)."""
    detail = InitErrorDetails(type=error["type"], loc=error["loc"], input=error.get("input"))
    if "ctx" in error:
        detail["ctx"] = error["ctx"]
    return detail


class SubjectResolution(BaseModel):
    """How a request's `subject_ids` resolved at intake: counts and digests (sha256 over the
    sorted values joined by newlines) only, never the subject IDs."""

    subject_count: int
    subjects_without_samples: int
    resolved_sample_count: int
    resolved_only_count: int
    subject_hashes_sha256: str
    resolved_sample_ids_sha256: str


class SubjectPublic(BaseModel):
    """A data subject's samples in a dataset (subject IDs are stored hashed)."""

    dataset: str
    subject_id: str
    dataset_has_subjects: bool
    sample_count: int
    splits: dict[str, int]


class DeletionRequestPublic(_Open):
    """A deletion request."""

    id: str
    model: str
    status: RequestStatus
    sample_count: int
    already_forgotten_count: int
    subject_ref: str | None
    reason: str | None
    method: MethodName
    verify: VerifyMode
    callback_url: str | None
    job_id: str | None
    result_version: int | None
    verdict: dict[str, Any] | None
    metrics: dict[str, Any] | None
    error: dict[str, Any] | None
    subjects: SubjectResolution | None = None
    #: The group of a request that named several models (`/v1/deletion-request-groups/{id}`).
    group_id: str | None = None
    received_at: str
    started_at: str | None
    finished_at: str | None


class DeletionRequestGroupPublic(BaseModel):
    """A request that named several models: one deletion request per model it reached, and
    their summed status."""

    id: str
    models: list[str]
    status: RequestStatus
    subject_ref: str | None
    requests: list[DeletionRequestPublic]
    received_at: str


class DeletionRequestList(BaseModel):
    """A page of deletion requests."""

    items: list[DeletionRequestPublic]
    next_cursor: str | None


class JobPublic(_Open):
    """A job."""

    id: str
    kind: JobKind
    model: str
    status: JobStatus
    phase: JobPhase
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


class JobList(BaseModel):
    """A page of jobs."""

    items: list[JobPublic]
    next_cursor: str | None


class DatasetCreate(_Strict):
    """Body of `POST /v1/datasets`."""

    name: Name
    kind: DatasetKind
    uri: Annotated[str, StringConstraints(max_length=4000)] = ""
    options: dict[str, Any] = Field(default_factory=dict)
    version_of: Name | None = Field(
        default=None,
        description="The dataset this one is a later version of: data subjects hash alike in "
        "both, so a model trained on this one can continue a lineage (`succeeds`) and forget "
        "what it forgot")


class DatasetPublic(_Open):
    """A dataset."""

    name: str
    kind: DatasetKind
    uri: str
    options: dict[str, Any]
    num_samples: int
    num_classes: int
    splits: dict[str, int]
    input_shape: list[int]
    fingerprint: str
    version_of: str | None = None
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

    optimizer: Optimizer = "sgd"
    lr: float = Field(default=0.05, gt=0, le=10)
    epochs: int = Field(default=8, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=1, le=65536)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


_Threshold = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Policy(_Strict):
    """A model's verification policy: the thresholds a job's evidence must meet to publish
    (null switches a check off; omitted keys keep their defaults), the forgetting test's
    significance level and minimal effect, whether deletions wait for the model's reference
    statistics, and the fallback method. Every check allows for sampling error."""

    max_acc_test_drop: _Threshold | None = None
    max_acc_forget: _Threshold | None = None
    max_gap: _Threshold | None = None
    max_avg_gap: _Threshold | None = None
    min_acc_test: _Threshold | None = None
    alpha: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = Field(
        default=0.05, description="Significance level of the per-sample forgetting test.")
    min_flag_effect: _Threshold | None = Field(
        default=0.1, description="The forget set's flag rate must exceed the never-trained "
        "controls' by at least this (and significantly) to fail; null: any significant excess.")
    wait_for_references: bool = Field(
        default=False, description="Deletion jobs wait for the model's reference statistics "
        "instead of publishing with 'forgetting not tested: references pending'.")
    fallback_method: MethodName | None = None


class ModelCreate(_Strict):
    """What registering a model names: the JSON body's members or the upload's `metadata`."""

    name: Name
    dataset: Name
    architecture: Architecture
    num_classes: int = Field(ge=2, le=100000)
    recipe: Recipe = Field(default_factory=Recipe)
    policy: Policy | None = None
    succeeds: Name | None = Field(
        default=None,
        description="The model whose lineage this one continues (trained on a later version "
        "of its dataset): every sample and data subject that lineage forgot, or was asked to "
        "forget, is forgotten by this one too, by a deletion request queued at registration")

    def policy_overrides(self) -> dict[str, Any] | None:
        """The policy keys the caller set (the rest keep the defaults)."""
        return None if self.policy is None else self.policy.model_dump(exclude_unset=True)


class ModelTrainCreate(ModelCreate):
    """JSON body of `POST /v1/models`: version 1 comes from a train job (202)."""

    init: Literal["train"]


_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Unit = Annotated[float, Field(allow_inf_nan=False)]


class Preprocessing(_Strict):
    """How an image file becomes the model's input (omitted members: the library's defaults).

    `crop: "center"` resizes the shorter side to `resize` pixels, then takes the centre
    `input_size` crop (timm's and torchvision's evaluation transform); `crop: "squash"`
    resizes straight to `input_size`. Then `(x / 255 - mean) / std` per channel."""

    mean: list[_Unit] | None = Field(default=None, min_length=1, max_length=3)
    std: list[_Positive] | None = Field(default=None, min_length=1, max_length=3)
    resize: int | None = Field(default=None, ge=1, le=8192)
    crop: Crop | None = None
    interpolation: Interpolation | None = None


class ModelUploadMetadata(ModelCreate):
    """The `metadata` part of a multipart `POST /v1/models`: version 1 is the uploaded file
    (a built-in, 201), or the file once an `import` job has loaded it strictly on a worker (a
    library architecture, 202). `input_size` and `preprocessing` apply to library
    architectures only (422 `invalid_input`, field `input_size`, for a built-in); omitted, they
    come from the library's own configuration."""

    architecture: Architecture | LibraryArchitecture
    input_size: tuple[Channels, Side, Side] | None = Field(
        default=None, description="[C, H, W]: C is 1 (grayscale) or 3 (RGB)"
    )
    preprocessing: Preprocessing | None = Field(
        default=None,
        description="`mean` and `std` hold one value per channel of `input_size` (or one for "
        "all), and as many values each (422 `invalid_input`, field `preprocessing`)",
    )
    init: Literal["upload"] | None = None

    def description_overrides(self) -> dict[str, Any]:
        """The input description the caller gave (the import job adds the library's defaults)."""
        given: dict[str, Any] = {}
        if self.input_size is not None:
            given["input_size"] = list(self.input_size)
        if self.preprocessing is not None:
            prep = self.preprocessing.model_dump(exclude_none=True)
            if prep:
                given["preprocessing"] = prep
        return given


class ModelPublic(_Open):
    """A model."""

    name: str
    dataset: str | None
    architecture: str
    num_classes: int
    recipe: dict[str, Any]
    latest_version: int | None
    forgotten_count: int
    pending_requests: int
    policy: dict[str, Any]
    status: ModelStatus = Field(
        description="`ready`; `importing` while the upload's `import` job runs; `failed` after "
        "a failed import (see `error`; the model takes no deletion requests)"
    )
    description: dict[str, Any] | None = Field(
        description="Library architectures: `input_size`, `in_chans` and `preprocessing` (as "
        "given until the import job completes them with the library's defaults)"
    )
    error: dict[str, Any] | None = Field(description="A failed import's `{code, message}`")
    succeeds: str | None = Field(default=None, description="The model whose lineage this one continues")
    created_at: str


class ModelList(BaseModel):
    """A page of models."""

    items: list[ModelPublic]
    next_cursor: str | None


class ReferencesPublic(BaseModel):
    """A model's reference statistics: status, K and cost (DESIGN.md §2a)."""

    status: ReferenceStatus = Field(
        description="`ready` once stored; before that, the reference job's status"
    )
    k: int | None = Field(description="How many reference models were (or will be) trained")
    seconds: float | None = Field(description="Wall seconds of the K reference trainings")
    train_seconds: float | None = Field(
        description="Seconds of the model's own version-1 training (None for an upload)"
    )
    cost_ratio: float | None = Field(description="seconds / train_seconds, when both are known")
    pool_size: int | None = Field(description="Training samples the references were drawn from")
    created_at: str | None
    finished_at: str | None
    job_id: str | None = Field(description="The `reference` job computing them")


class VersionPublic(_Open):
    """A published model version."""

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


def link(method: str, path: str, description: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link to the operation `method path`, its parameters given as runtime
    expressions (`$response.body#/id`) or constants; clients and fuzzers follow these from
    one resource to the next."""
    pointer = path.replace("~", "~0").replace("/", "~1")
    return {
        "operationRef": f"#/paths/{pointer}/{method.lower()}",
        "description": description,
        "parameters": parameters,
    }


# -- OpenDSR (processor side; field names are the OpenDSR specification's) -------------------

#: OpenDSR GUIDs are lowercase UUID v4 (specification §1.1).
UUID4_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


class OpendsrIdentity(BaseModel):
    """An identity of the data subject (specification §5.3)."""

    identity_type: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    identity_value: SubjectId
    identity_format: Literal["raw", "sha1", "md5", "sha256"]


class OpendsrRequestCreate(BaseModel):
    """Body of `POST /opendsr/v2/requests` (specification §7.1). Identities map to subjects by
    the configured rule; `extensions[<processor domain>].property_id` names the model (or
    `*`, the default: every model whose dataset knows the subject)."""

    subject_request_id: Annotated[str, StringConstraints(pattern=UUID4_PATTERN)]
    subject_request_type: OpendsrRequestType
    regulation: Literal["gdpr", "ccpa"]
    submitted_time: Timestamp
    subject_identities: list[OpendsrIdentity] = Field(min_length=1, max_length=100)
    api_version: Annotated[str, StringConstraints(max_length=20)] | None = None
    status_callback_urls: list[CallbackUrl] = Field(default_factory=list, max_length=10)
    extensions: dict[str, dict[str, Any]] = Field(default_factory=dict)


class OpendsrCreated(BaseModel):
    """The 201 answer to an OpenDSR request (specification §7.3)."""

    controller_id: str
    expected_completion_time: str
    received_time: str
    encoded_request: str
    subject_request_id: str
    api_version: str
    processor_signature: str


class OpendsrFulfilment(BaseModel):
    """The deletion request that fulfils an OpenDSR request for one model."""

    id: str
    model: str
    status: RequestStatus
    sample_count: int
    result_version: int | None


class OpendsrStatusPublic(BaseModel):
    """An OpenDSR request's status (specification §8.3), with each model's deletion request."""

    controller_id: str
    expected_completion_time: str
    subject_request_id: str
    request_status: OpendsrStatus
    api_version: str
    results_count: int | None = None
    deletion_requests: list[OpendsrFulfilment]


class OpendsrCancelled(BaseModel):
    """The 202 answer to a cancellation (specification §9.2)."""

    controller_id: str
    subject_request_id: str
    received_time: str
    api_version: str
    processor_signature: str


class OpendsrSupportedIdentity(BaseModel):
    identity_type: str
    identity_format: str


class OpendsrDiscovery(BaseModel):
    """The discovery document (specification §6.3)."""

    api_version: str
    supported_identities: list[OpendsrSupportedIdentity]
    supported_subject_request_types: list[OpendsrRequestType]
    processor_certificate: str


class OpendsrProcessorStatus(BaseModel):
    """`GET /opendsr/v2/status`: the processor answers and its database is reachable."""

    api_version: str
    status: Literal["ok"]
