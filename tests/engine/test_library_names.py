"""The torch-free list of library models equals what the installed timm and torchvision build,
and the API-side name check refuses what the libraries lack."""

from __future__ import annotations

import pytest
import timm
import torchvision

from engine import library_names
from engine.errors import UnsupportedArchitecture
from engine.model_desc import check_library_name


def test_the_generated_names_equal_the_installed_libraries():
    regenerate = "run scripts/library_names.py after upgrading timm or torchvision"
    assert set(timm.list_models()) == library_names.TIMM, regenerate
    installed = set(torchvision.models.list_models(module=torchvision.models))
    assert installed == library_names.TORCHVISION, regenerate


@pytest.mark.parametrize("arch", ["timm:test_resnet", "timm:resnet50", "torchvision:mobilenet_v3_small",
                                  "small_cnn"])
def test_known_names_pass(arch):
    check_library_name(arch)


@pytest.mark.parametrize(("arch", "says"), [
    ("timm:no_such_model_xyz", "timm 1."),
    ("torchvision:fcn_resnet50", "no classification model 'fcn_resnet50'"),
    ("keras:resnet50", "unknown library"),
])
def test_unknown_names_are_unsupported_architectures(arch, says):
    with pytest.raises(UnsupportedArchitecture) as info:
        check_library_name(arch)
    assert info.value.code == "unsupported_architecture" and says in str(info.value)
