"""`neggrad_plus`: gradient descent on the retain pool, gradient ascent on the forget set.

NegGrad+ of Kurmanji et al., "Towards Unbounded Machine Unlearning" (NeurIPS 2023): every
step takes one retain batch and one forget batch (the forget batches cycle) and minimises

    beta * CE(retain) - (1 - beta) * CE(forget) + (l2_pull / 2) * ||theta - theta_orig||^2.

The last term is the reference's `l2_penalty(model, model_init, weight_decay)`: an L2 pull
toward the original weights (not toward zero), added to every step's loss in the SCRUB
repository's training loop. Published settings (the SCRUB repository's notebooks): plain
SGD at lr 0.01, 10 passes over the retain set, the model in eval mode (BatchNorm statistics
frozen), beta 0.95 on the small benchmarks and 0.999 on the large ones, the pull's weight
0.1. Kept: lr 0.01, beta 0.95, the pull at 0.1, BatchNorm frozen. Deviations, scaled to our
budget: `retrain` runs the recipe (mnist5k: 8 epochs, about 450 steps), so NegGrad+ runs 1
pass over the retain pool (about 57 steps of 64 retain + 64 forget samples on mnist5k), SGD
with momentum 0.9 (the recipe's optimiser; momentum stands in for the nine passes dropped).
Measured on mnist5k, one class forgotten, without the pull (acc_forget / acc_retain,
original 0.99 / 1.00): beta 0.99 gives 0.96 / 1.00 (nothing forgotten; 0.999 weighs the
ascent term ten times less still), 0.95 gives 0.00 / 0.92, 0.9 collapses the model (0.00 /
0.11). Before -> after the pull (`{"l2_pull": 0}` is the former method; avg gap to retrain,
docs/robustness.md): mnist5k seed 0, random 1.47 -> 1.50, class 48.84 -> 49.39; at 1,000
training samples random 2.94 -> 2.93 (2 seeds). One pass of SGD at lr 0.01 stays close to
the original anyway, so the pull changes little here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.errors import InvalidInput
from engine.methods.base import (
    Method,
    MethodOutput,
    UnlearnContext,
    freeze_batchnorm,
    seed_from,
)
from engine.runtime import Sampler, autocast
from engine.training import OPTIMIZERS, make_optimizer


@dataclass(frozen=True)
class NegGradPlusConfig:
    beta: float = 0.95
    epochs: float = 1.0  # passes over the retain pool
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    forget_batch_size: int = 64
    l2_pull: float = 0.1  # weight of (1/2) ||theta - theta_orig||^2

    def __post_init__(self) -> None:
        if not 0 < self.beta < 1:
            raise InvalidInput("beta must be in (0, 1)")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInput(f"optimizer must be one of {OPTIMIZERS}")
        if self.epochs <= 0 or self.lr <= 0 or min(self.batch_size, self.forget_batch_size) < 1:
            raise InvalidInput("epochs, lr and batch sizes must be positive")
        if self.weight_decay < 0 or self.l2_pull < 0 or not 0 <= self.momentum < 1:
            raise InvalidInput("weight_decay and l2_pull must be >= 0, momentum in [0, 1)")


class NegGradPlus(Method[NegGradPlusConfig]):
    name = "neggrad_plus"
    Config = NegGradPlusConfig

    def run(self, ctx: UnlearnContext) -> MethodOutput:
        cfg = self.config
        model = freeze_batchnorm(ctx.student())
        opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr,
                             momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        retain = Sampler(ctx.retain_idx, cfg.batch_size, seed=seed_from(ctx, 1))
        forget = Sampler(ctx.forget_idx, cfg.forget_batch_size, seed=seed_from(ctx, 2))
        total = max(1, math.ceil(cfg.epochs * retain.batches_per_epoch))
        weights = {"retain": cfg.beta, "forget": 1.0 - cfg.beta}
        history: list[dict[str, Any]] = []
        anchor = [p.detach().clone() for p in ctx.original.parameters()]
        for step in range(1, total + 1):
            xr, yr = ctx.data.batch(retain.next())
            xf, yf = ctx.data.batch(forget.next())
            with autocast(ctx.device):
                ce_r = nn.functional.cross_entropy(model(xr).float(), yr)
                ce_f = nn.functional.cross_entropy(model(xf).float(), yf)
            loss = cfg.beta * ce_r - (1.0 - cfg.beta) * ce_f
            if cfg.l2_pull:
                pull = sum(((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor,
                                                                 strict=True)),
                           torch.zeros((), device=ctx.device))
                loss = loss + 0.5 * cfg.l2_pull * pull
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses = {"retain": ce_r.item(), "forget": ce_f.item()}
            history.append({"step": step, "losses": losses, "weights": weights})
            ctx.step("unlearning", step, total, losses, weights)
        model.eval()
        return MethodOutput(model=model, steps=total, history=history)
