"""Job-level entry points: what a worker calls for a train, an unlearn or a reference job.

Everything here speaks in sample IDs, file paths and bytes, so the caller needs to know
nothing about tensors: `run_train` makes version 1 (or a retrained version) from a recipe,
`run_unlearn` makes the next version from a stored checkpoint. Both return a `JobOutput`
holding the new weights as a safetensors file and the verification evidence (metrics on the
`audit` split). `run_reference` trains K reference models for a registered model and returns
only their statistics (`ReferenceOutput.stats`, the bytes of a `.npz` file the service keeps
in its model store and hands back to `run_unlearn(reference_stats=...)`).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engine.archs import build_model
from engine.checkpoint import load_model, state_to_bytes
from engine.datasets import Dataset, DatasetSpec, load_dataset
from engine.errors import InvalidInput
from engine.evidence import ALPHA, ReferenceStats, load_reference_stats
from engine.methods import DEFAULT_METHOD
from engine.metrics import infer, retain_sample, verification_metrics
from engine.model_desc import ModelDescription, is_library_arch
from engine.references import DEFAULT_K, train_references
from engine.runtime import CancelFn, DeviceData, Progress, ProgressFn, Reporter, pick_device
from engine.training import Recipe, train_model
from engine.unlearning import unlearn

__all__ = ["JobOutput", "ModelSpec", "Progress", "Recipe", "ReferenceOutput", "run_import",
           "run_reference", "run_train", "run_unlearn"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its architecture, label count, dataset and training recipe."""

    arch: str
    num_classes: int
    dataset: DatasetSpec
    recipe: Recipe = field(default_factory=Recipe)
    # Input size and preprocessing (stored at registration); None: the library's defaults for
    # a `timm:`/`torchvision:` model, the dataset's images as they are for a built-in.
    description: ModelDescription | None = None


@dataclass
class JobOutput:
    """What a job produced: new weights (safetensors bytes) and the evidence about them."""

    weights: bytes
    metrics: dict[str, Any]
    method: str
    method_config: dict[str, Any]
    teacher_seed: int | None
    seconds: float
    steps: int
    device: str
    history: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    gaps: dict[str, float] | None = None
    evidence: dict[str, Any] | None = None


@dataclass
class ReferenceOutput:
    """What a reference job produced: statistics only (no weights) and what they cost."""

    stats: bytes
    k: int
    seconds: float
    seconds_per_reference: list[float]
    steps: int
    device: str
    pool_size: int
    summary: dict[str, Any]


@functools.lru_cache(maxsize=4)
def _dataset(kind: str, uri: str, options_json: str) -> Dataset:
    return load_dataset(DatasetSpec(kind, uri, json.loads(options_json)), kind)


def cached_dataset(spec: DatasetSpec) -> Dataset:
    """Load a dataset once per process (workers run many jobs on the same data)."""
    return _dataset(spec.kind, spec.uri, json.dumps(spec.options, sort_keys=True))


def _check_model(spec: ModelSpec, ds: Dataset) -> None:
    if spec.num_classes < int(ds.labels.max()) + 1:
        raise InvalidInput(
            f"the dataset has labels up to {int(ds.labels.max())} but the model has "
            f"{spec.num_classes} classes"
        )


def model_description(spec: ModelSpec) -> ModelDescription | None:
    """The description jobs use: the stored one, else the library's defaults (built-ins: None)."""
    if spec.description is not None:
        return spec.description
    if is_library_arch(spec.arch):
        from engine.library_models import describe_model

        return describe_model(spec.arch, spec.num_classes)
    return None


def device_data(spec: ModelSpec, ds: Dataset, device: str | None) -> DeviceData:
    """The dataset as model-ready batches: in memory or streamed from disk, per the dataset."""
    return DeviceData(ds, pick_device(device), model_description(spec))


def _forget_indices(
    ds: Dataset, forget_ids: Sequence[str], forgotten_ids: Iterable[str]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    forget = np.unique(ds.deletable_indices(forget_ids))
    tombstones = set(forgotten_ids) | set(forget_ids)
    return forget, ds.retain_pool(tombstones)


def run_train(
    spec: ModelSpec,
    *,
    exclude_ids: Iterable[str] = (),
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    device: str | None = None,
) -> JobOutput:
    """Train `spec` from its recipe on the training split minus `exclude_ids`."""
    reporter = Reporter(on_progress, should_cancel)
    reporter.report(Progress("loading", 0, 0), force=True)
    ds = cached_dataset(spec.dataset)
    _check_model(spec, ds)
    data = device_data(spec, ds, device)
    train_idx = ds.retain_pool(exclude_ids)
    start = time.perf_counter()
    model, steps = train_model(spec.arch, spec.num_classes, data, train_idx, spec.recipe,
                               reporter=reporter)
    seconds = time.perf_counter() - start
    reporter.report(Progress("verifying", steps, steps), force=True)
    metrics: dict[str, Any] = {
        "acc_retain": float(infer(model, data, train_idx).correct().mean()),
        "acc_test": float(infer(model, data, ds.audit_indices).correct().mean())
        if len(ds.audit_indices) else float("nan"),
        "seconds": seconds,
        "steps": steps,
        "device": str(data.device),
    }
    return JobOutput(
        weights=state_to_bytes(model), metrics=metrics, method="train",
        method_config={"recipe": spec.recipe.to_dict()}, teacher_seed=None,
        seconds=seconds, steps=steps, device=str(data.device),
    )


def run_unlearn(
    spec: ModelSpec,
    *,
    checkpoint: Path | str | bytes,
    forget_ids: Sequence[str],
    forgotten_ids: Iterable[str],
    method: str = DEFAULT_METHOD,
    options: dict[str, Any] | None = None,
    verify: str = "standard",
    seed: int = 0,
    teacher_seed: int | None = None,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    device: str | None = None,
    reference_stats: ReferenceStats | bytes | Path | str | None = None,
    alpha: float = ALPHA,
) -> JobOutput:
    """Make the checkpoint forget `forget_ids`. `forgotten_ids` are every tombstone of the
    lineage (they never come back through recovery); the job's own IDs are added to them.

    `reference_stats` (the bytes or path of `run_reference`'s statistics of this model's
    lineage) enables the per-sample forgetting test in `JobOutput.evidence`; without them the
    evidence says `references.status = "pending"` and holds only the accuracy parts."""
    reporter = Reporter(on_progress, should_cancel)
    reporter.report(Progress("loading", 0, 0), force=True)
    ds = cached_dataset(spec.dataset)
    _check_model(spec, ds)
    data = device_data(spec, ds, device)
    forget_idx, retain_idx = _forget_indices(ds, forget_ids, forgotten_ids)
    original = load_model(spec.arch, spec.num_classes, data.dataset.input_shape, checkpoint,
                          device=data.device)
    stats = None if reference_stats is None else load_reference_stats(reference_stats)
    t_seed = seed if teacher_seed is None else teacher_seed
    try:
        result = unlearn(
            original, arch=spec.arch, num_classes=spec.num_classes, data=data,
            forget_idx=forget_idx, retain_idx=retain_idx, recipe=spec.recipe, method=method,
            options=options, teacher_seed=t_seed, seed=seed, verify=verify, reporter=reporter,
            reference_stats=stats, alpha=alpha,
        )
    finally:
        data.close()
    return JobOutput(
        weights=state_to_bytes(result.model), metrics=result.metrics, method=result.method,
        method_config=result.method_config, teacher_seed=t_seed, seconds=result.seconds,
        steps=result.steps, device=str(data.device), history=result.history,
        reference=result.reference, gaps=result.gaps, evidence=result.evidence,
    )


def run_reference(
    spec: ModelSpec,
    *,
    k: int = DEFAULT_K,
    exclude_ids: Iterable[str] = (),
    seed: int = 0,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    device: str | None = None,
) -> ReferenceOutput:
    """Train `k` reference models with `spec.recipe` on balanced random halves of the model's
    training pool (the training split minus `exclude_ids`, as `run_train` used it) and return
    their OUT statistics for every sample of the dataset. No weights are kept.

    The statistics stay valid for the model's whole lineage (a model that never saw a sample
    still never saw it after later deletions); recompute them for a new base model (another
    recipe, dataset index or architecture). Progress phase: `training`, steps over all K."""
    reporter = Reporter(on_progress, should_cancel)
    reporter.report(Progress("loading", 0, 0), force=True)
    ds = cached_dataset(spec.dataset)
    _check_model(spec, ds)
    data = device_data(spec, ds, device)
    pool = ds.retain_pool(exclude_ids)
    try:
        stats = train_references(spec.arch, spec.num_classes, data, pool, spec.recipe, k=k,
                                 seed=seed, reporter=reporter)
    finally:
        data.close()
    meta = stats.meta
    reporter.report(Progress("verifying", meta["steps"], meta["steps"]), force=True)
    return ReferenceOutput(
        stats=stats.to_bytes(), k=k, seconds=float(meta["seconds"]),
        seconds_per_reference=list(meta["seconds_per_reference"]), steps=int(meta["steps"]),
        device=str(data.device), pool_size=len(pool),
        summary={key: meta[key] for key in ("k", "seed", "pool_size", "seconds", "steps",
                                            "device", "fingerprint", "reference_seeds")},
    )


def evaluate_checkpoint(
    spec: ModelSpec,
    checkpoint: Path | str | bytes,
    *,
    forget_ids: Sequence[str],
    forgotten_ids: Iterable[str] = (),
    teacher_seed: int = 0,
    original: Path | str | bytes | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Recompute the verification metrics of a stored checkpoint (e.g. a downloaded one)."""
    ds = cached_dataset(spec.dataset)
    data = device_data(spec, ds, device)
    shape = data.dataset.input_shape
    forget_idx, retain_idx = _forget_indices(ds, forget_ids, forgotten_ids)
    model = load_model(spec.arch, spec.num_classes, shape, checkpoint, device=data.device)
    base = (load_model(spec.arch, spec.num_classes, shape, original, device=data.device)
            if original is not None else model)
    teacher = build_model(spec.arch, spec.num_classes, shape, seed=teacher_seed)
    with torch.no_grad():
        return verification_metrics(
            model, original=base, teacher=teacher.to(data.device).eval(), data=data,
            forget_idx=forget_idx, retain_idx=retain_idx, test_idx=ds.audit_indices,
        )


def run_import(
    spec: ModelSpec,
    checkpoint: Path | str | bytes,
    *,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    device: str | None = None,
) -> JobOutput:
    """Check an uploaded checkpoint on a worker and make it version 1.

    Builds the architecture (random weights, nothing downloaded), loads the safetensors file
    strictly (never unpickled; `InvalidCheckpoint`/`CheckpointMismatch` name what does not
    fit), checks that the model splits into features and head, then measures `acc_retain`
    and `acc_test`. The returned weights are the file re-saved with the model's own keys."""
    reporter = Reporter(on_progress, should_cancel)
    reporter.report(Progress("loading", 0, 0), force=True)
    ds = cached_dataset(spec.dataset)
    _check_model(spec, ds)
    desc = model_description(spec)
    data = device_data(spec, ds, device)
    try:
        shape = data.dataset.input_shape
        model = load_model(spec.arch, spec.num_classes, shape, checkpoint)
        if is_library_arch(spec.arch):
            from engine.library_models import check_split

            check_split(model, shape)
        model = model.to(data.device)
        reporter.report(Progress("verifying", 0, 0), force=True)
        start = time.perf_counter()
        probe = retain_sample(ds.train_indices, seed=0)
        metrics: dict[str, Any] = {
            "acc_retain": float(infer(model, data, probe).correct().mean())
            if len(probe) else float("nan"),
            "acc_test": float(infer(model, data, ds.audit_indices).correct().mean())
            if len(ds.audit_indices) else float("nan"),
        }
        reporter.check_cancel()
        seconds = time.perf_counter() - start
    finally:
        data.close()
    metrics.update(seconds=seconds, steps=0, device=str(data.device))
    config: dict[str, Any] = {"description": desc.to_dict()} if desc is not None else {}
    return JobOutput(
        weights=state_to_bytes(model), metrics=metrics, method="import", method_config=config,
        teacher_seed=None, seconds=seconds, steps=0, device=str(data.device),
    )
