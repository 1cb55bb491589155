"""`feature_constraint`: Lethe's default method (feature constraint + adaptive loss balance).

Two tasks share one model and one optimiser:

- forget:  L_F = d(phi_theta(x_f), phi_R(x_f)) pulls the penultimate features of the forget
           samples toward those of a frozen, randomly initialised teacher phi_R of the same
           architecture (it never saw them, so its features stand in for "not learned");
- recover: L_R = CE(h(phi_theta(x_r)), y_r) on a small random subset of the retain pool.

A balancer (`engine.balance`, DWA by default: the ablation in the README) weights the two,
and the verification signal steers the run:

- Stop. The method stops as soon as the forget set looks like data the model never trained
  on and retained data is back to the original's accuracy. "Never trained on" is measured
  once with the original model on held-out samples: the loss threshold of a membership
  attack fitted on retain-vs-held-out losses, and how often held-out samples of each class
  fall under it. A forget sample of a class the retain pool still carries should fall under
  it no more often than those do (a retrained model still recognises a typical digit it
  never saw, so its accuracy is left to generalisation); a sample of a class no retained
  sample carries must be neither recognised nor called member. When losses do not separate
  members at all, the threshold is the held-out median. The statistics are read off the
  forget batches the method computes anyway, so watching them costs nothing.
- Match losses. A threshold sees one point of the loss distribution; a retrained model's
  losses on the forget set look like held-out losses throughout (a few samples it gets
  wrong included). With at least `match_losses_min` (50) forget samples of present classes,
  each is pushed up to the held-out loss at its own rank (the sample of rank r of n to the
  (r + 0.5) / n quantile; none is pushed down), and the run does not stop while a one-sided
  two-sample Kolmogorov-Smirnov test at 5% tells the forget set's losses from held-out ones.
  Measured on the robustness suite (random 10%, 5 seeds, every configuration), the avg gap
  fell on every configuration or stayed (e.g. 1.60 -> 1.39 at 2,000 samples, 2.65 -> 2.04
  on `mlp`); on 10-sample deletions the quantile targets are too coarse (two
  configurations got worse), hence the minimum (docs/robustness.md).
- Push. Whole-class deletions need far more forgetting than sample deletions: the forget
  loss is scaled by `max_pressure ** (fraction of forget samples whose class is gone)` and
  doubled whenever a full pass over the forget set closes too little of the distance; the
  step budget grows by the same fraction (up to twice `max_epochs` passes) to recover from it.
  A pass over a small class is one or two steps, so the budget for classes that are gone has
  a floor: `budget_floor` (0.25) of the recipe's training steps on the retain pool, scaled by
  the absent fraction. Measured on mnist5k at 1,000 training samples, one class forgotten, two
  seeds: 10 steps leave 60% and 90% of the class recognised (avg gap 16.5 and 24.7); a floor
  of 0.1 (24 steps) gives 0.18 and 3.57, 0.25 (44 and 60 steps) 0.42 and 1.66 (see
  docs/robustness.md). Sample-level deletions are untouched.
- Dampen first. When a class is gone, the run starts from the original dampened by SSD
  (`engine.methods.ssd`: parameters whose importance on the forget set exceeds alpha times
  their importance on the training set are scaled down). alpha is `dampen_absent` (0.5) times
  |D| / |Df|, the ratio a parameter only the forget set uses would show, so the rule means
  the same whatever the class's share (SSD's fixed alpha 5 selects nothing once a class is
  more than a fifth of the data). The feature constraint then runs as above; it usually finds
  the forget set on target and only checks recovery. Measured, one class forgotten, two seeds
  (avg gap): mnist5k at 1,000 samples 0.42 / 1.66 with the floor alone -> 0.58 / 0.05; the
  `mlp` architecture 0.44 / 14.76 -> 0.12 / 0.05, in 3 updates after one importance pass.
  With 5% label noise the forget set's importance spreads over shared weights: dampening
  alone left 22% retained accuracy and the run ended at 4.40 where the floor alone reached
  0.39, so dampening is kept only if it costs at most `dampen_max_drop` (5 points) of
  accuracy on retained samples (a probe of up to `heldout_probe` retained samples). When it
  costs more, the selection is tried again at 2, 4 and 8 times alpha (`dampen_backoff`; the
  importances are computed once, and each stricter selection is a subset of the previous
  one); if none passes, the run starts from the original. With 5% label noise, 5 seeds,
  three of five runs found a selection that passed (at 4 or 8 times alpha), and the avg gap
  went from 2.01 to 0.91; runs whose first selection passes are unchanged.
- Larger steps for a class. The learning rate is `lr * absent_lr_factor ** (absent
  fraction)`: 3x for a whole class, `lr` for sample deletions. At `lr` the forget set of a
  class stalled at 0.5-8% recognised under label noise and on a 5-class task; with 3x every
  run of the suite reached at most 0.5% (docs/robustness.md).
- Recover. Once the forget set is on target but retained accuracy is not, steps go to
  recovery alone; after the first, each reads its forget batch for the monitor only, with
  no graph (a class run that recovers for tens of steps took 0.73-0.95 of its time before).
  Retained accuracy is read off the recovery batches; when a class is gone it must also
  hold on up to `heldout_probe` retained samples the recovery does not train on
  (`recovery_gate`, checked at most once per pass): on mnist5k (4,000 training samples, one
  class forgotten, 5 seeds) the batches' accuracy let runs stop 2.3-2.7 points below
  retraining's retained accuracy; with the gate the avg gap went from 0.88 to 0.49. A class
  recovers on `absent_recovery_fraction` (half) of the retain pool rather than a tenth: the
  tens of recovery steps it needs fit a tenth (99.5% on its batches, 96.5% on the gate's
  samples), and the suite's class gap went from 0.42 to 0.32 (30 runs).
- Hold retained outputs. When a run pushes past the population rule (a class gone, or
  per-sample targets), recovery also pulls the recovery batch's logits toward the
  original's on the same samples (`recovery_logits`, a squared distance), over the classes
  the retain pool still carries only: cross-entropy on a fitted retained sample is near zero
  until it flips, this term answers as soon as any logit drifts. Anchoring the gone class's
  logits too brought it back (`noise5`, weight 1: 9.5% and 17.1% recognised). On the
  suite's class runs (30): avg gap 0.29 against 0.32, runs more than 1 point of retained
  accuracy below retraining 1 against 4, forget flag rate inside retraining's interval on 25
  against 20 (docs/robustness.md, round 5). Sample deletions without targets do not use it.
  Past a drift of `LOGIT_PULL_DELTA` (24 logits) the pull grows linearly, so its force is
  bounded: with the plain square a checkpoint of noise (logits in the thousands) overshot on
  its recovery steps until its weights were NaN; the suite's class runs never drift that far.

Without a stop within the budget the method returns the model closest to the target; with a
recovery gate, only among the checkpoints the gate measured (the recovery batches alone would
pick one it refuses). A step whose losses are NaN or infinite ends the run the same way (the
model has diverged; `extra["diverged_at"]`); with no checkpoint measured before it, the job
fails `unlearning_diverged` (`engine.unlearning`).
Known limit: a sample memorised against its visual class (label noise) already has a higher
loss than typical held-out samples, so this loss-based signal cannot see it; `early_stop=False`
runs the plain fixed budget.
"""

from __future__ import annotations

import copy
import math
import time
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
from engine.evidence import logit_confidence
from engine.methods.base import Method, MethodOutput, UnlearnContext, freeze_batchnorm
from engine.metrics import accuracy, infer
from engine.runtime import autocast
from engine.training import make_optimizer

FEATURE_LOSSES = ("mse", "l1", "cosine")


def feature_loss(kind: str, student: Tensor, teacher: Tensor) -> Tensor:
    return sample_feature_loss(kind, student, teacher).mean()


def label_confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """phi = log p_y - log(1 - p_y) of each row, differentiable (`engine.evidence`'s score)."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(nn.functional.one_hot(labels, logits.shape[1]).bool(), -torch.inf)
    return own - torch.logsumexp(others, dim=1)


def sample_feature_loss(kind: str, student: Tensor, teacher: Tensor) -> Tensor:
    """The feature distance of each sample (a vector over the batch)."""
    if kind == "mse":
        return ((student - teacher) ** 2).mean(dim=1)
    if kind == "l1":
        return (student - teacher).abs().mean(dim=1)
    return 1.0 - nn.functional.cosine_similarity(student, teacher, dim=1)


class SampleTargets:
    """Per-sample targets from the model's reference statistics (OUT scores of models that
    never trained on each sample).

    For forget sample x, what a model that never saw x would score is estimated as
    phi_hat(x) = mu_out(x) + sigma * median(z_null): the references' mean on x, shifted by
    how much more confident the full model is than half-data references on samples nobody
    trained on (`z_null`: the original's standardised scores on `calibration` samples). A
    sample with phi_hat(x) < 0 (a never-trained model is expected to give its label less than
    even odds: references misclassify it) is a *target*: it is pushed until its own score
    falls to phi_hat(x), or with `margin` only to max(phi_hat(x), -margin), just past even
    odds. Other samples are left to the population rule, so a typical sample that every
    model recognises is not pushed further than a retrained model would be.
    """

    def __init__(self, expected: npt.NDArray[np.float64], sigma: npt.NDArray[np.float64],
                 absent: npt.NDArray[np.bool_], margin: float | None = None) -> None:
        self.targeted = (expected < 0.0) & ~absent
        self.expected = (expected if margin is None
                         else np.where(self.targeted, np.maximum(expected, -margin), expected))
        self.sigma = sigma  # the OUT spread: the push is measured in its units
        self.on_target = ~self.targeted

    def observe(self, positions: npt.NDArray[np.int64], phi: npt.NDArray[np.float64]) -> None:
        self.on_target[positions] = ~self.targeted[positions] | (phi <= self.expected[positions])

    def off_target(self, positions: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return ~self.on_target[positions]

    def distance(self) -> float:
        """The fraction of targeted samples still above their target (0 when none is)."""
        n = int(self.targeted.sum())
        return float((self.targeted & ~self.on_target).sum() / n) if n else 0.0

    def stats(self) -> dict[str, float]:
        return {"targeted": float(self.targeted.sum()), "targets_open": float(
            (self.targeted & ~self.on_target).sum())}


def sample_targets(ctx: UnlearnContext, absent: npt.NDArray[np.bool_], probe: int,
                   margin: float | None = None) -> SampleTargets:
    """`SampleTargets` from `ctx.reference_stats`, calibrated on up to `probe` held-out
    (calibration) samples with the original model."""
    stats = ctx.reference_stats
    assert stats is not None
    ids = ctx.data.dataset.ids
    n_out = max(1, stats.k // 2)  # as the evidence does: forget samples have K/2 OUT values
    mu_f, sigma_f = stats.gaussian(stats.rows(ids[ctx.forget_idx]), n_out=n_out, seed=ctx.seed)
    heldout = np.sort(ctx.generator(salt=13).permutation(ctx.heldout_idx)[:probe])
    mu_h, sigma_h = stats.gaussian(stats.rows(ids[heldout]), n_out=n_out, seed=ctx.seed)
    out = infer(ctx.original, ctx.data, heldout)
    z_null = (logit_confidence(out.logits.numpy(), out.labels.numpy()) - mu_h) / sigma_h
    return SampleTargets(mu_f + sigma_f * float(np.median(z_null)), sigma_f, absent, margin)


class ForgetMonitor:
    """Per-sample 'never trained on' targets for the forget set, and the latest statistics.

    Samples of a class that the retain pool still carries should be called "member" by the
    attack no more often than held-out samples of their class are (their accuracy is left to
    generalisation: a retrained model still recognises a typical digit it never saw). Samples
    of a class that is gone entirely must be neither recognised nor called member.
    """

    def __init__(self, target_member: npt.NDArray[np.float64], absent: npt.NDArray[np.bool_],
                 loss_threshold: float, retain_acc: float,
                 target_acc: npt.NDArray[np.float64] | None = None,
                 heldout_losses: npt.NDArray[np.float64] | None = None) -> None:
        self.target_member = target_member
        # Per forget sample, the held-out accuracy of its class under the original model;
        # None: accuracy is left to generalisation.
        self.target_acc = target_acc
        # The original's losses on held-out samples, sorted; with them, the forget set's
        # losses (present classes) must not be stochastically smaller (`loss_shift`).
        self.heldout_losses = None if heldout_losses is None else np.sort(heldout_losses)
        self.losses = np.full(len(absent), np.nan)
        self.retain_acc = retain_acc  # the original model's accuracy on retained samples
        self.absent = absent
        self.loss_threshold = loss_threshold
        n = len(absent)
        self.correct = np.zeros(n, dtype=bool)
        self.member = np.zeros(n, dtype=bool)
        self.seen = np.zeros(n, dtype=bool)

    def observe(self, positions: npt.NDArray[np.int64], correct: npt.NDArray[np.bool_],
                losses: npt.NDArray[np.float64]) -> None:
        self.correct[positions] = correct
        self.member[positions] = losses < self.loss_threshold
        self.losses[positions] = losses
        self.seen[positions] = True

    def loss_shift(self) -> tuple[float, float]:
        """(D+, its critical value): the one-sided Kolmogorov-Smirnov statistic of the forget
        set's losses (present classes) against the held-out losses, largest where forget
        losses are smaller, and the value a 5% test rejects above."""
        assert self.heldout_losses is not None
        forget = np.sort(self.losses[~self.absent])
        n, m = len(forget), len(self.heldout_losses)
        if n == 0:
            return 0.0, 1.0
        below = np.searchsorted(self.heldout_losses, forget, side="right") / m
        d_plus = float(np.max(np.arange(1, n + 1) / n - below))
        return d_plus, KS_C_05 * math.sqrt((n + m) / (n * m))

    def loss_targets(self, positions: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Per forget sample at `positions`: the held-out loss at its own rank among the forget
        set's losses (a sample of an absent class: NaN, no target)."""
        assert self.heldout_losses is not None
        present = ~self.absent
        ranks = np.empty(len(self.losses))
        order = np.argsort(self.losses[present], kind="stable")
        pos_ranks = np.empty(len(order))
        pos_ranks[order] = np.arange(len(order))
        ranks[present] = (pos_ranks + 0.5) / max(1, len(order))
        ranks[self.absent] = np.nan
        q = ranks[positions]
        out = np.full(len(positions), np.nan)
        ok = ~np.isnan(q)
        out[ok] = np.quantile(self.heldout_losses, q[ok])
        return out

    @property
    def complete(self) -> bool:
        return bool(self.seen.all())

    def stats(self) -> dict[str, float]:
        present = ~self.absent
        out = {"forget_acc": float(self.correct.mean()), "forget_member": float(self.member.mean())}
        if present.any():
            out["member_excess"] = float(
                self.member[present].mean() - self.target_member[present].mean())
            if self.target_acc is not None:
                out["acc_excess"] = float(
                    self.correct[present].mean() - self.target_acc[present].mean())
            if self.heldout_losses is not None:
                d_plus, critical = self.loss_shift()
                out["loss_shift"], out["loss_shift_critical"] = d_plus, critical
        if self.absent.any():
            out["absent_acc"] = float(self.correct[self.absent].mean())
            out["absent_member"] = float(self.member[self.absent].mean())
        return out

    def distance(self) -> float:
        """How far the forget set is from looking never-trained-on (0 = on target)."""
        s = self.stats()
        w = float(self.absent.mean())
        shift = max(0.0, s.get("loss_shift", 0.0) - s.get("loss_shift_critical", 0.0))
        return (1 - w) * (abs(s.get("member_excess", 0.0)) + max(0.0, s.get("acc_excess", 0.0))
                          + shift) + w * (s.get("absent_acc", 0.0) + s.get("absent_member", 0.0))

    def reached(self, tolerance: float) -> bool:
        s = self.stats()
        return (s.get("member_excess", 0.0) <= tolerance
                and s.get("acc_excess", 0.0) <= tolerance
                and s.get("loss_shift", 0.0) <= s.get("loss_shift_critical", 1.0)
                and s.get("absent_acc", 0.0) <= tolerance / 2
                and s.get("absent_member", 0.0) <= tolerance)


#: sqrt(-ln(0.05) / 2): the one-sided two-sample Kolmogorov-Smirnov critical coefficient at 5%.
KS_C_05 = math.sqrt(-math.log(0.05) / 2)


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


def absent_classes(ctx: UnlearnContext) -> npt.NDArray[np.bool_]:
    """Per forget sample: whether no retained sample carries its class (the class is gone)."""
    labels = ctx.data.dataset.labels
    absent: npt.NDArray[np.bool_] = ~np.isin(labels[ctx.forget_idx], labels[ctx.retain_idx])
    return absent


def forget_monitor(ctx: UnlearnContext, recovery_idx: npt.NDArray[np.int64], probe: int,
                   *, match_accuracy: bool = False, match_losses_min: int | None = None) -> ForgetMonitor:
    """Measure the 'never trained on' reference with the original model (a few hundred forwards)."""
    rng = ctx.generator(salt=7)
    heldout = rng.permutation(ctx.heldout_idx)[:probe]
    members = rng.permutation(recovery_idx)[:probe]
    h_out = infer(ctx.original, ctx.data, heldout)
    m_out = infer(ctx.original, ctx.data, members)
    h_losses = h_out.losses()
    threshold = _loss_threshold(m_out.losses(), h_losses)
    if not h_losses.min() < threshold < h_losses.max():
        # Losses do not tell members apart here (the task is easy enough that held-out
        # samples fit as well as trained ones): fall back to the held-out median, so
        # "looks unseen" still means "no lower loss than a typical held-out sample".
        threshold = float(np.median(h_losses))
    h_member = h_losses < threshold

    labels = ctx.data.dataset.labels
    h_labels = labels[heldout]
    f_labels = labels[ctx.forget_idx]
    absent = absent_classes(ctx)
    overall = float(h_member.mean())
    per_class = {int(c): float(h_member[h_labels == c].mean()) if (h_labels == c).any() else overall
                 for c in np.unique(f_labels)}
    target = np.asarray([0.0 if gone else per_class[int(c)]
                         for c, gone in zip(f_labels, absent, strict=True)])
    target_acc = None
    if match_accuracy:
        h_correct = h_out.correct()
        overall_acc = float(h_correct.mean())
        class_acc = {int(c): float(h_correct[h_labels == c].mean()) if (h_labels == c).any()
                     else overall_acc for c in np.unique(f_labels)}
        target_acc = np.asarray([0.0 if gone else class_acc[int(c)]
                                 for c, gone in zip(f_labels, absent, strict=True)])
    match_losses = match_losses_min is not None and int((~absent).sum()) >= match_losses_min
    return ForgetMonitor(target, absent, threshold, float(m_out.correct().mean()), target_acc,
                         h_losses if match_losses else None)


def _dampen_absent(ctx: UnlearnContext, model: Classifier, cfg: FeatureConstraintConfig) -> dict[str, Any]:
    """Start `model` from the original dampened by SSD (see the module docstring); what was
    done, for the run's `extra`. The importances are computed once; the selection is tried at
    alpha, then 2, 4, ... times stricter (`dampen_backoff` times) until the dampened model
    keeps retained samples classified (at most `dampen_max_drop` lost on a probe)."""
    from engine.methods.ssd import SelectiveSynapticDampening, dampen

    ssd = SelectiveSynapticDampening(full_max_samples=cfg.dampen_full_samples)
    imp = ssd.importances(ctx, ctx.student(), cfg.dampen_layers)
    # A parameter only the forget set uses has an importance ratio of about |D| / |Df| (its
    # importance on D is diluted by the forget set's share); SSD's alpha is set relative to
    # that ceiling, so it means the same on 4 classes as on 100.
    ratio = (len(ctx.forget_idx) + len(ctx.retain_idx)) / len(ctx.forget_idx)
    # Kept only if retained samples stay classified: where the forget set's importance is
    # spread over shared weights (label noise), dampening wrecks the model and the feature
    # constraint cannot recover it within its budget. The probe is drawn from the whole
    # retain pool (up to `heldout_probe` samples), not the recovery subset: on a small pool
    # the subset is a few dozen samples, where one sample is already more than allowed.
    probe = ctx.generator(salt=12).permutation(ctx.retain_idx)[: cfg.heldout_probe]
    before = accuracy(infer(ctx.original, ctx.data, probe))
    drops: list[float] = []
    for k in range(cfg.dampen_backoff + 1):
        candidate = ctx.student()
        selected = dampen(candidate, imp, alpha=cfg.dampen_absent * ratio * 2**k, dampening=1.0,
                          last_layers=cfg.dampen_layers)
        drops.append(before - accuracy(infer(candidate, ctx.data, probe)))
        if drops[-1] <= cfg.dampen_max_drop:
            model.load_state_dict(candidate.state_dict())
            total = sum(p.numel() for p in candidate.parameters() if p.requires_grad)
            return {"dampen_batches": imp.steps, "dampen_retain_drop": drops[-1], "dampen_drops": drops,
                    "dampening_rejected": False, "dampen_alpha_factor": 2**k,
                    "dampened_parameters": selected, "dampened_fraction": selected / max(total, 1)}
    return {"dampen_batches": imp.steps, "dampen_retain_drop": drops[0], "dampen_drops": drops,
            "dampening_rejected": True}


def saliency_masks(ctx: UnlearnContext, model: Classifier, fraction: float,
                   batch_size: int = 64) -> list[Tensor]:
    """SalUn's weight saliency (Fan et al., ICLR 2024): the magnitude of the forget loss's
    gradient at `model`, averaged over the forget set, and a 0/1 mask per parameter keeping
    the `fraction` of all weights where it is largest (one threshold over the whole model,
    as their mask generation does)."""
    probe = copy.deepcopy(model).eval()
    params = [p for p in probe.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in params]
    for x, y in ctx.data.batches(ctx.forget_idx, batch_size):
        with autocast(ctx.device):
            loss = nn.functional.cross_entropy(probe(x).float(), y, reduction="sum")
        for g, d in zip(grads, torch.autograd.grad(loss, params), strict=True):
            g.add_(d.float())
    magnitude = torch.cat([g.abs().flatten() for g in grads])
    keep = max(1, round(fraction * magnitude.numel()))
    threshold = torch.topk(magnitude, keep, sorted=False).values.min()
    return [(g.abs() >= threshold).to(p.dtype) for g, p in zip(grads, params, strict=True)]


class _PhaseClock:
    """Wall-clock seconds of a run's phases (`laps`: phase -> seconds). Nothing is
    synchronised for it: on a GPU, work a phase queued may be counted in the next one."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = self.laps.get(phase, 0.0) + now - self._last
        self._last = now

    def move(self, source: str, target: str, seconds: float) -> None:
        self.laps[source] -= seconds
        self.laps[target] = self.laps.get(target, 0.0) + seconds


class _RecoveryGate:
    """Retained accuracy measured on retained samples the recovery does not train on, against
    the original's accuracy on the same samples (checked at most once per `window` steps)."""

    def __init__(self, ctx: UnlearnContext, model: Classifier, recovery_idx: npt.NDArray[np.int64],
                 cfg: FeatureConstraintConfig) -> None:
        outside = np.setdiff1d(ctx.retain_idx, recovery_idx)
        self.idx = ctx.generator(salt=13).permutation(outside if len(outside) else ctx.retain_idx)[
            : cfg.heldout_probe]
        self.ctx, self.model, self.tolerance = ctx, model, cfg.gate_tolerance
        self.target = accuracy(infer(ctx.original, ctx.data, self.idx))
        self.every = max(1, math.ceil(len(ctx.forget_idx) / min(cfg.forget_batch_size, len(ctx.forget_idx))))
        self.checked_at: int | None = None
        self.last: float | None = None
        self.seconds = 0.0  # spent in checks

    def passes(self, step: int) -> bool:
        if self.checked_at is not None and step - self.checked_at < self.every:
            return False  # failed at its last check: recover a little longer before the next
        self.checked_at = step
        start = time.perf_counter()
        self.last = accuracy(infer(self.model, self.ctx.data, self.idx))
        self.seconds += time.perf_counter() - start
        freeze_batchnorm(self.model)  # `infer` put the model back in train mode
        return self.last >= self.target - self.tolerance

    @property
    def shortfall(self) -> float:
        """How far below the original the last check found retained accuracy (0 before any)."""
        return 0.0 if self.last is None else max(0.0, self.target - self.last)


#: Drift (in logits) past which the pull toward the original's logits grows linearly rather
#: than quadratically: its force per logit is bounded, as cross-entropy's is, so a model whose
#: logits run to thousands (an untrained or badly scaled one) does not take ever larger steps
#: until it diverges. Retained logits of the suite's 30 class runs drifted at most 18.6, so
#: the pull is the plain square on every one of them (docs/robustness.md, round 6).
LOGIT_PULL_DELTA = 24.0


def _logit_pull(logits: Tensor, anchor: Tensor) -> tuple[Tensor, float]:
    """The pull of `logits` toward `anchor`: the mean squared difference, linear in each
    difference past `LOGIT_PULL_DELTA` (a Huber loss scaled to match the square below it).
    Also returns the largest absolute difference."""
    pull = 2 * nn.functional.huber_loss(logits, anchor, delta=LOGIT_PULL_DELTA)
    drift = float((logits.detach() - anchor).abs().max()) if logits.numel() else 0.0
    return pull, drift


def _forget_loss(kind: str, feats_f: Tensor, teacher_feats: Tensor, logits_f: Tensor,
                 labels: Tensor, positions: npt.NDArray[np.int64], monitor: ForgetMonitor,
                 targets: SampleTargets | None, *, population_done: bool) -> Tensor:
    """The forget task's loss on one batch: the feature constraint, plus the push of each
    per-sample target and of each loss-matched sample (the module docstring)."""
    forget_loss = sample_feature_loss(kind, feats_f, teacher_feats).mean()
    phi_f = label_confidence(logits_f, labels)
    if targets is not None:
        # Each targeted sample's score is pushed down to its own expected score.
        off = torch.from_numpy(targets.off_target(positions)).to(phi_f.device)
        expected = torch.from_numpy(targets.expected[positions]).to(phi_f)
        scale = torch.from_numpy(targets.sigma[positions]).to(phi_f)
        excess = ((torch.relu(phi_f - expected) / scale) * off).sum() / off.sum().clamp(min=1)
        # Once the population looks unseen, only that push remains: the feature
        # constraint moves shared features and would disturb the other samples.
        forget_loss = excess if population_done else forget_loss + excess
    if monitor.heldout_losses is not None and monitor.complete:
        # Each present-class sample's loss up to the held-out loss at its own rank,
        # in units of the held-out mean loss.
        wanted = torch.from_numpy(monitor.loss_targets(positions)).to(phi_f)
        has = ~torch.isnan(wanted)
        ce = nn.functional.cross_entropy(logits_f, labels, reduction="none")
        short = torch.relu(torch.nan_to_num(wanted) - ce) * has
        push = short.sum() / has.sum().clamp(min=1) / max(float(monitor.heldout_losses.mean()), 1e-6)
        forget_loss = push if population_done else forget_loss + push
    return forget_loss


def _window_means(history: list[dict[str, Any]]) -> dict[str, float]:
    steps = [h["losses"] for h in history if "losses" in h]
    return {k: float(np.mean([s[k] for s in steps])) for k in ("forget", "recover")}


def _last_shared_parameter(model: Classifier) -> nn.Parameter:
    head = {id(p) for p in model.head.parameters()}
    shared = [p for p in model.parameters() if id(p) not in head and p.dim() >= 2]
    return shared[-1]


@dataclass(frozen=True)
class FeatureConstraintConfig:
    balancer: str = "dwa"
    feature_loss: str = "mse"
    recovery_fraction: float = 0.1
    # The recovery subset when a whole class is gone: recovering from the push a class needs
    # takes tens of steps, and on a tenth of the pool they overfit it (docs/robustness.md).
    absent_recovery_fraction: float = 0.5
    recovery_count: int | None = None
    batch_size: int = 64
    forget_batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.001
    # The learning rate is lr * absent_lr_factor ** (fraction of forget samples whose class is
    # gone): 3x for a whole class, lr itself for sample deletions (docs/robustness.md).
    absent_lr_factor: float = 3.0
    momentum: float = 0.9
    max_epochs: float = 5.0
    min_steps: int = 3  # updates before the method may stop or select a checkpoint
    early_stop: bool = True
    tolerance: float = 0.01
    heldout_probe: int = 256
    stall_ratio: float = 0.75
    max_pressure: float = 4.0
    # Budget floor for classes the retain pool no longer carries, as a fraction of the
    # recipe's training steps on the retain pool (scaled by the absent fraction): a pass over
    # a small class is one or two steps, far too few to forget it.
    budget_floor: float = 0.25
    # When a class is gone, start from the original dampened by SSD, selecting parameters
    # whose forget-set importance exceeds this fraction of |D| / |Df| times their importance
    # on the whole training set D (0: off).
    dampen_absent: float = 0.5
    dampen_max_drop: float = 0.05  # largest fall in retained accuracy dampening may cause
    # Selections tried after the first, each twice as strict, before giving dampening up.
    dampen_backoff: int = 3
    # The training-set importance I_D is a mean over batches: estimated on at most this many
    # training samples (a uniform subsample; None: all of them). 1,024 on the suite's class
    # runs: avg gap 0.47 against 0.45, no faster; again in one run with the default, 0.48
    # against 0.32 with acc_forget up to 3.7% (docs/robustness.md, round 4).
    dampen_full_samples: int | None = None
    # Dampen only the parameters of the model's last `dampen_layers` layers (None: all): the
    # importance pass's backward then stops there. 2 on the suite's class runs: avg gap 0.31
    # against 0.32, median time ratio 0.39 against 0.45, but one run left 0.53% of the class
    # recognised (docs/robustness.md, round 4).
    dampen_layers: int | None = None
    # With the model's reference statistics: push forget samples that models which never saw
    # them misclassify down to their own expected score (`SampleTargets`). Off by default: on
    # mnist5k (random, seed 0) and on the suite's quick subset it damaged retained accuracy
    # (docs/robustness.md).
    per_sample_targets: bool = False
    # With per-sample targets: push each target only to max(its expected score, -this), just
    # past even odds (None: all the way to its expected score).
    target_margin: float | None = None
    # When a class is gone or per-sample targets are pushed: weight of a second recovery
    # term, the squared distance of the recovery batch's logits to the original's over the
    # classes the retain pool still carries (linear past `LOGIT_PULL_DELTA`; 0: off). 0.3 on
    # the suite's class runs: avg gap 0.29 against 0.32 without, 1.0 gave 0.31. With
    # per-sample targets (`target_margin` 0.5) 3 on its random runs: 1.64 against 1.74
    # without targets, time ratio about twice (docs/robustness.md, round 5).
    recovery_logits: float = 0.3
    # Also require the forget set of present classes to be recognised no more often than
    # held-out samples of their classes are (the original model's held-out accuracy).
    match_accuracy: bool = False
    # Push each forget sample of a present class whose loss is below the held-out loss at its
    # own rank up to it, and stop only when a one-sided KS test (5%) cannot tell the forget
    # set's losses from held-out ones; with at least `match_losses_min` such samples (a
    # sample's target is a quantile known to 1/n: ten samples would each be pushed to a
    # tenth of the held-out distribution, the tail ones into misclassification).
    match_losses: bool = True
    match_losses_min: int = 50
    # When a class is gone, judge recovery also on retained samples outside the recovery
    # subset (up to `heldout_probe` of them) against the original's accuracy there: the
    # recovery batches are trained on, so their accuracy overstates the retain pool's, and
    # after the strong push a class needs the difference is points (docs/robustness.md).
    recovery_gate: bool = True
    # Tolerance of the recovery gate: retained accuracy on its samples at most this far below
    # the original's (0.005 on the suite's class runs: avg gap 0.31 against 0.32, 40% slower).
    gate_tolerance: float = 0.01
    # Learning rate of the steps spent on recovery alone (None: the run's learning rate;
    # 0.001 with the 3x class steps was worse on the suite, docs/robustness.md).
    recovery_lr: float | None = None
    # SalUn's saliency mask: only this fraction of the weights (those where the forget loss's
    # gradient at the start is largest) is updated; 1.0: every weight (off: 0.5 and 0.2
    # changed the suite's gaps by at most 0.03 on average, docs/robustness.md).
    saliency_mask: float = 1.0

    def __post_init__(self) -> None:
        if self.balancer not in BALANCERS:
            raise InvalidInput(f"balancer must be one of {BALANCERS}")
        if self.feature_loss not in FEATURE_LOSSES:
            raise InvalidInput(f"feature_loss must be one of {FEATURE_LOSSES}")
        if not (0 < self.recovery_fraction <= 1 and 0 < self.absent_recovery_fraction <= 1):
            raise InvalidInput("recovery_fraction and absent_recovery_fraction must be in (0, 1]")
        if self.lr <= 0 or self.max_epochs <= 0 or self.batch_size < 1 or self.absent_lr_factor <= 0:
            raise InvalidInput("lr, absent_lr_factor, max_epochs and batch_size must be positive")
        if self.budget_floor < 0:
            raise InvalidInput("budget_floor must be >= 0")
        if self.dampen_backoff < 0:
            raise InvalidInput("dampen_backoff must be >= 0")
        if self.dampen_layers is not None and self.dampen_layers < 1:
            raise InvalidInput("dampen_layers must be >= 1 (or null: every layer)")
        if self.target_margin is not None and self.target_margin <= 0:
            raise InvalidInput("target_margin must be positive (or null: no cap)")
        if self.recovery_logits < 0:
            raise InvalidInput("recovery_logits must be >= 0")
        if not 0 < self.saliency_mask <= 1:
            raise InvalidInput("saliency_mask must be in (0, 1]")
        if self.min_steps < 1:
            raise InvalidInput("min_steps must be >= 1: the original model is never a result")


class FeatureConstraint(Method[FeatureConstraintConfig]):
    name = "feature_constraint"
    Config = FeatureConstraintConfig

    def recovery_subset(self, ctx: UnlearnContext) -> npt.NDArray[np.int64]:
        """Dr': a random subset of the retain pool (a count, or a fraction of it: from
        `recovery_fraction` for sample deletions to `absent_recovery_fraction` for a class gone,
        in proportion to the forget samples whose class is gone)."""
        cfg = self.config
        absent = float(absent_classes(ctx).mean())
        fraction = cfg.recovery_fraction + absent * (cfg.absent_recovery_fraction - cfg.recovery_fraction)
        n = cfg.recovery_count or math.ceil(fraction * len(ctx.retain_idx))
        n = max(1, min(n, len(ctx.retain_idx)))
        return np.sort(ctx.generator(salt=1).choice(ctx.retain_idx, size=n, replace=False))

    def run(self, ctx: UnlearnContext) -> MethodOutput:
        cfg = self.config
        clock = _PhaseClock()
        recovery_idx = self.recovery_subset(ctx)
        monitor = forget_monitor(ctx, recovery_idx, cfg.heldout_probe, match_accuracy=cfg.match_accuracy,
                                 match_losses_min=cfg.match_losses_min if cfg.match_losses else None)
        clock.lap("probes")
        model = freeze_batchnorm(ctx.student())
        dampening: dict[str, Any] = {}
        if cfg.dampen_absent and monitor.absent.any():
            dampening = _dampen_absent(ctx, model, cfg)
            clock.lap("dampening")
        teacher = ctx.teacher()
        targets = (sample_targets(ctx, monitor.absent, cfg.heldout_probe, cfg.target_margin)
                   if cfg.per_sample_targets and ctx.reference_stats is not None else None)
        # Past the population rule, recovery also holds the retained samples' logits where
        # the original had them, over the classes the retain pool still carries.
        pushing = monitor.absent.any() or (targets is not None and targets.targeted.any())
        original_logits: Tensor | None = None
        logit_drift_max = 0.0
        if cfg.recovery_logits and pushing:
            carried = np.unique(ctx.data.dataset.labels[ctx.retain_idx])
            original_logits = infer(ctx.original, ctx.data, recovery_idx).logits[:, carried].to(ctx.device)
            carried_cols = torch.from_numpy(carried).to(ctx.device)
            recovery_row = {int(i): k for k, i in enumerate(recovery_idx)}

        balancer = make_balancer(cfg.balancer, device=ctx.device, shared=_last_shared_parameter(model))
        # Classes that are gone need far more forgetting than samples: the step size grows
        # with the absent fraction, as the pressure does.
        lr = cfg.lr * cfg.absent_lr_factor ** float(monitor.absent.mean())
        opt = make_optimizer(
            [*model.parameters(), *balancer.parameters()], cfg.optimizer, lr, momentum=cfg.momentum,
        )
        masks = saliency_masks(ctx, model, cfg.saliency_mask) if cfg.saliency_mask < 1 else None
        forget_bs = min(cfg.forget_batch_size, len(ctx.forget_idx))
        window = math.ceil(len(ctx.forget_idx) / forget_bs)  # one pass over the forget set
        rng = ctx.generator(salt=2)

        # The teacher's features of the forget set never change: compute them once.
        with torch.no_grad():
            teacher_feats = torch.cat([teacher.features(x).float()
                                       for x, _ in ctx.data.batches(ctx.forget_idx, 1024)])
        position = {int(i): k for k, i in enumerate(ctx.forget_idx)}

        history: list[dict[str, Any]] = []
        best: tuple[float, int, dict[str, Tensor], bool] | None = None
        stopped_at = None
        diverged_at: int | None = None
        # Samples of a class the retain pool no longer carries must be forgotten outright;
        # samples of a present class only need to look unseen. Start pushing accordingly.
        pressure = cfg.max_pressure ** float(monitor.absent.mean())
        # ...and give them the budget to recover from that push: up to twice the passes.
        train_steps = ctx.recipe.epochs * math.ceil(len(ctx.retain_idx) / ctx.recipe.batch_size)
        absent = float(monitor.absent.mean())
        # Per-sample targets need pushing too: their share of the forget set gets the same
        # floor as an absent class's (the run still stops as soon as every target is reached).
        targeted = float(targets.targeted.mean()) if targets is not None else 0.0
        passes = max(cfg.max_epochs * window, cfg.budget_floor * (absent + targeted) * train_steps)
        total = max(cfg.min_steps, math.ceil(passes * (1.0 + absent)))
        last_pass_gap: float | None = None
        retain_acc: float | None = None
        recovering = False  # whether the last step went to recovery alone
        gate = (_RecoveryGate(ctx, model, recovery_idx, cfg)
                if cfg.recovery_gate and monitor.absent.any() else None)
        forget_order = rng.permutation(ctx.forget_idx)
        clock.lap("setup")
        for step in range(1, total + 1):
            # The statistics of this step are read off its forward pass, before its update:
            # they describe the model after `updates` optimisation steps (none at step 1).
            updates = step - 1
            start = ((step - 1) % window) * forget_bs
            if start == 0 and step > 1:
                forget_order = rng.permutation(ctx.forget_idx)
                balancer.end_window(_window_means(history[-window:]))
            f_idx = forget_order[start : start + forget_bs]
            r_idx = rng.choice(recovery_idx, size=min(cfg.batch_size, len(recovery_idx)),
                               replace=False)
            xf, yf = ctx.data.batch(f_idx)
            xr, yr = ctx.data.batch(r_idx)
            tf = teacher_feats[[position[int(i)] for i in f_idx]]
            with autocast(ctx.device):
                if recovering:
                    # The previous step went to recovery alone, and so will this one unless
                    # the forget set has drifted off target: its batch only feeds the monitor,
                    # so it is read without a graph (read again with one on a drift, below).
                    with torch.no_grad():
                        feats_f = model.features(xf)
                        logits_f = model.head(feats_f).float()
                    logits_r = model.head(model.features(xr))
                else:
                    # One forward pass over both batches (BatchNorm is frozen, so it is exact).
                    feats_f, feats_r = torch.split(model.features(torch.cat([xf, xr])),
                                                   [len(xf), len(xr)])
                    logits_r = model.head(feats_r)
                    logits_f = model.head(feats_f).float()
            f_pos = np.asarray([position[int(i)] for i in f_idx])
            with torch.no_grad():
                ce_f = nn.functional.cross_entropy(logits_f.detach(), yf, reduction="none")
                monitor.observe(f_pos, (logits_f.argmax(1) == yf).cpu().numpy(),
                                ce_f.double().cpu().numpy())
                batch_acc = float((logits_r.argmax(1) == yr).float().mean())
                retain_acc = batch_acc if retain_acc is None else 0.7 * retain_acc + 0.3 * batch_acc
                if targets is not None:
                    targets.observe(f_pos, label_confidence(logits_f, yf).double().cpu().numpy())
            stats = {**monitor.stats(), "recover_acc": retain_acc,
                     **(targets.stats() if targets is not None else {})}
            population_done = monitor.complete and monitor.reached(cfg.tolerance)
            targets_done = targets is None or targets.distance() == 0.0
            forgotten = population_done and targets_done
            # Forgotten but not yet recovered: the step goes to recovery alone (at
            # `recovery_lr` when set).
            recovering = forgotten and cfg.early_stop
            if not recovering and not logits_f.requires_grad:
                with autocast(ctx.device):
                    feats_f = model.features(xf)
                    logits_f = model.head(feats_f).float()
            forget_loss = _forget_loss(cfg.feature_loss, feats_f.float(), tf, logits_f, yf, f_pos,
                                       monitor, targets, population_done=population_done)
            recover_loss = nn.functional.cross_entropy(logits_r.float(), yr)
            if original_logits is not None:
                rows = [recovery_row[int(i)] for i in r_idx]
                pull, drift = _logit_pull(logits_r.float()[:, carried_cols], original_logits[rows])
                recover_loss = recover_loss + cfg.recovery_logits * pull
                logit_drift_max = max(logit_drift_max, drift)
            losses = {"forget": forget_loss, "recover": recover_loss}
            if not all(bool(torch.isfinite(v.detach())) for v in losses.values()):
                # Diverged (a badly scaled model can): neither stopping here nor any later
                # step could help. The run ends on the best checkpoint it measured, if any.
                diverged_at = updates
                break
            recovered = retain_acc >= monitor.retain_acc - cfg.tolerance
            if gate is not None and recovered and forgotten and updates >= cfg.min_steps:
                recovered = gate.passes(step)
                if gate.last is not None:
                    stats["gate_acc"] = gate.last
                    stats["gate_measured"] = gate.checked_at == step
            if monitor.complete:
                # Retained accuracy short of the original's: on the recovery batches, and with
                # a gate on its samples too, whichever says more (the batches are trained on
                # and overstate it).
                measured = gate is None or gate.checked_at == step
                retain_short = max(0.0, monitor.retain_acc - retain_acc,
                                   gate.shortfall if gate is not None else 0.0)
                gap = (monitor.distance() + retain_short
                       + (targets.distance() if targets is not None else 0.0))
                # Candidates are the models the stopping rule could also have returned (after
                # `min_steps` updates): never the untouched original. With a gate, one it has
                # just measured outranks any it has not; among equals, the smaller gap wins.
                if (updates >= cfg.min_steps and math.isfinite(gap)
                        and (best is None or (measured, -gap) > (best[3], -best[0]))):
                    best = (gap, updates, copy.deepcopy(model.state_dict()), measured)
                if step % window == 0:  # a full pass since the last look: is forgetting stalling?
                    if last_pass_gap is not None and gap > cfg.stall_ratio * last_pass_gap:
                        pressure = min(pressure * 2.0, cfg.max_pressure)
                    last_pass_gap = gap
            # Stop as soon as the forget set looks never-trained-on and retained data is back
            # to the original's accuracy; the statistics describe the model as it is now.
            if cfg.early_stop and updates >= cfg.min_steps and forgotten and recovered:
                stopped_at = updates
                history.append({"step": step, **stats, "stopped": True})
                break
            active_pressure = 0.0 if recovering else pressure
            for group in opt.param_groups:
                group["lr"] = cfg.recovery_lr if recovering and cfg.recovery_lr else lr

            pushed = {"forget": active_pressure * losses["forget"], "recover": losses["recover"]}
            balancer.before_backward(pushed)
            objective = balancer.combine(pushed)
            opt.zero_grad(set_to_none=True)
            objective.backward()  # type: ignore[no-untyped-call]
            if masks is not None:
                for p, m in zip((p for p in model.parameters() if p.requires_grad), masks, strict=True):
                    if p.grad is not None:
                        p.grad.mul_(m)
            opt.step()

            weights = balancer.weights()
            values = {k: float(v.detach()) for k, v in losses.items()}
            history.append({"step": step, "losses": values, "weights": weights,
                            "recovering": recovering, **stats})
            ctx.step("unlearning", step, total, values, weights)

        steps = (stopped_at if stopped_at is not None
                 else diverged_at if diverged_at is not None else total)
        if stopped_at is None and best is not None and (cfg.early_stop or diverged_at is not None):
            model.load_state_dict(best[2])
        model.eval()
        clock.lap("steps")
        if gate is not None:  # the gate's checks ran inside the steps
            clock.move("steps", "gate", gate.seconds)
        return MethodOutput(
            model=model,
            steps=steps,
            history=history,
            extra={
                "target_member": float(monitor.target_member.mean()),
                "absent_fraction": float(monitor.absent.mean()),
                "loss_threshold": monitor.loss_threshold,
                "recovery_size": int(len(recovery_idx)),
                "lr": lr,
                **({"targeted": int(targets.targeted.sum()),
                    "targets_open": int((targets.targeted & ~targets.on_target).sum())}
                   if targets is not None else {}),
                **({"logit_drift_max": logit_drift_max} if original_logits is not None else {}),
                "stopped_early": stopped_at is not None,
                **({"diverged_at": diverged_at} if diverged_at is not None else {}),
                "selected_step": (stopped_at if stopped_at is not None
                                  else best[1] if best else steps),
                **dampening,
                "phase_seconds": clock.laps,
            },
        )
