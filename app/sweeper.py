"""Background loops of the API process: the job sweeper and the webhook delivery loop.

The sweeper re-enqueues jobs whose broker message may be lost (claimable `queued` jobs not
sent for `queued_grace_s`, `running` jobs whose heartbeat expired). Re-sending is always safe:
`claim_job` lets exactly one worker run a job at a time. It also purges expired idempotency
keys and temporary files crashed writers left in the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import httpx
from sqlalchemy.orm import Session, sessionmaker

from app.dispatch import Dispatcher
from app.services import callbacks, idempotency
from app.services.jobs import find_stale_jobs, mark_enqueued
from app.settings import Settings
from models_store import Store

log = logging.getLogger(__name__)


def sweep_once(
    sessions: sessionmaker[Session], settings: Settings, dispatcher: Dispatcher
) -> list[str]:
    """Re-enqueue every stale job once; returns the ids sent."""
    with sessions() as session:
        stale = find_stale_jobs(
            session,
            queued_grace_s=settings.queued_grace_s,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
        )
    if not stale:
        return []
    sent = dispatcher.enqueue_many(stale)
    with sessions() as session:
        mark_enqueued(session, sent)
    if sent:
        log.info("sweeper re-enqueued %d job(s): %s", len(sent), ", ".join(sent))
    return sent


class Loop:
    """A daemon thread running `tick` every `interval_s` until stopped."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], object]) -> None:
        self.name, self.interval_s, self.tick = name, interval_s, tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to stop and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("%s tick failed", self.name)


def start_background_loops(
    sessions: sessionmaker[Session], settings: Settings, dispatcher: Dispatcher, store: Store
) -> list[Loop]:
    """Start the sweeper, housekeeping and webhook loops; returns them for shutdown."""
    client = httpx.Client(timeout=settings.callback_timeout_s, follow_redirects=False)
    last_housekeeping = [0.0]

    def sweep() -> None:
        sweep_once(sessions, settings, dispatcher)
        if time.monotonic() - last_housekeeping[0] > 600:
            last_housekeeping[0] = time.monotonic()
            with sessions() as session:
                idempotency.purge_expired(session)
            store.clean_temp()

    def deliver() -> None:
        callbacks.deliver_due(sessions, settings, client)

    loops = [
        Loop("lethe-sweeper", settings.sweeper_interval_s, sweep),
        Loop("lethe-callbacks", settings.callback_interval_s, deliver),
    ]
    for loop in loops:
        loop.start()
    return loops
