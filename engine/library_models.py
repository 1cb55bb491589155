"""Classifiers from timm and torchvision by name, split generically into features and head.

`timm:<name>`: features are `forward_head(forward_features(x), pre_logits=True)`, the head is
`get_classifier()`. `torchvision:<name>`: the head is the final linear layer found by name
(`fc`, `classifier[-1]`, `heads.head`, `head`); features are that layer's input. Models are
always built with random weights (`pretrained=False`, `weights=None`): nothing is downloaded.

`LibraryClassifier.checkpoint_module()` is the library model itself, so a saved checkpoint has
the library's own keys and loads into plain `timm.create_model(name, num_classes=N)`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from engine.archs import Classifier
from engine.errors import HeadNotFound, UnsupportedArchitecture
from engine.model_desc import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SUPPORTED,
    ModelDescription,
    Preprocessing,
    split_arch,
)

TORCHVISION_HEADS = ("fc", "classifier.-1", "heads.head", "head")


class LibraryClassifier(Classifier):
    """A timm or torchvision model (`net`) with its linear head exposed as `head`."""

    head: nn.Linear

    def __init__(self, net: nn.Module, head_path: str, library: str) -> None:
        super().__init__()
        self.net = net
        self.library = library
        self.head_path = head_path
        head = net.get_submodule(head_path)
        if not isinstance(head, nn.Linear):
            raise HeadNotFound(f"the classifier {head_path!r} is a {type(head).__name__}, not a "
                               f"linear layer; supported: {SUPPORTED}")
        self.head = head  # the same module as inside `net`, so both views train together

    def checkpoint_module(self) -> nn.Module:
        return self.net

    def features(self, x: Tensor) -> Tensor:
        if self.library == "timm":
            net: Any = self.net
            feats: Tensor = net.forward_head(net.forward_features(x), pre_logits=True)
            return feats
        captured: list[Tensor] = []

        def grab(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured.append(args[0])

        handle = self.head.register_forward_pre_hook(grab)
        try:
            self.net(x)
        finally:
            handle.remove()
        return captured[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def _timm_net(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise UnsupportedArchitecture(f"timm:{name}", f"timm {timm.__version__} has no such model; "
                                      f"supported: {SUPPORTED}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": input_shape[0]}
    cfg = timm.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size and tuple(cfg.input_size[1:]) != input_shape[1:]:
        kwargs["img_size"] = input_shape[1:]  # e.g. a ViT's position embeddings follow the size
    try:
        net = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise UnsupportedArchitecture(f"timm:{name}", f"timm cannot build it as a classifier: {exc}") from exc
    if not hasattr(net, "forward_head") or not hasattr(net, "get_classifier"):
        raise HeadNotFound(f"timm:{name} has no forward_head/get_classifier; supported: {SUPPORTED}")
    return net


def _timm_head_path(net: nn.Module, arch: str) -> str:
    classifier = net.get_classifier()  # type: ignore[operator]
    if isinstance(classifier, nn.Module):
        for path, module in net.named_modules():
            if module is classifier and path:
                return str(path)
    raise HeadNotFound(f"{arch}: get_classifier() is not a submodule; supported: {SUPPORTED}")


def _torchvision_net(name: str, num_classes: int, in_chans: int) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UnsupportedArchitecture(
            f"torchvision:{name}",
            f"not a torchvision {torchvision.__version__} classification model; supported: {SUPPORTED}",
        )
    if in_chans != 3:
        raise UnsupportedArchitecture(f"torchvision:{name}", "torchvision classifiers take 3-channel input")
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    try:
        net: nn.Module = torchvision.models.get_model(name, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UnsupportedArchitecture(f"torchvision:{name}", f"torchvision cannot build it: {exc}") from exc
    return net


def _torchvision_head_path(net: nn.Module, arch: str) -> str:
    for candidate in TORCHVISION_HEADS:
        path = candidate
        if candidate.endswith(".-1"):
            parent_path = candidate[: -len(".-1")]
            try:
                parent = net.get_submodule(parent_path)
            except AttributeError:
                continue
            if not isinstance(parent, nn.Sequential) or len(parent) == 0:
                if isinstance(parent, nn.Linear):
                    return parent_path  # densenet: `classifier` is the linear layer itself
                continue
            path = f"{parent_path}.{len(parent) - 1}"
        try:
            module = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return path
        raise HeadNotFound(f"{arch}: the final classifier layer {path!r} is a {type(module).__name__}, "
                           f"not a linear layer; supported: {SUPPORTED}")
    raise HeadNotFound(f"{arch}: no final classifier layer named fc, classifier[-1], heads.head or "
                       f"head; supported: {SUPPORTED}")


def build_library_model(arch: str, num_classes: int, input_shape: tuple[int, int, int]) -> LibraryClassifier:
    """A freshly initialised `timm:`/`torchvision:` classifier (random weights, no download)."""
    library, name = split_arch(arch)
    if library == "timm":
        net = _timm_net(name, num_classes, input_shape)
        return LibraryClassifier(net, _timm_head_path(net, arch), "timm")
    if library == "torchvision":
        net = _torchvision_net(name, num_classes, input_shape[0])
        return LibraryClassifier(net, _torchvision_head_path(net, arch), "torchvision")
    raise UnsupportedArchitecture(arch, f"not a library architecture; supported: {SUPPORTED}")


def check_split(model: Classifier, input_shape: tuple[int, int, int], *, atol: float = 1e-4) -> None:
    """Refuse a model whose `head(features(x))` is not its own output (a head we cannot split)."""
    x = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        whole = model(x)
        feats = model.features(x)
        split = model.head(feats)
    model.train(was_training)
    if feats.dim() != 2 or whole.shape != split.shape or not torch.allclose(whole, split, atol=atol):
        raise HeadNotFound(f"features then head do not reproduce the model's output (features "
                           f"{list(feats.shape)}); supported: {SUPPORTED}")


def _timm_defaults(name: str) -> tuple[tuple[int, int, int], Preprocessing, float]:
    import timm

    cfg = timm.get_pretrained_cfg(name)
    data: dict[str, Any] = cfg.to_dict() if cfg is not None else {}  # type: ignore[no-untyped-call]
    c, h, w = (int(v) for v in data.get("input_size", (3, 224, 224)))
    crop_pct = float(data.get("crop_pct") or 0.875)
    center = (data.get("crop_mode") or "center") == "center"
    prep = Preprocessing(
        mean=tuple(float(v) for v in data.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in data.get("std", IMAGENET_STD)),
        crop="center" if center else "squash",
        interpolation=str(data.get("interpolation") or "bilinear"),
    )
    return (c, h, w), prep, crop_pct


def _torchvision_defaults(name: str) -> tuple[tuple[int, int, int], Preprocessing, float]:
    import torchvision

    crop, resize, interpolation = 224, 256, "bilinear"
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT  # an enum: no download
        keywords = getattr(weights.transforms, "keywords", {})
        crop = int(keywords.get("crop_size", crop))
        resize = int(keywords.get("resize_size", resize))
        mode = keywords.get("interpolation")
        interpolation = str(getattr(mode, "value", interpolation))
    except (ValueError, KeyError, AttributeError):
        pass
    prep = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, None, "center", interpolation)
    return (3, crop, crop), prep, crop / resize


def describe_model(
    arch: str,
    num_classes: int,
    *,
    in_chans: int | None = None,
    input_size: tuple[int, int, int] | list[int] | None = None,
    preprocessing: Preprocessing | dict[str, Any] | None = None,
) -> ModelDescription:
    """A full `ModelDescription`: given fields kept, the rest from the library's defaults
    (timm's `pretrained_cfg`, torchvision's weights metadata, or ImageNet's; no download).

    The default `resize` keeps the library's crop ratio at the chosen input size (timm:
    `floor(size / crop_pct)`). For a built-in, `input_size` is required (it comes from the
    dataset) and the preprocessing defaults to plain [0, 1] pixels squashed to it."""
    library, name = split_arch(arch)
    if library == "timm":
        size, prep, crop_pct = _timm_defaults(name)
    elif library == "torchvision":
        size, prep, crop_pct = _torchvision_defaults(name)
    else:
        if input_size is None:
            raise UnsupportedArchitecture(arch, "a built-in architecture needs input_size from its dataset")
        size, prep, crop_pct = (3, 1, 1), Preprocessing(), 1.0
    if input_size is not None:
        size = (int(input_size[0]), int(input_size[1]), int(input_size[2]))
    if in_chans is not None and in_chans != size[0]:
        size = (in_chans, size[1], size[2])
    if prep.crop == "center":
        prep = replace(prep, resize=int(math.floor(max(size[1], size[2]) / crop_pct)))
    if isinstance(preprocessing, dict):
        prep = Preprocessing.from_dict({**prep.to_dict(), **preprocessing})
    elif preprocessing is not None:
        prep = preprocessing
    if len(prep.mean) != size[0] and len(prep.mean) != 1:
        # A grayscale variant of an RGB model: average the library's statistics.
        prep = replace(prep, mean=(sum(prep.mean) / len(prep.mean),), std=(sum(prep.std) / len(prep.std),))
    return ModelDescription(arch, num_classes, size[0], size, prep)
