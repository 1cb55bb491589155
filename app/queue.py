"""The Celery application factory (torch-free): the broker is only a doorbell for job ids.

Both the API (to enqueue, `app.dispatch`) and the worker process (to consume, `worker.main`)
build the app here, so neither side imports the other for it: `worker` depends on `app`,
never the reverse. The task module is not imported: the worker process names it with
`include`, so the API never loads the engine. Messages carry one job id, are acknowledged
late (after the task returns) and are requeued when a worker dies, one message per worker
at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

if TYPE_CHECKING:
    from app.settings import Settings

RUN_JOB = "lethe.run_job"
QUEUE = "gpu"


def create_celery(settings: Settings, *, include: list[str] | None = None) -> Celery:
    """A Celery app bound to `settings.broker_url`, routing `RUN_JOB` to the `gpu` queue."""
    broker = settings.broker_url
    if broker.startswith("sqla+sqlite:///"):
        Path(broker.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    app = Celery("lethe", broker=broker, include=include or [])
    app.conf.update(
        task_default_queue=QUEUE,
        task_queues=[Queue(QUEUE)],  # type: ignore[no-untyped-call]
        task_routes={RUN_JOB: {"queue": QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # A broker blip must not cancel a job mid-run: its state and heartbeat live in the
        # database, and the sweeper re-sends only jobs whose heartbeat stopped.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
