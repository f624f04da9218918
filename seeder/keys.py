"""Ed25519 signing keys of the repository: generate, store (PEM, mode 0600), load.

The only seeder module that imports securesystemslib's signer and cryptography's key
loading. Keys are unencrypted PKCS#8 PEM files: the root key belongs offline, the online
keys (targets, snapshot, timestamp) on the publishing machine, readable only by its
owner. Every failure becomes :class:`seeder.errors.RepositoryError`.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey

from infra.fsio import atomic_write_bytes
from seeder.errors import RepositoryError

__all__ = [
    "MAX_KEY_FILE_BYTES",
    "PRIVATE_KEY_MODE",
    "generate_key",
    "load_private_key",
    "write_private_key",
]

PRIVATE_KEY_MODE = 0o600
MAX_KEY_FILE_BYTES = 64 * 1024


def generate_key() -> CryptoSigner:
    """Return a new Ed25519 signer (its keyid is the TUF default for the public key)."""
    return CryptoSigner.generate_ed25519()


def write_private_key(path: Path, signer: CryptoSigner) -> None:
    """Write ``signer``'s private key as PEM, atomically, with mode 0600.

    Raises:
        RepositoryError: the file cannot be written.
    """
    try:
        atomic_write_bytes(path, signer.private_bytes, mode=PRIVATE_KEY_MODE)
    except OSError as exc:
        raise RepositoryError(f"cannot write private key {path}: {exc}") from exc


def load_private_key(path: Path) -> CryptoSigner:
    """Load an Ed25519 private key from a PEM file and return its signer.

    Raises:
        RepositoryError: the file is missing, unreadable, too large, not a PEM private
            key, or not Ed25519.
    """
    try:
        with open(path, "rb") as fh:
            pem = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise RepositoryError(f"cannot read private key {path}: {exc}") from exc
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise RepositoryError(f"private key {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        private_key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise RepositoryError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(private_key, Ed25519PrivateKey):
        raise RepositoryError(f"{path} is not an Ed25519 key")
    public_key = SSlibKey.from_crypto(private_key.public_key())
    return CryptoSigner(private_key, public_key)
