"""A folder of real PNG and JPEG files of mixed sizes and modes, with a CSV manifest.

Class `c` is a colour and stripe pattern plus noise, so a small model learns it in a few
steps; sizes vary from 20 to 56 pixels a side, and formats alternate PNG (RGB, grayscale,
RGBA) and JPEG.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230], [230, 210, 40]], dtype=np.float64)


def make_image(rng: np.random.Generator, label: int, size: tuple[int, int]) -> Image.Image:
    w, h = size
    base = np.broadcast_to(COLOURS[label % len(COLOURS)], (h, w, 3)).copy()
    if label % 2:
        base[:, :: 4] *= 0.4  # vertical stripes for odd classes
    else:
        base[:: 4, :] *= 0.4
    noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB")


def write_image_folder(
    root: Path,
    *,
    classes: int = 4,
    train_per_class: int = 12,
    test_per_class: int = 4,
    seed: int = 0,
    subjects: bool = True,
) -> Path:
    """Write the images under `root/images/` and `root/manifest.csv`; returns the manifest."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    n = 0
    for label in range(classes):
        for k in range(train_per_class + test_per_class):
            size = (int(rng.integers(20, 57)), int(rng.integers(20, 57)))
            img = make_image(rng, label, size)
            if n % 2:
                rel = f"images/{n:05d}.jpg"
                img.save(root / rel, quality=90)
            else:
                mode = ("RGB", "L", "RGBA")[(n // 2) % 3]
                rel = f"images/{n:05d}.png"
                img.convert(mode).save(root / rel)
            split = "train" if k < train_per_class else "test"
            rows.append({"sample_id": f"s{n:05d}", "path": rel, "label": label, "split": split,
                         "subject_id": f"subject-{n // 3}"})
            n += 1
    manifest = root / "manifest.csv"
    fields = ["sample_id", "path", "label", "split"] + (["subject_id"] if subjects else [])
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return manifest
