"""`bad_teacher`: distil from an incompetent teacher on the forget set, a competent one elsewhere.

Chundawat, Tarun, Mandal, Kankanhalli, "Can Bad Teaching Induce Forgetting? Unlearning in
Deep Networks Using an Incompetent Teacher" (AAAI 2023). The student starts as the original
model; forget samples and a random subset of the retain pool are shuffled together, and each
sample's target is the softened output of the random-initialised teacher (`ctx.teacher()`)
for forget samples and of the original model (`ctx.original`) for retained ones:

    L = KL(teacher_x || student_x) at temperature T, batch mean.

Published settings (the authors' code and the SSD repository's port, `blindspot`): 30% of
the retain set, temperature 1, Adam at lr 1e-4, 1 epoch at batch 256. On CIFAR-100 with one
class forgotten that epoch is ceil((0.3 x 49,500 + 500) / 256) = 60 Adam steps. The budget
is scaled by optimisation steps, not epochs: `steps` 60 whatever the dataset size (`epochs`,
when given, sets it in passes instead). Kept: the retain fraction, temperature, optimiser and
lr. Deviation: batch 64 (the recipe's) instead of 256, so 60 steps see a quarter of the
samples the reference's 60 do; on mnist5k with 10% forgotten that is 2.6 passes over the
1,480-sample pool. Measured (avg gap to retrain in points, the former 1-epoch budget ->
60 steps; docs/robustness.md): mnist5k seed 0, class 12.98 -> 1.38, random 1.86 -> 6.10;
at 1,000 training samples, class 46.47 -> 1.81, random 2.34 -> 7.52 (2 seeds): the fair
budget forgets a class and over-forgets sample deletions.
BatchNorm statistics stay frozen so forget batches cannot shift them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.errors import InvalidInput
from engine.methods.base import Method, MethodOutput, UnlearnContext, freeze_batchnorm
from engine.runtime import autocast
from engine.training import OPTIMIZERS, make_optimizer


@dataclass(frozen=True)
class BadTeacherConfig:
    retain_fraction: float = 0.3
    temperature: float = 1.0
    lr: float = 1e-4
    optimizer: str = "adam"
    steps: int = 60  # Adam steps, the reference's budget
    epochs: float | None = None  # passes over forget set + retain subset; overrides `steps`
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.retain_fraction <= 1:
            raise InvalidInput("retain_fraction must be in (0, 1]")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInput(f"optimizer must be one of {OPTIMIZERS}")
        if min(self.temperature, self.lr) <= 0 or min(self.batch_size, self.steps) < 1:
            raise InvalidInput("temperature, lr, steps and batch_size must be positive")
        if self.epochs is not None and self.epochs <= 0:
            raise InvalidInput("epochs must be positive when given")


class BadTeacher(Method[BadTeacherConfig]):
    name = "bad_teacher"
    Config = BadTeacherConfig

    def run(self, ctx: UnlearnContext) -> MethodOutput:
        cfg = self.config
        rng = ctx.generator(salt=1)
        n_retain = max(1, math.ceil(cfg.retain_fraction * len(ctx.retain_idx)))
        retain_sub = rng.choice(ctx.retain_idx, size=n_retain, replace=False)
        pool = np.concatenate([ctx.forget_idx, retain_sub]).astype(np.int64)
        is_forget = np.concatenate([np.ones(len(ctx.forget_idx), dtype=bool),
                                    np.zeros(n_retain, dtype=bool)])

        model = freeze_batchnorm(ctx.student())
        original, teacher = ctx.original, ctx.teacher()
        original.eval()
        opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr)
        per_epoch = math.ceil(len(pool) / cfg.batch_size)
        total = cfg.steps if cfg.epochs is None else max(1, math.ceil(cfg.epochs * per_epoch))
        t = cfg.temperature
        history: list[dict[str, Any]] = []
        order = rng.permutation(len(pool))
        for step in range(1, total + 1):
            start = ((step - 1) % per_epoch) * cfg.batch_size
            if start == 0 and step > 1:
                order = rng.permutation(len(pool))
            pos = order[start : start + cfg.batch_size]
            x, _ = ctx.data.batch(pool[pos])
            flag = torch.from_numpy(is_forget[pos]).to(ctx.device)
            with torch.no_grad(), autocast(ctx.device):
                target = torch.where(flag[:, None], teacher(x).float(), original(x).float())
            with autocast(ctx.device):
                logits = model(x).float()
            # Per-sample KL(target || student) at temperature t, scaled by t^2 as usual.
            kl = (nn.functional.kl_div(
                nn.functional.log_softmax(logits / t, dim=1),
                nn.functional.log_softmax(target / t, dim=1),
                reduction="none", log_target=True,
            ).sum(1) * (t * t))
            loss = kl.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            with torch.no_grad():
                losses = {"kl": loss.item()}
                if bool(flag.any()):
                    losses["forget"] = kl[flag].mean().item()
                if not bool(flag.all()):
                    losses["retain"] = kl[~flag].mean().item()
            history.append({"step": step, "losses": losses, "weights": {}})
            ctx.step("unlearning", step, total, losses)
        model.eval()
        return MethodOutput(model=model, steps=total, history=history,
                            extra={"retain_subset_size": int(n_retain)})
