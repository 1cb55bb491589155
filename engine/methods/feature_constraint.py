"""`feature_constraint`: Lethe's default method (feature constraint + adaptive loss balance).

Two tasks share one model and one optimiser:

- forget:  L_F = d(phi_theta(x_f), phi_R(x_f)) pulls the penultimate features of the forget
           samples toward those of a frozen, randomly initialised teacher phi_R of the same
           architecture (it never saw them, so its features stand in for "not learned");
- recover: L_R = CE(h(phi_theta(x_r)), y_r) on a small random subset of the retain pool.

A balancer (`engine.balance`) weights the two so neither dominates, and a stopping rule
watches the verification signal: the method stops as soon as the forget set looks like data
the model never trained on. The reference for "never trained on" is measured once on held-out
samples with the original model — its per-class accuracy, and the loss threshold of a
membership attack fitted on retain-vs-held-out losses — with one correction: classes that no
retained sample carries any more must not be recognised at all (target accuracy and
membership 0). The statistics are read off the forget batches the method already computes,
so stopping costs nothing extra. The model returned is the one that first meets the target,
or, if none does within the budget, the one closest to it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from engine.archs import Classifier
from engine.balance import BALANCERS, make_balancer
from engine.errors import InvalidInput
from engine.methods.base import Method, MethodOutput, UnlearnContext
from engine.metrics import infer
from engine.runtime import autocast
from engine.training import make_optimizer

FEATURE_LOSSES = ("mse", "l1", "cosine")


def feature_loss(kind: str, student: Tensor, teacher: Tensor) -> Tensor:
    if kind == "mse":
        return nn.functional.mse_loss(student, teacher)
    if kind == "l1":
        return nn.functional.l1_loss(student, teacher)
    return (1.0 - nn.functional.cosine_similarity(student, teacher, dim=1)).mean()


@dataclass(frozen=True)
class ForgetTarget:
    """What the forget set should look like once forgotten, and how to measure it cheaply."""

    acc: float  # expected top-1 accuracy on the forget set of a model that never saw it
    member: float  # expected fraction called "member" by the loss-threshold attack
    loss_threshold: float  # losses below it are called "member"

    def distance(self, acc: float, member: float) -> float:
        """How far forget-set statistics are from the target (0 = on target or past it)."""
        return abs(acc - self.acc) + abs(member - self.member)


def _loss_threshold(member: npt.NDArray[np.float64], nonmember: npt.NDArray[np.float64]) -> float:
    """The loss below which a logistic-regression attack on loss calls a sample 'member'."""
    n = min(len(member), len(nonmember))
    x = np.concatenate([member[:n], nonmember[:n]]).reshape(-1, 1)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    clf = LogisticRegression().fit(x, y)
    a, b = float(clf.coef_[0, 0]), float(clf.intercept_[0])
    if a >= 0:  # losses do not separate members here: nobody is called a member
        return 0.0
    return -b / a


def forget_target(ctx: UnlearnContext, recovery_idx: npt.NDArray[np.int64], probe: int) -> ForgetTarget:
    """Measure the 'never trained on' reference with the original model (a few hundred forwards)."""
    rng = ctx.generator(salt=7)
    heldout = rng.permutation(ctx.heldout_idx)[:probe]
    members = rng.permutation(recovery_idx)[:probe]
    h_out = infer(ctx.original, ctx.data, heldout)
    m_out = infer(ctx.original, ctx.data, members)
    threshold = _loss_threshold(m_out.losses(), h_out.losses())
    h_member = h_out.losses() < threshold

    labels = ctx.data.dataset.labels
    retained_classes = set(np.unique(labels[ctx.retain_idx]).tolist())
    h_labels, h_correct = labels[heldout], h_out.correct()
    overall_acc, overall_member = float(h_correct.mean()), float(h_member.mean())
    acc, member = [], []
    for c in labels[ctx.forget_idx]:
        if c not in retained_classes:
            acc.append(0.0)
            member.append(0.0)
            continue
        same = h_labels == c
        acc.append(float(h_correct[same].mean()) if same.any() else overall_acc)
        member.append(float(h_member[same].mean()) if same.any() else overall_member)
    return ForgetTarget(float(np.mean(acc)), float(np.mean(member)), threshold)


def _last_shared_parameter(model: Classifier) -> nn.Parameter:
    head = {id(p) for p in model.head.parameters()}
    shared = [p for p in model.parameters() if id(p) not in head and p.dim() >= 2]
    return shared[-1]


def _freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm statistics as trained: forget batches must not shift them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class FeatureConstraint(Method):
    name = "feature_constraint"

    @dataclass(frozen=True)
    class Config:
        balancer: str = "dwa"
        feature_loss: str = "mse"
        recovery_fraction: float = 0.1
        recovery_count: int | None = None
        batch_size: int = 64
        optimizer: str = "sgd"
        lr: float = 0.01
        momentum: float = 0.9
        max_epochs: float = 3.0
        min_steps: int = 4
        early_stop: bool = True
        tolerance: float = 0.01
        heldout_probe: int = 512

        def __post_init__(self) -> None:
            if self.balancer not in BALANCERS:
                raise InvalidInput(f"balancer must be one of {BALANCERS}")
            if self.feature_loss not in FEATURE_LOSSES:
                raise InvalidInput(f"feature_loss must be one of {FEATURE_LOSSES}")
            if not 0 < self.recovery_fraction <= 1:
                raise InvalidInput("recovery_fraction must be in (0, 1]")
            if self.lr <= 0 or self.max_epochs <= 0 or self.batch_size < 1:
                raise InvalidInput("lr, max_epochs and batch_size must be positive")

    def recovery_subset(self, ctx: UnlearnContext) -> npt.NDArray[np.int64]:
        """Dr': a random subset of the retain pool (a count, or a fraction of it)."""
        cfg = self.config
        n = cfg.recovery_count or math.ceil(cfg.recovery_fraction * len(ctx.retain_idx))
        n = max(1, min(n, len(ctx.retain_idx)))
        return np.sort(ctx.generator(salt=1).choice(ctx.retain_idx, size=n, replace=False))

    def run(self, ctx: UnlearnContext) -> MethodOutput:
        cfg = self.config
        recovery_idx = self.recovery_subset(ctx)
        target = forget_target(ctx, recovery_idx, cfg.heldout_probe)
        model = ctx.student()
        _freeze_batchnorm(model)
        teacher = ctx.teacher()

        balancer = make_balancer(cfg.balancer, device=ctx.device, shared=_last_shared_parameter(model))
        opt = make_optimizer(
            [*model.parameters(), *balancer.parameters()], cfg.optimizer, cfg.lr,
            momentum=cfg.momentum,
        )
        forget_bs = min(cfg.batch_size, len(ctx.forget_idx))
        window = math.ceil(len(ctx.forget_idx) / forget_bs)  # one pass over the forget set
        total = max(cfg.min_steps, math.ceil(cfg.max_epochs * window))
        rng = ctx.generator(salt=2)

        # The teacher's features of the forget set never change: compute them once.
        with torch.no_grad():
            teacher_feats = torch.cat([teacher.features(x).float()
                                       for x, _ in ctx.data.batches(ctx.forget_idx, 1024)])
        position = {int(i): k for k, i in enumerate(ctx.forget_idx)}

        history: list[dict[str, Any]] = []
        window_losses = {"forget": 0.0, "recover": 0.0}
        window_correct = window_member = window_seen = 0
        best: tuple[float, int, dict[str, Tensor]] | None = None
        stopped_at = None
        forget_order = rng.permutation(ctx.forget_idx)
        for step in range(1, total + 1):
            start = ((step - 1) % window) * forget_bs
            if start == 0 and step > 1:
                forget_order = rng.permutation(ctx.forget_idx)
            f_idx = forget_order[start : start + forget_bs]
            r_idx = rng.choice(recovery_idx, size=min(cfg.batch_size, len(recovery_idx)),
                               replace=False)
            xf, yf = ctx.data.batch(f_idx)
            xr, yr = ctx.data.batch(r_idx)
            tf = teacher_feats[[position[int(i)] for i in f_idx]]
            with autocast(ctx.device):
                feats_f = model.features(xf)
                logits_r = model(xr)
                losses = {
                    "forget": feature_loss(cfg.feature_loss, feats_f.float(), tf),
                    "recover": nn.functional.cross_entropy(logits_r.float(), yr),
                }
            with torch.no_grad():  # the verification signal, read off this forward pass
                logits_f = model.head(feats_f).float()
                ce_f = nn.functional.cross_entropy(logits_f, yf, reduction="none")
                window_correct += int((logits_f.argmax(1) == yf).sum())
                window_member += int((ce_f < target.loss_threshold).sum())
                window_seen += len(f_idx)

            balancer.before_backward(losses)
            objective = balancer.combine(losses)
            opt.zero_grad(set_to_none=True)
            objective.backward()  # type: ignore[no-untyped-call]
            opt.step()

            weights = balancer.weights()
            values = {k: float(v) for k, v in losses.items()}
            for k in window_losses:
                window_losses[k] += values[k]
            history.append({"step": step, "losses": values, "weights": weights})
            ctx.step("unlearning", step, total, values, weights)

            if step % window == 0 or step == total:
                n_steps = step - (step - 1) // window * window
                balancer.end_window({k: v / n_steps for k, v in window_losses.items()})
                acc, member = window_correct / window_seen, window_member / window_seen
                history[-1]["forget_acc"], history[-1]["forget_member"] = acc, member
                # Statistics were measured before this window's updates: the model as it
                # stands now has moved at least this far.
                gap = target.distance(acc, member)
                if best is None or gap < best[0]:
                    best = (gap, step, copy.deepcopy(model.state_dict()))
                reached = acc <= target.acc + cfg.tolerance and member <= target.member + cfg.tolerance
                window_losses = {"forget": 0.0, "recover": 0.0}
                window_correct = window_member = window_seen = 0
                if cfg.early_stop and reached and step >= cfg.min_steps:
                    stopped_at = step
                    break

        steps = history[-1]["step"] if history else 0
        if stopped_at is None and best is not None and cfg.early_stop:
            model.load_state_dict(best[2])
        model.eval()
        return MethodOutput(
            model=model,
            steps=steps,
            history=history,
            extra={
                "target_acc": target.acc,
                "target_member": target.member,
                "loss_threshold": target.loss_threshold,
                "recovery_size": int(len(recovery_idx)),
                "stopped_early": stopped_at is not None,
                "selected_step": stopped_at or (best[1] if best else steps),
            },
        )
