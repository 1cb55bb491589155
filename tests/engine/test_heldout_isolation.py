"""No unlearning method ever receives an audit index.

Every registered method runs through `engine.unlearning.unlearn` on the tiny problem while
everything it can read is watched: the context's `heldout_idx`, every position the data
accessor hands out (`DeviceData.batch`, which `batches` and `infer` go through), every
position it indexes the dataset's label and image arrays with, and any look at the dataset's
split attributes. Metrics and evidence, computed outside the method, must read audit data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tiny_problem import NUM_CLASSES, RECIPE

import engine.unlearning as unlearning
from engine.datasets import Dataset
from engine.methods import METHODS, make_method
from engine.runtime import InMemoryData

WATCHED_ATTRIBUTES = {"test_indices", "audit_indices", "heldout_partition", "splits"}


class Watch:
    def __init__(self) -> None:
        self.active = False
        self.read: set[int] = set()
        self.attributes: set[str] = set()
        self.contexts: list[Any] = []

    def record(self, idx: Any) -> None:
        if not self.active:
            return
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        arr = np.asarray(idx)
        if arr.dtype == bool:
            arr = np.flatnonzero(arr)
        if arr.dtype.kind in "iu":
            self.read.update(int(i) for i in arr.ravel())


class WatchedArray(np.ndarray):
    """A dataset array that records the positions it is indexed with (the array itself only,
    not arrays sliced from it, whose positions mean something else)."""

    watch: Watch | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self.watch = None

    def __getitem__(self, key: Any) -> Any:
        if self.watch is not None and not isinstance(key, slice | tuple):
            self.watch.record(key)
        return super().__getitem__(key)


def _watched(arr: np.ndarray, watch: Watch) -> WatchedArray:
    w = arr.view(WatchedArray)
    w.watch = watch
    return w


class WatchedDataset(Dataset):
    def __getattribute__(self, name: str) -> Any:
        if name in WATCHED_ATTRIBUTES:
            watch = object.__getattribute__(self, "__dict__").get("_watch")
            if watch is not None and watch.active:
                watch.attributes.add(name)
        return super().__getattribute__(name)


class WatchedData(InMemoryData):
    def __init__(self, dataset: Dataset, watch: Watch) -> None:
        super().__init__(dataset, torch.device("cpu"))
        spy = WatchedDataset(name=dataset.name, ids=dataset.ids,
                             labels=_watched(dataset.labels, watch), splits=dataset.splits,
                             images=_watched(dataset.images, watch),
                             num_classes=dataset.num_classes)
        object.__setattr__(spy, "_watch", watch)
        self.dataset = spy
        self.watch = watch

    def batch(self, idx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.watch.record(idx)
        return super().batch(idx)


@pytest.fixture
def watched(problem, monkeypatch):
    watch = Watch()

    class Watched:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def config_dict(self) -> dict[str, Any]:
            return dict(self.inner.config_dict())

        def run(self, ctx: Any) -> Any:
            watch.contexts.append(ctx)
            watch.active = True
            try:
                return self.inner.run(ctx)
            finally:
                watch.active = False

    monkeypatch.setattr(unlearning, "make_method",
                        lambda name, options=None: Watched(make_method(name, options)))
    return watch, WatchedData(problem.data.dataset, watch)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_method_reads_an_audit_sample(problem, watched, method):
    watch, data = watched
    ds = data.dataset
    audit, calibration = set(ds.audit_indices.tolist()), set(ds.calibration_indices.tolist())
    forget = problem.forget_idx[:6]
    retain = np.setdiff1d(ds.train_indices, forget)
    verify = "retrain" if method == "finetune" else "standard"  # one run covers the reference
    res = unlearning.unlearn(problem.original, arch="small_cnn", num_classes=NUM_CLASSES,
                             data=data, forget_idx=forget, retain_idx=retain, recipe=RECIPE,
                             method=method, teacher_seed=3, seed=0, verify=verify)
    assert watch.contexts, "the method never ran through the watched entry point"
    for ctx in watch.contexts:
        assert set(ctx.heldout_idx.tolist()) <= calibration
        assert not set(ctx.heldout_idx.tolist()) & audit
    assert watch.read, "the watch saw no data access at all"
    assert not watch.read & audit, f"{method} read audit samples"
    assert not watch.attributes, f"{method} looked at {sorted(watch.attributes)}"
    # The metrics, computed outside the method, are on the audit split.
    assert res.metrics["acc_test"] == pytest.approx(problem.acc(res.model, ds.audit_indices))


def test_the_watch_sees_held_out_reads(problem, watched):
    # The default method's stopping rule reads held-out samples: all of them calibration ones.
    watch, data = watched
    ds = data.dataset
    forget = problem.forget_idx[:6]
    unlearning.unlearn(problem.original, arch="small_cnn", num_classes=NUM_CLASSES, data=data,
                       forget_idx=forget, retain_idx=np.setdiff1d(ds.train_indices, forget),
                       recipe=RECIPE, teacher_seed=3, seed=0)
    assert watch.read & set(ds.calibration_indices.tolist())
    watch.active = True
    data.batch(ds.audit_indices[:2])
    ds.labels[ds.audit_indices[:1]]
    _ = ds.test_indices
    watch.active = False
    assert set(ds.audit_indices[:2].tolist()) <= watch.read and "test_indices" in watch.attributes
