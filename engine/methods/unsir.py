"""`unsir`: UNSIR, error-maximising noise for the forgotten classes, then impair and repair.

Tarun, Chundawat, Mandal, Kankanhalli, "Fast Yet Effective Machine Unlearning" (IEEE TNNLS
2023). Three stages:

1. noise: learn a batch of images N_c for each forgotten class c against the frozen original
   model, maximising its error on label c while keeping the noise small,
       minimise  -CE(original(N_c), c) + lambda * mean ||N_c||^2;
2. impair: train on the noise (labelled c) mixed with a small retain subset, one epoch at a
   high learning rate: the noise's large gradients wreck what the model knows about c;
3. repair: train on the retain subset alone, one epoch at a lower learning rate.

The noise is labelled with the forgotten class itself; the public notebook labels it with
class 0 whatever was forgotten, a bug not reproduced here. For sample-level forgetting (the
forget set spans several classes) each class present gets its share of the noise batch in
proportion to its count in the forget set (at least one image).

Published settings. The SSD repository's port (the comparison this baseline stands for):
impair and repair 1 epoch each at lr 1e-4, noise batch 32, 500 retained images per
remaining class, impair batch 32, repair batch 128. The authors' notebook differs (impair lr
0.02, repair lr 0.01, batch 256); an earlier version here took those harsher rates, which
mixes two sources. Kept here: the port's 1e-4 for both impair and repair, the single epochs,
noise batch 32, the noise optimisation (Adam lr 0.1, lambda 0.1). Deviations: 40 noise steps
(the notebook's 5 x 8; the port uses 25 for full classes); batch 64 (the recipe's) for both
stages; a 30% retain subset (`retain_fraction`) instead of 500 per class, so the repair
epoch on a 4,000-sample dataset has enough steps; noise repeated to half the retain subset
(`noise_ratio` 0.5, the port's 2,560 noise images against 4,500 retained: 0.57). Measured
before -> after (the notebook's rates are `{"impair_lr": 0.02, "repair_lr": 0.01}`; avg gap,
docs/robustness.md): mnist5k seed 0, random 27.10 -> 0.79, class 5.62 -> 51.89. At 1e-4 the
model hardly moves: sample deletions no longer wreck it, and a class is no longer forgotten.
The method is built for class forgetting: with a random 10% forgotten, every class gets
noise. BatchNorm statistics stay frozen: noise batches must
not shift them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from engine.errors import InvalidInput
from engine.methods.base import (
    Method,
    MethodOutput,
    UnlearnContext,
    freeze_batchnorm,
    seed_from,
)
from engine.runtime import autocast
from engine.training import OPTIMIZERS, make_optimizer


def noise_labels(forget_labels: npt.NDArray[np.int64], size: int) -> npt.NDArray[np.int64]:
    """Labels of a noise batch of `size` images: each forgotten class gets a share in
    proportion to its count in the forget set, at least one image each (largest remainders)."""
    classes, counts = np.unique(forget_labels, return_counts=True)
    size = max(size, len(classes))
    exact = counts / counts.sum() * size
    share = np.maximum(1, np.floor(exact).astype(np.int64))
    for k in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if share.sum() >= size:
            break
        share[k] += 1
    while share.sum() > size:  # only when the minimum of one pushed it over
        share[int(np.argmax(share))] -= 1
    return np.repeat(classes, share).astype(np.int64)


@dataclass(frozen=True)
class UnsirConfig:
    noise_batch_size: int = 32  # distinct noise images, split over forgotten classes
    noise_steps: int = 40
    noise_lr: float = 0.1
    noise_lambda: float = 0.1
    noise_ratio: float = 0.5  # noise images (repeated) per retain-subset image in impair
    retain_fraction: float = 0.3
    impair_lr: float = 1e-4
    repair_lr: float = 1e-4
    impair_epochs: float = 1.0
    repair_epochs: float = 1.0
    optimizer: str = "adam"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInput(f"optimizer must be one of {OPTIMIZERS}")
        if min(self.noise_batch_size, self.batch_size) < 1 or self.noise_steps < 0:
            raise InvalidInput("batch sizes must be >= 1 and noise_steps >= 0")
        if min(self.noise_lr, self.impair_lr, self.repair_lr) <= 0:
            raise InvalidInput("learning rates must be positive")
        if self.noise_lambda < 0 or self.noise_ratio <= 0:
            raise InvalidInput("noise_lambda must be >= 0 and noise_ratio > 0")
        if self.impair_epochs < 0 or self.repair_epochs < 0:
            raise InvalidInput("impair_epochs and repair_epochs must be >= 0")
        if not 0 < self.retain_fraction <= 1:
            raise InvalidInput("retain_fraction must be in (0, 1]")


class Unsir(Method[UnsirConfig]):
    name = "unsir"
    Config = UnsirConfig

    def run(self, ctx: UnlearnContext) -> MethodOutput:
        cfg = self.config
        rng = ctx.generator(salt=1)
        labels_np = noise_labels(ctx.data.dataset.labels[ctx.forget_idx], cfg.noise_batch_size)
        n_retain = max(1, math.ceil(cfg.retain_fraction * len(ctx.retain_idx)))
        retain_sub = rng.choice(ctx.retain_idx, size=n_retain, replace=False)
        repeats = max(1, math.ceil(cfg.noise_ratio * n_retain / len(labels_np)))
        n_mixed = repeats * len(labels_np) + n_retain
        impair_total = math.ceil(cfg.impair_epochs * math.ceil(n_mixed / cfg.batch_size))
        repair_total = math.ceil(cfg.repair_epochs * math.ceil(n_retain / cfg.batch_size))
        total = max(1, cfg.noise_steps + impair_total + repair_total)

        history: list[dict[str, Any]] = []
        step = 0

        def record(losses: dict[str, float], stage: str) -> None:
            nonlocal step
            step += 1
            history.append({"step": step, "stage": stage, "losses": losses, "weights": {}})
            ctx.step("unlearning", step, total, losses)

        # 1. Error-maximising noise, learned against the frozen original model.
        labels = torch.from_numpy(labels_np).to(ctx.device)
        gen = torch.Generator().manual_seed(seed_from(ctx, 2))
        shape = (len(labels_np), *ctx.data.dataset.input_shape)
        noise = torch.randn(shape, generator=gen).to(ctx.device).requires_grad_(True)
        original = ctx.original
        original.eval()
        noise_opt = torch.optim.Adam([noise], lr=cfg.noise_lr)
        for _ in range(cfg.noise_steps):
            with autocast(ctx.device):
                ce = nn.functional.cross_entropy(original(noise).float(), labels)
            size = noise.pow(2).flatten(1).sum(1).mean()
            loss = -ce + cfg.noise_lambda * size
            # Gradients for the noise only: the original model's weights are left untouched.
            (noise.grad,) = torch.autograd.grad(loss, [noise])
            noise_opt.step()
            record({"noise_ce": ce.item(), "noise_norm": size.item()}, "noise")
        noise = noise.detach()

        # 2. Impair: noise (repeated) mixed with the retain subset, one pass, high lr.
        model = freeze_batchnorm(ctx.student())
        xr, yr = ctx.data.batch(retain_sub)
        mixed_x = torch.cat([noise.repeat(repeats, 1, 1, 1).to(xr.dtype), xr])
        mixed_y = torch.cat([labels.repeat(repeats), yr])
        self._train(model, ctx, mixed_x, mixed_y, cfg.impair_lr, impair_total, rng,
                    lambda v: record({"impair": v}, "impair"))

        # 3. Repair: the retain subset alone, one pass, lower lr.
        self._train(model, ctx, xr, yr, cfg.repair_lr, repair_total, rng,
                    lambda v: record({"repair": v}, "repair"))
        model.eval()
        return MethodOutput(
            model=model, steps=step, history=history,
            extra={"noise_labels": labels_np.tolist(), "noise_repeats": repeats,
                   "retain_subset_size": int(n_retain)},
        )

    def _train(self, model: nn.Module, ctx: UnlearnContext, x: Tensor, y: Tensor, lr: float,
               steps: int, rng: np.random.Generator, report: Any) -> None:
        """`steps` CE steps over (x, y) in shuffled batches (a fresh shuffle per pass)."""
        cfg = self.config
        opt = make_optimizer(model.parameters(), cfg.optimizer, lr)
        per_pass = math.ceil(len(y) / cfg.batch_size)
        order = torch.from_numpy(rng.permutation(len(y))).to(ctx.device)
        for k in range(steps):
            start = (k % per_pass) * cfg.batch_size
            if start == 0 and k > 0:
                order = torch.from_numpy(rng.permutation(len(y))).to(ctx.device)
            pos = order[start : start + cfg.batch_size]
            with autocast(ctx.device):
                loss = nn.functional.cross_entropy(model(x[pos]).float(), y[pos])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            report(loss.item())
