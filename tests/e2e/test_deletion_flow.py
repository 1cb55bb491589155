"""Issue 3's end-to-end flow against real processes, once embedded and once on PostgreSQL + Redis.

`lethe serve --no-bootstrap` starts uvicorn and a real Celery worker; everything below goes
over HTTP on loopback: register a dataset, train a tiny model (v1), POST a deletion request
for 10 IDs, follow it to `succeeded`, check the new version's lineage, download it (sha256 =
ETag), load it with the engine's checkpoint loader, recompute its accuracy on the forgotten
IDs, and re-verify the audit chain.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e_harness import REPO, Service, pid_alive, start_service

from app.cli import bootstrap_demo
from app.client import Conflict, LetheClient, NotFound, Unauthorized, Unprocessable
from engine.checkpoint import load_model
from engine.datasets import DatasetSpec, load_dataset

RECIPE = {"optimizer": "sgd", "lr": 0.05, "epochs": 3, "batch_size": 32, "seed": 0}
# The flow is under test here, not unlearning quality (the engine's benchmark owns that): a
# tiny model's verdict must not hinge on a few test samples.
POLICY = {"max_acc_test_drop": 1.0, "max_gap": None, "max_avg_gap": None}
JOB_TIMEOUT_S = 240.0


def _accuracy_on(path: Path, dataset: Path, ids: list[str], num_classes: int) -> float:
    """Top-1 accuracy of the checkpoint at `path` on the samples `ids`, computed here."""
    data = load_dataset(DatasetSpec(kind="npz", uri=str(dataset)), "tiny")
    model = load_model("small_cnn", num_classes, data.input_shape, path)
    idx = data.indices_of(ids)
    x = torch.from_numpy(data.images[idx]).float().div_(255.0)
    with torch.no_grad():
        predicted = model(x).argmax(dim=1).numpy()
    return float(np.mean(predicted == data.labels[idx]))


def _run_flow(service: Service, dataset: Path, tmp_path: Path) -> list[str]:
    client: LetheClient = service.client
    client.register_dataset("tiny", "npz", str(dataset), {})
    info = client.get_dataset("tiny")
    assert info["num_samples"] == 160
    created = client.register_model(
        "tiny-cnn", dataset="tiny", architecture="small_cnn", num_classes=4, recipe=RECIPE,
        policy=POLICY,
    )
    train_job = created.get("job_id") or created["job"]["id"]
    job = client.wait_for_job(train_job, timeout=JOB_TIMEOUT_S)
    assert job["status"] == "succeeded", (job, service.logs())
    v1 = client.get_version("tiny-cnn", "latest")
    assert v1["version"] == 1 and v1["parent"] is None

    train_ids = [r["sample_id"] for r in client.list_samples("tiny", split="train", limit=200)]
    forget = train_ids[:10]
    request = client.create_deletion_request(
        "tiny-cnn", forget, subject_ref="dsr-e2e-1", reason="e2e", idempotency_key="e2e-1"
    )
    assert request["status"] in {"accepted", "queued", "running"}
    final = client.wait_for_request(request["id"], timeout=JOB_TIMEOUT_S)
    assert final["status"] == "succeeded", (final, service.logs())
    job = client.get_job(final["job_id"])
    assert job["status"] == "succeeded" and job["kind"] == "unlearn"
    assert request["id"] in job["request_ids"]
    assert job["base_version"] == 1 and job["result_version"] == final["result_version"] == 2

    v2 = client.get_version("tiny-cnn", 2)
    assert v2["parent"] == 1
    assert v2["forgotten_count"] == 10
    assert client.get_model("tiny-cnn")["latest_version"] == 2

    got = client.download_checkpoint("tiny-cnn", 2, tmp_path / "v2.safetensors")
    body = Path(got["path"]).read_bytes()
    assert hashlib.sha256(body).hexdigest() == got["etag"] == v2["sha256"]
    assert len(body) == v2["size_bytes"]

    acc = _accuracy_on(Path(got["path"]), dataset, forget, num_classes=4)
    assert acc == pytest.approx(float(job["metrics"]["acc_forget"]), abs=1e-9)

    check = client.verify_audit()
    assert check["ok"] is True and check["first_bad_seq"] is None
    events = client.list_audit(limit=1000)
    assert check["checked"] == len(events)
    actions = [e["action"] for e in events]
    for needed in (
        "dataset.registered",
        "model.registered",
        "request.accepted",
        "job.queued",
        "job.started",
        "job.succeeded",
        "model.version.published",
        "checkpoint.downloaded",
    ):
        assert needed in actions, (needed, actions)
    mine = client.list_audit(request_id=request["id"])
    assert {"request.accepted"} <= {e["action"] for e in mine}
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    for prev, cur in zip(events, events[1:], strict=False):
        assert cur["prev_hash"] == prev["hash"]
    test_id = next(
        r["sample_id"] for r in client.list_samples("tiny", split="test", limit=1)
    )
    _typed_errors(service, train_ids, test_id, request["id"])
    return train_ids


def _typed_errors(service: Service, dataset_ids: list[str], test_id: str, done_req: str) -> None:
    """The client raises typed errors that carry the problem+json `code`."""
    client = service.client
    with pytest.raises(Unprocessable) as unknown:
        client.create_deletion_request("tiny-cnn", ["no-such-sample", dataset_ids[0]])
    assert unknown.value.code == "unknown_sample_ids"
    assert "no-such-sample" in str(unknown.value.problem)
    with pytest.raises(Unprocessable) as held_out:
        client.create_deletion_request("tiny-cnn", [test_id])
    assert held_out.value.code == "test_split_samples"
    with pytest.raises(NotFound) as missing:
        client.get_model("no-such-model")
    assert missing.value.code == "model_not_found"
    with pytest.raises(Conflict) as late:
        client.cancel_deletion_request(done_req)
    assert late.value.code == "not_cancellable"
    with LetheClient(service.url, "lethe_not-a-real-key") as stranger, pytest.raises(Unauthorized):
        stranger.list_models()


def _cli(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(service.env, LETHE_API_KEY=service.client_key)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "--url", service.url, *args],
        capture_output=True, text=True, env=env, timeout=JOB_TIMEOUT_S, cwd=REPO,
    )


def _cli_flow(service: Service, ids: list[str], tmp_path: Path) -> None:
    """`lethe submit --wait`, `status`, `download`, `audit verify` against the live service."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    done = _cli(service, "submit", "--model", "tiny-cnn", "--ids", *ids, "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "status succeeded" in done.stdout and "new version v3" in done.stdout
    assert "acc_forget" in done.stdout and "verdict passed" in done.stdout
    assert service.client.get_version("tiny-cnn", 3)["parent"] == 2
    status = _cli(service, "status")
    assert status.returncode == 0 and "tiny-cnn" in status.stdout
    got = _cli(service, "download", "--model", "tiny-cnn", "-o", str(tmp_path))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "tiny-cnn-v3.safetensors").is_file()
    sha = hashlib.sha256((tmp_path / "tiny-cnn-v3.safetensors").read_bytes()).hexdigest()
    assert sha == service.client.get_version("tiny-cnn", 3)["sha256"] and sha in got.stdout
    audit = _cli(service, "audit", "verify")
    assert audit.returncode == 0 and "audit chain OK" in audit.stdout
    bad = _cli(service, "submit", "--model", "tiny-cnn", "--ids", "no-such-sample")
    assert bad.returncode == 1 and "unknown_sample_ids" in bad.stderr
    assert "Traceback" not in bad.stderr


def _bootstrap(service: Service, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`serve`'s first-start bootstrap (run here on the tiny data): registers, trains, shows
    progress and metrics; a second run finds everything in place and does nothing."""
    ds = {"name": "boot-data", "kind": "npz", "uri": str(dataset), "options": {}}
    model = {"name": "boot-model", "dataset": "boot-data", "architecture": "small_cnn",
             "num_classes": 4, "recipe": RECIPE, "policy": POLICY}
    capsys.readouterr()
    job_id = bootstrap_demo(service.client, dataset=ds, model=model)
    out = capsys.readouterr().out
    assert job_id is not None
    assert "registered dataset boot-data (160 samples: 120 train / 40 test)" in out
    assert f"registered model boot-model; training v1 (job {job_id})" in out
    assert "training" in out and "boot-model v1 ready; metrics:" in out and "acc_test" in out
    assert service.client.get_model("boot-model")["latest_version"] == 1
    assert bootstrap_demo(service.client, dataset=ds, model=model) is None
    assert capsys.readouterr().out == ""


def _stop_cleanly(service: Service) -> None:
    """Ctrl-C on `lethe serve` stops the API and the worker and exits 0."""
    children = service.child_pids()
    assert len(children) == 2, service.logs()
    assert service.stop() == 0, service.logs()
    time.sleep(0.5)
    assert not [pid for pid in children if pid_alive(pid)], service.logs()


def test_deletion_flow_embedded(
    tiny_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite database, SQL broker, one worker: the whole flow over HTTP, then the CLI."""
    service = start_service({}, tmp_path / "var")
    try:
        assert (service.var_dir / "admin.key").stat().st_mode & 0o777 == 0o600
        train_ids = _run_flow(service, tiny_npz, tmp_path)
        _cli_flow(service, train_ids[10:13], tmp_path / "cli")
        _bootstrap(service, tiny_npz, capsys)
    finally:
        _stop_cleanly(service)


def test_deletion_flow_postgres_redis(
    tiny_npz: Path, tmp_path: Path, postgres_redis_env: dict[str, str]
) -> None:
    """A fresh PostgreSQL database and Redis: the same flow, the same code path."""
    service = start_service(postgres_redis_env, tmp_path / "var")
    try:
        _run_flow(service, tiny_npz, tmp_path)
    finally:
        _stop_cleanly(service)

