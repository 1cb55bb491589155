"""The `RUN_JOB` glue against a real database, store and engine (tiny CPU model).

`run_job` is called in-process, exactly as the Celery task calls it; `World.enqueue` records
what the worker would send to the broker next.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from worker_world import World

from app.services import jobs as job_service
from worker import tasks
from worker.tasks import run_job


def _train(world: World, name: str = "tiny", **kwargs: Any) -> str:
    job_id = world.register_model(name, **kwargs)
    assert run_job(job_id, worker="w-train", settings=world.settings, sessions=world.sessions,
                   store=world.store, enqueue=world.enqueue).outcome == "succeeded"
    return job_id


def _spy_progress(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every progress write (then perform it for real)."""
    calls: list[dict[str, Any]] = []
    real = job_service.record_progress

    def recording(session: Any, job_id: str, **kw: Any) -> bool:
        calls.append({"t": time.monotonic(), **kw})
        return real(session, job_id, **kw)

    monkeypatch.setattr(job_service, "record_progress", recording)
    return calls


def test_train_then_unlearn_publishes_a_chain(
    any_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = any_world
    calls = _spy_progress(monkeypatch)
    train_job = world.register_model()
    started = time.monotonic()
    run = run_job(train_job, worker="w1", settings=world.settings, sessions=world.sessions,
                  store=world.store, enqueue=world.enqueue)
    elapsed = time.monotonic() - started
    assert run.outcome == "succeeded", world.job(train_job).error
    job = world.job(train_job)
    assert (job.status, job.phase, job.result_version, job.worker) == ("succeeded", "done", 1, "w1")
    assert job.attempts == 1 and job.metrics is not None and "acc_test" in job.metrics

    phases = [c["phase"] for c in calls]
    assert phases[0] == "loading" and "training" in phases and phases[-1] == "publishing"
    # Throttled: about two writes a second, plus one per phase change.
    changes = sum(1 for a, b in zip(phases, phases[1:], strict=False) if a != b) + 1
    assert len(calls) <= 2 * elapsed + changes + 2, (len(calls), elapsed)
    training = [c for c in calls if c["phase"] == "training"]
    assert all(c["total_steps"] > 0 and 0 <= c["step"] <= c["total_steps"] for c in training)

    forget = world.train_ids()[:10]
    request_id, unlearn_job = world.submit("tiny", forget)
    assert unlearn_job is not None
    run = run_job(unlearn_job, worker="w1", settings=world.settings, sessions=world.sessions,
                  store=world.store, enqueue=world.enqueue)
    assert run.outcome == "succeeded", world.job(unlearn_job).error
    job = world.job(unlearn_job)
    assert job.base_version == 1 and job.result_version == 2
    assert {"acc_forget", "acc_retain", "acc_test", "mia_forget"} <= set(job.metrics or {})
    assert "unlearning" in [c["phase"] for c in calls if c["t"] > started + elapsed]

    versions = world.versions()
    assert [(v.version, v.parent_version) for v in versions] == [(1, None), (2, 1)]
    assert versions[1].forgotten_count == 10
    path = world.store.resolve(versions[1].path)
    assert path.is_file() and path.stat().st_size == versions[1].size_bytes
    assert world.actions(f"job:{unlearn_job}") == ["job.queued", "job.started", "job.succeeded"]
    assert "model.version.published" in world.actions()


def test_job_claimed_twice_runs_once(any_world: World) -> None:
    world = any_world
    _train(world)
    _, job_id = world.submit("tiny", world.train_ids()[:10])
    assert job_id is not None
    outcomes: dict[str, str] = {}

    def deliver(worker: str) -> None:
        outcomes[worker] = run_job(job_id, worker=worker, settings=world.settings,
                                   sessions=world.sessions, store=world.store).outcome

    threads = [threading.Thread(target=deliver, args=(f"w{i}",)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(outcomes.values()) == ["skipped", "succeeded"], outcomes
    # A late redelivery of the same message does nothing either.
    again = run_job(job_id, worker="w3", settings=world.settings, sessions=world.sessions,
                    store=world.store)
    assert again.outcome == "skipped"
    assert [v.version for v in world.versions()] == [1, 2]
    assert world.actions(f"job:{job_id}").count("job.started") == 1
    assert world.job(job_id).attempts == 1


def _start_long_train_job(world: World) -> tuple[str, threading.Thread, dict[str, Any]]:
    """A 400-epoch train job running on worker w1 in a thread, past its first training step.

    Returns the job id, the thread, and the dict that receives `run_job`'s result as "run".
    """
    long_recipe = {"optimizer": "sgd", "lr": 0.01, "batch_size": 8, "seed": 0, "epochs": 400}
    job_id = world.register_model(recipe=long_recipe)
    result: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: result.update(run=run_job(job_id, worker="w1", settings=world.settings,
                                                 sessions=world.sessions, store=world.store)),
    )
    runner.start()
    deadline = time.monotonic() + 120
    while world.job(job_id).phase != "training" or world.job(job_id).step == 0:
        assert time.monotonic() < deadline and runner.is_alive(), world.job(job_id).error
        time.sleep(0.05)
    return job_id, runner, result


def test_cancellation_flag_stops_a_running_job(world: World) -> None:
    job_id, runner, result = _start_long_train_job(world)
    asked = time.monotonic()
    with world.sessions() as s:
        job_service.cancel_job(s, job_id, actor="test")
    runner.join(timeout=60)
    stopped_after = time.monotonic() - asked
    assert not runner.is_alive()
    assert result["run"].outcome == "cancelled"
    assert stopped_after < 5.0, stopped_after  # cancel flag polled at most every 0.5 s
    job = world.job(job_id)
    assert job.status == "cancelled" and job.result_version is None
    assert 0 < job.step < job.total_steps
    assert world.versions() == []
    assert not list(world.store.root.rglob("*.safetensors")) if world.store.root.exists() else True
    assert world.actions(f"job:{job_id}")[-1] == "job.cancelled"


def test_corrupt_base_checkpoint_fails_with_evidence(world: World) -> None:
    _train(world)
    v1 = world.versions()[0]
    path = world.store.resolve(v1.path)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:100])
    request_id, job_id = world.submit("tiny", world.train_ids()[:5])
    assert job_id is not None
    run = run_job(job_id, worker="w1", settings=world.settings, sessions=world.sessions,
                  store=world.store)
    assert run.outcome == "failed"
    job = world.job(job_id)
    assert job.status == "failed" and job.error is not None
    assert job.error["code"] == run.detail
    assert job.error["code"] in {"invalid_checkpoint", "invalid_input"}
    assert "Traceback" not in job.error["message"] and job.error["message"]
    assert [v.version for v in world.versions()] == [1]
    assert world.actions(f"job:{job_id}")[-1] == "job.failed"


def test_a_base_checkpoint_whose_logits_overflow_fails_its_job_with_the_reason(world: World) -> None:
    # Finite weights (a load accepts them) whose logits overflow float32: the job says so
    # instead of crashing in the method's or the verification's statistics.
    from safetensors.numpy import load, save

    _train(world)
    path = world.store.resolve(world.versions()[0].path)
    tensors = load(path.read_bytes())
    tensors["head.weight"] = np.full_like(tensors["head.weight"], 3e38)
    tensors["head.bias"] = np.full_like(tensors["head.bias"], 3e38)
    path.chmod(0o644)
    path.write_bytes(save(tensors))
    _, job_id = world.submit("tiny", world.train_ids()[:5])
    assert job_id is not None
    run = run_job(job_id, worker="w1", settings=world.settings, sessions=world.sessions,
                  store=world.store)
    job = world.job(job_id)
    assert run.outcome == "failed" and job.error is not None
    assert job.error["code"] == run.detail == "non_finite_outputs"
    assert "NaN or infinite logits on 5 of 5 samples to forget" in job.error["message"]
    assert [v.version for v in world.versions()] == [1]


def test_missing_dataset_file_fails_the_train_job(world: World) -> None:
    job_id = world.register_model()
    Path(world.dataset_path).unlink()
    run = run_job(job_id, worker="w1", settings=world.settings, sessions=world.sessions,
                  store=world.store)
    assert run.outcome == "failed"
    job = world.job(job_id)
    assert job.status == "failed" and job.error is not None
    assert job.error["code"] == "invalid_input"
    assert "npz file not found" in job.error["message"]
    assert world.versions() == []


def test_failed_verdict_enqueues_the_fallback_job(world: World) -> None:
    _train(world, policy={"min_acc_test": None})
    with world.sessions() as s:
        from app.db.models import ModelRow

        model = s.query(ModelRow).filter_by(name="tiny").one()
        model.policy = {**model.policy, "min_acc_test": 1.5, "fallback_method": "retrain"}
        s.commit()
    request_id, job_id = world.submit("tiny", world.train_ids()[:5])
    assert job_id is not None
    world.enqueued.clear()
    run = run_job(job_id, worker="w1", settings=world.settings, sessions=world.sessions,
                  store=world.store, enqueue=world.enqueue)
    assert run.outcome == "failed" and run.detail == "failed"
    assert len(run.follow_ups) == 1 and world.enqueued == list(run.follow_ups)
    fallback = world.job(world.enqueued[0])
    assert fallback.kind == "retrain" and fallback.status == "queued"
    assert fallback.fallback_of == job_id and fallback.enqueued_at is not None
    assert world.job(job_id).error["code"] == "verdict_failed"  # type: ignore[index]
    # The fallback retrains from the recipe without the IDs, and is judged the same way.
    again = run_job(fallback.id, worker="w1", settings=world.settings, sessions=world.sessions,
                    store=world.store, enqueue=world.enqueue)
    assert again.outcome == "failed"
    retrained = world.job(fallback.id)
    assert retrained.status == "failed" and retrained.error["code"] == "verdict_failed"  # type: ignore[index]
    assert {"acc_forget", "acc_retain", "acc_test", "mia_forget"} <= set(retrained.metrics or {})
    assert [v.version for v in world.versions()] == [1]


def test_celery_task_is_registered_late_acked_and_runs_the_job(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.queue import RUN_JOB
    from app.settings import get_settings
    from worker.main import build_worker_app, worker_argv

    monkeypatch.setenv("LETHE_VAR_DIR", str(world.settings.var_dir))
    monkeypatch.setenv("LETHE_RUN_BACKGROUND_LOOPS", "false")
    get_settings.cache_clear()
    tasks._sessions_for.cache_clear()
    try:
        app = build_worker_app(get_settings())
        app.loader.import_default_modules()
        task = app.tasks[RUN_JOB]
        assert task.acks_late is True and task.reject_on_worker_lost is True
        job_id = world.register_model()
        outcome = task.apply(args=[job_id]).get()
        assert outcome == "succeeded"
        assert world.job(job_id).status == "succeeded"
    finally:
        get_settings.cache_clear()
        tasks._sessions_for.cache_clear()
    argv = worker_argv("n@h", "INFO")
    assert "--pool=solo" in argv and "--concurrency=1" in argv and "--queues=gpu" in argv


def test_worker_modules_do_not_import_torch() -> None:
    code = (
        "import sys, worker.tasks, worker.main, worker.health, app.cli, app.client;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr


def test_a_worker_that_lost_its_claim_stops_without_publishing(world: World) -> None:
    job_id, runner, result = _start_long_train_job(world)
    # As if w1's heartbeat had expired: the sweeper's redelivery lets w2 take the job over.
    with world.sessions() as s:
        ticket = job_service.claim_job(s, job_id, "w2", store=world.store, heartbeat_timeout_s=0.0)
    assert ticket is not None and ticket.attempt == 2
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert result["run"].outcome == "stale"
    job = world.job(job_id)
    assert (job.status, job.worker, job.attempts) == ("running", "w2", 2)
    assert world.versions() == []
    assert world.actions(f"job:{job_id}").count("job.failed") == 0


def test_worker_shutdown_interrupts_the_job_and_leaves_it_to_be_rerun(world: World) -> None:
    from celery.signals import worker_shutting_down

    job_id, runner, result = _start_long_train_job(world)
    try:
        # What Celery sends when the worker gets SIGTERM (warm) or SIGQUIT (cold).
        worker_shutting_down.send(sender="w1", sig="SIGTERM", how="Warm", exitcode=0)
        runner.join(timeout=30)
        assert not runner.is_alive()
    finally:
        tasks.SHUTDOWN.clear()
    assert result["run"].outcome == "interrupted"
    job = world.job(job_id)
    assert (job.status, job.attempts, job.error) == ("running", 1, None)
    assert job.step < job.total_steps and world.versions() == []
    # Once its heartbeat is stale, the sweeper finds it and another worker can claim it.
    time.sleep(1.0)
    with world.sessions() as s:
        stale = job_service.find_stale_jobs(s, queued_grace_s=0.0, heartbeat_timeout_s=0.5)
    assert job_id in stale
    with world.sessions() as s:
        ticket = job_service.claim_job(s, job_id, "w2", store=world.store, heartbeat_timeout_s=0.5)
    assert ticket is not None and ticket.attempt == 2


def test_a_re_attempt_removes_what_a_dead_attempt_left_in_the_store(
    world: World, make_checkpoint: Any
) -> None:
    """An attempt killed while publishing leaves a scratch file (mid-write) or finished files
    no version names (before the commit). The job's next attempt removes both first, then
    publishes: the store holds exactly the files the versions name."""
    _train(world)
    _, job_id = world.submit("tiny", world.train_ids()[:5])
    assert job_id is not None
    with world.sessions() as s:
        ticket = job_service.claim_job(s, job_id, "w-dead", store=world.store, heartbeat_timeout_s=30.0)
        assert ticket is not None
    # What the dead attempt left: an unpublished checkpoint + manifest, and a scratch file of
    # a process that no longer exists.
    orphan = world.store.put("tiny", make_checkpoint(seed=7), {"job_id": job_id, "version": 2})
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    scratch = world.store._scratch().with_name(
        f".tmp-{world.store._namespace}-{int(gone.stdout)}-00aa00aa00aa00aa")
    scratch.write_bytes(b"half a checkpoint")

    settings = world.settings.model_copy(update={"heartbeat_timeout_s": 0.0})  # w-dead is dead
    run = run_job(job_id, worker="w2", settings=settings, sessions=world.sessions,
                  store=world.store, enqueue=world.enqueue)
    assert run.outcome == "succeeded", world.job(job_id).error
    assert world.job(job_id).attempts == 2
    versions = world.versions()
    assert [v.version for v in versions] == [1, 2]
    named = {v.path for v in versions} | {v.manifest_path for v in versions}
    on_disk = {world.store.relative(p) for p in (world.store.root / "tiny").rglob("*")
               if p.is_file()}
    assert on_disk == named
    assert not orphan.path.exists() and not orphan.manifest_path.exists()
    assert not scratch.exists()
