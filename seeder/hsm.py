"""Signing keys held in a PKCS#11 token (an HSM, a smart card, a YubiKey, SoftHSM2).

The only module that imports python-pkcs11. A release signer or root key holder keeps
an ECDSA P-256 key in a token: it is generated there (:func:`generate_token_key`,
sensitive and never extractable), its public key is what the repository lists, and
:class:`TokenSigner` signs TUF metadata with it (ECDSA over the SHA-256 of the metadata,
the signature DER-encoded as securesystemslib's ``ecdsa-sha2-nistp256`` expects). The
private key never leaves the token; the host only ever sees the PIN.

Why our own signer rather than securesystemslib's ``HSMSigner``: that one finds its
PKCS#11 module through the ``PYKCS11LIB`` environment variable and its key by a numeric
id; a signer here names the module, the token and the key explicitly (as an operator
would on a command line), and a key can be generated in the token by the same tool.

Each operation loads the PKCS#11 module, opens one session and finalizes the module
again, so that a process may use several tokens (and tests several SoftHSM2
configurations) one after the other. Every PKCS#11 failure becomes
:class:`seeder.errors.SigningError` naming the token and the key.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)
from securesystemslib.signer import SecretsHandler, Signature, Signer, SSlibKey

from swarmota.seeder.errors import SigningError

__all__ = ["TokenConfig", "TokenSigner", "generate_token_key", "token_signer"]

_SCHEME = "ecdsa-sha2-nistp256"
_URI_SCHEME = "swarmota-pkcs11"


@dataclass(frozen=True)
class TokenConfig:
    """Where a token key is: the PKCS#11 module (e.g.
    ``/usr/lib/softhsm/libsofthsm2.so``), the token's label and the user PIN."""

    library: Path
    token_label: str
    pin: str

    def __repr__(self) -> str:  # never print the PIN
        return f"TokenConfig(library={str(self.library)!r}, token_label={self.token_label!r})"


@contextlib.contextmanager
def _session(token: TokenConfig, *, rw: bool = False) -> Iterator[Any]:
    """A logged-in session on ``token``; the module is finalized afterwards."""
    where = f"PKCS#11 token {token.token_label!r} ({token.library})"
    lib = None
    try:
        lib = pkcs11.lib(str(token.library))
        found = lib.get_token(token_label=token.token_label)
        with found.open(user_pin=token.pin, rw=rw) as session:
            yield session
    except pkcs11.exceptions.NoSuchToken:
        raise SigningError(f"{where}: no such token") from None
    except pkcs11.exceptions.PinIncorrect:
        raise SigningError(f"{where}: wrong PIN") from None
    except pkcs11.exceptions.PKCS11Error as exc:
        raise SigningError(f"{where}: {type(exc).__name__}: {exc}") from exc
    finally:
        if lib is not None:
            with contextlib.suppress(pkcs11.exceptions.PKCS11Error):
                lib.finalize()


def _public_key(session: Any, token: TokenConfig, key_label: str) -> SSlibKey:
    try:
        obj = session.get_key(object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.EC,
                              label=key_label)
    except pkcs11.exceptions.NoSuchKey:
        raise SigningError(f"PKCS#11 token {token.token_label!r} has no EC key labelled "
                           f"{key_label!r}") from None
    except pkcs11.exceptions.MultipleObjectsReturned:
        raise SigningError(f"PKCS#11 token {token.token_label!r} has several keys labelled "
                           f"{key_label!r}") from None
    try:
        public = load_der_public_key(encode_ec_public_key(obj))
        key = SSlibKey.from_crypto(public, scheme=_SCHEME)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"key {key_label!r} on token {token.token_label!r} is not an "
                           f"ECDSA P-256 key: {exc}") from exc
    return key


def generate_token_key(token: TokenConfig, key_label: str) -> SSlibKey:
    """Generate an ECDSA P-256 key pair inside ``token`` under ``key_label`` (the
    private key sensitive and not extractable) and return its public key.

    Raises:
        SigningError: the token cannot be used, or already has a key with that label.
    """
    with _session(token, rw=True) as session:
        if list(session.get_objects({Attribute.LABEL: key_label})):
            raise SigningError(f"PKCS#11 token {token.token_label!r} already has a key "
                               f"labelled {key_label!r}")
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True)
        key_id = hashlib.sha256(key_label.encode()).digest()[:8]
        params.generate_keypair(store=True, label=key_label, id=key_id,
                                private_template={Attribute.SENSITIVE: True,
                                                  Attribute.EXTRACTABLE: False})
        return _public_key(session, token, key_label)


class TokenSigner(Signer):
    """Signs with the key ``key_label`` of a PKCS#11 token (see the module docstring)."""

    def __init__(self, token: TokenConfig, key_label: str, public_key: SSlibKey) -> None:
        self._token = token
        self._key_label = key_label
        self._public_key = public_key

    @property
    def public_key(self) -> SSlibKey:
        return self._public_key

    def sign(self, payload: bytes) -> Signature:
        """ECDSA P-256 signature of ``payload`` (SHA-256), made inside the token.

        Raises:
            SigningError: the token or key cannot be used.
        """
        digest = hashlib.sha256(payload).digest()
        with _session(self._token) as session:
            try:
                key = session.get_key(object_class=ObjectClass.PRIVATE_KEY,
                                      key_type=KeyType.EC, label=self._key_label)
            except pkcs11.exceptions.NoSuchKey:
                raise SigningError(f"PKCS#11 token {self._token.token_label!r} has no "
                                   f"private key labelled {self._key_label!r}") from None
            raw = key.sign(digest, mechanism=Mechanism.ECDSA)
        return Signature(self._public_key.keyid, encode_ecdsa_signature(raw).hex())

    @classmethod
    def from_priv_key_uri(cls, priv_key_uri: str, public_key: Any,
                          secrets_handler: SecretsHandler | None = None) -> TokenSigner:
        """``swarmota-pkcs11:LIBRARY?token=LABEL&key=LABEL``; the PIN comes from
        ``secrets_handler("pin")``.

        Raises:
            ValueError: another URI scheme, missing parts, or no secrets handler.
        """
        from urllib.parse import parse_qs, urlsplit

        uri = urlsplit(priv_key_uri)
        query = parse_qs(uri.query)
        if uri.scheme != _URI_SCHEME or not uri.path or secrets_handler is None:
            raise ValueError(f"not a usable {_URI_SCHEME} URI: {priv_key_uri!r}")
        try:
            token, key = query["token"][0], query["key"][0]
        except (KeyError, IndexError):
            raise ValueError(f"{priv_key_uri!r} needs token= and key=") from None
        if not isinstance(public_key, SSlibKey):
            raise ValueError("expected an SSlibKey")
        config = TokenConfig(Path(uri.path), token, secrets_handler("pin"))
        return cls(config, key, public_key)


def token_signer(token: TokenConfig, key_label: str) -> TokenSigner:
    """A signer for the key ``key_label`` of ``token`` (its public key read now).

    Raises:
        SigningError: the token or key cannot be used.
    """
    with _session(token) as session:
        public = _public_key(session, token, key_label)
    return TokenSigner(token, key_label, public)
