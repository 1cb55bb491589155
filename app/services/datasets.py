"""Datasets: register (index every sample through `engine.datasets`), show, list samples.

Registration loads the dataset once with the torch-free adapters (a streamed dataset's files
are checked on a random sample of rows) and writes its index (sample ID, split, label) to the
`samples` table; deletion requests are validated against it
without touching the data again.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.db.models import DatasetRow, Sample
from app.db.types import rfc3339, utcnow
from app.errors import AlreadyExists, DatasetNotFound, InvalidInput, to_lethe_error
from app.services import subjects
from app.services.audit import append_event
from app.services.common import Page, bulk_insert, decode_cursor, encode_cursor, is_postgres, table_of
from app.services.transactions import read_only, unit_of_work
from engine import errors as engine_errors
from engine.datasets import TEST, Dataset, DatasetSpec, heldout_sizes_of, load_dataset
from engine.manifest import check_files

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: str, what: str = "name") -> str:
    """Refuse names that are not `[A-Za-z0-9][A-Za-z0-9._-]*` (no traversal, no separators)."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"{what} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,99}} and not contain '..'",
            field=what,
        )
    return name


def dataset_public(session: Session, row: DatasetRow) -> dict[str, Any]:
    """The API shape of a dataset. `splits` holds `train` and `test` and the test split's two
    halves: `calibration` (methods may read it) and `audit` (only verification reads it)."""
    return {
        "name": row.name,
        "kind": row.kind,
        "uri": row.uri,
        "options": row.options,
        "num_samples": row.num_samples,
        "num_classes": row.num_classes,
        "splits": {"train": row.train_size, "test": row.test_size, **heldout_sizes(session, row)},
        "input_shape": [row.in_channels, row.height, row.width],
        "fingerprint": row.fingerprint,
        "version_of": row.version_of,
        "created_at": rfc3339(row.created_at),
    }


def heldout_sizes(session: Session, row: DatasetRow) -> dict[str, int]:
    """The sizes of `calibration` and `audit`, from the index's per-label test counts (the same
    stratified rule the engine partitions by)."""
    counts = session.scalars(
        select(func.count())
        .select_from(Sample)
        .where(Sample.dataset_id == row.id, Sample.split == TEST)
        .group_by(Sample.label)
    )
    return heldout_sizes_of(counts)


def register_dataset(
    session: Session,
    *,
    name: str,
    kind: str,
    uri: str = "",
    options: dict[str, Any] | None = None,
    version_of: str | None = None,
    actor: str,
) -> dict[str, Any]:
    """Index a dataset and store its samples; 409 if the name is taken. `version_of` names the
    dataset this one is a later version of: its subjects are hashed with that one's key, so
    models trained on it can continue that dataset's models' lineages (`app.services.lineage`)."""
    check_name(name, "name")
    options = options or {}
    with read_only(session):
        if session.scalar(select(DatasetRow.id).where(DatasetRow.name == name)) is not None:
            raise AlreadyExists(f"dataset {name!r} exists")
        if version_of is not None:
            _predecessor(session, version_of)
    ds = _load(name, kind, uri, options)
    with unit_of_work(session):
        key = _inherited_subject_key(session, version_of) if version_of is not None else None
        row = _index(session, ds, name=name, kind=kind, uri=uri, options=options, actor=actor,
                     version_of=version_of, subject_key=key)
        body = dataset_public(session, row)
    if is_postgres(session):
        # Fresh statistics keep ID validation on the primary key instead of a split scan.
        with unit_of_work(session):
            session.execute(text("ANALYZE samples"))
    return body


def _predecessor(session: Session, name: str) -> DatasetRow:
    """The dataset a new one is a version of; 422 when there is none of that name."""
    row = session.scalar(select(DatasetRow).where(DatasetRow.name == name))
    if row is None:
        raise InvalidInput(f"version_of names no dataset: {name!r}", field="version_of")
    return row


def _inherited_subject_key(session: Session, version_of: str) -> str | None:
    """The subject key of the nearest earlier version that has one (a version in between may
    name no subjects), so a subject hashes alike along the whole chain."""
    row: DatasetRow | None = _predecessor(session, version_of)
    seen: set[str] = set()
    while row is not None and row.subject_key is None and row.version_of and row.name not in seen:
        seen.add(row.name)
        row = session.scalar(select(DatasetRow).where(DatasetRow.name == row.version_of))
    return row.subject_key if row is not None else None


def _load(name: str, kind: str, uri: str, options: dict[str, Any]) -> Dataset:
    """The dataset through its torch-free adapter, with a random sample of a streamed
    dataset's image files opened (missing or unreadable ones are named by sample ID); a bad
    kind, URI, option or file is the caller's input error."""
    try:
        ds = load_dataset(DatasetSpec(kind=kind, uri=uri, options=options), name)
        check_files(ds)
        return ds
    except engine_errors.EngineError as exc:
        raise to_lethe_error(exc) from None
    except (TypeError, ValueError, IndexError, OverflowError, KeyError, OSError) as exc:
        # Adapter options come from the caller; a bad one is their input error, not ours.
        raise InvalidInput(f"cannot load the dataset with these options: {exc}") from None


def _index(
    session: Session,
    ds: Dataset,
    *,
    name: str,
    kind: str,
    uri: str,
    options: dict[str, Any],
    actor: str,
    version_of: str | None = None,
    subject_key: str | None = None,
) -> DatasetRow:
    """The dataset row, one `samples` row per sample and the `dataset.registered` event (in
    the caller's transaction)."""
    sizes = ds.split_sizes()
    c, h, w = ds.input_shape
    row = DatasetRow(
        name=name,
        kind=kind,
        uri=uri,
        options=options,
        num_samples=len(ds),
        num_classes=ds.num_classes,
        train_size=sizes["train"],
        test_size=sizes["test"],
        in_channels=c,
        height=h,
        width=w,
        fingerprint=ds.fingerprint(),
        created_at=utcnow(),
        version_of=version_of,
    )
    session.add(row)
    try:
        session.flush()
    except Exception:
        raise AlreadyExists(f"dataset {name!r} exists") from None
    dataset_id = row.id
    subject_count = _index_subjects(session, row, ds, subject_key)
    bulk_insert(
        session,
        table_of(Sample),
        ("dataset_id", "sample_id", "split", "label"),
        (
            (dataset_id, str(s), str(sp), int(lb))
            for s, sp, lb in zip(ds.ids.tolist(), ds.splits.tolist(), ds.labels.tolist(), strict=True)
        ),
    )
    append_event(
        session,
        actor=actor,
        action="dataset.registered",
        subject=f"dataset:{name}",
        data={
            "kind": kind,
            "uri": uri,
            "num_samples": len(ds),
            "fingerprint": row.fingerprint,
            "subject_count": subject_count,
            "version_of": version_of,
        },
    )
    return row


def _index_subjects(session: Session, row: DatasetRow, ds: Dataset, key: str | None) -> int:
    """Store the samples' hashed subjects (if it has any) under `key`, the key of the dataset
    this one is a version of, or a new one."""
    if ds.subjects is None or not any(ds.subjects.tolist()):
        return 0
    row.subject_key = key or subjects.new_subject_key()
    session.flush()
    return subjects.index_subjects(session, row.id, row.subject_key, ds.ids.tolist(), ds.subjects)


def get_subject(session: Session, name: str, subject_id: str) -> dict[str, Any]:
    """How many samples, per split, the data subject `subject_id` has in dataset `name`."""
    with read_only(session):
        return subjects.subject_counts(session, get_dataset_row(session, name), subject_id)


def get_dataset_row(session: Session, name: str) -> DatasetRow:
    """The dataset row or 404 `dataset_not_found`."""
    row = session.scalar(select(DatasetRow).where(DatasetRow.name == name))
    if row is None:
        raise DatasetNotFound(f"no dataset named {name!r}")
    return row


def get_dataset(session: Session, name: str) -> dict[str, Any]:
    """One dataset."""
    with read_only(session):
        return dataset_public(session, get_dataset_row(session, name))


def list_datasets(session: Session, *, limit: int, cursor: str | None = None) -> Page[dict[str, Any]]:
    """Datasets by name."""
    stmt = select(DatasetRow).order_by(DatasetRow.name)
    after = decode_cursor(cursor)
    if after is not None:
        stmt = stmt.where(DatasetRow.name > str(after))
    with read_only(session):
        rows = list(session.scalars(stmt.limit(limit + 1)))
        more = len(rows) > limit
        items = [dataset_public(session, r) for r in rows[:limit]]
    return Page(items, encode_cursor(items[-1]["name"]) if more else None)


def list_samples(
    session: Session,
    name: str,
    *,
    split: str | None = None,
    label: int | None = None,
    limit: int,
    cursor: str | None = None,
) -> Page[dict[str, Any]]:
    """A dataset's samples by ID, optionally of one split and/or label."""
    with read_only(session):
        ds = get_dataset_row(session, name)
        stmt = select(Sample.sample_id, Sample.split, Sample.label).where(Sample.dataset_id == ds.id)
        if split is not None:
            stmt = stmt.where(Sample.split == split)
        if label is not None:
            stmt = stmt.where(Sample.label == label)
        after = decode_cursor(cursor)
        if after is not None:
            stmt = stmt.where(Sample.sample_id > str(after))
        rows = session.execute(stmt.order_by(Sample.sample_id).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [{"sample_id": r[0], "split": r[1], "label": r[2]} for r in rows]
    return Page(items, encode_cursor(rows[-1][0]) if more else None)
