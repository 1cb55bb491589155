"""Architectures, checkpoints and training determinism."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from engine.arch_shapes import ARCHITECTURES, param_shapes
from engine.archs import build_model
from engine.checkpoint import bytes_to_state, load_model, state_to_bytes
from engine.datasets import Dataset
from engine.errors import InvalidCheckpoint, InvalidInput, UnknownName
from engine.runtime import DeviceData
from engine.training import Recipe, train_model


@pytest.mark.parametrize(
    ("arch", "num_classes", "shape"),
    [("small_cnn", 10, (1, 28, 28)), ("small_cnn", 3, (3, 16, 20)), ("resnet18", 10, (3, 32, 32)),
     ("resnet18", 100, (1, 28, 28)), ("mlp", 10, (1, 28, 28)), ("mlp", 3, (3, 16, 20))],
)
def test_torch_free_shape_table_matches_the_models(arch, num_classes, shape):
    model = build_model(arch, num_classes, shape)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == param_shapes(arch, num_classes, shape)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_features_feed_the_head(arch):
    shape = (1, 28, 28) if arch in ("small_cnn", "mlp") else (3, 32, 32)
    model = build_model(arch, 10, shape, seed=0).eval()
    x = torch.rand(4, *shape)
    with torch.no_grad():
        assert torch.equal(model(x), model.head(model.features(x)))
        assert model.features(x).shape[1] == model.head.in_features


def test_seeded_initialisation_is_reproducible_and_seed_dependent():
    a = build_model("small_cnn", 10, (1, 28, 28), seed=5).state_dict()
    b = build_model("small_cnn", 10, (1, 28, 28), seed=5).state_dict()
    c = build_model("small_cnn", 10, (1, 28, 28), seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_unknown_architecture_is_named():
    with pytest.raises(UnknownName, match="vgg"):
        build_model("vgg", 10, (1, 28, 28))


def test_checkpoint_round_trip_is_bit_exact():
    model = build_model("resnet18", 10, (3, 32, 32), seed=1)
    data = state_to_bytes(model)
    loaded = load_model("resnet18", 10, (3, 32, 32), data)
    for name, tensor in model.state_dict().items():
        other = loaded.state_dict()[name]
        assert tensor.dtype == other.dtype and torch.equal(tensor, other), name
    assert state_to_bytes(loaded) == data


def test_wrapper_prefixes_are_stripped():
    model = build_model("small_cnn", 10, (1, 28, 28), seed=1)
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    state = bytes_to_state(st_save(wrapped))
    assert set(state) == set(model.state_dict())


def test_pickles_and_truncated_files_are_refused():
    model = build_model("small_cnn", 10, (1, 28, 28), seed=1)
    with pytest.raises(InvalidCheckpoint):
        bytes_to_state(pickle.dumps(model.state_dict()))
    data = state_to_bytes(model)
    with pytest.raises(InvalidCheckpoint):
        bytes_to_state(data[: len(data) // 2])


def test_mis_shaped_checkpoint_is_refused():
    other = state_to_bytes(build_model("small_cnn", 7, (1, 28, 28)))
    with pytest.raises(InvalidCheckpoint, match="small_cnn"):
        load_model("small_cnn", 10, (1, 28, 28), other)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_checkpoints_holding_nan_or_inf_are_refused_and_the_tensor_named(bad: float):
    model = build_model("small_cnn", 10, (1, 28, 28), seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = sorted(k for k, v in state.items() if v.is_floating_point())[-1]
    state[name].view(-1)[3] = bad
    with pytest.raises(InvalidCheckpoint, match=f"NaN or infinite values in 1 tensors: {name}$"):
        load_model("small_cnn", 10, (1, 28, 28), st_save(state))


def _tiny_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    images = (rng.random((120, 1, 8, 8)) * 255).astype(np.uint8)
    return Dataset("tiny", np.asarray([f"t{i}" for i in range(120)]), labels,
                   np.full(120, "train"), images, 3)


def test_training_is_deterministic_on_cpu_for_a_seed():
    ds = _tiny_dataset()
    data = DeviceData(ds, torch.device("cpu"))
    recipe = Recipe(epochs=2, batch_size=16, seed=3)
    a, steps = train_model("small_cnn", 3, data, ds.train_indices, recipe)
    b, _ = train_model("small_cnn", 3, data, ds.train_indices, recipe)
    c, _ = train_model("small_cnn", 3, data, ds.train_indices, Recipe(epochs=2, batch_size=16, seed=4))
    assert steps == 2 * 8
    assert state_to_bytes(a) == state_to_bytes(b)
    assert state_to_bytes(a) != state_to_bytes(c)


def test_recipe_refuses_nonsense():
    with pytest.raises(InvalidInput):
        Recipe(optimizer="rmsprop")
    with pytest.raises(InvalidInput):
        Recipe(lr=0)
    assert Recipe.from_dict({"lr": 0.1, "unknown": 1}).lr == 0.1
