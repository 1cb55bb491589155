"""Where and how tensors run: device choice, autocast, data on device, progress and cancel hooks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from engine.datasets import Dataset
from engine.errors import Cancelled
from engine.model_desc import ModelDescription


def pick_device(preference: str | None = None) -> torch.device:
    """`preference` if given, else CUDA when present, else CPU."""
    if preference:
        return torch.device(preference)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (where it pays); full precision on CPU, where it does not."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class DeviceData:
    """A dataset as model-ready batches on one device: `batch(idx)` and `batches(idx, size)`.

    Constructing `DeviceData(dataset, device, description)` picks the implementation the
    dataset calls for: `InMemoryData` (the whole array moved to the device once; the fast path
    for small sets) or `engine.streaming.StreamedData` (images decoded from disk per batch in
    worker processes). Images come out as float32 in [0, 1], normalised with the model's
    preprocessing mean and std when the `description` has them.
    """

    dataset: Dataset
    device: torch.device

    def __new__(cls, dataset: Dataset, device: torch.device, *args: Any, **kwargs: Any) -> DeviceData:
        if cls is DeviceData:
            if dataset.images is None:
                from engine.streaming import StreamedData

                return super().__new__(StreamedData)
            return super().__new__(InMemoryData)
        return super().__new__(cls)

    def batch(self, idx: Tensor | npt.NDArray[np.int64]) -> tuple[Tensor, Tensor]:
        """Images and their labels for the given positions."""
        raise NotImplementedError

    def batches(self, idx: npt.NDArray[np.int64], size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Fixed-order batches over `idx` (for evaluation)."""
        for start in range(0, len(idx), size):
            yield self.batch(idx[start : start + size])

    def close(self) -> None:
        """Release worker processes, if any."""


def _normaliser(
    description: ModelDescription | None, channels: int, device: torch.device
) -> tuple[Tensor, Tensor] | None:
    if description is None or description.preprocessing.is_identity:
        return None
    prep = description.preprocessing
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=device)
    std = torch.tensor(prep.std, dtype=torch.float32, device=device)
    if len(prep.mean) == 1:
        mean, std = mean.expand(channels), std.expand(channels)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


class InMemoryData(DeviceData):
    """A dataset's images and labels moved to one device once, sliced by index per batch."""

    def __init__(
        self, dataset: Dataset, device: torch.device, description: ModelDescription | None = None
    ) -> None:
        if dataset.images is None:
            raise ValueError("this dataset's images are on disk; use StreamedData")
        self.dataset = dataset
        self.device = device
        self.images = torch.from_numpy(np.ascontiguousarray(dataset.images)).to(device)
        self.labels = torch.from_numpy(dataset.labels).to(device)
        self._scale = 255.0 if dataset.images.dtype == np.uint8 else 1.0
        self._norm = _normaliser(description, dataset.images.shape[1], device)
        if device.type == "cuda" and dataset.images.shape[1] == 3:
            self._memory_format = torch.channels_last
        else:
            self._memory_format = torch.contiguous_format

    def batch(self, idx: Tensor | npt.NDArray[np.int64]) -> tuple[Tensor, Tensor]:
        """Images scaled to [0, 1] (float32) and their labels for the given positions."""
        if not isinstance(idx, Tensor):
            idx = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        idx = idx.to(self.device)
        x = self.images.index_select(0, idx).float().div_(self._scale)
        if self._norm is not None:
            x = x.sub_(self._norm[0]).div_(self._norm[1])
        return x.contiguous(memory_format=self._memory_format), self.labels.index_select(0, idx)


class Sampler:
    """Endless shuffled mini-batches over a fixed index set, reproducible from a seed."""

    def __init__(self, idx: npt.NDArray[np.int64], batch_size: int, seed: int) -> None:
        if len(idx) == 0:
            raise ValueError("cannot sample batches from an empty index set")
        self.idx = np.asarray(idx, dtype=np.int64)
        self.batch_size = min(batch_size, len(self.idx))
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(self.idx)
        self._pos = 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.idx) // self.batch_size)

    def next(self) -> npt.NDArray[np.int64]:
        if self._pos >= len(self._order):
            self._order = self._rng.permutation(self.idx)
            self._pos = 0
        out = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return out


@dataclass(frozen=True)
class Progress:
    """One progress report: what the job is doing and how far along it is."""

    phase: str
    step: int
    total_steps: int
    losses: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


class Reporter:
    """Rate-limits progress callbacks and turns a cancel request into `Cancelled`."""

    def __init__(
        self,
        on_progress: ProgressFn | None,
        should_cancel: CancelFn | None,
        *,
        min_interval_s: float = 0.25,
    ) -> None:
        self._on_progress = on_progress
        self._should_cancel = should_cancel
        self._min_interval_s = min_interval_s
        self._last = 0.0
        self._last_phase = ""

    def check_cancel(self) -> None:
        if self._should_cancel is not None and self._should_cancel():
            raise Cancelled("the job was cancelled")

    def report(self, progress: Progress, *, force: bool = False) -> None:
        if self._on_progress is None:
            return
        now = time.monotonic()
        phase_changed = progress.phase != self._last_phase
        if force or phase_changed or now - self._last >= self._min_interval_s:
            self._last, self._last_phase = now, progress.phase
            self._on_progress(progress)

    def step(self, progress: Progress) -> None:
        """Called once per optimisation step: cancel check, then a throttled report."""
        self.check_cancel()
        self.report(progress)
