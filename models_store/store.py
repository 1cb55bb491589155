"""The on-disk store of published checkpoints.

Layout under the root (one shared volume in production):

    {root}/{model}/checkpoints/{sha256}.safetensors   the weights, named by their digest
    {root}/{model}/manifests/{sha256}.json            a manifest, named by its own digest
    {root}/{model}/references/{sha256}.npz            reference statistics (never weights)

Every file is written under `{root}/.incoming/` (same filesystem), fsynced, renamed into place
with `os.replace` and the directory fsynced; a name that already exists is never rewritten
(its content is, by construction, identical). A crash therefore leaves at most a scratch file
in `.incoming/`, never a partial file among the checkpoints, and the database row that makes a
version visible commits only after both files are durable.

A scratch file is named after its writer (`.tmp-{namespace}-{pid}-{random}`: the namespace
identifies the kernel boot and PID namespace, in which PIDs mean something), so `clean_temp`
removes a dead writer's leftovers as soon as a process of the same namespace looks, and any
leftover once it is old.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from engine.errors import InvalidCheckpoint
from models_store.safetensors_check import validate_safetensors

__all__ = ["InvalidCheckpoint", "Store", "StoredCheckpoint"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1024 * 1024
TMP_PREFIX = ".tmp-"
INCOMING = ".incoming"


@dataclass(frozen=True)
class StoredCheckpoint:
    """Where a stored checkpoint and its manifest live, and the checkpoint's digest and size."""

    path: Path
    manifest_path: Path
    sha256: str
    size_bytes: int


def _namespace_id() -> str:
    """This kernel boot and PID namespace (PIDs are comparable only within one), or "" where
    /proc does not tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return hashlib.sha256(f"{socket.gethostname()}/{boot}/{pid_ns}".encode()).hexdigest()[:16]


def _process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a killed writer nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def check_name(name: str) -> str:
    """Refuse model names that could escape the store (traversal, separators, dot files)."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"unsafe name {name!r}")
    return name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def canonical_json(obj: Any) -> bytes:
    """The byte encoding manifests are written and hashed in."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False).encode() + b"\n"


class Store:
    """A content-addressed, write-once checkpoint store rooted at `root`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self._namespace = _namespace_id()

    # -- paths ---------------------------------------------------------------------------
    def _dir(self, model: str, sub: str) -> Path:
        return self.root / check_name(model) / sub

    def path_for(self, model: str, sha256: str) -> Path:
        """The path a checkpoint with digest `sha256` has (or would have) in this store."""
        if not SHA_RE.fullmatch(sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return self._dir(model, "checkpoints") / f"{sha256}.safetensors"

    def resolve(self, stored_path: str | Path) -> Path:
        """An absolute path for a path recorded in the database; refuses paths outside root."""
        path = Path(stored_path)
        path = (path if path.is_absolute() else self.root / path).resolve()
        if self.root not in path.parents:
            raise ValueError("path is outside the store")
        return path

    def relative(self, path: Path) -> str:
        """The path relative to the store root, as recorded in the database."""
        return path.resolve().relative_to(self.root).as_posix()

    # -- writing -------------------------------------------------------------------------
    def _commit_temp(self, tmp: Path, final: Path) -> None:
        if final.exists():
            tmp.unlink()  # same content by construction; never rewrite a published file
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)

    def _scratch(self) -> Path:
        incoming = self.root / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        owner = f"{self._namespace}-{os.getpid()}-" if self._namespace else ""
        return incoming / f"{TMP_PREFIX}{owner}{secrets.token_hex(8)}"

    def _write_bytes(self, final: Path, data: bytes) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            return
        tmp = self._scratch()
        with tmp.open("xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._commit_temp(tmp, final)

    def put_reference_stats(self, model: str, data: bytes) -> tuple[Path, str]:
        """Store a model's reference statistics (`.npz` bytes, never weights) under
        `{model}/references/{sha256}.npz`, atomically (scratch file, fsync, rename); returns
        the path and the sha256. Content-addressed: the same bytes are written once."""
        sha = hashlib.sha256(data).hexdigest()
        final = self._dir(model, "references") / f"{sha}.npz"
        self._write_bytes(final, data)
        return final, sha

    def put(self, model: str, data: bytes, manifest: dict[str, Any]) -> StoredCheckpoint:
        """Store checkpoint bytes and their manifest; see `put_file`."""
        return self.put_file(model, io.BytesIO(data), manifest)

    def put_file(
        self,
        model: str,
        src: BinaryIO,
        manifest: dict[str, Any],
        *,
        max_bytes: int | None = None,
    ) -> StoredCheckpoint:
        """Copy a safetensors stream into the store, validate it, then write its manifest.

        The checkpoint is validated structurally and, when `manifest["architecture"]` names
        `name`, `num_classes` and `input_shape` (C, H, W), against that architecture's shapes. The
        manifest gets `sha256`, `size_bytes` and `file` filled in. Raises `InvalidCheckpoint`
        (nothing is left behind) or `ValueError` for an unsafe model name.
        """
        ck_dir = self._dir(model, "checkpoints")
        ck_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._scratch()
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("xb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise InvalidCheckpoint(f"the checkpoint exceeds {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            arch = manifest.get("architecture") or {}
            with tmp.open("rb") as f:
                validate_safetensors(
                    f,
                    size,
                    arch=arch.get("name"),
                    num_classes=arch.get("num_classes"),
                    input_shape=tuple(arch["input_shape"]) if arch.get("input_shape") else None,
                )
            sha = digest.hexdigest()
            final = self.path_for(model, sha)
            self._commit_temp(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        full = dict(manifest)
        full.update(sha256=sha, size_bytes=size, file=final.name, format="safetensors")
        body = canonical_json(full)
        manifest_path = self._dir(model, "manifests") / f"{hashlib.sha256(body).hexdigest()}.json"
        self._write_bytes(manifest_path, body)
        return StoredCheckpoint(final, manifest_path, sha, size)

    # -- reading -------------------------------------------------------------------------
    def open(self, model: str, sha256: str) -> BinaryIO:
        """Open a stored checkpoint for reading."""
        return self.path_for(model, sha256).open("rb")

    def read_manifest(self, path: str | Path) -> dict[str, Any]:
        """Load a manifest recorded in the database."""
        data: dict[str, Any] = json.loads(self.resolve(path).read_bytes())
        return data

    def iter_range(self, path: Path, start: int, end: int, chunk: int = CHUNK) -> Iterator[bytes]:
        """Yield bytes `start..end` (inclusive) of a file in constant memory."""
        with path.open("rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    break
                left -= len(block)
                yield block

    def verify(self, model: str, sha256: str) -> bool:
        """Re-hash a stored checkpoint and compare with its name."""
        h = hashlib.sha256()
        with self.open(model, sha256) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest() == sha256

    def clean_temp(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files crashed writers left behind; returns how many.

        A scratch file goes once it was last written more than `older_than_s` ago, and at once
        when its writer ran in this process's PID namespace and is gone.
        """
        if not self.root.exists():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for tmp in (self.root / INCOMING).glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                if self._abandoned(tmp, cutoff):
                    tmp.unlink()
                    removed += 1
        return removed

    def remove_unreferenced(
        self, model: str, keep: Iterable[str], subs: tuple[str, ...] = ("checkpoints", "manifests")
    ) -> int:
        """Delete `model`'s files under `subs` (checkpoint and manifest files by default;
        `("references",)` for reference statistics) whose store-relative path is not in
        `keep` (the paths its rows name); returns how many.

        Such files come from a publish that never committed: a writer killed between its
        files and the version row. Call it only while no publish of `model` can commit (a job
        of the model was just claimed again: its line runs one job at a time, and an earlier
        attempt cannot commit any more).
        """
        kept = set(keep)
        removed = 0
        for sub in subs:
            folder = self._dir(model, sub)
            if not folder.is_dir():
                continue
            before = removed
            for path in folder.iterdir():
                if path.is_file() and self.relative(path) not in kept:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed += 1
            if removed > before:
                _fsync_dir(folder)
        return removed

    def _abandoned(self, tmp: Path, cutoff: float) -> bool:
        if tmp.stat().st_mtime < cutoff:
            return True
        writer = self._local_writer(tmp.name)
        return writer is not None and not _process_alive(writer)

    def _local_writer(self, name: str) -> int | None:
        """The PID that writes scratch file `name`, when it ran in this PID namespace."""
        parts = name.removeprefix(TMP_PREFIX).split("-")
        if self._namespace and len(parts) == 3 and parts[0] == self._namespace and parts[1].isdigit():
            return int(parts[1])
        return None
