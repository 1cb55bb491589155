"""Deletion evidence: the per-sample membership test, its calibration, intervals and verdicts.

The memorisation tests use the tiny problem (`tiny_problem`): 16 training samples carry random
labels, so only a model that trained on them is confident in their labels.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special
from tiny_problem import NUM_CLASSES, RECIPE

from engine import evidence as ev
from engine.errors import InvalidInput
from engine.evidence import (
    ModelScores,
    ReferenceStats,
    accuracy_drop_check,
    calibrated_p_values,
    forgetting_verdict,
    logit_confidence,
    membership_test,
    wilson,
)
from engine.methods.feature_constraint import SampleTargets
from engine.metrics import infer, retain_sample
from engine.references import build_evidence, train_references
from engine.training import train_model
from engine.unlearning import unlearn

K = 8


# --- pure statistics --------------------------------------------------------------------------


def test_logit_confidence_is_the_log_odds_of_the_label_and_stable():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [100.0, 0.0, -50.0]])
    labels = np.array([0, 2, 0])
    p = special.softmax(logits, axis=1)[np.arange(3), labels]
    phi = logit_confidence(logits, labels)
    assert phi[:2] == pytest.approx(np.log(p[:2] / (1 - p[:2])))
    assert phi[2] == pytest.approx(100.0, abs=1e-6)  # 1 - p underflows; phi must not
    assert np.isfinite(phi).all()


def test_calibrated_p_values_are_ranks_among_the_null_and_valid_under_it():
    null = np.array([0.0, 1.0, 2.0, 3.0])
    assert calibrated_p_values(np.array([3.5, 2.0, -1.0]), null).tolist() == [0.2, 0.6, 1.0]
    rng = np.random.default_rng(0)
    # A never-trained sample is as likely as any null sample to rank first: flag rate ~ alpha,
    # even when the null is far from N(0, 1) (shifted and widened, like half-data references).
    null, fresh = rng.normal(1.5, 2.0, 3000), rng.normal(1.5, 2.0, 3000)
    rate = float((calibrated_p_values(fresh, null) <= 0.05).mean())
    assert 0.04 <= rate <= 0.06
    naive = float((ev.gaussian_p_values(fresh) <= 0.05).mean())
    assert naive > 0.25  # what the plain Gaussian tail would claim on the same samples
    with pytest.raises(InvalidInput):
        calibrated_p_values(fresh, np.array([]))


def test_wilson_interval_and_exact_test():
    lo, hi = wilson(1, 10)
    assert lo == pytest.approx(0.0179, abs=1e-3) and hi == pytest.approx(0.4042, abs=1e-3)
    assert wilson(0, 0) == [0.0, 1.0]
    assert ev.exact_greater(1, 10, 0, 10) == pytest.approx(0.5)
    assert ev.exact_greater(10, 10, 0, 10) < 1e-4
    assert ev.exact_greater(0, 10, 5, 10) == pytest.approx(1.0)


def test_stats_file_round_trips_and_refuses_other_files(tmp_path):
    out = np.array([[0.5, np.nan], [np.nan, -1.0], [2.0, 3.0]], dtype=np.float32)
    stats = ReferenceStats(ids=np.array(["a", "b", "c"]), out=out, meta={"k": 2, "seed": 3})
    data = stats.to_bytes()
    back = ev.load_reference_stats(data)
    assert back.ids.tolist() == ["a", "b", "c"] and back.meta["seed"] == 3 and back.k == 2
    assert np.array_equal(np.isnan(back.out), np.isnan(out))
    assert np.allclose(np.nan_to_num(back.out), np.nan_to_num(out))
    (tmp_path / "s.npz").write_bytes(data)
    assert ev.load_reference_stats(tmp_path / "s.npz").rows(["c", "a"]).tolist() == [2, 0]
    with pytest.raises(InvalidInput, match="do not cover"):
        back.rows(["zzz"])
    with pytest.raises(InvalidInput):
        ev.load_reference_stats(b"not an npz")
    with pytest.raises(InvalidInput):
        ev.load_reference_stats(tmp_path / "missing.npz")


def test_balanced_halves_leave_every_sample_out_of_exactly_half():
    mask = ev.balanced_halves(1000, 8, seed=1)
    assert (mask.sum(axis=1) == 4).all()
    assert (np.abs(mask.sum(axis=0) - 500) < 60).all()
    assert np.array_equal(mask, ev.balanced_halves(1000, 8, seed=1))
    with pytest.raises(InvalidInput):
        ev.balanced_halves(10, 3, seed=0)


def _synthetic_evidence(forget_hits: int, n: int = 10) -> dict:
    """Evidence where exactly `forget_hits` forget samples sit above every null sample and no
    control sample does (the standardised scores are the raw ones: mu 0, sigma 1)."""
    null = np.linspace(-2.0, 2.0, 40)
    forget = np.where(np.arange(n) < forget_hits, 5.0, 0.0)
    control = np.zeros(n)
    scores = ModelScores(forget=forget, control=control, null=null)
    gauss = {part: (np.zeros(len(x)), np.ones(len(x)))
             for part, x in (("forget", forget), ("control", control), ("null", null))}
    original = ModelScores(forget=np.full(n, 5.0), control=control, null=null)
    return membership_test(forget_ids=[f"s{i}" for i in range(n)], unlearned=scores,
                           original=original, gaussian=gauss,
                           out_forget=np.zeros((n, 4), np.float32), k=8, variance="pooled")


def test_verdict_passes_one_of_ten_by_chance_and_fails_a_forget_set_flagged_far_above():
    one = _synthetic_evidence(1)
    assert (one["forget"]["flagged"], one["control"]["flagged"]) == (1, 0)
    verdict = forgetting_verdict(one)
    assert verdict["passed"] and verdict["forgetting"] == "tested" and not verdict["reasons"]
    many = _synthetic_evidence(8)
    verdict = forgetting_verdict(many)
    assert not verdict["passed"] and "8/10" in verdict["reasons"][0]
    assert "still more confident" in many["statement"]
    # The policy's minimal effect size: a significant but tiny excess does not fail.
    assert forgetting_verdict(many, min_effect=0.9)["passed"]


def test_verdict_without_references_or_without_power_says_so():
    pending = forgetting_verdict(ev.pending_evidence(k=8))
    assert pending["passed"] and pending["forgetting"] == "not_tested_references_pending"
    assert pending["summary"] == "forgetting not tested: references pending"
    weak = _synthetic_evidence(0)
    weak["distinguishes"] = False
    weak["statement"] = ev.statement(weak)
    verdict = forgetting_verdict(weak)
    assert verdict["passed"] and verdict["forgetting"] == "test_has_no_power"
    assert verdict["summary"].startswith("this test cannot distinguish these samples on this model")


def test_accuracy_check_uses_the_interval_not_the_point_difference():
    # 93/100 is 4 points below 0.97, but sampling error covers a 2-point allowance.
    assert accuracy_drop_check("acc_test", 0.97, 93, 100, max_drop=0.02)["passed"]
    failed = accuracy_drop_check("acc_test", 0.97, 800, 1000, max_drop=0.02)
    assert not failed["passed"] and "acc_test" in failed["reason"]


# --- on the tiny memorisation problem ---------------------------------------------------------


@pytest.fixture(scope="module")
def stats(problem):
    return train_references("small_cnn", NUM_CLASSES, problem.data,
                            problem.data.dataset.train_indices, RECIPE, k=K, seed=0)


@pytest.fixture(scope="module")
def retrained(problem):
    model, _ = train_model("small_cnn", NUM_CLASSES, problem.data, problem.retain_idx, RECIPE)
    return model


def _evidence(problem, model, stats):
    metrics = {"acc_forget": problem.acc(model, problem.forget_idx),
               "acc_retain": problem.acc(model, problem.retain_idx),
               "acc_test": problem.acc(model, problem.data.dataset.audit_indices)}
    return build_evidence(model, problem.original, data=problem.data,
                          forget_idx=problem.forget_idx, metrics=metrics,
                          retain_probe_size=len(retain_sample(problem.retain_idx, 0)), stats=stats)


def test_references_keep_only_out_scores(problem, stats):
    ds = problem.data.dataset
    assert stats.k == K and stats.ids.tolist() == ds.ids.tolist()
    finite = ~np.isnan(stats.out)
    train = ds.train_indices
    assert (finite[train].sum(axis=1) == K // 2).all()  # each training sample OUT of exactly half
    assert finite[ds.test_indices].all()  # no reference ever trained on held-out data
    # ...and each reference trained on about half of the pool.
    assert (np.abs(finite[train].sum(axis=0) - len(train) / 2) < 0.15 * len(train)).all()
    assert stats.meta["fingerprint"] == ds.fingerprint() and len(stats.meta["reference_seeds"]) == K
    # OUT references never saw the random labels: they are not confident in them.
    mu, _ = stats.gaussian(stats.rows(ds.ids[problem.forget_idx]))
    assert (mu < 0).all()


def test_original_is_flagged_far_above_control(problem, stats):
    e = _evidence(problem, problem.original, stats)
    assert e["references"]["status"] == "ready"
    assert e["original"]["rate"] >= 0.75 and e["original_vs_control_p"] < 1e-3
    assert e["distinguishes"]
    assert e["control"]["rate"] <= 0.25
    # Unlearned = original (nothing forgotten), accuracy intact: the forgetting check fails...
    verdict = forgetting_verdict(e)
    assert not verdict["passed"] and verdict["reasons"]
    # ...while the accuracy check, on audit data with its interval, passes.
    acc = e["accuracy"]["audit_after"]
    assert accuracy_drop_check("acc_test", e["accuracy"]["audit_before"]["rate"], acc["correct"],
                               acc["n"], max_drop=0.02)["passed"]
    assert set(e["p_values"]) == set(problem.data.dataset.ids[problem.forget_idx].tolist())


def test_retrained_model_is_flagged_at_the_control_rate(problem, stats, retrained):
    e = _evidence(problem, retrained, stats)
    f, c = e["forget"], e["control"]
    assert f["rate"] <= c["interval"][1]
    assert e["forget_vs_control_p"] >= 0.05
    assert forgetting_verdict(e)["passed"]
    assert e["distinguishes"]  # the original, scored in the same evidence, is still flagged
    assert len(e["scores"]["forget_unlearned"]) == len(problem.forget_idx)
    assert len(e["scores"]["out_reference"]) == len(problem.forget_idx) * K // 2
    pc = e["per_class_accuracy"]
    assert pc["classes"] == list(range(NUM_CLASSES)) and sum(pc["n"]) == len(
        problem.data.dataset.audit_indices)
    assert set(e["intervals"]) == {"acc_forget", "acc_retain", "acc_test"}


def test_default_method_result_is_reported(problem, stats, record_property):
    ds = problem.data.dataset
    res = unlearn(problem.original, arch="small_cnn", num_classes=NUM_CLASSES, data=problem.data,
                  forget_idx=problem.forget_idx, retain_idx=problem.retain_idx, recipe=RECIPE,
                  teacher_seed=11, seed=0, reference_stats=stats)
    e = res.evidence
    assert e is not None and e["references"]["status"] == "ready"
    verdict = forgetting_verdict(e)
    # Either outcome is reported; the verdict must follow the counts it reports.
    significant = e["forget_vs_control_p"] < e["alpha"]
    effect = e["forget"]["rate"] - e["control"]["rate"]
    assert verdict["passed"] == (not (significant and effect >= ev.MIN_EFFECT))
    record_property("default_forget_flagged", f"{e['forget']['flagged']}/{e['forget']['n']}")
    record_property("default_control_flagged", f"{e['control']['flagged']}/{e['control']['n']}")
    record_property("default_statement", e["statement"])
    assert res.metrics["acc_test"] == pytest.approx(problem.acc(res.model, ds.audit_indices))


def _memorised_and_typical(problem, stats):
    """The memorised samples plus 16 typical ones as the forget set: (the typical ones, the
    retain pool, `unlearn`'s arguments with the reference statistics)."""
    train = problem.data.dataset.train_indices
    typical = problem.retain_idx[:: len(problem.retain_idx) // 16][:16]
    forget = np.sort(np.concatenate([problem.forget_idx, typical]))
    retain = train[~np.isin(train, forget)]
    common = dict(arch="small_cnn", num_classes=NUM_CLASSES, data=problem.data, forget_idx=forget,
                  retain_idx=retain, recipe=RECIPE, teacher_seed=11, seed=0, reference_stats=stats)
    return typical, retain, common


def test_capped_targets_stop_just_past_even_odds_and_the_logit_term_holds_retained_outputs(
        problem, stats):
    """`target_margin` pushes a target only to max(its expected score, -margin), so targets
    end misclassified but less far from even odds than the full push leaves them;
    `recovery_logits` keeps the recovery batch's logits near the original's meanwhile."""
    t = SampleTargets(np.array([-3.0, -0.2, 1.0, -4.0]), np.ones(4),
                      np.array([False, False, False, True]), margin=0.5)
    assert t.targeted.tolist() == [True, True, False, False]  # an absent class is never a target
    assert t.expected.tolist() == [-0.5, -0.2, 1.0, -4.0]

    typical, retain, common = _memorised_and_typical(problem, stats)
    pst = {"per_sample_targets": True}
    full = unlearn(problem.original, options={**pst, "recovery_logits": 0.0}, **common)
    capped = unlearn(problem.original, options={**pst, "target_margin": 0.5, "recovery_logits": 0.0},
                     **common)
    held = unlearn(problem.original, options={**pst, "target_margin": 0.5, "recovery_logits": 3.0},
                   **common)

    def phi(model, idx):
        out = infer(model, problem.data, idx)
        return logit_confidence(out.logits.numpy(), out.labels.numpy())

    for res in (capped, held):
        assert problem.acc(res.model, problem.forget_idx) <= 0.125
        assert problem.acc(res.model, typical) >= 15 / 16
    assert phi(capped.model, problem.forget_idx).mean() > phi(full.model, problem.forget_idx).mean()

    before = infer(problem.original, problem.data, retain).logits

    def drift(model):
        return float(((infer(model, problem.data, retain).logits - before) ** 2).mean())

    assert drift(held.model) < drift(capped.model)


def test_statistics_from_another_dataset_are_refused(problem, stats):
    other = ReferenceStats(ids=stats.ids, out=stats.out, meta={**stats.meta, "fingerprint": "x"})
    with pytest.raises(InvalidInput, match="another dataset"):
        _evidence(problem, problem.original, other)


def test_per_sample_targets_forget_what_never_trained_models_misclassify(problem, stats):
    """The default method with the model's reference statistics: a forget sample that models
    which never saw it misclassify (the random labels) ends misclassified; a typical forget
    sample, which they recognise, stays correct. Without the targets the memorised samples
    are still recognised (the population rule sees them as unseen already)."""
    typical, _, common = _memorised_and_typical(problem, stats)
    without = unlearn(problem.original, **common)  # the default: targets off
    assert problem.acc(without.model, problem.forget_idx) >= 0.75
    res = unlearn(problem.original, options={"per_sample_targets": True}, **common)
    assert res.extra["targeted"] == len(problem.forget_idx)  # exactly the memorised ones
    assert problem.acc(res.model, problem.forget_idx) <= 0.125
    assert problem.acc(res.model, typical) >= 15 / 16
    assert problem.acc(res.model, problem.data.dataset.audit_indices) >= 0.95
    e = res.evidence
    assert e is not None and forgetting_verdict(e)["passed"], e["statement"]
