"""The robustness suite: its derived datasets and its report."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engine.datasets import Dataset
from engine.suite import (
    CONFIGURATIONS,
    FLOOR_LABEL,
    QUICK_CONFIGURATIONS,
    Configuration,
    class_subset,
    format_report,
    noisy_labels,
    parse_variant,
    run_suite,
    subsample_train,
    target_rows,
)
from engine.training import Recipe


def _dataset(n: int = 200, classes: int = 4) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(
        name="toy", ids=np.asarray([f"t{i:03d}" for i in range(n)]),
        labels=(np.arange(n) % classes).astype(np.int64),
        splits=np.asarray(["train"] * (n - 40) + ["test"] * 40),
        images=rng.random((n, 1, 6, 6)).astype(np.float32), num_classes=classes,
    )


def test_class_subset_keeps_and_relabels_only_the_chosen_classes() -> None:
    ds = _dataset()
    sub = class_subset(ds, (3, 1))
    assert sub.num_classes == 2
    original = {str(i): int(c) for i, c in zip(ds.ids, ds.labels, strict=True)}
    assert {original[str(i)] for i in sub.ids} == {1, 3}
    # Same sample IDs, labels mapped in the order given: 3 -> 0, 1 -> 1.
    assert all(int(y) == (0 if original[str(i)] == 3 else 1)
               for i, y in zip(sub.ids, sub.labels, strict=True))
    assert len(sub.test_indices) == 20


def test_subsampling_shrinks_the_training_split_only() -> None:
    ds = _dataset()
    sub = subsample_train(ds, 50, np.random.default_rng(1))
    assert len(sub.train_indices) == 50
    assert sorted(sub.ids[sub.test_indices].tolist()) == sorted(ds.ids[ds.test_indices].tolist())
    assert set(sub.ids.tolist()) <= set(ds.ids.tolist())
    assert subsample_train(ds, 10_000, np.random.default_rng(1)) is ds


def test_label_noise_flips_that_fraction_of_training_labels_to_another_class() -> None:
    ds = _dataset()
    noisy = noisy_labels(ds, 0.05, np.random.default_rng(2))
    changed = np.flatnonzero(noisy.labels != ds.labels)
    assert len(changed) == round(0.05 * len(ds.train_indices))
    assert (noisy.splits[changed] == "train").all()  # held-out labels stay clean
    assert noisy.fingerprint() != ds.fingerprint()


def test_configurations_cover_sizes_a_class_subset_noise_and_two_architectures() -> None:
    sizes = {c.train_size for c in CONFIGURATIONS.values()}
    assert {1000, 2000, None} <= sizes
    assert any(c.classes for c in CONFIGURATIONS.values())
    assert any(c.label_noise == 0.05 for c in CONFIGURATIONS.values())
    assert len({c.arch for c in CONFIGURATIONS.values()}) >= 2
    assert set(QUICK_CONFIGURATIONS) <= set(CONFIGURATIONS)
    ds = CONFIGURATIONS["n1000"].dataset(0)
    assert len(ds.train_indices) == 1000 and len(ds.test_indices) == 1000


def test_variants_parse_and_unknown_methods_are_refused() -> None:
    assert parse_variant('a=bad_teacher:{"epochs": 1}') == ("a", "bad_teacher", {"epochs": 1})
    assert parse_variant("b=scrub") == ("b", "scrub", {})
    with pytest.raises(ValueError, match="bad variant"):
        parse_variant("c=nothing")


def _rec(method: str, scenario: str, seed: int, gap: float, **kw: Any) -> dict[str, Any]:
    base = {"acc_forget": 0.0, "acc_retain": 0.99, "acc_test": 0.9, "mia_forget": 0.0,
            "time_ratio": 0.2, "retrain": {"acc_retain": 0.995}}
    return {"configuration": "n1000", "arch": "small_cnn", "train_size": 1000,
            "num_classes": 10, "method": method, "scenario": scenario, "seed": seed,
            "avg_gap": gap, **base, **kw}


def test_targets_are_judged_per_configuration_with_per_seed_values() -> None:
    records = [
        _rec("retrain", "class", 0, 0.0), _rec("retrain", "class", 1, 0.0),
        _rec("feature_constraint", "class", 0, 0.4, time_ratio=0.05),
        _rec("feature_constraint", "class", 1, 1.4, acc_forget=0.01, time_ratio=0.05),
        _rec("ssd", "class", 0, 0.2), _rec("ssd", "class", 1, 0.3),
        _rec("ssd[alpha1]", "class", 0, 0.0), _rec("ssd[alpha1]", "class", 1, 0.0),
    ]
    (row,) = target_rows(records)
    assert row["avg_gap"] == [0.4, 1.4] and row["avg_gap_ok"] is True  # mean 0.9
    assert row["lowest"] == "ssd" and row["lowest_ok"] is False  # variants are not methods
    assert row["time_ok"] is True
    assert row["acc_forget"] == [0.0, 1.0] and row["class_ok"] is False  # 1% > 0.5%
    report = format_report(records)
    assert "0.40, 1.40" in report and "**missed**" in report


@pytest.mark.parametrize(("retained", "ok"), [(3555, True), (3554, False)])
def test_a_class_run_exactly_one_point_below_retrain_is_within_the_target(retained: int, ok: bool):
    # 36 of 3,600 retained samples fewer than retraining is 1 pt exactly; 37 is over.
    records = [_rec("retrain", "class", 0, 0.0),
               _rec("feature_constraint", "class", 0, 0.4, acc_retain=retained / 3600,
                    retrain={"acc_retain": 3591 / 3600})]
    (row,) = target_rows(records)
    assert row["class_ok"] is ok


def test_the_noise_floor_is_reported_beside_the_targets_and_is_not_a_method() -> None:
    records = [_rec("retrain", "small", 0, 0.0), _rec("retrain", "small", 1, 0.0),
               _rec("feature_constraint", "small", 0, 0.3), _rec("feature_constraint", "small", 1, 0.5),
               _rec(FLOOR_LABEL, "small", 0, 2.5), _rec(FLOOR_LABEL, "small", 1, 0.0)]
    (row,) = target_rows(records)
    assert row["floor"] == [2.5, 0.0] and row["lowest"] == "feature_constraint"
    assert "1.25 ± 1.25 [2.50, 0.00]" in format_report(records)
    assert "not run" in format_report(records[:4])


def test_a_time_ratio_against_a_retrain_timed_elsewhere_is_not_reported() -> None:
    records = [_rec("retrain", "small", 0, 0.0),
               _rec("feature_constraint", "small", 0, 0.1, reference_reused=True)]
    (row,) = target_rows(records)
    assert row["time_ratio"] is None and row["time_ok"] is False
    assert "n/a (retrain timed in another run)" in format_report(records)


def test_the_flag_rate_target_holds_only_inside_retrains_interval_on_every_seed() -> None:
    records = [_rec("retrain", "random", 0, 0.0), _rec("retrain", "random", 1, 0.0),
               _rec("feature_constraint", "random", 0, 0.5, flag_forget=0.04,
                    retrain_flag_forget=0.03, retrain_flag_forget_interval=[0.01, 0.07]),
               _rec("feature_constraint", "random", 1, 0.5, flag_forget=0.20,
                    retrain_flag_forget=0.05, retrain_flag_forget_interval=[0.02, 0.10])]
    (row,) = target_rows(records)
    assert row["flag_inside"] == 1 and row["flag_ok"] is False
    assert row["flag_forget"] == [4.0, 20.0] and row["retrain_flag_forget"] == [3.0, 5.0]
    assert "inside on 1 of 2 seeds" in format_report(records)
    (row,) = target_rows(records[:3])
    assert row["flag_ok"] is True
    assert "not run (no references)" in format_report([_rec("retrain", "small", 0, 0.0),
                                                        _rec("feature_constraint", "small", 0, 0.1)])


def test_with_references_every_run_is_scored_by_the_per_sample_test(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CONFIGURATIONS, "n300", Configuration("n300", arch="mlp", train_size=300))
    records = run_suite(configurations=["n300"], scenarios=["small"], seeds=1,
                        variants=[("finetune", "finetune", {"epochs": 1})],
                        recipe=Recipe(epochs=1), cache=tmp_path, device="cpu", references=2)
    cost, retrain, finetune = records
    assert cost["method"] == "references" and cost["k"] == 2 and cost["configuration"] == "n300"
    assert set(cost["amortised_seconds"]) == {"10", "100", "1000"}
    assert retrain["flag_forget"] is not None and finetune["flag_forget"] is not None
    assert finetune["retrain_flag_forget_interval"] == retrain["flag_forget_interval"]
    report = format_report(records)
    assert "one-time cost per base model" in report and "| n300 | 2 |" in report
    # Resumed, nothing runs again and the cost is not recorded twice.
    assert run_suite(configurations=["n300"], scenarios=["small"], seeds=1,
                     variants=[("finetune", "finetune", {"epochs": 1})], recipe=Recipe(epochs=1),
                     cache=tmp_path, device="cpu", references=2, done=records) == records
