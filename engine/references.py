"""Reference models and the deletion evidence built on them (the torch side of `engine.evidence`).

`train_references` trains K models with a model's stored recipe on balanced random halves of
its training pool (each pool sample is trained on by exactly K/2 of them), scores every sample
of the dataset with each, keeps only the OUT scores (references that did not train on the
sample) and drops each reference as soon as it is scored: no weights outlive the call.

`build_evidence` scores an unlearned model and its original on the forget set and the `audit`
split and returns the evidence of a job::

    {"alpha", "test": "offline-lira", "references": {"k", "status": "ready"|"pending", ...},
     "forget" / "control" / "original" / "control_original": {"n", "flagged", "rate", "interval"},
     "forget_vs_control_p", "original_vs_control_p", "distinguishes", "statement",
     "p_values": {sample_id: p}, "scores": {...plot data...}, "calibration": {...},
     "per_class_accuracy": {"classes", "before", "after", "n"},      # on audit
     "intervals": {"acc_forget", "acc_retain", "acc_test": [lo, hi]},  # Wilson 95%
     "accuracy": {"audit_before", "audit_after": {"n", "correct", "rate", "interval"}},
     "sizes": {"forget", "retain_probe", "audit"}}   # the sample count behind each metric

With pending references only the accuracy parts are present beside `references`/`statement`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engine.archs import Classifier
from engine.errors import InvalidInput
from engine.evidence import (
    ALPHA,
    ModelScores,
    ReferenceStats,
    accuracy_intervals,
    balanced_halves,
    control_split,
    logit_confidence,
    membership_test,
    pending_evidence,
    per_class_accuracy,
    wilson,
)
from engine.metrics import Outputs, infer
from engine.runtime import DeviceData, Progress, Reporter
from engine.training import Recipe, train_model

DEFAULT_K = 8
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def label_confidence(outputs: Outputs) -> FloatArray:
    """phi (logit-scaled confidence of the label) of every row of `outputs`."""
    return logit_confidence(outputs.logits.numpy(), outputs.labels.numpy())


class _Stage(Reporter):
    """Reports reference j's training steps as steps of the whole K-reference job."""

    def __init__(self, outer: Reporter, offset: int, total: int) -> None:
        super().__init__(None, None)
        self._outer, self._offset, self._total = outer, offset, total

    def step(self, progress: Progress) -> None:
        self._outer.step(Progress(progress.phase, self._offset + progress.step, self._total,
                                  progress.losses))


def reference_seeds(recipe: Recipe, k: int, seed: int) -> list[int]:
    """The recipe seed of each reference (initialisation and batch order differ per reference)."""
    return [int(np.random.default_rng([seed, recipe.seed, j, 0x5EED]).integers(2**31 - 1))
            for j in range(k)]


def train_references(
    arch: str,
    num_classes: int,
    data: DeviceData,
    pool_idx: IntArray,
    recipe: Recipe,
    *,
    k: int = DEFAULT_K,
    seed: int = 0,
    reporter: Reporter | None = None,
) -> ReferenceStats:
    """Train K references on balanced halves of `pool_idx` and return their OUT statistics."""
    ds = data.dataset
    pool = np.unique(np.asarray(pool_idx, dtype=np.int64))
    if len(pool) < 2:
        raise InvalidInput("the training pool is too small for reference models")
    in_mask = balanced_halves(len(pool), k, seed)
    seeds = reference_seeds(recipe, k, seed)
    everything = np.arange(len(ds), dtype=np.int64)
    out = np.full((len(ds), k), np.nan, dtype=np.float32)
    reporter = reporter or Reporter(None, None)
    per_ref_steps = recipe.epochs * -(-(len(pool) - len(pool) // 2) // recipe.batch_size)
    seconds: list[float] = []
    steps = 0
    for j in range(k):
        members = pool[in_mask[:, j]]
        start = time.perf_counter()
        model, n = train_model(arch, num_classes, data, members,
                               Recipe(**{**recipe.to_dict(), "seed": seeds[j]}),
                               reporter=_Stage(reporter, j * per_ref_steps, k * per_ref_steps))
        phi = label_confidence(infer(model, data, everything))
        if data.device.type == "cuda":
            torch.cuda.synchronize(data.device)
        seconds.append(time.perf_counter() - start)
        del model
        trained = np.zeros(len(ds), dtype=bool)
        trained[members] = True
        out[~trained, j] = phi[~trained]
        steps += n
    meta = {
        "k": k, "seed": seed, "arch": arch, "num_classes": num_classes,
        "recipe": recipe.to_dict(), "reference_seeds": seeds, "fingerprint": ds.fingerprint(),
        "pool_size": len(pool), "seconds": float(sum(seconds)), "seconds_per_reference": seconds,
        "steps": steps, "device": str(data.device),
    }
    return ReferenceStats(ids=ds.ids.astype("U"), out=out, meta=meta)


def _outputs_at(out: Outputs, rows: IntArray) -> Outputs:
    t = torch.from_numpy(rows)
    return Outputs(out.logits[t], out.labels[t])


def build_evidence(
    model: Classifier,
    original: Classifier,
    *,
    data: DeviceData,
    forget_idx: IntArray,
    metrics: dict[str, Any],
    retain_probe_size: int,
    stats: ReferenceStats | None,
    alpha: float = ALPHA,
    seed: int = 0,
) -> dict[str, Any]:
    """The evidence of one unlearning job (shape in the module docstring); audit data only."""
    ds = data.dataset
    forget = np.asarray(forget_idx, dtype=np.int64)
    audit = ds.audit_indices
    after_audit, before_audit = infer(model, data, audit), infer(original, data, audit)
    if stats is None:
        evidence = pending_evidence(alpha=alpha)
    else:
        evidence = _test_rows(stats, ds, forget, audit, alpha, seed,
                              after=(infer(model, data, forget), after_audit),
                              before=(infer(original, data, forget), before_audit))
    correct_after, correct_before = after_audit.correct(), before_audit.correct()
    evidence["per_class_accuracy"] = per_class_accuracy(
        ds.labels[audit], correct_before, correct_after, ds.num_classes)
    evidence["intervals"] = accuracy_intervals(
        metrics, {"acc_forget": len(forget), "acc_retain": retain_probe_size,
                  "acc_test": len(audit)})
    evidence["sizes"] = {"forget": len(forget), "retain_probe": int(retain_probe_size),
                         "audit": len(audit)}
    evidence["accuracy"] = {
        name: {"n": len(audit), "correct": int(c.sum()), "rate": float(c.mean()),
               "interval": wilson(int(c.sum()), len(audit))}
        for name, c in (("audit_before", correct_before), ("audit_after", correct_after))
    }
    return evidence


def _test_rows(
    stats: ReferenceStats, ds: Any, forget: IntArray, audit: IntArray, alpha: float, seed: int,
    *, after: tuple[Outputs, Outputs], before: tuple[Outputs, Outputs],
) -> dict[str, Any]:
    fingerprint = stats.meta.get("fingerprint")
    if fingerprint and fingerprint != ds.fingerprint():
        raise InvalidInput("the reference statistics were computed on another dataset index")
    # Same number of OUT values for every sample: held-out samples have K (no reference trained
    # on them), pool samples K/2; a mean of K would make never-trained z's less spread than
    # forget z's and bias the test towards flagging forget samples.
    n_out = max(1, stats.k // 2)
    control_pos, null_pos = control_split(np.arange(len(audit), dtype=np.int64), len(forget), seed)
    parts = {"forget": forget, "control": audit[control_pos], "null": audit[null_pos]}
    gaussian = {name: stats.gaussian(stats.rows(ds.ids[idx]), n_out=n_out, seed=seed)
                for name, idx in parts.items()}

    def scores(outputs: tuple[Outputs, Outputs]) -> ModelScores:
        on_forget, on_audit = outputs
        return ModelScores(forget=label_confidence(on_forget),
                           control=label_confidence(_outputs_at(on_audit, control_pos)),
                           null=label_confidence(_outputs_at(on_audit, null_pos)))

    forget_ids = [str(s) for s in ds.ids[forget]]
    return membership_test(
        forget_ids=forget_ids, unlearned=scores(after), original=scores(before),
        gaussian=gaussian, out_forget=stats.out[stats.rows(forget_ids)], k=stats.k,
        variance=stats.variance_mode, alpha=alpha,
    )
