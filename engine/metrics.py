"""Verification metrics, named exactly as DESIGN.md §2.

`acc_forget, acc_retain, acc_test` top-1 accuracies; `mia_forget` a population
membership-inference attack (logistic regression on per-sample cross-entropy, fitted on equal
numbers of retain members and test non-members; the fraction of the forget set it calls
"member"); `js_original` and `zrf` from per-sample Jensen-Shannon divergences (natural log, so
each lies in [0, ln 2]); `feature_distance` the mean L2 distance between the model's and the
random teacher's penultimate features on the forget set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from engine.archs import Classifier
from engine.errors import NonFiniteOutputs
from engine.runtime import DeviceData

RETAIN_SAMPLE_MAX = 5000
METRIC_NAMES = (
    "acc_forget", "acc_retain", "acc_test", "mia_forget",
    "js_original", "zrf", "feature_distance",
)
GAP_NAMES = ("acc_forget", "acc_retain", "acc_test", "mia_forget")

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Outputs:
    """A model's logits (and optionally penultimate features) on some samples, on the CPU."""

    logits: Tensor
    labels: Tensor
    features: Tensor | None = None

    @property
    def probs(self) -> Tensor:
        return torch.softmax(self.logits.double(), dim=1)

    def correct(self) -> npt.NDArray[np.bool_]:
        return (self.logits.argmax(1) == self.labels).numpy()

    def losses(self) -> FloatArray:
        ce = torch.nn.functional.cross_entropy(self.logits.double(), self.labels, reduction="none")
        return ce.numpy()


@torch.no_grad()
def infer(
    model: Classifier,
    data: DeviceData,
    idx: npt.NDArray[np.int64],
    *,
    with_features: bool = False,
    batch_size: int = 1024,
) -> Outputs:
    """Logits (float32, CPU) of `model` on `idx`, in eval mode, batched."""
    was_training = model.training
    model.eval()
    logits, labels, feats = [], [], []
    for x, y in data.batches(idx, batch_size):
        f = model.features(x)
        logits.append(model.head(f).float().cpu())
        labels.append(y.cpu())
        if with_features:
            feats.append(f.float().cpu())
    model.train(was_training)
    if not logits:
        empty = torch.empty(0)
        return Outputs(empty.reshape(0, 0), empty.long(), empty if with_features else None)
    return Outputs(torch.cat(logits), torch.cat(labels), torch.cat(feats) if with_features else None)


def accuracy(out: Outputs) -> float:
    return float(out.correct().mean()) if len(out.labels) else float("nan")


def js_divergence(p: Tensor, q: Tensor) -> FloatArray:
    """Per-row Jensen-Shannon divergence (natural log) between two rows of probabilities."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).numpy()


def mia_member_rate(
    member_losses: FloatArray, nonmember_losses: FloatArray, target_losses: FloatArray
) -> float:
    """Fit a logistic regression on loss (members vs non-members, equal counts) and return the
    fraction of `target_losses` it classifies as member."""
    n = min(len(member_losses), len(nonmember_losses))
    if n == 0 or len(target_losses) == 0:
        return float("nan")
    x = np.concatenate([member_losses[:n], nonmember_losses[:n]]).reshape(-1, 1)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    clf = LogisticRegression(C=1.0)
    clf.fit(x, y)
    return float(clf.predict(np.asarray(target_losses).reshape(-1, 1)).mean())


def retain_sample(
    retain_idx: npt.NDArray[np.int64], seed: int, size: int = RETAIN_SAMPLE_MAX
) -> npt.NDArray[np.int64]:
    """The fixed-size random sample of the retain pool that `acc_retain` is measured on."""
    if len(retain_idx) <= size:
        return np.asarray(retain_idx, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(retain_idx, size=size, replace=False))


def verification_metrics(
    model: Classifier,
    *,
    original: Classifier,
    teacher: Classifier,
    data: DeviceData,
    forget_idx: npt.NDArray[np.int64],
    retain_idx: npt.NDArray[np.int64],
    test_idx: npt.NDArray[np.int64],
    seed: int = 0,
) -> dict[str, float]:
    """All DESIGN.md §2 quality metrics of `model` (cost fields are added by the caller)."""
    retain_probe = retain_sample(retain_idx, seed)
    forget = infer(model, data, forget_idx, with_features=True)
    retain = infer(model, data, retain_probe)
    test = infer(model, data, test_idx)
    for name, out in (("forget", forget), ("retained", retain), ("audit", test)):
        bad = int((~torch.isfinite(out.logits).all(1)).sum())
        if bad:
            raise NonFiniteOutputs(f"NaN or infinite logits on {bad} of {len(out.logits)} "
                                   f"{name} samples")
    orig_forget = infer(original, data, forget_idx)
    teacher_forget = infer(teacher, data, forget_idx, with_features=True)

    # Members and non-members in equal numbers, each shuffled from its own pool.
    rng = np.random.default_rng(seed + 1)
    member = rng.permutation(retain.losses())
    nonmember = rng.permutation(test.losses())
    assert forget.features is not None and teacher_forget.features is not None
    return {
        "acc_forget": accuracy(forget),
        "acc_retain": accuracy(retain),
        "acc_test": accuracy(test),
        "mia_forget": mia_member_rate(member, nonmember, forget.losses()),
        "js_original": float(js_divergence(forget.probs, orig_forget.probs).mean()),
        "zrf": float(1.0 - js_divergence(forget.probs, teacher_forget.probs).mean()),
        # float64: the features of a badly scaled model square past float32's range.
        "feature_distance": float(
            (forget.features.double() - teacher_forget.features.double()).norm(dim=1).mean()
        ),
    }


def gaps(unlearned: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """`|unlearned - retrained|` for the four headline metrics, and their mean (`avg_gap`)."""
    out = {name: abs(unlearned[name] - reference[name]) for name in GAP_NAMES}
    out["avg_gap"] = float(np.mean([out[n] for n in GAP_NAMES]))
    return out
