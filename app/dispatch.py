"""Dispatch: ring the broker's doorbell with a job id, after the database commit.

The message carries only the job id. A failed send is logged and left to the sweeper: the
job is already durable in the database and will be re-enqueued after `queued_grace_s`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from app.queue import QUEUE, RUN_JOB, create_celery

if TYPE_CHECKING:
    from celery import Celery

    from app.settings import Settings

log = logging.getLogger(__name__)


class Dispatcher:
    """Sends `RUN_JOB` messages; the Celery app is built on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._celery: Celery | None = None
        self._lock = threading.Lock()

    @property
    def celery(self) -> Celery:
        """The lazily built Celery app (no broker connection until the first send)."""
        with self._lock:
            if self._celery is None:
                self._celery = create_celery(self.settings)
            return self._celery

    def enqueue(self, job_id: str) -> bool:
        """Send one job id; False (and a log line) when the broker refused it."""
        try:
            self.celery.send_task(
                RUN_JOB,
                args=[job_id],
                queue=QUEUE,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
            )
            return True
        except Exception as exc:  # the sweeper re-sends; the request must not fail
            log.warning("could not enqueue job %s (the sweeper will retry): %s", job_id, exc)
            return False

    def enqueue_many(self, job_ids: Iterable[str]) -> list[str]:
        """Send several ids; returns those sent."""
        return [j for j in job_ids if j and self.enqueue(j)]

    def ping(self, timeout_s: float = 2.0) -> bool:
        """True when the broker accepts a connection."""
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=timeout_s)
            return True
        except Exception as exc:
            log.warning("broker unreachable: %s", exc)
            return False
