"""`lethe`: run the service and talk to it from a shell.

    lethe serve                      embedded: migrate, API on 127.0.0.1:8000, one Celery worker
    lethe worker                     one GPU worker (Celery, queue `gpu`, solo pool)
    lethe migrate                    Alembic upgrade head
    lethe apikey create --name N --scopes S,...  |  revoke NAME  |  list
    lethe submit --model M [--ids A B C | --ids-file F] [--subjects S ...] [--wait]
    lethe status [REQUEST_ID] [--job JOB_ID]
    lethe download --model M [--version N] [-o PATH]
    lethe audit verify
    lethe receipt verify FILE [--keys URL|FILE]   check a signed receipt offline
    lethe receipt get REQUEST_ID [--html] [-o FILE] | rotate-key
    lethe bench ...                  the engine's benchmark (`engine.bench.main`)

Commands that act on a running service go over HTTP through `app.client.LetheClient`
(`--url`, default `$LETHE_URL` or http://127.0.0.1:8000). Their API key comes from
`--api-key`, `$LETHE_API_KEY`, or the admin key `lethe serve` wrote to `var/admin.key`.
`serve`, `worker`, `migrate` and `apikey` act on the deployment's database directly (the
first key cannot be created over HTTP) and read the `LETHE_*` settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from app.client import (
    FINAL_STATUSES,
    Job,
    LetheAPIError,
    LetheClient,
    LetheClientError,
    NotFound,
    ServiceUnreachable,
)
from app.vocab import JobStatus, ReferenceStatus, RequestStatus, Scope, VerifyMode
from engine.catalog import METHOD_NAMES

DEFAULT_URL = "http://127.0.0.1:8000"
ALL_SCOPES = tuple(Scope)
ADMIN_KEY_FILE = "admin.key"

DEMO_DATASET: dict[str, Any] = {"name": "mnist5k", "kind": "mnist5k", "uri": "", "options": {}}
DEMO_MODEL: dict[str, Any] = {
    "name": "demo-mnist",
    "dataset": "mnist5k",
    "architecture": "small_cnn",
    "num_classes": 10,
    "recipe": {"optimizer": "sgd", "lr": 0.05, "epochs": 8, "batch_size": 64, "seed": 0},
}
#: The zero-argument ASGI app factory uvicorn serves (`uvicorn --factory`).
API_FACTORY = "app.main:create_app"


class CLIError(Exception):
    """A failure the CLI reports as one line on stderr (exit status 1)."""


# -- shared helpers ------------------------------------------------------------------------


def _settings() -> Any:
    from app.settings import get_settings

    return get_settings()


def admin_key_path(var_dir: Path | None = None) -> Path:
    """Where `lethe serve` keeps the admin key it created on first start."""
    return (var_dir if var_dir is not None else _settings().var_dir) / ADMIN_KEY_FILE


def resolve_api_key(explicit: str | None) -> str | None:
    """`--api-key`, else `$LETHE_API_KEY`, else the contents of `var/admin.key` if readable."""
    if explicit:
        return explicit
    if os.environ.get("LETHE_API_KEY"):
        return os.environ["LETHE_API_KEY"]
    path = admin_key_path()
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


def _client(args: argparse.Namespace) -> LetheClient:
    return LetheClient(args.url, resolve_api_key(args.api_key), timeout=args.timeout)


def _fmt_metrics(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "  (none)"
    width = max(len(k) for k in metrics)
    lines = []
    for key in sorted(metrics):
        value = metrics[key]
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)


def _fmt_verdict(verdict: Any) -> str:
    if isinstance(verdict, dict):
        outcome = verdict.get("outcome") or verdict.get("verdict") or verdict.get("status")
        reasons = verdict.get("reasons") or []
        text = str(outcome or json.dumps(verdict, sort_keys=True))
        return text + "".join(f"\n  - {r}" for r in reasons)
    return "-" if verdict is None else str(verdict)


class ProgressBar:
    """One redrawn line on a terminal (a line per change of phase elsewhere)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stdout
        self.width = width
        self.tty = self.stream.isatty()
        self._last_line = ""
        self._last_phase = ""
        self._last_print = 0.0

    def job(self, job: Job, prefix: str = "") -> None:
        """Draw a job's phase, progress, losses, weights and ETA."""
        fraction = float(job.get("progress") or 0.0)
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [f"{prefix}[{bar}] {fraction * 100:5.1f}%", str(job.get("phase") or job["status"])]
        if job.get("total_steps"):
            parts.append(f"step {job.get('step', 0)}/{job['total_steps']}")
        for label, values in (("loss", job.get("losses")), ("w", job.get("weights"))):
            if values:
                parts.append(label + " " + " ".join(f"{k}={v:.3g}" for k, v in values.items()))
        if job.get("eta_seconds") is not None:
            parts.append(f"eta {float(job['eta_seconds'] or 0):.0f}s")
        self.line("  ".join(parts), key=str(job.get("phase")))

    def line(self, text: str, key: str = "") -> None:
        """Show `text`; on a pipe only when the phase changed or every 10 seconds."""
        if text == self._last_line:
            return
        if self.tty:
            pad = max(0, len(self._last_line) - len(text))
            self.stream.write("\r" + text + " " * pad)
        elif key != self._last_phase or time.monotonic() - self._last_print >= 10:
            self.stream.write(text + "\n")
            self._last_print = time.monotonic()
        self.stream.flush()
        self._last_line, self._last_phase = text, key

    def done(self) -> None:
        """End the redrawn line."""
        if self.tty and self._last_line:
            self.stream.write("\n")
            self.stream.flush()
        self._last_line = ""


# -- database-side commands ------------------------------------------------------------------


@contextlib.contextmanager
def _session() -> Iterator[Any]:
    from app.db import create_db_engine, create_session_factory

    engine = create_db_engine(_settings().database_url)
    try:
        with create_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def cmd_migrate(args: argparse.Namespace) -> int:
    """Migrate the deployment's database to the newest revision."""
    from app.db.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url, args.revision)
    print(f"database at {args.revision}: {_redact(settings.database_url)}")
    return 0


def _redact(url: str) -> str:
    """A database URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _create_key(name: str, scopes: Sequence[str]) -> tuple[Any, str]:
    """Create an API key; returns (its record, the plain-text key shown only now)."""
    from app.services.apikeys import create_api_key

    with _session() as session:
        created = create_api_key(session, name, list(scopes), settings=_settings())
    return created, created.key


def cmd_apikey(args: argparse.Namespace) -> int:
    """`apikey create|revoke|list` against the database."""
    from app.services import apikeys

    if args.apikey_cmd == "create":
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        unknown = sorted(set(scopes) - set(ALL_SCOPES))
        if unknown:
            raise CLIError(f"unknown scopes {unknown}; known: {', '.join(ALL_SCOPES)}")
        created, secret = _create_key(args.name, scopes)
        print(f"created key {args.name!r} ({created.id}) with scopes {','.join(created.scopes)}")
        print("shown once, store them now:")
        print(f"  api key:        {secret}")
        print(f"  webhook secret: {created.webhook_secret}")
        return 0
    with _session() as session:
        if args.apikey_cmd == "revoke":
            apikeys.revoke_api_key(session, args.name)
            print(f"revoked key {args.name!r}")
            return 0
        rows = apikeys.list_api_keys(session)
    print(f"{'name':<24} {'prefix':<12} {'scopes':<40} {'created':<28} revoked")
    for row in rows:
        print(
            f"{row['name']:<24} {row['prefix']:<12} {','.join(row['scopes']):<40} "
            f"{row['created_at'] or '':<28} {row['revoked_at'] or '-'}"
        )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one Celery worker in this process (`worker.main`)."""
    from worker.main import main as worker_main

    argv = ["--loglevel", args.loglevel] + (["--name", args.name] if args.name else [])
    return worker_main(argv)


# -- serve ---------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the signal handler to leave `serve`'s supervision loop."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _ensure_admin_key(var_dir: Path) -> str | None:
    """Create the admin key on first start (file mode 0600); returns it only when new."""
    path = admin_key_path(var_dir)
    if path.exists():
        return None
    var_dir.mkdir(parents=True, exist_ok=True)
    from app.errors import AlreadyExists

    try:
        _, secret = _create_key("admin", [Scope.ADMIN])
    except AlreadyExists:
        # The key file was removed but the key row remains: mint a distinct admin key.
        _, secret = _create_key(f"admin-{int(time.time())}", [Scope.ADMIN])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def _spawn(argv: list[str], log_path: Path | None) -> subprocess.Popen[bytes]:
    """Start a child in its own session: a terminal's Ctrl-C reaches only `serve`."""
    out: Any = None
    if log_path is not None:
        out = log_path.open("ab")
    return subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True
    )


def _stop_children(children: dict[str, subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM (warm stop), then SIGQUIT/SIGKILL whatever outlives `grace` seconds.

    A worker cut short leaves its job `running`; acks_late keeps the message and the sweeper
    re-runs the job from the database on the next start, so nothing is lost.
    """
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for name, proc in children.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(
                f"{name} still busy after {grace:.0f}s; stopping it now "
                "(an interrupted job resumes on the next start)",
                file=sys.stderr,
            )
            proc.send_signal(signal.SIGQUIT if name == "worker" else signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(
    client: LetheClient, children: dict[str, subprocess.Popen[bytes]], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in children.items():
            if proc.poll() is not None:
                raise CLIError(f"{name} exited with status {proc.returncode} during start-up")
        try:
            client.readyz()
            return
        except LetheClientError:
            time.sleep(0.2)
    raise CLIError(f"the API did not become ready within {timeout:.0f}s")


def bootstrap_demo(
    client: LetheClient,
    *,
    dataset: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    show: ProgressBar | None = None,
) -> str | None:
    """First start: register the demo dataset and train the demo model's v1, showing progress.

    Defaults to `mnist5k` and `demo-mnist`; a second call finds both and does nothing.
    Returns the train job it followed, if any.
    """
    ds = dataset or DEMO_DATASET
    spec = model or DEMO_MODEL
    name = str(spec["name"])
    try:
        client.get_dataset(str(ds["name"]))
    except NotFound:
        client.register_dataset(str(ds["name"]), str(ds["kind"]), str(ds.get("uri", "")),
                                dict(ds.get("options") or {}))
        info = client.get_dataset(str(ds["name"]))
        sizes = info.get("splits") or {}
        print(f"registered dataset {ds['name']} ({info.get('num_samples')} samples"
              + (f": {sizes.get('train')} train / {sizes.get('test')} test)" if sizes else ")"))
    job_id: str | None
    try:
        current = client.get_model(name)
    except NotFound:
        created = client.register_model(**spec)
        job_id = created.get("job_id")
        print(f"registered model {name}; training v1 (job {job_id})")
    else:
        if current.get("latest_version"):
            return None
        pending = client.list_jobs(model=name, status=JobStatus.RUNNING, limit=1) or (
            client.list_jobs(model=name, status=JobStatus.QUEUED, limit=1)
        )
        if not pending:
            return None
        job_id = pending[0]["id"]
        print(f"{name} has no version yet; following its train job {job_id}")
    if not job_id:
        return None
    bar = show or ProgressBar()
    job = client.wait_for_job(str(job_id), poll_interval=0.5, on_update=bar.job)
    bar.done()
    if job.get("status") != JobStatus.SUCCEEDED:
        print(f"training {name} ended {job.get('status')}: {job.get('error')}", file=sys.stderr)
        return str(job_id)
    print(f"{name} v{job.get('result_version')} ready; metrics:")
    print(_fmt_metrics(job.get("metrics")))
    _follow_references(client, name, bar)
    return str(job_id)


def _follow_references(client: LetheClient, name: str, bar: ProgressBar) -> None:
    """Wait for the model's reference statistics when they are being computed: the single
    demo worker runs that job next, so a deletion submitted meanwhile would wait behind it."""
    refs = client.get_references(name)
    if refs.get("status") not in (ReferenceStatus.QUEUED, ReferenceStatus.RUNNING) or not refs.get("job_id"):
        return
    print(f"computing {name}'s reference statistics (K = {refs.get('k')} models on half the data each; "
          "the per-sample forgetting test needs them)")
    job = client.wait_for_job(str(refs["job_id"]), poll_interval=0.5, on_update=bar.job)
    bar.done()
    if job.get("status") != JobStatus.SUCCEEDED:
        print(f"reference statistics ended {job.get('status')}: {job.get('error')}", file=sys.stderr)
        return
    print(f"reference statistics of {name} ready")


def _example_ids(client: LetheClient) -> list[str]:
    """Four training-split IDs of the demo dataset for the copy-paste examples."""
    try:
        rows = client.list_samples(DEMO_DATASET["name"], split="train", limit=4)
    except LetheClientError:
        return []
    return [str(r["sample_id"]) for r in rows]


def _print_welcome(url: str, key_file: Path, ids: list[str]) -> None:
    a, b, c, d = (ids + ["SAMPLE-ID"] * 4)[:4]
    print(
        f"""
Lethe is running at {url}  (API docs: {url}/docs)   Ctrl-C stops it.

  export LETHE_KEY=$(cat {key_file})
  curl -s -X POST {url}/v1/deletion-requests -H "Authorization: Bearer $LETHE_KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "demo-mnist", "sample_ids": ["{a}", "{b}"]}}'
  lethe submit --model demo-mnist --ids {c} {d} --wait
""",
        flush=True,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the service: embedded by default (migrate, API, one worker, demo on first start)."""
    settings = _settings()
    url = f"http://{args.host}:{args.port}"
    if args.api_only:
        import uvicorn

        uvicorn.run(
            API_FACTORY,
            factory=True,
            host=args.host,
            port=args.port,
            log_level=args.log_level.lower(),
            proxy_headers=True,
            workers=args.workers,
        )
        return 0

    var_dir = Path(settings.var_dir)
    var_dir.mkdir(parents=True, exist_ok=True)
    logs = var_dir / "logs"
    logs.mkdir(exist_ok=True)
    if not args.no_migrate:
        from app.db.migrate import upgrade

        upgrade(settings.database_url)
        print(f"database migrated: {_redact(settings.database_url)}")
    new_key = _ensure_admin_key(var_dir)
    key_file = admin_key_path(var_dir)
    if new_key:
        print(f"created admin API key (saved to {key_file}, mode 0600; shown once):\n  {new_key}")

    children: dict[str, subprocess.Popen[bytes]] = {}
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not args.no_worker:
            children["worker"] = _spawn(
                [sys.executable, "-m", "worker.main", "--loglevel", args.log_level],
                None if args.verbose else logs / "worker.log",
            )
        children["api"] = _spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                API_FACTORY,
                "--host",
                args.host,
                "--port",
                str(args.port),
                "--log-level",
                args.log_level.lower(),
            ],
            None if args.verbose else logs / "api.log",
        )
        with LetheClient(
            url, resolve_api_key(args.api_key) or new_key, timeout=args.timeout
        ) as client:
            _wait_ready(client, children, timeout=120)
            print(f"API ready on {url}; worker logs in {logs}")
            if not args.no_bootstrap:
                bootstrap_demo(client)
            _print_welcome(url, key_file, [] if args.no_bootstrap else _example_ids(client))
        while True:
            for name, proc in children.items():
                if proc.poll() is not None:
                    raise CLIError(f"{name} exited with status {proc.returncode}; see {logs}")
            time.sleep(0.5)
    except _Stop:
        print("\nstopping...", file=sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # A second Ctrl-C while stopping must not abandon the children.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_children(children, grace=args.grace)
        signal.signal(signal.SIGINT, previous[signal.SIGINT])


# -- HTTP commands ---------------------------------------------------------------------------


def _read_ids(args: argparse.Namespace) -> list[str]:
    ids: list[str] = list(args.ids or [])
    if args.ids_file:
        text = sys.stdin.read() if args.ids_file == "-" else Path(args.ids_file).read_text()
        ids.extend(
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        )
    if not ids and not args.subjects:
        raise CLIError("no sample IDs or subjects given (--ids, --ids-file or --subjects)")
    return ids


def cmd_submit(args: argparse.Namespace) -> int:
    """POST a deletion request; with `--wait`, follow it to the end and show the result."""
    ids = _read_ids(args)
    with _client(args) as client:
        request = client.create_deletion_request(
            args.model,
            ids or None,
            subject_ids=args.subjects,
            subject_ref=args.subject_ref,
            reason=args.reason,
            method=args.method,
            verify=args.verify,
            idempotency_key=args.idempotency_key,
        )
        print(
            f"request {request['id']}: {request.get('status')} "
            f"({request.get('sample_count')} IDs, "
            f"{request.get('already_forgotten_count', 0)} already forgotten)"
        )
        if not args.wait:
            return 0
        bar = ProgressBar()

        def show(req: Any, job: Job | None) -> None:
            if job is not None and req.get("status") not in FINAL_STATUSES:
                bar.job(job, prefix=f"{req.get('status')} ")
            else:
                bar.line(str(req.get("status")), key=str(req.get("status")))

        final = client.wait_for_request(
            request["id"], timeout=args.timeout_wait, poll_interval=0.5, on_update=show
        )
        bar.done()
        _print_request(final)
        return 0 if final.get("status") == RequestStatus.SUCCEEDED else 1


def _print_request(req: Any) -> None:
    print(f"request {req.get('id')}  model {req.get('model')}  status {req.get('status')}")
    print(
        f"  samples {req.get('sample_count')}  already forgotten "
        f"{req.get('already_forgotten_count')}  job {req.get('job_id') or '-'}"
    )
    if req.get("result_version") is not None:
        print(f"  new version v{req['result_version']}")
    print(f"  verdict {_fmt_verdict(req.get('verdict'))}")
    if req.get("error"):
        print(f"  error {json.dumps(req['error'])}")
    if req.get("metrics"):
        print("  metrics:")
        print(_fmt_metrics(req["metrics"]))


def cmd_status(args: argparse.Namespace) -> int:
    """A request (with its job), a job, or an overview of models and recent requests."""
    with _client(args) as client:
        if args.job:
            job = client.get_job(args.job)
            print(json.dumps(job, indent=2, sort_keys=True))
            return 0
        if args.request_id:
            _print_request(client.get_deletion_request(args.request_id))
            return 0
        models = client.list_models()
        print(f"{'model':<24} {'latest':>6} {'forgotten':>9} {'pending':>7}")
        for m in models:
            print(
                f"{m.get('name', ''):<24} {m.get('latest_version') or '-'!s:>6} "
                f"{m.get('forgotten_count', 0):>9} {m.get('pending_requests', 0):>7}"
            )
        requests = client.list_deletion_requests(model=args.model, limit=10)
        if requests:
            print("\nrecent deletion requests:")
            for r in requests:
                print(
                    f"  {r.get('id')}  {r.get('model'):<16} {r.get('status'):<10} "
                    f"{r.get('sample_count')} IDs  v{r.get('result_version') or '-'}"
                )
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Stream a checkpoint to disk and check its sha256 against the ETag."""
    with _client(args) as client:
        got = client.download_checkpoint(args.model, args.version, args.output)
    print(f"{got['path']}  {got['size_bytes']} bytes  sha256 {got['sha256']} (matches ETag)")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """`audit verify`: re-walk the hash chain on the server."""
    with _client(args) as client:
        result = client.verify_audit()
    if result.get("ok"):
        print(
            f"audit chain OK: {result.get('checked')} events, head #{result.get('head_seq')} "
            f"{result.get('head_hash')}"
        )
        return 0
    print(
        f"audit chain BROKEN at event #{result.get('first_bad_seq')} "
        f"({result.get('checked')} checked)",
        file=sys.stderr,
    )
    return 1


def _receipt_keys(source: str, timeout: float) -> Any:
    """The key listing from a saved `/v1/receipts/keys` file, or fetched from a URL."""
    import httpx

    if source.startswith(("http://", "https://")):
        try:
            response = httpx.get(source, timeout=timeout, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise CLIError(f"cannot fetch the keys from {source}: {exc}") from None
        if response.status_code != 200:
            raise CLIError(f"{source} answered {response.status_code}")
        return response.json()
    try:
        return json.loads(Path(source).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read the keys from {source}: {exc}") from None


def cmd_receipt(args: argparse.Namespace) -> int:
    """`receipt verify` (offline), `receipt get` (over HTTP), `receipt rotate-key` (development)."""
    if args.receipt_cmd == "rotate-key":
        from app.errors import Unavailable
        from app.receipts.keys import rotate_development_key
        from app.services.receipts import active_signing_key

        try:
            rotate_development_key(_settings())
            with _session() as session:
                key = active_signing_key(session, _settings())
        except Unavailable as exc:
            raise CLIError(exc.detail) from None
        print(f"new receipt signing key {key.kid}; older public keys stay published")
        return 0
    if args.receipt_cmd == "get":
        suffix = "receipt.html" if args.html else "receipt"
        with _client(args) as client:
            response = client._request("GET", f"/v1/deletion-requests/{args.request_id}/{suffix}")
        if args.output:
            Path(args.output).write_bytes(response.content)
            print(f"{args.output}  {len(response.content)} bytes")
        else:
            sys.stdout.write(response.text + ("" if args.html else "\n"))
        return 0

    from app.receipts.signing import public_keys_from, verify_bytes

    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {args.file}: {exc.strerror}") from None
    source = args.keys or f"{args.url.rstrip('/')}/v1/receipts/keys"
    result = verify_bytes(data, public_keys_from(_receipt_keys(source, args.timeout)))
    if not result.ok:
        print(f"receipt INVALID: {result.reason}", file=sys.stderr)
        return 1
    receipt = json.loads(data)
    request, verdict = receipt.get("request") or {}, receipt.get("verdict") or {}
    print(
        f"receipt OK: request {request.get('id')} on model {(receipt.get('model') or {}).get('name')}, "
        f"verdict {verdict.get('status')}, signed by key {result.kid} (Ed25519)"
    )
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    """Forward to the engine's benchmark."""
    from engine.bench import main as bench_main

    return int(bench_main(list(argv)) or 0)


# -- argument parsing --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `lethe` argument parser."""
    p = argparse.ArgumentParser(prog="lethe", description="Lethe machine-unlearning service")
    p.add_argument(
        "--url",
        default=os.environ.get("LETHE_URL", DEFAULT_URL),
        help="service root for HTTP commands (default: $LETHE_URL or %(default)s)",
    )
    p.add_argument(
        "--api-key", default=None, help="API key (default: $LETHE_API_KEY, else var/admin.key)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the service (embedded: API + one worker)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-only",
        action="store_true",
        help="serve the API in this process only (production: no worker, no demo)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("LETHE_API_WORKERS", "1")),
        help="with --api-only: API processes (default: $LETHE_API_WORKERS or 1)",
    )
    s.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    s.add_argument("--no-migrate", action="store_true", help="skip `alembic upgrade head`")
    s.add_argument(
        "--no-bootstrap",
        action="store_true",
        help="do not register mnist5k / train demo-mnist on first start",
    )
    s.add_argument(
        "--grace",
        type=float,
        default=15.0,
        help="seconds a busy worker gets to stop on Ctrl-C (default %(default)s)",
    )
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--verbose", action="store_true", help="child logs to this terminal")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run one Celery GPU worker in this process")
    w.add_argument("--name", default=None)
    w.add_argument("--loglevel", default="INFO")
    w.set_defaults(func=cmd_worker)

    m = sub.add_parser("migrate", help="migrate the database (alembic upgrade)")
    m.add_argument("--revision", default="head")
    m.set_defaults(func=cmd_migrate)

    k = sub.add_parser("apikey", help="create, revoke or list API keys (database)")
    ksub = k.add_subparsers(dest="apikey_cmd", required=True)
    kc = ksub.add_parser("create")
    kc.add_argument("--name", required=True)
    kc.add_argument("--scopes", required=True, help=f"comma-separated: {','.join(ALL_SCOPES)}")
    kr = ksub.add_parser("revoke")
    kr.add_argument("name")
    ksub.add_parser("list")
    k.set_defaults(func=cmd_apikey)

    su = sub.add_parser("submit", help="submit a deletion request")
    su.add_argument("--model", required=True)
    ids = su.add_mutually_exclusive_group()
    ids.add_argument("--ids", nargs="+", metavar="ID")
    ids.add_argument("--ids-file", metavar="FILE", help="one ID per line ('-' for stdin)")
    su.add_argument("--subjects", nargs="+", metavar="SUBJECT",
                    help="data subjects whose training samples to forget (with or without IDs)")
    su.add_argument("--subject-ref")
    su.add_argument("--reason")
    su.add_argument("--method", choices=METHOD_NAMES)
    su.add_argument("--verify", choices=[v.value for v in VerifyMode])
    su.add_argument("--idempotency-key")
    su.add_argument("--wait", action="store_true", help="follow it with a progress bar")
    su.add_argument(
        "--timeout-wait",
        type=float,
        default=None,
        metavar="S",
        help="give up waiting after S seconds",
    )
    su.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="show a request, a job, or an overview")
    st.add_argument("request_id", nargs="?")
    st.add_argument("--job")
    st.add_argument("--model")
    st.set_defaults(func=cmd_status)

    d = sub.add_parser("download", help="download a checkpoint (sha256 checked)")
    d.add_argument("--model", required=True)
    d.add_argument("--version", default="latest")
    d.add_argument("-o", "--output", default=None, help="file or directory")
    d.set_defaults(func=cmd_download)

    a = sub.add_parser("audit", help="audit log operations")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    asub.add_parser("verify")
    a.set_defaults(func=cmd_audit)

    r = sub.add_parser("receipt", help="deletion receipts: verify offline, fetch, rotate the key")
    rsub = r.add_subparsers(dest="receipt_cmd", required=True)
    rv = rsub.add_parser("verify", help="check a receipt's signature offline")
    rv.add_argument("file", help="the receipt JSON")
    rv.add_argument(
        "--keys",
        metavar="URL|FILE",
        help="the public keys: a file saved from /v1/receipts/keys, or its URL "
        "(default: <--url>/v1/receipts/keys)",
    )
    rg = rsub.add_parser("get", help="fetch a request's receipt")
    rg.add_argument("request_id")
    rg.add_argument("--html", action="store_true", help="the printable page instead of the JSON")
    rg.add_argument("-o", "--output", default=None, help="write to this file")
    rsub.add_parser("rotate-key", help="development: sign new receipts with a new key (database)")
    r.set_defaults(func=cmd_receipt)

    sub.add_parser("bench", help="the engine benchmark (arguments forwarded)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lethe` command."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench"]:
        return cmd_bench(args_list[1:])
    args = build_parser().parse_args(args_list)
    try:
        return int(args.func(args))
    except ServiceUnreachable as exc:
        print(
            f"error: cannot reach Lethe at {args.url} ({exc}); is `lethe serve` running?",
            file=sys.stderr,
        )
    except LetheAPIError as exc:
        print(f"error: {exc.status} {exc.code}: {exc.detail or exc.title}", file=sys.stderr)
        extra = {
            k: v
            for k, v in exc.problem.items()
            if k not in {"type", "title", "status", "detail", "code", "instance"}
        }
        if extra:
            print(json.dumps(extra, indent=2)[:4000], file=sys.stderr)
    except (LetheClientError, CLIError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
