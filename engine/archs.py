"""Classifier architectures, each split into a feature extractor `features` and a `head`.

Every model maps an image batch to logits as `head(features(x))`; `features` returns the
penultimate representation the feature-constraint method pulls toward the random teacher.
Parameter names and shapes of the built-ins match `engine.arch_shapes` exactly; `timm:<name>`
and `torchvision:<name>` models come from `engine.library_models`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

from engine.arch_shapes import ARCHITECTURES, MLP_WIDTHS, SMALL_CNN_FEATURES, SMALL_CNN_WIDTH
from engine.errors import UnknownName


class Classifier(nn.Module):
    """An image classifier with an explicit feature extractor and linear head."""

    head: nn.Linear

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.features(x))
        return logits

    def checkpoint_module(self) -> nn.Module:
        """The module whose `state_dict` a checkpoint holds (a library model's own keys)."""
        return self


class SmallCNN(Classifier):
    """Two conv blocks and a 128-unit layer: the default for 28x28 digits."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = input_shape
        c1, c2 = SMALL_CNN_WIDTH
        self.conv1 = nn.Conv2d(c, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (h // 4) * (w // 4), SMALL_CNN_FEATURES)
        self.head = nn.Linear(SMALL_CNN_FEATURES, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return torch.relu(self.fc(x.flatten(1)))


class MLP(Classifier):
    """Two fully connected hidden layers on the flattened image: a second CPU-sized
    architecture with none of a CNN's spatial priors (the robustness suite runs both)."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = input_shape
        h1, h2 = MLP_WIDTHS
        self.fc1 = nn.Linear(c * h * w, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.head = nn.Linear(h2, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1)))))


class ResNet18(Classifier):
    """torchvision's ResNet-18 adapted to 32x32 inputs: 3x3 stem, no max-pool."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        body = torchvision.models.resnet18(weights=None)
        body.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
        body.maxpool = nn.Identity()
        body.fc = nn.Identity()
        self.body = body
        self.head = nn.Linear(512, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # type: ignore[no-any-return]


_REGISTRY: dict[str, Callable[[int, tuple[int, int, int]], Classifier]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "mlp": MLP,
}
assert set(_REGISTRY) == set(ARCHITECTURES)


def build_model(
    arch: str, num_classes: int, input_shape: tuple[int, int, int], *, seed: int | None = None
) -> Classifier:
    """A freshly initialised model; with `seed`, the initialisation is reproducible.

    `arch` is a built-in name, `timm:<name>` or `torchvision:<name>`."""
    factory: Callable[[int, tuple[int, int, int]], Classifier]
    if ":" in arch:  # `timm:<name>`, `torchvision:<name>`; another library is refused there
        from engine.library_models import build_library_model

        factory = functools.partial(build_library_model, arch)
    else:
        try:
            factory = _REGISTRY[arch]
        except KeyError:
            known = [*_REGISTRY, "timm:<name>", "torchvision:<name>"]
            raise UnknownName("architecture", arch, known) from None
    if seed is None:
        return factory(num_classes, input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(num_classes, input_shape)
