"""Torch-free validation of safetensors files: parse the header by hand, never unpickle.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`) and then the
raw tensor bytes. We refuse: pickles and zip archives (what `torch.save` writes), truncated
files, headers that do not parse or whose offsets do not tile the data exactly, dtypes a
classifier's state dict never holds, and, when an architecture is named, any key or shape
that differs from `engine.arch_shapes.param_shapes(arch, num_classes, (C, H, W))`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from engine.errors import InvalidCheckpoint

MAX_HEADER_BYTES = 100 * 1024 * 1024
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
INTEGER_KEYS_SUFFIX = "num_batches_tracked"
STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def canonical_key(name: str) -> str:
    """Strip the wrappers DataParallel and torch.compile add to state-dict keys."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _sniff_foreign(head: bytes) -> str | None:
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "a Python pickle"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save output)"
    return None


def read_header(f: BinaryIO, size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and check the header of a safetensors file of `size` bytes open at offset 0.

    Returns the tensors, the `__metadata__` strings and the data offset; raises
    `InvalidCheckpoint` with the reason for anything that is not a well-formed file.
    """
    head = f.read(8)
    foreign = _sniff_foreign(head)
    if foreign:
        raise InvalidCheckpoint(f"the file is {foreign}; only safetensors checkpoints are accepted")
    if len(head) < 8:
        raise InvalidCheckpoint("the file is too short to be safetensors")
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise InvalidCheckpoint("the safetensors header length is invalid or the file is truncated")
    raw = f.read(n)
    if len(raw) != n:
        raise InvalidCheckpoint("the file is truncated inside the safetensors header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpoint(f"the safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidCheckpoint("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidCheckpoint("__metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise InvalidCheckpoint(f"tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in ITEMSIZE:
            raise InvalidCheckpoint(f"tensor {name!r}: dtype {dtype!r} is not accepted")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InvalidCheckpoint(f"tensor {name!r}: invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise InvalidCheckpoint(
                f"tensor {name!r}: data offsets {offsets!r} out of range (truncated file?)"
            )
        if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[dtype]:
            raise InvalidCheckpoint(f"tensor {name!r}: byte length does not match dtype and shape")
        tensors[name] = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != cursor:
            raise InvalidCheckpoint("tensor data overlaps or leaves gaps")
        cursor = info.end
    if cursor != data_len:
        raise InvalidCheckpoint(
            f"the file holds {data_len} data bytes but its tensors cover {cursor} (truncated?)"
        )
    return tensors, metadata, 8 + n


def check_against_architecture(
    tensors: Mapping[str, TensorInfo],
    arch: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
) -> None:
    """Refuse any missing, unexpected or mis-shaped tensor, or an integer-typed parameter."""
    from engine.arch_shapes import param_shapes

    expected = param_shapes(arch, num_classes, tuple(input_shape))  # type: ignore[arg-type]
    got = {canonical_key(k): v for k, v in tensors.items()}
    if len(got) != len(tensors):
        raise InvalidCheckpoint("two tensors have the same name once prefixes are stripped")
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
        raise InvalidCheckpoint(f"keys do not match architecture {arch!r}: " + "; ".join(parts))
    for name, info in sorted(got.items()):
        if tuple(expected[name]) != info.shape:
            raise InvalidCheckpoint(
                f"tensor {name!r} has shape {list(info.shape)}, "
                f"architecture {arch!r} needs {list(expected[name])}"
            )
        if name.endswith(INTEGER_KEYS_SUFFIX):
            if info.dtype != "I64":
                raise InvalidCheckpoint(f"tensor {name!r} must be I64, got {info.dtype}")
        elif info.dtype not in FLOAT_DTYPES:
            raise InvalidCheckpoint(f"tensor {name!r} must be floating point, got {info.dtype}")


def validate_safetensors(
    f: BinaryIO,
    size: int,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> dict[str, TensorInfo]:
    """Check a safetensors file (open at offset 0) and, given a built-in `arch`, its keys and
    shapes."""
    from engine.model_desc import is_library_arch

    tensors, _, _ = read_header(f, size)
    if not tensors:
        raise InvalidCheckpoint("the checkpoint holds no tensors")
    # A timm/torchvision model's keys and shapes are known only by building it (torch): the
    # import job loads such a file strictly on a worker instead.
    if arch is not None and not is_library_arch(arch):
        if num_classes is None or input_shape is None:
            raise ValueError("num_classes and input_shape are needed with arch")
        check_against_architecture(tensors, arch, num_classes, input_shape)
    return tensors
