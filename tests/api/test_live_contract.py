"""The live contract run: schemathesis' CLI against a real `lethe serve --api-only`.

Once on SQLite and once on a fresh PostgreSQL database, the API runs as its own process on a
free loopback port (the CLI's own `serve --api-only`, uvicorn on the app factory), over a
deployment holding the tiny dataset, a model `m` with a published version and a deletion
request. `st run` reads `/openapi.json` from it as any client generator would and runs the
coverage, fuzzing and stateful phases (the stateful phase follows the document's links:
deletion request -> read / cancel / job, model -> versions -> version -> checkpoint and
manifest) with every check (`--checks all`). The one substitution: `positive_data_acceptance`
runs as `stateful_positive_data_acceptance` (see `schemathesis_hooks.py`), which lets through
only refusals that depend on stored data (unknown sample IDs, unreadable files, cursors the
server did not issue). The run must end with no failure and no error. The response-time
check allows 90 s a response (registering the 5,000-sample `mnist5k` dataset is the slowest).

`LETHE_CONTRACT_EXAMPLES` (default 15) bounds the examples per operation and phase;
`LETHE_CONTRACT_SEED` picks another seed for hunting locally.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).parents[2]
EXAMPLES = int(os.environ.get("LETHE_CONTRACT_EXAMPLES", "15"))
SEED = int(os.environ.get("LETHE_CONTRACT_SEED", "0"))
#: A run must reach the API's logic, not stop at the door: this many cases at least.
MIN_CASES = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(deployment: Any) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "LETHE_VAR_DIR": str(deployment.settings.var_dir),
        "LETHE_DATABASE_URL": deployment.settings.database_url,
        "LETHE_BROKER_URL": deployment.settings.broker_url,
        # The sweeper and webhook loops are not part of the HTTP contract; off, the run is
        # the same on every machine.
        "LETHE_RUN_BACKGROUND_LOOPS": "false",
        "LETHE_ENVIRONMENT": "development",
    }


@pytest.fixture
def live_api(deployment: Any, make_checkpoint: Any) -> Iterator[tuple[str, Any]]:
    """`lethe serve --api-only` on a free port over a deployment with data in it."""
    from app.services import jobs

    deployment.upload_model("m")
    train, _ = deployment.ids()
    done = deployment.submit("m", train[:3])
    with deployment.sessions() as s:
        ticket = jobs.claim_job(s, done.enqueue_job_id, "contract", heartbeat_timeout_s=60,
                                store=deployment.store)
    deployment.complete(ticket.job_id, make_checkpoint(seed=1), teacher_seed=ticket.teacher_seed)
    deployment.submit("m", train[3:6], subject_ref="dsr-1")
    port = _free_port()
    log = (Path(deployment.settings.var_dir) / "api.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--api-only", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=_env(deployment), stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, "the API process exited"
            assert time.monotonic() < deadline, "the API did not start within 60 s"
            time.sleep(0.2)
        yield url, deployment
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_the_live_api_keeps_its_contract(live_api: tuple[str, Any], tmp_path: Path) -> None:
    url, deployment = live_api
    report = tmp_path / "report.json"
    env = {**_env(deployment), "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks"}
    started = time.monotonic()
    run = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "--no-color", "run", f"{url}/openapi.json",
            "--phases", "coverage,fuzzing,stateful",
            "--checks", "all",
            "--exclude-checks", "positive_data_acceptance",
            "-H", f"Authorization: Bearer {deployment.admin_key}",
            "--max-examples", str(EXAMPLES),
            "--seed", str(SEED),
            "--workers", "1",
            "--request-timeout", "120",
            # Registering `mnist5k` indexes 5,000 samples in the request (23 s measured on a
            # busy 2-core machine); the response-time check stays on with room for that.
            "--max-response-time", "90",
            "--suppress-health-check", "all",
            "--generation-database", "none",
            "--report", "json", "--report-json-path", str(report),
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    seconds = time.monotonic() - started
    assert report.exists(), run.stdout[-6000:] + run.stderr[-3000:]
    summary = json.loads(report.read_text())
    cases = summary["test_cases"]
    print(
        f"\n[{deployment.backend}] schemathesis {summary['schemathesis_version']}: "
        f"{cases['generated']} cases, {cases['with_failures']} with failures, "
        f"{cases['errored']} errored, in {seconds:.0f} s"
    )
    assert run.returncode == 0 and not summary["failures"] and not summary["errors"], (
        run.stdout[-12000:] + run.stderr[-3000:]
    )
    phases = summary["phases"]
    assert all(phases[p]["status"] == "success" for p in ("coverage", "fuzzing", "stateful")), phases
    assert summary["operations"]["tested"] == summary["operations"]["total"] >= 24
    assert cases["generated"] >= MIN_CASES, cases
