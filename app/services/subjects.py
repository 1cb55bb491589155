"""Data subjects: their hashed index, look-ups, resolution at intake, and lineage tombstones.

A dataset may say whose each sample is (`engine.datasets.Dataset.subjects`). Subject IDs are
never stored in clear: registration draws a random per-dataset key and stores
HMAC-SHA256(key, subject ID) beside each sample ID (`subject_samples`). A look-up or a
deletion request hashes the IDs it is given with the same key. The per-dataset key keeps
one subject's rows in two datasets unlinkable without the keys.

A request naming subjects resolves them at intake to the subjects' *training* samples in
the model's dataset (test-split samples were never trained on) and keeps only the hashes
(`request_subjects`). When it succeeds, each subject is tombstoned for the model's lineage
(`subject_tombstones`): every sample of that subject is then left out of the retain pool, and
a later request naming it or its samples finds them already forgotten.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import exists, func, insert, select
from sqlalchemy.orm import Session

from app.db.models import (
    DatasetRow,
    RequestSubject,
    Sample,
    SubjectSample,
    SubjectTombstone,
)
from app.db.types import utcnow
from app.errors import DatasetWithoutSubjects, DuplicateSubjectIds, InvalidInput
from app.services.common import bulk_insert, table_of
from app.vocab import Split

#: Most subjects one deletion request may name.
MAX_SUBJECTS_PER_REQUEST = 1000


def new_subject_key() -> str:
    """A fresh per-dataset HMAC key (hex)."""
    return secrets.token_hex(32)


def hash_subject(key: str, subject_id: str) -> str:
    """HMAC-SHA256 of `subject_id` under the dataset's `key`, hex."""
    return hmac.new(bytes.fromhex(key), subject_id.encode(), hashlib.sha256).hexdigest()


def digest(values: Iterable[str]) -> str:
    """sha256 over the sorted values joined by newlines (what the audit log keeps)."""
    return hashlib.sha256("\n".join(sorted(values)).encode()).hexdigest()


def index_subjects(
    session: Session, dataset_id: int, key: str, ids: Sequence[str], subjects: npt.NDArray[np.str_]
) -> int:
    """Store the hashed subject of every sample that has one; returns how many subjects."""
    hashes: dict[str, str] = {}
    rows = []
    for sample_id, subject in zip(ids, subjects.tolist(), strict=True):
        if not subject:
            continue
        h = hashes.get(subject)
        if h is None:
            h = hashes[subject] = hash_subject(key, subject)
        rows.append((dataset_id, h, sample_id))
    bulk_insert(session, table_of(SubjectSample), ("dataset_id", "subject_hash", "sample_id"), rows)
    return len(hashes)


def subject_counts(session: Session, dataset: DatasetRow, subject_id: str) -> dict[str, Any]:
    """The subject's sample counts per split in `dataset` (all zero for an unknown subject)."""
    splits = {Split.TRAIN.value: 0, Split.TEST.value: 0}
    if dataset.subject_key is not None:
        h = hash_subject(dataset.subject_key, subject_id)
        rows = session.execute(
            select(Sample.split, func.count())
            .join(SubjectSample, (SubjectSample.dataset_id == Sample.dataset_id)
                  & (SubjectSample.sample_id == Sample.sample_id))
            .where(SubjectSample.dataset_id == dataset.id, SubjectSample.subject_hash == h)
            .group_by(Sample.split)
        ).all()
        for split, count in rows:
            splits[str(split)] = int(count)
    return {
        "dataset": dataset.name,
        "subject_id": subject_id,
        "dataset_has_subjects": dataset.subject_key is not None,
        "sample_count": sum(splits.values()),
        "splits": splits,
    }


@dataclass(frozen=True)
class Resolution:
    """Subjects resolved to training samples: the hashes, each hash's training sample IDs."""

    hashes: list[str]
    samples: dict[str, list[str]]

    @property
    def sample_ids(self) -> list[str]:
        """Every training sample of the subjects, sorted, once."""
        return sorted({s for ids in self.samples.values() for s in ids})

    @property
    def without_samples(self) -> int:
        """How many of the subjects have no training sample."""
        return sum(1 for h in self.hashes if not self.samples.get(h))

    def summary(self, named_sample_ids: Sequence[str]) -> dict[str, Any]:
        """What the request resource and the audit log keep: counts and digests only."""
        ids = self.sample_ids
        named = set(named_sample_ids)
        return {
            "subject_count": len(self.hashes),
            "subjects_without_samples": self.without_samples,
            "resolved_sample_count": len(ids),
            "resolved_only_count": sum(1 for s in ids if s not in named),
            "subject_hashes_sha256": digest(self.hashes),
            "resolved_sample_ids_sha256": digest(ids),
        }


def check_subject_ids(subject_ids: Sequence[str]) -> None:
    """Refuse too many or repeated subject IDs (the schema bounds each one)."""
    if len(subject_ids) > MAX_SUBJECTS_PER_REQUEST:
        raise InvalidInput(
            f"at most {MAX_SUBJECTS_PER_REQUEST} subject IDs per request", field="subject_ids"
        )
    if len(set(subject_ids)) != len(subject_ids):
        raise DuplicateSubjectIds("subject IDs must not repeat", field="subject_ids")


def resolve(session: Session, dataset: DatasetRow, subject_ids: Sequence[str]) -> Resolution:
    """The subjects' training samples in `dataset`; 422 `dataset_without_subjects` when the
    dataset names no subjects at all (nothing could ever match)."""
    if dataset.subject_key is None:
        raise DatasetWithoutSubjects(
            f"dataset {dataset.name!r} does not say whose its samples are; name sample_ids",
            field="subject_ids",
        )
    key = dataset.subject_key
    hashes = sorted({hash_subject(key, s) for s in subject_ids})
    samples: dict[str, list[str]] = {}
    rows = session.execute(
        select(SubjectSample.subject_hash, SubjectSample.sample_id)
        .join(Sample, (Sample.dataset_id == SubjectSample.dataset_id)
              & (Sample.sample_id == SubjectSample.sample_id))
        .where(SubjectSample.dataset_id == dataset.id)
        .where(SubjectSample.subject_hash.in_(hashes))
        .where(Sample.split == Split.TRAIN)
    ).all()
    for h, sample_id in rows:
        samples.setdefault(str(h), []).append(str(sample_id))
    return Resolution(hashes, samples)


def record_request_subjects(session: Session, request_id: str, hashes: Sequence[str]) -> None:
    """Remember which subjects (hashed) a request named, for its tombstones."""
    bulk_insert(
        session, table_of(RequestSubject), ("request_id", "subject_hash"), ((request_id, h) for h in hashes)
    )


def tombstone_subjects(session: Session, model_id: int, request_ids: Sequence[str]) -> int:
    """Tombstone for the lineage every subject the succeeded `request_ids` named (once)."""
    if not request_ids:
        return 0
    gone = select(SubjectTombstone.id).where(
        SubjectTombstone.model_id == model_id, SubjectTombstone.subject_hash == RequestSubject.subject_hash
    )
    rows = session.execute(
        select(RequestSubject.subject_hash, func.min(RequestSubject.request_id))
        .where(RequestSubject.request_id.in_(list(request_ids)))
        .where(~exists(gone))
        .group_by(RequestSubject.subject_hash)
    ).all()
    now = utcnow()
    if rows:
        session.execute(
            insert(table_of(SubjectTombstone)),
            [{"model_id": model_id, "subject_hash": h, "request_id": r, "created_at": now} for h, r in rows],
        )
    return len(rows)


def tombstoned_subject_samples(session: Session, model_id: int, dataset_id: int) -> list[str]:
    """Sample IDs of `dataset_id` whose subject the model's lineage has forgotten."""
    return list(
        session.scalars(
            select(SubjectSample.sample_id)
            .join(SubjectTombstone, SubjectTombstone.subject_hash == SubjectSample.subject_hash)
            .where(SubjectTombstone.model_id == model_id, SubjectSample.dataset_id == dataset_id)
            .distinct()
            .order_by(SubjectSample.sample_id)
        )
    )
