"""Intake load, coalescing and checkpoint download of the API process (no worker).

    .venv/bin/python scripts/load_service.py --duration 5 --repeats 3 --checkpoint-mb 1000

Creates a fresh PostgreSQL database (random name, migrated, dropped afterwards) and uses an
empty Redis database number (flushed afterwards); registers a 20,000-sample npz dataset and
two small_cnn models from numpy-built safetensors checkpoints, plus a `big` model whose
checkpoint is about `--checkpoint-mb` MB (a small_cnn for large images: its `fc.weight` grows
with the image size); creates an API key. Then it starts uvicorn (`app.main:create_app`, API
only, no worker) on a loopback port and drives it from a separate load process (httpx, one
keep-alive connection per thread):

- intake: `--connections` threads POST `/v1/deletion-requests` for `--duration` seconds, with
  1 and with 1,000 training IDs per request; rate, p50 and p99 per repeat, medians printed;
- coalescing: 100 one-ID requests for a fresh model fired by 10 threads; distinct job IDs;
- download: the big checkpoint streamed `--repeats` times (MB/s), while the server's VmRSS is
  sampled every 10 ms from /proc (baseline before, peak during, and VmHWM).

Every process, the database and the Redis database are cleaned up, also on Ctrl-C
(BENCHMARKS.md §2 targets: >= 500 req/s at p99 <= 100 ms with 1 ID, >= 100,000 IDs/s bulk,
>= 200 MB/s download with flat memory).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from dispatch_latency import REPO, _port, _redis_deployment  # noqa: E402

RECIPE = {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 32, "seed": 0}
POLICY = {"max_acc_test_drop": 1.0, "max_gap": None, "max_avg_gap": None}
SAMPLES = 20_000
BULK_IDS = 1_000
PARTS = ("intake_1", "intake_1000", "coalescing", "download")


# -- setup (in this process, straight through the services) ----------------------------------


def _npz(path: Path, n: int, side: int) -> Path:
    """`n` side x side uint8 samples of 2 classes; 3 of every 4 in the train split."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(n, side, side), dtype=np.uint8)
    y = (np.arange(n) % 2).astype(np.int64)
    split = np.where(np.arange(n) % 4 < 3, "train", "test")
    ids = np.asarray([f"s{i:05d}" for i in range(n)])
    np.savez(path, x=x, y=y, ids=ids, split=split)
    return path


def _checkpoint(path: Path, side: int) -> Path:
    """A small_cnn safetensors file for 1 x side x side inputs and 2 classes."""
    from safetensors.numpy import save_file

    from engine.arch_shapes import param_shapes

    rng = np.random.default_rng(0)
    tensors = {
        name: (
            rng.standard_normal(shape).astype(np.float32)
            if np.prod(shape) < 1 << 20
            else np.full(shape, 0.01, dtype=np.float32)
        )
        for name, shape in param_shapes("small_cnn", 2, (1, side, side)).items()
    }
    save_file(tensors, str(path))
    return path


def _big_side(mb: int) -> int:
    """The image side (a multiple of 4) whose small_cnn checkpoint is about `mb` MB."""
    # fc.weight is 128 x 64 x (side/4)^2 float32 = 32,768 bytes per (side/4)^2.
    return 4 * max(2, round((mb * 1e6 / 32_768) ** 0.5))


def setup(tmp: Path, url: str, var: Path, checkpoint_mb: int) -> dict[str, Any]:
    """Migrate, create a key, register the datasets and models; return what the load needs."""
    from app.db import create_db_engine, create_session_factory
    from app.db.migrate import upgrade
    from app.services import datasets, models
    from app.services.apikeys import Principal, create_api_key
    from app.settings import Settings
    from models_store import Store

    upgrade(url)
    settings = Settings(var_dir=var, database_url=url, run_background_loops=False, references=False)
    engine = create_db_engine(url)
    sessions = create_session_factory(engine)
    store = Store(settings.store_path)
    try:
        with sessions() as s:
            key = create_api_key(s, "load", ["admin"], settings=settings)
        principal = Principal(key.id, key.name, frozenset(key.scopes))
        side = _big_side(checkpoint_mb)
        specs = [
            ("ds", _npz(tmp / "ds.npz", SAMPLES, 28), 28, ["intake", "coalesce"]),
            ("big", _npz(tmp / "big.npz", 8, side), side, ["big"]),
        ]
        for ds_name, npz, ds_side, names in specs:
            with sessions() as s:
                datasets.register_dataset(s, name=ds_name, kind="npz", uri=str(npz), actor="load")
            ck = _checkpoint(tmp / f"{ds_name}.safetensors", ds_side)
            for name in names:
                with sessions() as s, ck.open("rb") as f:
                    models.register_model_upload(
                        s,
                        store,
                        principal=principal,
                        name=name,
                        dataset=ds_name,
                        architecture="small_cnn",
                        num_classes=2,
                        recipe=RECIPE,
                        checkpoint=f,
                        settings=settings,
                        policy=POLICY,
                        max_bytes=settings.max_checkpoint_bytes,
                    )
            ck.unlink()
    finally:
        engine.dispose()
    train = [f"s{i:05d}" for i in range(SAMPLES) if i % 4 < 3]
    return {"key": key.key, "train_ids": train}


# -- the load process ------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def _intake(base: str, key: str, ids: list[str], n_ids: int, conns: int, seconds: float) -> dict:
    import httpx

    lat: list[float] = []
    errors: list[int] = []
    stop = time.monotonic() + seconds

    def run(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            while time.monotonic() < stop:
                body = {"model": "intake", "sample_ids": rng.sample(ids, n_ids)}
                t0 = time.perf_counter()
                r = c.post("/v1/deletion-requests", json=body)
                dt = time.perf_counter() - t0
                (lat if r.status_code == 202 else errors).append(
                    dt if r.status_code == 202 else r.status_code
                )

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i + int(t0 * 1000),)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {
        "requests": len(lat),
        "errors": len(errors),
        "wall_s": wall,
        "rate": len(lat) / wall,
        "ids_per_s": len(lat) * n_ids / wall,
        "p50_ms": 1000 * _pct(lat, 0.50),
        "p99_ms": 1000 * _pct(lat, 0.99),
    }


def _coalesce(base: str, key: str, ids: list[str]) -> dict:
    import httpx

    job_ids: list[str | None] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            for j in range(10):
                r = c.post(
                    "/v1/deletion-requests", json={"model": "coalesce", "sample_ids": [ids[i * 10 + j]]}
                )
                with lock:
                    statuses.append(r.status_code)
                    job_ids.append(r.json().get("job_id") if r.status_code == 202 else None)

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "requests": len(statuses),
        "accepted": statuses.count(202),
        "elapsed_s": time.monotonic() - t0,
        "jobs": len({j for j in job_ids if j}),
    }


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's worker processes when it runs several)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo.extend(int(c) for c in task.read_text().split())
    return pids


def _rss(pid: int, field: str) -> int:
    """`field` (VmRSS, VmHWM) in bytes, summed over `pid` and its descendants."""
    total = 0
    for p in _tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except FileNotFoundError:
            continue
        total += sum(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))
    return total


def _download(base: str, key: str, pid: int, repeats: int) -> dict:
    import httpx

    runs: list[dict[str, float]] = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        for _ in range(repeats):
            baseline = _rss(pid, "VmRSS")
            peak = [baseline]
            done = threading.Event()

            def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], _rss(pid, "VmRSS"))
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            size = 0
            t0 = time.perf_counter()
            try:
                with c.stream("GET", "/v1/models/big/versions/1/checkpoint") as r:
                    r.raise_for_status()
                    for chunk in r.iter_raw(1 << 20):
                        size += len(chunk)
            finally:
                done.set()
                sampler.join()
            dt = time.perf_counter() - t0
            runs.append(
                {
                    "bytes": size,
                    "seconds": dt,
                    "mb_s": size / dt / 1e6,
                    "rss_before_mb": baseline / 1e6,
                    "rss_peak_mb": peak[0] / 1e6,
                }
            )
    return {"runs": runs, "vmhwm_mb": _rss(pid, "VmHWM") / 1e6}


def _summary(runs: list[dict]) -> dict:
    keys = ("rate", "ids_per_s", "p50_ms", "p99_ms")
    return {
        "median": {k: statistics.median(r[k] for r in runs) for k in keys},
        "runs": [{k: round(v, 2) for k, v in r.items()} for r in runs],
    }


def load(base: str, key: str, ids: list[str], pid: int, args: dict, out: Any) -> None:
    """The load process: warm up, then intake (1 and 1,000 IDs), coalescing, download."""
    conns, seconds, repeats = args["connections"], args["duration"], args["repeats"]
    parts = args["parts"]
    _intake(base, key, ids, 1, conns, 1.0)  # warm-up: connections, pools, caches
    result: dict[str, Any] = {}
    for n_ids, part in ((1, "intake_1"), (BULK_IDS, "intake_1000")):
        if part in parts:
            result[part] = _summary([_intake(base, key, ids, n_ids, conns, seconds) for _ in range(repeats)])
    if "coalescing" in parts:
        result["coalescing"] = _coalesce(base, key, ids)
    if "download" in parts:
        result["download"] = _download(base, key, pid, repeats)
    out.send(result)


# -- orchestration ---------------------------------------------------------------------------


def _start_api(env: dict[str, str], port: int, log: Path, workers: int) -> subprocess.Popen[bytes]:
    import httpx

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "app.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--workers",
            str(workers),
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the API did not start:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Set up a deployment, start the API, run the load process; return its figures."""
    overrides, cleanup = _redis_deployment("lethe_load")
    api: subprocess.Popen[bytes] | None = None
    loader: Any = None
    try:
        with tempfile.TemporaryDirectory(prefix="lethe-load-") as name:
            tmp = Path(name)
            var = tmp / "var"
            t0 = time.monotonic()
            ready = setup(tmp, overrides["LETHE_DATABASE_URL"], var, args.checkpoint_mb)
            setup_s = time.monotonic() - t0
            env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
            env.update(LETHE_VAR_DIR=str(var), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", **overrides)
            port = _port()
            api = _start_api(env, port, tmp / "api.log", args.api_workers)
            ctx = mp.get_context("spawn")
            recv, send = ctx.Pipe(duplex=False)
            loader = ctx.Process(
                target=load,
                args=(
                    f"http://127.0.0.1:{port}",
                    ready["key"],
                    ready["train_ids"],
                    api.pid,
                    {"connections": args.connections, "duration": args.duration, "repeats": args.repeats,
                     "parts": args.parts.split(",")},
                    send,
                ),
            )
            loader.start()
            if not recv.poll(args.timeout):
                raise SystemExit(f"the load process gave no result in {args.timeout} s")
            result = recv.recv()
            loader.join(timeout=30)
            result["setup_s"] = round(setup_s, 1)
            result["settings"] = vars(args)
            return result
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits
        try:
            if loader is not None and loader.is_alive():
                loader.terminate()
                loader.join(timeout=10)
            _stop(api)
            cleanup()  # type: ignore[operator]
        finally:
            signal.signal(signal.SIGINT, previous)


def _table(r: dict[str, Any]) -> str:
    out = io.StringIO()
    out.write("| figure | measured (median of repeats) | target |\n|---|---|---|\n")
    if "intake_1" in r:
        one = r["intake_1"]["median"]
        out.write(
            f"| intake, 1 ID | {one['rate']:.0f} req/s, p50 {one['p50_ms']:.1f} ms, "
            f"p99 {one['p99_ms']:.1f} ms | >= 500 req/s at p99 <= 100 ms |\n"
        )
    if "intake_1000" in r:
        bulk = r["intake_1000"]["median"]
        out.write(
            f"| intake, 1,000 IDs | {bulk['rate']:.1f} req/s = {bulk['ids_per_s']:,.0f} IDs/s,"
            f" p50 {bulk['p50_ms']:.0f} ms, p99 {bulk['p99_ms']:.0f} ms | >= 100,000 IDs/s |\n"
        )
    if "coalescing" in r:
        co = r["coalescing"]
        out.write(
            f"| coalescing | {co['accepted']}/{co['requests']} accepted in "
            f"{co['elapsed_s']:.2f} s -> {co['jobs']} job(s) | <= 2 jobs |\n"
        )
    if "download" in r:
        dl = r["download"]
        mb_s = statistics.median(x["mb_s"] for x in dl["runs"])
        size = dl["runs"][0]["bytes"] / 1e6
        before = min(x["rss_before_mb"] for x in dl["runs"])
        peak = max(x["rss_peak_mb"] for x in dl["runs"])
        out.write(
            f"| download, {size:,.0f} MB checkpoint | {mb_s:.0f} MB/s; server RSS "
            f"{before:.0f} MB before, {peak:.0f} MB peak (VmHWM {dl['vmhwm_mb']:.0f} MB) "
            f"| >= 200 MB/s, flat memory |\n"
        )
    return out.getvalue()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Parse arguments, measure, print the figures as JSON and as a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per intake repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--checkpoint-mb", type=int, default=1000)
    p.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--timeout", type=float, default=600.0, help="bound on the load process")
    args = p.parse_args()
    # Ctrl-C and SIGTERM unwind through the cleanup, also where SIGINT was inherited ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    result = measure(args)
    print(json.dumps(result, indent=2), flush=True)  # noqa: T201
    print(_table(result), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
