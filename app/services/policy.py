"""Verification policy: the per-model rules a job's evidence must meet to publish.

A policy is a small JSON document stored on the model. Every check accounts for sampling
error: a difference that the number of samples behind it could explain by chance is not a
failure (DESIGN.md §2a). Checks (each skipped when its threshold is null or its inputs are
missing):

- `forgetting` (the per-sample membership test, `engine.evidence`): fails when the forget
  samples are flagged as members more often than never-trained `audit` controls, significantly
  (exact one-sided p < `alpha`) and by at least `min_flag_effect` (null: any significant
  excess fails). While the model's reference
  statistics are not ready the verdict says "forgetting not tested: references pending";
  `wait_for_references` makes deletion jobs wait for them instead.
- `max_acc_test_drop`: accuracy on `audit` may fall at most this much below the base model's on
  the same samples; fails only when the new accuracy's whole Wilson interval lies lower.
- `max_acc_forget`: accuracy on the forgotten samples must not exceed this; fails only when
  the interval's low end does.
- `max_gap`: with a retrain reference, each `|unlearned - retrained|` among `acc_forget`,
  `acc_retain`, `acc_test` and `mia_forget`, beyond its sampling error (the low end of the
  difference's Newcombe interval), must be at most this.
- `max_avg_gap`: the mean of those four sampling-error-adjusted gaps must be at most this.
- `min_acc_test`: a floor for test accuracy (train jobs included); fails only when the
  interval's high end is below it.

Runs without per-sample evidence (train jobs, older records) are judged on point values.
`fallback_method` names a method (for example `retrain`) that runs when the verdict fails.
"""

from __future__ import annotations

import math
from typing import Any

from app.vocab import JobKind
from engine.catalog import METHOD_NAMES
from engine.evidence import ALPHA, MIN_EFFECT, forgetting_verdict, wilson

#: Job kinds that delete (the others, train and import, are judged on their accuracy only).
DELETION_KINDS = frozenset({JobKind.UNLEARN, JobKind.RETRAIN})
GAP_METRICS = ("acc_forget", "acc_retain", "acc_test", "mia_forget")
#: The evidence size each gap metric is measured on (`evidence["sizes"]`).
GAP_SIZES = {"acc_forget": "forget", "acc_retain": "retain_probe", "acc_test": "audit",
             "mia_forget": "forget"}
DEFAULT_POLICY: dict[str, Any] = {
    "max_acc_test_drop": 0.05,
    "max_acc_forget": None,
    "max_gap": 0.10,
    "max_avg_gap": 0.05,
    "min_acc_test": None,
    "alpha": ALPHA,
    "min_flag_effect": MIN_EFFECT,
    "wait_for_references": False,
    "fallback_method": None,
}
#: The forgetting status of a run that recorded no per-sample evidence.
NO_EVIDENCE = "forgetting not tested: this job recorded no per-sample evidence"
_BOOLEAN_KEYS = frozenset({"wait_for_references"})
_EPS = 1e-12


def merge_policy(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The default policy with the given keys replaced; unknown keys are refused."""
    from app.errors import InvalidInput

    policy = dict(DEFAULT_POLICY)
    for key, value in (overrides or {}).items():
        if key not in DEFAULT_POLICY:
            raise InvalidInput(f"unknown policy key {key!r}", known=sorted(DEFAULT_POLICY))
        if key == "fallback_method":
            if value is not None and value not in METHOD_NAMES:
                raise InvalidInput(f"unknown fallback method {value!r}", known=list(METHOD_NAMES))
        elif key in _BOOLEAN_KEYS:
            if not isinstance(value, bool):
                raise InvalidInput(f"policy {key} must be true or false")
        elif key == "alpha":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
                raise InvalidInput("policy alpha must be a number between 0 and 1 (exclusive)")
        elif value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 0
        ):
            raise InvalidInput(f"policy {key} must be a non-negative number or null")
        policy[key] = value
    return policy


def _num(d: dict[str, Any] | None, key: str) -> float | None:
    if not d:
        return None
    v = d.get(key)
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        return None
    return float(v)


def newcombe_low(p1: float, n1: int, p2: float, n2: int) -> float:
    """The low end of |p1 - p2| beyond sampling error: 0 when Newcombe's 95% interval for the
    difference of two proportions (from their Wilson intervals) contains 0."""
    l1, u1 = wilson(round(p1 * n1), n1)
    l2, u2 = wilson(round(p2 * n2), n2)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    if low <= 0.0 <= high:
        return 0.0
    return min(abs(low), abs(high))


class _Checks:
    """The checks of one verdict, in the order they were made."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, value: float, limit: float, ok: bool, **detail: Any) -> None:
        self.rows.append({"check": name, "value": round(value, 6), "limit": limit, "ok": ok,
                          **detail})

    def reasons(self) -> list[str]:
        return [row.get("reason") or f"{row['check']}: {row['value']} is outside the limit "
                f"{row['limit']}" for row in self.rows if not row["ok"]]


def evaluate(
    policy: dict[str, Any],
    *,
    kind: str,
    metrics: dict[str, Any],
    parent_metrics: dict[str, Any] | None,
    gaps: dict[str, Any] | None,
    reference: dict[str, Any] | None = None,
    evidence: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The verdict document: `status` (`passed`/`failed`), `reasons`, every check made and,
    for deletion jobs, what the forgetting test could say (`forgetting`, `forgetting_summary`)."""
    checks = _Checks()
    _min_acc_test(checks, policy, metrics, evidence)
    forgetting = None
    if kind in DELETION_KINDS:
        forgetting = _forgetting(checks, policy, evidence)
        _acc_test_drop(checks, policy, metrics, parent_metrics, evidence)
        _acc_forget(checks, policy, metrics, evidence)
        _retrain_gaps(checks, policy, metrics, reference, gaps, evidence)
    failed = any(not row["ok"] for row in checks.rows)
    verdict: dict[str, Any] = {
        "status": "failed" if failed else "passed",
        "passed": not failed,
        "reasons": checks.reasons(),
        "checks": checks.rows,
    }
    if forgetting is not None:
        verdict["forgetting"] = forgetting["forgetting"]
        verdict["forgetting_summary"] = forgetting["summary"]
    return verdict


def _accuracy(evidence: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    row = ((evidence or {}).get("accuracy") or {}).get(name)
    return row if isinstance(row, dict) and row.get("n") else None


def _min_acc_test(checks: _Checks, policy: dict[str, Any], metrics: dict[str, Any],
                  evidence: dict[str, Any] | None) -> None:
    floor, acc_test = policy.get("min_acc_test"), _num(metrics, "acc_test")
    if floor is None or acc_test is None:
        return
    after = _accuracy(evidence, "audit_after")
    if after is None:
        checks.add("min_acc_test", acc_test, floor, acc_test >= floor - _EPS)
        return
    low, high = wilson(int(after["correct"]), int(after["n"]))
    checks.add("min_acc_test", acc_test, floor, high >= floor - _EPS, interval=[low, high])


def _forgetting(checks: _Checks, policy: dict[str, Any],
                evidence: dict[str, Any] | None) -> dict[str, Any]:
    if evidence is None:
        return {"forgetting": "not_tested", "passed": True, "reasons": [], "summary": NO_EVIDENCE}
    alpha = float(policy.get("alpha") or ALPHA)
    effect = policy.get("min_flag_effect")
    min_effect = 0.0 if effect is None else float(effect)
    result = forgetting_verdict(evidence, alpha=alpha, min_effect=min_effect)
    if result["forgetting"] != "not_tested_references_pending":
        f, c = evidence["forget"], evidence["control"]
        checks.add(
            "forgetting", f["rate"] - c["rate"], min_effect, bool(result["passed"]),
            p_value=float(evidence["forget_vs_control_p"]), alpha=alpha,
            forget=[f["flagged"], f["n"]], control=[c["flagged"], c["n"]],
            reason="; ".join(result["reasons"]) or None,
        )
    return result


def _acc_test_drop(checks: _Checks, policy: dict[str, Any], metrics: dict[str, Any],
                   parent_metrics: dict[str, Any] | None, evidence: dict[str, Any] | None) -> None:
    limit = policy.get("max_acc_test_drop")
    if limit is None:
        return
    before, after = _accuracy(evidence, "audit_before"), _accuracy(evidence, "audit_after")
    if before is not None and after is not None:
        # Paired on the same audit samples: the base model's accuracy against the new one's
        # interval (engine.evidence.accuracy_drop_check).
        from engine.evidence import accuracy_drop_check

        row = accuracy_drop_check("acc_test", float(before["rate"]), int(after["correct"]),
                                  int(after["n"]), max_drop=float(limit))
        drop = float(before["rate"]) - float(after["rate"])
        checks.add("max_acc_test_drop", drop, limit, row["passed"], interval=row["interval"],
                   reason=row["reason"] or None)
        return
    acc_test, parent_test = _num(metrics, "acc_test"), _num(parent_metrics, "acc_test")
    if acc_test is not None and parent_test is not None:
        drop = parent_test - acc_test
        checks.add("max_acc_test_drop", drop, limit, drop <= limit + _EPS)


def _acc_forget(checks: _Checks, policy: dict[str, Any], metrics: dict[str, Any],
                evidence: dict[str, Any] | None) -> None:
    limit, acc_forget = policy.get("max_acc_forget"), _num(metrics, "acc_forget")
    if limit is None or acc_forget is None:
        return
    interval = ((evidence or {}).get("intervals") or {}).get("acc_forget")
    if interval:
        checks.add("max_acc_forget", acc_forget, limit, float(interval[0]) <= limit + _EPS,
                   interval=list(interval))
    else:
        checks.add("max_acc_forget", acc_forget, limit, acc_forget <= limit + _EPS)


def _retrain_gaps(checks: _Checks, policy: dict[str, Any], metrics: dict[str, Any],
                  reference: dict[str, Any] | None, gaps: dict[str, Any] | None,
                  evidence: dict[str, Any] | None) -> None:
    """`max_gap` and `max_avg_gap` on the gaps beyond sampling error (raw gaps where the
    evidence does not say how many samples each metric was measured on)."""
    sizes = (evidence or {}).get("sizes") or {}
    beyond: dict[str, float] = {}
    raw: dict[str, float] = {}
    for name in GAP_METRICS:
        gap = _num(gaps, name)
        if gap is None:
            continue
        raw[name] = gap
        mine, theirs, n = _num(metrics, name), _num(reference, name), sizes.get(GAP_SIZES[name])
        beyond[name] = (newcombe_low(mine, int(n), theirs, int(n))
                        if mine is not None and theirs is not None and n else gap)
    if not beyond:
        return
    detail = {"gaps": {k: round(v, 6) for k, v in raw.items()},
              "beyond_sampling_error": {k: round(v, 6) for k, v in beyond.items()}}
    limit = policy.get("max_gap")
    if limit is not None:
        worst = max(beyond.values())
        checks.add("max_gap", worst, limit, worst <= limit + _EPS, **detail)
    limit = policy.get("max_avg_gap")
    if limit is not None:
        avg = sum(beyond.values()) / len(beyond)
        checks.add("max_avg_gap", avg, limit, avg <= limit + _EPS, **detail)
