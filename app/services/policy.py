"""Verification policy: the per-model thresholds a job's metrics must meet to publish.

A policy is a small JSON document stored on the model. Checks (each skipped when its
threshold is null or its inputs are missing):

- `max_acc_test_drop`: test accuracy may fall at most this much (absolute) below the parent's.
- `max_acc_forget`: accuracy on the forgotten samples must not exceed this.
- `max_gap`: with a retrain reference, every `|unlearned - retrained|` among `acc_forget`,
  `acc_retain`, `acc_test` and `mia_forget` must be at most this.
- `max_avg_gap`: the mean of those four gaps must be at most this.
- `min_acc_test`: an absolute floor for test accuracy (train jobs included).

`fallback_method` names a method (for example `retrain`) that runs when the verdict fails.
"""

from __future__ import annotations

from typing import Any

from engine.catalog import METHOD_NAMES

GAP_METRICS = ("acc_forget", "acc_retain", "acc_test", "mia_forget")
DEFAULT_POLICY: dict[str, Any] = {
    "max_acc_test_drop": 0.05,
    "max_acc_forget": None,
    "max_gap": 0.10,
    "max_avg_gap": 0.05,
    "min_acc_test": None,
    "fallback_method": None,
}


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
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def evaluate(
    policy: dict[str, Any],
    *,
    kind: str,
    metrics: dict[str, Any],
    parent_metrics: dict[str, Any] | None,
    gaps: dict[str, Any] | None,
) -> dict[str, Any]:
    """The verdict document: `status` (`passed`/`failed`), `reasons` and every check made."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, limit: float, ok: bool) -> None:
        checks.append({"check": name, "value": round(value, 6), "limit": limit, "ok": ok})

    acc_test = _num(metrics, "acc_test")
    floor = policy.get("min_acc_test")
    if floor is not None and acc_test is not None:
        check("min_acc_test", acc_test, floor, acc_test >= floor)
    if kind not in ("train", "import"):  # v1: no parent, nothing forgotten
        parent_test = _num(parent_metrics, "acc_test")
        limit = policy.get("max_acc_test_drop")
        if limit is not None and acc_test is not None and parent_test is not None:
            drop = parent_test - acc_test
            check("max_acc_test_drop", drop, limit, drop <= limit + 1e-12)
        acc_forget = _num(metrics, "acc_forget")
        limit = policy.get("max_acc_forget")
        if limit is not None and acc_forget is not None:
            check("max_acc_forget", acc_forget, limit, acc_forget <= limit + 1e-12)
        values = [g for g in (_num(gaps, m) for m in GAP_METRICS) if g is not None]
        limit = policy.get("max_gap")
        if limit is not None and values:
            worst = max(values)
            check("max_gap", worst, limit, worst <= limit + 1e-12)
        limit = policy.get("max_avg_gap")
        if limit is not None and values:
            avg = sum(values) / len(values)
            check("max_avg_gap", avg, limit, avg <= limit + 1e-12)
    failed = [c for c in checks if not c["ok"]]
    return {
        "status": "failed" if failed else "passed",
        "passed": not failed,
        "reasons": [f"{c['check']}: {c['value']} is outside the limit {c['limit']}" for c in failed],
        "checks": checks,
    }
