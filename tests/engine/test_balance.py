"""The loss balancers, against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from engine.balance import DWA, Fixed, GradNorm, Uncertainty, make_balancer
from engine.errors import UnknownName


def test_fixed_weights():
    b = Fixed(2.0, 0.5)
    out = b.combine({"forget": torch.tensor(3.0), "recover": torch.tensor(4.0)})
    assert float(out) == pytest.approx(8.0) and b.weights() == {"forget": 2.0, "recover": 0.5}


def test_dwa_follows_the_loss_ratios_of_the_last_two_windows():
    b = DWA(temperature=2.0)
    b.end_window({"forget": 1.0, "recover": 1.0})
    assert b.weights() == {"forget": 1.0, "recover": 1.0}  # needs two windows of history
    b.end_window({"forget": 0.5, "recover": 1.0})  # forget halves, recover stalls
    e_f, e_r = math.exp(0.5 / 2), math.exp(1.0 / 2)
    w = b.weights()
    assert w["forget"] == pytest.approx(2 * e_f / (e_f + e_r))
    assert w["recover"] == pytest.approx(2 * e_r / (e_f + e_r))
    assert w["recover"] > w["forget"]  # the slower task gets more weight


def test_uncertainty_weighting_learns_to_down_weight_the_larger_loss():
    b = Uncertainty(torch.device("cpu"))
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        b.combine({"forget": torch.tensor(10.0), "recover": torch.tensor(0.1)}).backward()
        opt.step()
    w = b.weights()
    # The optimum of exp(-s) L + s is exp(-s) = 1 / L.
    assert w["forget"] == pytest.approx(0.1, rel=0.05) and w["recover"] == pytest.approx(10, rel=0.05)


def test_gradnorm_moves_weight_toward_the_task_with_the_smaller_gradient():
    shared = torch.nn.Parameter(torch.ones(3))
    b = GradNorm(shared, alpha=0.0, lr=0.05)
    for _ in range(50):
        losses = {"forget": (10 * shared).sum(), "recover": shared.sum()}
        b.before_backward(losses)
    w = b.weights()
    assert sum(w.values()) == pytest.approx(2.0)
    assert w["recover"] > 1.5 > 0.5 > w["forget"]


def test_unknown_balancer():
    with pytest.raises(UnknownName):
        make_balancer("nope", device=torch.device("cpu"), shared=torch.nn.Parameter(torch.ones(1)))


def test_dwa_survives_a_loss_rising_from_zero():
    b = DWA()
    b.end_window({"forget": 1e-30, "recover": 1.0})
    b.end_window({"forget": 5.0, "recover": 1.0})  # ratio 5e30: exp would overflow unshifted
    w = b.weights()
    assert w["forget"] == pytest.approx(2.0) and w["recover"] == pytest.approx(0.0, abs=1e-12)
