"""A `reference` job end to end on a real deployment: scheduled with version 1, its worker
SIGKILLed mid-run, resumed by the sweeper on another worker, `ready` with statistics only (no
weights anywhere), shown by `GET /v1/models/{name}/references`, then read by a deletion.
Run on both deployments (embedded; PostgreSQL + Redis)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from e2e_harness import Service, start_service, start_worker, stop_process, wait_until

pytestmark = pytest.mark.slow

RECIPE = {"optimizer": "sgd", "lr": 0.05, "epochs": 6, "batch_size": 8, "seed": 0}
POLICY = {"max_acc_test_drop": 1.0, "max_gap": None, "max_avg_gap": None}
ENV = {
    "LETHE_HEARTBEAT_TIMEOUT_S": "5",
    "LETHE_SWEEPER_INTERVAL_S": "1",
    "LETHE_QUEUED_GRACE_S": "2",
    "LETHE_REFERENCES": "on",
    "LETHE_REFERENCE_K": "4",
}


def _references_interrupted_and_resumed(service: Service, dataset: Path) -> None:
    client = service.client
    first = start_worker(service, "w1", preload=True)
    second: subprocess.Popen[bytes] | None = None
    try:
        client.register_dataset("tiny", "npz", str(dataset), {})
        created = client.register_model(
            "tiny-cnn", dataset="tiny", architecture="small_cnn", num_classes=4,
            recipe=RECIPE, policy=POLICY,
        )
        refs = client.get_references("tiny-cnn")
        assert refs["status"] in ("queued", "running") and refs["k"] == 4, refs
        ref_job = str(refs["job_id"])
        assert client.get_job(ref_job)["kind"] == "reference"
        assert client.wait_for_job(created["job_id"], timeout=300)["status"] == "succeeded"

        def referencing() -> bool:
            job = client.get_job(ref_job)
            return job["phase"] == "training" and job["step"] >= 5

        wait_until(referencing, timeout=180, what="the reference job to be training")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = client.get_job(ref_job)
        assert killed_at["status"] == "running" and killed_at["attempts"] == 1
        assert client.get_references("tiny-cnn")["status"] == "running"

        second = start_worker(service, "w2", preload=True)
        job = client.wait_for_job(ref_job, timeout=600)
        assert job["status"] == "succeeded", (job, service.logs())
        assert job["attempts"] == 2 and str(job["worker"]).startswith("w2@")
        assert job["result_version"] is None

        refs = client.get_references("tiny-cnn")
        assert refs["status"] == "ready" and refs["k"] == 4 and refs["job_id"] == ref_job
        assert refs["seconds"] and refs["train_seconds"] and refs["cost_ratio"]
        assert refs["pool_size"] == 120 and refs["finished_at"]

        # Statistics only: the store holds v1's checkpoint and manifest and one statistics
        # file; no reference weights, no scratch file.
        versions = client.list_versions("tiny-cnn")
        assert [v["version"] for v in versions] == [1]
        root = service.var_dir / "models"
        model_files = sorted(p.relative_to(root / "tiny-cnn").as_posix()
                             for p in (root / "tiny-cnn").rglob("*") if p.is_file())
        checkpoints = [f for f in model_files if f.startswith("checkpoints/")]
        stats = [f for f in model_files if f.startswith("references/")]
        assert checkpoints == [f"checkpoints/{versions[0]['sha256']}.safetensors"], model_files
        assert len(stats) == 1 and stats[0].endswith(".npz"), model_files
        assert len(model_files) == 3, model_files  # + v1's manifest
        assert not [p for p in root.rglob("*") if p.name.startswith(".tmp-")]
        from engine.evidence import load_reference_stats

        assert load_reference_stats(root / "tiny-cnn" / stats[0]) is not None

        # A deletion now runs with the ready statistics.
        train_ids = [s["sample_id"] for s in client.list_samples("tiny", split="train", limit=3)]
        req = client.create_deletion_request("tiny-cnn", train_ids[:2])
        done = client.wait_for_request(req["id"], timeout=300)
        assert done["status"] == "succeeded", (done, service.logs())
        # Its evidence was judged with the statistics and is stated in the signed receipt.
        receipt = client.get_receipt(req["id"])
        assert receipt["forgetting_test"]["status"] in ("tested", "test_has_no_power"), receipt
        assert receipt["forgetting_test"]["references"]["status"] == "ready"
        assert receipt["verdict"]["forgetting"] == receipt["forgetting_test"]["status"]

        started = [e for e in client.list_audit(limit=1000)
                   if e["action"] == "job.started" and e["subject"] == f"job:{ref_job}"]
        assert len(started) == 2
        assert client.verify_audit()["ok"] is True
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)


def test_reference_job_killed_and_resumed_embedded(tiny_npz: Path, tmp_path: Path) -> None:
    """SQLite + SQL broker."""
    service = start_service(ENV, tmp_path / "var", ("--no-worker",))
    try:
        _references_interrupted_and_resumed(service, tiny_npz)
    finally:
        assert service.stop() == 0, service.logs()


def test_reference_job_killed_and_resumed_postgres_redis(
    tiny_npz: Path, tmp_path: Path, postgres_redis_env: dict[str, str]
) -> None:
    """PostgreSQL + Redis."""
    service = start_service({**ENV, **postgres_redis_env}, tmp_path / "var", ("--no-worker",))
    try:
        _references_interrupted_and_resumed(service, tiny_npz)
    finally:
        assert service.stop() == 0, service.logs()
