"""`finetune`: keep training the original model with cross-entropy on the retain pool only.

Forgetting comes only from catastrophic interference: the forget samples are never seen
again while the weights move. The baseline of Warnecke et al. (NDSS 2023), Golatkar et al.
(CVPR 2020) and the comparisons in Kurmanji et al. (NeurIPS 2023, "SCRUB").

Published settings: the SCRUB notebooks fine-tune for 10 epochs at lr 0.01 (plain SGD); the
Selective Synaptic Dampening code (Foster et al., AAAI 2024) for 5 epochs at lr 0.02 on a
ResNet-18 pretrained for about 40 epochs, i.e. about 1/8 of the training budget. Scaled to
ours: `retrain` runs the model's recipe (mnist5k: 8 epochs, about 450 steps), so fine-tuning
runs 1 epoch over the retain pool (1/8 of it: about 57 steps of 64 on mnist5k) at lr 0.01,
SGD with momentum 0.9 (the recipe's optimiser), no weight decay. BatchNorm layers keep
training: only retained samples pass through the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from engine.errors import InvalidInput
from engine.methods.base import Method, MethodOutput, UnlearnContext, seed_from
from engine.runtime import Sampler, autocast
from engine.training import OPTIMIZERS, make_optimizer


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 1.0  # passes over the retain pool
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInput(f"optimizer must be one of {OPTIMIZERS}")
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1:
            raise InvalidInput("epochs, lr and batch_size must be positive")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise InvalidInput("weight_decay must be >= 0 and momentum in [0, 1)")


class Finetune(Method[FinetuneConfig]):
    name = "finetune"
    Config = FinetuneConfig

    def run(self, ctx: UnlearnContext) -> MethodOutput:
        cfg = self.config
        model = ctx.student()
        opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr,
                             momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        sampler = Sampler(ctx.retain_idx, cfg.batch_size, seed=seed_from(ctx, 1))
        total = max(1, math.ceil(cfg.epochs * sampler.batches_per_epoch))
        history: list[dict[str, Any]] = []
        for step in range(1, total + 1):
            x, y = ctx.data.batch(sampler.next())
            with autocast(ctx.device):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses = {"retain": loss.item()}
            history.append({"step": step, "losses": losses, "weights": {}})
            ctx.step("unlearning", step, total, losses)
        model.eval()
        return MethodOutput(model=model, steps=total, history=history)
