"""The governance client of the docs (`docs/opendsr_client.py`) against a live Lethe: it
fetches discovery and the certificate, posts an erasure, and verifies the signed callbacks
with `cryptography` alone, while the test plays the worker and the delivery loop."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import serve
from sqlalchemy import select

from app.db.models import DeletionRequest
from app.services import callbacks, jobs

CLIENT = Path(__file__).resolve().parents[2] / "docs" / "opendsr_client.py"


@pytest.fixture
def live(sqlite_deployment: Any, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """The API on a loopback port (uvicorn in a thread), model `m` on a dataset whose first
    three samples belong to subject `cust-7`."""
    dep = sqlite_deployment
    dep.register_with_subjects("subj", {"cust-7": ["s0000", "s0001", "s0002"]})
    dep.upload_model("m")
    with serve(dep.settings) as base:
        yield base, dep


def _job_of_the_erasure(dep: Any, deadline: float) -> str:
    while time.monotonic() < deadline:
        with dep.sessions() as s:
            job_id = s.scalar(
                select(DeletionRequest.job_id).where(DeletionRequest.opendsr_request_id.is_not(None))
            )
        if job_id:
            return str(job_id)
        time.sleep(0.1)
    raise AssertionError("the client's erasure never arrived")


def test_the_docs_client_verifies_every_callback(live: tuple[str, Any], make_checkpoint: Any) -> None:
    base, dep = live
    key = dep.key(["opendsr"], "privacy-platform")
    proc = subprocess.Popen(
        [sys.executable, str(CLIENT), "--url", base, "--api-key", key, "--subject", "cust-7",
         "--model", "m", "--timeout", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        job_id = _job_of_the_erasure(dep, time.monotonic() + 60)
        with dep.sessions() as s:
            ticket = jobs.claim_job(s, job_id, "w", store=dep.store, heartbeat_timeout_s=60)
        assert ticket is not None and ticket.forget_ids == ["s0000", "s0001", "s0002"]
        assert dep.complete(job_id, make_checkpoint()).published
        with httpx.Client() as http:
            assert callbacks.deliver_due(dep.sessions, dep.settings, http) == 2
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("discovery: ") and "created " in lines[1] and "signed by localhost" in lines[1]
    assert lines[2:] == ["callback verified: in_progress", "callback verified: completed"]


def test_the_cli_submits_by_subject(live: tuple[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main as cli_main

    base, dep = live
    common = ["--url", base, "--api-key", dep.admin_key]
    assert cli_main([*common, "submit", "--model", "m", "--subjects", "cust-7", "nobody"]) == 0
    out = capsys.readouterr().out
    assert ": queued (3 IDs, 0 already forgotten)" in out
    with dep.sessions() as s:
        summary = s.scalar(select(DeletionRequest.subjects))
    assert summary is not None and summary["subject_count"] == 2 and summary["subjects_without_samples"] == 1
    assert cli_main([*common, "submit", "--model", "m"]) != 0
    assert "no sample IDs or subjects given" in capsys.readouterr().err


def test_the_python_client_speaks_subjects_groups_and_opendsr(live: tuple[str, Any]) -> None:
    from app.client import LetheAPIError, LetheClient

    base, dep = live
    with LetheClient(base, dep.admin_key) as client:
        assert client.get_subject("subj", "cust-7")["splits"] == {"train": 3, "test": 0}
        group = client.forget_everywhere(["cust-7"], subject_ref="dsr-42")
        assert [r["model"] for r in group["requests"]] == ["m"] and group["status"] == "queued"
        assert client.get_deletion_request_group(group["id"]) == group
        one = client.create_deletion_request("m", subject_ids=["cust-7"], idempotency_key="k1")
        assert one["sample_count"] == 3 and one["subjects"] is not None
        missing = "00000000-0000-4000-8000-000000000000"
        with pytest.raises(LetheAPIError) as err:
            client.get_opendsr_request(missing)
        assert err.value.status == 404 and err.value.code == "opendsr_request_not_found"
