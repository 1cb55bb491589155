"""Training from a stored recipe: how version 1 is made and how `retrain` reproduces it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from engine.archs import Classifier, build_model
from engine.errors import InvalidInput
from engine.runtime import DeviceData, Progress, Reporter, Sampler, autocast

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Recipe:
    """Everything needed to train (and so retrain) a model reproducibly."""

    optimizer: str = "sgd"
    lr: float = 0.05
    epochs: int = 8
    batch_size: int = 64
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInput(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise InvalidInput("lr must be > 0, epochs and batch_size >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(
    params: Any, name: str, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_model(
    arch: str,
    num_classes: int,
    data: DeviceData,
    train_idx: npt.NDArray[np.int64],
    recipe: Recipe,
    *,
    reporter: Reporter | None = None,
    phase: str = "training",
) -> tuple[Classifier, int]:
    """Train `arch` from scratch on `train_idx` with `recipe`; returns the model and step count.

    On CPU the result is bit-for-bit reproducible for a recipe seed (initialisation and batch
    order both derive from it); cosine learning-rate decay over the whole run.
    """
    model = build_model(arch, num_classes, data.dataset.input_shape, seed=recipe.seed)
    model.to(data.device)
    if data.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(
        model.parameters(), recipe.optimizer, recipe.lr,
        momentum=recipe.momentum, weight_decay=recipe.weight_decay,
    )
    sampler = Sampler(train_idx, recipe.batch_size, seed=recipe.seed)
    total = recipe.epochs * sampler.batches_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for step in range(1, total + 1):
        x, y = data.batch(sampler.next())
        with autocast(data.device):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if reporter is not None:
            reporter.step(Progress(phase, step, total, losses={"train": float(loss.detach())}))
    model.eval()
    return model, total


def timed_train(
    arch: str,
    num_classes: int,
    data: DeviceData,
    train_idx: npt.NDArray[np.int64],
    recipe: Recipe,
    *,
    reporter: Reporter | None = None,
) -> tuple[Classifier, int, float]:
    """`train_model` plus its wall-clock seconds (device synchronised)."""
    start = time.perf_counter()
    model, steps = train_model(arch, num_classes, data, train_idx, recipe, reporter=reporter)
    if data.device.type == "cuda":
        torch.cuda.synchronize(data.device)
    return model, steps, time.perf_counter() - start
