"""Tracker storage: the :class:`Store` interface and its SQLite implementation.

The only tracker module that imports ``sqlite3``; every ``sqlite3.Error`` (and the
``OSError`` of creating the database directory) becomes a
:class:`~tracker.errors.StorageError`.

All methods are blocking. An async caller runs them in a worker thread
(``trio.to_thread.run_sync``) and should allow one such thread at a time
(``limiter=trio.CapacityLimiter(1)``), since the store has one connection. The
:class:`SqliteStore` additionally serialises calls with an internal lock, so it stays
correct if several threads call it anyway.

Time is passed in: ``now`` arguments (seconds since the epoch), or for
``add_release`` without ``now`` the ``clock`` given to :class:`SqliteStore`.

The database (WAL journal, ``synchronous=NORMAL``) can be opened by several processes
at once: several tracker processes may share it (their transactions are serialised by
SQLite), and offline maintenance (``tracker admin token create``, ``tracker backup``)
may run beside a serving tracker.

Schema versions: 1 (releases, devices, reports); 2 adds ``swarms``, the BitTorrent
swarms of registered releases' payloads (full v2 info-hash, its 20-byte announce form,
product, version, payload kind); 3 adds rollouts, admin tokens and the audit log; 4
adds ``device_counters``, the last request counter accepted from each device (replay
protection of signed check-ins and reports, :mod:`infra.deviceauth`); 5 adds the
certificates devices signed check-ins and reports with (``device_counters.cert_sha256``,
the last one, and ``device_certificates``, every one) and ``revoked_certificates``; 6
(the control plane) adds report ids (a report resent after a crash is stored once) and
log tails, the labels and components devices declare, operator tags, release kinds
(image or component: a counter sequence each) and payload summaries, swarms shared by
releases with byte-identical payloads, rollout generations (a new rollout after a halt
or abort) with their latest failures, and each admitted device's last status code and
message. A new database runs every migration from version 0 (one source of truth,
:data:`_MIGRATIONS`); an older one runs those it lacks, in one transaction.

**Transactions.** Each method is one transaction. :meth:`SqliteStore.atomic` groups
several into one (``BEGIN IMMEDIATE`` ... ``COMMIT``): the tracker's director decides a
check-in, a report or an admin action inside one, so another process sharing the
database never sees half of it, and its writes never interleave.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from tracker.bittorrent import SwarmInfo
from tracker.errors import (
    ConflictError,
    ReleaseConflictError,
    RequestError,
    StaleStateError,
    StorageError,
)
from tracker.protocol import PayloadSummary, Release
from tracker.rollout import (
    RESTARTABLE,
    Admission,
    FailureNote,
    RolloutPlan,
    RolloutState,
    StageCounters,
)
from tracker.wire import CheckIn, ComponentVersion, Report

__all__ = ["MAX_PAGE", "SCHEMA_VERSION", "AuditEntry", "DeviceFilter", "DeviceRecord",
           "RevokedCertificate", "RolloutDevice", "SqliteStore", "Store", "StoredReport",
           "TokenRecord"]

MAX_PAGE = 1000
"""The most rows one listing call returns (devices, reports, admissions)."""

SCHEMA_VERSION = 6
_BUSY_TIMEOUT_MS = 5000

# Version 1 of the schema; later versions add _MIGRATIONS in order.
_SCHEMA = """
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE releases (
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    counter INTEGER NOT NULL,
    target TEXT NOT NULL,
    added_at REAL NOT NULL,
    UNIQUE (product, version),
    UNIQUE (product, counter)
);
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    hardware_id TEXT NOT NULL,
    version TEXT NOT NULL,
    release_counter INTEGER NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    product TEXT NOT NULL,
    from_version TEXT NOT NULL,
    to_version TEXT NOT NULL,
    status INTEGER NOT NULL,
    message TEXT NOT NULL,
    bytes_origin INTEGER NOT NULL,
    bytes_peers INTEGER NOT NULL,
    timings_json TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX reports_by_device ON reports (device_id, id);
"""

_SCHEMA_SWARMS = """
CREATE TABLE swarms (
    info_hash TEXT PRIMARY KEY,
    announce_hash BLOB NOT NULL UNIQUE,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    payload_kind TEXT NOT NULL
);
CREATE INDEX swarms_by_release ON swarms (product, version);
"""
_SCHEMA_ROLLOUTS = """
CREATE TABLE rollouts (
    rollout_id TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    counter INTEGER NOT NULL,
    plan_json TEXT NOT NULL,
    phase TEXT NOT NULL,
    stage INTEGER NOT NULL,
    stage_started_at REAL NOT NULL,
    created_at REAL NOT NULL,
    halt_reason TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    UNIQUE (product, version)
);
CREATE TABLE rollout_stages (
    rollout_id TEXT NOT NULL,
    stage INTEGER NOT NULL,
    admitted INTEGER NOT NULL,
    downloading INTEGER NOT NULL,
    succeeded INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    rolled_back INTEGER NOT NULL,
    bytes_origin INTEGER NOT NULL,
    bytes_peers INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, stage)
);
CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    stage INTEGER NOT NULL,
    status TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
ALTER TABLE devices ADD COLUMN network_id TEXT;
ALTER TABLE devices ADD COLUMN region TEXT;
CREATE TABLE admin_tokens (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_time ON audit (at);
"""
_SCHEMA_DEVICE_COUNTERS = """
CREATE TABLE device_counters (
    device_id TEXT PRIMARY KEY,
    counter INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
"""
_SCHEMA_REVOCATION = """
ALTER TABLE device_counters ADD COLUMN cert_sha256 TEXT;
CREATE TABLE device_certificates (
    device_id TEXT NOT NULL,
    cert_sha256 TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (device_id, cert_sha256)
);
CREATE TABLE revoked_certificates (
    cert_sha256 TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    revoked_at REAL NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""
_SCHEMA_CONTROL_PLANE = """
ALTER TABLE reports ADD COLUMN report_id TEXT;
ALTER TABLE reports ADD COLUMN log_tail TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX reports_by_report_id ON reports (device_id, report_id)
    WHERE report_id IS NOT NULL;
CREATE INDEX reports_by_time ON reports (received_at);
ALTER TABLE devices ADD COLUMN labels_json TEXT NOT NULL DEFAULT '[]';
ALTER TABLE devices ADD COLUMN components_json TEXT;
CREATE INDEX devices_by_product ON devices (product, version);
CREATE TABLE device_tags (
    device_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    added_at REAL NOT NULL,
    actor TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag);
CREATE TABLE releases_v6 (
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    counter INTEGER NOT NULL,
    target TEXT NOT NULL,
    added_at REAL NOT NULL,
    update_type TEXT NOT NULL DEFAULT 'image',
    component TEXT,
    payloads_json TEXT NOT NULL DEFAULT '[]',
    UNIQUE (product, version)
);
INSERT INTO releases_v6 (product, version, counter, target, added_at)
    SELECT product, version, counter, target, added_at FROM releases;
DROP TABLE releases;
ALTER TABLE releases_v6 RENAME TO releases;
CREATE UNIQUE INDEX releases_by_counter ON releases (product, ifnull(component, ''), counter);
CREATE TABLE swarms_v6 (
    info_hash TEXT NOT NULL,
    announce_hash BLOB NOT NULL,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    payload_kind TEXT NOT NULL,
    PRIMARY KEY (info_hash, product, version)
);
INSERT INTO swarms_v6 (info_hash, announce_hash, product, version, payload_kind)
    SELECT info_hash, announce_hash, product, version, payload_kind FROM swarms;
DROP TABLE swarms;
ALTER TABLE swarms_v6 RENAME TO swarms;
CREATE INDEX swarms_by_announce ON swarms (announce_hash);
CREATE INDEX swarms_by_release ON swarms (product, version);
CREATE TABLE rollouts_v6 (
    rollout_id TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    counter INTEGER NOT NULL,
    plan_json TEXT NOT NULL,
    phase TEXT NOT NULL,
    stage INTEGER NOT NULL,
    stage_started_at REAL NOT NULL,
    created_at REAL NOT NULL,
    halt_reason TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 1,
    failures_json TEXT NOT NULL DEFAULT '[]',
    UNIQUE (product, version, generation)
);
INSERT INTO rollouts_v6 (rollout_id, product, version, counter, plan_json, phase, stage,
                         stage_started_at, created_at, halt_reason, revision)
    SELECT rollout_id, product, version, counter, plan_json, phase, stage,
           stage_started_at, created_at, halt_reason, revision FROM rollouts;
DROP TABLE rollouts;
ALTER TABLE rollouts_v6 RENAME TO rollouts;
ALTER TABLE rollout_devices ADD COLUMN code INTEGER;
ALTER TABLE rollout_devices ADD COLUMN message TEXT NOT NULL DEFAULT '';
CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id)
"""
_MIGRATIONS: tuple[str, ...] = (_SCHEMA, _SCHEMA_SWARMS, _SCHEMA_ROLLOUTS,
                                _SCHEMA_DEVICE_COUNTERS, _SCHEMA_REVOCATION,
                                _SCHEMA_CONTROL_PLANE)
"""The one source of truth of the schema: ``_MIGRATIONS[v]`` takes a database from
version ``v`` to ``v + 1``; a new database runs them all from 0."""


@dataclass(frozen=True)
class StoredReport:
    """A report as stored: its row id and arrival time (epoch s), then what the device sent.

    The fields after ``received_at`` are those of :class:`~tracker.wire.Report`
    (``device_report_id`` is the wire's ``report_id``, the device's name for it).
    """

    report_id: int
    received_at: float
    device_id: str
    product: str
    from_version: str
    to_version: str
    status: int
    message: str
    bytes_origin: int
    bytes_peers: int
    timings_s: dict[str, float]
    device_report_id: str | None = None
    log_tail: str = ""

    @classmethod
    def from_report(cls, report_id: int, received_at: float, report: Report) -> StoredReport:
        return cls(report_id, received_at, report.device_id, report.product,
                   report.from_version, report.to_version, report.status, report.message,
                   report.bytes_origin, report.bytes_peers, dict(report.timings_s),
                   report.report_id, report.log_tail)

    @property
    def report(self) -> Report:
        """What the device sent."""
        return Report(self.device_id, self.product, self.from_version, self.to_version,
                      self.status, self.message, self.bytes_origin, self.bytes_peers,
                      dict(self.timings_s), self.device_report_id, self.log_tail)


@dataclass(frozen=True)
class DeviceRecord:
    """What the tracker knows of a device: what it said at its latest check-in (or, for
    ``version`` and ``release_counter``, what its latest successful report installed,
    whichever is newer), when it was last heard of (``last_seen``, epoch s), and the
    ``tags`` operators gave it."""

    device_id: str
    product: str
    hardware_id: str
    version: str
    release_counter: int
    last_seen: float
    network_id: str | None = None
    region: str | None = None
    labels: tuple[str, ...] = ()
    components: tuple[ComponentVersion, ...] | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices a listing returns (every field optional, all must hold).

    ``group``: a label the device declares or a tag an operator gave it;
    ``rollout_id`` (and ``status``, one of :data:`tracker.rollout.DEVICE_STATUSES`):
    devices admitted to that rollout (in that status); ``seen_before`` /
    ``seen_after``: last heard of before / at or after (epoch s); ``after``: device ids
    after this one (the next page); ``search``: device ids containing this text.
    """

    product: str | None = None
    version: str | None = None
    group: str | None = None
    rollout_id: str | None = None
    status: str | None = None
    seen_before: float | None = None
    seen_after: float | None = None
    after: str | None = None
    search: str | None = None


@dataclass(frozen=True)
class RolloutDevice:
    """A device's admission to a rollout, with the rollout's release (its history)."""

    rollout_id: str
    product: str
    version: str
    generation: int
    admission: Admission


@dataclass(frozen=True)
class TokenRecord:
    """An admin token as stored: the SHA-256 hex of the token, never the token itself.

    ``expires_at`` (epoch s) is ``None`` for a token that does not expire.
    """

    token_hash: str
    name: str
    role: str
    created_at: float
    expires_at: float | None


@dataclass(frozen=True)
class AuditEntry:
    """One line of the append-only audit log.

    ``actor``: the token's name, ``tracker`` for rollout decisions, or ``anonymous``;
    ``action``: what was asked or decided (``rollout.create``, ``rollout.pause``,
    ``rollout.halted``, ``auth`` ...); ``target``: what it was about (e.g.
    ``acme-router 2.0.0``); ``outcome``: ``ok``, ``refused`` or ``decided``;
    ``detail``: free text. ``entry_id`` is 0 for an entry not stored yet.
    """

    at: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: str
    entry_id: int = 0


@dataclass(frozen=True)
class RevokedCertificate:
    """A device certificate the tracker refuses: its fingerprint (hex SHA-256 of the
    DER), the device it was issued to, when (epoch s), by whom and why."""

    cert_sha256: str
    device_id: str
    revoked_at: float
    actor: str
    reason: str


class Store(Protocol):
    """Storage of the release catalogue, devices, reports, rollouts and the control
    plane (blocking). Every method is a transaction of its own unless called inside
    :meth:`atomic`."""

    def atomic(self, what: str) -> AbstractContextManager[None]:
        """One transaction around every call made inside (by this thread): committed
        when the block ends, rolled back (nothing written) when it raises. ``what``
        names it in errors. Nested blocks join the outer one."""
        ...

    # --- releases -----------------------------------------------------------------------

    def add_release(self, release: Release, now: float | None = None) -> bool:
        """Register ``release`` and its swarms at ``now`` (default: the store's clock).

        Returns ``True`` if added, ``False`` if exactly this release was already there.
        Registering a known release again adds the swarms it did not have yet (and
        returns ``True`` if there were any). A payload may serve several releases (a
        byte-identical image republished under a higher counter): they share its swarm.

        Raises:
            ReleaseConflictError: another release holds its version, or its counter in
                the same sequence (the image's, or the same component's); or one of its
                info-hashes shares its 20-byte announce form with another info-hash.
            StorageError: the database failed.
        """
        ...

    def release(self, product: str, version: str) -> Release | None:
        """One registered release, if it is registered."""
        ...

    def releases(self, product: str | None = None) -> list[Release]:
        """Registered releases (of ``product`` if given), by product then counter."""
        ...

    def registered_releases(self, product: str | None = None) -> list[tuple[Release, float]]:
        """Like :meth:`releases`, with when each was registered (epoch s)."""
        ...

    def swarms_of(self, announce_hash: bytes) -> list[SwarmInfo]:
        """The registered swarms announced as ``announce_hash`` (20 bytes): one per
        release its payload serves (the same info-hash), none if unknown."""
        ...

    def swarms(self, product: str | None = None) -> list[SwarmInfo]:
        """Registered swarms (of ``product`` if given), by product, version, then order
        of registration."""
        ...

    # --- devices and reports --------------------------------------------------------------

    def record_checkin(self, checkin: CheckIn, now: float) -> None:
        """Remember what the device runs, with ``last_seen = now``."""
        ...

    def record_installed(self, device_id: str, release: Release, now: float) -> None:
        """A report says ``device_id`` installed ``release``: the inventory follows
        (its version and counter, or its component's), unless it is not known."""
        ...

    def devices(self, where: DeviceFilter | None = None, *,
                limit: int | None = None) -> list[DeviceRecord]:
        """Devices matching ``where`` (default: all), by device id, at most ``limit``."""
        ...

    def device(self, device_id: str) -> DeviceRecord | None:
        """What the tracker knows of ``device_id``, if it ever checked in."""
        ...

    def count_devices(self, product: str | None = None, *,
                      seen_before: float | None = None) -> dict[tuple[str, str], int]:
        """Devices per (product, version) (``seen_before``: only those last heard of
        before it, epoch s)."""
        ...

    def set_tags(self, device_id: str, add: Sequence[str], remove: Sequence[str],
                 actor: str, now: float, audit: Sequence[AuditEntry] = ()) -> tuple[str, ...]:
        """Add and remove operator tags of a known device; return its tags.

        Raises:
            RequestError: the device never checked in.
        """
        ...

    def add_report(self, report: Report, now: float) -> tuple[int, bool]:
        """Store ``report`` received at ``now``: ``(its id, True)``; a report whose
        ``report_id`` this device sent before is not stored again: ``(the first one's
        id, False)``."""
        ...

    def reports(self, device_id: str | None = None, *, product: str | None = None,
                status: int | None = None, before_id: int | None = None,
                limit: int | None = None, newest_first: bool = False) -> list[StoredReport]:
        """Stored reports (filtered), oldest first (``newest_first``: the reverse),
        those with an id below ``before_id``, at most ``limit``."""
        ...

    def report_totals(self) -> tuple[dict[int, int], int, int]:
        """Reports per status, and the bytes from the origin and from peers they sum."""
        ...

    def report_counts(self, since: float) -> dict[tuple[str, int], int]:
        """Reports received at or after ``since`` (epoch s) per (product, status)."""
        ...

    def prune_reports(self, before: float) -> int:
        """Drop reports received before ``before`` (retention); return how many."""
        ...

    # --- replay protection (schema 4) ---------------------------------------------------

    def advance_counter(self, device_id: str, counter: int, now: float,
                        cert_sha256: str | None = None) -> int | None:
        """Accept ``counter`` as ``device_id``'s newest signed-request counter if it is
        above the last one accepted (or none was): ``None`` then, and it is stored with
        ``cert_sha256``, the certificate the request was signed with (also added to the
        device's certificates, :meth:`device_certificates`); otherwise nothing changes
        and the stored counter is returned. One atomic compare-and-set, so two tracker
        processes on one database never both accept the same counter."""
        ...

    def device_certificates(self, device_id: str) -> list[str]:
        """Fingerprints of every certificate ``device_id`` signed an accepted request
        with (check-ins and reports; announces and scrapes as :meth:`record_certificate`
        adds them; schema 5 on), the last check-in's or report's first."""
        ...

    def record_certificate(self, device_id: str, cert_sha256: str, now: float) -> None:
        """Remember that ``device_id`` signed an accepted request with ``cert_sha256``
        (kept once; what a revocation of the device takes)."""
        ...

    def device_counter(self, device_id: str) -> int | None:
        """The last counter accepted from ``device_id`` by :meth:`advance_counter`."""
        ...

    # --- revocation (schema 5) ------------------------------------------------------------

    def revoke_certificates(self, revoked: Sequence[RevokedCertificate],
                            audit: Sequence[AuditEntry] = ()) -> list[str]:
        """Add ``revoked`` to the revoked certificates and append ``audit``, in one
        transaction; return the fingerprints that were revoked already (those keep
        their first record)."""
        ...

    def revoked_certificates(self) -> list[RevokedCertificate]:
        """Every revoked certificate, oldest revocation first."""
        ...

    def revoked_fingerprints(self) -> dict[str, str]:
        """The fingerprint of every revoked certificate, with its device id."""
        ...

    # --- rollouts -------------------------------------------------------------------------

    def create_rollout(self, state: RolloutState, audit: Sequence[AuditEntry] = ()) -> None:
        """Store a new rollout (and audit entries) in one transaction. Its
        ``generation`` must be the release's next: 1, or one more than its latest
        rollout's, which must have halted or been aborted.

        Raises:
            RequestError: its release is not registered.
            ConflictError: the release has a rollout that is not halted or aborted, or
                ``state.generation`` is not the next one.
            StorageError: the database failed.
        """
        ...

    def rollouts(self, product: str | None = None, *,
                 history: bool = False) -> list[RolloutState]:
        """The latest rollout of each release (of ``product`` if given), by product then
        release counter; ``history``: every generation, oldest first per release."""
        ...

    def rollout_of(self, product: str, version: str) -> RolloutState | None:
        """The latest rollout of one release, if it has one."""
        ...

    def rollout(self, rollout_id: str) -> RolloutState | None:
        """The rollout with this id, if any."""
        ...

    def admission(self, rollout_id: str, device_id: str) -> Admission | None:
        """A device's admission record in a rollout, if it was admitted."""
        ...

    def admissions(self, rollout_id: str, *, status: str | None = None,
                   after: str | None = None, limit: int | None = None) -> list[Admission]:
        """The devices admitted to a rollout (in ``status``), by device id, after
        ``after``, at most ``limit``."""
        ...

    def admissions_of(self, device_id: str) -> list[RolloutDevice]:
        """Every rollout ``device_id`` was admitted to, newest first."""
        ...

    def save_rollout(self, state: RolloutState, admissions: Sequence[Admission] = (),
                     audit: Sequence[AuditEntry] = ()) -> None:
        """Write a rollout's new state, changed admissions and audit entries at once,
        if nobody saved the rollout since ``state`` was read (``state.revision``).

        Raises:
            StaleStateError: it was saved since (nothing written; read it again).
            StorageError: the database failed.
        """
        ...

    def in_flight(self, rollout_id: str, since: float) -> int:
        """Devices offered or downloading, whose admission changed at or after ``since``."""
        ...

    # --- control plane --------------------------------------------------------------------

    def add_token(self, record: TokenRecord) -> None:
        """Store an admin token record (its hash)."""
        ...

    def token(self, token_hash: str) -> TokenRecord | None:
        """The token record with this hash, if any."""
        ...

    def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append audit entries."""
        ...

    def audit(self, *, since: float = 0.0, limit: int = 1000) -> list[AuditEntry]:
        """Audit entries at or after ``since``, oldest first, at most ``limit``."""
        ...

    def prune_audit(self, before: float) -> int:
        """Drop audit entries older than ``before`` (retention); return how many."""
        ...

    def close(self) -> None:
        """Release the database; further calls raise StorageError. Idempotent."""
        ...


class SqliteStore:
    """:class:`Store` on one SQLite database file, through one connection.

    ``SqliteStore(path)`` opens the database, creating it (and its directory) unless
    ``create`` is false, turns on WAL and ``synchronous=NORMAL`` and checks the schema
    version. ``clock`` (epoch seconds) only dates releases added without ``now``.
    Thread-safe (one internal lock, held for a whole :meth:`atomic` block); every
    method may raise :class:`StorageError`. A context manager that closes the store on
    exit.

    Raises:
        StorageError: the file is missing (``create=False``), not a database, another
            application's database, from a newer schema, or cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._depth = 0  # open transaction blocks of the thread holding the lock
        self._conn: sqlite3.Connection | None = _connect(self.path, create)

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def atomic(self, what: str) -> Iterator[None]:
        with self._transaction(what):
            yield

    # --- releases ---------------------------------------------------------------------

    def add_release(self, release: Release, now: float | None = None) -> bool:
        added_at = self._clock() if now is None else now
        with self._transaction("add release") as conn:
            new_swarms = self._new_swarms(conn, release)
            rows = conn.execute(
                "SELECT version, counter, ifnull(component, '') FROM releases "
                "WHERE product = ? AND (version = ? OR (counter = ? AND "
                "ifnull(component, '') = ?))",
                (release.product, release.version, release.release_counter,
                 release.component or ""),
            ).fetchall()
            for version, counter, component in rows:
                if (version == release.version and counter == release.release_counter
                        and component == (release.component or "")):
                    _insert_swarms(conn, new_swarms)
                    return bool(new_swarms)
            if rows:
                version, counter, component = rows[0]
                sequence = f"component {component}" if component else "image"
                raise ReleaseConflictError(
                    f"cannot add {release.product} {release.version} with counter "
                    f"{release.release_counter}: {release.product} {version} with counter "
                    f"{counter} ({sequence}) is already registered (versions are unique "
                    "per product, counters per product and sequence: the image's, or "
                    "one component's)"
                )
            conn.execute(
                "INSERT INTO releases (product, version, counter, target, added_at, "
                "update_type, component, payloads_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (release.product, release.version, release.release_counter, release.target,
                 added_at, release.update_type, release.component,
                 json.dumps([_payload_to_json(p) for p in release.payloads])),
            )
            _insert_swarms(conn, new_swarms)
            return True

    @staticmethod
    def _new_swarms(conn: sqlite3.Connection, release: Release) -> list[SwarmInfo]:
        """``release``'s swarms not stored yet; refuses an info-hash whose announce form
        (first 20 bytes) another info-hash has."""
        new = []
        for swarm in release.swarms:
            rows = conn.execute(
                "SELECT info_hash, product, version FROM swarms WHERE announce_hash = ?",
                (swarm.announce_hash,)).fetchall()
            for row in rows:
                if row[0] != swarm.info_hash:
                    raise ReleaseConflictError(
                        f"cannot add {release.product} {release.version}: its payload "
                        f"info-hash {swarm.info_hash} shares its first 20 bytes with "
                        f"{row[0]} of {row[1]} {row[2]}")
            if not any((row[1], row[2]) == (swarm.product, swarm.version) for row in rows):
                new.append(swarm)
        return new

    def release(self, product: str, version: str) -> Release | None:
        found = [r for r in self.releases(product) if r.version == version]
        return found[0] if found else None

    def swarms_of(self, announce_hash: bytes) -> list[SwarmInfo]:
        with self._connection("look up swarm") as conn:
            rows = conn.execute(
                "SELECT info_hash, product, version, payload_kind FROM swarms "
                "WHERE announce_hash = ? ORDER BY rowid", (bytes(announce_hash),)).fetchall()
        return [_row_to_swarm(row) for row in rows]

    def swarms(self, product: str | None = None) -> list[SwarmInfo]:
        sql, params = _of_product("SELECT info_hash, product, version, payload_kind FROM swarms",
                                  product, "product, version, rowid")
        with self._connection("list swarms") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_row_to_swarm(row) for row in rows]

    def releases(self, product: str | None = None) -> list[Release]:
        return [release for release, _ in self.registered_releases(product)]

    def registered_releases(self, product: str | None = None) -> list[tuple[Release, float]]:
        sql, params = _of_product(
            "SELECT product, version, counter, target, added_at, update_type, component, "
            "payloads_json FROM releases", product, "product, ifnull(component, ''), counter")
        with self._connection("list releases") as conn:
            rows = conn.execute(sql, params).fetchall()
            swarms: dict[tuple[str, str], list[SwarmInfo]] = {}
            for swarm in self.swarms(product):
                swarms.setdefault((swarm.product, swarm.version), []).append(swarm)
        return [(_row_to_release(row, swarms.get((row[0], row[1]), [])), float(row[4]))
                for row in rows]

    # --- devices ----------------------------------------------------------------------

    def record_checkin(self, checkin: CheckIn, now: float) -> None:
        components = (None if checkin.components is None else json.dumps(
            [[c.name, c.version, c.release_counter] for c in checkin.components]))
        with self._transaction("record check-in") as conn:
            conn.execute(
                "INSERT INTO devices (device_id, product, hardware_id, version, "
                "release_counter, last_seen, network_id, region, labels_json, "
                "components_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET product = excluded.product, "
                "hardware_id = excluded.hardware_id, version = excluded.version, "
                "release_counter = excluded.release_counter, last_seen = excluded.last_seen, "
                "network_id = excluded.network_id, region = excluded.region, "
                "labels_json = excluded.labels_json, "
                "components_json = excluded.components_json",
                (checkin.device_id, checkin.product, checkin.hardware_id, checkin.version,
                 checkin.release_counter, now, checkin.network_id, checkin.region,
                 json.dumps(list(checkin.labels)), components),
            )

    def record_installed(self, device_id: str, release: Release, now: float) -> None:
        with self._transaction("record installed release") as conn:
            if release.component is None:
                conn.execute(
                    "UPDATE devices SET version = ?, release_counter = ?, "
                    "last_seen = max(last_seen, ?) WHERE device_id = ? AND product = ? "
                    "AND release_counter <= ?",
                    (release.version, release.release_counter, now, device_id,
                     release.product, release.release_counter))
                return
            row = conn.execute("SELECT components_json FROM devices WHERE device_id = ? "
                               "AND product = ?", (device_id, release.product)).fetchone()
            if row is None:
                return
            components = [c for c in _components(row[0]) or () if c.name != release.component]
            components.append(ComponentVersion(release.component, release.version,
                                               release.release_counter))
            conn.execute("UPDATE devices SET components_json = ?, "
                         "last_seen = max(last_seen, ?) WHERE device_id = ?",
                         (json.dumps([[c.name, c.version, c.release_counter]
                                      for c in sorted(components, key=lambda c: c.name)]),
                          now, device_id))

    def devices(self, where: DeviceFilter | None = None, *,
                limit: int | None = None) -> list[DeviceRecord]:
        f = where or DeviceFilter()
        clauses, params = [], []
        for column, value in (("d.product = ?", f.product), ("d.version = ?", f.version),
                              ("d.last_seen < ?", f.seen_before),
                              ("d.last_seen >= ?", f.seen_after),
                              ("d.device_id > ?", f.after),
                              ("instr(d.device_id, ?) > 0", f.search)):
            if value is not None:
                clauses.append(column)
                params.append(value)
        if f.group is not None:
            clauses.append("(EXISTS (SELECT 1 FROM json_each(d.labels_json) WHERE value = ?)"
                           " OR EXISTS (SELECT 1 FROM device_tags t WHERE t.device_id = "
                           "d.device_id AND t.tag = ?))")
            params += [f.group, f.group]
        if f.rollout_id is not None:
            sub = ("EXISTS (SELECT 1 FROM rollout_devices a WHERE a.device_id = d.device_id "
                   "AND a.rollout_id = ?")
            params.append(f.rollout_id)
            if f.status is not None:
                sub += " AND a.status = ?"
                params.append(f.status)
            clauses.append(sub + ")")
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices d"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY d.device_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        with self._connection("list devices") as conn:
            rows = conn.execute(sql, params).fetchall()
            return _with_tags(conn, [_row_to_device(r) for r in rows])

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._connection("look up device") as conn:
            row = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices d "
                               "WHERE d.device_id = ?", (device_id,)).fetchone()
            return None if row is None else _with_tags(conn, [_row_to_device(row)])[0]

    def count_devices(self, product: str | None = None, *,
                      seen_before: float | None = None) -> dict[tuple[str, str], int]:
        clauses, params = [], []
        for clause, value in (("product = ?", product), ("last_seen < ?", seen_before)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        sql = "SELECT product, version, count(*) FROM devices"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " GROUP BY product, version ORDER BY product, version"
        with self._connection("count devices") as conn:
            rows = conn.execute(sql, params).fetchall()
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    def set_tags(self, device_id: str, add: Sequence[str], remove: Sequence[str],
                 actor: str, now: float, audit: Sequence[AuditEntry] = ()) -> tuple[str, ...]:
        with self._transaction("tag device") as conn:
            if conn.execute("SELECT 1 FROM devices WHERE device_id = ?",
                            (device_id,)).fetchone() is None:
                raise RequestError(f"unknown device {device_id}")
            conn.executemany("DELETE FROM device_tags WHERE device_id = ? AND tag = ?",
                             [(device_id, t) for t in remove])
            conn.executemany("INSERT INTO device_tags (device_id, tag, added_at, actor) "
                             "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                             [(device_id, t, now, actor) for t in add])
            _insert_audit(conn, audit)
            return _tags_of(conn, device_id)

    # --- replay protection --------------------------------------------------------------

    def advance_counter(self, device_id: str, counter: int, now: float,
                        cert_sha256: str | None = None) -> int | None:
        with self._transaction("advance request counter") as conn:
            changed = conn.execute(
                "INSERT INTO device_counters (device_id, counter, updated_at, cert_sha256) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
                "counter = excluded.counter, updated_at = excluded.updated_at, "
                "cert_sha256 = excluded.cert_sha256 "
                "WHERE device_counters.counter < excluded.counter",
                (device_id, counter, now, cert_sha256)).rowcount
            if changed == 1:
                if cert_sha256 is not None:
                    conn.execute("INSERT INTO device_certificates (device_id, cert_sha256, "
                                 "first_seen) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                                 (device_id, cert_sha256, now))
                return None
            row = conn.execute("SELECT counter FROM device_counters WHERE device_id = ?",
                               (device_id,)).fetchone()
        if row is None:  # pragma: no cover - the upsert either wrote or found a row
            raise RuntimeError("request counter neither stored nor found")
        return int(row[0])

    def device_counter(self, device_id: str) -> int | None:
        with self._connection("look up request counter") as conn:
            row = conn.execute("SELECT counter FROM device_counters WHERE device_id = ?",
                               (device_id,)).fetchone()
        return None if row is None else int(row[0])

    def record_certificate(self, device_id: str, cert_sha256: str, now: float) -> None:
        with self._transaction("record device certificate") as conn:
            conn.execute("INSERT INTO device_certificates (device_id, cert_sha256, "
                         "first_seen) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                         (device_id, cert_sha256, now))

    def device_certificates(self, device_id: str) -> list[str]:
        with self._connection("list device certificates") as conn:
            last = conn.execute("SELECT cert_sha256 FROM device_counters WHERE device_id = ?",
                                (device_id,)).fetchone()
            rows = conn.execute("SELECT cert_sha256 FROM device_certificates WHERE "
                                "device_id = ? ORDER BY first_seen DESC, cert_sha256",
                                (device_id,)).fetchall()
        out = [] if last is None or last[0] is None else [str(last[0])]
        return out + [str(r[0]) for r in rows if str(r[0]) not in out]

    # --- revocation ---------------------------------------------------------------------

    def revoke_certificates(self, revoked: Sequence[RevokedCertificate],
                            audit: Sequence[AuditEntry] = ()) -> list[str]:
        with self._transaction("revoke certificates") as conn:
            already = []
            for record in revoked:
                if conn.execute(
                        "INSERT INTO revoked_certificates (cert_sha256, device_id, "
                        "revoked_at, actor, reason) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT DO NOTHING",
                        (record.cert_sha256, record.device_id, record.revoked_at,
                         record.actor, record.reason)).rowcount != 1:
                    already.append(record.cert_sha256)
            # Every certificate the device signed an accepted request with is revoked
            # now, so its counter has nothing left to protect; reset, so that a thief
            # who pushed it up with the stolen key cannot lock out the device's next
            # certificate (whose counters start from the device's clock).
            for device_id in {record.device_id for record in revoked}:
                conn.execute("UPDATE device_counters SET counter = 0 WHERE device_id = ?",
                             (device_id,))
            _insert_audit(conn, audit)
        return already

    def revoked_certificates(self) -> list[RevokedCertificate]:
        with self._connection("list revoked certificates") as conn:
            rows = conn.execute("SELECT cert_sha256, device_id, revoked_at, actor, reason "
                                "FROM revoked_certificates ORDER BY revoked_at, rowid"
                                ).fetchall()
        return [RevokedCertificate(str(r[0]), str(r[1]), float(r[2]), str(r[3]), str(r[4]))
                for r in rows]

    def revoked_fingerprints(self) -> dict[str, str]:
        with self._connection("read revoked certificates") as conn:
            rows = conn.execute("SELECT cert_sha256, device_id FROM revoked_certificates"
                                ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    # --- rollouts -----------------------------------------------------------------------

    def create_rollout(self, state: RolloutState, audit: Sequence[AuditEntry] = ()) -> None:
        with self._transaction("create rollout") as conn:
            row = conn.execute("SELECT counter FROM releases WHERE product = ? AND version = ?",
                               (state.product, state.version)).fetchone()
            if row is None:
                raise RequestError(f"no release {state.product} {state.version} is "
                                   "registered")
            if int(row[0]) != state.release_counter:
                raise RuntimeError("rollout built with the wrong release counter")
            if conn.execute("SELECT 1 FROM rollouts WHERE rollout_id = ?",
                            (state.rollout_id,)).fetchone() is not None:
                raise ConflictError(f"rollout id {state.rollout_id} is taken")
            latest = conn.execute(
                "SELECT rollout_id, phase, generation FROM rollouts WHERE product = ? AND "
                "version = ? ORDER BY generation DESC LIMIT 1",
                (state.product, state.version)).fetchone()
            if latest is not None and str(latest[1]) not in RESTARTABLE:
                raise ConflictError(f"{state.product} {state.version} already has a "
                                    f"rollout ({latest[0]}, {latest[1]}); only a halted or "
                                    "aborted one may be followed by a new one")
            expected = 1 if latest is None else int(latest[2]) + 1
            if state.generation != expected:
                raise ConflictError(f"{state.product} {state.version}: the next rollout is "
                                    f"generation {expected}, not {state.generation}")
            conn.execute(
                "INSERT INTO rollouts (rollout_id, product, version, counter, plan_json, "
                "phase, stage, stage_started_at, created_at, halt_reason, generation, "
                "failures_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (state.rollout_id, state.product, state.version, state.release_counter,
                 json.dumps(state.plan.to_json(), sort_keys=True), state.phase, state.stage,
                 state.stage_started_at, state.created_at, state.halt_reason,
                 state.generation, _failures_to_json(state.failures)))
            _write_stages(conn, state)
            _insert_audit(conn, audit)

    def rollouts(self, product: str | None = None, *,
                 history: bool = False) -> list[RolloutState]:
        select = f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts r"
        if not history:
            select += (" WHERE generation = (SELECT max(generation) FROM rollouts x "
                       "WHERE x.product = r.product AND x.version = r.version)")
        params: tuple[str, ...] = ()
        if product is not None:
            select += (" AND" if not history else " WHERE") + " product = ?"
            params = (product,)
        with self._connection("list rollouts") as conn:
            rows = conn.execute(select + " ORDER BY product, counter, generation",
                                params).fetchall()
            return [_row_to_rollout(conn, row) for row in rows]

    def rollout_of(self, product: str, version: str) -> RolloutState | None:
        with self._connection("look up rollout") as conn:
            row = conn.execute(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts "
                               "WHERE product = ? AND version = ? "
                               "ORDER BY generation DESC LIMIT 1",
                               (product, version)).fetchone()
            return None if row is None else _row_to_rollout(conn, row)

    def rollout(self, rollout_id: str) -> RolloutState | None:
        with self._connection("look up rollout") as conn:
            row = conn.execute(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts "
                               "WHERE rollout_id = ?", (rollout_id,)).fetchone()
            return None if row is None else _row_to_rollout(conn, row)

    def admission(self, rollout_id: str, device_id: str) -> Admission | None:
        with self._connection("look up admission") as conn:
            row = conn.execute(
                f"SELECT {_ADMISSION_COLUMNS} FROM rollout_devices "
                "WHERE rollout_id = ? AND device_id = ?", (rollout_id, device_id)).fetchone()
        return None if row is None else _row_to_admission(row)

    def admissions(self, rollout_id: str, *, status: str | None = None,
                   after: str | None = None, limit: int | None = None) -> list[Admission]:
        sql = f"SELECT {_ADMISSION_COLUMNS} FROM rollout_devices WHERE rollout_id = ?"
        params: list[Any] = [rollout_id]
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        if after is not None:
            sql += " AND device_id > ?"
            params.append(after)
        sql += " ORDER BY device_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        with self._connection("list admissions") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_row_to_admission(r) for r in rows]

    def admissions_of(self, device_id: str) -> list[RolloutDevice]:
        with self._connection("list a device's rollouts") as conn:
            rows = conn.execute(
                "SELECT r.rollout_id, r.product, r.version, r.generation, "
                f"{', '.join('a.' + c for c in _ADMISSION_COLUMNS.split(', '))} "
                "FROM rollout_devices a JOIN rollouts r ON r.rollout_id = a.rollout_id "
                "WHERE a.device_id = ? ORDER BY r.created_at DESC, r.rowid DESC",
                (device_id,)).fetchall()
        return [RolloutDevice(str(r[0]), str(r[1]), str(r[2]), int(r[3]),
                              _row_to_admission(r[4:])) for r in rows]

    def save_rollout(self, state: RolloutState, admissions: Sequence[Admission] = (),
                     audit: Sequence[AuditEntry] = ()) -> None:
        with self._transaction("save rollout") as conn:
            cursor = conn.execute(
                "UPDATE rollouts SET phase = ?, stage = ?, stage_started_at = ?, "
                "halt_reason = ?, failures_json = ?, revision = revision + 1 "
                "WHERE rollout_id = ? AND revision = ?",
                (state.phase, state.stage, state.stage_started_at, state.halt_reason,
                 _failures_to_json(state.failures), state.rollout_id, state.revision))
            if cursor.rowcount != 1:
                row = conn.execute("SELECT revision FROM rollouts WHERE rollout_id = ?",
                                   (state.rollout_id,)).fetchone()
                if row is None:
                    raise StorageError(f"rollout {state.rollout_id} is not stored")
                raise StaleStateError(f"rollout {state.rollout_id} changed since it was "
                                      f"read (revision {state.revision}, now {row[0]})")
            _write_stages(conn, state)
            conn.executemany(
                "INSERT INTO rollout_devices (rollout_id, device_id, stage, status, "
                "updated_at, code, message) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (rollout_id, device_id) DO UPDATE SET stage = excluded.stage, "
                "status = excluded.status, updated_at = excluded.updated_at, "
                "code = excluded.code, message = excluded.message",
                [(state.rollout_id, a.device_id, a.stage, a.status, a.updated_at, a.code,
                  a.message) for a in admissions])
            _insert_audit(conn, audit)

    def in_flight(self, rollout_id: str, since: float) -> int:
        with self._connection("count in flight") as conn:
            row = conn.execute(
                "SELECT count(*) FROM rollout_devices WHERE rollout_id = ? AND status IN "
                "('offered', 'downloading') AND updated_at >= ?",
                (rollout_id, since)).fetchone()
        return int(row[0])

    # --- control plane ------------------------------------------------------------------

    def add_token(self, record: TokenRecord) -> None:
        with self._transaction("add token") as conn:
            conn.execute("INSERT INTO admin_tokens (token_hash, name, role, created_at, "
                         "expires_at) VALUES (?, ?, ?, ?, ?)",
                         (record.token_hash, record.name, record.role, record.created_at,
                          record.expires_at))

    def token(self, token_hash: str) -> TokenRecord | None:
        with self._connection("look up token") as conn:
            row = conn.execute("SELECT token_hash, name, role, created_at, expires_at "
                               "FROM admin_tokens WHERE token_hash = ?",
                               (token_hash,)).fetchone()
        if row is None:
            return None
        return TokenRecord(str(row[0]), str(row[1]), str(row[2]), float(row[3]),
                           None if row[4] is None else float(row[4]))

    def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        with self._transaction("append audit") as conn:
            _insert_audit(conn, entries)

    def audit(self, *, since: float = 0.0, limit: int = 1000) -> list[AuditEntry]:
        with self._connection("read audit") as conn:
            rows = conn.execute(
                "SELECT at, actor, action, target, outcome, detail, id FROM audit "
                "WHERE at >= ? ORDER BY id LIMIT ?", (since, limit)).fetchall()
        return [AuditEntry(float(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]),
                           str(r[5]), int(r[6])) for r in rows]

    def prune_audit(self, before: float) -> int:
        with self._transaction("prune audit") as conn:
            return int(conn.execute("DELETE FROM audit WHERE at < ?", (before,)).rowcount)

    # --- reports ----------------------------------------------------------------------

    def add_report(self, report: Report, now: float) -> tuple[int, bool]:
        timings = json.dumps(report.timings_s, sort_keys=True, allow_nan=False)
        with self._transaction("store report") as conn:
            if report.report_id is not None:
                row = conn.execute("SELECT id FROM reports WHERE device_id = ? AND "
                                   "report_id = ?", (report.device_id, report.report_id)
                                   ).fetchone()
                if row is not None:
                    return int(row[0]), False
            cursor = conn.execute(
                "INSERT INTO reports (device_id, product, from_version, to_version, status, "
                "message, bytes_origin, bytes_peers, timings_json, received_at, report_id, "
                "log_tail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (report.device_id, report.product, report.from_version, report.to_version,
                 report.status, report.message, report.bytes_origin, report.bytes_peers,
                 timings, now, report.report_id, report.log_tail),
            )
            report_id = cursor.lastrowid
        if report_id is None:  # pragma: no cover - sqlite always sets it after an INSERT
            raise RuntimeError("sqlite did not return the new report id")
        return report_id, True

    def reports(self, device_id: str | None = None, *, product: str | None = None,
                status: int | None = None, before_id: int | None = None,
                limit: int | None = None, newest_first: bool = False) -> list[StoredReport]:
        sql = (f"SELECT {_REPORT_COLUMNS} FROM reports")
        clauses, params = [], []
        for clause, value in (("device_id = ?", device_id), ("product = ?", product),
                              ("status = ?", status), ("id < ?", before_id)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        with self._connection("list reports") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_row_to_report(row) for row in rows]

    def report_totals(self) -> tuple[dict[int, int], int, int]:
        with self._connection("sum reports") as conn:
            rows = conn.execute("SELECT status, count(*), sum(bytes_origin), "
                                "sum(bytes_peers) FROM reports GROUP BY status").fetchall()
        return ({int(r[0]): int(r[1]) for r in rows}, sum(int(r[2] or 0) for r in rows),
                sum(int(r[3] or 0) for r in rows))

    def report_counts(self, since: float) -> dict[tuple[str, int], int]:
        with self._connection("count recent reports") as conn:
            rows = conn.execute("SELECT product, status, count(*) FROM reports "
                                "WHERE received_at >= ? GROUP BY product, status",
                                (since,)).fetchall()
        return {(str(r[0]), int(r[1])): int(r[2]) for r in rows}

    def prune_reports(self, before: float) -> int:
        with self._transaction("prune reports") as conn:
            return int(conn.execute("DELETE FROM reports WHERE received_at < ?",
                                    (before,)).rowcount)

    # --- lifecycle --------------------------------------------------------------------

    def journal_mode(self) -> str:
        """The connection's journal mode (``"wal"`` once opened)."""
        with self._connection("read journal mode") as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.close()
            except sqlite3.Error as exc:
                raise StorageError(f"closing {self.path}: {exc}") from exc

    @contextmanager
    def _connection(self, what: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and translate sqlite3 errors (inside a transaction block, the
        block's statements; else one statement on its own)."""
        with self._lock:
            if self._conn is None:
                raise StorageError(f"{what}: the tracker store is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StorageError(f"{what} in {self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), committed unless the body raises;
        inside another one (:meth:`atomic`), part of it."""
        with self._connection(what) as conn:
            if self._depth:
                self._depth += 1
                try:
                    yield conn
                finally:
                    self._depth -= 1
                return
            conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
            finally:
                self._depth = 0


_DEVICE_COLUMNS = ("d.device_id, d.product, d.hardware_id, d.version, d.release_counter, "
                   "d.last_seen, d.network_id, d.region, d.labels_json, d.components_json")
_ROLLOUT_COLUMNS = ("rollout_id, product, version, counter, plan_json, phase, stage, "
                    "stage_started_at, created_at, halt_reason, revision, generation, "
                    "failures_json")
_ADMISSION_COLUMNS = "device_id, stage, status, updated_at, code, message"
_REPORT_COLUMNS = ("id, received_at, device_id, product, from_version, to_version, status, "
                   "message, bytes_origin, bytes_peers, timings_json, report_id, log_tail")
_STAGE_FIELDS = ("admitted", "downloading", "succeeded", "failed", "rolled_back",
                 "bytes_origin", "bytes_peers")


def _row_to_device(r: Sequence[Any]) -> DeviceRecord:
    try:
        labels = tuple(str(x) for x in json.loads(r[8]))
    except (ValueError, TypeError) as exc:
        raise StorageError(f"device {r[0]}: corrupt labels_json: {exc}") from exc
    return DeviceRecord(str(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]), float(r[5]),
                        None if r[6] is None else str(r[6]),
                        None if r[7] is None else str(r[7]), labels, _components(r[9]))


def _components(raw: str | None) -> tuple[ComponentVersion, ...] | None:
    if raw is None:
        return None
    try:
        return tuple(ComponentVersion(str(n), str(v), int(c)) for n, v, c in json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise StorageError(f"corrupt components_json: {exc}") from exc


def _tags_of(conn: sqlite3.Connection, device_id: str) -> tuple[str, ...]:
    return tuple(str(r[0]) for r in conn.execute(
        "SELECT tag FROM device_tags WHERE device_id = ? ORDER BY tag", (device_id,)))


def _with_tags(conn: sqlite3.Connection, devices: list[DeviceRecord]) -> list[DeviceRecord]:
    if not devices:
        return devices
    tags: dict[str, list[str]] = {}
    ids = [d.device_id for d in devices]
    for start in range(0, len(ids), 500):  # SQLite's bound on host parameters
        part = ids[start:start + 500]
        for device_id, tag in conn.execute(
                "SELECT device_id, tag FROM device_tags WHERE device_id IN "
                f"({', '.join('?' * len(part))}) ORDER BY tag", part):
            tags.setdefault(str(device_id), []).append(str(tag))
    return [replace(d, tags=tuple(tags[d.device_id])) if d.device_id in tags else d
            for d in devices]


def _row_to_admission(r: Sequence[Any]) -> Admission:
    return Admission(str(r[0]), int(r[1]), str(r[2]), float(r[3]),
                     None if r[4] is None else int(r[4]), str(r[5]))


def _row_to_report(row: Sequence[Any]) -> StoredReport:
    try:
        timings = {str(k): float(v) for k, v in json.loads(row[10]).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise StorageError(f"report {row[0]}: corrupt timings_json: {exc}") from exc
    return StoredReport(int(row[0]), float(row[1]), str(row[2]), str(row[3]), str(row[4]),
                        str(row[5]), int(row[6]), str(row[7]), int(row[8]), int(row[9]),
                        timings, None if row[11] is None else str(row[11]), str(row[12]))


def _row_to_rollout(conn: sqlite3.Connection, row: Sequence[Any]) -> RolloutState:
    (rollout_id, product, version, counter, plan_json, phase, stage, stage_started_at,
     created_at, halt_reason, revision, generation, failures_json) = row
    try:
        plan = _plan_of(str(plan_json))
        failures = tuple(FailureNote(str(f[0]), int(f[1]), int(f[2]), str(f[3]), float(f[4]))
                         for f in json.loads(failures_json))
    except (ValueError, TypeError, IndexError, RequestError) as exc:
        raise StorageError(f"rollout {rollout_id}: corrupt plan or failures: {exc}") from exc
    stages = {int(r[0]): StageCounters(*(int(v) for v in r[1:])) for r in conn.execute(
        f"SELECT stage, {', '.join(_STAGE_FIELDS)} FROM rollout_stages WHERE rollout_id = ?",
        (rollout_id,))}
    counters = tuple(stages.get(i, StageCounters()) for i in range(len(plan.stage_names)))
    return RolloutState(str(rollout_id), str(product), str(version), int(counter), plan,
                        str(phase), int(stage), float(stage_started_at), float(created_at),
                        counters, str(halt_reason), int(generation), failures,
                        revision=int(revision))


@functools.lru_cache(maxsize=256)
def _plan_of(plan_json: str) -> RolloutPlan:
    """A stored plan, parsed and validated once per distinct text (a rollout is read
    at every check-in and report of its product; plans are frozen values)."""
    return RolloutPlan.from_json(json.loads(plan_json))


def _failures_to_json(failures: Sequence[FailureNote]) -> str:
    return json.dumps([[f.device_id, f.stage, f.status, f.message, f.at] for f in failures])


def _write_stages(conn: sqlite3.Connection, state: RolloutState) -> None:
    conn.executemany(
        f"INSERT OR REPLACE INTO rollout_stages (rollout_id, stage, {', '.join(_STAGE_FIELDS)})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(state.rollout_id, i, *(getattr(c, f) for f in _STAGE_FIELDS))
         for i, c in enumerate(state.counters)])


def _of_product(select: str, product: str | None, order_by: str) -> tuple[str, tuple[str, ...]]:
    """``select`` restricted to ``product`` when given, ordered: ``(sql, params)``."""
    if product is None:
        return f"{select} ORDER BY {order_by}", ()
    return f"{select} WHERE product = ? ORDER BY {order_by}", (product,)


def _insert_audit(conn: sqlite3.Connection, entries: Sequence[AuditEntry]) -> None:
    conn.executemany(
        "INSERT INTO audit (at, actor, action, target, outcome, detail) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(e.at, e.actor, e.action, e.target, e.outcome, e.detail) for e in entries])


def _payload_to_json(p: PayloadSummary) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": p.kind, "encoding": p.encoding, "size": p.size,
                           "sha256": p.sha256}
    if p.base_sha256 is not None:
        out["base_sha256"] = p.base_sha256
    return out


def _row_to_release(row: Sequence[Any], swarms: list[SwarmInfo]) -> Release:
    product, version, counter, target, _, update_type, component, payloads_json = row
    try:
        payloads = tuple(PayloadSummary(str(p["kind"]), str(p["encoding"]), int(p["size"]),
                                        str(p["sha256"]), p.get("base_sha256"))
                         for p in json.loads(payloads_json))
        return Release(str(product), str(version), int(counter), str(target), tuple(swarms),
                       str(update_type), None if component is None else str(component),
                       payloads)
    except (RequestError, ValueError, TypeError, KeyError) as exc:
        raise StorageError(f"corrupt release row {product!r} {version!r}: {exc}") from exc


def _row_to_swarm(row: Sequence[Any]) -> SwarmInfo:
    try:
        return SwarmInfo(str(row[0]), str(row[1]), str(row[2]), str(row[3]))
    except RequestError as exc:
        raise StorageError(f"corrupt swarm row {row!r}: {exc}") from exc


def _insert_swarms(conn: sqlite3.Connection, swarms: list[SwarmInfo]) -> None:
    conn.executemany(
        "INSERT INTO swarms (info_hash, announce_hash, product, version, payload_kind) "
        "VALUES (?, ?, ?, ?, ?)",
        [(s.info_hash, s.announce_hash, s.product, s.version, s.payload_kind)
         for s in swarms],
    )


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    if not create and not path.is_file():
        raise StorageError(f"tracker database {path} does not exist")
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                               timeout=_BUSY_TIMEOUT_MS / 1000)
    except (OSError, sqlite3.Error) as exc:
        raise StorageError(f"cannot open tracker database {path}: {exc}") from exc
    try:
        _configure(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    """Pragmas, then bring the schema to :data:`SCHEMA_VERSION` (a new database runs
    every migration from 0)."""
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"{path}: cannot enable WAL journal (got {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if exists is None:
                others = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
                ).fetchone()[0]
                if others:
                    raise StorageError(f"{path} is an SQLite database but not a tracker's "
                                       "(no schema_version table)")
                version: object = 0
            else:
                version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            if not (isinstance(version, int) and 0 <= version <= SCHEMA_VERSION):
                raise StorageError(f"{path}: tracker schema version {version!r}, this "
                                   f"swarmota supports {SCHEMA_VERSION}")
            for step in range(version, SCHEMA_VERSION):
                _run_script(conn, _MIGRATIONS[step])
            if version == 0:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)",
                             (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        except BaseException:
            conn.rollback()
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open tracker database {path}: {exc}") from exc
