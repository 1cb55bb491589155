"""The one interface every unlearning method implements.

A method is a class `Method[ConfigT]` with a frozen `Config` dataclass (its hyperparameters,
with defaults; `self.config` is typed as that class) and a `run(ctx) -> MethodOutput`.
Adding a method is one module and one line in the registry (`engine.methods.METHODS`).
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from engine.archs import Classifier, build_model
from engine.errors import InvalidInput
from engine.evidence import ReferenceStats
from engine.runtime import DeviceData, Progress, Reporter
from engine.training import Recipe

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

IndexArray = npt.NDArray[np.int64]


@dataclass
class UnlearnContext:
    """What a method may use. `retain_idx` already excludes every sample ever forgotten.

    `heldout_idx` are samples never trained on (the `calibration` half of the test split);
    methods may only read the model's outputs on them (as the reference for "not a member"),
    never train on them. `reference_stats`, when the model's are ready, are the OUT scores of
    reference models that never trained on each sample (`engine.evidence.ReferenceStats`);
    methods may read their rows for forget, retain and `heldout_idx` samples only.
    """

    arch: str
    num_classes: int
    data: DeviceData
    original: Classifier
    forget_idx: IndexArray
    retain_idx: IndexArray
    heldout_idx: IndexArray
    recipe: Recipe
    teacher_seed: int
    seed: int
    reporter: Reporter = field(default_factory=lambda: Reporter(None, None))
    reference_stats: ReferenceStats | None = None
    _teacher: Classifier | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def student(self) -> Classifier:
        """A trainable copy of the original model."""
        model = copy.deepcopy(self.original)
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def teacher(self) -> Classifier:
        """The frozen random-initialised teacher (same architecture, `teacher_seed`)."""
        if self._teacher is None:
            t = build_model(self.arch, self.num_classes, self.data.dataset.input_shape,
                            seed=self.teacher_seed).to(self.device)
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)
            self._teacher = t
        return self._teacher

    def generator(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])

    def step(self, phase: str, step: int, total: int, losses: dict[str, float],
             weights: dict[str, float] | None = None) -> None:
        self.reporter.step(Progress(phase, step, total, losses, weights or {}))


@dataclass
class MethodOutput:
    model: Classifier
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoConfig:
    """The options of a method that has none."""


ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


class Method(ABC, Generic[ConfigT]):
    """Base class: subclasses set `name` and `Config` (the dataclass `ConfigT`), implement `run`.

    `class Scrub(Method[ScrubConfig]): Config = ScrubConfig` gives `self.config` the type
    `ScrubConfig`, so methods read their options without casts.
    """

    name: ClassVar[str]
    Config: ClassVar[type[Any]] = NoConfig
    config: ConfigT

    def __init__(self, **options: Any) -> None:
        fields = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise InvalidInput(
                f"unknown options for {self.name}: {unknown}; known: {sorted(fields)}"
            )
        try:
            self.config = self.Config(**options)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"invalid options for {self.name}: {exc}") from exc

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @abstractmethod
    def run(self, ctx: UnlearnContext) -> MethodOutput:
        """Return a model that has forgotten `ctx.forget_idx`."""


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def freeze_batchnorm(model: ModuleT) -> ModuleT:
    """Keep BatchNorm running statistics as trained (their affine weights still train).

    Forget, noise or mixed batches would otherwise shift the statistics every retained
    sample is normalised with. A model without BatchNorm is unaffected.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def seed_from(ctx: UnlearnContext, salt: int) -> int:
    """An integer seed (for `Sampler`, `torch.Generator`) drawn from `ctx.generator(salt)`."""
    return int(ctx.generator(salt).integers(2**31 - 1))


def kl_to(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) on temperature-softened distributions, batch mean."""
    t = temperature
    return nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / t, dim=1),
        nn.functional.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
