"""Deletion evidence without torch: reference statistics, the per-sample test, intervals, verdicts.

The per-sample membership test is offline LiRA (Carlini et al. 2022, the variant that needs
only OUT models). For a sample x with label y, the score of a model is the logit-scaled
confidence of the label, phi(x) = log p_y - log(1 - p_y). K reference models, each trained with
the model's recipe on a random half of its training pool, say what models that never saw x do
on it: their OUT scores give a Gaussian N(mu_out(x), sigma^2) per sample (per-sample mean; the
variance pooled across samples while there are fewer than `POOL_VARIANCE_BELOW` OUT values per
sample, as with K = 8).

Calibration (DESIGN.md §2a, measured on `mnist5k`): half-data references are less confident
than a model trained on all the data, so the plain Gaussian tail probability
(`scipy.stats.norm.sf` of z) over-flags never-trained samples (36% at alpha = 0.05). Each
sample is therefore scored z = (phi - mu_out) / sigma, and its p-value is its rank among the
same model's z on never-trained `audit` samples (the null set): p = (1 + #{null z >= z}) /
(1 + n_null), a conformal p-value that is valid whatever the shape of the null. The control
(an audit sample the size of the forget set, at most half of audit) is disjoint from the null
set, so its flag rate is an honest false-positive rate, not alpha by construction.

Verdict inputs: flag counts compared with Fisher's exact one-sided test (forget vs control,
original vs control), Wilson intervals on every rate. This module is numpy + scipy only, so the
service can judge stored evidence without torch; scipy is imported only inside the functions
that compute statistics, so `forgetting_verdict` runs where scipy is not installed.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.errors import InvalidInput

TEST_NAME = "offline-lira"
ALPHA = 0.05
CONFIDENCE = 0.95
# With fewer OUT values per sample than this, one variance is pooled across all samples
# (LiRA's "fixed variance" for few references: a 4-value per-sample variance is mostly noise).
POOL_VARIANCE_BELOW = 16
# A forget set must be flagged at least this much more often than control to fail (and the
# difference must be significant): one sample of ten by chance is never a failure.
MIN_EFFECT = 0.1
STATS_FORMAT = "lethe-reference-stats/1"
NO_POWER = "this test cannot distinguish these samples on this model"
PENDING = "forgetting not tested: references pending"

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# --- scores -----------------------------------------------------------------------------------


def logit_confidence(logits: npt.NDArray[Any], labels: npt.NDArray[Any]) -> FloatArray:
    """phi = log p_y - log(1 - p_y), computed stably from logits as
    z_y - logsumexp(z_j, j != y) (float64)."""
    from scipy import special

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y):
        raise InvalidInput("logits must be (N, classes) with one label per row")
    if len(z) == 0:
        return np.empty(0)
    rows = np.arange(len(z))
    others = z.copy()
    others[rows, y] = -np.inf
    return np.asarray(z[rows, y] - special.logsumexp(others, axis=1), dtype=np.float64)


# --- reference statistics ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceStats:
    """OUT scores of K reference models for every sample of a dataset; no weights.

    `out[i, j]` is reference j's phi on sample `ids[i]` when reference j did NOT train on it,
    NaN when it did (IN values are not kept). `meta` records how they were made (dataset
    fingerprint, arch, recipe, seeds, pool size, seconds).
    """

    ids: npt.NDArray[np.str_]
    out: npt.NDArray[np.float32]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.out.ndim != 2 or len(self.out) != len(self.ids):
            raise InvalidInput("reference statistics need one row of K scores per sample ID")

    @property
    def k(self) -> int:
        return int(self.out.shape[1])

    @property
    def out_counts(self) -> IntArray:
        return np.asarray((~np.isnan(self.out)).sum(axis=1), dtype=np.int64)

    def rows(self, sample_ids: Sequence[str] | npt.NDArray[Any]) -> IntArray:
        """Row of each ID; raises `InvalidInput` naming IDs the statistics do not cover."""
        position = {str(s): i for i, s in enumerate(self.ids)}
        missing = [str(s) for s in sample_ids if str(s) not in position]
        if missing:
            raise InvalidInput(f"reference statistics do not cover {len(missing)} samples, "
                               f"e.g. {missing[:3]}")
        return np.asarray([position[str(s)] for s in sample_ids], dtype=np.int64)

    def pooled_sigma(self) -> float:
        """One standard deviation for every sample: residuals from per-sample OUT means."""
        counts = self.out_counts
        usable = counts >= 2
        if not usable.any():
            raise InvalidInput("reference statistics need at least 2 OUT values for some samples")
        x = self.out[usable].astype(np.float64)
        resid = x - np.nanmean(x, axis=1, keepdims=True)
        dof = int(counts[usable].sum() - usable.sum())
        return float(np.sqrt(np.nansum(resid**2) / dof))

    def gaussian(
        self, rows: IntArray, *, n_out: int | None = None, seed: int = 0
    ) -> tuple[FloatArray, FloatArray]:
        """(mu_out, sigma) for the given rows; pooled sigma while OUT counts are small.

        With `n_out`, each row's mean uses at most `n_out` of its OUT values (a seeded random
        choice), so samples no reference trained on are not averaged over more references
        than training samples are.
        """
        x = self.out[rows].astype(np.float64)
        counts = self.out_counts[rows]
        if (counts < 1).any():
            raise InvalidInput("some samples have no OUT reference (every reference trained on them)")
        if n_out is not None:
            rng = np.random.default_rng([seed, 0x007])
            keys = np.where(np.isnan(x), np.inf, rng.random(x.shape))
            keep = keys.argsort(axis=1).argsort(axis=1) < n_out
            x = np.where(keep, x, np.nan)
            counts = np.minimum(counts, n_out)
        mu = np.nanmean(x, axis=1)
        if int(counts.min()) < POOL_VARIANCE_BELOW:
            sigma = np.full(len(rows), self.pooled_sigma())
        else:
            sigma = np.nanstd(x, axis=1, ddof=1)
        return mu, np.maximum(sigma, 1e-6)

    @property
    def variance_mode(self) -> str:
        return "pooled" if int(self.out_counts.min()) < POOL_VARIANCE_BELOW else "per-sample"

    def to_bytes(self) -> bytes:
        """A compressed `.npz` (arrays `ids`, `out`, `meta`: JSON text); no pickles."""
        buf = io.BytesIO()
        meta = json.dumps({"format": STATS_FORMAT, **self.meta}, sort_keys=True)
        np.savez_compressed(buf, ids=np.asarray(self.ids).astype("U"),
                            out=self.out.astype(np.float32), meta=np.asarray(meta))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceStats:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                ids, out = z["ids"].astype("U"), z["out"].astype(np.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidInput(f"not a reference statistics file: {exc}") from exc
        if meta.get("format") != STATS_FORMAT:
            raise InvalidInput(f"unknown reference statistics format {meta.get('format')!r}")
        return cls(ids=ids, out=out, meta=meta)


def load_reference_stats(source: ReferenceStats | bytes | Path | str) -> ReferenceStats:
    """Statistics from an object, the bytes of a stats file, or its path."""
    if isinstance(source, ReferenceStats):
        return source
    if isinstance(source, bytes | bytearray):
        return ReferenceStats.from_bytes(bytes(source))
    path = Path(source)
    if not path.is_file():
        raise InvalidInput(f"reference statistics not found: {source}")
    return ReferenceStats.from_bytes(path.read_bytes())


def balanced_halves(n: int, k: int, seed: int) -> npt.NDArray[np.bool_]:
    """(n, k) IN mask: each of n pool samples is trained on by exactly k/2 of k references
    (so left out of the other k/2), each reference getting about half of the pool."""
    if k < 2 or k % 2:
        raise InvalidInput("the number of references must be even and at least 2")
    rng = np.random.default_rng([seed, 0x4C49])
    return np.asarray(rng.random((n, k)).argsort(axis=1) < k // 2)


# --- the test ---------------------------------------------------------------------------------


def standardise(phi: FloatArray, mu: FloatArray, sigma: FloatArray) -> FloatArray:
    return np.asarray((np.asarray(phi) - mu) / sigma, dtype=np.float64)


def gaussian_p_values(z: FloatArray) -> FloatArray:
    """Uncalibrated one-sided tail probability under N(mu_out, sigma) (scipy)."""
    from scipy import stats

    return np.asarray(stats.norm.sf(z), dtype=np.float64)


def calibrated_p_values(z: FloatArray, null_z: FloatArray) -> FloatArray:
    """Rank of each z among the model's own never-trained z: (1 + #{null >= z}) / (1 + n)."""
    null = np.sort(np.asarray(null_z, dtype=np.float64))
    if len(null) == 0:
        raise InvalidInput("calibration needs never-trained (audit) samples")
    at_least = len(null) - np.searchsorted(null, np.asarray(z, dtype=np.float64), side="left")
    return np.asarray((1.0 + at_least) / (1.0 + len(null)), dtype=np.float64)


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """Wilson score interval for k successes out of n (scipy); [0, 1] when n = 0."""
    from scipy import stats

    if n == 0:
        return [0.0, 1.0]
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def rate_summary(k: int, n: int) -> dict[str, Any]:
    return {"n": int(n), "flagged": int(k), "rate": float(k / n) if n else float("nan"),
            "interval": wilson(k, n)}


def exact_greater(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided Fisher exact test: is k1/n1 larger than k2/n2? (scipy)"""
    from scipy import stats

    if n1 == 0 or n2 == 0:
        return 1.0
    table = [[int(k1), int(n1 - k1)], [int(k2), int(n2 - k2)]]
    return float(stats.fisher_exact(table, alternative="greater").pvalue)


def control_split(audit_idx: IntArray, n_forget: int, seed: int) -> tuple[IntArray, IntArray]:
    """(control, null): a control the size of the forget set (at most half of `audit`) and the
    rest of `audit`, which calibrates the threshold. Drawn from `seed`, disjoint."""
    audit = np.asarray(audit_idx, dtype=np.int64)
    if len(audit) < 2:
        raise InvalidInput("the audit split needs at least 2 samples")
    n = max(1, min(int(n_forget), len(audit) // 2))
    order = np.random.default_rng([seed, 0xC0]).permutation(audit)
    return np.sort(order[:n]), np.sort(order[n:])


@dataclass(frozen=True)
class ModelScores:
    """One model's phi on the forget set, the control and the null (calibration) set."""

    forget: FloatArray
    control: FloatArray
    null: FloatArray


def flags(scores: ModelScores, mu: dict[str, FloatArray], sigma: dict[str, FloatArray],
          alpha: float) -> dict[str, Any]:
    """p-values and flags of one model's forget and control samples, calibrated on its null."""
    z = {part: standardise(getattr(scores, part), mu[part], sigma[part])
         for part in ("forget", "control", "null")}
    p_forget = calibrated_p_values(z["forget"], z["null"])
    p_control = calibrated_p_values(z["control"], z["null"])
    return {
        "z": z, "p_forget": p_forget, "p_control": p_control,
        "forget": rate_summary(int((p_forget <= alpha).sum()), len(p_forget)),
        "control": rate_summary(int((p_control <= alpha).sum()), len(p_control)),
        "threshold": float(np.quantile(z["null"], 1.0 - alpha)),
    }


def membership_test(
    *,
    forget_ids: Sequence[str],
    unlearned: ModelScores,
    original: ModelScores,
    gaussian: dict[str, tuple[FloatArray, FloatArray]],
    out_forget: npt.NDArray[np.float32],
    k: int,
    variance: str,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """The test rows of the evidence (the shape `engine.references.build_evidence` returns)."""
    mu = {part: g[0] for part, g in gaussian.items()}
    sigma = {part: g[1] for part, g in gaussian.items()}
    after = flags(unlearned, mu, sigma, alpha)
    before = flags(original, mu, sigma, alpha)
    f, c = after["forget"], after["control"]
    of, oc = before["forget"], before["control"]
    forget_vs_control = exact_greater(f["flagged"], f["n"], c["flagged"], c["n"])
    original_vs_control = exact_greater(of["flagged"], of["n"], oc["flagged"], oc["n"])
    distinguishes = original_vs_control < alpha
    evidence = {
        "alpha": alpha,
        "test": TEST_NAME,
        "references": {"k": int(k), "status": "ready", "variance": variance},
        "forget": f,
        "control": c,
        "original": of,
        "control_original": oc,
        "forget_vs_control_p": forget_vs_control,
        "original_vs_control_p": original_vs_control,
        "distinguishes": bool(distinguishes),
        "p_values": {str(s): float(p) for s, p in zip(forget_ids, after["p_forget"], strict=True)},
        "scores": {
            "forget_original": original.forget.tolist(),
            "forget_unlearned": unlearned.forget.tolist(),
            "forget_out_mean": mu["forget"].tolist(),
            "out_reference": [float(v) for v in out_forget.ravel() if np.isfinite(v)],
            "control_unlearned": unlearned.control.tolist(),
        },
        "calibration": {
            "method": "z = (phi - mu_out) / sigma; p = rank among the same model's audit z",
            "null_n": len(unlearned.null),
            "threshold_z_unlearned": after["threshold"],
            "threshold_z_original": before["threshold"],
            "gaussian_flag_rate_unlearned_control": float(
                (gaussian_p_values(after["z"]["control"]) <= alpha).mean()),
        },
    }
    evidence["statement"] = statement(evidence)
    return evidence


def statement(ev: dict[str, Any]) -> str:
    """One sentence saying what the test shows, and no more than it can."""
    f, c, o = ev["forget"], ev["control"], ev["original"]
    counts = (f"{f['flagged']}/{f['n']} forget samples flagged vs {c['flagged']}/{c['n']} "
              f"never-trained controls (original model: {o['flagged']}/{o['n']})")
    if ev["forget_vs_control_p"] < ev["alpha"]:
        return (f"the unlearned model is still more confident on the forget samples than models "
                f"that never saw them: {counts}, p = {ev['forget_vs_control_p']:.3g}")
    if not ev["distinguishes"]:
        return f"{NO_POWER}: {counts}"
    return (f"the forget samples are flagged no more than never-trained samples, and the test "
            f"does flag them on the original model: {counts}")


def pending_evidence(k: int | None = None, alpha: float = ALPHA) -> dict[str, Any]:
    """Evidence without the test: the model's references are not ready."""
    return {"alpha": alpha, "test": TEST_NAME,
            "references": {"k": k, "status": "pending"}, "statement": PENDING}


# --- accuracy with intervals ------------------------------------------------------------------


def accuracy_intervals(metrics: dict[str, Any], sizes: dict[str, int]) -> dict[str, list[float]]:
    """Wilson intervals for the accuracies in `metrics`, from the sample count of each."""
    out = {}
    for name, n in sizes.items():
        value = float(metrics[name])
        out[name] = wilson(round(value * n), n) if np.isfinite(value) else [0.0, 1.0]
    return out


def per_class_accuracy(
    labels: npt.NDArray[Any], correct_before: npt.NDArray[np.bool_],
    correct_after: npt.NDArray[np.bool_], num_classes: int,
) -> dict[str, list[Any]]:
    classes = list(range(num_classes))
    n = np.bincount(labels, minlength=num_classes)
    before = np.bincount(labels, weights=correct_before, minlength=num_classes)
    after = np.bincount(labels, weights=correct_after, minlength=num_classes)
    def rate(x: npt.NDArray[Any]) -> list[float | None]:
        return [float(a / b) if b else None for a, b in zip(x, n, strict=True)]
    return {"classes": classes, "before": rate(before), "after": rate(after), "n": n.tolist()}


# --- verdicts ---------------------------------------------------------------------------------


def forgetting_verdict(
    evidence: dict[str, Any] | None, *, alpha: float = ALPHA, min_effect: float = MIN_EFFECT
) -> dict[str, Any]:
    """The forgetting check for a verdict.

    Fails when the forget samples are flagged more than never-trained controls, significantly
    (one-sided exact p < `alpha`) and by at least `min_effect` (flag rate difference). Returns
    `{"forgetting": "tested" | "test_has_no_power" | "not_tested_references_pending",
    "passed": bool, "reasons": [...], "summary": str}`; a pending test passes (the policy decides
    whether to wait), a test without power passes and says so.
    """
    if not evidence or evidence.get("references", {}).get("status") != "ready":
        return {"forgetting": "not_tested_references_pending", "passed": True, "reasons": [],
                "summary": PENDING}
    f, c = evidence["forget"], evidence["control"]
    p = float(evidence["forget_vs_control_p"])
    effect = f["rate"] - c["rate"]
    failed = p < alpha and effect >= min_effect
    reasons = []
    if failed:
        reasons.append(
            f"forget samples flagged as members {f['flagged']}/{f['n']} vs never-trained "
            f"controls {c['flagged']}/{c['n']} (exact one-sided p = {p:.3g} < {alpha}; "
            f"difference {effect:.2f} >= {min_effect})")
    no_power = not bool(evidence.get("distinguishes", False))
    status = "test_has_no_power" if no_power and not failed else "tested"
    return {"forgetting": status, "passed": not failed, "reasons": reasons,
            "summary": evidence.get("statement") or (NO_POWER if no_power else "")}


def accuracy_drop_check(
    name: str, before: float, after_correct: int, n: int, *, max_drop: float,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Fail only when the whole interval of the new accuracy lies more than `max_drop` below
    `before`: a drop that sampling error could explain is not a failure."""
    low, high = wilson(after_correct, n, confidence)
    passed = high >= before - max_drop
    reason = "" if passed else (
        f"{name} {after_correct}/{n} (interval [{low:.3f}, {high:.3f}]) is more than "
        f"{max_drop} below {before:.3f}")
    return {"name": name, "passed": passed, "interval": [low, high], "reason": reason}
