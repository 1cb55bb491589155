"""The verification policy: verdicts from metrics, parent metrics and retrain gaps."""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import InvalidInput
from app.services.policy import DEFAULT_POLICY, GAP_METRICS, evaluate, merge_policy
from engine.evidence import exact_greater, rate_summary, wilson

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


# --- evidence: sampling error is not a failure ------------------------------------------------

def _evidence(forget: tuple[int, int], control: tuple[int, int], *, audit_before: int = 95,
              audit_after: int = 95, audit_n: int = 100, forget_n: int = 10) -> dict[str, Any]:
    """Evidence as `engine.references.build_evidence` shapes it, its statistics computed by
    `engine.evidence` (Fisher's exact test, Wilson intervals)."""
    f, c = rate_summary(*forget), rate_summary(*control)
    return {
        "alpha": 0.05, "references": {"k": 8, "status": "ready"},
        "forget": f, "control": c, "original": rate_summary(forget_n, forget_n),
        "control_original": c, "distinguishes": True,
        "forget_vs_control_p": exact_greater(*forget, *control),
        "statement": "",
        "accuracy": {
            "audit_before": {"n": audit_n, "correct": audit_before, "rate": audit_before / audit_n},
            "audit_after": {"n": audit_n, "correct": audit_after, "rate": audit_after / audit_n},
        },
        "intervals": {"acc_forget": wilson(forget[0], forget[1])},
        "sizes": {"forget": forget_n, "retain_probe": 1000, "audit": audit_n},
    }


def test_a_ten_id_deletion_one_sample_off_retrain_passes() -> None:
    """Retrain classifies 9 of 10 forget samples, the unlearned model 10 of 10: one sample by
    chance (and the attack calls two more of them members). The raw gaps (0.1 and 0.2) fail
    `max_gap`; beyond sampling error they are 0."""
    metrics = {"acc_forget": 1.0, "acc_retain": 0.99, "acc_test": 0.95, "mia_forget": 0.9}
    reference = {"acc_forget": 0.9, "acc_retain": 0.99, "acc_test": 0.95, "mia_forget": 0.7}
    gaps = {k: abs(metrics[k] - reference[k]) for k in GAP_METRICS}
    verdict = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=metrics, parent_metrics=None,
                       gaps=gaps, reference=reference, evidence=_evidence((1, 10), (0, 10)))
    assert verdict["passed"], verdict["reasons"]
    gap_check = next(c for c in verdict["checks"] if c["check"] == "max_gap")
    assert gap_check["gaps"]["acc_forget"] == pytest.approx(0.1)
    assert gap_check["beyond_sampling_error"]["acc_forget"] == 0.0
    # Without the sample counts the same gaps are judged on their point values and fail.
    raw = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=metrics, parent_metrics=None,
                   gaps=gaps, reference=reference)
    assert not raw["passed"] and {r.split(":")[0] for r in raw["reasons"]} == {"max_gap",
                                                                               "max_avg_gap"}


def test_a_gap_far_beyond_sampling_error_fails() -> None:
    metrics = {"acc_forget": 1.0, "acc_retain": 0.99, "acc_test": 0.95, "mia_forget": 1.0}
    reference = {"acc_forget": 0.2, "acc_retain": 0.99, "acc_test": 0.95, "mia_forget": 0.2}
    gaps = {k: abs(metrics[k] - reference[k]) for k in GAP_METRICS}
    ev = _evidence((2, 50), (2, 50), forget_n=50)
    verdict = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=metrics, parent_metrics=None,
                       gaps=gaps, reference=reference, evidence=ev)
    assert not verdict["passed"]
    beyond = next(c for c in verdict["checks"] if c["check"] == "max_gap")["beyond_sampling_error"]
    assert 0.5 < beyond["acc_forget"] < 0.8


def test_forget_samples_flagged_far_above_control_fail_with_accuracy_intact() -> None:
    verdict = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=M, parent_metrics={"acc_test": 0.95},
                       gaps=None, evidence=_evidence((14, 16), (1, 16), forget_n=16))
    checks = {c["check"]: c for c in verdict["checks"]}
    assert checks["max_acc_test_drop"]["ok"] and not checks["forgetting"]["ok"]
    assert verdict["forgetting"] == "tested" and not verdict["passed"]
    assert verdict["reasons"] and verdict["reasons"][0].startswith("forget samples flagged")


def test_one_flag_above_control_by_chance_is_not_a_failure() -> None:
    verdict = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=M, parent_metrics=None,
                       gaps=None, evidence=_evidence((2, 10), (1, 10)))
    assert verdict["passed"] and verdict["forgetting"] == "tested"
    # A significant excess smaller than `min_flag_effect` fails only with the effect switched off.
    big = _evidence((60, 1000), (30, 1000), forget_n=1000)
    assert evaluate(DEFAULT_POLICY, kind="unlearn", metrics=M, parent_metrics=None, gaps=None,
                    evidence=big)["passed"]
    strict = merge_policy({"min_flag_effect": None})
    assert not evaluate(strict, kind="unlearn", metrics=M, parent_metrics=None, gaps=None,
                        evidence=big)["passed"]


def test_accuracy_drop_is_judged_on_its_interval() -> None:
    """Before 95/100. After 88/100: a 0.07 drop, yet its interval reaches above 0.90, so
    sampling error explains it. After 70/100: the whole interval is below 0.90."""
    small = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=M, parent_metrics=None, gaps=None,
                     evidence=_evidence((0, 10), (0, 10), audit_after=88))
    assert small["passed"], small["reasons"]
    large = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=M, parent_metrics=None, gaps=None,
                     evidence=_evidence((0, 10), (0, 10), audit_after=70))
    assert not large["passed"] and large["reasons"][0].startswith("acc_test 70/100")


def test_pending_references_are_said_not_judged() -> None:
    verdict = evaluate(DEFAULT_POLICY, kind="unlearn", metrics=M, parent_metrics=None, gaps=None,
                       evidence={"references": {"status": "pending"}, "alpha": 0.05})
    assert verdict["passed"] and verdict["forgetting"] == "not_tested_references_pending"
    assert verdict["forgetting_summary"] == "forgetting not tested: references pending"


def test_policy_statistics_keys_are_validated() -> None:
    assert merge_policy({"alpha": 0.01, "wait_for_references": True})["alpha"] == 0.01
    for bad in ({"alpha": 0}, {"alpha": 1.5}, {"alpha": None}, {"wait_for_references": 1},
                {"min_flag_effect": -0.1}):
        with pytest.raises(InvalidInput):
            merge_policy(bad)
