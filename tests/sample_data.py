"""Small learnable image datasets the test folders share (importable: `tests/` is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_dataset(path: Path, *, per_class: int = 40, classes: int = 4, seed: int = 0) -> Path:
    """A learnable 28x28 npz: each class lights a different quadrant, plus noise.

    `per_class` samples per class (IDs `s0000...`), a quarter of them in the test split.
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


def write_memorisation_dataset(
    path: Path, *, per_class: int = 40, classes: int = 4, memorised: int = 16, seed: int = 0
) -> tuple[Path, list[str]]:
    """`write_tiny_dataset` plus `memorised` extra training samples whose labels are wrong
    for their quadrant (IDs `m000...`): only memorisation classifies them, so a model trained
    on them is far more confident on them than models that never saw them.

    Returns the path and the memorised samples' IDs."""
    write_tiny_dataset(path, per_class=per_class, classes=classes, seed=seed)
    base = np.load(path)
    rng = np.random.default_rng(seed + 1)
    quadrant = rng.integers(0, classes, size=memorised)
    wrong = (quadrant + rng.integers(1, classes, size=memorised)) % classes
    x = rng.integers(0, 60, size=(memorised, 28, 28)).astype(np.uint8)
    for i, c in enumerate(quadrant):
        r, q = divmod(int(c), 2)
        x[i, r * 14 + 2 : r * 14 + 12, q * 14 + 2 : q * 14 + 12] += np.uint8(150)
    ids = [f"m{i:03d}" for i in range(memorised)]
    np.savez(
        path,
        x=np.concatenate([base["x"], x]),
        y=np.concatenate([base["y"], wrong.astype(np.int64)]),
        ids=np.concatenate([base["ids"], np.asarray(ids)]),
        split=np.concatenate([base["split"], np.full(memorised, "train")]),
    )
    return path, ids
