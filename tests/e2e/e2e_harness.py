"""End-to-end harness: real `lethe serve` processes (uvicorn + a Celery worker) on loopback.

Two deployments, one code path:
- `embedded`: SQLite database and kombu's SQLAlchemy transport on SQLite, in a temp folder.
- `postgres_redis`: a fresh PostgreSQL database with a random name and a Redis database
  number nobody else is using (fixtures in `tests/conftest.py`). If PostgreSQL or Redis is
  unreachable the test FAILS: the suite runs against them on every development machine and
  in CI.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.client import LetheClient, LetheClientError

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0


def write_tiny_dataset(path: Path, *, per_class: int = 40, classes: int = 4, seed: int = 0) -> Path:
    """A learnable 28x28 npz: each class lights a different quadrant, plus noise.

    `per_class` samples per class, a quarter of them in the test split.
    """
    rng = np.random.default_rng(seed)
    n = per_class * classes
    labels = np.repeat(np.arange(classes), per_class)
    x = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        x[i, r * 14 + 2 : r * 14 + 12, q * 14 + 2 : q * 14 + 12] += np.uint8(150)
    split = np.where(np.arange(n) % per_class < per_class * 3 // 4, "train", "test")
    ids = np.asarray([f"s{i:04d}" for i in range(n)])
    np.savez(path, x=x, y=labels.astype(np.int64), ids=ids, split=split)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists (and is not a zombie of ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


@dataclass
class Service:
    """A running `lethe serve` (its API and worker children) and an admin client for it."""

    proc: subprocess.Popen[bytes]
    url: str
    env: dict[str, str]
    var_dir: Path
    log_path: Path
    client: LetheClient = field(init=False)
    client_key: str = field(init=False)

    def __post_init__(self) -> None:
        self.client_key = (self.var_dir / "admin.key").read_text().strip()
        self.client = LetheClient(self.url, self.client_key, timeout=30)

    def logs(self) -> str:
        """Everything `serve` and its children logged so far (for failure messages)."""
        parts = []
        for p in [self.log_path, *sorted((self.var_dir / "logs").glob("*.log"))]:
            if p.exists():
                parts.append(f"==== {p.name}\n{p.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def child_pids(self) -> list[int]:
        """PIDs of the API and worker children, as their own logs announce them."""
        logs = self.var_dir / "logs"
        api = re.search(r"Started server process \[(\d+)\]", _read(logs / "api.log"))
        worker = re.search(r"lethe-(\d+)@\S+ ready", _read(logs / "worker.log"))
        return [int(m.group(1)) for m in (api, worker) if m]

    def stop(self, timeout: float = 60.0) -> int:
        """Ctrl-C `serve` (SIGINT) and wait; returns its exit status."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_service(
    env_overrides: dict[str, str], var_dir: Path, extra_args: tuple[str, ...] = ()
) -> Service:
    """Run `python -m app.cli serve --no-bootstrap [extra_args]` on a free loopback port until
    it says it is running."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env.update(
        LETHE_VAR_DIR=str(var_dir),
        LETHE_ENVIRONMENT="development",
        LETHE_SWEEPER_INTERVAL_S="2",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )
    env.update(env_overrides)
    var_dir.mkdir(parents=True, exist_ok=True)
    log_path = var_dir / "serve.log"
    out = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--no-bootstrap", "--port", str(port),
         *extra_args],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"lethe serve exited {proc.returncode}:\n{log_path.read_text()}")
        if b"Lethe is running" in log_path.read_bytes():
            return Service(proc, url, env, var_dir, log_path)
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"lethe serve not ready in {START_TIMEOUT_S}s:\n{log_path.read_text()}")



def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate()` until it returns a truthy value (returned) or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except LetheClientError as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last_error})")


def start_worker(service: Service, name: str) -> subprocess.Popen[bytes]:
    """A separate `python -m worker.main` process on the service's database and broker."""
    logs = service.var_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = (logs / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "worker.main", "--name", f"{name}@e2e"],
        cwd=REPO,
        env=service.env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
