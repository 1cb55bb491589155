"""The processor's signing identity for OpenDSR: private key, X.509 certificate, domain.

OpenDSR (opengdpr/OpenDSR `specification.md` §4, §7.3, §8.6) has the processor sign its
responses and status callbacks with the key of a certificate issued to its domain, and
publish that certificate (discovery's `processor_certificate`). Signatures are base64 of a
FIPS 186-4 signature over the SHA-256 digest of the exact body bytes: RSASSA-PKCS1-v1_5 for
an RSA key, ECDSA for an EC key.

Production reads the PEM key and certificate from `LETHE_OPENDSR_KEY_FILE` and
`LETHE_OPENDSR_CERTIFICATE_FILE`; without them signing is refused (503). Development
generates a self-signed RSA pair under `var_dir` on first use and logs loudly that it did:
the specification forbids self-signed certificates, so it is for local trials only.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from app.errors import Unavailable
from app.settings import Settings

log = logging.getLogger(__name__)

DEV_KEY_NAME = "opendsr-key.pem"
DEV_CERT_NAME = "opendsr-cert.pem"


@dataclass(frozen=True)
class ProcessorIdentity:
    """What signs OpenDSR bodies, and the certificate a controller verifies them with."""

    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    certificate_pem: bytes
    domain: str
    self_signed: bool

    def sign(self, body: bytes) -> str:
        """Base64 signature of `body` (SHA-256), as the `X-OpenDSR-Signature` header carries."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            raw = self.private_key.sign(body, padding.PKCS1v15(), hashes.SHA256())
        else:
            raw = self.private_key.sign(body, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(raw).decode()


def load_identity(settings: Settings) -> ProcessorIdentity:
    """The configured identity, or in development a generated self-signed one."""
    key_file, cert_file = settings.opendsr_key_file, settings.opendsr_certificate_file
    if key_file is not None and cert_file is not None:
        return _read(key_file, cert_file, settings.opendsr_domain, self_signed=False)
    if settings.environment != "development":
        raise Unavailable(
            "OpenDSR cannot sign: set LETHE_OPENDSR_KEY_FILE and LETHE_OPENDSR_CERTIFICATE_FILE"
        )
    key_path = settings.var_dir / DEV_KEY_NAME
    cert_path = settings.var_dir / DEV_CERT_NAME
    if not (key_path.exists() and cert_path.exists()):
        _write_self_signed(key_path, cert_path, settings.opendsr_domain)
        log.warning(
            "OPENDSR: generated a SELF-SIGNED development key and certificate for %r at %s. "
            "The OpenDSR specification forbids self-signed certificates: production must set "
            "LETHE_OPENDSR_KEY_FILE and LETHE_OPENDSR_CERTIFICATE_FILE to a CA-issued pair.",
            settings.opendsr_domain,
            cert_path,
        )
    return _read(key_path, cert_path, settings.opendsr_domain, self_signed=True)


def _read(key_file: Path, cert_file: Path, domain: str, *, self_signed: bool) -> ProcessorIdentity:
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        cert_pem = cert_file.read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (OSError, ValueError, TypeError) as exc:
        raise Unavailable(f"the OpenDSR key or certificate cannot be read: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise Unavailable("the OpenDSR key must be an RSA or EC private key")
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise Unavailable("the OpenDSR certificate is not the certificate of the OpenDSR key")
    return ProcessorIdentity(key, cert_pem, domain, self_signed)


def _spki(public_key: Any) -> bytes:
    """A public key as SubjectPublicKeyInfo DER (to compare a certificate with its key)."""
    return bytes(
        public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _write_self_signed(key_path: Path, cert_path: Path, domain: str) -> None:
    """A 2048-bit RSA key (mode 0600) and a one-year self-signed certificate for `domain`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(key_path, key_pem, mode=0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
