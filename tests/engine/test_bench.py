"""The benchmark: every figure on audit data, the per-sample test's rates beside avg gap."""

from __future__ import annotations

import io

import numpy as np
import pytest
from sample_data import write_tiny_dataset

from engine.bench import format_table, run_bench
from engine.datasets import DatasetSpec, load_dataset
from engine.training import Recipe


def test_bench_reports_flag_rates_and_reference_cost(tmp_path):
    path = write_tiny_dataset(tmp_path / "b.npz", per_class=20)
    snapshots: list[int] = []
    records = run_bench(
        dataset_kind="npz", uri=str(path), scenarios=["small"], seeds=1, methods=["finetune"],
        ablation=False, arch="small_cnn", recipe=Recipe(epochs=2, batch_size=16, lr=0.05),
        cache=tmp_path / "cache", device="cpu", references=2, log=io.StringIO(),
        on_record=lambda rs: snapshots.append(len(rs)),
    )
    assert snapshots == [1, 2, 3]  # partial results after every record
    cost, retrain, finetune = records
    assert cost["method"] == "references" and cost["k"] == 2 and cost["pool_size"] == 60
    assert cost["ratio_to_training"] == pytest.approx(cost["seconds"] / cost["train_seconds"])
    assert cost["amortised_seconds"]["100"] == pytest.approx(cost["seconds"] / 100)
    audit_n = len(load_dataset(DatasetSpec("npz", str(path))).audit_indices)
    for rec in (retrain, finetune):
        assert rec["flag_n"] == 10 and rec["control_n"] == min(10, audit_n // 2)
        for key in ("flag_forget", "flag_control", "flag_original", "retrain_flag_forget"):
            assert 0.0 <= rec[key] <= 1.0, key
        # acc_test is a count over the audit split, not over the whole test split.
        assert np.isclose(rec["acc_test"] * audit_n, round(rec["acc_test"] * audit_n))
    assert retrain["retrain_flag_forget"] == retrain["flag_forget"]
    assert finetune["retrain_flag_forget"] == retrain["flag_forget"]
    table = format_table(records)
    assert "| flag forget | flag retrain | flag control | flag original |" in table
    assert "reference statistics (one-time cost per model, K = 2, 1 seeds)" in table
    # Cached references are reused: the second run trains no reference.
    again = run_bench(
        dataset_kind="npz", uri=str(path), scenarios=["small"], seeds=1, methods=[],
        ablation=False, arch="small_cnn", recipe=Recipe(epochs=2, batch_size=16, lr=0.05),
        cache=tmp_path / "cache", device="cpu", references=2, log=io.StringIO(),
    )
    assert again[0]["seconds"] == cost["seconds"] and again[1]["flag_forget"] == retrain["flag_forget"]
