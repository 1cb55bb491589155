"""Container health check of a worker: is the Celery worker on this host alive?

    python -m worker.health      exit 0 when alive, 1 otherwise

Alive means either of:
- a worker whose node name ends with `@<this hostname>` answers a Celery ping (needs a
  broker with broadcast, i.e. Redis; an idle solo-pool worker answers at once), or
- the database shows a job `running` on such a worker with a heartbeat younger than the
  heartbeat timeout (a solo-pool worker busy with a job cannot answer pings, but its
  heartbeat thread keeps writing).
"""

from __future__ import annotations

import socket
import sys
from datetime import UTC, datetime

from app.queue import create_celery
from app.settings import Settings, get_settings
from app.vocab import JobStatus


def _suffix() -> str:
    return f"@{socket.gethostname()}"


def answers_ping(settings: Settings, timeout: float = 5.0) -> bool:
    """True when a worker on this host replies to a broadcast ping."""
    replies = create_celery(settings).control.ping(timeout=timeout) or []
    return any(name.endswith(_suffix()) for reply in replies for name in reply)


def busy_with_fresh_heartbeat(settings: Settings) -> bool:
    """True when a job runs on a worker of this host and its heartbeat is fresh."""
    from app.db import create_db_engine, create_session_factory
    from app.services.jobs import list_jobs

    engine = create_db_engine(settings.database_url)
    try:
        with create_session_factory(engine)() as session:
            running = list_jobs(session, status=JobStatus.RUNNING, limit=100).items
    finally:
        engine.dispose()
    now = datetime.now(UTC)
    for job in running:
        beat = job.get("heartbeat_at")
        if not str(job.get("worker") or "").endswith(_suffix()) or not beat:
            continue
        age = (now - datetime.fromisoformat(str(beat).replace("Z", "+00:00"))).total_seconds()
        if age < settings.heartbeat_timeout_s:
            return True
    return False


def main() -> int:
    """Exit status 0 when this host's worker is alive, 1 otherwise."""
    settings = get_settings()
    try:
        if answers_ping(settings):
            return 0
    except Exception:  # the broker may be down; the database may still show a live job
        pass
    return 0 if busy_with_fresh_heartbeat(settings) else 1


if __name__ == "__main__":
    sys.exit(main())
