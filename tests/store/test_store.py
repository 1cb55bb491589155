"""The checkpoint store: atomic content-addressed writes and torch-free validation."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.errors import InvalidCheckpoint, UnknownName
from models_store import Store, validate_safetensors

ARCH = {"name": "small_cnn", "num_classes": 4, "input_shape": [1, 28, 28]}


def _files(root: Path) -> list[str]:
    """Every file of the store outside its scratch area."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".incoming" not in p.parts
    )


def _scratch(root: Path) -> list[str]:
    incoming = root / ".incoming"
    return sorted(p.name for p in incoming.iterdir()) if incoming.exists() else []


def test_put_writes_checkpoint_and_manifest_named_by_digest(tmp_path: Path, make_checkpoint: Any) -> None:
    data = make_checkpoint()
    store = Store(tmp_path)
    stored = store.put("m", data, {"architecture": ARCH, "version": 1})
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size_bytes == len(data)
    assert stored.path == store.path_for("m", stored.sha256)
    assert stored.path.read_bytes() == data
    manifest = json.loads(stored.manifest_path.read_bytes())
    assert manifest["sha256"] == stored.sha256 and manifest["size_bytes"] == len(data)
    assert manifest["version"] == 1
    assert (
        stored.manifest_path.name == hashlib.sha256(stored.manifest_path.read_bytes()).hexdigest() + ".json"
    )
    assert not [f for f in _files(tmp_path) if ".tmp-" in f] and _scratch(tmp_path) == []
    assert store.verify("m", stored.sha256)


def test_same_content_is_never_rewritten(tmp_path: Path, make_checkpoint: Any) -> None:
    store = Store(tmp_path)
    data = make_checkpoint()
    first = store.put("m", data, {"architecture": ARCH})
    mtime = first.path.stat().st_mtime_ns
    second = store.put("m", data, {"architecture": ARCH})
    assert second.path == first.path and second.manifest_path == first.manifest_path
    assert first.path.stat().st_mtime_ns == mtime
    third = store.put("m", data, {"architecture": ARCH, "version": 2})
    assert third.manifest_path != first.manifest_path
    assert len([f for f in _files(tmp_path) if f.endswith(".safetensors")]) == 1


def _refused(store: Store, data: bytes, match: str, arch: dict[str, Any] = ARCH) -> None:
    with pytest.raises(InvalidCheckpoint, match=match):
        store.put("m", data, {"architecture": arch})
    assert _files(store.root) == [] if store.root.exists() else True


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: pickle.dumps({"conv1.weight": [1.0]}), "pickle"),
        (lambda d: b"PK\x03\x04" + d[4:], "zip"),
        (lambda d: d[: len(d) - 10], "truncated|cover"),
        (lambda d: d[:6], "too short"),
        (lambda d: struct.pack("<Q", 10**12) + d[8:], "header length"),
        (lambda d: struct.pack("<Q", 5) + b"{nope" + d[13:], "not JSON"),
    ],
    ids=["pickle", "torch-zip", "truncated-data", "truncated-header", "huge-header", "bad-json"],
)
def test_malformed_files_are_refused_and_nothing_is_left(
    tmp_path: Path, make_checkpoint: Any, mutate: Any, match: str
) -> None:
    store = Store(tmp_path / "store")
    _refused(store, mutate(make_checkpoint()), match)
    leftovers = _files(store.root) if store.root.exists() else []
    assert leftovers == [] and _scratch(store.root) == []


def test_shape_key_and_dtype_mismatches_are_refused(tmp_path: Path, make_checkpoint: Any) -> None:
    store = Store(tmp_path / "store")
    _refused(store, make_checkpoint(num_classes=10), "head.weight|shape")
    _refused(store, make_checkpoint(input_shape=(3, 32, 32)), "shape")
    _refused(store, make_checkpoint(arch="resnet18", input_shape=(1, 28, 28)), "keys do not match")
    _refused(store, make_checkpoint(dtype=np.int32), "dtype")
    _refused(store, make_checkpoint(dtype=np.int64), "floating point")
    with pytest.raises(UnknownName):
        store.put("m", make_checkpoint(), {"architecture": {**ARCH, "name": "vgg99"}})
    assert not store.root.exists() or not [f for f in _files(store.root) if f]


def test_wrapper_prefixes_are_accepted(tmp_path: Path, make_checkpoint: Any) -> None:
    data = make_checkpoint(prefix="module._orig_mod.")
    stored = Store(tmp_path).put("m", data, {"architecture": ARCH})
    assert stored.size_bytes == len(data)


def test_resnet18_with_batchnorm_counters_validates(make_checkpoint: Any) -> None:
    data = make_checkpoint(arch="resnet18", num_classes=10, input_shape=(3, 32, 32))
    tensors = validate_safetensors(
        io.BytesIO(data), len(data), arch="resnet18", num_classes=10, input_shape=(3, 32, 32)
    )
    assert tensors["body.bn1.num_batches_tracked"].dtype == "I64"
    assert tensors["head.weight"].shape == (10, 512)


def test_overlapping_offsets_are_refused(make_checkpoint: Any) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * 12
    with pytest.raises(InvalidCheckpoint, match="overlaps"):
        validate_safetensors(io.BytesIO(data), len(data))


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 101, "a\\b", "a..b"])
def test_unsafe_model_names_are_refused(tmp_path: Path, make_checkpoint: Any, name: str) -> None:
    with pytest.raises(ValueError):
        Store(tmp_path).put(name, make_checkpoint(), {"architecture": ARCH})
    assert _files(tmp_path) == []


def test_resolve_refuses_paths_outside_the_root(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(ValueError):
        store.resolve("../../etc/passwd")
    with pytest.raises(ValueError):
        store.resolve("/etc/passwd")


def test_iter_range_streams_exact_bytes(tmp_path: Path, make_checkpoint: Any) -> None:
    store = Store(tmp_path)
    data = make_checkpoint()
    stored = store.put("m", data, {"architecture": ARCH})
    assert b"".join(store.iter_range(stored.path, 0, len(data) - 1, chunk=1000)) == data
    assert b"".join(store.iter_range(stored.path, 100, 199, chunk=7)) == data[100:200]


def test_clean_temp_removes_only_old_temp_files(tmp_path: Path, make_checkpoint: Any) -> None:
    import os
    import time

    store = Store(tmp_path)
    stored = store.put("m", make_checkpoint(), {"architecture": ARCH})
    old = tmp_path / ".incoming" / ".tmp-old"
    new = tmp_path / ".incoming" / ".tmp-new"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert store.clean_temp(3600) == 1
    assert not old.exists() and new.exists() and stored.path.exists()


def test_clean_temp_removes_a_killed_writers_scratch_file_at_once(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-copy leaves its scratch file; the next `clean_temp` in the same
    PID namespace removes it at once, without waiting for it to age."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "store"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from models_store import Store; "
         f"Store({str(root)!r}).put_file('m', sys.stdin.buffer, {{}})"],
        stdin=subprocess.PIPE,
    )
    assert writer.stdin is not None
    writer.stdin.write(b"x" * 4096)
    writer.stdin.flush()
    deadline = time.monotonic() + 60
    while not _scratch(root) and time.monotonic() < deadline:
        time.sleep(0.01)
    (left,) = _scratch(root)
    assert f"-{writer.pid}-" in left
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    writer.stdin.close()

    store = Store(root)
    mine = store._scratch()  # a live writer's file (this process)
    mine.write_bytes(b"y")
    foreign = root / ".incoming" / ".tmp-0123456789abcdef-1-00ff00ff00ff00ff"  # another host
    foreign.write_bytes(b"z")
    assert store.clean_temp(3600) == 1
    assert _scratch(root) == sorted([mine.name, foreign.name])
    past = time.time() - 7200
    os.utime(foreign, (past, past))  # nobody wrote it for two hours: abandoned
    assert store.clean_temp(3600) == 1 and _scratch(root) == [mine.name]
