"""The TUF repository: keys, signed metadata, signing requests and the origin tree on disk.

Layout (see docs/ARCHITECTURE.md, "Origin tree")::

    REPO/
      repo.json                   settings (expiry periods); written last by create
      .lock                       fcntl lock serialising publishers
      offline/                    private keys for offline holders: root keys, and the
                                  targets keys unless they are kept online; MOVE THEM
      keys/<role>[-<x>].pem       the keys this host signs with (mode 0600): snapshot
                                  and timestamp, and targets only in the single-key setup
      staged.json                 the signing request waiting for signatures (at most one)
      retired-keys/               local keys a rotation took out of root (destroy them)
      origin/                     serve this directory, unchanged
        metadata/N.root.json      every root version; metadata/root.json = newest
        metadata/timestamp.json
        metadata/N.snapshot.json, metadata/N.targets.json
        targets/<dir>/<sha256>.<basename> target files, hash-prefixed
        payloads/<sha256>.zst     written by :mod:`seeder.publish`

Consistent snapshots; per role any number of Ed25519 or ECDSA P-256 keys and a threshold
(:class:`KeySetup`). The default setup is one key per role with the targets key in
``keys/`` (a publish goes live at once); with the targets keys offline a publish is a
**signing request** (:mod:`seeder.staging`) that goes live when the release signers'
threshold is met (:meth:`Repository.sign`, :meth:`Repository.import_request`). Root
changes (:meth:`Repository.rotate`, :meth:`Repository.counter_reset`,
:meth:`Repository.renew`) are requests too, signed by the old and the new root keys.
Going live writes the target files, the new root, the new targets, then snapshot and
timestamp signed by the online keys: the online keys alone never make a device install
anything new.

Crash consistency: the committed state is whatever ``timestamp.json`` names; it is
written last, after the target files, the new root, ``N.targets.json`` and
``N.snapshot.json``, each written atomically; ``staged.json`` is removed after it. A crash
before ``timestamp.json`` leaves orphan files that the next write skips over (version
numbers may jump, which TUF allows) and the request staged: :meth:`Repository.open`
finishes a request whose root is already written. Versioned metadata files are never
overwritten. Readers therefore never need the lock.

The only seeder module that writes python-tuf metadata to disk. Every foreign error
(OSError, python-tuf, securesystemslib) becomes :class:`seeder.errors.RepositoryError`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from securesystemslib.signer import CryptoSigner, Key, Signer, SSlibKey
from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError, SerializationError

from swarmota.infra.fsio import atomic_write_bytes, fsync_dir
from swarmota.manifest import (
    COUNTER_RESETS_FIELD,
    CounterReset,
    ManifestFormatError,
    encode_counter_resets,
    parse_counter_resets,
    parse_release_manifest,
    validate_product,
)
from swarmota.seeder.errors import PublishError, RepositoryError, SigningError
from swarmota.seeder.keys import KEY_TYPES, generate_key, load_private_key, write_private_key
from swarmota.seeder.staging import (
    DELEGATED_ROLE_PREFIX,
    HOLDER_FIELD,
    SigningRequest,
    delegated_role,
    delegation_paths,
    read_request,
    write_request,
)

__all__ = [
    "MAX_KEYS_PER_ROLE",
    "MAX_METADATA_BYTES",
    "MAX_TARGET_BYTES",
    "ONLINE_ROLES",
    "REPO_FORMAT",
    "ROLES",
    "ExpiryConfig",
    "KeySetup",
    "Repository",
    "RoleKeys",
    "Staged",
    "validate_target_name",
]

_DAY_S = 24 * 3600
REPO_FORMAT = "swarmota-seeder-repository"
_REPO_FORMAT_VERSION = 1
ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
"""Roles whose keys may sit in ``keys/`` (targets only in the single-key setup)."""
MAX_METADATA_BYTES = 64 * 1024 * 1024
MAX_TARGET_BYTES = 64 * 1024 * 1024
MAX_KEYS_PER_ROLE = 16
_MAX_SETTINGS_BYTES = 64 * 1024

_SETTINGS_FILE = "repo.json"
_LOCK_FILE = ".lock"
_OFFLINE_DIR = "offline"
_KEYS_DIR = "keys"
_RETIRED_DIR = "retired-keys"
_STAGED_FILE = "staged.json"
_ORIGIN_DIR = "origin"
_PRIVATE_DIR_MODE = 0o700

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_TARGET_NAME_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT}){{0,7}}")
_HOLDER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@+-]{0,63}")

_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)


@dataclass(frozen=True)
class ExpiryConfig:
    """How long each role's metadata stays valid after it is signed, in seconds."""

    root_s: int = 365 * _DAY_S
    targets_s: int = 90 * _DAY_S
    snapshot_s: int = 30 * _DAY_S
    timestamp_s: int = 1 * _DAY_S

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"expiry {f.name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class RoleKeys:
    """How many keys a role has, how many must sign, and their type."""

    count: int = 1
    threshold: int = 1
    key_type: str = "ed25519"

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_KEYS_PER_ROLE:
            raise ValueError(f"a role has 1..{MAX_KEYS_PER_ROLE} keys, not {self.count}")
        if not 1 <= self.threshold <= self.count:
            raise ValueError(f"threshold must be within 1..{self.count} (the number of "
                             f"keys), not {self.threshold}")
        if self.key_type not in KEY_TYPES:
            raise ValueError(f"key type must be one of {', '.join(KEY_TYPES)}, "
                             f"not {self.key_type!r}")


@dataclass(frozen=True)
class KeySetup:
    """The keys :meth:`Repository.create` generates, per role.

    ``targets_online``: the targets keys go to ``keys/`` (every publish is signed at
    once by this host: the single-key setup) instead of ``offline/`` (publishes wait for
    the release signers' threshold).
    """

    root: RoleKeys = RoleKeys()
    targets: RoleKeys = RoleKeys()
    snapshot: RoleKeys = RoleKeys()
    timestamp: RoleKeys = RoleKeys()
    targets_online: bool = True

    def role(self, name: str) -> RoleKeys:
        spec: RoleKeys = getattr(self, name)
        return spec


@dataclass(frozen=True)
class Staged:
    """The outcome of a change: the signing request (``None`` if nothing changed) and
    whether it is live (every threshold met and committed) or waiting for signatures."""

    request: SigningRequest | None
    live: bool


def validate_target_name(name: str) -> str:
    """Return ``name`` if it is a safe relative TUF target path, else raise.

    Safe: 1-8 ``/``-separated segments of ``A-Z a-z 0-9 . _ + -``, each starting
    alphanumeric (so no ``..``, no hidden files, no absolute paths).

    Raises:
        PublishError: the name is not safe.
    """
    if not isinstance(name, str) or not _TARGET_NAME_RE.fullmatch(name):
        raise PublishError(
            f"invalid target name {name!r}: expected a relative path of segments "
            "[A-Za-z0-9][A-Za-z0-9._+-]*"
        )
    return name


@dataclass(frozen=True)
class _Committed:
    """The committed metadata chain, as named by timestamp.json."""

    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]
    targets_bytes: bytes
    delegated: dict[str, Metadata[Targets]] = field(default_factory=dict)
    delegated_bytes: dict[str, bytes] = field(default_factory=dict)

    def entries(self) -> dict[str, TargetFile]:
        """Every target: top-level targets and every delegated role's."""
        out = dict(self.targets.signed.targets)
        for md in self.delegated.values():
            out.update(md.signed.targets)
        return out

    def snapshot_meta(self) -> dict[str, MetaFile]:
        """What a snapshot of this chain lists: targets (version, length and hashes) and
        every delegated role (version and length). A device checks a role's signatures
        (the targets threshold) and its version against snapshot; hashes would only
        tell apart two lists signed under one version, which the repository never
        signs (numbered files are never rewritten), and cost 100 bytes a product in
        every snapshot every device downloads. The length still bounds the download."""
        meta = {"targets.json": _metafile(self.targets.signed.version, self.targets_bytes)}
        for role, md in sorted(self.delegated.items()):
            meta[f"{role}.json"] = MetaFile(version=md.signed.version,
                                            length=len(self.delegated_bytes[role]))
        return meta


class Repository:
    """A TUF repository on disk with its local signing keys; see the module docstring.

    Obtain one with :meth:`create` or :meth:`open`. Methods are synchronous and do disk
    I/O and signing: call them from a worker thread in async code. One object may be
    shared between threads; several objects or processes on the same directory are
    serialised by the lock file.
    """

    def __init__(
        self,
        path: Path,
        *,
        expiry: ExpiryConfig,
        root: Metadata[Root],
        root_bytes: bytes,
        local_keys: dict[str, tuple[Path, CryptoSigner]],
    ) -> None:
        """Internal: use :meth:`create` or :meth:`open`."""
        self._path = path
        self._expiry = expiry
        self._root = root
        self._root_bytes = root_bytes
        self._local = local_keys  # keyid -> (file in keys/, signer)
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        self._lock_fd: int | None = None

    # --- construction -----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        expiry: ExpiryConfig = ExpiryConfig(),
        keys: KeySetup = KeySetup(),
        now: datetime | None = None,
    ) -> Repository:
        """Create a new repository in ``path`` (absent or an empty directory).

        Generates every role's keys as ``keys`` says (one file per key: ``<role>.pem``
        for a single key, ``<role>-<n>.pem`` for several; root keys in ``offline/``,
        targets keys in ``keys/`` or ``offline/``, snapshot and timestamp keys in
        ``keys/``), signs root version 1 and empty targets, snapshot and timestamp
        metadata, and writes ``repo.json`` last, which marks the repository as
        initialised.

        Raises:
            RepositoryError: ``path`` exists and is not an empty directory, or the
                files cannot be written.
        """
        path = Path(path)
        when = _utc(now)
        try:
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise RepositoryError(
                    f"{path} already exists and is not an empty directory; refusing to "
                    "create a repository over it"
                )
            path.mkdir(parents=True, exist_ok=True)
            for private in (_OFFLINE_DIR, _KEYS_DIR):
                (path / private).mkdir(mode=_PRIVATE_DIR_MODE)
            origin = path / _ORIGIN_DIR
            for sub in ("metadata", "targets", "payloads"):
                (origin / sub).mkdir(parents=True)
        except OSError as exc:
            raise RepositoryError(f"cannot create repository in {path}: {exc}") from exc

        root = Root(version=1, expires=when + timedelta(seconds=expiry.root_s),
                    consistent_snapshot=True,
                    roles={role: Role([], keys.role(role).threshold) for role in ROLES})
        signers: dict[str, list[CryptoSigner]] = {}
        for role in ROLES:
            spec = keys.role(role)
            online = role != "root" and (role != "targets" or keys.targets_online)
            directory = path / (_KEYS_DIR if online else _OFFLINE_DIR)
            signers[role] = []
            for n in range(1, spec.count + 1):
                name = role if spec.count == 1 else f"{role}-{n}"
                signer = generate_key(spec.key_type)
                write_private_key(directory / f"{name}.pem", signer)
                root.add_key(named_key(signer.public_key, name), role)
                signers[role].append(signer)
        root_md = Metadata(root)
        root_bytes = _sign(root_md, signers["root"])
        metadata_dir = origin / "metadata"
        _write(metadata_dir / "1.root.json", root_bytes)
        _write(metadata_dir / "root.json", root_bytes)

        repo = cls(path, expiry=expiry, root=root_md, root_bytes=root_bytes,
                   local_keys=_scan_local_keys(path / _KEYS_DIR, [root]))
        targets = Metadata(Targets(version=1, expires=when + timedelta(seconds=expiry.targets_s)))
        targets_bytes = _sign(targets, signers["targets"])
        with repo.locked():
            _write(repo.metadata_dir / "1.targets.json", targets_bytes)
            repo._write_snapshot_and_timestamp(
                root, {"targets.json": _metafile(1, targets_bytes)}, when)
            try:
                atomic_write_bytes(path / _SETTINGS_FILE, _settings_bytes(expiry))
            except OSError as exc:
                raise RepositoryError(f"cannot write {path / _SETTINGS_FILE}: {exc}") from exc
        return repo

    @classmethod
    def open(cls, path: Path, *, now: datetime | None = None) -> Repository:
        """Open an initialised repository: settings, newest root and the local keys.

        No offline key is needed. The committed metadata chain is loaded and verified
        against root once. A signing request whose new root is already written (a crash
        while it went live) is finished first.

        Raises:
            RepositoryError: missing or corrupt ``repo.json``, root metadata or local
                keys; a key in ``keys/`` that is not a key of its role in root (or in the
                staged root); fewer snapshot or timestamp keys than their thresholds; a
                broken metadata chain.
        """
        path = Path(path)
        settings_path = path / _SETTINGS_FILE
        if not settings_path.is_file():
            raise RepositoryError(
                f"{path} is not an initialised seeder repository ({_SETTINGS_FILE} missing); "
                "create one with 'swarmota seeder init'"
            )
        expiry = _parse_settings(_read_limited(settings_path, _MAX_SETTINGS_BYTES), settings_path)
        metadata_dir = path / _ORIGIN_DIR / "metadata"
        newest = _highest_version(metadata_dir, "root")
        if newest == 0:
            raise RepositoryError(f"no N.root.json in {metadata_dir}")
        root_path = metadata_dir / f"{newest}.root.json"
        root_bytes = _read_limited(root_path, MAX_METADATA_BYTES)
        root_md = _parse_metadata(root_bytes, Root, root_path)
        if root_md.signed.version != newest:
            raise RepositoryError(f"{root_path} contains root version {root_md.signed.version}")
        _verify(root_md.signed, "root", root_md, root_path)
        staged_path = path / _STAGED_FILE
        staged = read_request(staged_path) if staged_path.exists() else None
        roots = [root_md.signed] + ([staged.next_root] if staged is not None else [])
        repo = cls(path, expiry=expiry, root=root_md, root_bytes=root_bytes,
                   local_keys=_scan_local_keys(path / _KEYS_DIR, roots))
        if staged is not None and staged.ready:
            # a ready request is never left staged, unless a crash cut its go-live short;
            # read again under the lock: a publisher may be taking it live right now
            with repo.locked():
                pending = repo.staged()
                if pending is not None and pending.ready:
                    repo._go_live(pending, _utc(now))
        for role in ("snapshot", "timestamp"):
            try:
                repo._role_signers(repo._root.signed, role)
            except SigningError:
                if staged is None:
                    raise
                repo._role_signers(staged.next_root, role)  # a rotation to them waits
        repo._load_committed()
        return repo

    @classmethod
    def rebuild(cls, path: Path, origin: Path, *, trusted_root: bytes | None = None,
                keys_backup: Path | None = None, settings: Path | None = None,
                key_type: str = "ed25519",
                now: datetime | None = None) -> tuple[Repository, Staged | None]:
        """Rebuild a repository whose host was lost, from a copy of its origin tree
        (any mirror or the CDN: it is public) and, if kept, a backup of ``keys/``.

        The copy is verified before anything is trusted: it must hold ``trusted_root``
        (a root file the operator kept, e.g. the one devices are provisioned with) byte
        for byte under its version, and every root version from 1 on be signed by its
        predecessor's and its own threshold, the committed chain under the
        newest root, every target file against targets, every payload a release
        manifest names (size and SHA-256) and its torrent. ``settings``: a backup of
        ``repo.json`` (default: the default lifetimes). Without ``keys_backup`` new
        snapshot and timestamp keys are generated in ``keys/`` and a root rotation to
        them is staged (returned): the root holders sign it (``seeder sign``); a targets
        key that was on the lost host is rotated the same way (``seeder rotate --role
        targets``, in the same request).

        Raises:
            RepositoryError: ``path`` is not empty, the origin copy does not verify, or
                the key backup does not match root.
        """
        path, origin = Path(path), Path(origin)
        expiry = (_parse_settings(_read_limited(settings, _MAX_SETTINGS_BYTES), settings)
                  if settings is not None else ExpiryConfig())
        root_md, root_bytes = _verify_origin(origin, trusted_root)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RepositoryError(f"{path} already exists and is not an empty directory")
        try:
            return cls._rebuild_in(path, origin, root_md, root_bytes, expiry=expiry,
                                   keys_backup=keys_backup, key_type=key_type, now=now)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)  # no half-made repository
            raise

    @classmethod
    def _rebuild_in(cls, path: Path, origin: Path, root_md: Metadata[Root], root_bytes: bytes,
                    *, expiry: ExpiryConfig, keys_backup: Path | None, key_type: str,
                    now: datetime | None) -> tuple[Repository, Staged | None]:
        try:
            path.mkdir(parents=True, exist_ok=True)
            for private in (_OFFLINE_DIR, _KEYS_DIR):
                (path / private).mkdir(mode=_PRIVATE_DIR_MODE)
            shutil.copytree(origin, path / _ORIGIN_DIR,
                            ignore=shutil.ignore_patterns(".*"))
            if keys_backup is not None:
                for key in sorted(Path(keys_backup).glob("*.pem")):
                    atomic_write_bytes(path / _KEYS_DIR / key.name,
                                       _read_limited(key, 64 * 1024), mode=0o600)
        except OSError as exc:
            raise RepositoryError(f"cannot rebuild the repository in {path}: {exc}") from exc
        repo = cls(path, expiry=expiry, root=root_md, root_bytes=root_bytes,
                   local_keys=_scan_local_keys(path / _KEYS_DIR, [root_md.signed]))
        repo._read_chain(verify=True)
        staged = None
        if keys_backup is None:
            fresh = {role: generate_key(key_type) for role in ("snapshot", "timestamp")}
            for role, signer in fresh.items():
                key_path = path / _KEYS_DIR / f"{role}-{signer.public_key.keyid[:12]}.pem"
                write_private_key(key_path, signer)
                repo._local[signer.public_key.keyid] = (key_path, signer)

            def change(root: Root) -> None:
                for role, signer in fresh.items():
                    for keyid in list(root.roles[role].keyids):
                        root.revoke_key(keyid, role)
                    root.add_key(named_key(signer.public_key,
                                           f"{role}-{signer.public_key.keyid[:8]}"), role)
                    root.roles[role].threshold = 1

            staged = repo._stage_root(change, now=now, note="rebuild: new snapshot and "
                                                             "timestamp keys (the old ones "
                                                             "were lost with the host)")
        else:
            for role in ("snapshot", "timestamp"):
                repo._role_signers(root_md.signed, role)
        try:
            atomic_write_bytes(path / _SETTINGS_FILE, _settings_bytes(expiry))
        except OSError as exc:
            raise RepositoryError(f"cannot write {path / _SETTINGS_FILE}: {exc}") from exc
        return repo, staged

    # --- properties -------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The repository directory."""
        return self._path

    @property
    def origin_dir(self) -> Path:
        """The directory to serve: ``REPO/origin``."""
        return self._path / _ORIGIN_DIR

    @property
    def metadata_dir(self) -> Path:
        """``REPO/origin/metadata``."""
        return self.origin_dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        """``REPO/origin/targets``."""
        return self.origin_dir / "targets"

    @property
    def payloads_dir(self) -> Path:
        """``REPO/origin/payloads``."""
        return self.origin_dir / "payloads"

    @property
    def offline_dir(self) -> Path:
        """``REPO/offline``: keys :meth:`create` and :meth:`rotate` made for offline
        holders (to be moved away)."""
        return self._path / _OFFLINE_DIR

    @property
    def offline_root_key_path(self) -> Path:
        """Where ``create`` wrote the (single) root private key, to be moved offline."""
        return self.offline_dir / "root.pem"

    @property
    def online_keys_dir(self) -> Path:
        """``REPO/keys``: the private keys this host signs with."""
        return self._path / _KEYS_DIR

    @property
    def staged_path(self) -> Path:
        """``REPO/staged.json``: the signing request waiting for signatures."""
        return self._path / _STAGED_FILE

    @property
    def root_path(self) -> Path:
        """``REPO/origin/metadata/root.json``: the root devices are provisioned with."""
        return self.metadata_dir / "root.json"

    @property
    def expiry(self) -> ExpiryConfig:
        return self._expiry

    # --- reading ----------------------------------------------------------------------

    def root(self) -> Root:
        """The newest root (a copy)."""
        return copy.deepcopy(self._root.signed)

    def root_bytes(self) -> bytes:
        """The newest root metadata file, byte for byte: what devices trust first."""
        return self._root_bytes

    def local_roles(self) -> dict[str, list[str]]:
        """Keyids of the keys in ``keys/``, by the role of the current root they serve."""
        root = self._root.signed
        return {role: [k for k in root.roles[role].keyids if k in self._local]
                for role in ROLES}

    def staged(self) -> SigningRequest | None:
        """The signing request waiting for signatures, if any.

        Raises:
            SigningError: ``staged.json`` is unreadable or malformed.
        """
        if not self.staged_path.exists():
            return None
        return read_request(self.staged_path)

    def targets(self, *, staged: bool = False) -> dict[str, TargetFile]:
        """The committed targets (name -> TargetFile), as timestamp.json names them, of
        top-level targets and every delegated role; with ``staged``, those of the signing
        request where it changes them.

        Raises:
            RepositoryError: the metadata chain is missing or corrupt.
        """
        committed = self._load_committed()
        request = self.staged() if staged else None
        if request is None:
            return committed.entries()
        replaced = [md for md in (committed.delegated.get(role) for role in request.delegated)
                    if md is not None]
        if request.targets is not None:
            replaced.append(committed.targets)
        entries = committed.entries()
        for md in replaced:
            for name in md.signed.targets:
                entries.pop(name, None)
        for _, md in request.metadata():
            if isinstance(md.signed, Targets):
                entries.update(md.signed.targets)
        return entries

    def versions(self) -> dict[str, int]:
        """Committed metadata versions by role (``root``, ``targets``, ...).

        Raises:
            RepositoryError: the metadata chain is missing or corrupt.
        """
        committed = self._load_committed()
        return {
            "root": self._root.signed.version,
            "targets": committed.targets.signed.version,
            "snapshot": committed.snapshot.signed.version,
            "timestamp": committed.timestamp.signed.version,
            **{role: md.signed.version for role, md in sorted(committed.delegated.items())},
        }

    def expirations(self) -> dict[str, datetime]:
        """When each role's committed metadata expires (UTC), by role.

        ``refresh_timestamp`` renews timestamp (and snapshot when half its lifetime is
        gone); targets are renewed by the next release or :meth:`renew`, root by
        :meth:`renew` or any root change. Operators should watch these.

        Raises:
            RepositoryError: the metadata chain is missing or corrupt.
        """
        committed = self._load_committed()
        return {
            "root": self._root.signed.expires,
            "targets": committed.targets.signed.expires,
            "snapshot": committed.snapshot.signed.expires,
            "timestamp": committed.timestamp.signed.expires,
            **{role: md.signed.expires for role, md in sorted(committed.delegated.items())},
        }

    def counter_resets(self) -> dict[str, CounterReset]:
        """The counter resets of the newest root, by product."""
        return _counter_resets(self._root.signed)

    def target_file_path(self, target: TargetFile) -> Path:
        """Where ``target``'s content lives: ``origin/targets/<dir>/<sha256>.<name>``."""
        validate_target_name(target.path)
        return self.targets_dir / target.get_prefixed_paths()[0]

    def read_target(self, target: TargetFile) -> bytes:
        """Read a target file and check it against its signed length and hashes; a
        target of the signing request that is not live yet is read from the request.

        Raises:
            RepositoryError: the file is missing, too large or does not match.
        """
        path = self.target_file_path(target)
        if not path.exists():
            request = self.staged()
            if request is not None and target.path in request.target_files:
                data = request.target_files[target.path]
                try:
                    target.verify_length_and_hashes(data)
                except LengthOrHashMismatchError as exc:
                    raise RepositoryError(f"staged target {target.path} does not match "
                                          f"its targets entry: {exc}") from exc
                return data
        data = _read_limited(path, MAX_TARGET_BYTES)
        try:
            target.verify_length_and_hashes(data)
        except LengthOrHashMismatchError as exc:
            raise RepositoryError(f"target file {path} is corrupt: {exc}") from exc
        return data

    # --- writing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the publisher lock (``REPO/.lock``, fcntl) for a read-check-write.

        Re-entrant within this object; blocks while another object or process holds
        it. Every method that writes takes it itself.

        Raises:
            RepositoryError: the lock file cannot be opened.
        """
        with self._thread_lock:
            if self._lock_depth == 0:
                lock_path = self._path / _LOCK_FILE
                try:
                    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError as exc:
                    raise RepositoryError(f"cannot open lock file {lock_path}: {exc}") from exc
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    fd, self._lock_fd = self._lock_fd, None
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)

    def add_target(self, name: str, data: bytes, *, custom: Mapping[str, Any] | None = None,
                   now: datetime | None = None) -> bool:
        """Publish ``data`` as target ``name`` (with ``custom`` data in its targets
        entry): stage it, sign with the local targets keys, and go live if that meets
        the threshold; return whether it is live.

        Targets are immutable: adding the same bytes again under the same name changes
        nothing; different bytes under a published or staged name are refused.

        Raises:
            PublishError: ``name`` is unsafe, or already published or staged with other
                content; another change waits for signatures that this one would drop.
            RepositoryError: the repository cannot be read, signed or written.
        """
        return self.stage_targets({name: data}, custom={name: custom} if custom else None,
                                  note=f"add {name}", now=now).live

    def stage_targets(self, add: Mapping[str, bytes] | None = None,
                      remove: Sequence[str] = (), *, note: str, renew: bool = False,
                      custom: Mapping[str, Mapping[str, Any]] | None = None,
                      now: datetime | None = None) -> Staged:
        """Stage new targets metadata: the current targets (the staged ones, if a request
        changes them already) plus ``add`` minus ``remove``, each changed role a new
        version with a fresh expiry (``renew``: every role, even without any change).
        ``custom``: the custom data of entries of ``add``, by name. Signs it with the
        local targets keys; goes live when every threshold of the request is met.

        A release manifest ``releases/<product>/...`` goes to its product's delegated
        role (:func:`seeder.staging.delegated_role`), which top-level targets delegates
        to the targets keys (added to top-level targets with the product's first
        release); other targets, and manifests published before delegations, stay in
        top-level targets.

        Raises:
            PublishError: an unsafe name, a name published with other content, a name
                to remove that is not there, or staged targets already signed by keys
                of other holders (their signatures would be lost: sign or discard it).
            RepositoryError: the repository cannot be read, signed or written.
        """
        add = dict(add or {})
        for name in (*add, *remove):
            validate_target_name(name)
        when = _utc(now)
        with self.locked():
            committed = self._load_committed()
            request = self._current_request()
            staged_roles = dict(request.delegated) if request is not None else {}
            top = committed.targets.signed
            if request is not None and request.targets is not None:
                top = request.targets.signed
            roles = {role: md.signed for role, md in committed.delegated.items()}
            roles.update({role: md.signed for role, md in staged_roles.items()})
            entries: dict[str | None, dict[str, TargetFile]] = {
                None: dict(top.targets),
                **{role: dict(t.targets) for role, t in roles.items()}}
            delegations = copy.deepcopy(top.delegations)
            files = dict(request.target_files) if request is not None else {}
            changed: set[str | None] = {None, *roles} if renew else set()
            authority = request.next_root if request is not None else self._root.signed
            for name, data in add.items():
                extra = (custom or {}).get(name)
                target = TargetFile(length=len(data), path=name,
                                    hashes={"sha256": hashlib.sha256(data).hexdigest()},
                                    unrecognized_fields=({"custom": dict(extra)} if extra
                                                         else None))
                existing = entries[None].get(name)
                role = None if existing is not None else delegated_role(name)
                if role is not None:
                    existing = entries.setdefault(role, {}).get(name)
                if existing == target:
                    continue
                if existing is not None:
                    raise PublishError(f"target {name} is already published with other "
                                       f"content (sha256 {existing.hashes.get('sha256')})")
                if role is not None and (delegations is None or delegations.roles is None
                                         or role not in delegations.roles):
                    delegations = _delegate(delegations, role, authority)
                    changed.add(None)
                entries[role][name], files[name] = target, data
                changed.add(role)
            for name in remove:
                holders = [r for r, e in entries.items() if name in e]
                if not holders:
                    raise PublishError(f"target {name} is not published")
                holder = holders[0]
                del entries[holder][name]
                files.pop(name, None)
                changed.add(holder)
            if not changed:
                return Staged(request, request is None or all(n in committed.entries()
                                                              for n in add))
            for changed_role in changed:
                if request is not None:
                    self._check_amendable(request, changed_role or "targets")
            expires = when + timedelta(seconds=self._expiry.targets_s)
            targets = None if request is None else request.targets
            if None in changed:
                version = (request.targets.signed.version
                           if request is not None and request.targets is not None
                           else max(top.version,
                                    _highest_version(self.metadata_dir, "targets")) + 1)
                targets = Metadata(Targets(version=version, expires=expires,
                                           targets=entries[None], delegations=delegations))
            for role in sorted(r for r in changed if r is not None):
                old = roles.get(role)
                version = (staged_roles[role].signed.version if role in staged_roles
                           else max(old.version if old is not None else 0,
                                    _highest_version(self.metadata_dir, role)) + 1)
                staged_roles[role] = Metadata(Targets(version=version, expires=expires,
                                                      targets=entries[role]))
            request = SigningRequest(
                base_root=self._root if request is None else request.base_root,
                root=None if request is None else request.root,
                targets=targets, target_files=files, delegated=staged_roles,
                changes=([] if request is None else request.changes) + [note])
            return self._save_or_go_live(request, when)

    def rotate(self, role: str, *, public_keys: Sequence[Key] = (), generate: int = 0,
               key_type: str = "ed25519", threshold: int | None = None,
               now: datetime | None = None) -> tuple[Staged, list[Path]]:
        """Stage a new root in which every key of ``role`` is replaced by
        ``public_keys`` (keys their holders generated, e.g. in an HSM) and ``generate``
        new keys; return the request and the files of the generated keys.

        Generated snapshot and timestamp keys go to ``keys/`` (this host signs with
        them once the rotation is live); generated root and targets keys to
        ``offline/`` (move them to their holders). ``threshold`` defaults to the role's
        current one (at most the new number of keys). A targets rotation stages new
        targets metadata too: the new targets keys must sign it. The new root needs the
        thresholds of the current and of the new root keys (:mod:`seeder.staging`).

        Raises:
            SigningError: an unknown role or key type, no key, too many keys, a bad
                threshold, a key of another role, or a root change already staged and
                signed (sign it to the end or discard it first).
            RepositoryError: the repository cannot be read, signed or written.
        """
        if role not in ROLES:
            raise SigningError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        count = len(public_keys) + generate
        current = self._root.signed.roles[role]
        chosen = min(current.threshold, count) if threshold is None else threshold
        try:
            spec = RoleKeys(count=max(count, 1), threshold=chosen, key_type=key_type)
        except ValueError as exc:
            raise SigningError(f"rotate {role}: {exc}") from exc
        if count == 0:
            raise SigningError(f"rotate {role}: give at least one new key")
        online = role in ("snapshot", "timestamp")
        directory = self.online_keys_dir if online else self.offline_dir
        new_signers = [generate_key(spec.key_type) for _ in range(generate)]
        keys = list(public_keys) + [named_key(s.public_key, f"{role}-{s.public_key.keyid[:8]}")
                                    for s in new_signers]

        def change(root: Root) -> None:
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            for key in keys:
                root.add_key(key, role)
            root.roles[role].threshold = spec.threshold

        written: list[Path] = []
        with self.locked():
            for signer in new_signers:
                path = directory / f"{role}-{signer.public_key.keyid[:12]}.pem"
                write_private_key(path, signer)
                written.append(path)
                if online:
                    self._local[signer.public_key.keyid] = (path, signer)
            note = (f"rotate {role} keys: {len(keys)} new, threshold {spec.threshold}")
            try:
                staged = self._stage_root(change, note=note, now=now)
            except BaseException:
                for signer, path in zip(new_signers, written, strict=False):
                    self._local.pop(signer.public_key.keyid, None)
                    self._retire(path)
                raise
        return staged, written

    def counter_reset(self, product: str, *, floor: int,
                      now: datetime | None = None) -> Staged:
        """Stage a new root with a counter reset for ``product`` (:mod:`manifest.counters`):
        devices lower their anti-rollback floor to ``floor`` (give the highest counter
        of the product's legitimate releases: :func:`seeder.publish.highest_counter`).
        The epoch is one above the current reset's.

        Raises:
            PublishError: an invalid product or floor.
            SigningError: a root change already staged and signed.
            RepositoryError: the repository cannot be read, signed or written.
        """
        try:
            validate_product(product)
            reset = CounterReset(epoch=1, floor=floor)
        except ManifestFormatError as exc:
            raise PublishError(str(exc)) from exc

        def change(root: Root) -> None:
            resets = _counter_resets(root)
            previous = resets.get(product)
            resets[product] = CounterReset(epoch=(previous.epoch if previous else 0) + 1,
                                           floor=reset.floor)
            root.unrecognized_fields[COUNTER_RESETS_FIELD] = encode_counter_resets(resets)

        return self._stage_root(change, note=f"counter reset of {product} to {floor}",
                                now=now)

    def renew(self, role: str, *, now: datetime | None = None) -> Staged:
        """Stage a re-signing of ``root`` or ``targets`` with a fresh expiry (same
        content, next version): offline metadata must be renewed before it expires.

        Raises:
            SigningError: another role, or a change already staged and signed.
            RepositoryError: the repository cannot be read, signed or written.
        """
        if role == "targets":
            return self.stage_targets(note="renew targets", renew=True, now=now)
        if role == "root":
            return self._stage_root(lambda root: None, note="renew root", now=now)
        raise SigningError(f"only root and targets are renewed by signing requests; "
                           f"{role} is re-signed online ('seeder timestamp')")

    def sign(self, signer: Signer, *, now: datetime | None = None) -> tuple[list[str], Staged]:
        """Add ``signer``'s signature to the staged request; go live if that meets every
        threshold. Returns what it signed and the outcome.

        Raises:
            SigningError: nothing is staged, or the key is not one the request needs.
            RepositoryError: the repository cannot be read or written.
        """
        with self.locked():
            request = self._current_request()
            if request is None:
                raise SigningError("nothing is waiting for signatures in "
                                   f"{self._path}")
            signed = request.sign(signer)
            return signed, self._save_or_go_live(request, _utc(now))

    def import_request(self, other: SigningRequest, *,
                       now: datetime | None = None) -> tuple[int, Staged]:
        """Merge the signatures of ``other`` (the staged request, signed elsewhere) into
        the staged request; go live if every threshold is then met. Returns how many
        signatures were new and the outcome.

        Raises:
            SigningError: nothing is staged, or ``other`` is another request.
            RepositoryError: the repository cannot be read or written.
        """
        with self.locked():
            request = self._current_request()
            if request is None:
                raise SigningError(f"nothing is waiting for signatures in {self._path}")
            added = request.merge(other)
            return added, self._save_or_go_live(request, _utc(now))

    def discard(self) -> SigningRequest | None:
        """Drop the staged request (its payloads stay: they are unreferenced files), and
        retire the local keys only it named. Returns what was dropped.

        Raises:
            RepositoryError: the files cannot be removed.
        """
        with self.locked():
            request = self.staged()
            if request is None:
                return None
            try:
                self.staged_path.unlink()
                fsync_dir(self._path)
            except OSError as exc:
                raise RepositoryError(f"cannot remove {self.staged_path}: {exc}") from exc
            self._retire_unused_keys()
            return request

    def refresh_timestamp(
        self, *, expires_in_s: int | None = None, now: datetime | None = None
    ) -> None:
        """Re-sign timestamp: a new version with a new expiry (run it from cron). When
        less than half of snapshot's lifetime is left, snapshot is re-signed first (with
        the targets unchanged: targets are renewed by their own signers).

        ``expires_in_s`` defaults to the repository's ``timestamp_s``; negative values
        are allowed here (tests use them to make expired metadata).

        Raises:
            RepositoryError: the repository cannot be read, signed or written.
        """
        when = _utc(now)
        lifetime_s = self._expiry.timestamp_s if expires_in_s is None else expires_in_s
        with self.locked():
            committed = self._load_committed()
            root = self._root.signed
            snapshot_meta = committed.timestamp.signed.snapshot_meta
            left = committed.snapshot.signed.expires - when
            if left < timedelta(seconds=self._expiry.snapshot_s / 2):
                snapshot_meta = self._write_snapshot(
                    root, committed.snapshot_meta(), when,
                    previous=committed.snapshot.signed.version)
            timestamp = Timestamp(
                version=committed.timestamp.signed.version + 1,
                expires=when + timedelta(seconds=lifetime_s),
                snapshot_meta=snapshot_meta,
            )
            _write(self.metadata_dir / "timestamp.json",
                   _sign(Metadata(timestamp), self._role_signers(root, "timestamp")))

    # --- internals --------------------------------------------------------------------

    def _current_request(self) -> SigningRequest | None:
        """The staged request, checked to build on the current root."""
        request = self.staged()
        if request is not None:
            self._check_base(request)
        return request

    def _check_base(self, request: SigningRequest) -> None:
        if request.base_root.signed_bytes != self._root.signed_bytes:
            raise SigningError(
                f"the staged request builds on root version "
                f"{request.base_root.signed.version}, the repository is at version "
                f"{self._root.signed.version}: discard it ('seeder discard') and stage "
                "the change again")

    def _check_amendable(self, request: SigningRequest, name: str) -> None:
        """Refuse to change staged ``name`` metadata that holds signatures of keys this
        host does not have (amending drops them)."""
        foreign = [k for k in request.signature_holders(name) if k not in self._local]
        if foreign:
            raise PublishError(
                f"the staged {name} metadata is already signed by {len(foreign)} key(s) "
                "this host does not hold; a change would drop their signatures: sign it "
                "to the end ('seeder sign') or discard it ('seeder discard') first")

    def _stage_root(self, change: Callable[[Root], None], *, note: str,
                    now: datetime | None) -> Staged:
        """Stage ``change`` applied to the next root (the staged one, or the current)."""
        when = _utc(now)
        with self.locked():
            committed = self._load_committed()
            request = self._current_request()
            if request is not None and request.root is not None:
                self._check_amendable(request, "root")
            current = self._root.signed
            new = copy.deepcopy(request.next_root if request is not None else current)
            change(new)
            new.version = current.version + 1
            new.expires = when + timedelta(seconds=self._expiry.root_s)
            _check_root_policy(new)
            targets = request.targets if request is not None else None
            delegated = dict(request.delegated) if request is not None else {}
            old_role, new_role = current.roles["targets"], new.roles["targets"]
            rekeyed = (set(new_role.keyids) != set(old_role.keyids)
                       or new_role.threshold != old_role.threshold)
            expires = when + timedelta(seconds=self._expiry.targets_s)
            if targets is None and rekeyed:
                # the live targets are signed by keys the new root no longer lists: the
                # new targets keys sign them again, as a new version
                old = committed.targets.signed
                targets = Metadata(Targets(
                    version=max(old.version, _highest_version(self.metadata_dir,
                                                              "targets")) + 1,
                    expires=expires, targets=dict(old.targets),
                    delegations=_rekey_delegations(old.delegations, new)))
            elif targets is not None:
                signed = copy.deepcopy(targets.signed)
                if rekeyed:
                    signed.delegations = _rekey_delegations(signed.delegations, new)
                targets = Metadata(signed, signatures=dict(targets.signatures))
            if rekeyed:
                # so are the products' release lists, which top-level targets now
                # delegates to the new keys
                for role, md in committed.delegated.items():
                    if role not in delegated:
                        delegated[role] = Metadata(Targets(
                            version=max(md.signed.version,
                                        _highest_version(self.metadata_dir, role)) + 1,
                            expires=expires, targets=dict(md.signed.targets)))
            request = SigningRequest(
                base_root=self._root, root=Metadata(new), targets=targets,
                target_files={} if request is None else dict(request.target_files),
                delegated=delegated,
                changes=([] if request is None else request.changes) + [note])
            for role in ("snapshot", "timestamp"):
                self._role_signers(new, role)  # the new online keys must be here
            return self._save_or_go_live(request, when)

    def _save_or_go_live(self, request: SigningRequest, when: datetime) -> Staged:
        """Sign ``request`` with the local targets keys; go live if it is ready, else
        save it as the staged request."""
        by_targets_keys = [md for name, md in request.metadata() if name != "root"]
        for keyid in request.next_root.roles["targets"].keyids:
            if keyid in self._local and any(keyid not in md.signatures
                                            for md in by_targets_keys):
                request.sign(self._local[keyid][1])
        # saved first, also when ready: a crash while going live loses no signature,
        # and the next open finishes the job
        write_request(self.staged_path, request)
        if request.ready:
            self._go_live(request, when)
            return Staged(request, live=True)
        return Staged(request, live=False)

    def _go_live(self, request: SigningRequest, when: datetime) -> None:
        """Write what ``request`` changes, then snapshot and timestamp (last); remove
        the request. Re-running it after a crash finishes the job."""
        if not request.ready:
            raise SigningError("the signing request does not meet its thresholds yet")
        request.check()
        resuming = (request.root is not None
                    and request.root.signed_bytes == self._root.signed_bytes)
        if not resuming:
            self._check_base(request)
        root = request.next_root
        for role in ("snapshot", "timestamp"):
            self._role_signers(root, role)  # before anything is written
        chain = self._read_chain(verify=False)
        if request.targets is not None:
            targets_version = request.targets.signed.version
            targets_bytes = request.targets.to_bytes()
            if targets_version <= chain.targets.signed.version and (
                    chain.targets_bytes != targets_bytes):
                raise SigningError(f"the staged targets version {targets_version} is not "
                                   "above the live one: discard the request and stage again")
        else:
            targets_version, targets_bytes = chain.targets.signed.version, chain.targets_bytes
        targets_md = _parse_metadata(targets_bytes, Targets, self.metadata_dir)
        _verify(root, "targets", targets_md, self.metadata_dir / f"{targets_version}"
                ".targets.json")
        delegated, delegated_bytes = dict(chain.delegated), dict(chain.delegated_bytes)
        for role, md in request.delegated.items():
            data = md.to_bytes()
            old = chain.delegated.get(role)
            if old is not None and md.signed.version <= old.signed.version and (
                    chain.delegated_bytes[role] != data):
                raise SigningError(f"the staged {role} version {md.signed.version} is not "
                                   "above the live one: discard the request and stage again")
            delegated[role], delegated_bytes[role] = md, data
        for role, md in delegated.items():  # against the delegations that will be live
            _verify(targets_md.signed, role, md,
                    self.metadata_dir / f"{md.signed.version}.{role}.json")
        for name, data in request.target_files.items():
            target = request.target_entry(name)
            if target is not None:
                _write(self.target_file_path(target), data)
        if request.root is not None:
            root_bytes = request.root.to_bytes()
            _write_versioned(self.metadata_dir / f"{root.version}.root.json", root_bytes)
            _write(self.metadata_dir / "root.json", root_bytes)
            self._root, self._root_bytes = request.root, root_bytes
        for role, md in request.delegated.items():
            _write_versioned(self.metadata_dir / f"{md.signed.version}.{role}.json",
                             delegated_bytes[role])
        if request.targets is not None:
            _write_versioned(self.metadata_dir / f"{targets_version}.targets.json",
                             targets_bytes)
        live = replace(chain, targets=targets_md, targets_bytes=targets_bytes,
                       delegated=delegated, delegated_bytes=delegated_bytes)
        self._write_snapshot_and_timestamp(root, live.snapshot_meta(), when, previous=chain)
        try:
            self.staged_path.unlink(missing_ok=True)
            fsync_dir(self._path)
        except OSError as exc:
            raise RepositoryError(f"cannot remove {self.staged_path}: {exc}") from exc
        self._retire_unused_keys()

    def _write_snapshot(self, root: Root, meta: dict[str, MetaFile],
                        when: datetime, *, previous: int) -> MetaFile:
        """Sign and write a snapshot listing ``meta`` (targets and delegated roles)."""
        version = max(previous, _highest_version(self.metadata_dir, "snapshot")) + 1
        snapshot = Snapshot(
            version=version,
            expires=when + timedelta(seconds=self._expiry.snapshot_s),
            meta=meta,
        )
        snapshot_bytes = _sign(Metadata(snapshot), self._role_signers(root, "snapshot"))
        _write_versioned(self.metadata_dir / f"{version}.snapshot.json", snapshot_bytes)
        return _metafile(version, snapshot_bytes)

    def _write_snapshot_and_timestamp(self, root: Root, meta: dict[str, MetaFile],
                                      when: datetime,
                                      previous: _Committed | None = None) -> None:
        """Sign and write a snapshot listing ``meta``, then timestamp (last)."""
        snapshot_meta = self._write_snapshot(
            root, meta, when,
            previous=0 if previous is None else previous.snapshot.signed.version)
        timestamp = Timestamp(
            version=1 if previous is None else previous.timestamp.signed.version + 1,
            expires=when + timedelta(seconds=self._expiry.timestamp_s),
            snapshot_meta=snapshot_meta,
        )
        _write(self.metadata_dir / "timestamp.json",
               _sign(Metadata(timestamp), self._role_signers(root, "timestamp")))

    def _role_signers(self, root: Root, role: str) -> list[CryptoSigner]:
        """The local keys of ``role`` in ``root``; enough of them to meet its threshold.

        Raises:
            SigningError: fewer local keys than the threshold.
        """
        signers = [self._local[k][1] for k in root.roles[role].keyids if k in self._local]
        threshold = root.roles[role].threshold
        if len(signers) < threshold:
            raise SigningError(
                f"{self.online_keys_dir} holds {len(signers)} of the {role} keys of root "
                f"version {root.version}, which needs {threshold}: put the {role} keys "
                "there (or rotate them)")
        return signers

    def _retire_unused_keys(self) -> None:
        """Move local keys that neither the current nor a staged root lists to
        ``retired-keys/`` (a rotation took them out: destroy them)."""
        request = self.staged()
        roots = [self._root.signed] + ([request.next_root] if request is not None else [])
        listed = {k for root in roots for role in ONLINE_ROLES
                  for k in root.roles[role].keyids}
        for keyid, (path, _) in list(self._local.items()):
            if keyid not in listed:
                self._retire(path)
                del self._local[keyid]

    def _retire(self, path: Path) -> None:
        retired = self._path / _RETIRED_DIR
        try:
            retired.mkdir(mode=_PRIVATE_DIR_MODE, exist_ok=True)
            os.replace(path, retired / path.name)
            fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RepositoryError(f"cannot retire key {path}: {exc}") from exc

    def _load_committed(self) -> _Committed:
        """Load timestamp -> snapshot -> targets, checking signatures, versions, hashes."""
        return self._read_chain(verify=True)

    def _read_chain(self, *, verify: bool) -> _Committed:
        """The committed chain; ``verify``: check every signature against root (else
        only the hashes and versions: a root just rotated may not verify the old
        timestamp any more)."""
        return _read_chain(self.metadata_dir, self._root.signed, verify=verify)

def _delegate(delegations: Delegations | None, role: str, root: Root) -> Delegations:
    """``delegations`` plus ``role`` (a product's releases: :func:`delegation_paths`)
    delegated to the targets keys and threshold of ``root``."""
    role_keys = root.roles["targets"]
    out = delegations if delegations is not None else Delegations(keys={}, roles={})
    assert out.roles is not None
    for keyid in role_keys.keyids:
        out.keys[keyid] = root.keys[keyid]
    out.roles[role] = DelegatedRole(name=role, keyids=list(role_keys.keyids),
                                    threshold=role_keys.threshold, terminating=True,
                                    paths=delegation_paths(role))
    return out


def _rekey_delegations(delegations: Delegations | None, root: Root) -> Delegations | None:
    """``delegations`` with every role delegated to the targets keys of ``root`` (a
    targets key rotation: the new keys sign the products' release lists too)."""
    if delegations is None or not delegations.roles:
        return delegations
    out = Delegations(keys={}, roles={})
    for role in delegations.roles:
        out = _delegate(out, role, root)
    return out


def named_key(key: Key, holder: str) -> SSlibKey:
    """``key`` with its holder's name recorded (custom field of the key in root).

    Raises:
        SigningError: a name of other characters than ``A-Z a-z 0-9 space . _ @ + -``
            or longer than 64.
    """
    if not _HOLDER_RE.fullmatch(holder):
        raise SigningError(f"key holder name {holder!r}: 1-64 of A-Z a-z 0-9 space . _ @ + -")
    return SSlibKey(key.keyid, key.keytype, key.scheme, dict(key.keyval),
                    unrecognized_fields={HOLDER_FIELD: holder})


def _counter_resets(root: Root) -> dict[str, CounterReset]:
    try:
        return parse_counter_resets(root.unrecognized_fields.get(COUNTER_RESETS_FIELD))
    except ManifestFormatError as exc:
        raise RepositoryError(f"root version {root.version}: {exc}") from exc


def _check_root_policy(root: Root) -> None:
    """Thresholds within the key counts; no key serving two roles.

    Raises:
        SigningError: naming the fault.
    """
    seen: dict[str, str] = {}
    for role in ROLES:
        keyids = root.roles[role].keyids
        if not 1 <= root.roles[role].threshold <= len(keyids):
            raise SigningError(f"{role}: threshold {root.roles[role].threshold} with "
                               f"{len(keyids)} keys")
        if len(keyids) > MAX_KEYS_PER_ROLE:
            raise SigningError(f"{role}: more than {MAX_KEYS_PER_ROLE} keys")
        for keyid in keyids:
            if keyid in seen:
                raise SigningError(f"key {keyid[:16]} would serve both {seen[keyid]} and "
                                   f"{role}: give each role its own keys")
            seen[keyid] = role


def _scan_local_keys(directory: Path, roots: Sequence[Root]
                     ) -> dict[str, tuple[Path, CryptoSigner]]:
    """Load every ``<role>[-x].pem`` in ``keys/``; each must be a key of its role in one
    of ``roots``.

    Raises:
        RepositoryError: an unreadable key, a file named after no online role, or a key
            no root lists for the role its name says.
    """
    out: dict[str, tuple[Path, CryptoSigner]] = {}
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".pem"))
    except OSError as exc:
        raise RepositoryError(f"cannot list {directory}: {exc}") from exc
    for name in names:
        path = directory / name
        role = name.removesuffix(".pem").split("-", 1)[0]
        if role not in ONLINE_ROLES:
            raise RepositoryError(f"{path}: keys/ holds only targets, snapshot and "
                                  "timestamp keys, named <role>.pem or <role>-<x>.pem")
        signer = load_private_key(path)
        keyid = signer.public_key.keyid
        if not any(keyid in root.roles[role].keyids for root in roots):
            raise RepositoryError(f"{path} is not a {role} key of root version "
                                  f"{roots[0].version}")
        out[keyid] = (path, signer)
    return out


def _verify_origin(origin: Path, trusted_root: bytes | None) -> tuple[Metadata[Root], bytes]:
    """Verify an origin tree as a new device would, and more (see ``rebuild``); return
    the newest root and its bytes.

    Raises:
        RepositoryError: naming the first thing that does not verify.
    """
    metadata_dir = origin / "metadata"
    newest = _highest_version(metadata_dir, "root")
    if newest == 0:
        raise RepositoryError(f"{origin} is not an origin tree (no metadata/N.root.json)")
    trusted: Root | None = None
    data = b""
    md: Metadata[Root] | None = None
    for version in range(1, newest + 1):
        where = metadata_dir / f"{version}.root.json"
        data = _read_limited(where, MAX_METADATA_BYTES)
        md = _parse_metadata(data, Root, where)
        if md.signed.version != version:
            raise RepositoryError(f"{where} holds root version {md.signed.version}")
        for authority in ([trusted] if trusted is not None else []) + [md.signed]:
            _verify(authority, "root", md, where)
        trusted = md.signed
    assert md is not None
    if trusted_root is not None:
        anchor = _parse_metadata(trusted_root, Root, Path("the trusted root"))
        where = metadata_dir / f"{anchor.signed.version}.root.json"
        if not where.exists() or _read_limited(where, MAX_METADATA_BYTES) != trusted_root:
            raise RepositoryError(f"{origin} does not hold the trusted root (version "
                                  f"{anchor.signed.version}) byte for byte: another "
                                  "repository, or a tampered copy")
    chain = _read_chain(metadata_dir, md.signed, verify=True)
    targets_dir = origin / "targets"
    for name, target in chain.entries().items():
        validate_target_name(name)
        content = _read_limited(targets_dir / target.get_prefixed_paths()[0],
                                MAX_TARGET_BYTES)
        try:
            target.verify_length_and_hashes(content)
        except LengthOrHashMismatchError as exc:
            raise RepositoryError(f"target {name} does not match targets: {exc}") from exc
        try:
            manifest = parse_release_manifest(content)
        except ManifestFormatError:
            continue  # a target of another kind
        for payload in manifest.payloads:
            _check_payload(origin, payload.path, payload.size, payload.sha256)
            if payload.info_hash is not None and not (origin / payload.torrent_path).is_file():
                raise RepositoryError(f"{origin / payload.torrent_path} is missing")
    return md, data


def _check_payload(origin: Path, rel: str, size: int, sha256: str) -> None:
    path = origin / rel
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
            got = fh.tell()
    except OSError as exc:
        raise RepositoryError(f"payload {path}: {exc.strerror or exc}") from exc
    if got != size or digest.hexdigest() != sha256:
        raise RepositoryError(f"payload {path} does not match its release manifest")


def _read_chain(metadata_dir: Path, root: Root, *, verify: bool) -> _Committed:
    """The chain ``metadata_dir/timestamp.json`` names; ``verify``: check every signature
    against ``root``."""
    ts_path = metadata_dir / "timestamp.json"
    timestamp = _parse_metadata(_read_limited(ts_path, MAX_METADATA_BYTES), Timestamp,
                                ts_path)
    if verify:
        _verify(root, "timestamp", timestamp, ts_path)

    snapshot_meta = timestamp.signed.snapshot_meta
    snap_path = metadata_dir / f"{snapshot_meta.version}.snapshot.json"
    snapshot, _ = _read_listed(metadata_dir, "snapshot", snapshot_meta, Snapshot,
                               root if verify else None)

    targets_meta = snapshot.signed.meta.get("targets.json")
    if targets_meta is None:
        raise RepositoryError(f"{snap_path} does not list targets.json")
    targets, targets_bytes = _read_listed(metadata_dir, "targets", targets_meta, Targets,
                                          root if verify else None)
    delegated: dict[str, Metadata[Targets]] = {}
    delegated_bytes: dict[str, bytes] = {}
    for name, meta in snapshot.signed.meta.items():
        if name == "targets.json":
            continue
        role = name.removesuffix(".json")
        if not role.startswith(DELEGATED_ROLE_PREFIX) or "/" in role:
            raise RepositoryError(f"{snap_path} lists {name}, which is no role of ours")
        md, data = _read_listed(metadata_dir, role, meta, Targets,
                                targets.signed if verify else None)
        delegated[role], delegated_bytes[role] = md, data
    return _Committed(timestamp=timestamp, snapshot=snapshot, targets=targets,
                      targets_bytes=targets_bytes, delegated=delegated,
                      delegated_bytes=delegated_bytes)



def _write_versioned(path: Path, data: bytes) -> None:
    """Write a numbered metadata file; one already there must hold the same bytes."""
    if path.exists():
        if _read_limited(path, MAX_METADATA_BYTES) == data:
            return
        raise RepositoryError(f"{path} exists with other content; versioned metadata is "
                              "never overwritten")
    _write(path, data)


# --- helpers (pure, or one file operation each) -----------------------------------------


def _utc(now: datetime | None) -> datetime:
    """``now`` (default: the current time) as an aware UTC datetime; naive means UTC."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        return now.replace(tzinfo=UTC)
    return now.astimezone(UTC)


def _settings_bytes(expiry: ExpiryConfig) -> bytes:
    doc = {"format": REPO_FORMAT, "format_version": _REPO_FORMAT_VERSION,
           "expiry": asdict(expiry)}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _parse_settings(data: bytes, where: Path) -> ExpiryConfig:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RepositoryError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != REPO_FORMAT:
        raise RepositoryError(f"{where} is not a seeder repository settings file")
    if doc.get("format_version") != _REPO_FORMAT_VERSION:
        raise RepositoryError(
            f"{where}: unsupported format_version {doc.get('format_version')!r}"
        )
    expiry = doc.get("expiry")
    if not isinstance(expiry, dict) or set(expiry) != {f.name for f in fields(ExpiryConfig)}:
        raise RepositoryError(f"{where}: 'expiry' must be an object with "
                              f"{sorted(f.name for f in fields(ExpiryConfig))}")
    try:
        return ExpiryConfig(**expiry)
    except ValueError as exc:
        raise RepositoryError(f"{where}: {exc}") from exc


def _read_limited(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise RepositoryError(f"cannot read {path}: {exc}") from exc
    if len(data) > limit:
        raise RepositoryError(f"{path} is larger than {limit} bytes")
    return data


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise RepositoryError(f"cannot write {path}: {exc}") from exc


def _parse_metadata(data: bytes, signed_type: type[_S], where: Path) -> Metadata[_S]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError as exc:
        raise RepositoryError(f"{where} is not valid TUF metadata: {exc}") from exc
    if not isinstance(md.signed, signed_type):
        raise RepositoryError(f"{where} holds {md.signed.type} metadata, "
                              f"expected {signed_type.type}")
    return md


def _verify(delegator: Root | Targets, role: str, md: Metadata[Any], where: Path) -> None:
    """Check ``md``'s signatures against the keys ``delegator`` gives ``role`` (root for
    the top-level roles, top-level targets for a delegated role)."""
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except (UnsignedMetadataError, ValueError) as exc:
        raise RepositoryError(f"{where}: bad {role} signature: {exc}") from exc


def _read_listed(metadata_dir: Path, role: str, meta: MetaFile, signed_type: type[_S],
                 delegator: Root | Targets | None) -> tuple[Metadata[_S], bytes]:
    """The version of ``role`` that ``meta`` (in timestamp or snapshot) names: its
    length and hashes as listed, of ``signed_type``, signed as ``delegator`` requires
    (None: not checked), and the version it claims."""
    path = metadata_dir / f"{meta.version}.{role}.json"
    data = _read_limited(path, MAX_METADATA_BYTES)
    _check_metafile(meta, data, path)
    md = _parse_metadata(data, signed_type, path)
    if delegator is not None:
        _verify(delegator, role, md, path)
    if md.signed.version != meta.version:
        raise RepositoryError(f"{path} contains version {md.signed.version}")
    return md, data


def _check_metafile(meta: MetaFile, data: bytes, where: Path) -> None:
    try:
        meta.verify_length_and_hashes(data)
    except LengthOrHashMismatchError as exc:
        raise RepositoryError(f"{where} does not match the metadata naming it: {exc}") from exc


def _metafile(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data),
                    hashes={"sha256": hashlib.sha256(data).hexdigest()})


def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> bytes:
    """Sign ``md`` with every signer (its earlier signatures dropped); its bytes."""
    try:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        return md.to_bytes()
    except (UnsignedMetadataError, SerializationError) as exc:
        raise RepositoryError(f"cannot sign {md.signed.type} metadata: {exc}") from exc


def _highest_version(metadata_dir: Path, role: str) -> int:
    """The highest N of any ``N.<role>.json`` in ``metadata_dir`` (0 if none)."""
    pattern = re.compile(rf"([1-9][0-9]{{0,18}})\.{re.escape(role)}\.json")
    try:
        names = os.listdir(metadata_dir)
    except OSError as exc:
        raise RepositoryError(f"cannot list {metadata_dir}: {exc}") from exc
    versions = [int(m.group(1)) for n in names if (m := pattern.fullmatch(n))]
    return max(versions, default=0)
