"""Unlearning-step throughput against a plain training loop on the same model and device.

BENCHMARKS.md §3: samples per second of one feature-constraint step (forget batch through the
student and MSE to cached teacher features, recovery batch through the student with CE, one
backward, one optimiser step) versus a plain PyTorch training step over the same number of
samples. Both run with the same autocast (bf16 on CUDA) and memory format (channels-last on
CUDA), on synthetic 32x32 data already on the device, so only the step itself is timed.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from engine.archs import build_model
from engine.runtime import autocast, pick_device


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
