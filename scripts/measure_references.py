"""Cost of reference statistics on this machine: K reference trainings against one training of
`demo-mnist`'s recipe on `mnist5k` (the figures `docs/evidence.md` quotes).

    PYTHONPATH=. python scripts/measure_references.py [--k 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from app.cli import DEMO_MODEL
from engine.datasets import DatasetSpec
from engine.jobs import ModelSpec, Recipe, run_reference, run_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    spec = ModelSpec(
        arch=DEMO_MODEL["architecture"],
        num_classes=DEMO_MODEL["num_classes"],
        dataset=DatasetSpec(kind="mnist5k", uri="", options={}),
        recipe=Recipe.from_dict(dict(DEMO_MODEL["recipe"])),
    )
    train = run_train(spec, device=args.device)
    ref = run_reference(spec, k=args.k, device=args.device)
    ratio = ref.seconds / train.seconds
    sys.stdout.write(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "device": ref.device,
        "recipe": DEMO_MODEL["recipe"],
        "train_seconds": round(train.seconds, 1),
        "k": ref.k,
        "pool_size": ref.pool_size,
        "references_seconds": round(ref.seconds, 1),
        "seconds_per_reference": [round(s, 1) for s in ref.seconds_per_reference],
        "ratio": round(ratio, 2),
        "stats_bytes": len(ref.stats),
        "amortised_ratio_per_request": {n: round(ratio / n, 4) for n in (10, 100, 1000)},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
