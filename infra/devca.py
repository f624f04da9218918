"""A development certificate authority: a CA, server certificates, spare keys, pins.

For demos, tests and private fleets that run their own CA. Keys are ECDSA P-256; files
are PEM, written atomically (:mod:`infra.fsio`), private keys with mode 0600.

Layout::

    CA_DIR/ca.pem  ca-key.pem                 create_ca
    OUT_DIR/cert.pem  key.pem                 issue_server_cert (+ backup-key.pem)
    OUT_DIR/cert.pem  key.pem                 issue_device_cert (a fleet identity)
    OUT_DIR/cert.pem                          issue_device_cert_from_csr (a renewal, or a
                                              key made in a TPM: the key stays on the
                                              device, make_device_csr; one certificate
                                              per request in the file)
    FILE                                      generate_key_file (a spare key)

Errors: :class:`DevCaError` (bad names, missing or unreadable CA, refusing to overwrite
a key).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from swarmota.infra.deviceauth import (
    DEVICE_ID_RE,
    ROLE_DEVICE,
    ROLE_SEED,
    ROLES,
    DeviceAuthError,
    SigningKey,
    identity_of_name,
)
from swarmota.infra.fsio import atomic_write_bytes
from swarmota.infra.tlspin import pin_of_certificate, pin_of_public_key

__all__ = [
    "BACKUP_KEY_FILE",
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CERT_FILE",
    "KEY_FILE",
    "DevCaError",
    "ServerFiles",
    "create_ca",
    "ROLES",
    "ROLE_DEVICE",
    "ROLE_SEED",
    "ROLE_SWARM",
    "generate_key_file",
    "issue_device_cert",
    "issue_device_cert_from_csr",
    "issue_server_cert",
    "make_device_csr",
    "make_device_csr_with",
    "new_device_key_pem",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
BACKUP_KEY_FILE = "backup-key.pem"
ROLE_SWARM = "swarm"
"""The role of a certificate good only for private swarms (TLS between peers): the key
of a device whose identity key is in a TPM and cannot serve libtorrent
(:mod:`peer.keystore`). The tracker accepts no request signed with it (its roles are
``device`` and ``seed``)."""
CERT_ROLES = (*ROLES, ROLE_SWARM)

_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class DevCaError(Exception):
    """The CA or a certificate cannot be made (the message says why)."""


@dataclass(frozen=True)
class ServerFiles:
    """What :func:`issue_server_cert` wrote, with the SPKI pins to provision devices."""

    cert: Path
    key: Path
    pin: str
    backup_key: Path | None = None
    backup_pin: str | None = None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_new_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    if path.exists():
        raise DevCaError(f"{path} exists: refusing to overwrite a private key")
    atomic_write_bytes(path, _key_pem(key), mode=0o600)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise DevCaError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise DevCaError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DevCaError(f"{path}: expected an ECDSA key, got {type(key).__name__}")
    return key


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)


def create_ca(directory: Path, *, common_name: str = "swarmota development CA",
              valid_days: int = 3650, now: datetime.datetime | None = None) -> Path:
    """Create ``ca-key.pem`` and the self-signed ``ca.pem`` in ``directory``; return the
    certificate's path (the file clients trust, e.g. ``peer init --tls-ca-file``).

    Raises:
        DevCaError: ``directory`` already holds a CA key, or ``valid_days`` < 1.
    """
    if valid_days < 1:
        raise DevCaError(f"valid_days must be at least 1, got {valid_days}")
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now(now)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write_new_key(directory / CA_KEY_FILE, key)
    cert_path = directory / CA_CERT_FILE
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path = ca_dir / CA_CERT_FILE
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise DevCaError(f"cannot read {cert_path}: {exc.strerror or exc} "
                         "(create the CA with 'swarmota tls ca DIR')") from None
    except ValueError as exc:
        raise DevCaError(f"{cert_path}: not a PEM certificate: {exc}") from None
    key = _load_key(ca_dir / CA_KEY_FILE)
    if pin_of_certificate(cert) != pin_of_public_key(key.public_key()):
        raise DevCaError(f"{ca_dir}: {CA_KEY_FILE} does not belong to {CA_CERT_FILE}")
    return cert, key


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise DevCaError(f"{name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name.rstrip(".").lower())


def issue_server_cert(ca_dir: Path, out_dir: Path, names: Sequence[str], *,
                      key_file: Path | None = None, backup: bool = False,
                      valid_days: int = 397,
                      now: datetime.datetime | None = None) -> ServerFiles:
    """Issue ``out_dir/cert.pem`` for ``names`` (DNS names and IP addresses, all in the
    subjectAltName; the first is also the common name), signed by the CA in ``ca_dir``.

    The certificate's key is ``key_file`` if given (e.g. the spare key a server rotates
    to; it is copied to ``out_dir/key.pem``), else ``out_dir/key.pem`` if it exists
    (renewal keeps the key, and so its pin), else a new key. With ``backup`` a spare key
    ``out_dir/backup-key.pem`` is created if missing; pin it on devices next to the
    current key.

    Raises:
        DevCaError: no names, a bad name, ``valid_days`` < 1, a missing or unreadable CA
            or key.
    """
    if not names:
        raise DevCaError("at least one DNS name or IP address is needed")
    sans = [_san_entry(name) for name in names]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    files = _issue_leaf(ca_dir, out_dir, subject, sans, [ExtendedKeyUsageOID.SERVER_AUTH],
                        key_file=key_file, valid_days=valid_days, now=now)
    if backup:
        backup_path = out_dir / BACKUP_KEY_FILE
        backup_pin = (pin_of_public_key(_load_key(backup_path).public_key())
                      if backup_path.exists() else generate_key_file(backup_path))
        files = ServerFiles(cert=files.cert, key=files.key, pin=files.pin,
                            backup_key=backup_path, backup_pin=backup_pin)
    return files


def issue_device_cert(ca_dir: Path, out_dir: Path, device_id: str, *,
                      role: str = ROLE_DEVICE, valid_days: int = 3650,
                      now: datetime.datetime | None = None) -> ServerFiles:
    """Issue a fleet identity ``out_dir/cert.pem`` (+ ``key.pem``) for ``device_id``,
    signed by the fleet CA in ``ca_dir``.

    The subject is ``CN=<device_id>, OU=<role>`` (``device``, or ``seed`` for the
    operator's seeders). The certificate serves twice: the tracker checks the requests a
    device signs with its key (:mod:`infra.deviceauth`), and peers of a private swarm
    (libtorrent SSL torrents whose root is the fleet CA) check it in their TLS
    handshake; for libtorrent its subjectAltName is ``*`` (valid for every torrent of
    the fleet CA). An existing ``key.pem`` is kept (re-issuing keeps the identity key).

    Raises:
        DevCaError: a bad device id or role, ``valid_days`` < 1, a missing or unreadable
            CA or key.
    """
    return _issue_leaf(ca_dir, out_dir, _device_subject(device_id, role),
                       [x509.DNSName("*")], _DEVICE_USAGES,
                       key_file=None, valid_days=valid_days, now=now)


def _issue_leaf(ca_dir: Path, out_dir: Path, subject: x509.Name,
                sans: Sequence[x509.GeneralName], usages: Sequence[x509.ObjectIdentifier],
                *, key_file: Path | None, valid_days: int,
                now: datetime.datetime | None) -> ServerFiles:
    if valid_days < 1:
        raise DevCaError(f"valid_days must be at least 1, got {valid_days}")
    ca = _load_ca(ca_dir)
    key_path = out_dir / KEY_FILE
    if key_file is not None:
        key = _load_key(key_file)
    elif key_path.exists():
        key = _load_key(key_path)
    else:
        key = _new_key()
    cert = _build_leaf(ca, subject, sans, usages, key.public_key(), valid_days, now)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(key_path, _key_pem(key), mode=0o600)
    cert_path = out_dir / CERT_FILE
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return ServerFiles(cert=cert_path, key=key_path, pin=pin_of_certificate(cert))


def _build_leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], subject: x509.Name,
                sans: Sequence[x509.GeneralName], usages: Sequence[x509.ObjectIdentifier],
                public_key: ec.EllipticCurvePublicKey, valid_days: int,
                now: datetime.datetime | None) -> x509.Certificate:
    ca_cert, ca_key = ca
    start = _now(now)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _device_subject(device_id: str, role: str) -> x509.Name:
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise DevCaError(f"bad device id {device_id!r}: 1-128 of A-Z a-z 0-9 . _ : -")
    if role not in CERT_ROLES:
        raise DevCaError(f"role must be one of {', '.join(CERT_ROLES)}, not {role!r}")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])


_DEVICE_USAGES = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)


def new_device_key_pem() -> bytes:
    """A new ECDSA P-256 private key for a fleet identity, unencrypted PKCS#8 PEM."""
    return _key_pem(_new_key())


def make_device_csr(key_pem: bytes, device_id: str, *, role: str = ROLE_DEVICE) -> bytes:
    """A certificate signing request (PEM) for a fleet identity: ``CN=device_id,
    OU=role``, signed with the ECDSA P-256 key ``key_pem`` (the device keeps the key;
    only the request travels to the CA, :func:`issue_device_cert_from_csr`).

    Raises:
        DevCaError: a bad device id or role, or a key that is not ECDSA P-256 PEM.
    """
    subject = _device_subject(device_id, role)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise DevCaError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise DevCaError("a fleet identity key must be ECDSA P-256")
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
        key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def make_device_csr_with(key: SigningKey, device_id: str, *,
                         role: str = ROLE_DEVICE) -> bytes:
    """A certificate signing request (PEM) like :func:`make_device_csr`'s, for a key
    that signs without showing itself (a TPM's): the request is drafted with a
    stand-in key, whose public key is then swapped for ``key``'s (same length: both
    P-256), and ``key`` signs it.

    Raises:
        DevCaError: a bad device id or role, a key that is not P-256, or a signature
            that does not verify.
        DeviceAuthError: ``key`` cannot sign.
    """
    subject = _device_subject(device_id, role)
    stand_in = _new_key()
    draft = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
        stand_in, hashes.SHA256())
    old, new = _spki(stand_in.public_key()), _spki(key.public_key())
    tbs = draft.tbs_certrequest_bytes
    if len(old) != len(new) or tbs.count(old) != 1:
        raise DevCaError("a fleet identity key must be ECDSA P-256")
    tbs = tbs.replace(old, new)
    der = _der(0x30, tbs + _ECDSA_WITH_SHA256 + _der(0x03, b"\x00" + key.sign(tbs)))
    csr = x509.load_der_x509_csr(der)
    if not csr.is_signature_valid:
        raise DevCaError("the key's signature over the signing request does not verify")
    return csr.public_bytes(serialization.Encoding.PEM)


_ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
"""AlgorithmIdentifier ecdsa-with-SHA256 (RFC 5758), DER."""


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _der(tag: int, content: bytes) -> bytes:
    """One DER element: ``tag``, definite length, ``content``."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _split_pem(data: bytes, label: bytes) -> list[bytes]:
    """Each ``-----BEGIN <label>-----`` block of ``data``, in order."""
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    blocks = []
    for part in data.split(begin)[1:]:
        body, sep, _ = part.partition(end)
        if sep:
            blocks.append(begin + body + end + b"\n")
    return blocks


def issue_device_cert_from_csr(ca_dir: Path, csr_pem: bytes, out_dir: Path, *,
                               device_id: str | None = None, valid_days: int = 3650,
                               now: datetime.datetime | None = None) -> Path:
    """Issue ``out_dir/cert.pem`` for the key of each signing request in ``csr_pem``
    (a renewal with a new key, or a key made in a TPM: the private key never leaves
    the device); return its path. The file holds one certificate per request, in the
    order of the requests (a device with a TPM asks for two: its identity, and
    ``OU=swarm`` for its TLS key in private swarms).

    Each request must be signed by its own key (ECDSA P-256) and name a valid device
    id (``device_id`` if given; all the same) and a role (``device``, ``seed`` or
    ``swarm``, each at most once); the certificates are those :func:`issue_device_cert`
    makes. No ``key.pem`` is written.

    Raises:
        DevCaError: an unreadable or badly signed request, another device id, a bad role
            or key type, ``valid_days`` < 1, a missing or unreadable CA.
    """
    blocks = _split_pem(csr_pem, b"CERTIFICATE REQUEST")
    if not blocks or len(blocks) > len(CERT_ROLES):
        raise DevCaError(f"not a PEM certificate signing request (or more than "
                         f"{len(CERT_ROLES)} of them)")
    if valid_days < 1:
        raise DevCaError(f"valid_days must be at least 1, got {valid_days}")
    ca = _load_ca(ca_dir)
    issued: list[bytes] = []
    roles: set[str] = set()
    for block in blocks:
        requested_id, role, public_key = _check_csr(block)
        if device_id is not None and requested_id != device_id:
            raise DevCaError(f"the signing request is for {requested_id!r}, not "
                             f"{device_id!r}")
        device_id = requested_id
        if role in roles:
            raise DevCaError(f"two signing requests for the role {role!r}")
        roles.add(role)
        cert = _build_leaf(ca, _device_subject(requested_id, role), [x509.DNSName("*")],
                           _DEVICE_USAGES, public_key, valid_days, now)
        issued.append(cert.public_bytes(serialization.Encoding.PEM))
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path = out_dir / CERT_FILE
    atomic_write_bytes(cert_path, b"".join(issued))
    return cert_path


def _check_csr(pem: bytes) -> tuple[str, str, ec.EllipticCurvePublicKey]:
    """``(device id, role, public key)`` of a well-signed P-256 request; DevCaError."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise DevCaError(f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise DevCaError("the signing request is not signed by its own key")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or \
            public_key.curve.name != "secp256r1":
        raise DevCaError("a fleet identity key must be ECDSA P-256")
    try:
        requested_id, role = identity_of_name(csr.subject, CERT_ROLES)
    except DeviceAuthError as exc:
        raise DevCaError(f"signing request: {exc}") from None
    return requested_id, role, public_key


def generate_key_file(path: Path) -> str:
    """Write a new private key to ``path`` (mode 0600); return its SPKI pin.

    Raises:
        DevCaError: ``path`` exists (keys are never overwritten).
    """
    key = _new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_new_key(path, key)
    return pin_of_public_key(key.public_key())
