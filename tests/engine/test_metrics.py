"""Verification metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.archs import build_model
from engine.datasets import Dataset
from engine.metrics import Outputs, gaps, js_divergence, mia_member_rate, retain_sample, verification_metrics
from engine.runtime import DeviceData


def test_js_divergence_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.1, 0.9]], dtype=torch.float64)
    js = js_divergence(p, q)
    # Disjoint supports: ln 2. Identical: 0. Mirrored (0.9, 0.1): computed from the definition.
    m = 0.5
    kl = 0.9 * math.log(0.9 / m) + 0.1 * math.log(0.1 / m)
    assert js == pytest.approx([math.log(2), 0.0, kl], abs=1e-12)


def test_accuracy_and_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    out = Outputs(logits, torch.tensor([0, 0, 0]))
    assert out.correct().tolist() == [True, False, True]
    expected = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(1)), math.log(1 + math.exp(-2))]
    assert out.losses() == pytest.approx(expected)


def test_membership_attack_thresholds_on_loss():
    members = np.full(50, 0.01) + np.linspace(0, 0.01, 50)
    nonmembers = np.full(50, 2.0) + np.linspace(0, 1, 50)
    # Low-loss targets look like members, high-loss ones do not.
    assert mia_member_rate(members, nonmembers, np.array([0.0, 0.02, 2.5, 3.0])) == 0.5
    assert mia_member_rate(members, nonmembers, np.array([0.0, 0.015])) == 1.0
    assert math.isnan(mia_member_rate(members, nonmembers, np.array([])))


def test_retain_sample_is_capped_and_fixed():
    pool = np.arange(10_000)
    a, b = retain_sample(pool, seed=1), retain_sample(pool, seed=1)
    assert len(a) == 5000 and np.array_equal(a, b)
    assert np.array_equal(retain_sample(np.arange(30), seed=1), np.arange(30))


def test_gaps_are_absolute_differences_and_their_mean():
    g = gaps({"acc_forget": 0.9, "acc_retain": 1.0, "acc_test": 0.9, "mia_forget": 0.4},
             {"acc_forget": 0.8, "acc_retain": 0.98, "acc_test": 0.92, "mia_forget": 0.5})
    assert g["acc_forget"] == pytest.approx(0.1) and g["mia_forget"] == pytest.approx(0.1)
    assert g["avg_gap"] == pytest.approx((0.1 + 0.02 + 0.02 + 0.1) / 4)


def test_identities_of_the_divergence_metrics():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    ds = Dataset("t", np.asarray([f"i{i}" for i in range(60)]), labels,
                 np.asarray(["train"] * 45 + ["test"] * 15),
                 (rng.random((60, 1, 8, 8)) * 255).astype(np.uint8), 3)
    data = DeviceData(ds, torch.device("cpu"))
    model = build_model("small_cnn", 3, (1, 8, 8), seed=1).eval()
    teacher = build_model("small_cnn", 3, (1, 8, 8), seed=1).eval()  # the same weights
    m = verification_metrics(model, original=model, teacher=teacher, data=data,
                             forget_idx=np.arange(5), retain_idx=np.arange(5, 45),
                             test_idx=ds.test_indices)
    assert m["js_original"] == pytest.approx(0.0, abs=1e-12)
    assert m["zrf"] == pytest.approx(1.0, abs=1e-12)
    assert m["feature_distance"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        preds = model(data.batch(np.arange(5))[0]).argmax(1).numpy()
    assert m["acc_forget"] == pytest.approx(float((preds == labels[:5]).mean()))
