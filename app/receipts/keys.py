"""The private key that signs receipts: where it comes from, and a development key.

Production reads a PKCS#8 PEM Ed25519 key from `LETHE_RECEIPT_SIGNING_KEY_FILE` (a mounted
secret); without one, signing is refused (503) rather than done with a key nobody manages. In
development a key is generated on first use at `var/receipt-signing-key.pem` (mode 0600) and
the log says so. The file is read at every signing, so rotating is replacing the file (or
pointing the setting at a new one): the next receipt names the new key, and the old public
keys stay published (`app.services.receipts`), so receipts signed before still verify.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from app.errors import Unavailable
from app.receipts.signing import b64url, key_id, raw_public_key
from app.settings import Settings

log = logging.getLogger(__name__)

DEV_KEY_NAME = "receipt-signing-key.pem"


@dataclass(frozen=True)
class SigningKey:
    """The active private key, its kid and its public key `x` (base64url raw)."""

    private_key: Ed25519PrivateKey
    kid: str
    x: str
    path: Path


def development_key_path(settings: Settings) -> Path:
    """Where development keeps its generated key."""
    return settings.var_dir / DEV_KEY_NAME


def _from_private(private_key: Ed25519PrivateKey, path: Path) -> SigningKey:
    public = private_key.public_key()
    return SigningKey(private_key, key_id(public), b64url(raw_public_key(public)), path)


def read_key(path: Path) -> SigningKey:
    """The Ed25519 key in the PEM file `path`; `Unavailable` when it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Unavailable(f"the receipt signing key {path} cannot be read: {exc.strerror}") from None
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise Unavailable(f"the receipt signing key {path} is not an unencrypted PEM key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise Unavailable(f"the receipt signing key {path} is not an Ed25519 key")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("receipt signing key %s is readable by others; chmod 600 it", path)
    return _from_private(key, path)


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def write_new_key(path: Path, *, replace: bool = False) -> SigningKey | None:
    """Generate a key into `path` (mode 0600, written whole before it becomes visible).

    Without `replace`, an existing file wins and None is returned (two processes starting
    together agree on one key).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_pem(key))
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return None
    finally:
        tmp.unlink(missing_ok=True)
    return _from_private(key, path)


def load_signing_key(settings: Settings) -> SigningKey:
    """The key new receipts are signed with (see the module docstring)."""
    if settings.receipt_signing_key_file is not None:
        return read_key(settings.receipt_signing_key_file)
    if settings.environment != "development":
        raise Unavailable(
            "receipts cannot be signed: set LETHE_RECEIPT_SIGNING_KEY_FILE to an Ed25519 PEM key"
        )
    path = development_key_path(settings)
    if not path.exists():
        created = write_new_key(path)
        if created is not None:
            log.warning(
                "receipts: generated a development Ed25519 signing key at %s (kid %s); "
                "production must set LETHE_RECEIPT_SIGNING_KEY_FILE",
                path,
                created.kid,
            )
            return created
    return read_key(path)


def rotate_development_key(settings: Settings) -> SigningKey:
    """Replace the development key with a new one (production rotates by replacing its file)."""
    if settings.receipt_signing_key_file is not None or settings.environment != "development":
        raise Unavailable(
            "rotate a production key by installing a new PEM file at LETHE_RECEIPT_SIGNING_KEY_FILE"
        )
    key = write_new_key(development_key_path(settings), replace=True)
    assert key is not None
    log.warning("receipts: rotated the development signing key at %s (new kid %s)", key.path, key.kid)
    return key
