"""Class deletions from checkpoints of seeded noise, at several bounds of the logit pull.

The end-to-end tests upload such checkpoints (every tensor standard normal: logits in the
thousands). Each case forgets the last 1, 2, 4 or 6 training samples of class 0 or 1 of the
tests' tiny dataset, the rest of the class forgotten before, so the class is gone and the
default method's logit pull is on. Prints, per bound, how many jobs published a model, how
many of those ended on the checkpoint before their losses turned NaN, and how many failed
`unlearning_diverged`.

    .venv/bin/python docs/bench/robust/round6/noise_checkpoints.py 1e9 16 24 32
"""

from __future__ import annotations

import collections
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import checkpoint_bytes  # noqa: E402
from sample_data import write_tiny_dataset  # noqa: E402

import engine.methods.feature_constraint as fc  # noqa: E402
from engine.datasets import DatasetSpec  # noqa: E402
from engine.errors import UnlearningDiverged  # noqa: E402
from engine.jobs import ModelSpec, run_unlearn  # noqa: E402


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(bounds: list[float]) -> None:
    warnings.filterwarnings("ignore")
    path = write_tiny_dataset(Path(tempfile.mkdtemp()) / "tiny.npz")
    with np.load(path) as d:
        train = [str(i) for i, s in zip(d["ids"], d["split"], strict=True) if s == "train"]
    spec = ModelSpec("small_cnn", 4, DatasetSpec("npz", str(path)))
    per_class = len(train) // 4
    ended: list[bool] = []
    run = fc.FeatureConstraint.run

    def observed(self: Any, ctx: Any) -> Any:
        out = run(self, ctx)
        ended.append("diverged_at" in out.extra)
        return out

    fc.FeatureConstraint.run = observed  # type: ignore[method-assign]
    say("| bound | published | of which ended before NaN losses | failed unlearning_diverged |")
    say("|---|---|---|---|")
    for bound in bounds:
        fc.LOGIT_PULL_DELTA = bound
        count: collections.Counter[str] = collections.Counter()
        for checkpoint_seed in range(3):
            checkpoint = checkpoint_bytes(seed=checkpoint_seed)
            for end in (per_class, 2 * per_class):
                for size in (1, 2, 4, 6):
                    for seed in range(4):
                        ended.clear()
                        try:
                            run_unlearn(spec, checkpoint=checkpoint, forget_ids=train[end - size:end],
                                        forgotten_ids=train[:end - size], device="cpu", seed=seed)
                        except UnlearningDiverged:
                            count["failed"] += 1
                        else:
                            count["published"] += 1
                            count["ended"] += any(ended)
        say(f"| {bound:g} | {count['published']} | {count['ended']} | {count['failed']} |")


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [1e9, fc.LOGIT_PULL_DELTA])
