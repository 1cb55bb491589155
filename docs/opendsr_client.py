"""A governance client playing the OpenDSR controller against Lethe (a processor).

It fetches discovery and the processor certificate it names, posts an erasure for one data
subject, verifies the signed 201 answer, then listens on a loopback port for the status
callbacks and verifies each one's `X-OpenDSR-Signature` against the certificate *before*
reading the body (OpenDSR specification §8.8), until the request is `completed` (or
`cancelled`). It uses only httpx and cryptography: nothing of Lethe.

    python docs/opendsr_client.py --url http://127.0.0.1:8000 --api-key lethe_... \
        --subject demo-subject-007 [--model mnist-cnn] [--listen-port 8765]

Exit status 0 when the erasure completed and every signature verified; 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import queue
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

FINAL = ("completed", "cancelled")


def verify(certificate: x509.Certificate, body: bytes, signature_b64: str) -> bool:
    """True when `signature_b64` is the certificate key's signature of `body` (SHA-256)."""
    key = certificate.public_key()
    signature = base64.b64decode(signature_b64)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, body, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def callback_server(port: int, inbox: queue.Queue[tuple[bytes, dict[str, str]]]) -> ThreadingHTTPServer:
    """A loopback HTTP server putting each POSTed body and its headers in `inbox`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            inbox.put((body, {k.lower(): v for k, v in self.headers.items()}))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def erasure(subject: str, callback_url: str, domain: str, model: str | None) -> dict[str, Any]:
    """An OpenDSR erasure request for `subject` (identity type `controller_customer_id`)."""
    body: dict[str, Any] = {
        "subject_request_id": str(uuid.uuid4()),
        "subject_request_type": "erasure",
        "regulation": "gdpr",
        "submitted_time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "subject_identities": [
            {"identity_type": "controller_customer_id", "identity_value": subject, "identity_format": "raw"}
        ],
        "api_version": "2.0",
        "status_callback_urls": [callback_url],
    }
    if model:
        body["extensions"] = {domain: {"property_id": model}}
    return body


def run(url: str, api_key: str, subject: str, model: str | None, port: int, timeout: float) -> int:
    """Play the controller once; prints what it saw, returns the exit status."""
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    discovery = api.get("/opendsr/v2/discovery").json()
    print("discovery:", json.dumps(discovery, sort_keys=True))
    certificate = x509.load_pem_x509_certificate(httpx.get(discovery["processor_certificate"]).content)
    # Extensions are keyed by the processor's domain: the one its certificate is issued to.
    processor = str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    inbox: queue.Queue[tuple[bytes, dict[str, str]]] = queue.Queue()
    server = callback_server(port, inbox)
    callback_url = f"http://127.0.0.1:{server.server_address[1]}/opendsr/callbacks"
    try:
        created = api.post("/opendsr/v2/requests", json=erasure(subject, callback_url, processor, model))
        domain = created.headers.get("x-opendsr-processor-domain")
        if created.status_code != 201 or not verify(certificate, created.content,
                                                    created.headers["x-opendsr-signature"]):
            print("request refused or its answer is not signed by the processor:", created.text)
            return 1
        request_id = created.json()["subject_request_id"]
        print(f"created {request_id}, answer signed by {domain}")
        return _await_final(inbox, certificate, callback_url, request_id, timeout)
    finally:
        server.shutdown()


def _await_final(
    inbox: queue.Queue[tuple[bytes, dict[str, str]]],
    certificate: x509.Certificate,
    callback_url: str,
    request_id: str,
    timeout: float,
) -> int:
    """Verify callbacks as they come until the request reaches a final status."""
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=timeout)
    while dt.datetime.now(dt.UTC) < deadline:
        try:
            raw, headers = inbox.get(timeout=1.0)
        except queue.Empty:
            continue
        if not verify(certificate, raw, headers.get("x-opendsr-signature", "")):
            print("callback signature INVALID; rejected (403)")
            return 1
        status = json.loads(raw)  # parsed only once its signature holds
        if status["status_callback_url"] != callback_url or status["subject_request_id"] != request_id:
            print("callback meant for another endpoint or request; ignored")
            continue
        print(f"callback verified: {status['request_status']}")
        if status["request_status"] in FINAL:
            return 0 if status["request_status"] == "completed" else 1
    print("no final status before the timeout")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key", required=True, help="a Lethe API key with the opendsr scope")
    parser.add_argument("--subject", required=True, help="the data subject (controller_customer_id)")
    parser.add_argument("--model", help="the model to erase from (default: every model)")
    parser.add_argument("--listen-port", type=int, default=0, help="callback port (default: any)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    return run(args.url, args.api_key, args.subject, args.model, args.listen_port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
