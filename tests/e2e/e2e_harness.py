"""End-to-end harness: real `lethe serve` processes (uvicorn + a Celery worker) on loopback.

Two deployments, one code path:
- `embedded`: SQLite database and kombu's SQLAlchemy transport on SQLite, in a temp folder.
- `postgres_redis`: a fresh PostgreSQL database with a random name and a Redis database
  number nobody else is using (fixtures in `tests/conftest.py`). If PostgreSQL or Redis is
  unreachable the test FAILS: the suite runs against them on every development machine and
  in CI.

Fault-injection tests also start the API alone (`start_api`, after `create_admin_key`), stop
workers (`stop_process`) and run a private `redis-server` they may kill (`PrivateRedis`).
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
from typing import TYPE_CHECKING

from app.client import LetheClient, LetheClientError

if TYPE_CHECKING:
    import redis

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0


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


def service_env(env_overrides: dict[str, str], var_dir: Path) -> dict[str, str]:
    """The environment every Lethe process of one test deployment runs with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env.update(
        LETHE_VAR_DIR=str(var_dir),
        LETHE_ENVIRONMENT="development",
        LETHE_SWEEPER_INTERVAL_S="2",
        # Reference jobs cost K trainings per registered model: on only where a test asks.
        LETHE_REFERENCES="off",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )
    env.update(env_overrides)
    return env


def start_service(
    env_overrides: dict[str, str], var_dir: Path, extra_args: tuple[str, ...] = ()
) -> Service:
    """Run `python -m app.cli serve --no-bootstrap [extra_args]` on a free loopback port until
    it says it is running."""
    port = free_port()
    env = service_env(env_overrides, var_dir)
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


def create_admin_key(env_overrides: dict[str, str], var_dir: Path) -> str:
    """Migrate the deployment's database and write a new admin key to `var/admin.key` (what
    `lethe serve` does on first start), with the CLI; returns the key."""
    env = service_env(env_overrides, var_dir)
    var_dir.mkdir(parents=True, exist_ok=True)
    for argv in (["migrate"], ["apikey", "create", "--name", "admin", "--scopes", "admin"]):
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", *argv], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=START_TIMEOUT_S,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    key = re.search(r"api key:\s+(\S+)", done.stdout)
    assert key, done.stdout
    (var_dir / "admin.key").write_text(key.group(1) + "\n")
    return key.group(1)


def start_api(env_overrides: dict[str, str], var_dir: Path, port: int | None = None) -> Service:
    """The API alone (`lethe serve --api-only`: uvicorn and the sweeper in one process, no
    worker) on `port` (default: a free one), once `/readyz` answers. Needs `var/admin.key`
    (`create_admin_key`). Its log is appended to, so a restarted API keeps the earlier lines."""
    port = port or free_port()
    env = service_env(env_overrides, var_dir)
    log_path = var_dir / "api-only.log"
    out = log_path.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--api-only", "--port", str(port),
         "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    service = Service(proc, f"http://127.0.0.1:{port}", env, var_dir, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"lethe serve --api-only exited {proc.returncode}:\n"
                                 f"{_read(log_path)}")
        try:
            service.client.readyz()
            return service
        except LetheClientError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the API was not ready in {START_TIMEOUT_S}s:\n{_read(log_path)}")


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


#: `python -m worker.main` with the engine (torch) imported before the worker starts.
_PRELOADED_WORKER = "import sys, engine.jobs, worker.main; sys.exit(worker.main.main(sys.argv[1:]))"


def start_worker(service: Service, name: str, *, preload: bool = False) -> subprocess.Popen[bytes]:
    """A separate `python -m worker.main` process on the service's database and broker.

    `preload` imports the engine before the worker starts instead of in its first job (the
    same code path, minus seconds of torch import in that job's `loading` phase): tests that
    start many workers use it to keep a recovering job off that cost.
    """
    logs = service.var_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = (logs / f"{name}.log").open("wb")
    start = ["-c", _PRELOADED_WORKER] if preload else ["-m", "worker.main"]
    return subprocess.Popen(
        [sys.executable, *start, "--name", f"{name}@e2e"],
        cwd=REPO,
        env=service.env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Stop a worker (SIGQUIT: Celery's cold shutdown); SIGKILL it if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_worker_ready(service: Service, name: str, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until the worker started as `name` says it is consuming (Celery's `ready` line)."""
    log = service.var_dir / "logs" / f"{name}.log"
    wait_until(lambda: f"{name}@e2e ready" in _read(log), timeout, what=f"worker {name} ready")


class PrivateRedis:
    """A `redis-server` of the test's own on a free loopback port, keeping nothing on disk,
    so a test can kill it and start it again empty without touching the shared server."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        import redis

        out = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=out, stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)

        def pong() -> bool:
            assert self.proc is not None and self.proc.poll() is None, _read(
                self.workdir / "redis.log")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(pong, 30, interval=0.05, what="the private redis-server")
        client.close()

    def kill(self) -> None:
        """SIGKILL the server (everything it held is gone: it writes nothing to disk)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self) -> redis.Redis:
        """A client of the server."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

