"""The worker-facing job lifecycle on SQLite and PostgreSQL: claim (ordering, concurrency,
stale heartbeats), progress and cancel flags, publishing (parent = base, no forks), failed
verdicts and fallbacks, and the sweeper's query."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load
from sqlalchemy import select, update

from app.db.models import Job, ModelVersion, Tombstone
from app.db.types import utcnow
from app.errors import Conflict, StaleAttempt
from app.services import audit, deletions, jobs

METRICS = {"acc_forget": 0.5, "acc_retain": 0.97, "acc_test": 0.95, "mia_forget": 0.4}


def _complete(dep: Any, job_id: str, weights: bytes, **kw: Any) -> jobs.CompletionResult:
    return dep.complete(job_id, weights, **kw)  # type: ignore[no-any-return]


def _claim(dep: Any, job_id: str, worker: str = "w1", timeout: float = 60) -> Any:
    with dep.sessions() as s:
        return jobs.claim_job(s, job_id, worker, store=dep.store, heartbeat_timeout_s=timeout)


def test_claim_builds_the_ticket_and_starts_requests(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    sub = deployment.submit("m", train[:4], method_options={"max_epochs": 2.0})
    ticket = _claim(deployment, sub.enqueue_job_id)
    assert ticket.kind == "unlearn" and ticket.model_name == "m" and ticket.arch == "small_cnn"
    assert ticket.num_classes == 4 and ticket.dataset_kind == "npz"
    assert ticket.dataset_uri == str(deployment.dataset_path)
    assert ticket.base_version == 1 and ticket.attempt == 1
    assert ticket.base_checkpoint and ticket.base_checkpoint.endswith(".safetensors")
    # The checkpoint is the deployment's own v1, in its own store (not a store the settings
    # of the environment point at).
    base = Path(ticket.base_checkpoint)
    assert base.is_file() and deployment.store.root in base.parents
    assert ticket.recipe["epochs"] == 2 and ticket.method_options == {"max_epochs": 2.0}
    assert ticket.verify == "standard" and isinstance(ticket.teacher_seed, int)
    with deployment.sessions() as s:
        job = jobs.get_job(s, ticket.job_id)
        req = deletions.get_deletion_request(s, sub.body["id"])
    assert job["status"] == "running" and job["worker"] == "w1" and job["attempts"] == 1
    assert job["teacher_seed"] == ticket.teacher_seed
    assert req["status"] == "running" and req["started_at"]
    assert _claim(deployment, ticket.job_id, "w2") is None  # held by a live worker


def test_two_concurrent_claimers_one_wins(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    for round_ in range(3):
        sub = deployment.submit("m", train[round_ * 3 : round_ * 3 + 3])
        barrier = threading.Barrier(4)
        won: list[Any] = []

        def claim(worker: str, job_id: str, gate: threading.Barrier, out: list[Any]) -> None:
            gate.wait()
            t = _claim(deployment, job_id, worker)
            if t is not None:
                out.append(t)

        threads = [
            threading.Thread(target=claim, args=(f"w{i}", sub.enqueue_job_id, barrier, won)) for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        with deployment.sessions() as s:
            assert jobs.get_job(s, sub.enqueue_job_id)["attempts"] == 1
            assert jobs.mark_cancelled(s, sub.enqueue_job_id) == []


def test_jobs_of_a_model_run_strictly_in_order(deployment: Any, make_checkpoint: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    first = deployment.submit("m", train[:3])
    second = deployment.submit("m", train[3:6], verify="retrain")  # a second job, behind it
    assert second.enqueue_job_id and second.enqueue_job_id != first.enqueue_job_id
    assert _claim(deployment, second.enqueue_job_id) is None  # not its turn
    with deployment.sessions() as s:
        assert jobs.get_job(s, second.enqueue_job_id)["status"] == "queued"
    t1 = _claim(deployment, first.enqueue_job_id)
    assert _claim(deployment, second.enqueue_job_id) is None  # the first is running
    res = _complete(deployment, t1.job_id, make_checkpoint(seed=1))
    assert res.published and res.version == 2 and res.next_job_id == second.enqueue_job_id
    t2 = _claim(deployment, second.enqueue_job_id)
    assert t2 is not None and t2.base_version == 2  # runs on the latest version at claim time
    assert t2.forgotten_ids == sorted(train[:6])
    res2 = _complete(deployment, t2.job_id, make_checkpoint(seed=2))
    assert res2.version == 3
    with deployment.sessions() as s:
        chain = [
            (v.version, v.parent_version)
            for v in s.scalars(select(ModelVersion).order_by(ModelVersion.version))
        ]
    assert chain == [(1, None), (2, 1), (3, 2)]


def test_complete_publishes_version_tombstones_and_audit(deployment: Any, make_checkpoint: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    a = deployment.submit("m", train[:3], callback_url="https://example.org/hook")
    b = deployment.submit("m", train[2:5])
    ticket = _claim(deployment, a.enqueue_job_id)
    assert ticket.forget_ids == sorted(train[:5])
    weights = make_checkpoint(seed=3)
    res = _complete(deployment, ticket.job_id, weights)
    assert res.published and res.verdict == "passed" and res.version == 2
    with deployment.sessions() as s:
        job = jobs.get_job(s, ticket.job_id)
        ra = deletions.get_deletion_request(s, a.body["id"])
        rb = deletions.get_deletion_request(s, b.body["id"])
        v = s.scalar(select(ModelVersion).where(ModelVersion.version == 2))
        tombs = sorted(s.scalars(select(Tombstone.sample_id)))
        from app.db.models import CallbackDelivery

        callbacks = list(s.scalars(select(CallbackDelivery)))
    assert job["status"] == "succeeded" and job["result_version"] == 2 and job["phase"] == "done"
    assert job["metrics"]["acc_test"] == 0.95 and job["verdict"]["status"] == "passed"
    for r in (ra, rb):
        assert r["status"] == "succeeded" and r["result_version"] == 2
        assert r["metrics"]["acc_forget"] == 0.5 and r["finished_at"]
    assert v.parent_version == 1 and v.job_id == ticket.job_id and v.forgotten_count == 5
    assert tombs == sorted(train[:5])
    assert [c.request_id for c in callbacks] == [a.body["id"]]
    stored = deployment.store.resolve(v.path)
    assert stored.read_bytes() == weights
    assert set(load(weights)) == set(load(stored.read_bytes()))
    manifest = deployment.store.read_manifest(v.manifest_path)
    assert manifest["parent_version"] == 1 and manifest["version"] == 2
    assert manifest["teacher_seed"] == 7 and manifest["method"] == "feature_constraint"
    assert manifest["forgotten"]["count"] == 5 and manifest["sha256"] == v.sha256
    assert manifest["architecture"]["name"] == "small_cnn"
    assert manifest["dataset"]["name"] == "tiny" and manifest["metrics"]["acc_test"] == 0.95
    with deployment.sessions() as s:
        actions = [e["action"] for e in audit.list_events(s, limit=1000).items]
        report = audit.verify_chain(s)
    for needed in (
        "request.accepted",
        "job.queued",
        "job.started",
        "model.version.published",
        "job.succeeded",
        "request.succeeded",
    ):
        assert needed in actions
    assert report.ok and report.checked == len(actions)


def test_a_second_child_of_the_same_parent_is_refused(deployment: Any, make_checkpoint: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    first = deployment.submit("m", train[:2])
    t1 = _claim(deployment, first.enqueue_job_id)
    _complete(deployment, t1.job_id, make_checkpoint(seed=4))
    # A second job is made to believe it also runs on v1, as a racing worker would.
    second = deployment.submit("m", train[2:4])
    t2 = _claim(deployment, second.enqueue_job_id)
    with deployment.sessions() as s:
        s.execute(update(Job).where(Job.id == t2.job_id).values(base_version=1))
        from app.db.models import ModelRow

        s.execute(update(ModelRow).values(latest_version=1))
        s.commit()
    with pytest.raises(Conflict, match="fork"):
        _complete(deployment, t2.job_id, make_checkpoint(seed=5))
    with deployment.sessions() as s:
        assert [v.version for v in s.scalars(select(ModelVersion))] == [1, 2]
        assert jobs.get_job(s, t2.job_id)["status"] == "running"


def test_stale_attempt_cannot_publish_or_report(deployment: Any, make_checkpoint: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    sub = deployment.submit("m", train[:2])
    t1 = _claim(deployment, sub.enqueue_job_id, "w1")
    with deployment.sessions() as s:
        s.execute(update(Job).values(heartbeat_at=utcnow() - timedelta(seconds=120)))
        s.commit()
    assert sub.enqueue_job_id in _stale(deployment)
    t2 = _claim(deployment, sub.enqueue_job_id, "w2", timeout=60)
    assert t2 is not None and t2.attempt == 2 and t2.forget_ids == t1.forget_ids
    with deployment.sessions() as s, pytest.raises(StaleAttempt):
        jobs.record_progress(
            s,
            sub.enqueue_job_id,
            phase="unlearning",
            step=1,
            total_steps=9,
            losses={},
            weights={},
            eta_seconds=None,
            worker="w1",
        )
    with pytest.raises(StaleAttempt):
        _complete(deployment, sub.enqueue_job_id, make_checkpoint(), attempt=1)
    res = _complete(deployment, sub.enqueue_job_id, make_checkpoint(seed=9), attempt=2)
    assert res.published and res.version == 2
    with pytest.raises(StaleAttempt):
        _complete(deployment, sub.enqueue_job_id, make_checkpoint(seed=10))


def _stale(dep: Any, grace: float = 0.0, hb: float = 60.0) -> list[str]:
    with dep.sessions() as s:
        return jobs.find_stale_jobs(s, queued_grace_s=grace, heartbeat_timeout_s=hb)


def test_sweeper_query_finds_lost_messages_only(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    a = deployment.submit("m", train[:2])
    b = deployment.submit("m", train[2:4], verify="retrain")
    assert _stale(deployment, grace=3600) == []
    assert _stale(deployment) == [a.enqueue_job_id]  # b waits behind a: not claimable
    with deployment.sessions() as s:
        jobs.mark_enqueued(s, [a.enqueue_job_id])
    assert _stale(deployment, grace=3600) == []
    _claim(deployment, a.enqueue_job_id)
    assert _stale(deployment) == []  # running with a live heartbeat; b still behind it
    with deployment.sessions() as s:
        s.execute(
            update(Job)
            .where(Job.id == a.enqueue_job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=600))
        )
        s.commit()
    assert _stale(deployment) == [a.enqueue_job_id]
    assert b.enqueue_job_id not in _stale(deployment)


def test_progress_and_cooperative_cancel(deployment: Any, make_checkpoint: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    sub = deployment.submit("m", train[:2])
    t = _claim(deployment, sub.enqueue_job_id)
    with deployment.sessions() as s:
        assert (
            jobs.record_progress(
                s,
                t.job_id,
                phase="unlearning",
                step=5,
                total_steps=20,
                losses={"forget": 0.3, "recover": 1.2},
                weights={"forget": 0.6, "recover": 0.4},
                eta_seconds=3.0,
            )
            is False
        )
        view = jobs.get_job(s, t.job_id)
        assert view["progress"] == 0.25 and view["losses"]["forget"] == 0.3
        assert view["weights"]["recover"] == 0.4 and view["eta_seconds"] == 3.0
        assert jobs.cancel_job(s, t.job_id, actor="u")["status"] == "running"
        assert (
            jobs.record_progress(
                s,
                t.job_id,
                phase="unlearning",
                step=6,
                total_steps=20,
                losses={},
                weights={},
                eta_seconds=None,
            )
            is True
        )
        jobs.mark_cancelled(s, t.job_id)
        assert jobs.get_job(s, t.job_id)["status"] == "cancelled"
        assert deletions.get_deletion_request(s, sub.body["id"])["status"] == "cancelled"
        assert s.scalars(select(ModelVersion.version)).all() == [1]


def test_failed_verdict_publishes_nothing_and_keeps_evidence(deployment: Any, make_checkpoint: Any) -> None:
    deployment.upload_model("m", policy={"max_acc_forget": 0.1})
    train, _ = deployment.ids()
    sub = deployment.submit("m", train[:2])
    t = _claim(deployment, sub.enqueue_job_id)
    res = _complete(deployment, t.job_id, make_checkpoint())
    assert not res.published and res.verdict == "failed" and res.fallback_job_id is None
    with deployment.sessions() as s:
        job = jobs.get_job(s, t.job_id)
        req = deletions.get_deletion_request(s, sub.body["id"])
        assert s.scalars(select(ModelVersion.version)).all() == [1]
        assert s.scalars(select(Tombstone.sample_id)).all() == []
    assert job["status"] == "failed" and job["metrics"]["acc_forget"] == 0.5
    assert job["verdict"]["status"] == "failed" and "max_acc_forget" in job["verdict"]["reasons"][0]
    assert job["error"]["code"] == "verdict_failed"
    assert req["status"] == "failed" and req["verdict"]["passed"] is False


def test_failed_verdict_runs_the_policy_fallback(deployment: Any, make_checkpoint: Any) -> None:
    deployment.upload_model("m", policy={"max_acc_forget": 0.1, "fallback_method": "retrain"})
    train, _ = deployment.ids()
    sub = deployment.submit("m", train[:2])
    t = _claim(deployment, sub.enqueue_job_id)
    res = _complete(deployment, t.job_id, make_checkpoint())
    assert not res.published and res.fallback_job_id and res.enqueue == [res.fallback_job_id]
    with deployment.sessions() as s:
        assert deletions.get_deletion_request(s, sub.body["id"])["job_id"] == res.fallback_job_id
    t2 = _claim(deployment, res.fallback_job_id)
    assert t2.kind == "retrain" and t2.method == "retrain" and t2.forget_ids == sorted(train[:2])
    res2 = _complete(
        deployment,
        t2.job_id,
        make_checkpoint(seed=8),
        metrics={**METRICS, "acc_forget": 0.05},
        method="retrain",
    )
    assert res2.published and res2.version == 2
    with deployment.sessions() as s:
        req = deletions.get_deletion_request(s, sub.body["id"])
    assert req["status"] == "succeeded" and req["result_version"] == 2


def test_acc_test_drop_against_the_parent_is_checked(deployment: Any, make_checkpoint: Any) -> None:
    deployment.upload_model("m", policy={"max_acc_test_drop": 0.02})
    train, _ = deployment.ids()
    a = deployment.submit("m", train[:2])
    _complete(deployment, _claim(deployment, a.enqueue_job_id).job_id, make_checkpoint(seed=1))
    b = deployment.submit("m", train[2:4])
    res = _complete(
        deployment,
        _claim(deployment, b.enqueue_job_id).job_id,
        make_checkpoint(seed=2),
        metrics={**METRICS, "acc_test": 0.90},
    )
    assert not res.published
    assert res.verdict_detail["checks"][0]["check"] == "max_acc_test_drop"


def test_train_job_publishes_version_one(deployment: Any, make_checkpoint: Any) -> None:
    from app.services import models

    with deployment.sessions() as s:
        reg = models.register_model_train(
            s,
            principal=deployment.principal,
            name="t",
            dataset="tiny",
            architecture="small_cnn",
            num_classes=4,
            recipe={"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 8, "seed": 3},
            settings=deployment.settings,
        )
    assert reg.body["latest_version"] is None and reg.job_id
    train, _ = deployment.ids()
    pending = deployment.submit("t", train[:2])  # queued behind the train job
    assert _claim(deployment, pending.enqueue_job_id) is None
    t = _claim(deployment, reg.job_id)
    assert t.kind == "train" and t.base_version is None and t.base_checkpoint is None
    assert t.forget_ids == [] and t.recipe["seed"] == 3
    res = _complete(deployment, t.job_id, make_checkpoint(), method="train", teacher_seed=None)
    assert res.published and res.version == 1 and res.next_job_id == pending.enqueue_job_id
    t2 = _claim(deployment, pending.enqueue_job_id)
    assert t2.base_version == 1


def test_unlearn_without_a_version_fails_cleanly(deployment: Any) -> None:
    from app.services import models

    with deployment.sessions() as s:
        reg = models.register_model_train(
            s,
            principal=deployment.principal,
            name="t",
            dataset="tiny",
            architecture="small_cnn",
            num_classes=4,
            recipe={},
            settings=deployment.settings,
        )
    train, _ = deployment.ids()
    pending = deployment.submit("t", train[:2])
    _claim(deployment, reg.job_id)
    with deployment.sessions() as s:
        assert jobs.fail_job(s, reg.job_id, error="boom", code="worker_error") == [pending.enqueue_job_id]
    assert _claim(deployment, pending.enqueue_job_id) is None
    with deployment.sessions() as s:
        job = jobs.get_job(s, pending.enqueue_job_id)
        req = deletions.get_deletion_request(s, pending.body["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "no_base_version"
    assert req["status"] == "failed"


def test_job_with_everything_already_forgotten_succeeds_without_work(
    deployment: Any, make_checkpoint: Any
) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    a = deployment.submit("m", train[:3])
    ta = _claim(deployment, a.enqueue_job_id)
    b = deployment.submit("m", train[:3])  # same IDs, a new job while a runs
    _complete(deployment, ta.job_id, make_checkpoint(seed=1))
    assert _claim(deployment, b.enqueue_job_id) is None
    with deployment.sessions() as s:
        req = deletions.get_deletion_request(s, b.body["id"])
        assert req["status"] == "succeeded" and req["result_version"] == 2
        assert s.scalars(select(ModelVersion.version).order_by(ModelVersion.version)).all() == [
            1,
            2,
        ]


def test_exhausted_attempts_fail_the_job(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    sub = deployment.submit("m", train[:2])
    for i in range(2):
        assert _claim(deployment, sub.enqueue_job_id, f"w{i}") is not None
        with deployment.sessions() as s:
            s.execute(update(Job).values(heartbeat_at=utcnow() - timedelta(seconds=999)))
            s.commit()
    with deployment.sessions() as s:
        ticket = jobs.claim_job(s, sub.enqueue_job_id, "w9", store=deployment.store,
                                heartbeat_timeout_s=60, max_attempts=2)
        assert ticket is None
        job = jobs.get_job(s, sub.enqueue_job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "too_many_attempts"


def test_non_finite_evidence_is_stored_as_null(deployment: Any, make_checkpoint: Any) -> None:
    # A badly scaled model can give an infinite feature distance; JSON (and PostgreSQL) has no
    # such number, and the job must still publish.
    deployment.upload_model("m")
    train, _ = deployment.ids()
    job_id = deployment.submit("m", train[:2]).enqueue_job_id
    ticket = _claim(deployment, job_id)
    result = _complete(deployment, ticket.job_id, make_checkpoint(seed=3),
                       metrics={**METRICS, "feature_distance": float("inf"), "zrf": float("nan")},
                       history=[{"step": 1, "losses": {"forget": float("inf")}}])
    assert result.published
    with deployment.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "succeeded"
        assert job.metrics["feature_distance"] is None and job.metrics["zrf"] is None
        assert job.metrics["acc_test"] == METRICS["acc_test"]
