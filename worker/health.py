"""Container health check of a worker: does a Celery worker on this host answer a ping?

    python -m worker.health      exit 0 when a worker named `...@<this hostname>` replies

Uses Celery's remote control, so it needs a broker with broadcast (Redis); the embedded SQL
broker has none, and there `lethe serve` supervises its worker process directly instead.
"""

from __future__ import annotations

import socket
import sys

from app.settings import get_settings
from worker.celery_app import create_celery


def worker_alive(timeout: float = 5.0) -> bool:
    """True when a worker whose node name ends with `@<hostname>` answers a ping."""
    app = create_celery(get_settings())
    suffix = f"@{socket.gethostname()}"
    replies = app.control.ping(timeout=timeout) or []
    return any(name.endswith(suffix) for reply in replies for name in reply)


def main() -> int:
    """Exit status 0 when this host's worker is alive, 1 otherwise."""
    return 0 if worker_alive() else 1


if __name__ == "__main__":
    sys.exit(main())
