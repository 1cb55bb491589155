"""Checkpoints as safetensors: bytes in, bytes out, never unpickled.

`module.` (DataParallel) and `_orig_mod.` (torch.compile) prefixes are stripped on save and
load, and a `model.` prefix that every key shares (a training wrapper's attribute) on load, so a
checkpoint names parameters exactly as `engine.arch_shapes` does, or, for a `timm:`/
`torchvision:` model, exactly as the library model's own `state_dict()` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from engine.archs import Classifier, build_model
from engine.errors import CheckpointMismatch, InvalidCheckpoint, listing

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
    if isinstance(model_or_state, Classifier):
        model_or_state = model_or_state.checkpoint_module()
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return st_save(clean_state(state))


def _strip_wrappers(state: dict[str, Tensor], shared: str = "model.") -> dict[str, Tensor]:
    """`clean_state`, and a `model.` prefix that every key carries, in any nesting order."""
    while True:
        state = clean_state(state)
        if not state or not all(k.startswith(shared) for k in state):
            return state
        state = {k[len(shared):]: v for k, v in state.items()}


def non_finite(state: Mapping[str, Tensor]) -> list[str]:
    """Names (sorted) of the floating-point tensors of `state` holding NaN or inf."""
    return sorted(k for k, t in state.items()
                  if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def load_strict(module: nn.Module, state: dict[str, Tensor], arch: str) -> None:
    """Load `state` into `module` strictly; a mismatch names every missing, unexpected and
    mis-shaped tensor."""
    expected = module.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    mismatched = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(arch, missing=missing, unexpected=unexpected, mismatched=mismatched)
    broken = non_finite(state)
    if broken:
        raise InvalidCheckpoint(f"checkpoint holds NaN or infinite values in {len(broken)} "
                                f"tensors: {listing(broken)}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidCheckpoint(f"checkpoint does not fit {arch}: {exc}") from exc


def bytes_to_state(data: bytes) -> dict[str, Tensor]:
    """Tensors of a safetensors file; a pickle (`torch.save`, whatever its name) is refused
    unread: unpickling runs code (CVE-2025-32434)."""
    try:
        return clean_state(st_load(data))
    except (SafetensorError, ValueError) as exc:
        if data[:1] == b"\x80" or data[:2] == b"PK":  # a pickle, or torch.save's zip of pickles
            raise InvalidCheckpoint("a pickled (torch.save) file, which is never loaded; save the "
                                    "weights with safetensors.torch.save_file") from exc
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
    state = _strip_wrappers(bytes_to_state(data))
    model = build_model(arch, num_classes, input_shape)
    load_strict(model.checkpoint_module(), state, arch)
    model.eval()
    return model.to(device) if device is not None else model
