"""The `manifest` dataset adapter: an index in memory, the images on disk (torch-free).

A manifest is a CSV or Parquet file with columns `sample_id, path, label[, split][,
subject_id]`; `path` is relative to the manifest's folder (or `options["root"]`). Reading it
is vectorised (pyarrow), so a 1,000,000-row manifest indexes in seconds; the images are not
opened here: `engine.streaming` decodes them per batch. Rows whose path is absolute or climbs
out of the folder are refused by sample ID, and a symlink that leaves it is refused when read.

Options: `input_size` [C, H, W] the images are resized to when the model does not say (default:
the first image's channels and size), `preprocessing` (see `engine.model_desc.Preprocessing`),
`workers` (decoding processes), `num_classes`, `root`.

`check_files` is the registration check: it opens a random sample of rows and reports every
missing or unreadable file by sample ID.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.datasets import TRAIN, Dataset, DatasetSpec
from engine.errors import InvalidInput, PathOutsideDataset, UnreadableImages
from engine.model_desc import ModelDescription, Preprocessing

REQUIRED = ("sample_id", "path", "label")
OPTIONAL = ("split", "subject_id")
# Absolute POSIX or Windows paths, a `..` component, a NUL byte.
_ESCAPES = r"(^[/\\])|(^[A-Za-z]:)|((^|[/\\])\.\.([/\\]|$))|\x00"


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """Where each sample's image lives and what size and preprocessing it is read with."""

    root: Path
    paths: npt.NDArray[np.str_]
    input_size: tuple[int, int, int]
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    subject_ids: npt.NDArray[np.str_] | None = None
    workers: int | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def for_model(self, desc: ModelDescription) -> ImageFiles:
        """The same files read at the model's input size with its preprocessing."""
        return dataclasses.replace(self, input_size=desc.input_size, preprocessing=desc.preprocessing)

    def path_of(self, position: int) -> Path:
        """The file of sample `position`; refuses a path that resolves outside `root`."""
        root = self.root.resolve()
        path = (root / str(self.paths[position])).resolve()
        if root not in path.parents:
            raise PermissionError("the image path resolves outside the dataset folder")
        return path


def read_table(manifest: Path) -> Any:
    """The manifest as a pyarrow Table (CSV, or Parquet by its `.parquet`/`.pq` suffix)."""
    import pyarrow as pa

    if manifest.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(manifest)
    import pyarrow.csv as pacsv

    types = {c: pa.string() for c in ("sample_id", "path", *OPTIONAL)}
    types["label"] = pa.int64()
    return pacsv.read_csv(manifest, convert_options=pacsv.ConvertOptions(column_types=types))


def _strings(table: Any, column: str) -> npt.NDArray[np.str_]:
    col = table.column(column)
    if col.null_count:
        raise InvalidInput(f"the manifest has {col.null_count} empty values in column {column!r}")
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=str)


def _refuse_escapes(table: Any, ids: npt.NDArray[np.str_]) -> None:
    import pyarrow.compute as pc

    bad = pc.match_substring_regex(table.column("path"), _ESCAPES).to_numpy(zero_copy_only=False)
    if bad.any():
        raise PathOutsideDataset(ids[np.asarray(bad, dtype=bool)].tolist())


def image_mode(in_chans: int) -> str:
    return "L" if in_chans == 1 else "RGB"


def _probe_size(path: Path) -> tuple[int, int, int]:
    from PIL import Image

    with Image.open(path) as im:
        c = 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
        w, h = im.size
    return c, int(h), int(w)


def load_manifest(spec: DatasetSpec, name: str) -> Dataset:
    """Index a manifest: IDs, labels, splits (and subjects) in memory; images left on disk."""
    manifest = Path(spec.uri)
    if not manifest.is_file():
        raise InvalidInput(f"manifest not found: {spec.uri}")
    table = read_table(manifest)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise InvalidInput(f"the manifest lacks columns {missing}; it needs {list(REQUIRED)}")
    if table.num_rows == 0:
        raise InvalidInput("the manifest lists no samples")
    ids = _strings(table, "sample_id")
    _refuse_escapes(table, ids)
    paths = _strings(table, "path")
    label_col = table.column("label")
    if label_col.null_count:
        raise InvalidInput(f"the manifest has {label_col.null_count} empty labels")
    labels = np.array(label_col.to_numpy(zero_copy_only=False), dtype=np.int64)  # writable
    if labels.min() < 0:
        raise InvalidInput("labels must be non-negative integers")
    splits = (_strings(table, "split") if "split" in table.column_names
              else np.full(len(ids), TRAIN))
    subjects = _strings(table, "subject_id") if "subject_id" in table.column_names else None
    root = Path(spec.options.get("root") or manifest.parent)
    opts = spec.options
    if "input_size" in opts:
        c, h, w = (int(v) for v in opts["input_size"])
        size = (c, h, w)
    else:
        files = ImageFiles(root, paths, (3, 1, 1))
        try:
            size = _probe_size(files.path_of(0))
        except (OSError, PermissionError) as exc:
            raise UnreadableImages({str(ids[0]): str(exc)}, checked=1) from exc
    files = ImageFiles(
        root=root,
        paths=paths,
        input_size=size,
        preprocessing=Preprocessing.from_dict(dict(opts.get("preprocessing") or {})),
        subject_ids=subjects,
        workers=int(opts["workers"]) if opts.get("workers") is not None else None,
    )
    return Dataset(
        name=name,
        ids=ids,
        labels=labels,
        splits=splits,
        images=None,
        num_classes=int(opts.get("num_classes", int(labels.max()) + 1)),
        files=files,
        subjects=subjects,
    )


def check_files(ds: Dataset, *, sample_size: int = 256, seed: int = 0) -> int:
    """Open a random sample of a streamed dataset's files; raises `UnreadableImages` naming
    every sampled sample whose file is missing, outside the folder or not a decodable image.
    Returns how many were checked."""
    from PIL import Image

    files = ds.files
    if files is None:
        return 0
    n = len(files)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, size=min(sample_size, n), replace=False))
    problems: dict[str, str] = {}
    for pos in picked.tolist():
        try:
            with Image.open(files.path_of(pos)) as im:
                im.draft(image_mode(files.input_size[0]), (64, 64))  # JPEG: a cheap decode
                im.load()
        except FileNotFoundError:
            problems[str(ds.ids[pos])] = "file not found"
        except (OSError, PermissionError, ValueError) as exc:
            problems[str(ds.ids[pos])] = str(exc) or type(exc).__name__
    if problems:
        raise UnreadableImages(problems, checked=len(picked))
    return len(picked)


def read_image(path: Path, input_size: tuple[int, int, int], prep: Preprocessing) -> npt.NDArray[np.uint8]:
    """One image file as uint8 (C, H, W) at `input_size`, resized and cropped per `prep`."""
    from PIL import Image

    c, h, w = input_size
    resample = Image.Resampling[prep.interpolation.upper()]
    with Image.open(path) as im:
        img = im.convert(image_mode(c))
    if prep.crop == "center":
        # torchvision's Resize(int) then CenterCrop, as timm's and torchvision's eval transforms.
        iw, ih = img.size
        short, long = min(iw, ih), max(iw, ih)
        new_short = prep.resize or max(h, w)
        new_long = int(new_short * long / short)
        nw, nh = (new_short, new_long) if iw <= ih else (new_long, new_short)
        nw, nh = max(nw, w), max(nh, h)  # never smaller than the crop
        img = img.resize((nw, nh), resample)
        top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
        img = img.crop((left, top, left + w, top + h))
    else:
        img = img.resize((w, h), resample)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
