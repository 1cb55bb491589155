"""Immutable, content-addressed checkpoint store: safetensors files plus JSON manifests.

Torch-free on purpose: the API validates uploads and serves downloads from here without
loading a model. See `store.py` for the on-disk layout and `safetensors_check.py` for the
validation rules.
"""

from models_store.safetensors_check import TensorInfo, validate_safetensors
from models_store.store import InvalidCheckpoint, Store, StoredCheckpoint

__all__ = ["InvalidCheckpoint", "Store", "StoredCheckpoint", "TensorInfo", "validate_safetensors"]
