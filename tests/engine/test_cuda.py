"""The engine on a CUDA device: bf16 autocast, channels-last, weights published as float32.

These run only where a CUDA device is present (a GPU worker host); elsewhere pytest reports
them as skipped with the reason. The CPU suite covers the same code paths in full precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_problem import NUM_CLASSES, RECIPE, make_dataset

from engine.checkpoint import load_model
from engine.datasets import DatasetSpec
from engine.jobs import ModelSpec, evaluate_checkpoint, run_train, run_unlearn
from engine.methods import UnlearnContext, make_method
from engine.metrics import METRIC_NAMES, accuracy, infer
from engine.runtime import DeviceData
from engine.training import Recipe, train_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

# The options the CPU test of the same problem uses (tests/engine/test_feature_constraint.py).
OPTIONS = {"batch_size": 32, "forget_batch_size": 16, "optimizer": "adam", "lr": 0.001,
           "max_epochs": 30.0, "early_stop": False}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    rng = np.random.default_rng(0)
    templates = rng.random((3, 3, 32, 32)) > 0.5
    labels = np.repeat(np.arange(3), 50)
    x = np.clip(templates[labels] + rng.normal(0, 0.3, (150, 3, 32, 32)), 0, 1).astype(np.float32)
    split = np.where(np.arange(150) % 50 < 40, "train", "test")
    path = tmp_path_factory.mktemp("data") / "rgb.npz"
    np.savez(path, x=x, y=labels, ids=np.asarray([f"s{i:03d}" for i in range(150)]), split=split)
    return ModelSpec("resnet18", 3, DatasetSpec("npz", str(path)),
                     Recipe(epochs=10, batch_size=32, lr=0.05, seed=0))


def test_memorised_samples_are_forgotten_under_bf16() -> None:
    dataset, templates = make_dataset(np.random.default_rng(0))
    data = DeviceData(dataset, torch.device("cuda"))
    train = dataset.train_indices
    original, _ = train_model("small_cnn", NUM_CLASSES, data, train, RECIPE)
    original.eval().requires_grad_(False)
    forget = train[dataset.labels[train] != templates[train]]
    retain = train[~np.isin(train, forget)]
    assert accuracy(infer(original, data, forget)) == 1.0
    ctx = UnlearnContext(
        arch="small_cnn", num_classes=NUM_CLASSES, data=data, original=original,
        forget_idx=forget, retain_idx=retain, heldout_idx=dataset.test_indices, recipe=RECIPE,
        teacher_seed=11, seed=0,
    )
    out = make_method("feature_constraint", OPTIONS).run(ctx)
    assert next(out.model.parameters()).device.type == "cuda"
    assert accuracy(infer(out.model, data, forget)) <= 0.4
    assert accuracy(infer(out.model, data, retain)) >= 0.9
    assert accuracy(infer(out.model, data, dataset.test_indices)) >= 0.9


def test_jobs_on_cuda_publish_float32_weights_that_load_on_cpu(spec: ModelSpec) -> None:
    trained = run_train(spec, device="cuda")
    assert trained.metrics["device"].startswith("cuda") and trained.metrics["acc_test"] >= 0.95
    out = run_unlearn(spec, checkpoint=trained.weights, forget_ids=["s000", "s001", "s050"],
                      forgotten_ids=[], verify="retrain", seed=3, device="cuda")
    assert out.metrics["device"].startswith("cuda") and out.gaps is not None
    model = load_model("resnet18", 3, (3, 32, 32), out.weights)  # on the CPU
    assert all(t.dtype == torch.float32 and t.device.type == "cpu"
               for t in model.state_dict().values() if t.is_floating_point())
    # The published weights are the ones the metrics describe, re-read on the same device.
    again = evaluate_checkpoint(spec, out.weights, forget_ids=["s000", "s001", "s050"],
                                teacher_seed=3, original=trained.weights, device="cuda")
    for name in METRIC_NAMES:
        assert again[name] == pytest.approx(out.metrics[name], abs=1e-6), name
