"""Fault injection against real processes: a deletion request answered 202 is never lost, never
run twice into two model versions, and never leaves a half-written checkpoint.

Every test drives real `lethe` processes over HTTP and reads the database directly only to
watch a job between two slices of a frozen worker. The faults:

1. `test_worker_killed_at_random_points_*` (PostgreSQL + Redis, and embedded): ten unlearning
   jobs in a row, each interrupted by SIGKILL of its worker at a point from a plan the seeded
   RNG shuffles: message taken but job not claimed, right after the claim, mid-unlearning,
   during verification, in publication before the store write, while the checkpoint is being
   written, after it was written and before the version row commits. To land exactly there
   the worker runs in slices of a few milliseconds (SIGSTOP/SIGCONT) and the job's row (and
   the store) is read while it is frozen; SIGKILL comes a random number of slices later. Two
   workers run at all times, so the other one takes the job over once the sweeper re-sends
   it; a new one replaces the dead. Every job ends `succeeded` with exactly one new version,
   the versions form one chain, the store holds exactly the versions' checkpoints and
   manifests and no scratch file, the final manifest names exactly the IDs requested, and the
   audit chain verifies.
2. Broker loss. `test_redis_restarted_empty_with_jobs_queued`: a private `redis-server` is
   killed and started again empty while jobs wait in its queue (and one request arrives while
   it is down); the sweeper re-sends every job. `test_embedded_broker_message_taken_then_
   worker_killed`: the SQL transport hides a message once a worker took it, so a worker killed
   before it claims the job loses the message for good; the sweeper re-sends it.
3. `test_api_killed_during_burst_of_1000_requests`: the API process alone (`serve --api-only`)
   is SIGKILLed in the middle of 1,000 concurrent POSTs, each with its own Idempotency-Key, and
   started again on the same port and database; clients retry failures with the same key. Every
   key ends with exactly one request, a retry answers the original request, and every
   requested ID is forgotten by the final version.
4. `test_two_workers_burst_and_duplicate_messages`: two workers, a burst of requests for one
   model, and every job's message delivered several more times: one chain, each ID forgotten.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_harness import (
    PrivateRedis,
    Service,
    create_admin_key,
    free_port,
    start_api,
    start_service,
    start_worker,
    stop_process,
    wait_until,
    wait_worker_ready,
)
from sample_data import write_tiny_dataset
from sqlalchemy import create_engine, text

from app.client import LetheClient

pytestmark = pytest.mark.slow

SHORT_RECIPE = {"optimizer": "sgd", "lr": 0.05, "epochs": 2, "batch_size": 32, "seed": 0}
# The flow is under test, not unlearning quality: a tiny model's verdict must not hinge on a
# few test samples.
POLICY = {"max_acc_test_drop": 1.0, "max_gap": None, "max_avg_gap": None}
FAST_RECOVERY = {
    "LETHE_HEARTBEAT_TIMEOUT_S": "3",
    "LETHE_SWEEPER_INTERVAL_S": "0.5",
    "LETHE_QUEUED_GRACE_S": "2",
}
JOB_TIMEOUT_S = 180.0
FINAL = ("succeeded", "failed", "cancelled")
PHASES = ("queued", "loading", "unlearning", "verifying", "publishing", "done")
#: Seed of the kill plan; LETHE_FAULT_SEED replays another one.
SEED = int(os.environ.get("LETHE_FAULT_SEED", "20240611"))


# -- reading the deployment directly -------------------------------------------------------


class Probe:
    """A look at the database, the broker and the store, for the moments a worker is frozen.

    Plain connections (no `BEGIN IMMEDIATE`), so a read never waits for a frozen worker's
    SQLite write lock (WAL) or PostgreSQL row lock. Writes nothing, except the lock that
    `claims_blocked` holds.
    """

    def __init__(self, service: Service) -> None:
        url = service.env.get("LETHE_DATABASE_URL") or f"sqlite:///{service.var_dir / 'lethe.db'}"
        self.engine = create_engine(url)
        self.broker_url = service.env.get("LETHE_BROKER_URL", "")
        self.broker_db = service.var_dir / "broker.db"
        self.store = service.var_dir / "models"
        self._redis: Any = None
        if self.broker_url.startswith("redis://"):
            import redis

            self._redis = redis.Redis.from_url(self.broker_url, socket_timeout=5)

    def close(self) -> None:
        self.engine.dispose()
        if self._redis is not None:
            self._redis.close()

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's row: status, phase, attempts, worker, base and result version."""
        with self.engine.connect() as conn:
            row = conn.execute(
                text("SELECT j.status, j.phase, j.attempts, j.worker, j.base_version, "
                     "j.result_version, m.name AS model FROM jobs j "
                     "JOIN models m ON m.id = j.model_id WHERE j.id = :id"),
                {"id": job_id},
            ).mappings().one()
        return dict(row)

    def scratch_files(self) -> list[Path]:
        """Files a store writer has not renamed into place yet."""
        return list(self.store.rglob(".tmp-*"))

    def unpublished_checkpoints(self, model: str) -> set[str]:
        """Checkpoint files of `model` in the store that no version row names."""
        with self.engine.connect() as conn:
            published = set(conn.execute(
                text("SELECT v.sha256 FROM model_versions v JOIN models m ON m.id = v.model_id "
                     "WHERE m.name = :name"),
                {"name": model},
            ).scalars())
        folder = self.store / model / "checkpoints"
        return {p.name.removesuffix(".safetensors") for p in folder.glob("*.safetensors")} - published

    def waiting_messages(self, job_id: str) -> int | None:
        """Messages for `job_id` still waiting in the broker (not yet taken by a worker); None
        while a frozen worker holds the SQL broker's lock mid-commit."""
        if self._redis is not None:
            return sum(job_id.encode() in m for m in self._redis.lrange("gpu", 0, -1))
        try:
            conn = sqlite3.connect(f"file:{self.broker_db}?mode=ro", uri=True, timeout=0.05)
            try:
                return int(conn.execute(
                    "SELECT count(*) FROM kombu_message WHERE visible = 1 AND payload LIKE ?",
                    (f"%{job_id}%",),
                ).fetchone()[0])
            finally:
                conn.close()
        except sqlite3.OperationalError:
            return None

    @contextlib.contextmanager
    def claims_blocked(self, job_id: str) -> Iterator[None]:
        """Hold a lock that a worker's claim of `job_id` waits for (the job's row on
        PostgreSQL, the write lock on SQLite): a worker can take the message, not the job."""
        if self.engine.dialect.name == "sqlite":
            lock = sqlite3.connect(self.engine.url.database or "", timeout=30, isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")
                yield
            finally:
                lock.close()  # rolls back
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id})
            try:
                yield
            finally:
                conn.rollback()

    def broker_locked(self) -> bool:
        """True while someone holds the SQL broker's write lock (a worker frozen mid-poll would
        make every enqueue wait for it and fail)."""
        if self._redis is not None or not self.broker_db.exists():
            return False
        conn = sqlite3.connect(self.broker_db, timeout=0.01, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            conn.close()

    def all_messages(self, job_id: str) -> int:
        """Messages ever stored for `job_id` by the SQL transport (taken ones stay, hidden)."""
        with sqlite3.connect(f"file:{self.broker_db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute(
                "SELECT count(*) FROM kombu_message WHERE payload LIKE ?", (f"%{job_id}%",)
            ).fetchone()[0])


# -- freezing and killing a worker ----------------------------------------------------------


def _wait_state(pid: int, stopped: bool) -> None:
    """Wait until the kernel reports `pid` stopped (T) or running again."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if (state in ("T", "t")) == stopped:
            return
        time.sleep(0.0005)
    raise AssertionError(f"process {pid} did not {'stop' if stopped else 'continue'}")


def _freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    _wait_state(pid, stopped=True)


def _thaw(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)
    _wait_state(pid, stopped=False)


def _freeze_idle(pids: list[int], probe: Probe) -> None:
    """Freeze idle workers, but none in the middle of polling the SQL broker (its lock would
    block every enqueue until they are thawed)."""
    for _ in range(1000):
        for pid in pids:
            _freeze(pid)
        if not probe.broker_locked():
            return
        for pid in pids:
            _thaw(pid)
        time.sleep(0.01)
    raise AssertionError("the SQL broker stayed locked")


@dataclass
class Kill:
    """Where one SIGKILL landed."""

    target: str
    job_id: str
    at: dict[str, Any]  # the job's row right after the kill
    slices: int  # worker slices run after the target was first seen
    killed: list[str]  # names of the workers killed

    @property
    def mid_job(self) -> bool:
        """True when the job had not finished when its worker died."""
        return self.at["status"] not in FINAL


def _reached(target: str, job: dict[str, Any], probe: Probe, job_id: str) -> bool:
    if target == "delivered":  # a worker took the message but has not claimed the job yet
        return job["status"] == "queued" and probe.waiting_messages(job_id) == 0
    if target == "claimed":
        return job["status"] == "running"
    if target == "writing":  # the new checkpoint (or its manifest) is being written
        return job["status"] == "running" and bool(probe.scratch_files())
    if target == "written":  # the checkpoint is in place, the version row not committed yet
        return job["status"] == "running" and bool(probe.unpublished_checkpoints(job["model"]))
    return job["status"] == "running" and PHASES.index(job["phase"]) >= PHASES.index(target)


#: The phase from which the claimant is run in slices; before it, it runs freely. Before a
#: claim nobody knows which worker will take the job, so every worker runs in slices.
_SLICE_FROM = {"unlearning": "unlearning", "verifying": "unlearning", "publishing": "verifying",
               "writing": "publishing", "written": "publishing"}


def kill_worker_at(
    workers: dict[str, subprocess.Popen[bytes]],
    probe: Probe,
    submit: Callable[[], str],
    target: str,
    rng: random.Random,
) -> Kill:
    """Run `submit()` (it returns a job id) and SIGKILL the worker that runs that job once the
    job reached `target`, a random number of short slices later.

    The job's row is read only while the worker is frozen (SIGSTOP), so the kill lands where
    the row says. For targets before the claim every worker is frozen before `submit`, since
    any may take the job; for `delivered` (a worker took the message, nobody claimed the job)
    a lock holds the claim back and every worker is killed, as which one took the message is
    not visible. Killed workers are removed from `workers`; `Kill.mid_job` says if the kill
    landed in the job."""
    extra = rng.randint(0, 4) if target not in ("writing", "written") else 0
    slice_s = rng.uniform(0.002, 0.008) if target not in ("writing", "written") else 0.0005
    ran_after = 0
    frozen: list[str] = []
    job: dict[str, Any] = {"worker": None}
    with contextlib.ExitStack() as stack:
        try:
            if target in ("delivered", "claimed"):
                frozen = list(workers)
                _freeze_idle([workers[name].pid for name in frozen], probe)
            job_id = submit()
            if target == "delivered":
                # Taking a message and claiming its job are milliseconds apart: the claim waits.
                stack.enter_context(probe.claims_blocked(job_id))
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while time.monotonic() < deadline:
                job = probe.job(job_id)
                if job["status"] in FINAL:
                    break
                if not frozen:
                    if job["status"] == "running" and PHASES.index(job["phase"]) >= (
                        PHASES.index(_SLICE_FROM[target])
                    ):
                        frozen = [str(job["worker"]).removesuffix("@e2e")]
                        _freeze(workers[frozen[0]].pid)
                    else:
                        time.sleep(0.003)
                    continue
                if _reached(target, job, probe, job_id):
                    if ran_after >= extra:
                        break
                    ran_after += 1
                for name in frozen:
                    _thaw(workers[name].pid)
                time.sleep(slice_s)
                for name in frozen:
                    _freeze(workers[name].pid)
            else:
                raise AssertionError(f"job {job_id} never reached {target}: {probe.job(job_id)}")
        finally:
            claimant = str(job["worker"] or "").removesuffix("@e2e")
            victims = [claimant] if claimant in workers else (frozen or list(workers))
            for name in victims:
                os.kill(workers[name].pid, signal.SIGKILL)
            for name in victims:
                workers.pop(name).wait(timeout=30)
            for name in frozen:
                if name in workers:
                    _thaw(workers[name].pid)
    return Kill(target, job_id, probe.job(job_id), ran_after, victims)


# -- shared checks ------------------------------------------------------------------------


def forgotten_digest(ids: set[str] | list[str]) -> str:
    """The manifest's `forgotten.sha256`: sha256 over the sorted IDs, each followed by \\n."""
    h = hashlib.sha256()
    for sample_id in sorted(ids):
        h.update(sample_id.encode() + b"\n")
    return h.hexdigest()


def assert_one_lineage(service: Service, model: str, forgotten: set[str]) -> list[dict[str, Any]]:
    """Versions 1..N form one chain, each published by its own job, every job of the model
    succeeded; the store holds exactly the versions' checkpoints and manifests and no scratch
    file; the latest manifest forgot exactly `forgotten`; one `model.version.published` event
    per version; the audit chain verifies. Returns the versions."""
    client = service.client
    versions = sorted(client.list_versions(model, limit=None), key=lambda v: v["version"])
    numbers = [v["version"] for v in versions]
    assert numbers == list(range(1, len(versions) + 1)), numbers
    assert [v["parent"] for v in versions] == [None, *numbers[:-1]], versions
    jobs_of_versions = [v["job_id"] for v in versions]
    assert len(set(jobs_of_versions)) == len(versions), "a job published two versions"
    for job in client.list_jobs(model=model, limit=None):
        assert job["status"] == "succeeded", job
        if job["result_version"] != job["base_version"]:  # it published (not 'all forgotten')
            assert jobs_of_versions[job["result_version"] - 1] == job["id"], job

    root = service.var_dir / "models"
    checkpoints = sorted(p.name for p in (root / model / "checkpoints").iterdir())
    # Content-addressed: a version whose weights equal its parent's shares the parent's file.
    assert checkpoints == sorted({f"{v['sha256']}.safetensors" for v in versions}), (
        checkpoints, [(v["version"], v["sha256"]) for v in versions])
    assert not [p for p in root.rglob("*") if p.name.startswith(".tmp-")]
    # One manifest per version, and none of a publication that never committed.
    on_disk = [json.loads(p.read_bytes()) for p in (root / model / "manifests").iterdir()]
    assert sorted((m.get("version"), m["sha256"], m.get("job_id")) for m in on_disk) == sorted(
        (v["version"], v["sha256"], v["job_id"]) for v in versions), on_disk
    for v in versions:
        manifest = client.get_manifest(model, v["version"])
        assert manifest["sha256"] == v["sha256"] and manifest["version"] == v["version"]
        assert manifest["parent_version"] == v["parent"]

    latest = client.get_manifest(model, "latest")
    assert latest["forgotten"]["count"] == len(forgotten)
    assert latest["forgotten"]["sha256"] == forgotten_digest(forgotten)
    assert client.get_model(model)["forgotten_count"] == len(forgotten)

    events = client.list_audit(model=model, limit=None)
    published = [e for e in events if e["action"] == "model.version.published"]
    assert len(published) == len(versions)
    check = client.verify_audit()
    assert check["ok"] is True and check["first_bad_seq"] is None, check
    return versions


def upload_model(service: Service, name: str, checkpoint: bytes) -> None:
    """Register `name` on dataset `tiny` from a checkpoint upload (version 1, no worker)."""
    metadata = {"name": name, "dataset": "tiny", "architecture": "small_cnn", "num_classes": 4,
                "recipe": SHORT_RECIPE, "policy": POLICY}
    response = httpx.post(
        f"{service.url}/v1/models",
        headers={"Authorization": f"Bearer {service.client_key}"},
        data={"metadata": json.dumps(metadata)},
        files={"checkpoint": ("v1.safetensors", checkpoint, "application/octet-stream")},
        timeout=60,
    )
    assert response.status_code == 201, response.text


def train_ids(client: LetheClient, limit: int = 200) -> list[str]:
    return [r["sample_id"] for r in client.list_samples("tiny", split="train", limit=limit)]


def wait_all_final(client: LetheClient, model: str, timeout: float) -> None:
    """Wait until no request of `model` is open (accepted, queued or running)."""
    wait_until(lambda: client.get_model(model)["pending_requests"] == 0, timeout, interval=0.3,
               what=f"every request of {model} to finish")


# -- 1. a worker SIGKILLed at random points of ten unlearning jobs --------------------------

#: Where the ten kills land; shuffled by the seeded RNG. `delivered`: a worker took the
#: message, nobody claimed the job; `claimed`: in `loading`, right after the claim; `writing`:
#: while the new checkpoint or its manifest is being written; `written`: the checkpoint is in
#: place, its version row not committed.
KILL_PLAN = ["delivered", "claimed", "claimed", "unlearning", "unlearning", "verifying",
             "verifying", "publishing", "writing", "written"]
#: How often one target may be missed (the job finished before the kill) before the test
#: fails: `writing` lasts milliseconds and is caught about two times in three.
MAX_MISSES_PER_TARGET = 8


def _submit_into(
    client: LetheClient, model: str, ids: list[str], key: str, into: dict[str, Any]
) -> str:
    """POST a deletion request, keep its resource in `into`, return its job id."""
    into.update(client.create_deletion_request(model, ids, idempotency_key=key))
    return str(into["job_id"])


def _ten_kills(service: Service, dataset: Path) -> None:
    client = service.client
    rng = random.Random(SEED)
    plan = list(KILL_PLAN)
    rng.shuffle(plan)
    probe = Probe(service)
    # Two workers at all times, so the one left after a kill takes the job over as soon as
    # the sweeper re-sends it; the engine is imported up front, so a fresh one is warm too.
    workers: dict[str, subprocess.Popen[bytes]] = {}
    started = 0

    def top_up() -> None:
        nonlocal started
        while len(workers) < 2:
            workers[f"w{started}"] = start_worker(service, f"w{started}", preload=True)
            started += 1

    try:
        top_up()
        client.register_dataset("tiny", "npz", str(dataset), {})
        created = client.register_model("tiny-cnn", dataset="tiny", architecture="small_cnn",
                                        num_classes=4, recipe=SHORT_RECIPE, policy=POLICY)
        trained = client.wait_for_job(created["job_id"], timeout=JOB_TIMEOUT_S)
        assert trained["status"] == "succeeded", (trained, service.logs())
        for name in workers:
            wait_worker_ready(service, name)
        ids = train_ids(client)
        requested: set[str] = set()
        kills: list[Kill] = []
        submitted = 0
        for target in plan:
            for _ in range(MAX_MISSES_PER_TARGET + 1):
                forget = ids[2 * submitted : 2 * submitted + 2]
                assert len(forget) == 2, f"out of training IDs after {submitted} jobs"
                submitted += 1
                requested.update(forget)
                request: dict[str, Any] = {}
                submit = functools.partial(
                    _submit_into, client, "tiny-cnn", forget, f"fault-{submitted}", request)
                kill = kill_worker_at(workers, probe, submit, target, rng)
                top_up()
                if kill.mid_job:
                    break
                # Finished before the kill: a kill between jobs, not the fault asked for.
            else:
                raise AssertionError(f"could not kill a worker mid-job at {target}: {kill}")
            kills.append(kill)
            job = client.wait_for_job(kill.job_id, timeout=JOB_TIMEOUT_S, poll_interval=0.1)
            assert job["status"] == "succeeded", (kill, job, service.logs())
            assert job["attempts"] > kill.at["attempts"], (kill, job)
            assert job["result_version"] == job["base_version"] + 1, job
            assert str(job["worker"]).removesuffix("@e2e") not in kill.killed, (kill, job)
            final = client.get_deletion_request(request["id"])
            assert final["status"] == "succeeded" and final["result_version"] == job["result_version"]

        landed = [f"{k.target}->{k.at['status']}/{k.at['phase']}+{k.slices}" for k in kills]
        print(f"seed {SEED}: {submitted} jobs, kills landed at {landed}")
        assert len(kills) == len(plan)
        versions = assert_one_lineage(service, "tiny-cnn", requested)
        assert len(versions) == 1 + submitted
        started_events = client.list_audit(action="job.started", limit=None)
        for k in kills:  # one job.started per claim, however many attempts died
            assert len([e for e in started_events if e["subject"] == f"job:{k.job_id}"]) == (
                client.get_job(k.job_id)["attempts"]
            )
    finally:
        for proc in workers.values():
            stop_process(proc)
        probe.close()


def test_worker_killed_at_random_points_postgres_redis(
    tiny_npz: Path, tmp_path: Path, postgres_redis_env: dict[str, str]
) -> None:
    """Ten unlearning jobs, ten SIGKILLs at seeded random points, on PostgreSQL + Redis."""
    service = start_service({**FAST_RECOVERY, **postgres_redis_env}, tmp_path / "var",
                            ("--no-worker",))
    try:
        _ten_kills(service, tiny_npz)
    finally:
        assert service.stop() == 0, service.logs()


def test_worker_killed_at_random_points_embedded(tiny_npz: Path, tmp_path: Path) -> None:
    """The same on SQLite and the SQL broker."""
    service = start_service(FAST_RECOVERY, tmp_path / "var", ("--no-worker",))
    try:
        _ten_kills(service, tiny_npz)
    finally:
        assert service.stop() == 0, service.logs()


# -- 2. broker loss --------------------------------------------------------------------------

#: Unlearning options that keep a worker busy for seconds (no early stop, many passes).
LONG_UNLEARNING = {"early_stop": False, "max_epochs": 20, "forget_batch_size": 1}


def post_request(service: Service, model: str, ids: list[str], key: str,
                 method_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST one deletion request (with `method_options`, which the typed client does not send)."""
    body: dict[str, Any] = {"model": model, "sample_ids": ids}
    if method_options:
        body["method_options"] = method_options
    response = httpx.post(
        f"{service.url}/v1/deletion-requests", json=body, timeout=30,
        headers={"Authorization": f"Bearer {service.client_key}", "Idempotency-Key": key},
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def test_redis_restarted_empty_with_jobs_queued(
    tiny_npz: Path, tmp_path: Path, pg_database_url: str, make_checkpoint: Any
) -> None:
    """Redis (keeping nothing on disk) is killed while two jobs wait in its queue and a worker is
    busy, a request arrives while it is down, and it comes back empty: the sweeper re-sends
    every job, the worker reconnects, and every request ends `succeeded`."""
    broker = PrivateRedis(tmp_path / "redis")
    broker.start()
    env = {**FAST_RECOVERY, "LETHE_DATABASE_URL": pg_database_url, "LETHE_BROKER_URL": broker.url}
    service = start_service(env, tmp_path / "var", ("--no-worker",))
    worker: subprocess.Popen[bytes] | None = None
    r = broker.client()
    try:
        client = service.client
        client.register_dataset("tiny", "npz", str(tiny_npz), {})
        models = ["m0", "m1", "m2", "m3"]
        for seed, name in enumerate(models):
            upload_model(service, name, make_checkpoint(seed=seed))
        ids = train_ids(client)
        worker = start_worker(service, "w1", preload=True)
        wait_worker_ready(service, "w1")

        # The only worker is busy, and frozen there for the outage: mid-task with prefetch 1 it
        # takes no other message, so the next jobs wait in Redis's queue.
        busy = post_request(service, "m0", ids[0:3], "busy", LONG_UNLEARNING)
        wait_until(lambda: client.get_job(busy["job_id"])["phase"] == "unlearning", JOB_TIMEOUT_S,
                   interval=0.02, what="the busy job to unlearn")
        _freeze(worker.pid)
        try:
            waiting = [post_request(service, m, ids[3 * k + 3 : 3 * k + 6], f"waiting-{m}")
                       for k, m in enumerate(["m1", "m2"])]
            in_queue = r.lrange("gpu", 0, -1)
            for request in waiting:
                assert any(request["job_id"].encode() in m for m in in_queue), in_queue
            run_id = r.info("server")["run_id"]

            broker.kill()
            during = post_request(service, "m3", ids[9:12], "during-outage")
            assert during["status"] == "queued" and during["job_id"]
            broker.start()
            assert r.info("server")["run_id"] != run_id  # a new, empty server
            assert client.get_job(busy["job_id"])["status"] == "running"
        finally:
            _thaw(worker.pid)

        requests = [busy, *waiting, during]
        for request in requests:
            final = client.wait_for_request(request["id"], timeout=JOB_TIMEOUT_S, poll_interval=0.2)
            assert final["status"] == "succeeded", (final, service.logs())
        assert client.get_job(busy["job_id"])["attempts"] == 1  # the busy job was never lost
        for k, name in enumerate(models):
            versions = assert_one_lineage(service, name, set(ids[3 * k : 3 * k + 3]))
            assert len(versions) == 2
        # Jobs of other models are sent by their intake or by the sweeper only: completing
        # m1..m3 after the restart took the sweeper's re-send.
    finally:
        if worker is not None:
            stop_process(worker)
        r.close()
        assert service.stop() == 0, service.logs()
        broker.kill()


def test_embedded_broker_message_taken_then_worker_killed(
    tiny_npz: Path, tmp_path: Path, make_checkpoint: Any
) -> None:
    """Embedded deployment: kombu's SQL transport hides a message as soon as a worker takes it
    and never shows it again. A worker killed after taking the message and before claiming the
    job loses the message for good; the sweeper sends the job again and it completes once."""
    service = start_service(FAST_RECOVERY, tmp_path / "var", ("--no-worker",))
    probe = Probe(service)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        client = service.client
        client.register_dataset("tiny", "npz", str(tiny_npz), {})
        upload_model(service, "m", make_checkpoint())
        ids = train_ids(client)[:3]
        first = start_worker(service, "w1")
        workers.append(first)
        wait_worker_ready(service, "w1")

        _freeze_idle([first.pid], probe)
        request = client.create_deletion_request("m", ids, idempotency_key="lost-message")
        job_id = request["job_id"]
        assert probe.waiting_messages(job_id) == 1
        # Hold the database's write lock: the worker can take the message but cannot claim.
        lock = sqlite3.connect(service.var_dir / "lethe.db", timeout=30, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            _thaw(first.pid)
            wait_until(lambda: probe.waiting_messages(job_id) == 0, 60, interval=0.005,
                       what="the worker to take the message")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        lost = probe.job(job_id)
        assert lost["status"] == "queued" and lost["attempts"] == 0, lost  # never claimed
        assert probe.waiting_messages(job_id) == 0 and probe.all_messages(job_id) == 1  # lost

        second = start_worker(service, "w2")
        workers.append(second)
        job = client.wait_for_job(job_id, timeout=JOB_TIMEOUT_S, poll_interval=0.2)
        assert job["status"] == "succeeded", (job, service.logs())
        assert job["attempts"] == 1 and job["worker"] == "w2@e2e", job
        assert probe.all_messages(job_id) >= 2  # the sweeper sent it again
        assert client.get_deletion_request(request["id"])["status"] == "succeeded"
        assert_one_lineage(service, "m", set(ids))
    finally:
        for proc in workers:
            stop_process(proc)
        probe.close()
        assert service.stop() == 0, service.logs()


# -- 3. the API killed in the middle of a burst of 1,000 requests ----------------------------

BURST = 1000
BURST_THREADS = 16
BURST_RECIPE = {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 64, "seed": 0}


@dataclass
class Accepted:
    """What one Idempotency-Key finally got: its request id and how it got there."""

    key: str
    request_id: str
    failures: int  # attempts before the 202 (connection errors, 5xx, 409 in flight)
    replayed: bool  # the 202 was the stored response of an earlier attempt
    in_flight: int  # of the failures, 409s: the key was claimed by an attempt still running


def _post_until_accepted(
    http: httpx.Client, key: str, body: dict[str, Any], deadline: float
) -> Accepted:
    """A client that retries with the same Idempotency-Key until it gets its 202."""
    failures = in_flight_409s = 0
    while True:
        try:
            response: httpx.Response | None = http.post(
                "/v1/deletion-requests", json=body, headers={"Idempotency-Key": key}
            )
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 202:
            return Accepted(key, response.json()["id"], failures,
                            response.headers.get("Idempotent-Replayed") == "true", in_flight_409s)
        if response is not None and response.status_code < 500:
            in_flight = response.status_code == 409 and (
                response.json().get("code") == "idempotency_in_flight")
            assert in_flight, f"{key}: {response.status_code} {response.text}"
            in_flight_409s += 1
        failures += 1
        assert time.monotonic() < deadline, f"{key} got no 202 in time"
        time.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))


def test_api_killed_during_burst_of_1000_requests(
    tmp_path: Path, postgres_redis_env: dict[str, str]
) -> None:
    """1,000 concurrent POSTs, each with its own Idempotency-Key and sample ID; the API process
    (alone: `serve --api-only`) is SIGKILLed when about 40% were accepted and started again on
    the same port and database. Every key ends with exactly one request, retries answer the
    original request, every request completes, and the final version forgot every ID."""
    dataset = write_tiny_dataset(tmp_path / "burst.npz", per_class=340)  # 1,020 training IDs
    var = tmp_path / "var"
    env = {**FAST_RECOVERY, **postgres_redis_env}
    create_admin_key(env, var)
    port = free_port()
    apis = [start_api(env, var, port)]
    worker = start_worker(apis[0], "w1", preload=True)
    http = httpx.Client(
        base_url=apis[0].url, timeout=60,
        headers={"Authorization": f"Bearer {apis[0].client_key}"},
        limits=httpx.Limits(max_connections=BURST_THREADS),
    )
    try:
        client = apis[0].client
        client.register_dataset("tiny", "npz", str(dataset), {})
        created = client.register_model("burst", dataset="tiny", architecture="small_cnn",
                                        num_classes=4, recipe=BURST_RECIPE, policy=POLICY)
        trained = client.wait_for_job(created["job_id"], timeout=JOB_TIMEOUT_S)
        assert trained["status"] == "succeeded", (trained, apis[0].logs())
        ids = train_ids(client, limit=BURST)
        assert len(ids) == BURST
        bodies = {f"burst-{i:04d}": {"model": "burst", "sample_ids": [sample_id],
                                     "subject_ref": f"burst-{i:04d}"}
                  for i, sample_id in enumerate(ids)}

        accepted_count = 0
        count_lock = threading.Lock()
        deadline = time.monotonic() + 420

        def send(key: str) -> Accepted:
            nonlocal accepted_count
            got = _post_until_accepted(http, key, bodies[key], deadline)
            with count_lock:
                accepted_count += 1
            return got

        def kill_and_restart() -> float:
            wait_until(lambda: accepted_count >= BURST * 2 // 5, 300, interval=0.01,
                       what="40% of the burst accepted")
            os.kill(apis[-1].proc.pid, signal.SIGKILL)
            apis[-1].proc.wait(timeout=30)
            killed_at = accepted_count
            apis.append(start_api(env, var, port))
            return killed_at

        with concurrent.futures.ThreadPoolExecutor(BURST_THREADS + 1) as pool:
            killer = pool.submit(kill_and_restart)
            outcomes = list(pool.map(send, bodies))
            killed_at = killer.result()
        assert 0 < killed_at < BURST
        retried = [o for o in outcomes if o.failures]
        print(f"API killed after {killed_at} accepted; {len(retried)} keys retried, "
              f"{sum(o.replayed for o in outcomes)} answered by replay")
        assert retried, "the kill hit no request in flight"
        # Each key is sent by one client, one attempt at a time: a 409 could only come from a
        # claim the killed process left behind, and a claim commits with its request or not
        # at all.
        assert sum(o.in_flight for o in outcomes) == 0, [o for o in outcomes if o.in_flight][:5]

        # One request per key, and each request for its own key.
        by_key = {o.key: o.request_id for o in outcomes}
        assert len(by_key) == BURST and len(set(by_key.values())) == BURST
        client = apis[-1].client
        listed = client.list_deletion_requests(model="burst", limit=None)
        assert len(listed) == BURST  # nothing duplicated, nothing lost
        assert {r["id"]: r["subject_ref"] for r in listed} == {v: k for k, v in by_key.items()}

        # A retry with the same key answers the original request.
        again = [o.key for o in retried] + random.Random(SEED).sample(sorted(by_key), 50)
        for key in again:
            response = http.post("/v1/deletion-requests", json=bodies[key],
                                 headers={"Idempotency-Key": key})
            assert response.status_code == 202, response.text
            assert response.headers.get("Idempotent-Replayed") == "true"
            assert response.json()["id"] == by_key[key]

        wait_all_final(client, "burst", timeout=300)

        def final(request_id: str) -> dict[str, Any]:
            return dict(http.get(f"/v1/deletion-requests/{request_id}").json())

        with concurrent.futures.ThreadPoolExecutor(BURST_THREADS) as pool:
            finals = list(pool.map(final, by_key.values()))
        assert all(f["status"] == "succeeded" and f["result_version"] for f in finals), [
            f for f in finals if f["status"] != "succeeded"][:5]
        assert_one_lineage(apis[-1], "burst", set(ids))
        resent = client.create_deletion_request("burst", ids[:5])
        assert resent["status"] == "succeeded" and resent["already_forgotten_count"] == 5
    finally:
        http.close()
        stop_process(worker)
        for api in apis:
            api.client.close()
        assert apis[-1].stop() == 0, apis[-1].logs()


# -- 4. two workers, a burst for one model, every message delivered several times ------------


def test_two_workers_burst_and_duplicate_messages(
    tiny_npz: Path, tmp_path: Path, postgres_redis_env: dict[str, str], make_checkpoint: Any
) -> None:
    """Two workers consume one queue while 40 requests for one model arrive concurrently and
    every unfinished job of the model is sent to the broker again and again (a sweeper and a
    client racing, a broker redelivering): the versions still form one chain, each job
    publishes at most one version, and the final version forgot every requested ID."""
    from app.queue import QUEUE, RUN_JOB, create_celery
    from app.settings import Settings

    env = {**postgres_redis_env, "LETHE_SWEEPER_INTERVAL_S": "0.5", "LETHE_QUEUED_GRACE_S": "1"}
    service = start_service(env, tmp_path / "var", ("--no-worker",))
    workers = [start_worker(service, name, preload=True) for name in ("w1", "w2")]
    doorbell = create_celery(Settings(broker_url=postgres_redis_env["LETHE_BROKER_URL"],
                                      var_dir=tmp_path / "var"))
    stop_ringing = threading.Event()
    try:
        client = service.client
        client.register_dataset("tiny", "npz", str(tiny_npz), {})
        upload_model(service, "m", make_checkpoint())
        for name in ("w1", "w2"):
            wait_worker_ready(service, name)
        ids = train_ids(client)[:80]
        batches = [ids[2 * k : 2 * k + 2] for k in range(40)]

        def ring() -> int:
            sent = 0
            with LetheClient(service.url, service.client_key) as ringer:
                while not stop_ringing.is_set():
                    for job in ringer.list_jobs(model="m", limit=None):
                        if job["status"] not in FINAL:
                            doorbell.send_task(RUN_JOB, args=[job["id"]], queue=QUEUE)
                            sent += 1
                    time.sleep(0.05)
            return sent

        start = time.monotonic() + 0.5

        def submit(k: int) -> dict[str, Any]:
            # Spread over ~6 s so that jobs keep running while others queue (one burst in one
            # instant would coalesce into a single queued job).
            time.sleep(max(0.0, start + 0.15 * k - time.monotonic()))
            with LetheClient(service.url, service.client_key) as own:
                return dict(own.create_deletion_request("m", batches[k], idempotency_key=f"c{k}"))

        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            ringing = pool.submit(ring)
            accepted = list(pool.map(submit, range(len(batches))))
            wait_all_final(client, "m", timeout=JOB_TIMEOUT_S)
            stop_ringing.set()
            duplicates = ringing.result()
        assert len({r["id"] for r in accepted}) == len(batches)
        for request in accepted:
            final = client.get_deletion_request(request["id"])
            assert final["status"] == "succeeded" and final["result_version"], (
                final["status"], final["error"], final["verdict"], final["job_id"], service.logs())
        versions = assert_one_lineage(service, "m", set(ids))
        jobs = client.list_jobs(model="m", limit=None)
        print(f"{len(jobs)} jobs, {len(versions)} versions, {duplicates} extra messages, run by "
              f"{sorted({str(j['worker']) for j in jobs})}")
        assert duplicates > len(jobs)
    finally:
        stop_ringing.set()
        for proc in workers:
            stop_process(proc)
        doorbell.close()
        assert service.stop() == 0, service.logs()
