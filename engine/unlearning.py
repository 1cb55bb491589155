"""The engine's main entry point: run one unlearning method, then verify what it produced.

Held-out data is used in two halves (`engine.datasets`): the method's context carries only
`calibration` samples as `heldout_idx` (its stopping rule and checkpoint selection read them);
every metric and the deletion evidence are computed on `audit` samples, which no method sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engine.archs import Classifier
from engine.checkpoint import non_finite
from engine.errors import InvalidInput, NonFiniteOutputs, UnlearningDiverged, listing
from engine.evidence import ALPHA, ReferenceStats
from engine.methods import DEFAULT_METHOD, UnlearnContext, make_method
from engine.metrics import gaps, infer, retain_sample, verification_metrics
from engine.references import build_evidence
from engine.runtime import DeviceData, Progress, Reporter
from engine.training import Recipe

VERIFY_MODES = ("standard", "retrain")


@dataclass
class UnlearnResult:
    """The unlearned model with its verification evidence."""

    model: Classifier
    metrics: dict[str, Any]
    method: str
    method_config: dict[str, Any]
    teacher_seed: int
    history: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    gaps: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, Any] | None = None

    @property
    def seconds(self) -> float:
        return float(self.metrics["seconds"])

    @property
    def steps(self) -> int:
        return int(self.metrics["steps"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_partition(
    data: DeviceData, forget_idx: npt.NDArray[np.int64], retain_idx: npt.NDArray[np.int64]
) -> None:
    """Refuse impossible partitions: empty forget set, overlap, or non-training samples."""
    if len(forget_idx) == 0:
        raise InvalidInput("the forget set is empty")
    if len(retain_idx) == 0:
        raise InvalidInput("nothing would be left to retain")
    if np.intersect1d(forget_idx, retain_idx).size:
        raise InvalidInput("the retain pool contains samples of the forget set")
    splits = data.dataset.splits
    if (splits[forget_idx] != "train").any() or (splits[retain_idx] != "train").any():
        raise InvalidInput("forget and retain samples must come from the training split")


def unlearn(
    original: Classifier,
    *,
    arch: str,
    num_classes: int,
    data: DeviceData,
    forget_idx: npt.NDArray[np.int64],
    retain_idx: npt.NDArray[np.int64],
    recipe: Recipe,
    method: str = DEFAULT_METHOD,
    options: dict[str, Any] | None = None,
    teacher_seed: int = 0,
    seed: int = 0,
    verify: str = "standard",
    reporter: Reporter | None = None,
    metric_seed: int = 0,
    reference_stats: ReferenceStats | None = None,
    alpha: float = ALPHA,
) -> UnlearnResult:
    """Make `original` forget `forget_idx`; `retain_idx` must already exclude every sample
    the lineage ever forgot. Returns the new model, its metrics (DESIGN.md §2, on `audit`),
    its deletion evidence (`engine.references.build_evidence`; the per-sample test only with
    `reference_stats`) and, with `verify="retrain"`, a model retrained without the data as
    reference, the gaps to it and its forget flag rate (`evidence["retrained"]`).
    """
    if verify not in VERIFY_MODES:
        raise InvalidInput(f"verify must be one of {VERIFY_MODES}")
    check_partition(data, forget_idx, retain_idx)
    reporter = reporter or Reporter(None, None)
    impl = make_method(method, options)
    original = original.to(data.device).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    ctx = UnlearnContext(
        arch=arch, num_classes=num_classes, data=data, original=original,
        forget_idx=np.asarray(forget_idx, dtype=np.int64),
        retain_idx=np.asarray(retain_idx, dtype=np.int64),
        heldout_idx=data.dataset.calibration_indices, recipe=recipe,
        teacher_seed=teacher_seed, seed=seed, reporter=reporter, reference_stats=reference_stats,
    )
    bad = int((~torch.isfinite(infer(original, data, ctx.forget_idx).logits).all(1)).sum())
    if bad:
        raise NonFiniteOutputs(f"the base checkpoint gives NaN or infinite logits on {bad} of "
                               f"{len(ctx.forget_idx)} samples to forget; it cannot be unlearned "
                               f"or verified")
    _sync(data.device)
    start = time.perf_counter()
    out = impl.run(ctx)
    _sync(data.device)
    seconds = time.perf_counter() - start
    broken = non_finite(out.model.state_dict())
    if broken:
        raise UnlearningDiverged(method, f"NaN or infinite values in {len(broken)} tensors "
                                         f"({listing(broken)})")

    reporter.report(Progress("verifying", out.steps, out.steps), force=True)
    teacher = ctx.teacher()
    verify_kw: dict[str, Any] = dict(
        original=original, teacher=teacher, data=data, forget_idx=ctx.forget_idx,
        retain_idx=ctx.retain_idx, test_idx=data.dataset.audit_indices, seed=metric_seed,
    )
    try:
        metrics: dict[str, Any] = dict(verification_metrics(out.model, **verify_kw))
    except NonFiniteOutputs as exc:
        raise UnlearningDiverged(method, str(exc)) from exc
    metrics.update(seconds=seconds, steps=out.steps, device=str(data.device))
    evidence_kw: dict[str, Any] = dict(
        data=data, forget_idx=ctx.forget_idx, stats=reference_stats, alpha=alpha,
        retain_probe_size=len(retain_sample(ctx.retain_idx, metric_seed)), seed=metric_seed,
    )
    evidence = build_evidence(out.model, original, metrics=metrics, **evidence_kw)

    reference: dict[str, Any] | None = None
    gap: dict[str, float] | None = None
    if verify == "retrain":
        ref_ctx = UnlearnContext(**{**ctx.__dict__, "reporter": reporter, "_teacher": teacher})
        start = time.perf_counter()
        ref = make_method("retrain").run(ref_ctx)
        _sync(data.device)
        ref_seconds = time.perf_counter() - start
        reference = dict(verification_metrics(ref.model, **verify_kw))
        reference.update(seconds=ref_seconds, steps=ref.steps, device=str(data.device))
        gap = gaps(metrics, reference)
        if reference_stats is not None:
            ref_evidence = build_evidence(ref.model, original, metrics=reference, **evidence_kw)
            evidence["retrained"] = {k: ref_evidence[k] for k in
                                     ("forget", "control", "forget_vs_control_p")}
    return UnlearnResult(
        model=out.model, metrics=metrics, method=method, method_config=impl.config_dict(),
        teacher_seed=teacher_seed, history=out.history, reference=reference, gaps=gap,
        extra=out.extra, evidence=evidence,
    )
