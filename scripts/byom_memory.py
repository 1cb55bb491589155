"""Peak memory of an unlearning job over a streamed manifest, at two dataset sizes.

Generates N 64x64 PNG files with a CSV manifest (once; reused), then for each size runs one
fresh process that does what a worker does for a `timm:test_resnet` model: import an uploaded
checkpoint, then unlearn 32 sample IDs with the default method on a fixed budget (recovery
subset of 512, one epoch), with the verification metrics (acc_retain on a 5,000-sample
probe, acc_test on a fixed 1,000-sample test split). The work is the same at every size; only
the dataset grows. Reported per size: the job process's RSS once torch, timm and the engine
are imported (baseline) and its peak RSS, the largest decoding worker's own peak (VmHWM), and
the peak RSS and the peak PSS (shared library pages divided among the processes that map
them: the tree's real footprint) of the whole process tree, sampled every 0.1 s, next to what
the images would take as one in-memory uint8 array.

    PYTHONPATH=$PWD .venv/bin/python scripts/byom_memory.py --root /tmp/byom-bench \
        --sizes 10000 50000 --workers 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import threading
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

SIDE = 64
CLASSES = 10
TEST = 1000


def _write_images(args: tuple[str, int, int]) -> None:
    from PIL import Image

    root, start, stop = args
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        label = i % CLASSES
        base = np.zeros((SIDE, SIDE, 3), dtype=np.float64)
        base[..., label % 3] = 80 + 17 * label
        base[:: 2 + label % 4, :] += 60
        img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(Path(root) / "images" / f"{i:06d}.png", compress_level=1)


def generate(root: Path, n: int) -> None:
    """N images and `manifest_<n>.csv` files for every prefix size asked for later."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    have = len(list((root / "images").glob("*.png")))
    if have < n:
        chunks = [(str(root), s, min(s + 1000, n)) for s in range(have, n, 1000)]
        with get_context("spawn").Pool(max(1, (os.cpu_count() or 2))) as pool:
            pool.map(_write_images, chunks)


def write_manifest(root: Path, n: int) -> Path:
    path = root / f"manifest_{n}.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample_id", "path", "label", "split"])
        for i in range(n):
            w.writerow([f"img-{i:06d}", f"images/{i:06d}.png", i % CLASSES, "test" if i < TEST else "train"])
    return path


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    """Proportional set size: shared library pages split among the processes mapping them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def run_job(manifest: Path, workers: int) -> dict[str, float]:
    """One worker's job, measured in this (fresh) process."""
    import timm  # noqa: F401 - loaded before the baseline is read
    import torch
    from safetensors.torch import save

    from engine.archs import build_model
    from engine.datasets import DatasetSpec
    from engine.jobs import ModelSpec, run_import, run_unlearn
    from engine.library_models import describe_model
    from engine.training import Recipe

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - workers))
    me = os.getpid()
    baseline = _status_kib(me, "VmRSS")  # the interpreter with torch, timm and the engine loaded
    peak = {"tree": 0, "tree_pss": 0, "worker": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = pss = 0
            for p in _tree(me):
                try:
                    total += _status_kib(p, "VmRSS")
                    pss += _pss_kib(p)
                    if p != me:  # VmHWM: the child's own peak since its exec
                        peak["worker"] = max(peak["worker"], _status_kib(p, "VmHWM"))
                except (FileNotFoundError, ProcessLookupError):
                    continue
            peak["tree"] = max(peak["tree"], total)
            peak["tree_pss"] = max(peak["tree_pss"], pss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    arch = "timm:test_resnet"
    spec = ModelSpec(arch, CLASSES, DatasetSpec("manifest", str(manifest), {"workers": workers}),
                     Recipe(epochs=1, batch_size=64, lr=0.01),
                     describe_model(arch, CLASSES, input_size=(3, SIDE, SIDE)))
    upload = save(build_model(arch, CLASSES, (3, SIDE, SIDE), seed=0).checkpoint_module().state_dict())
    start = time.perf_counter()
    imported = run_import(spec, upload)
    forget = [f"img-{i:06d}" for i in range(TEST, TEST + 32)]
    out = run_unlearn(spec, checkpoint=imported.weights, forget_ids=forget, forgotten_ids=[],
                      options={"recovery_count": 512, "max_epochs": 1.0, "early_stop": False})
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return {
        "baseline_mib": baseline / 1024,
        "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_worker_peak_mib": peak["worker"] / 1024,
        "tree_peak_mib": peak["tree"] / 1024,
        "tree_pss_peak_mib": peak["tree_pss"] / 1024,
        "seconds": seconds,
        "steps": out.steps,
        "acc_test": out.metrics["acc_test"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/byom-bench"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job is not None:
        json.dump(run_job(args.job, args.workers), sys.stdout)
        return
    generate(args.root, max(args.sizes))
    rows = []
    for n in args.sizes:
        manifest = write_manifest(args.root, n)
        proc = subprocess.run(
            [sys.executable, __file__, "--job", str(manifest), "--workers", str(args.workers)],
            check=True, capture_output=True, text=True,
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["rows"] = n
        result["in_memory_uint8_mib"] = n * 3 * SIDE * SIDE / 2**20
        rows.append(result)
    header = ("rows", "baseline_mib", "main_peak_mib", "largest_worker_peak_mib", "tree_peak_mib",
              "tree_pss_peak_mib", "in_memory_uint8_mib", "seconds", "steps")
    print(" | ".join(header))  # noqa: T201 - a command-line report
    for r in rows:
        print(" | ".join(f"{r[h]:.0f}" if isinstance(r[h], float) else str(r[h]) for h in header))  # noqa: T201


if __name__ == "__main__":
    main()
