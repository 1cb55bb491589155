"""Images streamed from disk: `StreamedData`, the `DeviceData` of a manifest dataset.

Only the index (IDs, labels, splits, relative paths) is in memory. Each `batch(idx)` hands the
positions to a DataLoader whose worker processes open the files with Pillow, resize and crop
them per the model's preprocessing and return uint8 arrays; the main process scales them to
[0, 1], normalises them on the device and drops them after the step. Memory is bounded by the
batch size and the prefetch depth, never by the dataset's size.

Workers are started once per `StreamedData` with the `spawn` method (a CUDA context must
never be forked) and kept for its lifetime. A daemonic process (which may not have children)
decodes in-process instead. A file that is missing or undecodable at job time raises
`UnreadableImages` naming its sample ID.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler as TorchSampler

from engine.datasets import Dataset
from engine.errors import UnreadableImages
from engine.manifest import ImageFiles, read_image
from engine.model_desc import ModelDescription
from engine.runtime import DeviceData, _normaliser

CHUNK = 32  # images per worker task: small enough to spread one training batch over workers


class _Files(TorchDataset[tuple[npt.NDArray[np.uint8], str]]):
    """Position -> (uint8 image, error text); picklable, so spawned workers receive it."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, pos: int) -> tuple[npt.NDArray[np.uint8], str]:
        f = self.files
        try:
            return read_image(f.path_of(pos), f.input_size, f.preprocessing), ""
        except FileNotFoundError:
            error = "file not found"
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this sample's problem
            error = f"{type(exc).__name__}: {exc}"
        return np.zeros(f.input_size, dtype=np.uint8), error


def _collate(items: Sequence[tuple[npt.NDArray[np.uint8], str]]) -> tuple[Tensor, list[str]]:
    return torch.from_numpy(np.stack([a for a, _ in items])), [e for _, e in items]


class _Plan(TorchSampler[list[int]]):
    """The chunks the next pass over the loader reads; set before each pass."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.chunks))

    def __len__(self) -> int:
        return len(self.chunks)


def default_workers(files: ImageFiles) -> int:
    if multiprocessing.current_process().daemon:
        return 0
    if files.workers is not None:
        return max(0, files.workers)
    return min(8, max(1, (os.cpu_count() or 2) - 1))


class StreamedData(DeviceData):
    """A manifest dataset read from disk batch by batch (see the module docstring)."""

    def __init__(
        self,
        dataset: Dataset,
        device: torch.device,
        description: ModelDescription | None = None,
        *,
        workers: int | None = None,
    ) -> None:
        if dataset.files is None:
            raise ValueError("this dataset has no image files to stream")
        if description is not None:
            # A view whose input_shape is the model's; the index arrays are shared, not copied.
            files = dataset.files.for_model(description)
            dataset = copy.copy(dataset)
            dataset.files = files
        assert dataset.files is not None
        self.dataset = dataset
        self.device = device
        self.labels = torch.from_numpy(dataset.labels).to(device)
        c = dataset.files.input_size[0]
        self._norm = _normaliser(description, c, device)
        if description is None and not dataset.files.preprocessing.is_identity:
            # A dataset-level preprocessing (manifest options) applies to built-in models.
            self._norm = _normaliser(
                ModelDescription("small_cnn", 2, c, dataset.files.input_size, dataset.files.preprocessing),
                c, device,
            )
        self._memory_format = (torch.channels_last if device.type == "cuda" and c == 3
                               else torch.contiguous_format)
        self.workers = default_workers(dataset.files) if workers is None else workers
        self._plan = _Plan()
        self._busy = False
        self._loader = self._make_loader(dataset.files)

    def _make_loader(self, files: ImageFiles) -> DataLoader[Any]:
        kwargs: dict[str, Any] = {}
        if self.workers > 0:
            kwargs = dict(
                multiprocessing_context="spawn", persistent_workers=True, prefetch_factor=2
            )
        return DataLoader(
            _Files(files), batch_sampler=self._plan, num_workers=self.workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda", **kwargs,
        )

    def _read(self, chunks: list[list[int]]) -> Iterator[Tensor]:
        """uint8 image batches for `chunks`, in order, read by the workers ahead of use.

        A read started while another is still being consumed (a batch inside a pass over
        `batches`) decodes in this process, leaving the workers' pass undisturbed."""
        if self._busy:
            files = _Files(self.dataset.files)  # type: ignore[arg-type]
            for chunk in chunks:
                yield self._checked(chunk, *_collate([files[p] for p in chunk]))
            return
        self._busy = True
        try:
            self._plan.chunks = chunks
            for chunk, (x, errors) in zip(chunks, self._loader, strict=True):
                yield self._checked(chunk, x, errors)
        finally:
            self._busy = False

    def _checked(self, chunk: list[int], x: Tensor, errors: list[str]) -> Tensor:
        if any(errors):
            ids = self.dataset.ids
            raise UnreadableImages({str(ids[p]): e for p, e in zip(chunk, errors, strict=True) if e})
        return x

    def _finish(self, parts: list[Tensor], idx: npt.NDArray[np.int64]) -> tuple[Tensor, Tensor]:
        x8 = parts[0] if len(parts) == 1 else torch.cat(parts)
        x = x8.to(self.device, non_blocking=True).float().div_(255.0)
        if self._norm is not None:
            x = x.sub_(self._norm[0]).div_(self._norm[1])
        pos = torch.from_numpy(idx).to(self.device)
        return x.contiguous(memory_format=self._memory_format), self.labels.index_select(0, pos)

    def _split(self, idx: npt.NDArray[np.int64]) -> list[list[int]]:
        n = len(idx)
        pieces = max(1, -(-n // CHUNK), min(self.workers, -(-n // 8)))
        return [a.tolist() for a in np.array_split(idx, pieces) if len(a)]

    def batch(self, idx: Tensor | npt.NDArray[np.int64]) -> tuple[Tensor, Tensor]:
        """Images (float32, normalised) and labels for `idx`, decoded by the workers in parallel."""
        arr = (idx.cpu().numpy() if isinstance(idx, Tensor) else np.asarray(idx)).astype(np.int64)
        return self._finish(list(self._read(self._split(arr))), arr)

    def batches(self, idx: npt.NDArray[np.int64], size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Fixed-order batches over `idx`, read ahead through one pass of the workers."""
        idx = np.asarray(idx, dtype=np.int64)
        groups = [idx[s : s + size] for s in range(0, len(idx), size)]
        plan = [self._split(g) for g in groups]
        stream = self._read([c for chunks in plan for c in chunks])
        for group, chunks in zip(groups, plan, strict=True):
            yield self._finish([next(stream) for _ in chunks], group)

    def close(self) -> None:
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader._iterator = None
