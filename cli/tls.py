"""HTTPS for `processdistro up --https`: the controller's certificate and how clients pin it.

The certificate (`ensure_certificate`) is self-signed for the LAN address, `localhost` and
`127.0.0.1` (subject alternative names), an EC P-256 key, valid `VALID_DAYS`; it is kept
in `$PD_HOME/tls/` (`cert.pem`, `key.pem` 0600) and reused by the next `up`, unless the
LAN address changed or it expires within `RENEW_DAYS`. `--cert/--key` bring the
operator's own (mkcert, a real domain's) instead.

Clients that know the certificate's SHA-256 fingerprint (`fingerprint`: of the DER
certificate, what `openssl x509 -fingerprint -sha256` prints, in lowercase hex without
colons) accept exactly that certificate: `pinned_context(fp)` verifies nothing else (no CA,
no host name: a self-signed certificate has neither) but compares the peer certificate's
fingerprint during the handshake, before a byte of HTTP or WebSocket is sent, and fails
the handshake (`FingerprintMismatch`) otherwise. Both ways TLS runs in Python are covered:
`SSLContext.wrap_bio` (asyncio, anyio) and `wrap_socket` (blocking clients). The
join link carries it (`&fp=<hex>`); `up` prints it. Without a fingerprint an https link is
checked the usual way (the system's CAs, the host name).

Chromium pins by the key instead (`spki_pin`: base64 SHA-256 of the public key, for
`--ignore-certificate-errors-spki-list`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .shared.exceptions import ProcessDistroError

log = logging.getLogger(__name__)

VALID_DAYS = 365
RENEW_DAYS = 30  # a certificate expiring sooner than this is replaced
_HEX64 = re.compile(r"[0-9a-f]{64}")


class FingerprintMismatch(ProcessDistroError):
    """The server's certificate is not the pinned one. Deliberately not an `ssl.SSLError`:
    httpx and websockets let it through unwrapped, so a worker stops with this message
    instead of retrying a connection that cannot succeed."""


def normalize_fingerprint(text: str) -> str:
    """`AB:CD:...` or `abcd...` -> 64 lowercase hex digits; ValueError if it is not a SHA-256."""
    fp = text.replace(":", "").strip().lower()
    if not _HEX64.fullmatch(fp):
        raise ValueError(f"expected a SHA-256 fingerprint (64 hex digits), got {text!r}")
    return fp


def fingerprint(cert_der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, lowercase hex."""
    return hashlib.sha256(cert_der).hexdigest()


def pem_to_der(pem: bytes) -> bytes:
    """The first certificate of a PEM file, as DER."""
    return ssl.PEM_cert_to_DER_cert(pem.decode("ascii", errors="replace"))


def spki_pin(cert_pem: bytes) -> str:
    """base64 SHA-256 of the certificate's public key (SubjectPublicKeyInfo): Chromium's
    `--ignore-certificate-errors-spki-list` entry."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


# ---------------------------------------------------------------------------- clients


def _check(der: bytes | None, expected: str) -> None:
    got = fingerprint(der) if der else ""
    if not hmac.compare_digest(got, expected):
        raise FingerprintMismatch(
            f"the server's certificate (sha256 {got or 'none'}) is not the one in the join link "
            f"(fp={expected}): get a fresh link from the controller"
        )


def _pinned_classes(expected: str) -> tuple[type[ssl.SSLObject], type[ssl.SSLSocket]]:
    """An SSLObject (asyncio, anyio: httpx's async client, websockets) and an SSLSocket
    (blocking clients: httpx's sync client) whose handshake ends with the fingerprint check."""

    class PinnedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            _check(self.getpeercert(binary_form=True), expected)

    class PinnedSSLSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            try:
                _check(self.getpeercert(binary_form=True), expected)
            except FingerprintMismatch:
                self.close()  # wrap_socket closes only on OSError and ValueError
                raise

    return PinnedSSLObject, PinnedSSLSocket


def pinned_context(fp: str) -> ssl.SSLContext:
    """A client context that accepts exactly the certificate with SHA-256 fingerprint `fp`."""
    expected = normalize_fingerprint(fp)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # no CA and no host name to check (a self-signed certificate for a LAN address):
    # the fingerprint, compared in the handshake, is the whole check
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslobject_class, context.sslsocket_class = _pinned_classes(expected)
    return context


def client_context(url: str, fp: str | None) -> ssl.SSLContext | None:
    """The TLS context for `url`: pinned to `fp` when given, the system's CAs for any
    other https URL, None for plain http."""
    if not url.startswith(("https:", "wss:")):
        return None
    return pinned_context(fp) if fp else ssl.create_default_context()


# ---------------------------------------------------------------------------- the server's


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path
    fingerprint: str
    generated: bool = False


def load(cert: Path, key: Path) -> Certificate:
    """The operator's own certificate and key (`--cert/--key`), checked to load together."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)  # ssl.SSLError / OSError on a bad pair
    return Certificate(cert, key, fingerprint(pem_to_der(cert.read_bytes())))


def _still_good(cert_path: Path, names: list[str], now: dt.datetime) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have = {str(v) for v in sans.get_values_for_type(x509.IPAddress)} | set(sans.get_values_for_type(x509.DNSName))
    return set(names) <= have and cert.not_valid_after_utc - now > dt.timedelta(days=RENEW_DAYS)


def ensure_certificate(directory: Path, address: str, *, now: dt.datetime | None = None) -> Certificate:
    """The self-signed certificate in `directory` for `address` (+ localhost, 127.0.0.1):
    the one there if it still fits, else a new one (key 0600)."""
    now = now or dt.datetime.now(dt.UTC)
    names = sorted({address, "localhost", "127.0.0.1"})
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if key_path.exists() and _still_good(cert_path, names, now):
        return load(cert_path, key_path)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_pem, key_pem = _self_signed(names, now)
    # the key first, created 0600 (never readable by others, not even for a moment)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert_pem)
    log.info("generated a self-signed certificate for %s in %s", ", ".join(names), directory)
    return Certificate(cert_path, key_path, fingerprint(pem_to_der(cert_pem)), generated=True)


def _self_signed(names: list[str], now: dt.datetime) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[Any] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ProcessDistro controller {names[0]}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
