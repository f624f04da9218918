"""SPKI pins: name a server's public key, whatever certificate carries it.

A pin is ``sha256/<base64 of the SHA-256 of the DER SubjectPublicKeyInfo>``, the form of
HPKP (RFC 7469) and of curl's ``--pinnedpubkey``. A pin survives certificate renewal as
long as the key stays the same, and a spare ("backup") key can be pinned before it is
ever used, so that a server can move to it without reprovisioning its clients.

Pure functions over bytes and cryptography objects; no I/O. Errors: :class:`PinError`
(a ``ValueError``) for a malformed pin or unparseable PEM/DER.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)

__all__ = [
    "PIN_PREFIX",
    "PinError",
    "check_pin",
    "pin_of_certificate",
    "pin_of_certificate_der",
    "pin_of_pem",
    "pin_of_public_key",
]

PIN_PREFIX = "sha256/"


class PinError(ValueError):
    """A malformed pin, or bytes that hold no certificate or key."""


def check_pin(pin: str) -> str:
    """Return ``pin`` if it is ``sha256/`` + the standard base64 of 32 bytes.

    Raises:
        PinError: anything else (the message says what is wrong).
    """
    if not isinstance(pin, str) or not pin.startswith(PIN_PREFIX):
        raise PinError(f"pin {pin!r} must start with {PIN_PREFIX!r}")
    encoded = pin[len(PIN_PREFIX):]
    try:
        digest = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise PinError(f"pin {pin!r}: {encoded!r} is not standard base64") from None
    if len(digest) != 32 or base64.b64encode(digest).decode() != encoded:
        raise PinError(f"pin {pin!r}: expected the base64 of a 32-byte SHA-256 digest")
    return pin


def pin_of_public_key(key: PublicKeyTypes) -> str:
    """The SPKI pin of a public key."""
    spki = key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return PIN_PREFIX + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def pin_of_certificate(cert: x509.Certificate) -> str:
    """The SPKI pin of the public key a certificate carries."""
    return pin_of_public_key(cert.public_key())


def pin_of_certificate_der(der: bytes) -> str:
    """The SPKI pin of a DER certificate (as ``SSLObject.getpeercert(True)`` returns).

    Raises:
        PinError: the bytes are not a certificate.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PinError(f"not a DER certificate: {exc}") from None
    return pin_of_certificate(cert)


def pin_of_pem(data: bytes) -> str:
    """The SPKI pin of the first PEM block of ``data``: a certificate (the leaf of a
    chain file), a public key or an unencrypted private key.

    Raises:
        PinError: no certificate or key could be read.
    """
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            return pin_of_certificate(x509.load_pem_x509_certificate(data))
        except ValueError as exc:
            raise PinError(f"unreadable certificate: {exc}") from None
    if b"-----BEGIN PUBLIC KEY-----" in data:
        try:
            return pin_of_public_key(serialization.load_pem_public_key(data))
        except (ValueError, TypeError) as exc:
            raise PinError(f"unreadable public key: {exc}") from None
    if b"PRIVATE KEY-----" in data:
        try:
            private: PrivateKeyTypes = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise PinError(f"unreadable (or encrypted) private key: {exc}") from None
        return pin_of_public_key(private.public_key())
    raise PinError("no PEM certificate, public key or private key found")
