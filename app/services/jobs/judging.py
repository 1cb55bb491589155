"""Judging a finished run: the model's policy applied to the run's evidence, and the
manifest its checkpoint would be published with.

Judging reads and decides; it changes nothing. Publishing (`publish.py`) or the fallback
(`fallback.py`) acts on its `Judgement`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.orm import Session

from app.db.models import DatasetRow, Job, ModelRow
from app.db.types import rfc3339, utcnow
from app.services import policy as policy_rules
from app.services.common import finite_json
from app.services.jobs.queries import (
    ids_digest,
    load_model,
    pending_forget_ids,
    tombstoned,
    version_metrics,
)
from app.vocab import JobKind


@dataclass(frozen=True)
class RunReport:
    """What the worker reports about a finished run (the checkpoint's bytes aside)."""

    metrics: dict[str, Any]
    reference: dict[str, Any] | None
    gaps: dict[str, Any] | None
    history: list[dict[str, Any]] | None
    method: str
    method_config: dict[str, Any] | None
    teacher_seed: int | None
    seconds: float
    steps: int
    device: str
    # The per-sample forgetting evidence (`engine.references.build_evidence`); None for runs
    # that delete nothing.
    evidence: dict[str, Any] | None = None

    def finite(self) -> RunReport:
        """The report as it is stored: evidence is JSON, which has no inf or nan, so such a
        value is recorded as null."""
        return replace(self, **{name: finite_json(getattr(self, name)) for name in
                                ("metrics", "reference", "gaps", "history", "evidence")})

    @property
    def all_metrics(self) -> dict[str, Any]:
        """The metrics with the run's duration, step count and device."""
        return {**self.metrics, "seconds": self.seconds, "steps": self.steps, "device": self.device}


@dataclass(frozen=True)
class Judgement:
    """The verdict on one run, and everything publishing it needs."""

    job_id: str
    model_id: int
    model_name: str
    base_version: int | None
    actor: str
    report: RunReport
    verdict: dict[str, Any]
    forget_ids: list[str]
    lineage: list[str]
    manifest: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.verdict["passed"])

    @property
    def new_version(self) -> int:
        return 1 if self.base_version is None else self.base_version + 1


def judge(session: Session, job: Job, report: RunReport) -> Judgement:
    """Apply the model's policy to the run's metrics (against its parent version's) and
    build the manifest of the version it would publish."""
    model = load_model(session, job.model_id)
    parent_metrics = version_metrics(session, model.id, job.base_version)
    verdict = policy_rules.evaluate(
        model.policy, kind=job.kind, metrics=report.metrics, parent_metrics=parent_metrics,
        gaps=report.gaps, reference=report.reference, evidence=report.evidence,
    )
    forget_ids = pending_forget_ids(session, job) if job.kind != JobKind.TRAIN else []
    lineage = sorted(set(tombstoned(session, model.id)) | set(forget_ids))
    judgement = Judgement(
        job_id=job.id,
        model_id=model.id,
        model_name=model.name,
        base_version=job.base_version,
        actor=f"worker:{job.worker}",
        report=report,
        verdict=verdict,
        forget_ids=forget_ids,
        lineage=lineage,
        manifest={},
    )
    return replace(judgement, manifest=_manifest(session, job, model, judgement))


def record_report(job: Job, judged: Judgement) -> None:
    """Keep the run's evidence on the job, whether it publishes or fails: metrics, the retrain
    reference and its gaps, the verdict, the per-sample evidence and the step history."""
    report = judged.report
    job.metrics, job.reference, job.gaps = report.all_metrics, report.reference, report.gaps
    job.verdict, job.seconds = judged.verdict, report.seconds
    job.evidence, job.history = report.evidence, report.history


def _manifest(session: Session, job: Job, model: ModelRow, judged: Judgement) -> dict[str, Any]:
    """The JSON document stored beside the checkpoint (`lethe.checkpoint/1`)."""
    dataset = session.get(DatasetRow, model.dataset_id)
    assert dataset is not None
    report = judged.report
    return {
        "format": "lethe.checkpoint/1",
        "model": model.name,
        "version": judged.new_version,
        "parent_version": job.base_version,
        "job_id": job.id,
        "kind": job.kind,
        "architecture": {
            "name": model.architecture,
            "num_classes": model.num_classes,
            "input_shape": [dataset.in_channels, dataset.height, dataset.width],
        },
        "dataset": {
            "name": dataset.name,
            "kind": dataset.kind,
            "uri": dataset.uri,
            "options": dataset.options,
            "fingerprint": dataset.fingerprint,
        },
        "recipe": model.recipe,
        "method": report.method,
        "method_config": report.method_config or {},
        "teacher_seed": report.teacher_seed,
        "verify": job.verify,
        "metrics": report.all_metrics,
        "reference": report.reference,
        "gaps": report.gaps,
        "verdict": judged.verdict,
        "forgotten": {
            "count": len(judged.lineage),
            "sha256": ids_digest(judged.lineage),
            "this_job": len(judged.forget_ids),
        },
        "history_len": len(report.history or []),
        "created_at": rfc3339(utcnow()),
    }
