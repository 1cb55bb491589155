"""Dispatch latency: time from a deletion request's 202 to its job `running`, idle worker.

    .venv/bin/python scripts/dispatch_latency.py --broker embedded --runs 10
    .venv/bin/python scripts/dispatch_latency.py --broker redis --runs 10

Starts a real `lethe serve --no-bootstrap` (uvicorn + one Celery worker) on a loopback port
in a temporary folder: `embedded` is SQLite + the SQL broker; `redis` is a fresh PostgreSQL
database (random name, dropped afterwards) + Redis (an empty database number). It registers a
tiny npz dataset, trains a tiny model (v1), then for each run: waits until the worker is idle
(the previous job is final), POSTs a one-ID deletion request and polls the job every 10 ms.

Two figures per run: `observed` = client clock from the 202 to the first poll answering
`running` (includes up to one poll interval), and `server` = the job's `started_at` minus
the request's `received_at` (both stamped by the service). Medians and maxima are printed
(BENCHMARKS.md §2 targets: <= 1 s on Redis, <= 3 s embedded).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.client import LetheClient  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "LETHE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("LETHE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
RECIPE = {"optimizer": "sgd", "lr": 0.05, "epochs": 2, "batch_size": 32, "seed": 0}


def _tiny_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 40)
    x = rng.integers(0, 60, size=(160, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        x[i, r * 14 + 2 : r * 14 + 12, q * 14 + 2 : q * 14 + 12] += np.uint8(150)
    split = np.where(np.arange(160) % 40 < 30, "train", "test")
    ids = np.asarray([f"s{i:04d}" for i in range(160)])
    np.savez(path, x=x, y=labels, ids=ids, split=split)
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _redis_deployment(prefix: str = "lethe_dispatch") -> tuple[dict[str, str], object]:
    """A fresh PostgreSQL database and an empty Redis database number, plus their cleanup."""
    import redis
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{secrets.token_hex(5)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db = next(n for n in range(15, 0, -1) if redis.Redis.from_url(f"{REDIS_URL}/{n}").dbsize() == 0)
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def cleanup() -> None:
        redis.Redis.from_url(f"{REDIS_URL}/{db}").flushdb()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return {"LETHE_DATABASE_URL": url, "LETHE_BROKER_URL": f"{REDIS_URL}/{db}"}, cleanup


def measure(broker: str, runs: int) -> dict[str, object]:
    """Start a deployment, train the tiny model, measure `runs` dispatches; return figures."""
    cleanup = None
    overrides: dict[str, str] = {}
    if broker == "redis":
        overrides, cleanup = _redis_deployment()
    with tempfile.TemporaryDirectory(prefix="lethe-dispatch-") as tmp:
        var = Path(tmp) / "var"
        port = _port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
        env.update(LETHE_VAR_DIR=str(var), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1", **overrides)
        log = Path(tmp) / "serve.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--no-bootstrap", "--port", str(port)],
            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 180
            while b"Lethe is running" not in log.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"serve did not start:\n{log.read_text()}")
                time.sleep(0.2)
            key = (var / "admin.key").read_text().strip()
            with LetheClient(f"http://127.0.0.1:{port}", key) as client:
                return _runs(client, Path(tmp), runs, broker)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            if cleanup is not None:
                cleanup()  # type: ignore[operator]


def _runs(client: LetheClient, tmp: Path, runs: int, broker: str) -> dict[str, object]:
    client.register_dataset("tiny", "npz", str(_tiny_npz(tmp / "tiny.npz")), {})
    created = client.register_model(
        "tiny-cnn", dataset="tiny", architecture="small_cnn", num_classes=4, recipe=RECIPE,
        policy={"max_acc_test_drop": 1.0, "max_gap": None, "max_avg_gap": None},
    )
    train = client.wait_for_job(created.get("job_id") or created["job"]["id"], timeout=300)
    if train["status"] != "succeeded":
        raise SystemExit(f"training failed: {train}")
    ids = [r["sample_id"] for r in client.list_samples("tiny", split="train", limit=200)]
    observed: list[float] = []
    server: list[float] = []
    for i in range(runs):
        time.sleep(1.0)  # the worker is idle: the previous job is final and its ack is sent
        t0 = time.monotonic()
        req = client.create_deletion_request("tiny-cnn", [ids[i]])
        t_202 = time.monotonic() - t0
        while True:
            r = client.get_deletion_request(req["id"])
            if r.get("job_id"):
                job = client.get_job(r["job_id"])
                if job["status"] in ("running", "succeeded", "failed", "cancelled"):
                    break
            time.sleep(0.01)
        observed.append(time.monotonic() - t0 - t_202)
        server.append(_ts(job["started_at"]) - _ts(req["received_at"]))
        client.wait_for_request(req["id"], timeout=300, poll_interval=0.2)
    return {
        "broker": broker,
        "runs": runs,
        "observed_s": {"median": statistics.median(observed), "max": max(observed)},
        "server_s": {"median": statistics.median(server), "max": max(server)},
        "observed_all": [round(v, 3) for v in observed],
        "server_all": [round(v, 3) for v in server],
    }


def main() -> None:
    """Parse arguments, measure, print one JSON document per broker."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", choices=["embedded", "redis", "both"], default="both")
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    brokers = ["embedded", "redis"] if args.broker == "both" else [args.broker]
    for broker in brokers:
        print(json.dumps(measure(broker, args.runs), indent=2), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
