"""Device identity on the wire: requests signed with a key the fleet CA certified.

A device (or one of the operator's seeders) holds an ECDSA P-256 key and an X.509
certificate from the fleet CA (:func:`infra.devca.issue_device_cert`: ``CN`` = device
id, ``OU`` = role, ``device`` or ``seed``). Every request it sends to the tracker
(check-in, report, BitTorrent announce and scrape) carries two headers::

    swarmota-device-cert: <base64 of the DER certificate>
    swarmota-signature:   v1;counter=<decimal>;sig=<base64 of the DER ECDSA signature>

The signature (ECDSA with SHA-256) covers::

    b"swarmota-request-v1\\n" METHOD "\\n" TARGET "\\n" COUNTER "\\n" hex(SHA-256(BODY))

``TARGET`` is the request target exactly as sent (raw path, ``?`` and raw query), so
neither the body, the query (an announce's info-hash, ``left``, device id) nor the
endpoint can be changed, and ``COUNTER`` strictly increases per device: the tracker
refuses a counter not above the last one it accepted from that device (a replay).

**Announce keys** (announces and scrapes only). ECDSA verification costs the tracker
about 80 µs a request, most of a lean announce; announces are the most frequent
requests. So a signed check-in's answer (over TLS) hands the device a short-lived
announce key, and the device authenticates its announces and scrapes with HMAC-SHA256
under it instead of a signature (a few µs), in one header::

    swarmota-announce-auth: v1;id=<device id>;cert=<hex SHA-256 of the certificate>;
        exp=<expiry, epoch s>;counter=<decimal>;mac=<base64 of HMAC-SHA256>

The MAC covers the same bytes as a signature (:func:`signed_message`). The key is not
stored anywhere: it is ``HMAC-SHA256(secret, "swarmota-announce-key-v1" \n id \n
cert \n exp)`` (:func:`derive_announce_key`), where ``secret`` is one server secret
that every tracker process holds (:class:`AnnounceKeys`), so any process verifies any
device's key with two HMACs and no lookup. A key names its certificate (a revoked
certificate's keys are refused like its signatures) and its expiry (a stolen key works
at most until then); its counters share the device's replay window. Check-ins and
reports always need the ECDSA signature: a stolen announce key cannot check in, report
or obtain another key.

Why signed requests and not mutual TLS: one mechanism covers the JSON API and the
BitTorrent announces (libtorrent cannot present a client certificate to an HTTP
tracker; the device relays its announces, :mod:`peer.announce_relay`); it survives TLS
terminated by a load balancer in front of the tracker; the tracker needs only the fleet
CA's certificate, no key that could mint identities; and the same certificate is what
peers of a private swarm check in their TLS handshakes.

Pure: bytes, cryptography objects and a clock value in; no I/O. Errors are
:class:`DeviceAuthError` with a message safe to send back to the client.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from swarmota.infra.ids import DEVICE_ID_RE

__all__ = [
    "ANNOUNCE_AUTH_HEADER",
    "ANNOUNCE_KEY_BYTES",
    "CERT_HEADER",
    "DEVICE_ID_RE",
    "MAX_COUNTER",
    "ROLES",
    "ROLE_DEVICE",
    "ROLE_SEED",
    "SIGNATURE_HEADER",
    "AnnounceKey",
    "AnnounceKeys",
    "Authenticated",
    "CertificateIdentity",
    "DeviceAuthError",
    "FleetTrust",
    "RequestSigner",
    "SigningKey",
    "certificate_sha256",
    "derive_announce_key",
    "find_header",
    "hmac_sha256",
    "identity_of_name",
    "read_certificates",
    "signed_message",
]

CERT_HEADER = "swarmota-device-cert"
SIGNATURE_HEADER = "swarmota-signature"
ANNOUNCE_AUTH_HEADER = "swarmota-announce-auth"
ANNOUNCE_KEY_BYTES = 32
ROLE_DEVICE = "device"
ROLE_SEED = "seed"
ROLES = (ROLE_DEVICE, ROLE_SEED)
MAX_COUNTER = 2**63 - 1
"""Counters fit a signed 64-bit integer (SQLite)."""

_MAX_CERT_HEADER = 4096
_MAX_SIGNATURE_HEADER = 256
_SIGNATURE_RE = re.compile(rb"v1;counter=(0|[1-9][0-9]{0,18});sig=([A-Za-z0-9+/]{1,200}={0,2})")
_METHOD_RE = re.compile(r"[A-Za-z]{1,16}")
_ANNOUNCE_AUTH_RE = re.compile(
    rb"v1;id=([^;]{1,64});cert=([0-9a-f]{64});exp=([1-9][0-9]{0,11});"
    rb"counter=(0|[1-9][0-9]{0,18});mac=([A-Za-z0-9+/]{43}=)")
_MAX_ANNOUNCE_AUTH_HEADER = 320
_MIN_SECRET_BYTES = 32
_CACHE_SIZE = 10_000


class DeviceAuthError(Exception):
    """A request is not signed by a fleet identity (the message says why)."""


@dataclass(frozen=True)
class Authenticated:
    """Who signed a request: the certificate's device id and role, the counter, and
    the certificate's fingerprint (hex SHA-256 of its DER: what a revocation names).
    ``not_after``: the end of the certificate's validity (epoch s), when the request
    carried the certificate (``None`` for an announce key's MAC); ``by_key``: an
    announce key's MAC authenticated it, not a signature."""

    device_id: str
    role: str
    counter: int
    cert_sha256: str
    not_after: float | None = dataclass_field(default=None, compare=False)  # cert's
    by_key: bool = False

    @property
    def is_seed(self) -> bool:
        return self.role == ROLE_SEED


_EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest().encode("ascii")


def signed_message(method: str, target: bytes, counter: int, body: bytes) -> bytes:
    """The bytes a request signature covers."""
    digest = hashlib.sha256(body).hexdigest().encode("ascii") if body else _EMPTY_BODY_SHA256
    return b"\n".join([b"swarmota-request-v1", method.upper().encode("ascii"), target,
                       b"%d" % counter, digest])


def certificate_sha256(der: bytes) -> str:
    """The fingerprint of a certificate: hex SHA-256 of its DER encoding."""
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class CertificateIdentity:
    """The identity a certificate names, and its fingerprint (not verified against a
    CA: for naming a certificate, e.g. to revoke it)."""

    device_id: str
    role: str
    cert_sha256: str


def read_certificates(pem: bytes) -> list[CertificateIdentity]:
    """The identities of the PEM certificates in ``pem`` (one or more).

    Raises:
        DeviceAuthError: no readable PEM certificate, or one whose subject does not
            name a device id and a role.
    """
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise DeviceAuthError(f"not a PEM certificate: {exc}") from None
    out = []
    for cert in certs:
        device_id, role = _identity_of(cert)
        der = cert.public_bytes(serialization.Encoding.DER)
        out.append(CertificateIdentity(device_id, role, certificate_sha256(der)))
    return out


def _identity_of(cert: x509.Certificate) -> tuple[str, str]:
    """``(device id, role)`` from a certificate's subject, or DeviceAuthError."""
    return identity_of_name(cert.subject)


def identity_of_name(subject: x509.Name, roles: Sequence[str] = ROLES) -> tuple[str, str]:
    """``(device id, role)`` from a certificate's (or signing request's) subject; the
    role must be one of ``roles`` (those the tracker accepts, by default).

    Raises:
        DeviceAuthError: not one CN with a valid device id and one OU with a role.
    """
    try:
        cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ous = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    except ValueError as exc:
        raise DeviceAuthError(f"device certificate has a malformed subject: {exc}") from None
    if len(cns) != 1 or len(ous) != 1:
        raise DeviceAuthError("device certificate subject must have one CN and one OU")
    device_id, role = cns[0].value, ous[0].value
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise DeviceAuthError("device certificate names a malformed device id")
    if not isinstance(role, str) or role not in roles:
        raise DeviceAuthError(f"device certificate role must be one of {', '.join(roles)}")
    return device_id, role


class SigningKey(Protocol):
    """An ECDSA P-256 private key that signs without showing itself (e.g. one held by a
    TPM, :mod:`peer.keystore`)."""

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half."""

    def sign(self, message: bytes) -> bytes:
        """The DER ECDSA signature with SHA-256 over ``message``.

        Raises:
            DeviceAuthError: the key cannot sign now (the message says why).
        """


class _SoftwareKey:
    """A :class:`SigningKey` over a private key in memory (a PEM file's)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message, ec.ECDSA(hashes.SHA256()))


def _software_key(key_pem: bytes) -> _SoftwareKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise DeviceAuthError(f"unreadable identity key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise DeviceAuthError("identity key must be an ECDSA P-256 key")
    return _SoftwareKey(key)


class RequestSigner:
    """Signs requests with one fleet identity: its certificate (PEM) and its private
    key, as PEM or as a :class:`SigningKey` that keeps it (a TPM's).

    Raises:
        DeviceAuthError: unreadable PEM, a key that is not ECDSA P-256, a key that does
            not belong to the certificate, or a subject without a device id and role.
    """

    def __init__(self, cert_pem: bytes, key: bytes | SigningKey) -> None:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, TypeError) as exc:
            raise DeviceAuthError(f"unreadable identity certificate: {exc}") from None
        if isinstance(key, bytes):
            key = _software_key(key)
        public = key.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or \
                public.curve.name != "secp256r1":
            raise DeviceAuthError("identity key must be an ECDSA P-256 key")
        if public != cert.public_key():
            raise DeviceAuthError("identity key does not belong to the identity certificate")
        self.device_id, self.role = _identity_of(cert)
        self.not_before = cert.not_valid_before_utc
        self.not_after = cert.not_valid_after_utc
        self._key = key
        der = cert.public_bytes(serialization.Encoding.DER)
        self.cert_sha256 = certificate_sha256(der)
        self._cert_header = base64.b64encode(der)

    def headers(self, method: str, target: bytes, body: bytes,
                counter: int) -> list[tuple[str, str]]:
        """The two headers that authenticate ``METHOD target`` with ``body``.

        Raises:
            DeviceAuthError: the key cannot sign now (a TPM's, in another boot state).
        """
        if not 0 <= counter <= MAX_COUNTER:
            raise ValueError(f"counter out of range: {counter}")
        sig = self._key.sign(signed_message(method, target, counter, body))
        return [(CERT_HEADER, self._cert_header.decode("ascii")),
                (SIGNATURE_HEADER,
                 f"v1;counter={counter};sig={base64.b64encode(sig).decode('ascii')}")]


@dataclass(frozen=True)
class _Known:
    device_id: str
    role: str
    key: ec.EllipticCurvePublicKey
    not_before: datetime.datetime
    not_after: datetime.datetime
    cert_sha256: str


class FleetTrust:
    """The fleet CA certificates a tracker accepts device identities from (several
    during a CA rotation). Verified certificates are cached (bounded) by their bytes,
    with their fingerprint (hashed once per certificate, not per request).

    Raises:
        DeviceAuthError: ``pem`` holds no certificate, or one that is not a CA.
    """

    def __init__(self, pem: bytes) -> None:
        try:
            cas = x509.load_pem_x509_certificates(pem)
        except ValueError as exc:
            raise DeviceAuthError(f"no fleet CA certificate: {exc}") from None
        for ca in cas:
            try:
                basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                basic = None
            if basic is None or not basic.ca:
                raise DeviceAuthError(f"{ca.subject.rfc4514_string()} is not a CA certificate")
        self._cas = cas
        self._known: OrderedDict[bytes, _Known] = OrderedDict()

    def verify(self, method: str, target: bytes, body: bytes, cert_header: bytes | None,
               signature_header: bytes | None, now: datetime.datetime) -> Authenticated:
        """Check a request's identity headers; return who signed it.

        The counter is returned, not checked: replay protection needs the last counter
        accepted from the device, which the caller stores.

        Raises:
            DeviceAuthError: a header missing or malformed, a certificate not issued by
                a fleet CA, outside its validity or not for client authentication, or a
                signature that does not verify.
        """
        if cert_header is None or signature_header is None:
            raise DeviceAuthError(f"request not signed: the {CERT_HEADER} and "
                                  f"{SIGNATURE_HEADER} headers are required")
        if len(cert_header) > _MAX_CERT_HEADER or len(signature_header) > _MAX_SIGNATURE_HEADER:
            raise DeviceAuthError("identity headers too long")
        if not _METHOD_RE.fullmatch(method):  # signed_message encodes it as ASCII
            raise DeviceAuthError("malformed request method")
        match = _SIGNATURE_RE.fullmatch(signature_header.strip())
        if match is None:
            raise DeviceAuthError(f"malformed {SIGNATURE_HEADER} header")
        counter = int(match.group(1))
        if counter > MAX_COUNTER:
            raise DeviceAuthError("signature counter out of range")
        try:
            der = base64.b64decode(cert_header, validate=True)
            sig = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise DeviceAuthError("identity headers are not valid base64") from None
        known = self._certificate(der)
        if not known.not_before <= now <= known.not_after:
            raise DeviceAuthError(f"device certificate of {known.device_id} is outside its "
                                  "validity period")
        try:
            known.key.verify(sig, signed_message(method, target, counter, body),
                             ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise DeviceAuthError(f"signature of {known.device_id} does not verify") from None
        return Authenticated(known.device_id, known.role, counter, known.cert_sha256,
                             known.not_after.timestamp())

    def _certificate(self, der: bytes) -> _Known:
        known = self._known.get(der)
        if known is not None:
            self._known.move_to_end(der)
            return known
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise DeviceAuthError("device certificate is not a DER certificate") from None
        if not any(_issued_by(cert, ca) for ca in self._cas):
            raise DeviceAuthError("device certificate is not issued by the fleet CA")
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (x509.ExtensionNotFound, ValueError):
            raise DeviceAuthError("device certificate has no client-auth usage") from None
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            raise DeviceAuthError("device certificate is not for client authentication")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise DeviceAuthError("device certificate key must be ECDSA")
        device_id, role = _identity_of(cert)
        known = _Known(device_id, role, key, cert.not_valid_before_utc,
                       cert.not_valid_after_utc, certificate_sha256(der))
        self._known[der] = known
        while len(self._known) > _CACHE_SIZE:
            self._known.popitem(last=False)
        return known


_IPAD = int.from_bytes(b"\x36" * 64, "big")
_OPAD = int.from_bytes(b"\x5c" * 64, "big")


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) of ``message`` under ``key`` (at most 64 bytes), the
    same bytes as ``hmac.digest(key, message, "sha256")`` at a third of its cost for
    short messages (no OpenSSL HMAC context per call; the announce path's hot spot)."""
    inner_pad, outer_pad = _pads(key)
    inner = hashlib.sha256(inner_pad + message).digest()
    return hashlib.sha256(outer_pad + inner).digest()


def _pads(key: bytes) -> tuple[bytes, bytes]:
    """HMAC's inner and outer pad blocks of ``key`` (at most 64 bytes).

    Raises:
        ValueError: a longer key.
    """
    if len(key) > 64:
        raise ValueError("hmac_sha256 takes keys of at most 64 bytes")
    padded = int.from_bytes(key.ljust(64, b"\0"), "big")
    return (padded ^ _IPAD).to_bytes(64, "big"), (padded ^ _OPAD).to_bytes(64, "big")


class _MacKey:
    """A key ready for many HMAC-SHA256 computations: the SHA-256 states after its
    inner and outer pad blocks, copied per message (half the cost of hashing both
    blocks again each time; what :class:`AnnounceKeys` keeps per derived key)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        inner_pad, outer_pad = _pads(key)
        self._inner = hashlib.sha256(inner_pad)
        self._outer = hashlib.sha256(outer_pad)

    def mac(self, message: bytes) -> bytes:
        """``hmac_sha256(key, message)``."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def derive_announce_key(secret: bytes, device_id: str, cert_sha256: str,
                        expires: int) -> bytes:
    """The announce key of ``device_id``'s certificate ``cert_sha256`` expiring at
    ``expires`` (epoch s), under the tracker's ``secret``."""
    return hmac_sha256(secret, b"\n".join([
        b"swarmota-announce-key-v1", device_id.encode("ascii"),
        cert_sha256.encode("ascii"), str(expires).encode("ascii")]))


@dataclass(frozen=True)
class AnnounceKey:
    """An announce key as a device holds it: whose (device id, certificate
    fingerprint), until when (``expires``, epoch s on the tracker's clock: part of the
    key's name), and the key's bytes."""

    device_id: str
    cert_sha256: str
    expires: int
    key: bytes = dataclass_field(repr=False)

    def headers(self, method: str, target: bytes, body: bytes,
                counter: int) -> list[tuple[str, str]]:
        """The header that authenticates ``METHOD target`` with ``body`` (an announce
        or a scrape) under this key."""
        if not 0 <= counter <= MAX_COUNTER:
            raise ValueError(f"counter out of range: {counter}")
        mac = hmac_sha256(self.key, signed_message(method, target, counter, body))
        return [(ANNOUNCE_AUTH_HEADER,
                 f"v1;id={self.device_id};cert={self.cert_sha256};exp={self.expires};"
                 f"counter={counter};mac={base64.b64encode(mac).decode('ascii')}")]


class AnnounceKeys:
    """The tracker's side of announce keys: issues them to devices whose check-in was
    signed, and verifies announces authenticated with them, from one server
    ``secret`` (every tracker process holds the same one). Keys live ``lifetime_s``
    seconds, never past their certificate's validity. Pure: the time is passed in.

    The last ``cache_size`` keys derived are kept, as their HMAC pad states (a
    derivation is a third of a verification).

    Raises:
        ValueError: ``secret`` shorter than 32 or longer than 64 bytes, or
            ``lifetime_s`` below 1.
    """

    def __init__(self, secret: bytes, lifetime_s: int, *, cache_size: int = _CACHE_SIZE
                 ) -> None:
        if not _MIN_SECRET_BYTES <= len(secret) <= 64:
            raise ValueError(f"announce key secret must be {_MIN_SECRET_BYTES}-64 bytes")
        if lifetime_s < 1:
            raise ValueError("announce key lifetime must be at least 1 s")
        self._secret = secret
        self.lifetime_s = lifetime_s
        self._derived: OrderedDict[bytes, _MacKey] = OrderedDict()
        self._cache_size = cache_size

    def issue(self, auth: Authenticated, now: float) -> AnnounceKey | None:
        """The key for the device that signed ``auth`` (a verified signature, not a
        MAC), expiring ``lifetime_s`` after ``now`` or with its certificate; ``None``
        for a seed identity or a certificate about to expire."""
        if auth.role != ROLE_DEVICE or auth.by_key or auth.not_after is None:
            return None
        expires = min(int(now) + self.lifetime_s, int(auth.not_after))
        if expires <= now:
            return None
        return AnnounceKey(auth.device_id, auth.cert_sha256, expires, derive_announce_key(
            self._secret, auth.device_id, auth.cert_sha256, expires))

    def verify(self, method: str, target: bytes, body: bytes, header: bytes,
               now: float) -> Authenticated:
        """Check an ``swarmota-announce-auth`` header; return who sent the request (a
        device; the counter is returned, not checked, as by :meth:`FleetTrust.verify`).

        Raises:
            DeviceAuthError: a malformed header, an expired key, or a MAC that does not
                verify (a key of another device, certificate or expiry, another
                server secret, or a tampered request).
        """
        if len(header) > _MAX_ANNOUNCE_AUTH_HEADER:
            raise DeviceAuthError(f"{ANNOUNCE_AUTH_HEADER} header too long")
        if not _METHOD_RE.fullmatch(method):
            raise DeviceAuthError("malformed request method")
        match = _ANNOUNCE_AUTH_RE.fullmatch(header.strip())
        if match is None:
            raise DeviceAuthError(f"malformed {ANNOUNCE_AUTH_HEADER} header")
        raw_id, raw_cert, raw_exp, raw_counter, raw_mac = match.groups()
        device_id = raw_id.decode("ascii", errors="replace")
        if not DEVICE_ID_RE.fullmatch(device_id):
            raise DeviceAuthError(f"malformed {ANNOUNCE_AUTH_HEADER} header: device id")
        counter, expires = int(raw_counter), int(raw_exp)
        if counter > MAX_COUNTER:
            raise DeviceAuthError("signature counter out of range")
        if now >= expires:
            raise DeviceAuthError(f"announce key of {device_id} expired")
        cert = raw_cert.decode("ascii")
        name = match.group(0)[:match.end(3)]  # "v1;id=...;cert=...;exp=..."
        key = self._derived.get(name)
        if key is None:
            key = self._derived[name] = _MacKey(derive_announce_key(
                self._secret, device_id, cert, expires))
            if len(self._derived) > self._cache_size:
                self._derived.popitem(last=False)
        want = key.mac(signed_message(method, target, counter, body))
        if not hmac.compare_digest(want, binascii.a2b_base64(raw_mac)):  # checked: base64
            raise DeviceAuthError(f"announce key MAC of {device_id} does not verify")
        return Authenticated(device_id, ROLE_DEVICE, counter, cert, by_key=True)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def find_header(headers: Sequence[tuple[bytes, bytes]], name: str) -> bytes | None:
    """The value of header ``name`` (lower case) in ASGI-style ``headers``; ``None``
    when absent. A header sent twice is refused as absent (no ambiguity)."""
    wanted = name.encode("ascii")
    found = [value for key, value in headers if key.lower() == wanted]
    return found[0] if len(found) == 1 else None
