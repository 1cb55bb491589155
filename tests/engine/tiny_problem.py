"""A tiny problem a small CNN memorises in seconds, shared by the method tests.

Synthetic 12x12 images: each of 4 classes is a fixed random template plus pixel noise, so any
model that learns the task classifies fresh samples of it correctly. A small forget set
carries RANDOM labels (always different from its template's class): only memorisation can
classify it, and a model that never saw it scores 0 on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
import torch

from engine.archs import Classifier
from engine.datasets import Dataset
from engine.methods import UnlearnContext
from engine.metrics import accuracy, infer
from engine.runtime import DeviceData, Reporter
from engine.training import Recipe, train_model

NUM_CLASSES = 4
SIDE = 12
TRAIN_PER_CLASS = 60
TEST_PER_CLASS = 20
FORGET_SIZE = 16
RECIPE = Recipe(optimizer="sgd", lr=0.1, epochs=30, batch_size=32, seed=0, weight_decay=0.0)


@dataclass
class Problem:
    data: DeviceData
    original: Classifier
    forget_idx: npt.NDArray[np.int64]
    retain_idx: npt.NDArray[np.int64]
    test_idx: npt.NDArray[np.int64]
    templates: npt.NDArray[np.int64]  # the template class of every sample

    def context(self, *, forget_idx: npt.NDArray[np.int64] | None = None,
                reporter: Reporter | None = None, seed: int = 0) -> UnlearnContext:
        forget = self.forget_idx if forget_idx is None else forget_idx
        retain = self.data.dataset.train_indices
        retain = retain[~np.isin(retain, forget)]
        return UnlearnContext(
            arch="small_cnn", num_classes=NUM_CLASSES, data=self.data, original=self.original,
            forget_idx=forget, retain_idx=retain, heldout_idx=self.test_idx, recipe=RECIPE,
            teacher_seed=11, seed=seed, reporter=reporter or Reporter(None, None),
        )

    def acc(self, model: Classifier, idx: npt.NDArray[np.int64]) -> float:
        return accuracy(infer(model, self.data, idx))


def make_dataset(rng: np.random.Generator) -> tuple[Dataset, npt.NDArray[np.int64]]:
    templates = (rng.random((NUM_CLASSES, SIDE, SIDE)) > 0.5).astype(np.float32)
    per_class = TRAIN_PER_CLASS + TEST_PER_CLASS
    classes = np.repeat(np.arange(NUM_CLASSES), per_class)
    images = templates[classes] + rng.normal(0.0, 0.35, (len(classes), SIDE, SIDE))
    images = np.clip(images, 0.0, 1.0).astype(np.float32)[:, None]
    splits = np.tile(np.array(["train"] * TRAIN_PER_CLASS + ["test"] * TEST_PER_CLASS),
                     NUM_CLASSES)
    labels = classes.astype(np.int64).copy()
    train = np.flatnonzero(splits == "train")
    forget = np.sort(rng.choice(train, FORGET_SIZE, replace=False))
    # Random labels, never the template's class: only memorisation can classify them.
    labels[forget] = (classes[forget] + rng.integers(1, NUM_CLASSES, FORGET_SIZE)) % NUM_CLASSES
    dataset = Dataset(
        name="tiny", ids=np.asarray([f"s{i:04d}" for i in range(len(classes))]), labels=labels,
        splits=splits, images=images, num_classes=NUM_CLASSES,
    )
    return dataset, classes.astype(np.int64)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small models run fastest single-threaded on a shared machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem() -> Problem:
    dataset, templates = make_dataset(np.random.default_rng(0))
    data = DeviceData(dataset, torch.device("cpu"))
    train = dataset.train_indices
    original, _ = train_model("small_cnn", NUM_CLASSES, data, train, RECIPE)
    original.eval()
    for p in original.parameters():
        p.requires_grad_(False)
    forget = train[dataset.labels[train] != templates[train]]
    assert len(forget) == FORGET_SIZE
    prob = Problem(data, original, forget, train[~np.isin(train, forget)],
                   dataset.test_indices, templates)
    # The premise of every test below: the forget set is memorised, the task is learned.
    assert prob.acc(original, forget) == 1.0
    assert prob.acc(original, prob.retain_idx) >= 0.98
    assert prob.acc(original, prob.test_idx) >= 0.95
    return prob


