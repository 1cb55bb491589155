"""`scrub`: SCRUB, alternating max-steps on the forget set and min-steps on the retain pool.

Kurmanji, Triantafillou, Hayes, Triantafillou, "Towards Unbounded Machine Unlearning"
(NeurIPS 2023). The student starts as the original model, which stays frozen as the teacher.
Each epoch first (for the first `max_epochs` epochs only) runs one pass of max-steps over
the forget set,

    maximise KL(original_x || student_x) at temperature T      (x in the forget set),

then one pass of min-steps over the retain pool,

    minimise gamma * CE(student_x, y) + alpha * KL(original_x || student_x)   (x retained).

Published settings (the SCRUB repository, meghdadk/SCRUB, its large-scale CIFAR notebook):
SGD lr 5e-4, momentum 0.9, weight decay 5e-4, kd_T 4, gamma 0.99, alpha
0.001, msteps 2, sgda_epochs 3, retain batch 128, forget batch 32 (the lr decay at epochs
3/5/9 never triggers within 3 epochs). Kept here: the loss weights, temperature, epoch
counts, batch sizes, momentum, weight decay, and full passes over the retain pool
(`retain_fraction` 1.0; a smaller fraction cuts the min-steps, but with fewer min-steps than
max-steps the model collapses). mnist5k, 10% forgotten: 2 x 13 max-steps + 3 x 29 min-steps =
113 steps, about 25% of `retrain`'s 450, the dearest baseline here. One change: lr 1e-3
(2x). Measured on mnist5k, one class forgotten (acc_forget / acc_retain, original 0.99 /
1.00): lr 5e-4 gives 0.97 / 1.00 (nothing forgotten), 1e-3 gives 0.00 / 0.98, 2e-3 collapses
the model (0.00 / 0.11).

+R, rewinding (the paper's SCRUB+R, for the privacy setting): a checkpoint is kept at the
end of every epoch; held-out samples (`ctx.heldout_idx`, never trained on) weighted to the
forget set's class mix give the final model's error on data like the forget set that no model
trained on; the checkpoint whose forget-set error is closest to that reference is returned
(ties go to the later epoch, which had more min-steps). The original model is never a
candidate. `rewind=False` returns the last epoch's model, the former behaviour. Measured
(avg gap, docs/robustness.md): in 3 epochs the last checkpoint is usually also the closest,
so most cells are unchanged (mnist5k seed 0, random 1.43 -> 1.43); at 1,000 training
samples, random seed 0, 4.15 -> 3.96. The reference assumes forget samples look like held-out
samples of their class: for samples memorised under wrong labels it favours an early epoch.

BatchNorm statistics stay frozen so forget batches cannot shift them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from engine.archs import Classifier
from engine.errors import InvalidInput
from engine.methods.base import Method, MethodOutput, UnlearnContext, freeze_batchnorm, kl_to
from engine.metrics import infer
from engine.runtime import autocast
from engine.training import OPTIMIZERS, make_optimizer


def _batches(order: npt.NDArray[np.int64], size: int) -> list[npt.NDArray[np.int64]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


@dataclass(frozen=True)
class ScrubConfig:
    epochs: int = 3  # sgda_epochs
    max_epochs: int = 2  # msteps: epochs that start with a pass of max-steps
    lr: float = 1e-3
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 4.0  # kd_T
    gamma: float = 0.99  # weight of CE in min-steps
    alpha: float = 0.001  # weight of KL in min-steps
    retain_fraction: float = 1.0  # of the retain pool per min pass
    batch_size: int = 128  # retain batch
    forget_batch_size: int = 32
    rewind: bool = True  # SCRUB+R: select the epoch checkpoint against held-out error

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInput(f"optimizer must be one of {OPTIMIZERS}")
        if self.epochs < 1 or not 0 <= self.max_epochs <= self.epochs:
            raise InvalidInput("epochs must be >= 1 and max_epochs in [0, epochs]")
        if min(self.lr, self.temperature) <= 0 or min(self.batch_size,
                                                      self.forget_batch_size) < 1:
            raise InvalidInput("lr, temperature and batch sizes must be positive")
        if min(self.gamma, self.alpha, self.weight_decay) < 0 or not 0 <= self.momentum < 1:
            raise InvalidInput("gamma, alpha, weight_decay >= 0 and momentum in [0, 1)")
        if not 0 < self.retain_fraction <= 1:
            raise InvalidInput("retain_fraction must be in (0, 1]")


class Scrub(Method[ScrubConfig]):
    name = "scrub"
    Config = ScrubConfig

    def run(self, ctx: UnlearnContext) -> MethodOutput:
        cfg = self.config
        rng = ctx.generator(salt=1)
        n_retain = max(1, math.ceil(cfg.retain_fraction * len(ctx.retain_idx)))
        max_per_epoch = math.ceil(len(ctx.forget_idx) / cfg.forget_batch_size)
        min_per_epoch = math.ceil(n_retain / cfg.batch_size)
        total = cfg.max_epochs * max_per_epoch + cfg.epochs * min_per_epoch

        model = freeze_batchnorm(ctx.student())
        original = ctx.original
        original.eval()
        opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr,
                             momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        t = cfg.temperature
        weights = {"gamma": cfg.gamma, "alpha": cfg.alpha}
        history: list[dict[str, Any]] = []
        step = 0

        checkpoints: list[tuple[float, dict[str, torch.Tensor]]] = []

        def update(loss: torch.Tensor, losses: dict[str, float], kind: str) -> None:
            nonlocal step
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            history.append({"step": step, "kind": kind, "losses": losses, "weights": weights})
            ctx.step("unlearning", step, total, losses, weights)

        for epoch in range(1, cfg.epochs + 1):
            if epoch <= cfg.max_epochs:
                for idx in _batches(rng.permutation(ctx.forget_idx), cfg.forget_batch_size):
                    x, _ = ctx.data.batch(idx)
                    with torch.no_grad(), autocast(ctx.device):
                        target = original(x).float()
                    with autocast(ctx.device):
                        kl = kl_to(model(x).float(), target, t)
                    update(-kl, {"forget_kl": kl.item()}, "max")
            retain_sub = rng.choice(ctx.retain_idx, size=n_retain, replace=False)
            for idx in _batches(retain_sub, cfg.batch_size):
                x, y = ctx.data.batch(idx)
                with torch.no_grad(), autocast(ctx.device):
                    target = original(x).float()
                with autocast(ctx.device):
                    logits = model(x).float()
                ce = nn.functional.cross_entropy(logits, y)
                kl = kl_to(logits, target, t)
                update(cfg.gamma * ce + cfg.alpha * kl,
                       {"retain_ce": ce.item(), "retain_kl": kl.item()}, "min")
            if cfg.rewind:
                checkpoints.append((error_on(model, ctx, ctx.forget_idx),
                                    copy.deepcopy(model.state_dict())))
        extra: dict[str, Any] = {}
        if cfg.rewind:
            target = class_matched_error(model, ctx)
            errors = [e for e, _ in checkpoints]
            chosen = min(range(len(errors)), key=lambda k: (abs(errors[k] - target), -k))
            model.load_state_dict(checkpoints[chosen][1])
            extra = {"rewind_target_error": target, "epoch_forget_errors": errors,
                     "rewound_to_epoch": chosen + 1}
        model.eval()
        return MethodOutput(model=model, steps=step, history=history, extra=extra)


def _wrong(model: Classifier, ctx: UnlearnContext, idx: npt.NDArray[np.int64]
           ) -> npt.NDArray[np.bool_]:
    """Which of `idx` the model misclassifies (eval mode; BatchNorm frozen again after)."""
    wrong = ~infer(model, ctx.data, idx).correct()
    freeze_batchnorm(model)  # `infer` restores train mode on every module
    return wrong


def error_on(model: Classifier, ctx: UnlearnContext, idx: npt.NDArray[np.int64]) -> float:
    return float(_wrong(model, ctx, idx).mean())


def class_matched_error(model: Classifier, ctx: UnlearnContext) -> float:
    """The model's error on held-out samples, per class, weighted by the forget set's class
    counts: the error a model that never trained on the forget set would show on it."""
    labels = ctx.data.dataset.labels
    held = ctx.heldout_idx
    wrong = _wrong(model, ctx, held)
    classes, counts = np.unique(labels[ctx.forget_idx], return_counts=True)
    total, weight = 0.0, 0
    for c, n in zip(classes, counts, strict=True):
        mask = labels[held] == c
        if mask.any():
            total += int(n) * float(wrong[mask].mean())
            weight += int(n)
    return total / weight if weight else float(wrong.mean())
