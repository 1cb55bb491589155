"""The job entry points the worker calls: IDs in, safetensors bytes and evidence out."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from engine.checkpoint import load_model
from engine.datasets import DatasetSpec
from engine.errors import Cancelled, TestSplitSamples, UnknownSampleIds
from engine.evidence import forgetting_verdict, load_reference_stats
from engine.jobs import ModelSpec, evaluate_checkpoint, run_reference, run_train, run_unlearn
from engine.metrics import METRIC_NAMES
from engine.training import Recipe


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    rng = np.random.default_rng(0)
    templates = rng.random((3, 12, 12)) > 0.5
    labels = np.repeat(np.arange(3), 50)
    x = np.clip(templates[labels] + rng.normal(0, 0.3, (150, 12, 12)), 0, 1).astype(np.float32)
    split = np.where(np.arange(150) % 50 < 40, "train", "test")
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=x, y=labels, ids=np.asarray([f"s{i:03d}" for i in range(150)]), split=split)
    return ModelSpec("small_cnn", 3, DatasetSpec("npz", str(path)),
                     Recipe(epochs=6, batch_size=16, lr=0.05, seed=0))


@pytest.fixture(scope="module")
def trained(spec):
    phases = []
    out = run_train(spec, on_progress=lambda p: phases.append(p.phase), device="cpu")
    return out, phases


def test_train_job_returns_loadable_weights_and_metrics(spec, trained):
    out, phases = trained
    assert phases[0] == "loading" and "training" in phases and phases[-1] == "verifying"
    model = load_model("small_cnn", 3, (1, 12, 12), out.weights)
    assert model.head.out_features == 3
    assert out.metrics["acc_test"] > 0.9 and out.steps == 6 * 8
    assert out.method == "train" and out.metrics["device"] == "cpu"


def test_unlearn_job_verifies_against_retraining(spec, trained):
    forget = ["s000", "s001", "s002", "s050", "s051"]
    progress = []
    out = run_unlearn(spec, checkpoint=trained[0].weights, forget_ids=forget, forgotten_ids=[],
                      verify="retrain", seed=4, on_progress=progress.append, device="cpu")
    assert set(METRIC_NAMES) <= set(out.metrics)
    assert {"seconds", "steps", "device"} <= set(out.metrics)
    assert out.reference is not None and out.gaps is not None
    assert out.gaps["avg_gap"] == pytest.approx(
        np.mean([abs(out.metrics[k] - out.reference[k])
                 for k in ("acc_forget", "acc_retain", "acc_test", "mia_forget")]))
    assert out.method == "feature_constraint" and out.teacher_seed == 4
    assert {p.phase for p in progress} >= {"loading", "unlearning", "verifying"}
    steps = [p for p in progress if p.phase == "unlearning"]
    assert steps and set(steps[0].losses) == {"forget", "recover"}
    assert set(steps[0].weights) == {"forget", "recover"}
    # The published weights are exactly the ones the metrics describe.
    again = evaluate_checkpoint(spec, out.weights, forget_ids=forget, teacher_seed=4,
                                original=trained[0].weights, device="cpu")
    for name in METRIC_NAMES:
        assert again[name] == pytest.approx(out.metrics[name], abs=1e-9), name


def test_unlearn_job_refuses_ids_it_cannot_forget(spec, trained):
    kw = dict(checkpoint=trained[0].weights, forgotten_ids=[], device="cpu")
    with pytest.raises(UnknownSampleIds):
        run_unlearn(spec, forget_ids=["s000", "zzz"], **kw)
    with pytest.raises(TestSplitSamples):
        run_unlearn(spec, forget_ids=["s045"], **kw)  # index 45 % 50 >= 40: test split


def test_cancellation_stops_the_job(spec, trained):
    with pytest.raises(Cancelled):
        run_unlearn(spec, checkpoint=trained[0].weights, forget_ids=["s003"], forgotten_ids=[],
                    should_cancel=lambda: True, device="cpu")


def test_throughput_benchmark_measures_both_loops():
    from engine.throughput import measure

    r = measure(arch="small_cnn", batch_size=8, steps=1, repeats=1, device="cpu")
    assert r["plain_samples_per_s"] > 0 and r["unlearn_samples_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["unlearn_samples_per_s"] / r["plain_samples_per_s"])


def test_loop_benchmark_runs_the_shipped_loops():
    from engine.throughput import measure_loops

    r = measure_loops(arch="small_cnn", n_train=480, forget=128, passes=4, repeats=1, device="cpu")
    assert r["method_steps"] == 4 and r["samples_per_step"] == 192
    assert r["plain_loop_samples_per_s"] > 0 and r["method_loop_samples_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["method_loop_samples_per_s"] / r["plain_loop_samples_per_s"])


def test_every_deletion_publishes_changed_weights(tmp_path):
    # Small deletions on a learnable dataset, one after another: the method must never hand
    # back its untouched input (a run that does not stop early restores its best candidate,
    # and the model before the first update is not one).
    from sample_data import write_tiny_dataset

    quad = ModelSpec("small_cnn", 4, DatasetSpec("npz", str(write_tiny_dataset(tmp_path / "q.npz"))),
                     Recipe(optimizer="sgd", lr=0.05, epochs=2, batch_size=32, seed=0))
    checkpoint = run_train(quad, device="cpu").weights
    train = [f"s{i:04d}" for i in range(160) if i % 40 < 30]
    forgotten: list[str] = []
    for k in range(6):
        batch = [train[2 * k]] if k % 2 else train[2 * k : 2 * k + 2]
        out = run_unlearn(quad, checkpoint=checkpoint, forget_ids=batch, forgotten_ids=forgotten,
                          seed=k, device="cpu")
        assert out.weights != checkpoint, f"deletion {k} published its parent's weights"
        checkpoint, forgotten = out.weights, forgotten + batch


@pytest.fixture(scope="module")
def references(spec):
    phases = []
    out = run_reference(spec, k=2, seed=1, on_progress=phases.append, device="cpu")
    return out, phases


def test_reference_job_returns_statistics_and_no_weights(spec, references):
    out, phases = references
    assert phases[0].phase == "loading" and phases[-1].phase == "verifying"
    steps = [p for p in phases if p.phase == "training"]
    assert steps and steps[-1].total_steps == out.steps and out.steps == 2 * 6 * 4
    with np.load(io.BytesIO(out.stats), allow_pickle=False) as z:
        assert set(z.files) == {"ids", "out", "meta"}  # statistics only: no tensors of a model
    stats = load_reference_stats(out.stats)
    assert stats.k == out.k == 2 and out.pool_size == 120
    assert len(out.seconds_per_reference) == 2 and out.seconds == pytest.approx(
        sum(out.seconds_per_reference))
    train = np.arange(150) % 50 < 40
    assert (stats.out_counts[train] == 1).all() and (stats.out_counts[~train] == 2).all()
    assert out.summary["fingerprint"] == stats.meta["fingerprint"]


def test_unlearn_job_evidence_with_and_without_references(spec, trained, references, tmp_path):
    forget = ["s000", "s001", "s002", "s050", "s051"]
    kw = dict(checkpoint=trained[0].weights, forget_ids=forget, forgotten_ids=[], seed=2,
              device="cpu")
    pending = run_unlearn(spec, **kw).evidence
    assert pending["references"]["status"] == "pending" and "p_values" not in pending
    assert pending["statement"] == "forgetting not tested: references pending"
    assert set(pending["intervals"]) == {"acc_forget", "acc_retain", "acc_test"}
    assert sum(pending["per_class_accuracy"]["n"]) == pending["accuracy"]["audit_after"]["n"] == 15
    path = tmp_path / "refs.npz"
    path.write_bytes(references[0].stats)
    for source in (references[0].stats, path):
        ready = run_unlearn(spec, reference_stats=source, **kw).evidence
        assert ready["references"] == {"k": 2, "status": "ready", "variance": "pooled"}
        assert set(ready["p_values"]) == set(forget)
        assert all(0 < p <= 1 for p in ready["p_values"].values())
        assert ready["forget"]["n"] == 5 and ready["control"]["n"] == 5
        assert ready["intervals"] == pending["intervals"]
        assert forgetting_verdict(ready)["forgetting"] in {"tested", "test_has_no_power"}
        assert json.loads(json.dumps(ready, allow_nan=False)) == ready  # stored as a JSON column
    checked = run_unlearn(spec, reference_stats=references[0].stats, verify="retrain", **kw)
    assert checked.evidence["retrained"]["forget"]["n"] == 5  # retrain's own flag rate


def test_reference_job_can_be_cancelled(spec):
    with pytest.raises(Cancelled):
        run_reference(spec, k=2, should_cancel=lambda: True, device="cpu")
