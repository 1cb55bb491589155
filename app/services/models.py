"""Models and versions: registration (upload → v1, an upload → an import job, or a train
job), views, downloads.

An uploaded checkpoint is validated without torch (safetensors header, dtypes; for a built-in
architecture every key and shape for the dataset's input shape) and stored durably before the
rows commit. A built-in upload is version 1 at once; an upload of a `timm:`/`torchvision:`
architecture is stored pending (model status `importing`) and an `import` job loads it
strictly on a worker, which publishes version 1 or fails the registration. Every checkpoint
download is an audit event.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import DatasetRow, DeletionRequest, Job, ModelRow, ModelVersion
from app.db.types import rfc3339, utcnow
from app.errors import (
    AlreadyExists,
    InvalidCheckpoint,
    InvalidInput,
    ModelNotFound,
    VersionNotFound,
    to_lethe_error,
)
from app.services import lineage
from app.services.apikeys import Principal
from app.services.audit import append_event
from app.services.common import Page, decode_cursor, encode_cursor
from app.services.datasets import check_name, get_dataset_row
from app.services.jobs import create_job
from app.services.policy import merge_policy
from app.services.references import schedule_references
from app.services.transactions import read_only, unit_of_work
from app.settings import Settings
from app.vocab import ACTIVE_JOB_STATUSES, OPEN_REQUEST_STATUSES, JobKind, ModelStatus
from engine import errors as engine_errors
from engine.arch_shapes import ARCHITECTURES, param_shapes
from engine.model_desc import check_library_name
from models_store import Store, StoredCheckpoint


@dataclass(frozen=True)
class Registered:
    """A registered model, and the train job to enqueue when there is one."""

    body: dict[str, Any]
    enqueue_job_id: str | None
    #: The model's `reference` job, to dispatch too (None when references are off).
    reference_job_id: str | None = None
    #: The jobs of the deletion requests a successor inherited (`app.services.lineage`).
    lineage_job_ids: tuple[str, ...] = ()

    @property
    def dispatch(self) -> list[str]:
        """Every job the registration queued, to send to the broker after commit."""
        return [j for j in (self.enqueue_job_id, self.reference_job_id, *self.lineage_job_ids) if j]

    @property
    def job_id(self) -> str | None:
        """The train or import job's id (None for an upload of a built-in)."""
        return self.enqueue_job_id


@dataclass(frozen=True)
class CheckpointFile:
    """What a download needs: the file, its digest and size, and a filename."""

    path: Path
    sha256: str
    size_bytes: int
    filename: str
    model: str
    version: int


def _check_spec(
    session: Session, *, name: str, dataset: str, architecture: str, num_classes: int
) -> DatasetRow:
    check_name(name, "name")
    ds = get_dataset_row(session, dataset)
    if architecture not in ARCHITECTURES:
        raise InvalidInput(
            f"unknown architecture {architecture!r}",
            field="architecture",
            known=list(ARCHITECTURES),
        )
    _check_classes(ds, num_classes)
    try:
        param_shapes(architecture, num_classes, (ds.in_channels, ds.height, ds.width))
    except engine_errors.EngineError as exc:
        raise to_lethe_error(exc) from None
    _check_name_free(session, name)
    return ds


def _check_classes(ds: DatasetRow, num_classes: int) -> None:
    if num_classes < ds.num_classes:
        raise InvalidInput(
            f"num_classes {num_classes} is below the dataset's {ds.num_classes} classes",
            field="num_classes",
        )


def _check_name_free(session: Session, name: str) -> None:
    """409 unless the name is new or its registration failed (`_add_model` takes it over)."""
    status = session.scalar(select(ModelRow.status).where(ModelRow.name == name))
    if status is not None and status != ModelStatus.FAILED:
        raise AlreadyExists(f"model {name!r} exists")


def _check_library_spec(
    session: Session,
    *,
    name: str,
    dataset: str,
    architecture: str,
    num_classes: int,
    description: dict[str, Any],
) -> DatasetRow:
    """A library architecture's registration, checked torch-free: the name against the
    library's model list, the label count against the dataset, the input description's
    members against each other. Whether the checkpoint fits is the import job's to say."""
    check_name(name, "name")
    ds = get_dataset_row(session, dataset)
    try:
        check_library_name(architecture)
    except engine_errors.EngineError as exc:
        raise to_lethe_error(exc) from None
    _check_classes(ds, num_classes)
    _check_description(description)
    _check_name_free(session, name)
    return ds


def _check_description(description: dict[str, Any]) -> None:
    """Refuse an input description whose members disagree (each member's own range, channels
    1 or 3 among them, is the schema's): one mean and std per channel (or one for all)."""
    size = description.get("input_size")
    prep = description.get("preprocessing") or {}
    channels = int(size[0]) if size else None
    mean, std = prep.get("mean"), prep.get("std")
    if mean is not None and std is not None and len(mean) != len(std):
        raise InvalidInput("preprocessing mean and std need as many values", field="preprocessing")
    for values in (mean, std):
        if values is not None and channels is not None and len(values) not in (1, channels):
            raise InvalidInput(
                f"preprocessing mean and std need 1 or {channels} values", field="preprocessing"
            )


def _new_model(
    ds: DatasetRow,
    *,
    name: str,
    architecture: str,
    num_classes: int,
    recipe: dict[str, Any],
    policy: dict[str, Any] | None,
    status: ModelStatus = ModelStatus.READY,
    description: dict[str, Any] | None = None,
) -> ModelRow:
    return ModelRow(
        status=status,
        description=description,
        name=name,
        dataset_id=ds.id,
        architecture=architecture,
        num_classes=num_classes,
        in_channels=ds.in_channels,
        recipe=recipe,
        policy=merge_policy(policy),
        latest_version=None,
        forgotten_count=0,
        created_at=utcnow(),
    )


def _record_registration(
    session: Session, *, actor: str, model: ModelRow, dataset: str, init: str
) -> None:
    """The `model.registered` audit event, for either way a model comes in."""
    append_event(
        session,
        actor=actor,
        action="model.registered",
        subject=f"model:{model.name}",
        model=model.name,
        data={
            "dataset": dataset,
            "architecture": model.architecture,
            "num_classes": model.num_classes,
            "recipe": model.recipe,
            "policy": model.policy,
            "init": init,
            "description": model.description,
        },
    )


def register_model_train(
    session: Session,
    *,
    principal: Principal,
    name: str,
    dataset: str,
    architecture: str,
    num_classes: int,
    recipe: dict[str, Any],
    settings: Settings,
    policy: dict[str, Any] | None = None,
    succeeds: str | None = None,
) -> Registered:
    """Register a model whose version 1 a queued train job will produce, with its reference
    job (when `settings.references`): both queued in the registration's transaction. The
    references need only the recipe and the dataset, so they do not wait for version 1.
    `succeeds`: the model whose lineage this one continues (`app.services.lineage`)."""
    with unit_of_work(session):
        ds = _check_spec(
            session, name=name, dataset=dataset, architecture=architecture, num_classes=num_classes
        )
        model = _new_model(
            ds,
            name=name,
            architecture=architecture,
            num_classes=num_classes,
            recipe=recipe,
            policy=policy,
        )
        model = _add_model(session, model)
        _record_registration(session, actor=principal.name, model=model, dataset=dataset, init="train")
        job = create_job(session, model, kind=JobKind.TRAIN, method="train", actor=principal.name)
        ref_id = schedule_references(session, model, settings=settings, actor=principal.name)
        inherited = _inherit(session, model, succeeds, ds, principal=principal, settings=settings)
    with read_only(session):
        body = model_public(session, model)
    body["job_id"] = job.id
    return Registered(body, job.id, ref_id, inherited)


def _inherit(
    session: Session, model: ModelRow, succeeds: str | None, ds: DatasetRow, *,
    principal: Principal, settings: Settings,
) -> tuple[str, ...]:
    """Continue the lineage of the model named `succeeds`, if any, in the registration's
    transaction (after version 1's job, or version 1, is in place, so the inherited requests
    queue behind it); the jobs to dispatch."""
    if not succeeds:
        return ()
    pred = lineage.check_predecessor(session, model.name, succeeds, ds)
    return tuple(lineage.inherit(session, model, pred, principal=principal, settings=settings).job_ids)


#: What a registration sets on its model row; a registration under the name of a failed one
#: sets these on the failed row (`_take_over_failed`).
_REGISTRATION_FIELDS = ("dataset_id", "architecture", "num_classes", "in_channels", "recipe", "policy",
                        "latest_version", "forgotten_count", "created_at", "status", "description",
                        "succeeds")


def _add_model(session: Session, model: ModelRow) -> ModelRow:
    """Insert the model row, or take over the row of a failed registration of the same name;
    returns the row the registration continues with. A name taken meanwhile is `AlreadyExists`."""
    name = model.name
    failed = session.scalar(
        select(ModelRow.id).where(ModelRow.name == name, ModelRow.status == ModelStatus.FAILED)
    )
    if failed is not None:
        return _take_over_failed(session, failed, model)
    session.add(model)
    try:
        session.flush()
    except IntegrityError:
        raise AlreadyExists(f"model {name!r} exists") from None
    return model


def _take_over_failed(session: Session, model_id: int, model: ModelRow) -> ModelRow:
    """Register `model` on the row of a registration that failed (its import never published
    a version): the name, the failed import job and its audit events stay the model's
    history, and the new registration's fields replace the old ones. One conditional UPDATE,
    so of two registrations racing for the name one wins and the other is `AlreadyExists`;
    a failed model whose jobs are still stopping (its reference job, running when the
    import failed) is `AlreadyExists` until they have."""
    stopping = session.scalar(
        select(func.count()).select_from(Job)
        .where(Job.model_id == model_id, Job.status.in_(ACTIVE_JOB_STATUSES))
    )
    if stopping:
        raise AlreadyExists(f"model {model.name!r} failed to register and its jobs are still stopping; "
                            "retry in a moment")
    values = {field: getattr(model, field) for field in _REGISTRATION_FIELDS}
    taken = session.execute(
        update(ModelRow)
        .where(ModelRow.id == model_id, ModelRow.status == ModelStatus.FAILED)
        .values(**values, error=None)
        .execution_options(synchronize_session=False)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        raise AlreadyExists(f"model {model.name!r} exists")
    row = session.get(ModelRow, model_id)
    assert row is not None
    session.refresh(row)
    return row


def register_model_upload(
    session: Session,
    store: Store,
    *,
    principal: Principal,
    name: str,
    dataset: str,
    architecture: str,
    num_classes: int,
    recipe: dict[str, Any],
    checkpoint: BinaryIO,
    settings: Settings,
    policy: dict[str, Any] | None = None,
    max_bytes: int | None = None,
    succeeds: str | None = None,
) -> Registered:
    """Register a model from an uploaded safetensors checkpoint: version 1, no parent; its
    reference job (when `settings.references`) is queued in the same transaction."""
    with read_only(session):
        ds = _check_spec(
            session, name=name, dataset=dataset, architecture=architecture, num_classes=num_classes
        )
        if succeeds:  # refused before the upload is stored; `_inherit` looks again when writing
            lineage.check_predecessor(session, name, succeeds, ds)
        merged = merge_policy(policy)
        manifest = _upload_manifest(ds, name=name, architecture=architecture,
                                    num_classes=num_classes, recipe=recipe)
    try:
        stored = store.put_file(name, checkpoint, manifest, max_bytes=max_bytes)
    except engine_errors.InvalidCheckpoint as exc:
        raise InvalidCheckpoint(str(exc)) from None
    except engine_errors.EngineError as exc:
        raise to_lethe_error(exc) from None
    with unit_of_work(session):
        ds = get_dataset_row(session, dataset)
        model = _new_model(
            ds,
            name=name,
            architecture=architecture,
            num_classes=num_classes,
            recipe=recipe,
            policy=merged,
        )
        model = _add_model(session, model)
        _add_uploaded_version(session, store, model, stored)
        _record_registration(session, actor=principal.name, model=model, dataset=dataset, init="upload")
        append_event(
            session,
            actor=principal.name,
            action="model.version.published",
            subject=f"model:{name}/v1",
            model=name,
            data={
                "version": 1,
                "parent": None,
                "sha256": stored.sha256,
                "size_bytes": stored.size_bytes,
                "method": "upload",
            },
        )
        ref_id = schedule_references(session, model, settings=settings, actor=principal.name)
        inherited = _inherit(session, model, succeeds, ds, principal=principal, settings=settings)
    with read_only(session):
        return Registered(model_public(session, model), None, ref_id, inherited)


def register_uploaded_model(
    session: Session,
    store: Store,
    *,
    architecture: str,
    description: dict[str, Any] | None = None,
    **registration: Any,
) -> Registered:
    """Register an upload: version 1 at once for a built-in architecture, an `import` job for
    a `timm:`/`torchvision:` one (`register_model_upload`, `register_model_import`)."""
    if ":" in architecture:  # `library:name`; an unknown library is `unsupported_architecture`
        return register_model_import(session, store, architecture=architecture,
                                     description=description, **registration)
    if description:
        raise InvalidInput(
            "input_size and preprocessing apply to timm:/torchvision: architectures; a built-in "
            "reads the dataset's images as they are", field="input_size",
        )
    return register_model_upload(session, store, architecture=architecture, **registration)


def register_model_import(
    session: Session,
    store: Store,
    *,
    principal: Principal,
    name: str,
    dataset: str,
    architecture: str,
    num_classes: int,
    recipe: dict[str, Any],
    checkpoint: BinaryIO,
    settings: Settings,
    description: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    max_bytes: int | None = None,
    succeeds: str | None = None,
) -> Registered:
    """Register a `timm:`/`torchvision:` model from an uploaded safetensors checkpoint: the
    file is checked torch-free and stored pending, the model is `importing`, and an `import`
    job (with the reference job, when `settings.references`) is queued in one transaction.
    The job loads the file strictly on a worker and publishes version 1, or fails the
    registration naming what does not fit."""
    given = dict(description or {})
    with read_only(session):
        ds = _check_library_spec(session, name=name, dataset=dataset, architecture=architecture,
                                 num_classes=num_classes, description=given)
        if succeeds:  # refused before the upload is stored; `_inherit` looks again when writing
            lineage.check_predecessor(session, name, succeeds, ds)
        merged = merge_policy(policy)
    stored = _store_upload(store, name, checkpoint, _pending_manifest(
        ds, name=name, architecture=architecture, num_classes=num_classes, description=given,
    ), max_bytes=max_bytes)
    with unit_of_work(session):
        model = _new_model(
            get_dataset_row(session, dataset), name=name, architecture=architecture,
            num_classes=num_classes, recipe=recipe, policy=merged,
            status=ModelStatus.IMPORTING, description=given,
        )
        model = _add_model(session, model)
        _record_registration(session, actor=principal.name, model=model, dataset=dataset, init="import")
        job = create_job(session, model, kind=JobKind.IMPORT, method="import", actor=principal.name,
                         method_options=_upload_options(store, stored))
        ref_id = schedule_references(session, model, settings=settings, actor=principal.name)
        inherited = _inherit(session, model, succeeds, ds, principal=principal, settings=settings)
    with read_only(session):
        body = model_public(session, model)
    body["job_id"] = job.id
    return Registered(body, job.id, ref_id, inherited)


def _store_upload(
    store: Store, name: str, checkpoint: BinaryIO, manifest: dict[str, Any], *, max_bytes: int | None
) -> StoredCheckpoint:
    """Copy the upload into the store, checked torch-free (a pickle, whatever its name, or a
    file over `max_bytes` is `invalid_checkpoint`, and nothing is left behind)."""
    try:
        return store.put_file(name, checkpoint, manifest, max_bytes=max_bytes)
    except engine_errors.InvalidCheckpoint as exc:
        raise InvalidCheckpoint(str(exc)) from None
    except engine_errors.EngineError as exc:
        raise to_lethe_error(exc) from None


def _pending_manifest(
    ds: DatasetRow, *, name: str, architecture: str, num_classes: int, description: dict[str, Any]
) -> dict[str, Any]:
    """The manifest stored beside a pending upload (not a version: its import job decides).
    It names no `architecture` member, so the store checks the file's header only."""
    return {
        "format": "lethe.upload/1",
        "model": name,
        "kind": "import",
        "declared": {
            "architecture": architecture,
            "num_classes": num_classes,
            "description": description,
            "dataset": ds.name,
        },
        "created_at": rfc3339(utcnow()),
    }


def _upload_options(store: Store, stored: StoredCheckpoint) -> dict[str, Any]:
    """What the import job's options say about its file (store-relative paths, digest)."""
    return {
        "upload": store.relative(stored.path),
        "upload_manifest": store.relative(stored.manifest_path),
        "sha256": stored.sha256,
        "size_bytes": stored.size_bytes,
    }


def _upload_manifest(
    ds: DatasetRow, *, name: str, architecture: str, num_classes: int, recipe: dict[str, Any]
) -> dict[str, Any]:
    """The manifest stored beside an uploaded checkpoint (version 1, no parent, no job)."""
    return {
        "format": "lethe.checkpoint/1",
        "model": name,
        "version": 1,
        "parent_version": None,
        "job_id": None,
        "kind": "upload",
        "architecture": {
            "name": architecture,
            "num_classes": num_classes,
            "input_shape": [ds.in_channels, ds.height, ds.width],
        },
        "dataset": {
            "name": ds.name,
            "kind": ds.kind,
            "uri": ds.uri,
            "options": ds.options,
            "fingerprint": ds.fingerprint,
        },
        "recipe": recipe,
        "method": "upload",
        "method_config": {},
        "teacher_seed": None,
        "metrics": {},
        "forgotten": {"count": 0, "sha256": None, "this_job": 0},
        "created_at": rfc3339(utcnow()),
    }


def _add_uploaded_version(
    session: Session, store: Store, model: ModelRow, stored: StoredCheckpoint
) -> None:
    """Version 1 of an uploaded model, and the model pointing at it."""
    session.add(
        ModelVersion(
            model_id=model.id,
            version=1,
            parent_version=None,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            path=store.relative(stored.path),
            manifest_path=store.relative(stored.manifest_path),
            method="upload",
            job_id=None,
            metrics=None,
            forgotten_count=0,
            created_at=utcnow(),
        )
    )
    model.latest_version = 1
    session.flush()


def _model_by_name(session: Session, name: str) -> ModelRow:
    model = session.scalar(select(ModelRow).where(ModelRow.name == name))
    if model is None:
        raise ModelNotFound(f"no model named {name!r}", model=name)
    return model


def model_public(session: Session, model: ModelRow) -> dict[str, Any]:
    """A model as API.md describes it."""
    pending = session.scalar(
        select(func.count())
        .select_from(DeletionRequest)
        .where(DeletionRequest.model_id == model.id)
        .where(DeletionRequest.status.in_(OPEN_REQUEST_STATUSES))
    )
    dataset = session.scalar(select(DatasetRow.name).where(DatasetRow.id == model.dataset_id))
    return {
        "name": model.name,
        "dataset": dataset,
        "architecture": model.architecture,
        "num_classes": model.num_classes,
        "recipe": model.recipe,
        "policy": model.policy,
        "status": model.status,
        "description": model.description,
        "error": model.error,
        "succeeds": model.succeeds,
        "latest_version": model.latest_version,
        "forgotten_count": model.forgotten_count,
        "pending_requests": int(pending or 0),
        "created_at": rfc3339(model.created_at),
    }


def get_model(session: Session, name: str) -> dict[str, Any]:
    """One model."""
    with read_only(session):
        return model_public(session, _model_by_name(session, name))


def list_models(session: Session, *, limit: int, cursor: str | None = None) -> Page[dict[str, Any]]:
    """Models by name."""
    stmt = select(ModelRow).order_by(ModelRow.name)
    after = decode_cursor(cursor)
    if after is not None:
        stmt = stmt.where(ModelRow.name > str(after))
    with read_only(session):
        rows = list(session.scalars(stmt.limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        items = [model_public(session, m) for m in rows]
    return Page(items, encode_cursor(rows[-1].name) if more else None)


def version_public(model: ModelRow, v: ModelVersion) -> dict[str, Any]:
    """A version as API.md describes it."""
    return {
        "model": model.name,
        "version": v.version,
        "parent": v.parent_version,
        "sha256": v.sha256,
        "size_bytes": v.size_bytes,
        "method": v.method,
        "job_id": v.job_id,
        "metrics": v.metrics,
        "forgotten_count": v.forgotten_count,
        "created_at": rfc3339(v.created_at),
    }


def _version(session: Session, model: ModelRow, n: str | int) -> ModelVersion:
    if n == "latest":
        if model.latest_version is None:
            raise VersionNotFound(f"model {model.name} has no published version yet")
        number = model.latest_version
    else:
        try:
            number = int(n)
        except (TypeError, ValueError):
            raise VersionNotFound(f"no version {n!r}; use a number or 'latest'") from None
    v = session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id).where(ModelVersion.version == number)
    )
    if v is None:
        raise VersionNotFound(f"model {model.name} has no version {number}")
    return v


def get_version(session: Session, name: str, n: str | int) -> dict[str, Any]:
    """One version (`n` may be `latest`)."""
    with read_only(session):
        model = _model_by_name(session, name)
        return version_public(model, _version(session, model, n))


def list_versions(
    session: Session, name: str, *, limit: int, cursor: str | None = None
) -> Page[dict[str, Any]]:
    """A model's versions, newest first."""
    with read_only(session):
        model = _model_by_name(session, name)
        stmt = select(ModelVersion).where(ModelVersion.model_id == model.id)
        after = decode_cursor(cursor, int)
        if after is not None:
            stmt = stmt.where(ModelVersion.version < int(after))
        rows = list(session.scalars(stmt.order_by(ModelVersion.version.desc()).limit(limit + 1)))
        more = len(rows) > limit
        items = [version_public(model, v) for v in rows[:limit]]
    return Page(items, encode_cursor(items[-1]["version"]) if more else None)


def get_manifest(session: Session, store: Store, name: str, n: str | int) -> dict[str, Any]:
    """The JSON manifest stored with a version."""
    with read_only(session):
        model = _model_by_name(session, name)
        path = _version(session, model, n).manifest_path
    return store.read_manifest(path)


def checkpoint_file(session: Session, store: Store, name: str, n: str | int) -> CheckpointFile:
    """Locate a version's checkpoint for download."""
    with read_only(session):
        model = _model_by_name(session, name)
        v = _version(session, model, n)
        return CheckpointFile(
            path=store.resolve(v.path),
            sha256=v.sha256,
            size_bytes=v.size_bytes,
            filename=f"{model.name}-v{v.version}.safetensors",
            model=model.name,
            version=v.version,
        )


def record_download(session: Session, ck: CheckpointFile, *, actor: str, byte_range: str | None) -> None:
    """Audit one checkpoint download."""
    with unit_of_work(session):
        append_event(
            session,
            actor=actor,
            action="checkpoint.downloaded",
            subject=f"model:{ck.model}/v{ck.version}",
            model=ck.model,
            data={"version": ck.version, "sha256": ck.sha256, "range": byte_range},
        )
