"""Dispatch to real brokers (Redis, kombu's SQL transport), the sweeper, signed webhooks,
settings that fail closed, concurrent audit appends, and the torch-free API layer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app.db.models import CallbackDelivery, Job
from app.db.types import utcnow
from app.dispatch import Dispatcher
from app.queue import QUEUE, RUN_JOB, create_celery
from app.services import audit, callbacks, deletions
from app.services.apikeys import webhook_secret
from app.settings import Settings
from app.sweeper import sweep_once


def test_celery_app_configuration(tmp_path: Path) -> None:
    app = create_celery(Settings(var_dir=tmp_path))
    conf = app.conf
    assert conf.task_acks_late is True and conf.worker_prefetch_multiplier == 1
    assert conf.task_reject_on_worker_lost is True
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_routes[RUN_JOB] == {"queue": QUEUE} and QUEUE == "gpu"
    assert conf.broker_url.startswith("sqla+sqlite:///")
    # The factory must not import the task module (that would load the engine into the API).
    # Checked in a fresh interpreter: elsewhere in the suite the task module is imported,
    # and its shared task then registers itself with every Celery app.
    code = (
        "import sys\n"
        "from app.settings import Settings\n"
        "from app.queue import RUN_JOB, create_celery\n"
        f"app = create_celery(Settings(var_dir={str(tmp_path)!r}))\n"
        "assert RUN_JOB not in app.tasks and 'worker.tasks' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_dispatch_puts_the_job_id_on_redis(redis_url: str, tmp_path: Path) -> None:
    import redis

    settings = Settings(var_dir=tmp_path, broker_url=redis_url)
    d = Dispatcher(settings)
    assert d.ping()
    assert d.enqueue("job_abc")
    raw = redis.Redis.from_url(redis_url).lrange(QUEUE, 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == RUN_JOB
    body = json.loads(base64.b64decode(message["body"]))
    assert body[0] == ["job_abc"]


def test_dispatch_reports_an_unreachable_broker(tmp_path: Path) -> None:
    d = Dispatcher(Settings(var_dir=tmp_path, broker_url="redis://127.0.0.1:1/0"))
    assert d.ping(timeout_s=0.5) is False


def test_sweeper_re_enqueues_lost_messages_on_the_sql_broker(sqlite_deployment: Any) -> None:
    dep = sqlite_deployment
    dep.upload_model("m")
    train, _ = dep.ids()
    sub = dep.submit("m", train[:3])
    dep.settings.queued_grace_s = 0.0
    d = Dispatcher(dep.settings)
    assert sweep_once(dep.sessions, dep.settings, d) == [sub.enqueue_job_id]
    with d.celery.connection_for_read() as conn:
        queue = conn.SimpleQueue(QUEUE)
        msg = queue.get(timeout=5)
        assert msg.headers["task"] == RUN_JOB and msg.payload[0] == [sub.enqueue_job_id]
        msg.ack()
        queue.close()
    dep.settings.queued_grace_s = 3600.0
    assert sweep_once(dep.sessions, dep.settings, d) == []  # just sent: within the grace


class _Hook(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []
    statuses: list[int] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        status = type(self).statuses.pop(0) if type(self).statuses else 204
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_signed_webhook_with_retry_and_audit(deployment: Any) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received, _Hook.statuses = [], [500]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        deployment.upload_model("m")
        train, _ = deployment.ids()
        url = f"http://127.0.0.1:{server.server_port}/hook"
        sub = deployment.submit("m", train[:2], callback_url=url)
        with deployment.sessions() as s:
            deletions.cancel_deletion_request(s, sub.body["id"], actor="t")
        client = httpx.Client(timeout=5)
        assert callbacks.deliver_due(deployment.sessions, deployment.settings, client) == 1
        with deployment.sessions() as s:
            row = s.scalar(select(CallbackDelivery))
            assert row.status == "pending" and row.attempts == 1 and row.last_status_code == 500
            assert row.next_attempt_at > utcnow()
            s.execute(update(CallbackDelivery).values(next_attempt_at=utcnow()))
            s.commit()
        assert callbacks.deliver_due(deployment.sessions, deployment.settings, client) == 1
        assert callbacks.deliver_due(deployment.sessions, deployment.settings, client) == 0
        with deployment.sessions() as s:
            row = s.scalar(select(CallbackDelivery))
            assert row.status == "delivered" and row.attempts == 2
            delivery_id = row.id
            events = audit.list_events(s, action="callback.attempted", limit=10).items
            assert audit.verify_chain(s).ok
        assert [e["data"]["delivered"] for e in events] == [False, True]
        assert all(e["request_id"] == sub.body["id"] for e in events)
        assert len(_Hook.received) == 2
        headers, body = _Hook.received[-1]
        payload = json.loads(body)
        assert payload["id"] == sub.body["id"] and payload["status"] == "cancelled"
        secret = webhook_secret(deployment.settings, deployment.principal.id)
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        expected = base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()
        assert headers["webhook-signature"] == f"v1,{expected}"
        assert headers["webhook-id"] == delivery_id
    finally:
        server.shutdown()


def test_backoff_grows_and_is_capped() -> None:
    waits = [callbacks.backoff_s(n) for n in range(1, 20)]
    assert waits[0] == 5.0 and waits[1] == 10.0 and waits == sorted(waits)
    assert max(waits) == callbacks.MAX_BACKOFF_S


def test_callback_urls_are_checked() -> None:
    dev = Settings()
    assert callbacks.check_callback_url("https://example.org/x", dev)
    assert callbacks.check_callback_url("http://127.0.0.1:9/x", dev)
    prod = Settings(environment="production", webhook_signing_secret="s" * 40)
    for bad, settings in [
        ("http://127.0.0.1/x", prod),
        ("http://example.org/x", dev),
        ("ftp://example.org/x", dev),
        ("/relative", dev),
    ]:
        with pytest.raises(Exception, match="callback_url"):
            callbacks.check_callback_url(bad, settings)


def test_settings_fail_closed_outside_development(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="SIGNING_SECRET"):
        Settings(environment="production")
    with pytest.raises(ValueError, match="at least 32"):
        Settings(environment="production", webhook_signing_secret="short-but-real")
    monkeypatch.setenv("LETHE_ENVIRONMENT", "production")
    monkeypatch.setenv("LETHE_WEBHOOK_SIGNING_SECRET", "changeme")
    with pytest.raises(ValueError):
        Settings()
    monkeypatch.setenv("LETHE_WEBHOOK_SIGNING_SECRET", "x" * 48)
    monkeypatch.setenv("LETHE_DATABASE_URL", "postgresql://u@h/db")
    s = Settings()
    assert s.environment == "production" and s.database_url == "postgresql://u@h/db"
    assert Settings(var_dir=Path("/v")).database_url == "postgresql://u@h/db"
    monkeypatch.delenv("LETHE_DATABASE_URL")
    d = Settings(var_dir=Path("/v"))
    assert d.database_url == "sqlite:////v/lethe.db"
    assert d.broker_url == "sqla+sqlite:////v/broker.db" and d.store_path == Path("/v/models")


def test_concurrent_appends_form_one_chain(deployment: Any) -> None:
    errors: list[BaseException] = []

    def append(i: int) -> None:
        try:
            for j in range(10):
                with deployment.sessions() as s:
                    audit.append_event(
                        s, actor=f"t{i}", action="test.event", subject=f"x{j}", data={"i": i, "j": j}
                    )
                    s.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with deployment.sessions() as s:
        report = audit.verify_chain(s)
        n = len(audit.list_events(s, action="test.event", limit=100).items)
    assert report.ok and n == 40


def test_stale_running_job_is_swept(deployment: Any, redis_url: str) -> None:
    import redis

    deployment.upload_model("m")
    train, _ = deployment.ids()
    sub = deployment.submit("m", train[:2])
    from app.services import jobs

    with deployment.sessions() as s:
        jobs.claim_job(s, sub.enqueue_job_id, "dead-worker", store=deployment.store, heartbeat_timeout_s=60)
        s.execute(
            update(Job).values(
                heartbeat_at=utcnow() - timedelta(seconds=3600),
                enqueued_at=utcnow() - timedelta(seconds=3600),
            )
        )
        s.commit()
    deployment.settings.broker_url = redis_url
    deployment.settings.heartbeat_timeout_s = 60
    sent = sweep_once(deployment.sessions, deployment.settings, Dispatcher(deployment.settings))
    assert sent == [sub.enqueue_job_id]
    assert redis.Redis.from_url(redis_url).llen(QUEUE) == 1


def test_the_api_layer_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from app.main import create_app\n"
        "import app.services.jobs, app.sweeper, app.dispatch, app.queue, models_store\n"
        "bad = [m for m in ('torch', 'torchvision', 'worker.tasks') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_lifespan_runs_the_sweeper_loop(sqlite_deployment: Any) -> None:
    """With the background loops on, a job whose message is lost is sent again."""
    import time

    from fastapi.testclient import TestClient

    from app.main import create_app

    dep = sqlite_deployment
    dep.upload_model("m")
    train, _ = dep.ids()
    sub = dep.submit("m", train[:2])  # submitted behind the API's back: never enqueued
    dep.settings.run_background_loops = True
    dep.settings.sweeper_interval_s = 0.2
    dep.settings.queued_grace_s = 0.0
    app = create_app(dep.settings)
    received: list[Any] = []
    with TestClient(app):
        deadline = time.monotonic() + 20
        with app.state.dispatcher.celery.connection_for_read() as conn:
            queue = conn.SimpleQueue(QUEUE)
            while not received and time.monotonic() < deadline:
                try:
                    msg = queue.get(timeout=1)
                except queue.Empty:
                    continue
                received.append(msg.payload[0])
                msg.ack()
            queue.close()
    assert received and received[0] == [sub.enqueue_job_id]
    with dep.sessions() as s:
        job = s.get(Job, sub.enqueue_job_id)
        assert job is not None and job.enqueued_at is not None
