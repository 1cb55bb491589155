"""Unlearning-step throughput against a plain training loop on the same model and device.

BENCHMARKS.md §3: samples per second of one feature-constraint step (forget batch through the
student and MSE to cached teacher features, recovery batch through the student with CE, one
backward, one optimiser step) versus a plain PyTorch training step over the same number of
samples. Both run with the same autocast (bf16 on CUDA) and memory format (channels-last on
CUDA), on synthetic 32x32 data already on the device, so only the step itself is timed.

`measure_loops` times the shipped loops instead: the method's `run` against `train_model`.
The gap between the two comparisons is what the real loop adds around the step.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.archs import build_model
from engine.datasets import TEST, TRAIN, Dataset
from engine.methods.base import UnlearnContext
from engine.methods.feature_constraint import FeatureConstraint
from engine.runtime import DeviceData, autocast, pick_device
from engine.training import Recipe, train_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Any, n: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return time.perf_counter() - start


def measure(
    *,
    arch: str = "resnet18",
    batch_size: int = 256,
    steps: int = 20,
    repeats: int = 5,
    device: str | None = None,
    num_classes: int = 10,
) -> dict[str, Any]:
    """Median samples/s of a plain training step and of an unlearning step, and their ratio.

    The unlearning step processes `batch_size` samples: half forget, half recovery, so both
    loops push the same number of samples through forward and backward per step.
    """
    dev = pick_device(device)
    shape = (3, 32, 32)
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(batch_size, *shape, generator=gen).to(dev).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = build_model(arch, num_classes, shape, seed=0).to(dev).to(memory_format=fmt)
        model.train()
        return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    plain_model, plain_opt = fresh()

    def plain_step() -> None:
        with autocast(dev):
            loss = nn.functional.cross_entropy(plain_model(x), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        plain_opt.step()

    student, opt = fresh()
    teacher = build_model(arch, num_classes, shape, seed=1).to(dev).to(memory_format=fmt).eval()
    half = batch_size // 2
    with torch.no_grad(), autocast(dev):
        target = teacher.features(x[:half]).float()

    def unlearn_step() -> None:
        with autocast(dev):
            feats = student.features(x)  # type: ignore[operator]
            forget_feats, recover_feats = torch.split(feats, [half, batch_size - half])
            loss = nn.functional.mse_loss(forget_feats.float(), target) + nn.functional.cross_entropy(
                student.head(recover_feats).float(), y[half:])  # type: ignore[operator]
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    for step in (plain_step, unlearn_step):  # warm-up: kernels, allocator, autotuning
        _timed(step, 3, dev)
    plain, unlearn = [], []
    for _ in range(repeats):  # interleaved, so drift in the machine hits both alike
        plain.append(batch_size * steps / _timed(plain_step, steps, dev))
        unlearn.append(batch_size * steps / _timed(unlearn_step, steps, dev))
    p, u = statistics.median(plain), statistics.median(unlearn)
    return {
        "arch": arch, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch_size": batch_size, "steps": steps, "repeats": repeats,
        "plain_samples_per_s": p, "unlearn_samples_per_s": u, "ratio": u / p,
    }


def _synthetic(n_train: int, n_test: int, num_classes: int, seed: int = 0) -> Dataset:
    """Random 3x32x32 uint8 images with random labels: shapes and sizes are all that matter."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    return Dataset(
        name="synthetic",
        ids=np.asarray([f"s{i}" for i in range(n)]),
        labels=rng.integers(0, num_classes, n).astype(np.int64),
        splits=np.asarray([TRAIN] * n_train + [TEST] * n_test),
        images=rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
        num_classes=num_classes,
    )


def measure_loops(
    *,
    arch: str = "resnet18",
    n_train: int = 12_800,
    forget: int = 2_560,
    passes: float = 5.0,
    repeats: int = 3,
    device: str | None = None,
    num_classes: int = 10,
) -> dict[str, Any]:
    """Samples/s of the shipped loops, end to end: `FeatureConstraint.run` (stopping rule off,
    so it runs `passes` full passes over the forget set) against `train_model` for one epoch
    at the same samples per step (forget batch + recovery batch).

    Unlike `measure`, this counts everything the real code does per step (batch gathering,
    the forget monitor's host reads, the balancer) and its set-up (teacher features, the
    attack threshold). Repeats are interleaved; medians are reported.
    """
    dev = pick_device(device)
    data = DeviceData(_synthetic(n_train, 1_024, num_classes), dev)
    train_idx = data.dataset.train_indices
    method_impl = FeatureConstraint(early_stop=False, max_epochs=passes)
    cfg = method_impl.config
    per_step = cfg.forget_batch_size + cfg.batch_size
    recipe = Recipe(epochs=1, batch_size=per_step, seed=0)
    original = build_model(arch, num_classes, data.dataset.input_shape, seed=0).to(dev).eval()
    if dev.type == "cuda":
        original.to(memory_format=torch.channels_last)
    for p in original.parameters():
        p.requires_grad_(False)

    def plain() -> tuple[int, float]:
        _sync(dev)
        start = time.perf_counter()
        _, steps = train_model(arch, num_classes, data, train_idx, recipe)
        _sync(dev)
        return steps * per_step, time.perf_counter() - start

    def method() -> tuple[int, float]:
        ctx = UnlearnContext(
            arch=arch, num_classes=num_classes, data=data, original=original,
            forget_idx=train_idx[:forget], retain_idx=train_idx[forget:],
            heldout_idx=data.dataset.calibration_indices, recipe=recipe, teacher_seed=1, seed=0,
        )
        _sync(dev)
        start = time.perf_counter()
        out = method_impl.run(ctx)
        _sync(dev)
        return out.steps * per_step, time.perf_counter() - start

    plain(), method()  # warm-up: kernels, allocator, autotuning
    p_rates, m_rates, steps = [], [], 0
    for _ in range(repeats):
        n, s = plain()
        p_rates.append(n / s)
        n, s = method()
        m_rates.append(n / s)
        steps = n // per_step
    plain_rate, method_rate = statistics.median(p_rates), statistics.median(m_rates)
    return {
        "arch": arch, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "samples_per_step": per_step, "method_steps": steps, "repeats": repeats,
        "plain_loop_samples_per_s": plain_rate, "method_loop_samples_per_s": method_rate,
        "ratio": method_rate / plain_rate,
    }
