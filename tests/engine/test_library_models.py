"""`timm:` and `torchvision:` architectures: built by name, split generically, loaded strictly."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save as st_save

from engine.archs import build_model
from engine.checkpoint import load_model, state_to_bytes
from engine.errors import (
    CheckpointMismatch,
    HeadNotFound,
    InvalidCheckpoint,
    UnknownName,
    UnsupportedArchitecture,
)
from engine.library_models import LibraryClassifier, check_split, describe_model
from engine.model_desc import IMAGENET_MEAN, ModelDescription, Preprocessing, split_arch

SHAPE = (3, 32, 32)


@pytest.mark.parametrize(
    ("arch", "plain", "head"),
    [
        ("timm:test_resnet", lambda: timm.create_model("test_resnet", num_classes=5), "fc"),
        # A fixed-size model is built at the registered size: the user passes img_size too.
        ("timm:test_vit", lambda: timm.create_model("test_vit", num_classes=5, img_size=64), "head"),
        ("torchvision:mobilenet_v3_small",
         lambda: torchvision.models.mobilenet_v3_small(num_classes=5), "classifier.3"),
        ("torchvision:shufflenet_v2_x0_5",
         lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=5), "fc"),
    ],
)
def test_library_models_split_into_features_and_head_with_the_librarys_own_keys(arch, plain, head):
    shape = (3, 64, 64) if "vit" in arch else SHAPE
    model = build_model(arch, 5, shape, seed=0)
    assert isinstance(model, LibraryClassifier) and model.head_path == head
    check_split(model, shape)  # head(features(x)) is the model's own output
    x = torch.rand(3, *shape)
    model.eval()
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (3, model.head.in_features)
        assert torch.equal(model.head(feats), model(x))
    # The checkpoint holds exactly the plain library model's state dict.
    user = plain()
    assert list(model.checkpoint_module().state_dict()) == list(user.state_dict())
    user.load_state_dict(load_model(arch, 5, shape, state_to_bytes(model)).checkpoint_module().state_dict())
    user.eval()
    with torch.no_grad():
        assert torch.allclose(user(x), model(x), atol=1e-6)


def test_seeded_library_models_are_reproducible():
    a = build_model("timm:test_resnet", 3, SHAPE, seed=4).state_dict()
    b = build_model("timm:test_resnet", 3, SHAPE, seed=4).state_dict()
    c = build_model("timm:test_resnet", 3, SHAPE, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("arch", "error", "code", "says"),
    [
        ("timm:no_such_model_xyz", UnsupportedArchitecture, "unsupported_architecture", "timm:<name>"),
        ("torchvision:fcn_resnet50", UnsupportedArchitecture, "unsupported_architecture",
         "not a torchvision"),
        ("keras:resnet50", UnsupportedArchitecture, "unsupported_architecture", "unknown library"),
        ("timm:../../etc", UnsupportedArchitecture, "unsupported_architecture", "not a model name"),
        ("torchvision:squeezenet1_0", HeadNotFound, "head_not_found", "not a linear layer"),
        ("resnet50", UnknownName, "unknown_name", "timm:<name>"),
    ],
)
def test_unusable_architectures_are_refused_saying_what_is_supported(arch, error, code, says):
    with pytest.raises(error) as info:
        build_model(arch, 4, SHAPE)
    assert info.value.code == code and says in str(info.value)


def test_descriptions_default_from_the_library_config_without_download():
    d = describe_model("timm:test_resnet", 7)
    cfg = timm.get_pretrained_cfg("test_resnet")
    assert d.input_size == tuple(cfg.input_size) == (3, 160, 160)
    assert d.preprocessing.mean == tuple(cfg.mean) and d.preprocessing.interpolation == cfg.interpolation
    assert d.preprocessing.resize == int(160 / cfg.crop_pct) and d.preprocessing.crop == "center"
    small = describe_model("timm:test_resnet", 7, input_size=[3, 32, 32])
    assert small.input_size == (3, 32, 32) and small.preprocessing.resize == int(32 / cfg.crop_pct)
    tv = describe_model("torchvision:resnet18", 10)
    assert tv.input_size == (3, 224, 224) and tv.preprocessing.resize == 256
    assert tv.preprocessing.mean == IMAGENET_MEAN
    custom = describe_model("timm:test_resnet", 7,
                            preprocessing={"interpolation": "bicubic", "crop": "squash"})
    assert custom.preprocessing.interpolation == "bicubic" and custom.preprocessing.mean == (0.5, 0.5, 0.5)
    # Stored as JSON by the API, read back without torch.
    assert ModelDescription.from_dict(small.to_dict()) == small


def test_description_refuses_nonsense():
    with pytest.raises(Exception, match="crop"):
        Preprocessing(crop="zoom")
    with pytest.raises(Exception, match="in_chans"):
        ModelDescription("timm:test_resnet", 3, 1, (3, 32, 32))
    assert split_arch("timm:test_resnet") == ("timm", "test_resnet")
    assert split_arch("small_cnn") == (None, "small_cnn")


def _state(arch: str = "timm:test_resnet", classes: int = 4) -> dict[str, torch.Tensor]:
    return dict(build_model(arch, classes, SHAPE, seed=0).checkpoint_module().state_dict())


def test_checkpoint_mismatches_are_named():
    state = _state()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(2)
    state["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(CheckpointMismatch) as info:
        load_model("timm:test_resnet", 4, SHAPE, st_save(state))
    msg = str(info.value)
    assert info.value.code == "checkpoint_mismatch"
    assert "missing 1: fc.bias" in msg and "unexpected 1: extra.weight" in msg
    assert "conv1.0.weight (file [1, 1, 1, 1], model [16, 3, 3, 3])" in msg
    # Another class count is a mis-shaped head, named too.
    with pytest.raises(CheckpointMismatch, match="fc.weight"):
        load_model("timm:test_resnet", 6, SHAPE, st_save(_state()))


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod.", "model.module."])
def test_wrapper_prefixes_are_stripped(prefix):
    state = _state()
    wrapped = {prefix + k: v for k, v in state.items()}
    model = load_model("timm:test_resnet", 4, SHAPE, st_save(wrapped))
    assert all(torch.equal(model.checkpoint_module().state_dict()[k], v) for k, v in state.items())


def test_a_pickle_named_safetensors_is_never_unpickled(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "weights.safetensors"
    torch.save({"fc.weight": torch.zeros(2), "x": Payload()}, path)
    with pytest.raises(InvalidCheckpoint, match="pickled"):
        load_model("timm:test_resnet", 4, SHAPE, path)
    assert not marker.exists()
