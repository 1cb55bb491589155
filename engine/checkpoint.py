"""Checkpoints as safetensors: bytes in, bytes out, never unpickled.

`module.` (DataParallel) and `_orig_mod.` (torch.compile) prefixes are stripped on save and
load, so a checkpoint names parameters exactly as `engine.arch_shapes` does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from engine.archs import Classifier, build_model
from engine.errors import InvalidCheckpoint

_PREFIXES = ("module.", "_orig_mod.")


def clean_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes; contiguous CPU tensors, as safetensors requires."""
    out = {}
    for name, tensor in state.items():
        key = name
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def state_to_bytes(model_or_state: nn.Module | dict[str, Tensor]) -> bytes:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return st_save(clean_state(state))


def bytes_to_state(data: bytes) -> dict[str, Tensor]:
    try:
        return clean_state(st_load(data))
    except (SafetensorError, ValueError) as exc:
        raise InvalidCheckpoint(f"not a readable safetensors file: {exc}") from exc


def load_model(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    source: bytes | Path | str,
    *,
    device: torch.device | None = None,
) -> Classifier:
    """Build `arch` and load weights strictly: every tensor present, nothing extra, same shapes."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    state = bytes_to_state(data)
    model = build_model(arch, num_classes, input_shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidCheckpoint(f"checkpoint does not fit {arch}: {exc}") from exc
    model.eval()
    return model.to(device) if device is not None else model
