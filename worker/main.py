"""Start one Lethe GPU worker: a real Celery worker process consuming queue `gpu`.

    python -m worker.main [--name NAME] [--loglevel INFO]     (or `lethe worker`)

Process model (DESIGN.md §3, "CUDA is never initialised in a process that forks"): the worker
runs Celery's `solo` pool with concurrency 1 and prefetch 1. The job executes in the worker's
main process, which never forks, so torch and CUDA are loaded once, lazily, by the first job
and reused by the next ones. One worker process serves one GPU: scale by starting more
processes (one per GPU, pinned with `CUDA_VISIBLE_DEVICES`) or more hosts, never by raising
the concurrency. A prefork pool would also work if only its children imported torch, but the
solo pool has no parent/child split to get wrong, and one job per GPU is the design anyway.

Cancellation does not need the pool to interrupt a task: it is a database flag that the
running job polls every step.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Sequence

from celery import Celery

from app.queue import QUEUE, create_celery
from app.settings import Settings, get_settings
from models_store import Store

#: How often the embedded worker polls the SQL broker's message table.
SQL_POLL_INTERVAL_S = 0.25


def build_worker_app(settings: Settings) -> Celery:
    """The Celery app with Lethe's task registered and worker options fixed for GPU jobs."""
    app = create_celery(settings, include=["worker.tasks"])
    app.conf.update(
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_concurrency=1,
        worker_pool="solo",
        worker_hijack_root_logger=False,
    )
    if settings.broker_url.startswith("sqla+"):
        # The SQL transport polls its table (1 s by default); a quarter second keeps the
        # embedded dispatch latency well under a second for one cheap query per tick. Set on
        # the transport class because kombu's SQLAlchemy transport forwards every transport
        # option, `polling_interval` included, to `create_engine`, which refuses it.
        from kombu.transport import sqlalchemy as sql_transport

        sql_transport.Transport.polling_interval = SQL_POLL_INTERVAL_S
    return app


def worker_argv(name: str, loglevel: str) -> list[str]:
    """The `celery worker` arguments every Lethe worker runs with."""
    return [
        "worker",
        f"--hostname={name}",
        f"--queues={QUEUE}",
        "--pool=solo",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]


def default_name() -> str:
    """`lethe-<pid>@<host>`: unique per process, which `claim_job` records as the owner."""
    return f"lethe-{os.getpid()}@{socket.gethostname()}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a worker in this process until it is told to stop (SIGTERM: warm, SIGQUIT: cold)."""
    parser = argparse.ArgumentParser(prog="lethe worker", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=None, help="worker node name (default: lethe-PID@host)")
    parser.add_argument("--loglevel", default=os.environ.get("LETHE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = get_settings()
    # A worker killed while writing a checkpoint leaves a scratch file; its successor on this
    # host removes it (a live writer's file is never touched).
    try:
        Store(settings.store_path).clean_temp()
    except OSError:
        logging.getLogger(__name__).warning("could not clean the store's scratch files",
                                            exc_info=True)
    app = build_worker_app(settings)
    app.worker_main(worker_argv(args.name or default_name(), args.loglevel))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
