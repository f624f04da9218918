"""The TUF repository: keys, signed metadata and the origin tree on disk.

Layout (see docs/ARCHITECTURE.md, "Origin tree")::

    REPO/
      repo.json                         settings (expiry periods); written last by create
      .lock                             fcntl lock serialising publishers
      offline/root.pem                  root private key: move it OFFLINE
      keys/{targets,snapshot,timestamp}.pem   online signing keys (mode 0600)
      origin/                           serve this directory, unchanged
        metadata/N.root.json            every root version; metadata/root.json = newest
        metadata/timestamp.json
        metadata/N.snapshot.json, metadata/N.targets.json
        targets/<dir>/<sha256>.<basename> target files, hash-prefixed
        payloads/<sha256>.zst           written by :mod:`seeder.publish`

The repository uses consistent snapshots, one Ed25519 key and threshold 1 per top-level
role. Only the online keys are needed after :meth:`Repository.create`.

Crash consistency: the committed state is whatever ``timestamp.json`` names; it is
written last, after the target files, the new ``N.targets.json`` and ``N.snapshot.json``,
each written atomically. Versioned metadata files are never overwritten: a crash between
two steps leaves orphan files that the next write skips over (version numbers may jump,
which TUF allows). Readers therefore never need the lock.

The only seeder module that imports python-tuf's metadata API. Every foreign error
(OSError, python-tuf, securesystemslib) becomes :class:`seeder.errors.RepositoryError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import (
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

from infra.fsio import atomic_write_bytes
from seeder.errors import PublishError, RepositoryError
from seeder.keys import generate_key, load_private_key, write_private_key

__all__ = [
    "MAX_METADATA_BYTES",
    "MAX_TARGET_BYTES",
    "ONLINE_ROLES",
    "REPO_FORMAT",
    "ExpiryConfig",
    "Repository",
    "validate_target_name",
]

_DAY_S = 24 * 3600
REPO_FORMAT = "swarmota-seeder-repository"
_REPO_FORMAT_VERSION = 1
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
MAX_METADATA_BYTES = 64 * 1024 * 1024
MAX_TARGET_BYTES = 64 * 1024 * 1024
_MAX_SETTINGS_BYTES = 64 * 1024

_SETTINGS_FILE = "repo.json"
_LOCK_FILE = ".lock"
_OFFLINE_DIR = "offline"
_KEYS_DIR = "keys"
_ORIGIN_DIR = "origin"
_PRIVATE_DIR_MODE = 0o700

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_TARGET_NAME_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT}){{0,7}}")

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


class Repository:
    """A TUF repository on disk with online signing keys; see the module docstring.

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
        signers: dict[str, CryptoSigner],
    ) -> None:
        """Internal: use :meth:`create` or :meth:`open`."""
        self._path = path
        self._expiry = expiry
        self._root = root
        self._root_bytes = root_bytes
        self._signers = signers
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
        now: datetime | None = None,
    ) -> Repository:
        """Create a new repository in ``path`` (absent or an empty directory).

        Generates the root key (``offline/root.pem``) and the online keys, signs root
        version 1 and empty targets, snapshot and timestamp metadata, and writes
        ``repo.json`` last, which marks the repository as initialised.

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

        root_signer = generate_key()
        signers = {role: generate_key() for role in ONLINE_ROLES}
        write_private_key(path / _OFFLINE_DIR / "root.pem", root_signer)
        for role, signer in signers.items():
            write_private_key(path / _KEYS_DIR / f"{role}.pem", signer)

        root = Root(
            version=1,
            expires=when + timedelta(seconds=expiry.root_s),
            consistent_snapshot=True,
            roles={role: Role([], 1) for role in ("root", *ONLINE_ROLES)},
        )
        root.add_key(root_signer.public_key, "root")
        for role, signer in signers.items():
            root.add_key(signer.public_key, role)
        root_md = Metadata(root)
        root_bytes = _sign(root_md, root_signer)
        metadata_dir = origin / "metadata"
        _write(metadata_dir / "1.root.json", root_bytes)
        _write(metadata_dir / "root.json", root_bytes)

        repo = cls(path, expiry=expiry, root=root_md, root_bytes=root_bytes, signers=signers)
        targets = Metadata(Targets(version=1, expires=when + timedelta(seconds=expiry.targets_s)))
        with repo.locked():
            repo._commit(targets, previous=None, when=when)
            try:
                atomic_write_bytes(path / _SETTINGS_FILE, _settings_bytes(expiry))
            except OSError as exc:
                raise RepositoryError(f"cannot write {path / _SETTINGS_FILE}: {exc}") from exc
        return repo

    @classmethod
    def open(cls, path: Path) -> Repository:
        """Open an initialised repository: settings, newest root and the online keys.

        The root private key is not needed (it belongs offline). The committed
        metadata chain is loaded and verified against root once.

        Raises:
            RepositoryError: missing or corrupt ``repo.json``, root metadata or online
                keys, keys that do not match root, or a broken metadata chain.
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
        signers: dict[str, CryptoSigner] = {}
        for role in ONLINE_ROLES:
            key_path = path / _KEYS_DIR / f"{role}.pem"
            signer = load_private_key(key_path)
            if signer.public_key.keyid not in root_md.signed.roles[role].keyids:
                raise RepositoryError(
                    f"{key_path} is not a {role} key of root version {newest}"
                )
            signers[role] = signer
        repo = cls(path, expiry=expiry, root=root_md, root_bytes=root_bytes, signers=signers)
        repo._load_committed()
        return repo

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
    def offline_root_key_path(self) -> Path:
        """Where ``create`` wrote the root private key (to be moved offline)."""
        return self._path / _OFFLINE_DIR / "root.pem"

    @property
    def online_keys_dir(self) -> Path:
        """``REPO/keys``: the targets, snapshot and timestamp private keys."""
        return self._path / _KEYS_DIR

    @property
    def root_path(self) -> Path:
        """``REPO/origin/metadata/root.json``: the root devices are provisioned with."""
        return self.metadata_dir / "root.json"

    @property
    def expiry(self) -> ExpiryConfig:
        return self._expiry

    # --- reading ----------------------------------------------------------------------

    def root_bytes(self) -> bytes:
        """The newest root metadata file, byte for byte: what devices trust first."""
        return self._root_bytes

    def targets(self) -> dict[str, TargetFile]:
        """The committed targets (name -> TargetFile), as timestamp.json names them.

        Raises:
            RepositoryError: the metadata chain is missing or corrupt.
        """
        return dict(self._load_committed().targets.signed.targets)

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
        }

    def expirations(self) -> dict[str, datetime]:
        """When each role's committed metadata expires (UTC), by role.

        ``refresh_timestamp`` renews only timestamp; targets and snapshot are renewed
        by the next :meth:`add_target`, root only offline. Operators should watch these.

        Raises:
            RepositoryError: the metadata chain is missing or corrupt.
        """
        committed = self._load_committed()
        return {
            "root": self._root.signed.expires,
            "targets": committed.targets.signed.expires,
            "snapshot": committed.snapshot.signed.expires,
            "timestamp": committed.timestamp.signed.expires,
        }

    def target_file_path(self, target: TargetFile) -> Path:
        """Where ``target``'s content lives: ``origin/targets/<dir>/<sha256>.<name>``."""
        validate_target_name(target.path)
        return self.targets_dir / target.get_prefixed_paths()[0]

    def read_target(self, target: TargetFile) -> bytes:
        """Read a target file and check it against its signed length and hashes.

        Raises:
            RepositoryError: the file is missing, too large or does not match.
        """
        path = self.target_file_path(target)
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
        it. :meth:`add_target` and :meth:`refresh_timestamp` take it themselves.

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

    def add_target(self, name: str, data: bytes, *, now: datetime | None = None) -> None:
        """Publish ``data`` as target ``name`` and commit new metadata.

        Writes ``origin/targets/<dir>/<sha256>.<basename>``, then signs and writes new
        ``N.targets.json``, ``N.snapshot.json`` and finally ``timestamp.json``. Targets
        are immutable: adding the same bytes again under the same name changes nothing;
        different bytes under a published name are refused.

        Raises:
            PublishError: ``name`` is unsafe, or already published with other content.
            RepositoryError: the repository cannot be read, signed or written.
        """
        validate_target_name(name)
        when = _utc(now)
        digest = hashlib.sha256(data).hexdigest()
        target = TargetFile(length=len(data), hashes={"sha256": digest}, path=name)
        with self.locked():
            committed = self._load_committed()
            existing = committed.targets.signed.targets.get(name)
            if existing is not None:
                if existing == target:
                    return
                raise PublishError(
                    f"target {name} is already published with other content "
                    f"(sha256 {existing.hashes.get('sha256')})"
                )
            _write(self.target_file_path(target), data)
            targets = committed.targets.signed
            new_targets = Targets(
                version=max(targets.version, _highest_version(self.metadata_dir, "targets")) + 1,
                expires=when + timedelta(seconds=self._expiry.targets_s),
                targets={**targets.targets, name: target},
                delegations=targets.delegations,
            )
            self._commit(Metadata(new_targets), previous=committed, when=when)

    def refresh_timestamp(
        self, *, expires_in_s: int | None = None, now: datetime | None = None
    ) -> None:
        """Re-sign timestamp only: a new version with a new expiry (run it from cron).

        ``expires_in_s`` defaults to the repository's ``timestamp_s``; negative values
        are allowed here (tests use them to make expired metadata).

        Raises:
            RepositoryError: the repository cannot be read, signed or written.
        """
        when = _utc(now)
        lifetime_s = self._expiry.timestamp_s if expires_in_s is None else expires_in_s
        with self.locked():
            committed = self._load_committed()
            old = committed.timestamp.signed
            timestamp = Timestamp(
                version=old.version + 1,
                expires=when + timedelta(seconds=lifetime_s),
                snapshot_meta=old.snapshot_meta,
            )
            _write(self.metadata_dir / "timestamp.json",
                   _sign(Metadata(timestamp), self._signers["timestamp"]))

    # --- internals --------------------------------------------------------------------

    def _commit(
        self, targets_md: Metadata[Targets], *, previous: _Committed | None, when: datetime
    ) -> None:
        """Sign and write targets, then a snapshot naming it, then timestamp (last)."""
        targets_version = targets_md.signed.version
        targets_bytes = _sign(targets_md, self._signers["targets"])
        _write(self.metadata_dir / f"{targets_version}.targets.json", targets_bytes)

        old_snapshot_version = 0 if previous is None else previous.snapshot.signed.version
        snapshot_version = max(old_snapshot_version,
                               _highest_version(self.metadata_dir, "snapshot")) + 1
        snapshot = Snapshot(
            version=snapshot_version,
            expires=when + timedelta(seconds=self._expiry.snapshot_s),
            meta={"targets.json": _metafile(targets_version, targets_bytes)},
        )
        snapshot_bytes = _sign(Metadata(snapshot), self._signers["snapshot"])
        _write(self.metadata_dir / f"{snapshot_version}.snapshot.json", snapshot_bytes)

        timestamp = Timestamp(
            version=1 if previous is None else previous.timestamp.signed.version + 1,
            expires=when + timedelta(seconds=self._expiry.timestamp_s),
            snapshot_meta=_metafile(snapshot_version, snapshot_bytes),
        )
        _write(self.metadata_dir / "timestamp.json",
               _sign(Metadata(timestamp), self._signers["timestamp"]))

    def _load_committed(self) -> _Committed:
        """Load timestamp -> snapshot -> targets, checking signatures, versions, hashes."""
        root = self._root.signed
        ts_path = self.metadata_dir / "timestamp.json"
        timestamp = _parse_metadata(_read_limited(ts_path, MAX_METADATA_BYTES), Timestamp,
                                    ts_path)
        _verify(root, "timestamp", timestamp, ts_path)

        snapshot_meta = timestamp.signed.snapshot_meta
        snap_path = self.metadata_dir / f"{snapshot_meta.version}.snapshot.json"
        snap_bytes = _read_limited(snap_path, MAX_METADATA_BYTES)
        _check_metafile(snapshot_meta, snap_bytes, snap_path)
        snapshot = _parse_metadata(snap_bytes, Snapshot, snap_path)
        _verify(root, "snapshot", snapshot, snap_path)
        if snapshot.signed.version != snapshot_meta.version:
            raise RepositoryError(f"{snap_path} contains version {snapshot.signed.version}")

        targets_meta = snapshot.signed.meta.get("targets.json")
        if targets_meta is None:
            raise RepositoryError(f"{snap_path} does not list targets.json")
        targets_path = self.metadata_dir / f"{targets_meta.version}.targets.json"
        targets_bytes = _read_limited(targets_path, MAX_METADATA_BYTES)
        _check_metafile(targets_meta, targets_bytes, targets_path)
        targets = _parse_metadata(targets_bytes, Targets, targets_path)
        _verify(root, "targets", targets, targets_path)
        if targets.signed.version != targets_meta.version:
            raise RepositoryError(f"{targets_path} contains version {targets.signed.version}")
        return _Committed(timestamp=timestamp, snapshot=snapshot, targets=targets)



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


def _verify(root: Root, role: str, md: Metadata[Any], where: Path) -> None:
    try:
        root.verify_delegate(role, md.signed_bytes, md.signatures)
    except (UnsignedMetadataError, ValueError) as exc:
        raise RepositoryError(f"{where}: bad {role} signature: {exc}") from exc


def _check_metafile(meta: MetaFile, data: bytes, where: Path) -> None:
    try:
        meta.verify_length_and_hashes(data)
    except LengthOrHashMismatchError as exc:
        raise RepositoryError(f"{where} does not match the metadata naming it: {exc}") from exc


def _metafile(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data),
                    hashes={"sha256": hashlib.sha256(data).hexdigest()})


def _sign(md: Metadata[Any], signer: CryptoSigner) -> bytes:
    try:
        md.sign(signer)
        return md.to_bytes()
    except (UnsignedMetadataError, SerializationError) as exc:
        raise RepositoryError(f"cannot sign {md.signed.type} metadata: {exc}") from exc


def _highest_version(metadata_dir: Path, role: str) -> int:
    """The highest N of any ``N.<role>.json`` in ``metadata_dir`` (0 if none)."""
    pattern = re.compile(rf"([1-9][0-9]{{0,18}})\.{role}\.json")
    try:
        names = os.listdir(metadata_dir)
    except OSError as exc:
        raise RepositoryError(f"cannot list {metadata_dir}: {exc}") from exc
    versions = [int(m.group(1)) for n in names if (m := pattern.fullmatch(n))]
    return max(versions, default=0)
