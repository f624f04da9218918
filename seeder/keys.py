"""Signing keys of the repository: generate, store (PEM), load; Ed25519 and ECDSA P-256.

The only seeder module that imports securesystemslib's crypto signer and cryptography's
key loading. Private keys are unencrypted PKCS#8 PEM files, mode 0600: the root keys
and the release signers' targets keys belong offline (or in an HSM: :mod:`seeder.hsm`),
the online keys (snapshot, timestamp) on the publishing machine, readable only by its
owner. Public keys travel as PEM SubjectPublicKeyInfo files (``*.pub.pem``): that is
what a key holder hands to the repository owner, never the private key.

Every failure becomes :class:`seeder.errors.SigningError` (a
:class:`seeder.errors.RepositoryError`).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)
from securesystemslib.signer import CryptoSigner, Key, SSlibKey

from swarmota.infra.fsio import atomic_write_bytes
from swarmota.seeder.errors import SigningError

__all__ = [
    "KEY_TYPES",
    "MAX_KEY_FILE_BYTES",
    "PRIVATE_KEY_MODE",
    "generate_key",
    "key_type_of",
    "load_private_key",
    "load_public_key",
    "public_key_pem",
    "write_private_key",
    "write_public_key",
]

PRIVATE_KEY_MODE = 0o600
MAX_KEY_FILE_BYTES = 64 * 1024
KEY_TYPES = ("ed25519", "ecdsa")
"""Key types a role may use: Ed25519, or ECDSA on P-256 (what HSMs and tokens offer)."""

_ECDSA_SCHEME = "ecdsa-sha2-nistp256"


def generate_key(key_type: str = "ed25519") -> CryptoSigner:
    """Return a new signer of ``key_type`` (its keyid is the TUF default for the key).

    Raises:
        SigningError: an unknown key type.
    """
    if key_type == "ed25519":
        return CryptoSigner.generate_ed25519()
    if key_type == "ecdsa":
        return CryptoSigner.generate_ecdsa(scheme=_ECDSA_SCHEME)
    raise SigningError(f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")


def key_type_of(key: Key) -> str:
    """``ed25519`` or ``ecdsa`` (P-256), as :data:`KEY_TYPES` names them; else the
    key's own type and scheme."""
    if key.keytype == "ed25519":
        return "ed25519"
    if key.scheme == _ECDSA_SCHEME:
        return "ecdsa"
    return f"{key.keytype}/{key.scheme}"


def write_private_key(path: Path, signer: CryptoSigner) -> None:
    """Write ``signer``'s private key as PEM, atomically, with mode 0600.

    Raises:
        SigningError: the file cannot be written.
    """
    try:
        atomic_write_bytes(path, signer.private_bytes, mode=PRIVATE_KEY_MODE)
    except OSError as exc:
        raise SigningError(f"cannot write private key {path}: {exc}") from exc


def public_key_pem(key: Key) -> bytes:
    """The PEM SubjectPublicKeyInfo of a TUF key (Ed25519 or ECDSA P-256).

    Raises:
        SigningError: a key of another type, or malformed key material.
    """
    try:
        public = key.keyval["public"]
        if key.keytype == "ed25519":
            crypto: object = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
        else:
            crypto = load_pem_public_key(public.encode())
        if not isinstance(crypto, Ed25519PublicKey | EllipticCurvePublicKey):
            raise ValueError("not an Ed25519 or EC key")
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise SigningError(f"key {key.keyid[:16]} cannot be written as PEM: {exc}") from exc
    return crypto.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def write_public_key(path: Path, key: Key) -> None:
    """Write ``key`` as a PEM public key file (mode 0644), atomically.

    Raises:
        SigningError: the file cannot be written.
    """
    try:
        atomic_write_bytes(path, public_key_pem(key), mode=0o644)
    except OSError as exc:
        raise SigningError(f"cannot write public key {path}: {exc}") from exc


def load_public_key(path: Path) -> SSlibKey:
    """Load an Ed25519 or ECDSA P-256 public key (PEM) as a TUF key.

    A private key file is accepted too (its public half is used), so that a key holder
    may give either.

    Raises:
        SigningError: unreadable, too large, not a PEM key, or of another type.
    """
    pem = _read_key_file(path)
    try:
        if b"PRIVATE KEY" in pem:
            return _signer_from_pem(pem, path).public_key
        public = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not a PEM public key: {exc}") from exc
    return _sslib_key(public, path)


def load_private_key(path: Path) -> CryptoSigner:
    """Load an Ed25519 or ECDSA P-256 private key from a PEM file; return its signer.

    Raises:
        SigningError: the file is missing, unreadable, too large, not an unencrypted PEM
            private key, or of another type.
    """
    return _signer_from_pem(_read_key_file(path), path)


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            pem = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise SigningError(f"cannot read key {path}: {exc.strerror or exc}") from exc
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise SigningError(f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    return pem


def _signer_from_pem(pem: bytes, path: Path) -> CryptoSigner:
    try:
        private_key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(private_key, Ed25519PrivateKey | EllipticCurvePrivateKey):
        raise SigningError(f"{path} is neither an Ed25519 nor an ECDSA P-256 key")
    return CryptoSigner(private_key, _sslib_key(private_key.public_key(), path))


def _sslib_key(public: object, path: Path) -> SSlibKey:
    if isinstance(public, Ed25519PublicKey):
        return SSlibKey.from_crypto(public)
    if isinstance(public, EllipticCurvePublicKey) and isinstance(public.curve, SECP256R1):
        return SSlibKey.from_crypto(public, scheme=_ECDSA_SCHEME)
    raise SigningError(f"{path} is neither an Ed25519 nor an ECDSA P-256 key")
