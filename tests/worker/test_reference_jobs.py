"""Reference jobs through the worker glue: scheduled with version 1, outside the model's line,
statistics stored (never weights), read back by the engine, and the wait policy."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from worker_world import LENIENT_POLICY, World

from app.db.models import ModelReference
from app.services import references as reference_service
from app.services.jobs import claim_job
from worker.tasks import run_job


def _run(world: World, job_id: str, worker: str = "w1") -> Any:
    return run_job(job_id, worker=worker, settings=world.settings, sessions=world.sessions,
                   store=world.store, enqueue=world.enqueue)


def _row(world: World, model: str = "tiny") -> ModelReference:
    from app.db.models import ModelRow

    with world.sessions() as s:
        row = s.scalar(
            select(ModelReference).join(ModelRow, ModelRow.id == ModelReference.model_id)
            .where(ModelRow.name == model)
        )
        assert row is not None
        s.expunge(row)
        return row


def _store_files(world: World, model: str = "tiny") -> list[str]:
    root = world.store.root / model
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_reference_job_runs_outside_the_line_and_stores_statistics_only(any_ref_world: World) -> None:
    from engine.evidence import load_reference_stats

    world = any_ref_world
    train_job = world.register_model()
    row = _row(world)
    assert row.status == "queued" and row.k == 2 and row.job_id
    ref_job = row.job_id
    assert world.job(ref_job).kind == "reference"
    assert "job.queued" in world.actions(f"job:{ref_job}")

    # Neither waits for the other: the reference job (later in position) runs before the
    # train job has even started.
    assert _run(world, ref_job).outcome == "succeeded", world.job(ref_job).error
    row = _row(world)
    assert row.status == "ready" and row.pool_size and row.seconds and row.stats_sha256
    assert row.seconds_per_reference and len(row.seconds_per_reference) == 2
    assert "references.ready" in world.actions("model:tiny/references")
    assert _store_files(world) == [f"references/{row.stats_sha256}.npz"]  # no weights
    stats = load_reference_stats(world.store.resolve(row.stats_path or ""))
    assert stats is not None

    assert _run(world, train_job).outcome == "succeeded"
    view = reference_service.get_references(world.sessions(), "tiny")
    assert view["status"] == "ready" and view["train_seconds"] and view["cost_ratio"]
    assert view["job_id"] == ref_job and view["k"] == 2

    # An unlearning job's ticket names the ready statistics.
    _, job_id = world.submit("tiny", world.train_ids()[:2])
    assert job_id
    with world.sessions() as s:
        ticket = claim_job(s, job_id, "w2", heartbeat_timeout_s=30, store=world.store)
    assert ticket is not None and ticket.reference_stats
    assert ticket.reference_stats.endswith(f"{row.stats_sha256}.npz")


def test_a_queued_reference_job_never_blocks_the_line(ref_world: World) -> None:
    world = ref_world
    train_job = world.register_model(policy=LENIENT_POLICY)
    assert _run(world, train_job).outcome == "succeeded"
    _, job_id = world.submit("tiny", world.train_ids()[:2])
    assert job_id
    with world.sessions() as s:
        ticket = claim_job(s, job_id, "w2", heartbeat_timeout_s=30, store=world.store)
    assert ticket is not None and ticket.reference_stats is None  # runs at once: pending
    assert _row(world).status == "queued"


def test_wait_for_references_holds_unlearning_until_they_are_ready(ref_world: World) -> None:
    world = ref_world
    train_job = world.register_model(policy={**LENIENT_POLICY, "wait_for_references": True})
    assert _run(world, train_job).outcome == "succeeded"
    _, job_id = world.submit("tiny", world.train_ids()[:2])
    assert job_id
    assert _run(world, job_id).outcome == "skipped"
    assert world.job(job_id).status == "queued"
    ref = _row(world).job_id
    assert ref
    world.enqueued.clear()
    run = _run(world, ref)
    assert run.outcome == "succeeded" and job_id in run.follow_ups
    assert job_id in world.enqueued
    with world.sessions() as s:
        ticket = claim_job(s, job_id, "w2", heartbeat_timeout_s=30, store=world.store)
    assert ticket is not None and ticket.reference_stats


def test_a_cancelled_reference_job_releases_waiting_jobs(ref_world: World) -> None:
    from app.services.jobs import cancel_job

    world = ref_world
    train_job = world.register_model(policy={**LENIENT_POLICY, "wait_for_references": True})
    assert _run(world, train_job).outcome == "succeeded"
    _, job_id = world.submit("tiny", world.train_ids()[:2])
    assert job_id and _run(world, job_id).outcome == "skipped"
    ref = _row(world).job_id
    assert ref
    with world.sessions() as s:
        cancel_job(s, ref, actor="t")
    assert _row(world).status == "cancelled"
    with world.sessions() as s:
        ticket = claim_job(s, job_id, "w2", heartbeat_timeout_s=30, store=world.store)
    assert ticket is not None and ticket.reference_stats is None
