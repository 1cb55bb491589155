"""The receipt signature convention (API.md), and checking it.

A receipt is a JSON object with a `signature` member `{kid, alg: "Ed25519", value}`. `value`
is the base64url (unpadded) Ed25519 signature over the canonical JSON of the receipt without
its `signature` member: keys sorted, no whitespace, UTF-8, numbers as Python's `json` writes
them. `kid` is the RFC 7638 thumbprint of the public key, which `GET /v1/receipts/keys` lists
as `{kid, alg, x}` (`x`: base64url raw 32-byte key), old keys included.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ALG = "Ed25519"


def b64url(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of `b64url` (padding optional); raises ValueError on malformed input."""
    if not isinstance(text, str):
        raise ValueError("expected a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed base64url: {exc}") from None


def canonical_bytes(document: Mapping[str, Any]) -> bytes:
    """The bytes a receipt's signature covers: `document` minus `signature`, canonical JSON."""
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    return json.dumps(
        unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint of an Ed25519 public key (base64url sha256)."""
    x = b64url(raw_public_key(key))
    jwk = '{"crv":"Ed25519","kty":"OKP","x":"' + x + '"}'  # members in lexicographic order
    return b64url(hashlib.sha256(jwk.encode("ascii")).digest())


def sign(document: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """`document` with its `signature` member (any previous one is replaced)."""
    kid = key_id(private_key.public_key())
    value = b64url(private_key.sign(canonical_bytes(document)))
    return {**document, "signature": {"kid": kid, "alg": ALG, "value": value}}


@dataclass(frozen=True)
class Verification:
    """The outcome of checking a receipt: `ok`, the key it names, and why not when not."""

    ok: bool
    kid: str | None
    reason: str


def public_keys_from(listing: Any) -> dict[str, Ed25519PublicKey]:
    """`{kid: key}` from a `GET /v1/receipts/keys` document (or its `keys` list).

    A key is only accepted under the kid its own bytes give, so a listing cannot pass one
    key off under another's name.
    """
    entries: Iterable[Any] = listing.get("keys", []) if isinstance(listing, Mapping) else listing
    keys: dict[str, Ed25519PublicKey] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or entry.get("alg") != ALG:
            continue
        try:
            key = Ed25519PublicKey.from_public_bytes(b64url_decode(str(entry.get("x", ""))))
        except ValueError:
            continue
        if key_id(key) == entry.get("kid"):
            keys[key_id(key)] = key
    return keys


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes | str) -> Any:
    """Strict JSON parsing of a receipt file: UTF-8, no NaN or Infinity."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return json.loads(text, parse_constant=_refuse_constant)


def verify_bytes(data: bytes, keys: Mapping[str, Ed25519PublicKey]) -> Verification:
    """Check a receipt as stored or served (JSON bytes)."""
    try:
        receipt = loads(data)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return Verification(False, None, f"not a JSON receipt: {exc}")
    return verify(receipt, keys)


def verify(receipt: Any, keys: Mapping[str, Ed25519PublicKey]) -> Verification:
    """Check `receipt`'s signature with the key it names among `keys`."""
    if not isinstance(receipt, Mapping):
        return Verification(False, None, "a receipt is a JSON object")
    signature = receipt.get("signature")
    if not isinstance(signature, Mapping):
        return Verification(False, None, "the receipt has no signature member")
    kid, alg, value = signature.get("kid"), signature.get("alg"), signature.get("value")
    if set(signature) != {"kid", "alg", "value"}:
        return Verification(False, None, "the signature member must hold exactly kid, alg and value")
    if alg != ALG:
        return Verification(False, None, f"unsupported signature algorithm {alg!r}")
    if not isinstance(kid, str) or kid not in keys:
        return Verification(False, None, f"no public key with kid {kid!r}")
    if not isinstance(value, str):
        return Verification(False, kid, "the signature value is not a string")
    try:
        raw = b64url_decode(value)
        if b64url(raw) != value:  # one encoding only: no padding, no alternative spellings
            raise ValueError("non-canonical base64url")
        keys[kid].verify(raw, canonical_bytes(receipt))
    except (ValueError, InvalidSignature):
        return Verification(False, kid, "the signature does not match the receipt")
    return Verification(True, kid, "signature valid")
