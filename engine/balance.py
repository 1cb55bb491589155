"""Adaptive loss balance for the two tasks of feature-constraint unlearning.

Every balancer turns the per-step task losses `{"forget": L_F, "recover": L_R}` into one
objective and reports the weights it used:

- `fixed`        w_F L_F + w_R L_R with constant weights (the ablation).
- `dwa`          dynamic weight averaging (Liu et al., CVPR 2019): each window the weights
                 are K * softmax(r / T), r_k = L_k(t-1) / L_k(t-2) over window means; a task
                 whose loss falls slowly gets more weight. K = number of tasks, T = 2.
- `uncertainty`  homoscedastic uncertainty weighting (Kendall et al., CVPR 2018):
                 sum_k exp(-s_k) L_k + s_k with learned log-variances s_k.
- `gradnorm`     GradNorm (Chen et al., ICML 2018): learned weights that equalise each task's
                 gradient norm on the last shared layer, scaled by its relative training rate
                 to the power alpha; weights renormalised to sum to K.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from engine.errors import UnknownName

TASKS = ("forget", "recover")


class Balancer(ABC):
    """Combines task losses into one objective; may learn or adapt its weights."""

    name: str

    def parameters(self) -> list[nn.Parameter]:
        """Extra parameters the method's optimiser should also update."""
        return []

    @abstractmethod
    def weights(self) -> dict[str, float]:
        """The weights of the most recent step, for progress and history."""

    @abstractmethod
    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        """The objective to back-propagate."""

    def before_backward(self, losses: dict[str, Tensor]) -> None:  # noqa: B027
        """Hook before the model's backward pass, graph intact (GradNorm adapts here)."""

    def end_window(self, mean_losses: dict[str, float]) -> None:  # noqa: B027
        """Hook at the end of each averaging window (DWA adapts here)."""


class Fixed(Balancer):
    name = "fixed"

    def __init__(self, forget: float = 1.0, recover: float = 1.0) -> None:
        self._w = {"forget": forget, "recover": recover}

    def weights(self) -> dict[str, float]:
        return dict(self._w)

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        return self._w["forget"] * losses["forget"] + self._w["recover"] * losses["recover"]


class DWA(Balancer):
    name = "dwa"

    def __init__(self, temperature: float = 2.0) -> None:
        self.temperature = temperature
        self._history: list[dict[str, float]] = []
        self._w = dict.fromkeys(TASKS, 1.0)

    def weights(self) -> dict[str, float]:
        return dict(self._w)

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        return self._w["forget"] * losses["forget"] + self._w["recover"] * losses["recover"]

    def end_window(self, mean_losses: dict[str, float]) -> None:
        self._history.append(mean_losses)
        if len(self._history) < 2:
            return
        prev, last = self._history[-2], self._history[-1]
        ratios = {k: last[k] / max(prev[k], 1e-12) for k in TASKS}
        # A softmax, shifted by its maximum: a loss rising from ~0 gives an enormous ratio.
        top = max(ratios.values())
        exps = {k: math.exp((ratios[k] - top) / self.temperature) for k in TASKS}
        total = sum(exps.values())
        self._w = {k: len(TASKS) * exps[k] / total for k in TASKS}


class Uncertainty(Balancer):
    name = "uncertainty"

    def __init__(self, device: torch.device) -> None:
        self.log_vars = nn.Parameter(torch.zeros(len(TASKS), device=device))

    def parameters(self) -> list[nn.Parameter]:
        return [self.log_vars]

    def weights(self) -> dict[str, float]:
        return {k: float(torch.exp(-self.log_vars[i].detach())) for i, k in enumerate(TASKS)}

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        terms = [torch.exp(-self.log_vars[i]) * losses[k] + self.log_vars[i]
                 for i, k in enumerate(TASKS)]
        return torch.stack(terms).sum()


class GradNorm(Balancer):
    name = "gradnorm"

    def __init__(self, shared: nn.Parameter, *, alpha: float = 1.5, lr: float = 0.025) -> None:
        self.shared = shared
        self.alpha = alpha
        self.w = nn.Parameter(torch.ones(len(TASKS), device=shared.device))
        self._opt = torch.optim.Adam([self.w], lr=lr)
        self._initial: Tensor | None = None

    def weights(self) -> dict[str, float]:
        return {k: float(self.w[i].detach()) for i, k in enumerate(TASKS)}

    def combine(self, losses: dict[str, Tensor]) -> Tensor:
        w = self.w.detach()
        return torch.stack([w[i] * losses[k] for i, k in enumerate(TASKS)]).sum()

    def before_backward(self, losses: dict[str, Tensor]) -> None:
        values = torch.stack([losses[k] for k in TASKS])
        if self._initial is None:
            self._initial = values.detach().clamp_min(1e-12)
        norms = []
        for i, k in enumerate(TASKS):
            if not losses[k].requires_grad:  # a task that moves no weight this step
                norms.append(self.w[i] * 0.0)
                continue
            (g,) = torch.autograd.grad(losses[k], self.shared, retain_graph=True)
            norms.append(self.w[i] * g.detach().norm())
        g_norm = torch.stack(norms)
        ratio = values.detach() / self._initial
        rate = ratio / ratio.mean().clamp_min(1e-12)
        target = (g_norm.mean() * rate.pow(self.alpha)).detach()
        self._opt.zero_grad(set_to_none=True)
        (g_norm - target).abs().sum().backward()  # type: ignore[no-untyped-call]
        self._opt.step()
        with torch.no_grad():
            self.w.clamp_(min=1e-3)
            self.w.mul_(len(TASKS) / self.w.sum())


BALANCERS = ("dwa", "uncertainty", "gradnorm", "fixed")


def make_balancer(
    name: str,
    *,
    device: torch.device,
    shared: nn.Parameter,
    fixed_weights: Sequence[float] = (1.0, 1.0),
) -> Balancer:
    if name == "fixed":
        return Fixed(*fixed_weights)
    if name == "dwa":
        return DWA()
    if name == "uncertainty":
        return Uncertainty(device)
    if name == "gradnorm":
        return GradNorm(shared)
    raise UnknownName("balancer", name, BALANCERS)
