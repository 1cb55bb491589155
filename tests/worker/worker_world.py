"""The worker tests' world: settings, sessions, store, an admin principal, a tiny dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import AuditEvent, Job, ModelVersion
from app.services import deletions as deletion_service
from app.services import models as model_service
from app.services.apikeys import Principal
from app.settings import Settings
from models_store import Store

TINY_RECIPE = {"optimizer": "sgd", "lr": 0.05, "epochs": 2, "batch_size": 32, "seed": 0}
LENIENT_POLICY = {"max_acc_test_drop": 1.0, "max_gap": None, "max_avg_gap": None}


@dataclass
class World:
    """One test's deployment: settings, sessions, store, an admin principal, a tiny dataset."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: Store
    principal: Principal
    dataset_path: Path
    enqueued: list[str] = field(default_factory=list)

    def enqueue(self, job_id: str) -> None:
        """Stands in for the broker: remembers which jobs the worker asked to run next."""
        self.enqueued.append(job_id)

    def register_model(
        self, name: str = "tiny", recipe: dict[str, Any] | None = None,
        policy: dict[str, Any] | None = None,
    ) -> str:
        """Register `name` on the tiny dataset with a train job; returns the job id."""
        with self.sessions() as s:
            reg = model_service.register_model_train(
                s, principal=self.principal, name=name, dataset="tiny",
                architecture="small_cnn", num_classes=4, recipe=recipe or TINY_RECIPE,
                settings=self.settings, policy=LENIENT_POLICY if policy is None else policy,
            )
        return str(reg.job_id)

    def submit(self, model: str, ids: list[str], **kwargs: Any) -> tuple[str, str | None]:
        """POST-equivalent: returns (request id, job id to enqueue or None when coalesced)."""
        with self.sessions() as s:
            sub = deletion_service.submit_deletion_request(
                s, principal=self.principal, settings=self.settings, model=model,
                sample_ids=ids, **kwargs,
            )
        return str(sub.body["id"]), sub.enqueue_job_id

    def job(self, job_id: str) -> Job:
        """The job row as it is now."""
        with self.sessions() as s:
            row = s.get(Job, job_id)
            assert row is not None
            s.expunge(row)
            return row

    def versions(self) -> list[ModelVersion]:
        """Every published version, oldest first."""
        with self.sessions() as s:
            rows = list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))
            for r in rows:
                s.expunge(r)
            return rows

    def actions(self, subject: str | None = None) -> list[str]:
        """Audit actions in order, optionally for one subject (e.g. `job:<id>`)."""
        with self.sessions() as s:
            stmt = select(AuditEvent).order_by(AuditEvent.seq)
            if subject:
                stmt = stmt.where(AuditEvent.subject == subject)
            return [e.action for e in s.scalars(stmt)]

    def train_ids(self) -> list[str]:
        """The tiny dataset's training-split sample IDs."""
        data = np.load(self.dataset_path)
        return [str(i) for i, sp in zip(data["ids"], data["split"], strict=True) if sp == "train"]


