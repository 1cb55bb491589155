"""A worker SIGKILLed in the middle of a job: the job still ends `succeeded`, exactly once.

The API runs (`lethe serve --no-worker`) with a short heartbeat timeout; a first worker takes
a train job and is killed mid-training; a second worker starts. The sweeper sees the expired
heartbeat and re-enqueues the job, the second worker claims it (attempt 2) and publishes one
version. No partial file is left in the store and the audit chain verifies. Run on both
deployments.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from e2e_harness import Service, start_service, start_worker, stop_process, wait_until

pytestmark = pytest.mark.slow

LONG_RECIPE = {"optimizer": "sgd", "lr": 0.01, "epochs": 40, "batch_size": 8, "seed": 0}
FAST_RECOVERY = {
    "LETHE_HEARTBEAT_TIMEOUT_S": "5",
    "LETHE_SWEEPER_INTERVAL_S": "1",
    "LETHE_QUEUED_GRACE_S": "2",
}


def _kill_mid_job_and_recover(service: Service, dataset: Path) -> None:
    client = service.client
    first = start_worker(service, "w1")
    second: subprocess.Popen[bytes] | None = None
    try:
        client.register_dataset("tiny", "npz", str(dataset), {})
        created = client.register_model(
            "tiny-cnn", dataset="tiny", architecture="small_cnn", num_classes=4,
            recipe=LONG_RECIPE,
        )
        job_id = created["job_id"]

        def training() -> bool:
            job = client.get_job(job_id)
            return job["phase"] == "training" and job["step"] >= 5

        wait_until(training, timeout=180, what="the train job to be training")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = client.get_job(job_id)
        assert killed_at["status"] == "running" and killed_at["attempts"] == 1
        assert killed_at["step"] < killed_at["total_steps"]

        second = start_worker(service, "w2")
        job = client.wait_for_job(job_id, timeout=300)
        assert job["status"] == "succeeded", (job, service.logs())
        assert job["attempts"] == 2 and str(job["worker"]).startswith("w2@")
        assert job["result_version"] == 1

        versions = client.list_versions("tiny-cnn")
        assert [v["version"] for v in versions] == [1]
        root = service.var_dir / "models"
        files = sorted(p.name for p in (root / "tiny-cnn" / "checkpoints").iterdir())
        assert files == [f"{versions[0]['sha256']}.safetensors"], files
        assert not [p for p in root.rglob("*") if p.name.startswith(".tmp-")]

        events = client.list_audit(limit=1000)
        started = [e for e in events if e["action"] == "job.started"
                   and e["subject"] == f"job:{job_id}"]
        assert len(started) == 2
        assert [e["action"] for e in events].count("model.version.published") == 1
        assert client.verify_audit()["ok"] is True
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)


def test_worker_killed_mid_job_embedded(tiny_npz: Path, tmp_path: Path) -> None:
    """SQLite + SQL broker (a consumed message dies with the worker; the sweeper re-sends)."""
    service = start_service(FAST_RECOVERY, tmp_path / "var", ("--no-worker",))
    try:
        _kill_mid_job_and_recover(service, tiny_npz)
    finally:
        assert service.stop() == 0, service.logs()


def test_worker_killed_mid_job_postgres_redis(
    tiny_npz: Path, tmp_path: Path, postgres_redis_env: dict[str, str]
) -> None:
    """PostgreSQL + Redis (the unacked message waits for its visibility timeout; the sweeper
    does not wait for it)."""
    env = {**FAST_RECOVERY, **postgres_redis_env}
    service = start_service(env, tmp_path / "var", ("--no-worker",))
    try:
        _kill_mid_job_and_recover(service, tiny_npz)
    finally:
        assert service.stop() == 0, service.logs()

