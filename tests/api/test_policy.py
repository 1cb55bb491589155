"""The verification policy: verdicts from metrics, parent metrics and retrain gaps."""

from __future__ import annotations

import pytest

from app.errors import InvalidInput
from app.services.policy import DEFAULT_POLICY, evaluate, merge_policy

M = {"acc_forget": 0.92, "acc_retain": 0.98, "acc_test": 0.95, "mia_forget": 0.6}


def test_default_policy_passes_a_small_drop_and_fails_a_large_one() -> None:
    ok = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=M, parent_metrics={"acc_test": 0.96}, gaps=None)
    assert ok["status"] == "passed" and ok["passed"] and ok["reasons"] == []
    assert [c["check"] for c in ok["checks"]] == ["max_acc_test_drop"]
    bad = evaluate(
        DEFAULT_POLICY,
        kind="unlearn",
        metrics={**M, "acc_test": 0.80},
        parent_metrics={"acc_test": 0.96},
        gaps=None,
    )
    assert bad["status"] == "failed" and "max_acc_test_drop" in bad["reasons"][0]


def test_gaps_to_a_retrain_reference_are_checked() -> None:
    gaps = {"acc_forget": 0.01, "acc_retain": 0.0, "acc_test": 0.02, "mia_forget": 0.03}
    ok = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=M, parent_metrics=None, gaps=gaps)
    assert ok["passed"] and {c["check"] for c in ok["checks"]} == {"max_gap", "max_avg_gap"}
    wide = {**gaps, "acc_forget": 0.3}
    bad = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=M, parent_metrics=None, gaps=wide)
    assert not bad["passed"]
    assert {r.split(":")[0] for r in bad["reasons"]} == {"max_gap", "max_avg_gap"}


def test_train_jobs_skip_unlearning_checks_but_honour_the_floor() -> None:
    policy = merge_policy({"min_acc_test": 0.97})
    v = evaluate(policy, kind="train", metrics=M, parent_metrics={"acc_test": 0.99}, gaps=None)
    assert not v["passed"] and [c["check"] for c in v["checks"]] == ["min_acc_test"]
    assert evaluate(DEFAULT_POLICY, kind="train", metrics=M, parent_metrics=None, gaps=None)["passed"]


def test_merge_policy_validates() -> None:
    assert merge_policy(None) == DEFAULT_POLICY
    assert merge_policy({"fallback_method": "retrain"})["fallback_method"] == "retrain"
    for bad in (
        {"nope": 1},
        {"max_gap": -1},
        {"max_gap": "x"},
        {"max_gap": True},
        {"fallback_method": "magic"},
    ):
        with pytest.raises(InvalidInput):
            merge_policy(bad)
