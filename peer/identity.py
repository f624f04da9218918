"""The device's fleet identity: its certificate, its key and its request counter.

Layout (written by ``peer init --identity-cert --identity-key``)::

    STATE/identity/cert.pem     certificate from the fleet CA (CN = device id)
    STATE/identity/key.pem      its private key (mode 0600)
    STATE/identity/counter      highest request counter reserved so far
    STATE/identity/key.next.pem the key of a renewal in progress (``peer identity csr``)

The identity signs every request to the tracker (:mod:`infra.deviceauth`) and is the
device's TLS certificate in a private swarm (libtorrent SSL torrents).

Renewal without reflashing (:func:`renew_identity`, ``peer identity renew``): a new
certificate for the same key replaces ``cert.pem``; for a new key, ``peer identity
csr`` makes ``key.next.pem`` and a signing request, the fleet CA issues a certificate
for it (``swarmota tls device-cert --csr``), and the renewal writes that certificate,
then renames ``key.next.pem`` over ``key.pem``. A crash between the two is finished by
the next load (the certificate names the next key). The request counter goes on: the
tracker keeps its last counter per device, whatever the certificate.

Counters strictly increase, also across crashes, restarts and clock changes: a counter
is ``max(last + 1, wall clock in microseconds)``, and before a counter is used, a
reservation above it is written to ``counter`` (atomically, at most about once an hour
of counters). After a crash the device starts above the reservation, so no counter is
ever used twice. The wall clock only lifts counters: a device whose state directory was
wiped but whose identity survived starts above anything it sent before, unless its
clock is also far behind.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swarmota.infra.devca import DevCaError, make_device_csr, new_device_key_pem
from swarmota.infra.deviceauth import MAX_COUNTER, DeviceAuthError, RequestSigner
from swarmota.infra.fsio import atomic_write_bytes, fsync_dir
from swarmota.peer.errors import ConfigError

__all__ = ["COUNTER_RESERVATION", "Identity", "install_identity", "load_identity",
           "load_identity_dir", "renew_identity", "renewal_csr"]

COUNTER_RESERVATION = 3600 * 1_000_000
"""Counters reserved by one write of the counter file (an hour of microseconds)."""

_CERT = "cert.pem"
_KEY = "key.pem"
_KEY_NEXT = "key.next.pem"
_COUNTER = "counter"
_MAX_PEM = 64 * 1024


@dataclass
class Identity:
    """A loaded identity: the PEM files, a signer, and the counter source."""

    directory: Path
    cert_pem: bytes
    key_pem: bytes
    signer: RequestSigner
    clock: Callable[[], float] = time.time
    _next: int | None = None
    _reserved: int = 0

    @property
    def device_id(self) -> str:
        return self.signer.device_id

    def tls_identity(self) -> tuple[bytes, bytes] | None:
        """The certificate and key (PEM) this identity presents in private swarms (TLS
        between peers); ``None`` when it has none."""
        return self.cert_pem, self.key_pem

    def next_counter(self) -> int:
        """The next request counter (strictly above every one handed out before).

        Raises:
            OSError: the reservation cannot be written (the counter is then not used).
        """
        if self._next is None:
            self._reserved = _read_counter(self.directory / _COUNTER)
            self._next = self._reserved
        value = max(self._next, int(self.clock() * 1_000_000))
        if value >= MAX_COUNTER:
            raise OSError("request counter exhausted")
        if value >= self._reserved:
            reserve = min(value + COUNTER_RESERVATION, MAX_COUNTER)
            atomic_write_bytes(self.directory / _COUNTER, f"{reserve}\n".encode())
            self._reserved = reserve
        self._next = value + 1
        return value


def _read_counter(path: Path) -> int:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    try:
        value = int(text.strip())
    except ValueError:
        # a torn write cannot happen (atomic rename); a damaged file must not make the
        # device reuse counters: start from the clock, which is above it in practice
        return 0
    return value if 0 <= value <= MAX_COUNTER else 0


def load_identity(state_dir: Path) -> Identity | None:
    """The identity in ``state_dir/identity``, or ``None`` when the device has none.

    Raises:
        ConfigError: the files exist but cannot be read, or do not form an identity.
    """
    directory = state_dir / "identity"
    if not (directory / _CERT).exists() and not (directory / _KEY).exists():
        return None
    return load_identity_dir(directory)


def load_identity_dir(directory: Path) -> Identity:
    """The identity in ``directory`` (``cert.pem``, ``key.pem``, as ``swarmota tls
    device-cert`` writes them; the counter file goes there too), e.g. a seeder's.

    Raises:
        ConfigError: the files cannot be read, or do not form an identity.
    """
    cert_path, key_path = directory / _CERT, directory / _KEY
    try:
        cert_pem = _read_small(cert_path)
        key_pem = _read_small(key_path)
        try:
            signer = RequestSigner(cert_pem, key_pem)
        except DeviceAuthError:
            # a renewal to a new key that stopped between writing the certificate and
            # moving the key in: finish it if the certificate is the next key's
            next_pem = _read_small(directory / _KEY_NEXT)
            signer = RequestSigner(cert_pem, next_pem)
            os.replace(directory / _KEY_NEXT, key_path)
            fsync_dir(directory)
            key_pem = next_pem
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot read the device identity in {directory}: "
                          f"{exc.strerror or exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the device identity in {directory}: "
                          f"{exc.strerror or exc}") from None
    except DeviceAuthError as exc:
        raise ConfigError(f"device identity in {directory}: {exc}") from None
    return Identity(directory, cert_pem, key_pem, signer)


def install_identity(state_dir: Path, cert: Path, key: Path, device_id: str) -> None:
    """Copy a fleet certificate and key into ``state_dir/identity`` (``peer init``).

    Raises:
        ConfigError: unreadable files, a key not matching the certificate, or a
            certificate naming another device than ``device_id``.
    """
    try:
        cert_pem, key_pem = _read_small(cert), _read_small(key)
        signer = RequestSigner(cert_pem, key_pem)
    except OSError as exc:
        raise ConfigError(f"cannot read the identity files: {exc.strerror or exc}") from None
    except DeviceAuthError as exc:
        raise ConfigError(str(exc)) from None
    if signer.device_id != device_id:
        raise ConfigError(f"identity certificate is for {signer.device_id!r}, not for "
                          f"this device {device_id!r}")
    directory = state_dir / "identity"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(directory / _KEY, key_pem, mode=0o600)
    atomic_write_bytes(directory / _CERT, cert_pem)


def renewal_csr(state_dir: Path) -> bytes:
    """A certificate signing request for a new identity key of the device in
    ``state_dir`` (``STATE/identity/key.next.pem``, made now unless a renewal is already
    under way: asking twice gives a request for the same key).

    Raises:
        ConfigError: the device has no identity, or its files cannot be used.
    """
    current = load_identity(state_dir)
    if current is None:
        raise ConfigError(f"{state_dir} has no device identity to renew (peer init "
                          "--identity-cert/--identity-key)")
    next_path = current.directory / _KEY_NEXT
    try:
        if not next_path.exists():
            atomic_write_bytes(next_path, new_device_key_pem(), mode=0o600)
        return make_device_csr(_read_small(next_path), current.device_id,
                               role=current.signer.role)
    except OSError as exc:
        raise ConfigError(f"cannot write {next_path}: {exc.strerror or exc}") from None
    except DevCaError as exc:
        raise ConfigError(f"{next_path}: {exc}") from None


def renew_identity(state_dir: Path, cert: Path, *,
                   now: datetime.datetime | None = None) -> str:
    """Install a renewed certificate ``cert`` for the device in ``state_dir``; return
    ``"same key"`` or ``"new key"``.

    The certificate must name this device, be valid now, and be for the current key (it
    replaces ``cert.pem``) or for the key of a pending renewal (``key.next.pem``: the
    certificate is written, then the key moved in). Whether the fleet CA issued it is
    the tracker's check (the device does not hold the CA).

    Raises:
        ConfigError: no identity, an unreadable certificate, another device, a
            certificate not valid now, or one for neither key.
    """
    current = load_identity(state_dir)
    if current is None:
        raise ConfigError(f"{state_dir} has no device identity to renew")
    try:
        cert_pem = _read_small(cert)
    except OSError as exc:
        raise ConfigError(f"cannot read {cert}: {exc.strerror or exc}") from None
    when = now or datetime.datetime.now(datetime.UTC)
    directory = current.directory
    next_path = directory / _KEY_NEXT
    for key_pem, kind in ((current.key_pem, "same key"),
                          (_read_optional(next_path), "new key")):
        if key_pem is None:
            continue
        try:
            signer = RequestSigner(cert_pem, key_pem)
        except DeviceAuthError:
            continue
        if signer.device_id != current.device_id:
            raise ConfigError(f"{cert} is for device {signer.device_id!r}, this device is "
                              f"{current.device_id!r}")
        if not signer.not_before <= when < signer.not_after:
            raise ConfigError(f"{cert} is not valid now (valid "
                              f"{signer.not_before.isoformat()} to "
                              f"{signer.not_after.isoformat()})")
        atomic_write_bytes(directory / _CERT, cert_pem)
        if kind == "new key":
            os.replace(next_path, directory / _KEY)
            fsync_dir(directory)
        return kind
    raise ConfigError(f"{cert} is for neither the device's key nor the key of a pending "
                      "renewal ('peer identity csr')")


def _read_optional(path: Path) -> bytes | None:
    try:
        return _read_small(path)
    except FileNotFoundError:
        return None


def _read_small(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(_MAX_PEM + 1)
    if len(data) > _MAX_PEM:
        raise OSError(f"{path} is larger than {_MAX_PEM} bytes")
    return data
