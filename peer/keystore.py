"""Where the device keeps its keys, floors and trust anchor: files (the default) or a TPM.

``device.json``'s ``keystore`` chooses (``peer init --keystore file|tpm``):

- ``file``: the identity key is ``STATE/identity/key.pem`` (:mod:`peer.identity`), the
  floors and the trusted root are files of the state directory;
- ``tpm`` (``tpm_device``: ``/dev/tpmrm0`` or a TCTI such as ``swtpm:path=SOCKET``):
  :class:`TpmKeyStore`. The identity key is made inside the TPM and never leaves it;
  the floors and the trust anchor are held by extend-only indices of its NV space
  (:mod:`peer.tpm_nv`: a floor log and the anchored roots in the state directory, which
  must fold to the TPM's values).

**The TPM's objects** (persistent handles in the owner hierarchy, two sets so that a
renewal to new keys can wait for its certificates)::

    0x81000101 / 0x81000103   identity key: ECDSA P-256, signs tracker requests
    0x81000102 / 0x81000104   sealed swarm key: the 32-byte scalar of the TLS key of
                              private swarms

``STATE/identity/`` then holds ``tpm.json`` (which set is current, and a renewal's
next one), ``cert.pem`` (the identity's fleet certificate), ``swarm-cert.pem``
(``OU=swarm``), ``request.pem`` (the signing requests ``peer init`` made) and
``counter`` (:mod:`peer.identity`). No file holds a private key.

**Why the private swarm's TLS has a key of its own.** libtorrent needs a private key it
can use in its TLS handshakes, and it has no way to reach a TPM: its wheel carries its
own OpenSSL (3.5, static), into which an OpenSSL TPM provider (Debian's tpm2-openssl)
would have to be loaded through a process-wide ``OPENSSL_CONF`` that Python's own
``ssl`` reads too; the provider also registers the TPM's digests, which OpenSSL then
prefers for the handshake transcript (each handshake becomes dozens of TPM commands,
and without a resource manager it fails: we tried). A per-boot key certified by the
identity key would need the device certificate to be a CA, which the fleet CA
(``pathlen:0``) forbids, and libtorrent sends only the leaf certificate anyway, so
peers could not build the chain. So the TLS key is a software key made at provisioning,
with its own certificate from the fleet CA (``OU=swarm``: good for private swarms only,
the tracker accepts no request signed with it), **sealed by the TPM**: the state
directory holds nothing of it, :meth:`TpmKeyStore.swarm_key_pem` unseals it into the
agent's memory for the length of a pass and hands it to libtorrent as a buffer (with
``tpm_pcrs``, only in the boot state it was sealed in). What a thief of the disk gets:
nothing. What code running as root on the device could get: that TLS key (a seat in
the fleet's private swarms until the fleet CA is rotated), never the identity key.

**Measured boot** (optional, ``tpm_pcrs``, e.g. ``sha256:7``): both keys are created
with a PCR policy, so the TPM signs and unseals only while those PCRs hold the values
they held at provisioning. Choose PCRs that measure how the device boots, not what the
slots hold (PCR 7: the Secure Boot state and keys): an A/B update must not change
them, or the device would lose its identity with its first update.

Blocking (TPM commands): call from a worker thread in async code.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from swarmota.infra.devca import ROLE_SWARM, DevCaError, make_device_csr, make_device_csr_with
from swarmota.infra.deviceauth import ROLE_DEVICE, DeviceAuthError, RequestSigner, identity_of_name
from swarmota.infra.fsio import atomic_write_bytes, atomic_write_json, fsync_dir
from swarmota.peer.config import DeviceConfig
from swarmota.peer.errors import ConfigError
from swarmota.peer.identity import Identity
from swarmota.peer.tpm import PcrSelection, Tpm, TpmError
from swarmota.peer.tpm_nv import FLOOR_LOG, NvFloors, TrustAnchor

__all__ = ["TPM_HANDLES", "TpmIdentity", "TpmKeyStore", "TpmSigningKey",
           "open_keystore"]

TPM_HANDLES = {"a": (0x81000101, 0x81000102), "b": (0x81000103, 0x81000104)}
"""Per set: the identity key's persistent handle, the sealed swarm key's."""

_LAYOUT = "tpm.json"
_CERT = "cert.pem"
_SWARM_CERT = "swarm-cert.pem"
_REQUEST = "request.pem"
_MAX_PEM = 64 * 1024


class TpmSigningKey:
    """A :class:`~swarmota.infra.deviceauth.SigningKey` held by the TPM (persistent handle)."""

    def __init__(self, tpm: Tpm, handle: int, pcrs: PcrSelection | None) -> None:
        self._tpm, self._handle, self._pcrs = tpm, handle, pcrs
        self._public: ec.EllipticCurvePublicKey | None = None

    def public_key(self) -> ec.EllipticCurvePublicKey:
        if self._public is None:
            self._public = self._tpm.public_key(self._handle)
        return self._public

    def sign(self, message: bytes) -> bytes:
        try:
            return self._tpm.sign_digest(self._handle, hashlib.sha256(message).digest(),
                                         self._pcrs)
        except TpmError as exc:
            why = (" (the boot state is not the one the key was sealed to)"
                   if "policy check failed" in str(exc) else "")
            raise DeviceAuthError(f"the TPM did not sign{why}: {exc}") from None


@dataclass
class TpmIdentity(Identity):
    """An identity whose key is in the TPM; its TLS identity for private swarms is the
    sealed swarm key with ``swarm-cert.pem``."""

    store: TpmKeyStore | None = None
    swarm_cert_pem: bytes | None = field(default=None, repr=False)

    def tls_identity(self) -> tuple[bytes, bytes] | None:
        if self.store is None or self.swarm_cert_pem is None:
            return None
        return self.swarm_cert_pem, self.store.swarm_key_pem()


class TpmKeyStore:
    """The device's keys, floors and trust anchor in a TPM (module docstring)."""

    def __init__(self, tpm: Tpm, state_root: Path, device_id: str, product: str,
                 pcrs: PcrSelection | None = None) -> None:
        self.tpm = tpm
        self.directory = state_root / "identity"
        self.device_id = device_id
        self.pcrs = pcrs
        self.anchor = TrustAnchor(tpm, state_root / "trust")
        self.floors = NvFloors(tpm, state_root / "trust" / FLOOR_LOG, self.anchor, product)

    # --- provisioning -------------------------------------------------------------------

    def provision(self, *, root_json: bytes, image_floor: int, force: bool) -> bytes:
        """Make the identity and swarm keys, the floors and the trust anchor afresh;
        return the signing requests (also written to ``identity/request.pem``).

        Raises:
            ConfigError: the TPM already holds swarmota keys and ``force`` is not set.
            TpmError: the TPM refused.
        """
        ours = {h for pair in TPM_HANDLES.values() for h in pair}
        if not force and ours & self.tpm.persistent_handles():
            raise ConfigError(f"the TPM ({self.tpm.tcti}) already holds swarmota keys (a "
                              "device provisioned before): use --force to replace them")
        for handle in sorted(ours):
            self.tpm.evict(handle)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in (_CERT, _SWARM_CERT, "key.pem", "key.next.pem"):
            (self.directory / stale).unlink(missing_ok=True)
        self._make_keys("a")
        self._write_layout({"current": "a", "next": None})
        self.floors.provision(image_floor)
        self.anchor.provision(root_json)
        return self._write_requests("a")

    def _make_keys(self, slot: str) -> None:
        identity, swarm = TPM_HANDLES[slot]
        self.tpm.create_signing_key(identity, self.pcrs)
        scalar = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value
        self.tpm.seal(swarm, scalar.to_bytes(32, "big"), self.pcrs)

    def _write_requests(self, slot: str) -> bytes:
        identity, _ = TPM_HANDLES[slot]
        try:
            requests = (make_device_csr_with(TpmSigningKey(self.tpm, identity, self.pcrs),
                                             self.device_id, role=ROLE_DEVICE)
                        + _csr_of(self.swarm_key(slot), self.device_id))
        except (DevCaError, DeviceAuthError) as exc:
            raise ConfigError(f"cannot make the signing requests: {exc}") from None
        atomic_write_bytes(self.directory / _REQUEST, requests)
        return requests

    @property
    def request_path(self) -> Path:
        return self.directory / _REQUEST

    # --- the identity ---------------------------------------------------------------

    def identity(self) -> TpmIdentity | None:
        """The identity, once its certificate is installed; ``None`` before (requests
        go unsigned). A renewal that stopped after writing the new certificate is
        finished here.

        Raises:
            ConfigError: the certificate is for no key of the TPM, or unreadable.
            TpmError: the TPM cannot be used.
        """
        cert_pem = _read_optional(self.directory / _CERT)
        if cert_pem is None:
            return None
        layout = self._layout()
        slot = layout["current"]
        try:
            signer = self._signer(cert_pem, slot)
        except DeviceAuthError:
            pending = layout.get("next")
            if pending is None:
                raise ConfigError(f"{self.directory / _CERT} is not the certificate of the "
                                  "TPM's identity key") from None
            try:
                signer = self._signer(cert_pem, pending)
            except DeviceAuthError as exc:
                raise ConfigError(f"{self.directory / _CERT}: {exc}") from None
            self._switch_to(pending, slot)
            slot = pending
        swarm_pem = _read_optional(self.directory / _SWARM_CERT)
        if swarm_pem is not None and not _cert_matches(swarm_pem, self.swarm_key(slot)):
            swarm_pem = None
        return TpmIdentity(self.directory, cert_pem, b"", signer, store=self,
                           swarm_cert_pem=swarm_pem)

    def _signer(self, cert_pem: bytes, slot: str) -> RequestSigner:
        return RequestSigner(cert_pem, TpmSigningKey(self.tpm, TPM_HANDLES[slot][0],
                                                     self.pcrs))

    def swarm_key(self, slot: str | None = None) -> ec.EllipticCurvePrivateKey:
        """The TLS key of private swarms, unsealed by the TPM (``slot``: current)."""
        slot = slot or self._layout()["current"]
        scalar = self.tpm.unseal(TPM_HANDLES[slot][1], self.pcrs)
        if len(scalar) != 32:
            raise TpmError(f"the sealed swarm key at 0x{TPM_HANDLES[slot][1]:08x} is not a "
                           "P-256 scalar")
        return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())

    def swarm_key_pem(self) -> bytes:
        """:meth:`swarm_key` as PEM, for libtorrent (kept in memory only)."""
        return self.swarm_key().private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    # --- renewal --------------------------------------------------------------------

    def renewal_requests(self) -> bytes:
        """Signing requests for new identity and swarm keys, made in the TPM's other set
        now unless a renewal is already under way (asking twice gives requests for the
        same keys)."""
        layout = self._layout()
        pending = layout.get("next")
        if pending is None:
            pending = "b" if layout["current"] == "a" else "a"
            self._make_keys(pending)
            self._write_layout({"current": layout["current"], "next": pending})
        return self._write_requests(pending)

    def renewal_pending(self) -> bool:
        """True while new keys wait for their certificates (:meth:`renewal_requests`)."""
        return self._layout().get("next") is not None

    def install(self, pem: bytes, *, now: datetime.datetime | None = None) -> str:
        """Install the certificates in ``pem`` (``tls device-cert --csr``'s file: the
        identity's, and ``OU=swarm`` for the swarm key); return ``"same key"`` or
        ``"new key"``. Certificates for the keys of a pending renewal need both; the
        keys are switched once they are written.

        Raises:
            ConfigError: a certificate for another device, not valid now, or for no key
                of the TPM; none for the identity key.
        """
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError as exc:
            raise ConfigError(f"not PEM certificates: {exc}") from None
        when = now or datetime.datetime.now(datetime.UTC)
        layout = self._layout()
        for slot, kind in ((layout["current"], "same key"), (layout.get("next"), "new key")):
            if slot is None:
                continue
            identity = _pick(certs, TpmSigningKey(self.tpm, TPM_HANDLES[slot][0],
                                                  self.pcrs).public_key())
            swarm = _pick(certs, self.swarm_key(slot).public_key())
            if identity is None and swarm is None:
                continue
            for cert, role in ((identity, ROLE_DEVICE), (swarm, ROLE_SWARM)):
                if cert is not None:
                    self._check(cert, role, when)
            if kind == "new key" and (identity is None or swarm is None):
                raise ConfigError("the keys of a renewal need both certificates (identity "
                                  "and swarm): give the whole file 'tls device-cert --csr' "
                                  "wrote")
            if swarm is not None:
                atomic_write_bytes(self.directory / _SWARM_CERT,
                                   swarm.public_bytes(serialization.Encoding.PEM))
            if identity is not None:
                atomic_write_bytes(self.directory / _CERT,
                                   identity.public_bytes(serialization.Encoding.PEM))
            elif not (self.directory / _CERT).exists():
                raise ConfigError("no certificate for the identity key in the file")
            if kind == "new key":
                self._switch_to(slot, layout["current"])
            return kind
        raise ConfigError("the certificates are for no key of the TPM (neither the current "
                          "keys nor those of a pending renewal)")

    def _check(self, cert: x509.Certificate, role: str, when: datetime.datetime) -> None:
        try:
            device_id, cert_role = identity_of_name(cert.subject, (role,))
        except DeviceAuthError as exc:
            raise ConfigError(f"certificate for the {role} key: {exc}") from None
        if device_id != self.device_id:
            raise ConfigError(f"the certificate is for device {device_id!r}, this device is "
                              f"{self.device_id!r}")
        if not cert.not_valid_before_utc <= when < cert.not_valid_after_utc:
            raise ConfigError(f"the {cert_role} certificate is not valid now (valid "
                              f"{cert.not_valid_before_utc.isoformat()} to "
                              f"{cert.not_valid_after_utc.isoformat()})")

    def _switch_to(self, slot: str, old: str) -> None:
        """Make ``slot`` the current set and drop ``old``'s keys (after the new
        certificate is written: a power cut in between is finished by :meth:`identity`)."""
        self._write_layout({"current": slot, "next": None})
        for handle in TPM_HANDLES[old]:
            self.tpm.evict(handle)

    # --- the layout file --------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        path = self.directory / _LAYOUT
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: provision the device with 'peer init "
                              "--keystore tpm'") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if (not isinstance(raw, dict) or raw.get("current") not in TPM_HANDLES
                or raw.get("next") not in (None, *TPM_HANDLES)
                or raw.get("next") == raw.get("current")):
            raise ConfigError(f"{path}: not a TPM key layout")
        return raw

    def _write_layout(self, layout: dict[str, Any]) -> None:
        atomic_write_json(self.directory / _LAYOUT, {"schema": 1, **layout})
        fsync_dir(self.directory)


def open_keystore(config: DeviceConfig, state_root: Path) -> TpmKeyStore | None:
    """The TPM key store of a device configured with ``keystore: tpm``; ``None`` for
    ``file`` (keys and floors in the state directory)."""
    if config.keystore != "tpm" or config.tpm_device is None:
        return None
    pcrs = None if config.tpm_pcrs is None else PcrSelection(config.tpm_pcrs)
    owner = None if config.tpm_owner_auth is None else Path(config.tpm_owner_auth)
    return TpmKeyStore(Tpm(config.tpm_device, owner_auth=owner), state_root,
                       config.device_id, config.product, pcrs)


def _csr_of(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """The swarm key's signing request (``OU=swarm``)."""
    return make_device_csr(key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()),
                           device_id, role=ROLE_SWARM)


def _pick(certs: list[x509.Certificate], key: ec.EllipticCurvePublicKey
          ) -> x509.Certificate | None:
    for cert in certs:
        if cert.public_key() == key:
            return cert
    return None


def _cert_matches(pem: bytes, key: ec.EllipticCurvePrivateKey) -> bool:
    try:
        return x509.load_pem_x509_certificate(pem).public_key() == key.public_key()
    except ValueError:
        return False


def _read_optional(path: Path) -> bytes | None:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_PEM + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_PEM:
        raise ConfigError(f"{path} is larger than {_MAX_PEM} bytes")
    return data

